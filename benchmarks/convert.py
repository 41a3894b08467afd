"""Conversion throughput and peak memory on a synthetic Molmo-7B-D-shaped release checkpoint.

    python benchmarks/convert.py [--llm-layers 2] [--dtype bfloat16] [--workdir /tmp]

Generates a release directory in a temporary folder (full 23-block ViT, connector, full 152k x
3584 embedding and LM head, `--llm-layers` decoder layers of 7B-D width; random values), then runs
HF -> Orbax and Orbax -> HF, each in a fresh subprocess that reports its wall time and peak
resident set (getrusage; mapped file pages count). Prints a table and writes
benchmarks/results/convert.json. Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert import release_config  # noqa: E402
from convert.engine import hf_tensor_shapes  # noqa: E402
from convert.safetensors_io import TensorSpec, write_sharded  # noqa: E402
from convert.tables.molmo_release import rules_for  # noqa: E402
from molmo_jax import config as C  # noqa: E402

_CHILD = """
import json, resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "import":
  from convert.hf_to_orbax import convert_hf_to_orbax as run
else:
  from convert.orbax_to_hf import convert_orbax_to_hf as run
imported = time.perf_counter()
if sys.argv[1] != "baseline":
  run(sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - imported, "import_seconds": imported - t,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def synthetic_release(directory: Path, cfg: C.MolmoConfig, dtype: np.dtype) -> int:
  """Writes random tensors of the release layout; returns their total bytes."""
  rng = np.random.default_rng(0)
  pool = rng.standard_normal(2**25, dtype=np.float32).astype(dtype)     # values are irrelevant
  specs = [TensorSpec(name, dtype, shape) for name, shape in hf_tensor_shapes(rules_for(cfg)).items()]
  offset = [0]

  def pieces(spec: TensorSpec):
    remaining = math.prod(spec.shape)
    while remaining:
      start = offset[0] % pool.size
      n = min(remaining, pool.size - start)
      offset[0] += n + 7                         # shift so tensors differ
      remaining -= n
      yield pool[start:start + n]

  index = write_sharded(directory, specs, pieces)
  torch_dtype = "bfloat16" if dtype.itemsize == 2 else "float32"
  hf = release_config.release_config_json(cfg, torch_dtype=torch_dtype)
  (directory / "config.json").write_text(json.dumps(hf, indent=2))
  pre = release_config.preprocessor_config_json(cfg)
  (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
  return index["metadata"]["total_size"]


def run_child(mode: str, *paths: Path) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", _CHILD, mode, *map(str, paths)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(directory: Path) -> int:
  return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--llm-layers", type=int, default=2)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
  args = parser.parse_args()
  import ml_dtypes
  dtype = np.dtype(ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32)
  base = C.preset("molmo-7b-d")
  cfg = base.replace(name="synthetic-7b-d", llm=dataclasses.replace(base.llm, num_layers=args.llm_layers))

  work = Path(tempfile.mkdtemp(prefix="molmo-convert-bench-", dir=args.workdir))
  try:
    (work / "hf").mkdir()
    start = time.perf_counter()
    total = synthetic_release(work / "hf", cfg, dtype)
    generate_s = time.perf_counter() - start
    baseline = run_child("baseline")
    to_orbax = run_child("import", work / "hf", work / "orbax")
    orbax_bytes = dir_bytes(work / "orbax")
    shutil.rmtree(work / "hf")                      # keep the disk footprint at two copies
    to_hf = run_child("export", work / "orbax", work / "exported")
  finally:
    shutil.rmtree(work, ignore_errors=True)

  largest_stacked = max(math.prod(s) * dtype.itemsize for s in _stacked_leaf_shapes(cfg))
  result = {
      "checkpoint": {"config": cfg.name, "llm_layers": args.llm_layers, "vit_layers": cfg.vision.num_layers,
                     "dtype": args.dtype, "safetensors_bytes": total, "orbax_bytes": orbax_bytes,
                     "largest_stacked_leaf_bytes": largest_stacked, "generate_seconds": generate_s},
      "baseline_peak_rss_bytes": baseline["peak_rss_bytes"],
      "hf_to_orbax": _summary(to_orbax, total), "orbax_to_hf": _summary(to_hf, total),
      "rss_budget_bytes": 2 * largest_stacked + 2**30,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"synthetic {cfg.name}: {total / 2**30:.2f} GiB of {args.dtype} safetensors "
        f"({args.llm_layers} LLM layers, full ViT), generated in {generate_s:.0f} s")
  print(f"{'direction':<12} {'seconds':>8} {'MiB/s':>8} {'peak RSS':>10}")
  for name in ("hf_to_orbax", "orbax_to_hf"):
    r = result[name]
    print(f"{name:<12} {r['seconds']:>8.1f} {r['mib_per_second']:>8.0f} "
          f"{r['peak_rss_bytes'] / 2**30:>8.2f} GiB")
  print(f"interpreter + imports alone: {baseline['peak_rss_bytes'] / 2**30:.2f} GiB; budget "
        f"2 x largest stacked leaf + 1 GiB = {result['rss_budget_bytes'] / 2**30:.2f} GiB")
  print(f"wrote {args.out}")


def _summary(child: dict, total: int) -> dict:
  return {"seconds": child["seconds"], "mib_per_second": total / 2**20 / child["seconds"],
          "peak_rss_bytes": child["peak_rss_bytes"]}


def _stacked_leaf_shapes(cfg):
  for rule in rules_for(cfg):
    if rule.layers:
      shape = rule.slice_shape
      yield (rule.layers,) + shape


if __name__ == "__main__":
  main()
