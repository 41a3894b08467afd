"""Forward-pass time of the tiny model configs (the test models), compiled once each.

Run:  .venv/bin/python benchmarks/model_forward.py [--batch 2] [--length 64] [--crops 2]
          [--repeats 20] [--out PATH]     (default PATH: benchmarks/results/model_forward.json)

Legend: B batch, T text length, N crops per example.

For tiny qwen2 / olmo / olmoe (ragged and capacity MoE) this times `jax.jit(Molmo.apply)` on a
random batch with images: compile seconds, then the median and best of `--repeats` steady-state
calls, both as wall time and as process CPU time (all threads; robust to other jobs sharing the
machine). It measures the fixed per-call cost of the model code on this backend, not the speed of
a released model.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax import config as C
from molmo_jax.models.molmo import Molmo

VARIANTS = {
    "tiny-qwen2": lambda: C.tiny("qwen2"),
    "tiny-olmo": lambda: C.tiny("olmo"),
    "tiny-olmoe-ragged": lambda: C.tiny("olmoe", moe_impl="ragged"),
    "tiny-olmoe-capacity": lambda: C.tiny("olmoe", moe_impl="capacity"),
}


def random_batch(cfg: C.MolmoConfig, batch: int, length: int, crops: int) -> dict:
  """input_ids [B, T], images [B, N, P, C], image_masks [B, N, P], image_input_idx [B, N, Q]."""
  rng = np.random.default_rng(0)
  p, c, q = cfg.vision.num_patches, cfg.vision.patch_dim, cfg.preprocess.pooled_per_crop
  if crops * q + 1 > length:
    raise ValueError(f"--length {length} is too short for {crops} crops of {q} image tokens")
  idx = np.tile(np.arange(1, 1 + crops * q).reshape(1, crops, q), (batch, 1, 1))
  return {"input_ids": jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (batch, length)), jnp.int32),
          "images": jnp.asarray(rng.standard_normal((batch, crops, p, c)), jnp.float32),
          "image_masks": jnp.ones((batch, crops, p), jnp.float32),
          "image_input_idx": jnp.asarray(idx, jnp.int32)}


def time_forward(cfg: C.MolmoConfig, batch: dict, repeats: int) -> dict:
  model = Molmo(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  forward = jax.jit(lambda params, batch: model.apply({"params": params}, batch)[0])
  start = time.perf_counter()
  forward(params, batch).block_until_ready()
  compile_s = time.perf_counter() - start
  wall, cpu = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    forward(params, batch).block_until_ready()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  tokens = batch["input_ids"].size
  return {"compile_s": compile_s, "median_wall_ms": float(np.median(wall) * 1e3),
          "best_wall_ms": float(np.min(wall) * 1e3), "median_cpu_ms": float(np.median(cpu) * 1e3),
          "tokens_per_s": float(tokens / np.median(wall))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--crops", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "model_forward.json"))
  args = parser.parse_args()

  print(f"backend {jax.default_backend()}, B={args.batch} T={args.length} N={args.crops}, "
        f"{args.repeats} repeats")
  print(f"{'model':22s} {'compile s':>9s} {'median ms':>10s} {'best ms':>8s} {'cpu ms':>8s} "
        f"{'tokens/s':>10s}")
  results = []
  for name, make in VARIANTS.items():
    cfg = make()
    timing = time_forward(cfg, random_batch(cfg, args.batch, args.length, args.crops), args.repeats)
    results.append({"model": name, **timing})
    print(f"{name:22s} {timing['compile_s']:9.2f} {timing['median_wall_ms']:10.2f} "
          f"{timing['best_wall_ms']:8.2f} {timing['median_cpu_ms']:8.2f} {timing['tokens_per_s']:10.0f}")

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
               "batch": args.batch, "length": args.length, "crops": args.crops,
               "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
               "jax": jax.__version__, "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
