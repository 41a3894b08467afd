"""Which TPU slice does each released model need? Compile the real train step and ask XLA.

    python benchmarks/scaling.py [--models molmo-72b,molmoe-1b] [--stages finetune,pretrain]
                                 [--generations v5p,v6e] [--out benchmarks/results/scaling.json]

For every (model, stage, TPU generation) the script walks the candidate slices from small to large
and stops at the first whose compiled per-chip memory (`memory_analysis`) fits in 90 % of HBM.
It prints a table and writes JSON; docs/scaling.md quotes it. Each compile takes 0.5-5 minutes on
a 2-core CPU; results already in the JSON file are reused (delete it to recompute).
Needs the `tpu` extra (libtpu); JAX stays on the CPU.
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

STAGES = {"pretrain": "configs/pretrain_captioner.py", "finetune": "configs/finetune_multitask.py"}
# Candidate slices, smallest first, and the mesh used on each (fsdp over all chips unless the
# model is MoE, where the expert axis takes a share).
SLICES = {
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8", "v5p:8x8x4",
            "v5p:8x8x8"],
    "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"],
}
HBM_LIMIT = 0.90


def mesh_for(model: str, chips: int) -> dict[str, int]:
  """FSDP over the whole slice; MolmoE puts 4 of it on the expert axis (expert parallel MoE,
  and FSDP over fsdp x expert for every weight without an expert dimension)."""
  if model == "molmoe-1b" and chips >= 4:
    return {"data": 1, "fsdp": chips // 4, "tensor": 1, "expert": 4}
  return {"data": 1, "fsdp": chips, "tensor": 1, "expert": 1}


def compile_one(model: str, stage: str, topology: str, micro_batches: int = 1,
                remat: str | None = None) -> dict:
  from molmo_jax import experiment
  from molmo_jax.training import aot
  config = experiment.load_recipe(f"{ROOT / STAGES[stage]}:model={model}")
  config.micro_batches = micro_batches
  if remat:
    config.model.remat_policy = remat
  _, chips = aot.parse_topology(topology)
  mesh = mesh_for(model, chips)
  report = aot.compile_train_step(config, topology, mesh)
  out = report.to_json()
  out.pop("param_sharding")
  out.update(model=model, stage=stage, remat_policy=str(config.model.remat_policy),
             global_batch=int(config.data.global_batch_size), seq_len=int(config.data.seq_len),
             micro_batches=micro_batches, loss_chunk_size=int(config.get("loss_chunk_size", 0)),
             fits_90=bool(report.error is None and report.hbm_fraction <= HBM_LIMIT))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="molmoe-1b,molmo-7b-o,molmo-7b-d,molmo-72b")
  p.add_argument("--stages", default="finetune,pretrain")
  p.add_argument("--generations", default="v5p,v6e")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
  p.add_argument("--plan", default="", help="explicit entries model@stage@topology[@micro_batches"
                 "[@remat_policy]], comma-separated, instead of the search (e.g. "
                 "molmo-72b@finetune@v5p:8x8x4 or molmo-7b-d@finetune@v5p:2x2x2@2@minimal: a "
                 "remat sweep is one entry per policy)")
  p.add_argument("--table", action="store_true", help="only print the tables (every point, smallest slices) of the JSON file")
  args = p.parse_args()
  out = Path(args.out)
  results = json.loads(out.read_text()) if out.exists() else []
  done = {_key(r): r for r in results}
  if args.table:
    print(table(results))
    print()
    print(smallest(results))
    print()
    print(efficiency(results))
    return

  def ensure(key: tuple[str, str, str, int, str]) -> dict:
    """The result for `key`, compiled now (and the JSON rewritten) unless already there (with
    the recipe's current loss_chunk_size: points compiled with whole logits do not count)."""
    key = key + (recipe_chunk(key[1]),)
    if key not in done:
      print(f"compiling {key} ...", flush=True)
      done[key] = compile_one(*key[:4], remat=key[4])
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(list(done.values()), indent=2))
    return done[key]

  if args.plan:
    for entry in args.plan.split(","):
      model, stage, topology, *rest = entry.split("@")
      micro = int(rest[0]) if rest else 1
      ensure((model, stage, topology, micro, rest[1] if len(rest) > 1 else "full"))
  else:
    for model in args.models.split(","):
      for stage in args.stages.split(","):
        for gen in args.generations.split(","):
          for topology in SLICES[gen]:
            if ensure((model, stage, topology, 1, "full"))["fits_90"]:
              break
  print(table(list(done.values())))


def _key(r: dict) -> tuple[str, str, str, int, str, int]:
  return (r["model"], r["stage"], r["topology"], r.get("micro_batches", 1), r.get("remat_policy", "full"),
          r.get("loss_chunk_size", 0))


