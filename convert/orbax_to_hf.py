"""Our model directory -> the Molmo release format (for vLLM or the released remote code).

    python -m convert.orbax_to_hf MODEL_DIR OUT_DIR [--dtype auto|float32|bfloat16] [--max-shard-gb 5]
        [--overwrite | --force]

Legend: L stacked layers, D LLM width, V_emb pretrained vocabulary rows.

Writes the release's exact tensor names, shapes and fused layouts (att_proj = [Q | K | V],
ff_proj = [up | gate], megablocks experts), `model-0000k-of-0000N.safetensors` shards with
`model.safetensors.index.json`, config.json in the release schema (dense, or the flat MolmoE one
for MoE models), preprocessor_config.json, and the tokenizer / remote-code files kept in the
model directory's `tokenizer/`. Tensors are read from Orbax one layer (or one row block) at a
time through tensorstore and written as they are produced; the output appears only when complete.
OUT_DIR is never MODEL_DIR, a folder around it or inside it; `--overwrite` replaces only a
release directory (anything else needs `--force`); leftovers of killed exports are removed by the
next export to the same target (molmo_jax.output_dirs).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import tensorstore as ts

from convert import conversion_cli, release_config
from convert.conversion_cli import OUT_DTYPES
from convert.engine import COPY, Rule, fused_groups, row_splittable, to_hf, transpose
from convert.hf_to_orbax import DEFAULT_BLOCK_BYTES, model_leaf_shapes
from convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, TensorSpec, write_sharded
from convert.tables.molmo_release import rules_for
from molmo_jax import errors
from molmo_jax.model_dir import locate_model
from molmo_jax.output_dirs import check_output_target, is_release_directory, staged_directory
from molmo_jax.progress import progress

# Files of tokenizer/ that export regenerates from our config instead of copying.
_GENERATED = ("config.json", "preprocessor_config.json")


class OrbaxParams:
  """Leaves of an Orbax PyTree checkpoint, opened lazily with tensorstore (no tensor is loaded)."""

  def __init__(self, params_dir: str | Path):
    self.directory = Path(params_dir).absolute()
    meta_path = self.directory / "_METADATA"
    if not meta_path.is_file():
      raise FileNotFoundError(f"{self.directory}: no _METADATA (not an Orbax PyTree checkpoint)")
    meta = json.loads(meta_path.read_text())
    self._zarr = "zarr3" if meta.get("use_zarr3") else "zarr"
    self._ocdbt = (self.directory / "manifest.ocdbt").is_file()
    self._keys: dict[str, str] = {}
    for entry in meta["tree_metadata"].values():
      keys = [str(k["key"]) for k in entry["key_metadata"]]
      self._keys["/".join(keys)] = ".".join(keys)
    self._open: dict[str, ts.TensorStore] = {}

  @property
  def paths(self) -> list[str]:
    return list(self._keys)

  def store(self, path: str) -> ts.TensorStore:
    if path not in self._open:
      name = self._keys[path]
      kvstore = ({"driver": "ocdbt", "base": f"file://{self.directory}", "path": name} if self._ocdbt
                 else {"driver": "file", "path": f"{self.directory}/{name}"})
      self._open[path] = ts.open({"driver": self._zarr, "kvstore": kvstore}, open=True,
                                 read=True).result()
    return self._open[path]

  def shape(self, path: str) -> tuple[int, ...]:
    return tuple(self.store(path).shape)

  def dtype(self, path: str) -> np.dtype:
    return np.dtype(self.store(path).dtype.numpy_dtype)

  def read(self, path: str, index=()) -> np.ndarray:
    try:
      return self.store(path)[index].read().result()
    except ValueError as e:       # tensorstore: truncated or corrupt chunk
      raise errors.unreadable_data(str(self.directory.parent), e) from e


def check_stored_tree(params: OrbaxParams, shapes: dict[str, tuple[int, ...]], where: str) -> None:
  have = {p: params.shape(p) for p in params.paths}
  missing = sorted(set(shapes) - set(have))
  unexpected = sorted(set(have) - set(shapes))
  mismatched = [f"{p} {have[p]} (expected {shapes[p]})" for p in sorted(set(have) & set(shapes))
                if have[p] != shapes[p]]
  problems = [f"{label}: {items[:10]}" + (f" ({len(items)} in all)" if len(items) > 10 else "")
              for label, items in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatch", mismatched)) if items]
  if problems:
    raise ValueError(f"{where}: parameters do not match config.json; " + "; ".join(problems))


class _LeafReader:
  """Slices of our leaves, in the order the HF tensors are written.

  A leaf whose zarr chunks hold one layer (what hf_to_orbax writes) or a small row block is read
  slice by slice. A leaf chunked otherwise (a training checkpoint is chunked per device shard,
  each chunk spanning every layer) is read whole once and kept while the HF tensors of its group
  are written, so no chunk is decoded once per layer; memory is then the leaves of one fused HF
  tensor (e.g. mlp up + gate).
  """

  def __init__(self, params: OrbaxParams, block_bytes: int):
    self.params, self.block_bytes = params, block_bytes
    self._group: str | None = None
    self._whole: dict[str, np.ndarray] = {}

  def start_group(self, template: str) -> None:
    if template != self._group:
      self._group = template
      self._whole.clear()

  def _sliceable(self, path: str, stacked: bool) -> bool:
    store = self.params.store(path)
    chunk = tuple(store.chunk_layout.read_chunk.shape)
    if stacked:
      return chunk[0] == 1
    return math.prod(chunk) * self.params.dtype(path).itemsize <= 2 * self.block_bytes

  def read(self, path: str, index: tuple, stacked: bool) -> np.ndarray:
    if self._sliceable(path, stacked):
      return self.params.read(path, index)
    if path not in self._whole:
      self._whole[path] = self.params.read(path)
    return self._whole[path][index]


def _pieces(reader: _LeafReader, template: str, group: list[Rule], layer: int | None,
            dtype: np.dtype):
  """The bytes of one HF tensor, in order: each rule's rows of a fused tensor, or row blocks."""
  reader.start_group(template)
  for rule in group:
    stacked = rule.layers > 0
    shape = reader.params.shape(rule.ours)
    big = math.prod(rule.hf_shape) * dtype.itemsize > reader.block_bytes
    if not (big and row_splittable(rule, shape)):
      leaf = reader.read(rule.ours, (layer,) if stacked else (), stacked)
      yield to_hf(rule.hook, leaf, rule.slice_shape).astype(dtype, copy=False)
      continue
    rows = max(1, reader.block_bytes // (rule.hf_shape[1] * dtype.itemsize))
    for start in range(0, rule.hf_shape[0], rows):
      stop = min(rule.hf_shape[0], start + rows)
      if rule.hook == COPY:
        yield reader.read(rule.ours, (slice(start, stop),), False).astype(dtype, copy=False)
      else:
        block = reader.read(rule.ours, (slice(None), slice(start, stop)), False)
        yield transpose(block).astype(dtype, copy=False)


def _export_dtype(requested: str, params: OrbaxParams) -> np.dtype:
  """`auto` keeps uniformly stored float32/bfloat16 leaves; anything else becomes float32."""
  chosen = conversion_cli.requested_dtype(requested)
  if chosen is not None:
    return chosen
  stored = {params.dtype(p) for p in params.paths}
  if len(stored) == 1 and stored <= set(OUT_DTYPES.values()):
    return stored.pop()
  return OUT_DTYPES["float32"]


def convert_orbax_to_hf(model_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                        force: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
                        check_interrupt: Callable[[], None] | None = None,
                        step: int | None = None) -> Path:
  """Exports a model directory (params/, config.json, tokenizer/) or a training workdir (its
  latest checkpoint, or `step`) as a Molmo release directory.

  `overwrite` replaces an existing release directory, `force` anything (molmo_jax.output_dirs);
  the output may never be, contain or lie inside `model_dir`. `check_interrupt` is called between
  tensor pieces and may raise to stop cleanly (the staging folder is then removed).
  """
  location = locate_model(model_dir, step)
  out_dir = check_output_target(out_dir, sources=[location.path], overwrite=overwrite, force=force,
                                kind="release (HF) directory", is_kind=is_release_directory,
                                flag="OUT_DIR")
  cfg = location.read_config()
  params = OrbaxParams(location.params_dir)
  check_stored_tree(params, model_leaf_shapes(cfg), location.describe())
  out_dtype = _export_dtype(dtype, params)
  hf_config = release_config.release_config_json(cfg, torch_dtype=out_dtype.name)

  groups = fused_groups(rules_for(cfg))
  specs, source = [], {}
  for template, group in groups.items():
    layers = group[0].layers
    for layer in (range(layers) if layers else [None]):
      name = template.format(i=layer) if layers else template
      specs.append(TensorSpec(name, out_dtype, group[0].hf_shape))
      source[name] = (template, layer)

  reader = _LeafReader(params, block_bytes)

  bar = progress(sum(spec.nbytes for spec in specs), f"writing {out_dir.name}", unit="B")

  def pieces(spec: TensorSpec):
    template, layer = source[spec.name]
    for piece in _pieces(reader, template, groups[template], layer, out_dtype):
      if check_interrupt is not None:
        check_interrupt()
      bar.update(piece.nbytes)
      yield piece

  tokenizer = location.tokenizer_dir
  with staged_directory(out_dir) as staging:
    write_sharded(staging, specs, pieces, max_shard_bytes)
    bar.close()
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    existing = None
    if tokenizer is not None and (tokenizer / "preprocessor_config.json").is_file():
      existing = json.loads((tokenizer / "preprocessor_config.json").read_text())
    pre = release_config.preprocessor_config_json(cfg, existing)
    (staging / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if tokenizer is not None:
      for path in sorted(tokenizer.iterdir()):
        if path.is_file() and path.name not in _GENERATED:
          shutil.copy2(path, staging / path.name)
  return out_dir


def main(argv: list[str] | None = None) -> int:
  parser = conversion_cli.converter_parser(
      "python -m convert.orbax_to_hf", __doc__, source="model_dir",
      source_help="model directory (params/, config.json, tokenizer/) or a training workdir (its "
      "latest checkpoint unless --step)",
      out_help="release directory to create", written="tensors", out_kind="a release directory",
      options=[("--max-shard-gb", dict(type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                                       help="largest safetensors file, in GB")),
               ("--step", dict(type=int, default=None, help="training step when model_dir is a "
                               "training workdir (default: latest)"))])
  args = parser.parse_args(argv)
  if not args.max_shard_gb > 0:
    parser.error(f"--max-shard-gb: expected > 0, got {args.max_shard_gb}")
  return conversion_cli.run_conversion(
      lambda check_interrupt: convert_orbax_to_hf(
          args.model_dir, args.out_dir, dtype=args.dtype, step=args.step,
          max_shard_bytes=int(args.max_shard_gb * 1e9), overwrite=args.overwrite, force=args.force,
          check_interrupt=check_interrupt),
      lambda out: json.loads((out / INDEX_FILE).read_text())["metadata"]["total_size"], "written")


def run() -> None:
  """Console entry point (`molmo-orbax-to-hf`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
