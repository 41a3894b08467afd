"""Per-chip memory of a medium model's compiled train step for v5p:2x2x1, one variant at a time.

    python benchmarks/step_memory.py [--micro-batches 4] [--offload-optimizer-state]

A qwen2-style LLM (4 layers, d_model 1024, MLP 4096, vocabulary 32768; the tiny ViT), 134 M
parameters, fsdp=4, batch 16 x 256, bf16 compute, remat full, compiled for TPU v5p (libtpu,
compile only; JAX stays on the CPU). Prints one JSON line: arguments, outputs, aliased,
temporaries, total (HBM) and pinned-host bytes per chip, in MiB (docs/scaling.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--micro-batches", type=int, default=4)
  p.add_argument("--offload-optimizer-state", action="store_true")
  args = p.parse_args()
  from molmo_jax import experiment
  from molmo_jax.training import aot
  c = experiment.load_recipe(f"{ROOT / 'configs' / 'tiny_test.py'}:qwen2")
  c.model.llm.update(d_model=1024, mlp_dim=4096, num_layers=4, num_heads=8, num_kv_heads=8,
                     head_dim=128, vocab_size=32768, embedding_size=32768)
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.data.global_batch_size = 16
  c.data.seq_len = 256
  c.micro_batches = args.micro_batches
  c.offload_optimizer_state = args.offload_optimizer_state
  r = aot.compile_train_step(c, "v5p:2x2x1", {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1})
  mib = lambda b: round(b / 2 ** 20, 2)
  print(json.dumps(dict(micro_batches=args.micro_batches, offload=args.offload_optimizer_state,
                        params=r.param_count, argument_MiB=mib(r.argument_bytes),
                        output_MiB=mib(r.output_bytes), alias_MiB=mib(r.alias_bytes),
                        temp_MiB=mib(r.temp_bytes), total_MiB=mib(r.total_bytes),
                        host_MiB=mib(r.host_bytes), compile_s=round(r.compile_seconds, 1),
                        error=r.error)))


if __name__ == "__main__":
  main()
