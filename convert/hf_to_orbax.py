"""Released Molmo HF checkpoint -> our model directory (Orbax params + config.json + tokenizer/).

    python -m convert.hf_to_orbax HF_DIR OUT_DIR [--dtype auto|float32|bfloat16] [--name NAME]
        [--overwrite | --force]

Legend: L stacked layers, R rows of an HF tensor, D its row width.

Steps: config.json (+ preprocessor_config.json) -> MolmoConfig (`convert.release_config`);
every safetensors header is read and checked against the name/shape table of that config
(missing, unexpected, mis-shaped and non-float tensors are listed in one error) before anything
is written. Then each leaf of our tree is streamed into Orbax block by block: one layer of a
stacked leaf, or a row block of a large table, memory-mapped from its shard, transformed and
written as one chunk. Peak memory is a few blocks (about one layer of the widest stacked leaf),
not the model.

The model directory is assembled in a hidden sibling and renamed at the end, so a failed or
killed conversion leaves nothing that looks like a checkpoint; the next conversion to the same
target removes such leftovers. OUT_DIR is never HF_DIR, a folder around it or inside it;
`--overwrite` replaces only a model directory (anything else needs `--force`), and only once the
new one is complete (molmo_jax.output_dirs). Ctrl-C stops at the next block and removes the
staging folder. Its layout is the one
`molmo_jax.model_dir.load_model_checkpoint` reads: `params/` is a standard Orbax PyTree
checkpoint (OCDBT, zarr) whose leaves are recorded as numpy arrays, with one zarr chunk per block.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
# The streaming handler builds its write spec exactly as orbax's NumpyHandler does (pinned to
# orbax-checkpoint 0.12.x by pyproject), so the result restores with the standard handlers.
from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils

from convert import conversion_cli, release_config
from convert.conversion_cli import OUT_DTYPES
from convert.engine import (COPY, Rule, check_rules_match, hf_tensor_shapes, read_block,
                            row_splittable, set_leaf, to_ours, transpose)
from convert.safetensors_io import INDEX_FILE, SafetensorsDir
from convert.tables.molmo_release import rules_for
from molmo_jax import errors
from molmo_jax.config import MolmoConfig
from molmo_jax.errors import UserError
from molmo_jax.output_dirs import check_output_target, is_model_directory, staged_directory
from molmo_jax.progress import progress

DEFAULT_BLOCK_BYTES = 64 * 2**20     # row blocks of large tables; also the in-flight write budget
FLOAT_CODES = ("F32", "BF16", "F16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
Index = tuple[slice, ...]


# ------------------------------------------------------------------------------------------
# Streaming Orbax writer
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """A leaf produced block by block. `blocks()` yields (index, array) pairs that tile `shape`;
  each block is written as one zarr chunk of `block_shape`."""

  shape: tuple[int, ...]
  dtype: np.dtype
  block_shape: tuple[int, ...]
  blocks: Callable[[], Iterator[tuple[Index, np.ndarray]]]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes StreamedArrays block by block; recorded as np.ndarray so any reader restores it.

  Blocks are produced one at a time and written asynchronously: the newest block plus at most
  `inflight_bytes` of older ones wait for their write to commit (tensorstore references, not
  copies, a block until then). Memory stays at a few blocks, writing overlaps preparing the next
  block, and small leaves do not pay one commit latency each.
  """

  def __init__(self, inflight_bytes: int):
    super().__init__(deepcopy_host_arrays=False)
    self._inflight_bytes = inflight_bytes

  def typestr(self) -> str:
    return "np.ndarray"

  async def _background_serialize(self, values, infos, args=None):
    pending: collections.deque = collections.deque()
    try:
      await self._write_all(values, infos, args or [ocp.type_handlers.SaveArgs()] * len(values),
                            pending)
    except BaseException:
      # Let started writes finish before the caller deletes the directory they write into.
      await asyncio.gather(*(done.commit for done, _ in pending), return_exceptions=True)
      raise

  async def _write_all(self, values, infos, args, pending: collections.deque):
    inflight = 0
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = tensorstore_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.block_shape,
          dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
      ).json
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      written = 0
      for index, block in value.blocks():
        if block.dtype != value.dtype:
          raise ValueError(f"{info.name}: block of dtype {block.dtype}, expected {value.dtype}")
        write = store[index].write(block, can_reference_source_data_indefinitely=True)
        pending.append((write, block.nbytes))
        inflight += block.nbytes
        written += block.size
        del block
        # The newest block stays in flight while the next is prepared; older ones beyond the
        # budget must have committed.
        while len(pending) > 1 and inflight - pending[-1][1] > self._inflight_bytes:
          await pending[0][0].commit
          inflight -= pending.popleft()[1]
      if written != value.size:
        raise ValueError(f"{info.name}: blocks covered {written} of {value.size} elements")
    while pending:
      await pending[0][0].commit
      pending.popleft()


