"""Generation speed on CPU: prefill and decode tokens/s, with and without the KV cache, vs
transformers' `generate` for the same-sized Qwen2 model.

    python benchmarks/generate.py [--threads 1] [--layers 4 --d-model 512 --prompt 128 --new 32]
                                  [--scan-unroll N]

Prints a table and writes benchmarks/results/generate.json. Text-only prompts, so the JAX model
and the transformers Qwen2 do the same work (the vision tower is not timed here).

Both sides are timed the same way: prefill = generating 1 token (the prompt's forward pass, which
computes the logits it needs, plus choosing one token); decode = (generating `new` tokens minus
generating 1) per extra token. (Timing transformers' prefill as `model(ids)` instead would count
full-vocabulary logits at every prompt position, which `generate` does not compute, and make
the subtraction meaningless.) --threads N pins this process to the first N cores (XLA:CPU sizes
its thread pool from them) and gives PyTorch N threads; 0 = every core. --scan-unroll sets the
JAX model's `scan_unroll` (default: every layer, the CPU setting; 1 = a rolled layer loop).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from molmo_jax import config as C  # noqa: E402
from molmo_jax.generate import SamplingConfig, _compiled  # noqa: E402
from molmo_jax.models.molmo import Molmo, abstract_params  # noqa: E402


def small_config(layers: int, d_model: int, scan_unroll: int = 0) -> C.MolmoConfig:
  heads = d_model // 64
  cfg = C.tiny("qwen2", num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=max(1, heads // 4),
               head_dim=64, mlp_dim=4 * d_model, vocab_size=32000, embedding_size=32000,
               rope_max_length=4096)
  return cfg.replace(scan_unroll=scan_unroll or layers)


def random_params(cfg):
  shapes = abstract_params(cfg)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  return jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


def timed(fn, repeats=3):
  fn()  # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def jax_rows(cfg, params, batch, prompt, new):
  model = Molmo(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (batch, prompt)), jnp.int32)
  inputs = {"input_ids": ids}
  prefill_only = _compiled(model, SamplingConfig(max_new_tokens=1))
  full = _compiled(model, SamplingConfig(max_new_tokens=new))
  rng = jax.random.PRNGKey(0)
  t_prefill = timed(lambda: jax.block_until_ready(prefill_only(params, inputs, rng)))
  t_full = timed(lambda: jax.block_until_ready(full(params, inputs, rng)))
  decode_s = max(t_full - t_prefill, 1e-9)

  # Without a cache: every new token re-runs the whole (fixed-size, padded) sequence.
  total = prompt + new
  forward = jax.jit(lambda p, x: model.apply({"params": p}, {"input_ids": x})[0])
  buf = jnp.concatenate([ids, jnp.full((batch, new), -1, jnp.int32)], axis=1)
  def no_cache():
    b = buf
    for i in range(new):
      logits = forward(params, b)
      b = b.at[:, prompt + i].set(jnp.argmax(logits[:, prompt + i - 1], -1).astype(jnp.int32))
    return jax.block_until_ready(b)
  t_nocache = timed(no_cache, repeats=1)
  del total
  return {"prefill_tok_s": batch * prompt / t_prefill, "decode_tok_s": batch * (new - 1) / decode_s,
          "decode_tok_s_no_cache": batch * new / t_nocache}


def torch_rows(layers, d_model, batch, prompt, new):
  try:
    import torch
    import transformers
  except ImportError:
    return None
  heads = d_model // 64
  cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=d_model, intermediate_size=4 * d_model,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
                                 tie_word_embeddings=False)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  ids = torch.randint(0, 32000, (batch, prompt))
  def generate(count):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                          min_new_tokens=count, do_sample=False, pad_token_id=0)

  with torch.no_grad():
    t_prefill = timed(lambda: generate(1))
    t_gen = timed(lambda: generate(new))
  decode_s = max(t_gen - t_prefill, 1e-9)
  return {"prefill_tok_s": batch * prompt / t_prefill, "decode_tok_s": batch * (new - 1) / decode_s}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=32)
  p.add_argument("--batches", default="1,16")
  p.add_argument("--threads", type=int, default=0, help="cores for both sides; 0 = all")
  p.add_argument("--scan-unroll", type=int, default=0, help="JAX scan_unroll; 0 = every layer")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.json"))
  args = p.parse_args()
  available = sorted(os.sched_getaffinity(0))
  if not 0 <= args.threads <= len(available):
    p.error(f"--threads: expected 0..{len(available)} (the cores this process may use), got {args.threads}")
  threads = args.threads or len(available)
  os.sched_setaffinity(0, available[:threads])      # before JAX creates its CPU client
  try:
    import torch
    torch.set_num_threads(threads)
  except ImportError:
    pass
  cfg = small_config(args.layers, args.d_model, args.scan_unroll)
  params = random_params(cfg)
  results = []
  for batch in [int(b) for b in args.batches.split(",")]:
    ours = jax_rows(cfg, params, batch, args.prompt, args.new)
    ref = torch_rows(args.layers, args.d_model, batch, args.prompt, args.new)
    results.append({"batch": batch, "jax": ours, "transformers": ref})
  print(f"CPU generation, {args.layers} layers, d_model {args.d_model}, prompt {args.prompt}, "
        f"{args.new} new tokens, {threads} of {os.cpu_count()} cores, scan_unroll {cfg.scan_unroll}")
  print(f"{'batch':>5} | {'JAX prefill tok/s':>17} | {'JAX decode tok/s':>16} | {'JAX no-cache tok/s':>18} | "
        f"{'HF prefill tok/s':>16} | {'HF decode tok/s':>15} | decode ratio JAX/HF")
  for r in results:
    j, t = r["jax"], r["transformers"] or {}
    ratio = j["decode_tok_s"] / t["decode_tok_s"] if t else float("nan")
    print(f"{r['batch']:>5} | {j['prefill_tok_s']:>17.0f} | {j['decode_tok_s']:>16.1f} | "
          f"{j['decode_tok_s_no_cache']:>18.1f} | {t.get('prefill_tok_s', float('nan')):>16.0f} | "
          f"{t.get('decode_tok_s', float('nan')):>15.1f} | {ratio:.2f}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"args": vars(args), "threads": threads, "results": results}, indent=2))


if __name__ == "__main__":
  main()
