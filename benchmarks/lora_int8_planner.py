"""Molmo-72B on one TPU host: compile a LoRA fine-tuning step and int8 generation, ask XLA for
per-chip memory.

    python benchmarks/lora_int8_planner.py [--points lora-v5p,lora-v6e,int8-v5e] [--micro 32]
        [--base-dtype bfloat16|int8]

Points (each a real compile of what train.py / the Predictor would run; 5-60 minutes of CPU):
  lora-v5p   LoRA rank 64 (alpha 128) on every LLM dense layer (q k v o gate up down), the connector
             (+ new token rows) trained in full, frozen base in --base-dtype (bfloat16, or int8:
             the LLM's dense kernels and LM head as int8 values + scales, the rest bfloat16),
             global batch 256 x 2304 tokens in --micro micro-batches, remat full, mesh fsdp = 8:
             v5p:2x2x2; stored as "lora-v5p" (bfloat16) or "lora-v5p-int8"
  lora-v6e   the same on v6e:2x4 ("lora-v6e", "lora-v6e-int8")
  int8-v5e   weight-only int8 generation: batch 16, 4096-token prompts with 13 crops, prefill
             --prefill-rows rows per pass + one decode step, bf16 elsewhere, mesh tensor = 8,
             weights in the layouts the compiler picks (--param-layouts): v5e:2x4
"fits" means at most 90 % of HBM. Writes benchmarks/results/lora_int8_planner.json (points
already there are kept unless named again). Needs the `tpu` extra (libtpu).
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

RESULTS = ROOT / "benchmarks" / "results" / "lora_int8_planner.json"
HBM_LIMIT = 0.90


def lora_point(topology: str, micro: int, rank: int = 64, tensor: int = 1,
               base_dtype: str = "bfloat16") -> dict:
  from molmo_jax import experiment
  from molmo_jax.training import aot
  config = experiment.load_recipe(f"{ROOT / 'configs/finetune_multitask.py'}:model=molmo-72b")
  config.micro_batches = micro
  config.lora.rank = rank
  config.lora.alpha = float(2 * rank)
  config.lora.targets = ("llm",)
  config.lora.train = ("connector",)
  config.lora.base_dtype = base_dtype
  _, chips = aot.parse_topology(topology)
  report = aot.compile_train_step(config, topology, {"data": 1, "fsdp": chips // tensor,
                                                     "tensor": tensor, "expert": 1})
  return {"kind": "lora_train_step", "model": "molmo-72b", "rank": rank, "micro_batches": micro,
          "global_batch": 256, "seq_len": 2304, "base_dtype": base_dtype,
          **{k: v for k, v in report.to_json().items() if k != "param_sharding"}}


def int8_point(topology: str, prefill_rows: int, param_layouts: str) -> dict:
  from molmo_jax import config as C
  from molmo_jax.training import aot
  report = aot.compile_generation_step(C.preset("molmo-72b"), topology, batch_size=16,
                                       prompt_length=4096, quantize="int8", dtype="bfloat16",
                                       mesh_shape={"data": 1, "tensor": -1},
                                       prefill_rows_per_pass=prefill_rows,
                                       param_layouts=param_layouts)
  return {"kind": "int8_generation", "model": "molmo-72b", "batch": 16, "prompt_length": 4096,
          "crops": 13, "prefill_rows_per_pass": prefill_rows, "param_layouts": param_layouts,
          **{k: v for k, v in report.to_json().items() if k != "param_sharding"}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--points", default="int8-v5e,lora-v5p,lora-v6e")
  p.add_argument("--micro", type=int, default=32, help="micro-batches of the LoRA step")
  p.add_argument("--tensor", type=int, default=1,
                 help="LoRA points: tensor-parallel ways (the rest of the slice is fsdp)")
  p.add_argument("--base-dtype", choices=["bfloat16", "int8"], default="bfloat16",
                 help="LoRA points: the frozen base's dtype (int8: QLoRA-style int8 kernels)")
  p.add_argument("--prefill-rows", type=int, default=1, help="prefill rows per pass (int8 point)")
  p.add_argument("--param-layouts", choices=["default", "auto"], default="auto",
                 help="int8 point: weights in XLA's default layouts or in the compiler's choice "
                      "(placed once by the server; see compile_generation_step)")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  out = Path(args.out)
  results = json.loads(out.read_text()) if out.is_file() else {}
  for name in [n for n in args.points.split(",") if n]:
    key = name
    if name.startswith("lora"):
      key += f"-tensor{args.tensor}" if args.tensor != 1 else ""
      key += "-int8" if args.base_dtype == "int8" else ""
    if name == "lora-v5p":
      point = lora_point("v5p:2x2x2", args.micro, tensor=args.tensor, base_dtype=args.base_dtype)
    elif name == "lora-v6e":
      point = lora_point("v6e:2x4", args.micro, tensor=args.tensor, base_dtype=args.base_dtype)
    elif name == "int8-v5e":
      point = int8_point("v5e:2x4", args.prefill_rows, args.param_layouts)
    else:
      raise SystemExit(f"error: unknown point {name!r}")
    point["fits_90"] = bool(point["error"] is None and point["hbm_fraction"] <= HBM_LIMIT)
    results[key] = point
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    gib = point["total_bytes"] / 2 ** 30
    print(f"{key}: {point['topology']} mesh {point['mesh']} -> "
          + (f"DOES NOT FIT ({point['error']})" if point["error"] else
             f"{gib:.2f} GiB per chip ({100 * point['hbm_fraction']:.1f} % of HBM), "
             f"{'fits' if point['fits_90'] else 'over 90 %'}; compile {point['compile_seconds']:.0f} s"),
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
