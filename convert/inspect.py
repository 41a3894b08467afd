"""List a checkpoint's parameters without loading them.

    python -m convert.inspect CKPT [--filter SUBSTRING] [--step N]

CKPT is a HF release directory (safetensors headers are read), an Orbax model directory
(`params/` + config.json), a training workdir (its latest checkpoint, or --step N) or an Orbax
PyTree directory itself (zarr metadata is read). Prints one
line per tensor (name, shape, dtype, size), per-component totals and the grand total.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from convert.orbax_to_hf import OrbaxParams
from convert.safetensors_io import INDEX_FILE, SafetensorsDir
from molmo_jax import errors
from molmo_jax.model_dir import absolute, is_training_workdir, locate_model

_HF_COMPONENTS = (("model.vision_backbone.image_vit.", "vision"), ("model.vision_backbone.", "connector"),
                  ("model.transformer.", "llm"))


def _hf_rows(directory: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
  reader = SafetensorsDir(directory)
  return [(t.name, t.shape, t.numpy_dtype.name, t.nbytes)
          for t in sorted(reader.tensors.values(), key=lambda t: t.name)]


def _orbax_rows(params_dir: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
  params = OrbaxParams(params_dir)
  rows = []
  for path in sorted(params.paths):
    shape, dtype = params.shape(path), params.dtype(path)
    rows.append((path, shape, dtype.name, math.prod(shape) * dtype.itemsize))
  return rows


def _component(name: str) -> str:
  for prefix, label in _HF_COMPONENTS:
    if name.startswith(prefix):
      return label
  return name.split("/")[0] if "/" in name else "other"


def describe(target: str | Path, step: int | None = None
             ) -> tuple[str, list[tuple[str, tuple[int, ...], str, int]]]:
  """(format description, rows of (name, shape, dtype, bytes))."""
  target = absolute(target)
  if is_training_workdir(target) or step is not None:
    source = locate_model(target, step)
    name = json.loads(source.config_path.read_text()).get("name", "?")
    return f"training workdir, step {source.step} ({name})", _orbax_rows(source.params_dir)
  if (target / "params" / "_METADATA").is_file():
    config = json.loads((target / "config.json").read_text()) if (target / "config.json").is_file() else {}
    return f"Orbax model directory ({config.get('name', 'no config.json')})", _orbax_rows(target / "params")
  if (target / "_METADATA").is_file():
    return "Orbax PyTree checkpoint", _orbax_rows(target)
  if (target / INDEX_FILE).is_file() or any(target.glob("*.safetensors")):
    config = target / "config.json"
    kind = json.loads(config.read_text()).get("model_type", "?") if config.is_file() else "no config.json"
    return f"safetensors directory (model_type {kind})", _hf_rows(target)
  raise FileNotFoundError(f"{target}: neither a safetensors directory nor an Orbax checkpoint")


def _human(nbytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if nbytes < 1024 or unit == "TiB":
      return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
    nbytes /= 1024
  return ""


def main(argv: list[str] | None = None) -> None:
  parser = errors.ArgumentParser(prog="python -m convert.inspect", description=__doc__)
  parser.add_argument("checkpoint", help="HF release directory, model directory, training workdir "
                      "or Orbax PyTree directory")
  parser.add_argument("--filter", default="", help="only tensors whose name contains this")
  parser.add_argument("--step", type=int, default=None,
                      help="training step when checkpoint is a training workdir (default: latest)")
  args = parser.parse_args(argv)
  kind, rows = describe(args.checkpoint, args.step)
  rows = [r for r in rows if args.filter in r[0]]
  width = max((len(r[0]) for r in rows), default=10)
  print(f"{args.checkpoint}: {kind}")
  totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
  dtypes: dict[str, int] = defaultdict(int)
  for name, shape, dtype, nbytes in rows:
    print(f"  {name:<{width}}  {str(list(shape)):<24} {dtype:<9} {_human(nbytes):>11}")
    group = totals[_component(name)]
    group[0] += 1
    group[1] += math.prod(shape)
    group[2] += nbytes
    dtypes[dtype] += math.prod(shape)
  for label, (count, params, nbytes) in sorted(totals.items()):
    print(f"{label:>10}: {count} tensors, {params:,} parameters, {_human(nbytes)}")
  count = sum(t[0] for t in totals.values())
  params = sum(t[1] for t in totals.values())
  nbytes = sum(t[2] for t in totals.values())
  mix = ", ".join(f"{d} {n / max(params, 1):.0%}" for d, n in sorted(dtypes.items()))
  print(f"     total: {count} tensors, {params:,} parameters, {_human(nbytes)} ({mix})")


def run() -> None:
  """Console entry point (`molmo-inspect`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
