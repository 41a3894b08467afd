"""Train-step speed on CPU: our jitted step vs the same Qwen2 in transformers/PyTorch with AdamW.

Run:  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/train_step.py
          [--threads N] [--batch 4] [--length 256] [--steps 10]
          [--out PATH]     (default PATH: benchmarks/results/train_step.json)

--threads N pins the process to the first N cores (XLA:CPU sizes its thread pool from the cores
it may run on) and gives PyTorch N threads; by default both use every core. GLIBC_TUNABLES must
be set before the process starts (glibc reads it once); with it, malloc backs large blocks with
huge pages and XLA's per-step temporary buffer stops costing page faults (both sides benefit).

Legend: B batch, T sequence length, D width, L layers, V vocabulary.

Both sides train the same text-only decoder (Qwen2 block: GQA with qkv bias, SwiGLU, RMSNorm,
RoPE, untied LM head, frozen input embedding) on the same random [B, T] batch:
  JAX    molmo_jax.training.train_step (one CPU device; AdamW per component, per-component
         clipping; its tiny vision tower is idle on text-only batches)
         The layer scan is unrolled (model.scan_unroll, the CPU setting; the parameters keep the
         scanned layout).
  torch  Qwen2ForCausalLM + torch.optim.AdamW + clip_grad_norm_, eager (no torch.compile), with
         the same number of threads
Each side runs warm-up steps first (the JAX one compiles), then `--steps` timed steps. Reported:
median wall seconds per step, median process CPU seconds per step (all threads; robust to other
jobs on a shared machine), tokens/s from the wall time, and the analytic model FLOP/s
(molmo_jax.training.flops, 3x forward).
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from molmo_jax import config as C
from molmo_jax import sharding
from molmo_jax.models.molmo import Molmo
from molmo_jax.training import flops
from molmo_jax.training import train_step as ts
from molmo_jax.training.optimizer import ComponentSchedule, OptimizerConfig, build_optimizer

# A small Qwen2: about 8 M weights (2.1 M each in the token table and the LM head).
LLM = dict(vocab_size=8192, embedding_size=8192, d_model=256, num_layers=4, num_heads=8,
           num_kv_heads=2, head_dim=32, mlp_dim=1024, rope_max_length=4096)
LR = 1e-4


def model_config() -> C.MolmoConfig:
  return C.tiny("qwen2", **LLM).replace(scan_unroll=LLM["num_layers"])


def random_batch(cfg: C.MolmoConfig, batch: int, length: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.llm.vocab_size, (batch, length + 1)).astype(np.int32)
  return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:],
          "loss_weights": np.ones((batch, length), np.float32)}


def timed(step, steps: int) -> tuple[list[float], list[float]]:
  wall, cpu = [], []
  for _ in range(steps):
    w, c = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return wall, cpu


def bench_jax(cfg: C.MolmoConfig, batch: dict, steps: int, warmup: int) -> dict:
  model = Molmo(cfg)
  spec = ts.spec_of(batch)
  sched = ComponentSchedule(LR, 0)
  optimizer = build_optimizer(OptimizerConfig(total_steps=1000, connector=sched, vit=sched, llm=sched),
                              ts.abstract_params(model, spec))
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  _, shardings = ts.abstract_train_state(model, optimizer, mesh, spec)
  step_fn = ts.make_train_step(model, optimizer, mesh, shardings, spec, ts.StepConfig())
  holder = {"state": ts.init_train_state(model, optimizer, mesh, spec, jax.random.PRNGKey(0))}
  device_batch = ts.make_global_batch(batch, mesh)

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], device_batch)
    holder["loss"] = float(metrics["loss"])          # waits for the step

  start = time.perf_counter()
  one_step()
  compile_s = time.perf_counter() - start
  timed(one_step, warmup - 1)
  wall, cpu = timed(one_step, steps)
  return {"compile_s": compile_s, "wall": wall, "cpu": cpu, "final_loss": holder["loss"]}


def bench_torch(cfg: C.MolmoConfig, batch: dict, steps: int, warmup: int, threads: int) -> dict:
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  llm = cfg.llm
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  hf = Qwen2Config(vocab_size=llm.embedding_size, hidden_size=llm.d_model,
                   intermediate_size=llm.mlp_dim, num_hidden_layers=llm.num_layers,
                   num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                   max_position_embeddings=llm.rope_max_length, rms_norm_eps=llm.norm_eps,
                   tie_word_embeddings=False, use_cache=False, attention_dropout=0.0)
  hf.rope_parameters = {"rope_type": "default", "rope_theta": llm.rope_theta}
  model = Qwen2ForCausalLM(hf).train()
  model.model.embed_tokens.weight.requires_grad_(False)    # frozen, as ours
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
  inputs = torch.from_numpy(batch["input_ids"]).long()
  targets = torch.from_numpy(batch["target_ids"]).long()
  holder = {}

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    holder["loss"] = float(loss.detach())

  timed(one_step, warmup)
  wall, cpu = timed(one_step, steps)
  return {"compile_s": 0.0, "wall": wall, "cpu": cpu, "final_loss": holder["loss"]}


def summarise(raw: dict, tokens: int, step_flops: float) -> dict:
  wall = statistics.median(raw["wall"])
  return {"compile_s": round(raw["compile_s"], 2), "median_step_s": round(wall, 4),
          "best_step_s": round(min(raw["wall"]), 4),
          "median_cpu_s": round(statistics.median(raw["cpu"]), 4),
          "tokens_per_s": round(tokens / wall, 1), "gflops_per_s": round(step_flops / wall / 1e9, 2),
          "final_loss": round(raw["final_loss"], 4)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0,
                      help="cores for both sides (JAX: the first N cores; torch: N threads); 0 = all")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "train_step.json"))
  args = parser.parse_args()
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")
  available = sorted(os.sched_getaffinity(0))
  if not 0 <= args.threads <= len(available):
    parser.error(f"--threads: expected 0..{len(available)} (the cores this process may use), "
                 f"got {args.threads}")
  threads = args.threads or len(available)
  # Before JAX creates its CPU client, which sizes its thread pool from the allowed cores.
  os.sched_setaffinity(0, available[:threads])

  cfg = model_config()
  batch = random_batch(cfg, args.batch, args.length)
  tokens = args.batch * args.length
  step_flops = 3 * flops.llm_forward_flops(cfg, args.batch, args.length)
  results = {"jax": summarise(bench_jax(cfg, batch, args.steps, args.warmup), tokens, step_flops)}
  raw = bench_torch(cfg, batch, args.steps, args.warmup, threads)
  best = f"torch-{threads}t"
  results[best] = summarise(raw, tokens, step_flops)
  ratio_wall = results[best]["median_step_s"] / results["jax"]["median_step_s"]
  ratio_cpu = results[best]["median_cpu_s"] / results["jax"]["median_cpu_s"]

  hugepages = "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "")
  print(f"train step, B={args.batch} T={args.length}, Qwen2 d={cfg.llm.d_model} L={cfg.llm.num_layers} "
        f"V={cfg.llm.embedding_size}, {step_flops / 1e9:.2f} GFLOP/step, {threads} of {os.cpu_count()} "
        f"cores, malloc huge pages {'on' if hugepages else 'off (set GLIBC_TUNABLES)'}")
  header = f"{'':9} {'compile s':>9} {'step s':>8} {'cpu s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'loss':>7}"
  print(header)
  for name, r in results.items():
    print(f"{name:9} {r['compile_s']:9.2f} {r['median_step_s']:8.4f} {r['median_cpu_s']:8.4f} "
          f"{r['tokens_per_s']:9.0f} {r['gflops_per_s']:8.2f} {r['final_loss']:7.3f}")
  print(f"JAX speed-up over PyTorch ({best}): {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU time "
        "(< 1: PyTorch is faster)")

  record = {"config": {"batch": args.batch, "length": args.length, "steps": args.steps,
                       "warmup": args.warmup, "llm": LLM, "step_gflops": step_flops / 1e9,
                       "threads": threads, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
            "results": results, "torch_reference": best, "speedup_wall": round(ratio_wall, 3),
            "speedup_cpu": round(ratio_cpu, 3),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "jax": jax.__version__}}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