def recipe_chunk(stage: str) -> int:
  """The loss_chunk_size a stage's recipe compiles with (0: whole logits)."""
  from molmo_jax import experiment
  return int(experiment.load_recipe(str(ROOT / STAGES[stage])).get("loss_chunk_size", 0))


def table(results: list[dict]) -> str:
  gib = 1024 ** 3
  rows = ["| model | stage | slice | chips | mesh | remat | CE chunk | batch x seq | micro-batches | per-chip HBM | of HBM | fits (<= 90 %) | compile s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(results, key=lambda r: (r["model"], r["stage"], r["topology"].split(":")[0],
                                          r["chips"], r.get("micro_batches", 1))):
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
    mem = f"{r['total_bytes'] / gib:.1f} GiB" if not r["error"] else "OOM at compile"
    frac = f"{100 * r['hbm_fraction']:.1f} %" if not r["error"] else "-"
    rows.append(f"| {r['model']} | {r['stage']} | {r['topology']} | {r['chips']} | {mesh} | {r['remat_policy']} | "
                f"{r.get('loss_chunk_size', 0) or '-'} | "
                f"{r['global_batch']} x {r['seq_len']} | {r.get('micro_batches', 1)} | {mem} | {frac} | "
                f"{'yes' if r['fits_90'] else 'no'} | "
                f"{r['compile_seconds']:.0f} |")
  return "\n".join(rows)


def efficiency(results: list[dict]) -> str:
  """Compiled total against the analytic floor, and collective bytes per step against the FSDP
  minimum, for the points compiled with the planner's efficiency report."""
  gib = lambda b: f"{b / 1024 ** 3:.1f}" if b is not None else "-"
  rows = ["| model | stage | slice | mesh | micro | remat | compiled total GiB | floor GiB (state + kept activations) | "
          "all-gather GiB (FSDP min) | reduce-scatter GiB (FSDP min) | all-reduce GiB | all-to-all GiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(results, key=lambda r: (r["model"], r["stage"], r["chips"], r["topology"])):
    floor, coll, minimum = r.get("floor_bytes"), r.get("collective_bytes"), r.get("fsdp_min_collective_bytes")
    if not floor:
      continue
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
    total = gib(r["total_bytes"]) if not r["error"] else "OOM"
    kept = floor.get("activations")
    floor_text = f"{gib(floor.get('total'))} ({gib(floor['state'])} + {gib(kept)})"
    coll = coll or {}
    rows.append(f"| {r['model']} | {r['stage']} | {r['topology']} | {mesh} | {r.get('micro_batches', 1)} | "
                f"{r.get('remat_policy', 'full')} | {total} | {floor_text} | "
                f"{gib(coll.get('all-gather'))} ({gib(minimum.get('all-gather'))}) | "
                f"{gib(coll.get('reduce-scatter'))} ({gib(minimum.get('reduce-scatter'))}) | "
                f"{gib(coll.get('all-reduce'))} | {gib(coll.get('all-to-all'))} |")
  return "\n".join(rows)


def smallest(results: list[dict]) -> str:
  """Per (model, stage, TPU generation): the fewest chips that fit, without and with accumulation."""
  rows = ["| model | stage | TPU | smallest slice, 1 micro-batch | per-chip HBM | smallest slice, any micro-batches | per-chip HBM |",
          "|---|---|---|---|---|---|---|"]
  groups: dict[tuple[str, str, str], list[dict]] = {}
  for r in results:
    groups.setdefault((r["model"], r["stage"], r["topology"].split(":")[0]), []).append(r)
  gib = 1024 ** 3

  def best(entries: list[dict]) -> str:
    fitting = sorted((r for r in entries if r["fits_90"]),
                     key=lambda r: (r["chips"], r.get("micro_batches", 1)))
    if not entries:
      return "not compiled | -"
    if not fitting:
      return "none of those compiled fits | -"
    r = fitting[0]
    smaller = [x for x in entries if x["chips"] < r["chips"]]
    note = f" (smaller: {', '.join(str(c) for c in sorted({x['chips'] for x in smaller}))} chips do not fit)" if smaller else ""
    return (f"{r['topology']} ({r['chips']} chips, micro {r.get('micro_batches', 1)}){note} | "
            f"{r['total_bytes'] / gib:.1f} GiB ({100 * r['hbm_fraction']:.0f} %)")

  for (model, stage, gen), entries in sorted(groups.items()):
    plain = [r for r in entries if r.get("micro_batches", 1) == 1]
    rows.append(f"| {model} | {stage} | {gen} | {best(plain)} | {best(entries)} |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