def save_streamed_pytree(directory: str | Path, tree, inflight_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
  """Saves a nested dict of StreamedArrays as an Orbax PyTree checkpoint at `directory`."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (StreamedArray, _StreamedArrayHandler(inflight_bytes)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  # Compression buys little on trained weights and costs most of the conversion time.
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(epath.Path(directory), args=ocp.args.PyTreeSave(tree))


# ------------------------------------------------------------------------------------------
# Tensors: validation and block plans
# ------------------------------------------------------------------------------------------

def _listing(label: str, items: list[str], limit: int = 10) -> str:
  shown = ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
  return f"{label}: {shown}"


def check_release_tensors(reader: SafetensorsDir, rules: list[Rule], where: str) -> None:
  """One error listing every missing, unexpected, mis-shaped or non-float tensor."""
  want = hf_tensor_shapes(rules)
  have = reader.tensors
  problems = []
  missing = [n for n in want if n not in have]
  unexpected = sorted(n for n in have if n not in want)
  mismatched = [f"{n} {have[n].shape} (expected {want[n]})" for n in want
                if n in have and have[n].shape != want[n]]
  wrong_dtype = [f"{n} {have[n].dtype}" for n in want if n in have and have[n].dtype not in FLOAT_CODES]
  for label, items in (("missing", missing), ("unexpected", unexpected),
                       ("shape mismatch", mismatched), ("not a float tensor", wrong_dtype)):
    if items:
      problems.append(_listing(label, items))
  if problems:
    raise ValueError(f"{where}: tensors do not match the release layout of its config.json; "
                     + "; ".join(problems))


def model_leaf_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of every leaf of Molmo(cfg)'s parameter tree (abstract: nothing is allocated)."""
  from flax import linen as nn
  from molmo_jax.models.molmo import Molmo
  v, p = cfg.vision, cfg.preprocess
  batch = {"input_ids": jax.ShapeDtypeStruct((1, 4), np.int32),
           "images": jax.ShapeDtypeStruct((1, 1, v.num_patches, v.patch_dim), np.float32),
           "image_masks": jax.ShapeDtypeStruct((1, 1, v.num_patches), np.float32),
           "image_input_idx": jax.ShapeDtypeStruct((1, 1, p.pooled_per_crop), np.int32)}
  variables = jax.eval_shape(Molmo(cfg).init, jax.random.PRNGKey(0), batch)
  params = nn.unbox(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _stacked_blocks(reader: SafetensorsDir, rule: Rule, layer_shape, dtype):
  def blocks():
    for i, name in enumerate(rule.hf_names()):
      yield (slice(i, i + 1),), to_ours(rule.hook, read_block(reader, rule, name), layer_shape
                                        ).astype(dtype, copy=False)[None]
  return blocks


def _row_blocks(reader: SafetensorsDir, rule: Rule, rows_per_block: int, dtype):
  """A large 2-D table in blocks of HF rows (our rows for COPY, our columns for LINEAR)."""
  total = rule.hf_shape[0]

  def blocks():
    for start in range(0, total, rows_per_block):
      stop = min(total, start + rows_per_block)
      x = reader.read(rule.hf, (start, stop))
      if rule.hook == COPY:
        index, block = (slice(start, stop), slice(None)), x.astype(dtype, copy=False)
      else:
        index, block = (slice(None), slice(start, stop)), transpose(x).astype(dtype, copy=False)
      del x                     # unmap the source rows unless the block is a view of them
      yield index, block
  return blocks


def streamed_leaf(reader: SafetensorsDir, rule: Rule, shape: tuple[int, ...], dtype: np.dtype,
                  block_bytes: int) -> StreamedArray:
  if rule.layers:
    layer_shape = shape[1:]
    return StreamedArray(shape, dtype, (1,) + layer_shape,
                         _stacked_blocks(reader, rule, layer_shape, dtype))
  row_bytes = math.prod(rule.hf_shape[1:]) * dtype.itemsize
  if row_splittable(rule, shape) and row_bytes * rule.hf_shape[0] > block_bytes:
    # Equal blocks: a short last zarr chunk would still be stored at full size.
    blocks = -(-rule.hf_shape[0] // max(1, block_bytes // row_bytes))
    rows = -(-rule.hf_shape[0] // blocks)
    block_shape = (rows, shape[1]) if rule.hook == COPY else (shape[0], rows)
    return StreamedArray(shape, dtype, block_shape, _row_blocks(reader, rule, rows, dtype))

  def whole():
    yield tuple(slice(None) for _ in shape), to_ours(rule.hook, read_block(reader, rule, rule.hf),
                                                     shape).astype(dtype, copy=False)
  return StreamedArray(shape, dtype, shape, whole)


def resolve_dtype(requested: str, reader: SafetensorsDir) -> np.dtype:
  """`auto` keeps a uniform float32/bfloat16 source; anything else becomes float32."""
  chosen = conversion_cli.requested_dtype(requested)
  if chosen is not None:
    return chosen
  codes = {t.dtype for t in reader.tensors.values()}
  return OUT_DTYPES["bfloat16"] if codes == {"BF16"} else OUT_DTYPES["float32"]


def side_files(hf_dir: Path) -> list[Path]:
  """Tokenizer, processor and remote-code files: everything but weights and config.json."""
  return [p for p in sorted(hf_dir.iterdir())
          if p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", INDEX_FILE)
          and p.suffix not in _WEIGHT_SUFFIXES]


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

def _counted_blocks(blocks: Callable[[], Iterator], bar):
  """`blocks` that advance the byte progress `bar` as each block is produced (at most a few
  blocks ahead of the writes, see _StreamedArrayHandler)."""
  def counted():
    for index, block in blocks():
      bar.update(block.nbytes)
      yield index, block
  return counted


def _checked_blocks(blocks: Callable[[], Iterator], check: Callable[[], None]):
  def checked():
    for item in blocks():
      check()
      yield item
  return checked


def convert_hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
                        name: str | None = None, overwrite: bool = False, force: bool = False,
                        block_bytes: int = DEFAULT_BLOCK_BYTES,
                        check_interrupt: Callable[[], None] | None = None) -> Path:
  """Converts a released (or exported) Molmo HF directory into a model directory at `out_dir`.

  `overwrite` replaces an existing model directory, `force` anything (molmo_jax.output_dirs);
  the output may never be, contain or lie inside `hf_dir`. `check_interrupt` is called between
  blocks and may raise to stop the conversion cleanly (the staging folder is then removed).
  """
  hf_dir = Path(hf_dir)
  if not hf_dir.is_dir():
    raise UserError(f"HF_DIR {hf_dir}", "is not a directory",
                    "give a released Molmo folder with config.json and *.safetensors")
  out_dir = check_output_target(out_dir, sources=[hf_dir], overwrite=overwrite, force=force,
                                kind="model directory", is_kind=is_model_directory, flag="OUT_DIR")
  cfg = release_config.config_from_release_dir(hf_dir, name=name)
  reader = SafetensorsDir(hf_dir)
  rules = rules_for(cfg)
  check_release_tensors(reader, rules, str(hf_dir))
  shapes = model_leaf_shapes(cfg)
  check_rules_match(rules, shapes)
  out_dtype = resolve_dtype(dtype, reader)
  cfg = cfg.replace(param_dtype=out_dtype.name)
  leaves = [(rule.ours, streamed_leaf(reader, rule, shapes[rule.ours], out_dtype, block_bytes))
            for rule in rules]
  bar = progress(sum(leaf.nbytes for _, leaf in leaves), f"writing {out_dir.name}", unit="B")
  tree: dict = {}
  for path, leaf in leaves:
    blocks = _counted_blocks(leaf.blocks, bar)
    if check_interrupt is not None:
      blocks = _checked_blocks(blocks, check_interrupt)
    set_leaf(tree, path, dataclasses.replace(leaf, blocks=blocks))

  with staged_directory(out_dir) as staging:
    save_streamed_pytree(staging / "params", tree, inflight_bytes=block_bytes)
    bar.close()
    (staging / "config.json").write_text(MolmoConfig.from_json(cfg.to_json()).to_json())
    extras = side_files(hf_dir)
    if extras:
      (staging / "tokenizer").mkdir()
      for path in extras:
        shutil.copy2(path, staging / "tokenizer" / path.name)
  return out_dir


def main(argv: list[str] | None = None) -> int:
  parser = conversion_cli.converter_parser(
      "python -m convert.hf_to_orbax", __doc__, source="hf_dir",
      source_help="released Molmo directory: config.json, *.safetensors, tokenizer",
      out_help="model directory to create", written="parameters", out_kind="a model directory",
      options=[("--name", dict(default=None, help="MolmoConfig.name (default: preset or dir name)"))])
  args = parser.parse_args(argv)
  return conversion_cli.run_conversion(
      lambda check_interrupt: convert_hf_to_orbax(
          args.hf_dir, args.out_dir, dtype=args.dtype, name=args.name, overwrite=args.overwrite,
          force=args.force, check_interrupt=check_interrupt),
      lambda out: SafetensorsDir(args.hf_dir).total_bytes, "read")


def run() -> None:
  """Console entry point (`molmo-hf-to-orbax`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
