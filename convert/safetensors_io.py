"""Safetensors without torch: memory-mapped reading (bfloat16 included) and streamed, sharded writing.

A safetensors file is `u64 little-endian N | N bytes of JSON header | data`. The header maps each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the start of
the data) plus an optional "__metadata__" dict of strings. A sharded checkpoint adds
`model.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {name: file}}.

Legend: R rows (first axis) of a tensor, D = product of its other axes; a row block is [r, D].

Reading maps only the byte range of one tensor (or of a block of its rows) and the caller drops
the map when done, so the resident set stays at one block however large the checkpoint is.
Writing streams each tensor as a sequence of row-block pieces; the header is computed from the
declared shapes first, so no tensor is ever held whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_MAX_HEADER_BYTES = 100 * 2**20     # the reference implementation refuses larger headers too

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype) -> str:
  """numpy dtype -> safetensors dtype string ("F32", "BF16", ...)."""
  try:
    return _NAMES[np.dtype(dtype)]
  except KeyError:
    raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors code; known: "
                     f"{sorted(str(d) for d in _NAMES)}") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes live. `offset` is absolute in `file`."""

  name: str
  dtype: str
  shape: tuple[int, ...]
  file: Path
  offset: int
  nbytes: int

  @property
  def numpy_dtype(self) -> np.dtype:
    return DTYPES[self.dtype]

  @property
  def size(self) -> int:
    return math.prod(self.shape)


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates one file's header: (tensors by name, "__metadata__").

  Raises ValueError naming the file when the header is malformed or the file is shorter than
  the data it declares (a truncated download).
  """
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path}: {size} bytes; too short to be a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
      raise ValueError(f"{path}: header declares {header_len} bytes but the file has {size} "
                       "(truncated or not a safetensors file)")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + header_len
  tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
  needed = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
  if needed > size:
    short = sorted(t.name for t in tensors.values() if t.offset + t.nbytes > size)
    raise ValueError(f"{path}: truncated: data needs {needed} bytes, the file has {size}; "
                     f"{len(short)} tensor(s) cut off, e.g. {short[:3]}")
  return tensors, metadata


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
  where = f"{path}: tensor {name!r}"
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
    raise ValueError(f"{where}: expected {{dtype, shape, data_offsets}}, got {entry!r}")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in DTYPES:
    raise ValueError(f"{where}: unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
  if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
    raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
    raise ValueError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
  nbytes = math.prod(shape) * DTYPES[dtype].itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise ValueError(f"{where}: {dtype}{shape} needs {nbytes} bytes but data_offsets span "
                     f"{offsets[1] - offsets[0]}")
  return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)


class SafetensorsDir:
  """The tensors of a checkpoint directory: `model.safetensors`, or shards listed in the index.

  Only headers are read at construction; `read` maps a tensor's bytes on demand.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    if not self.directory.is_dir():
      raise FileNotFoundError(f"{self.directory}: not a directory")
    self.tensors: dict[str, TensorInfo] = {}
    self.metadata: dict[str, str] = {}
    index = self.directory / INDEX_FILE
    if index.is_file():
      self._read_indexed(index)
    else:
      files = sorted(self.directory.glob("*.safetensors"))
      if not files:
        others = sorted(p.name for p in self.directory.iterdir()
                        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f"; found {others} (PyTorch pickles are not read: convert them to safetensors)" \
            if others else ""
        raise FileNotFoundError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}{hint}")
      for file in files:
        self._add_file(file)

  def _read_indexed(self, index: Path) -> None:
    try:
      weight_map = json.loads(index.read_text()).get("weight_map")
    except json.JSONDecodeError as e:
      raise ValueError(f"{index}: not valid JSON ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: expected a non-empty 'weight_map' of tensor name -> file")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (self.directory / f).is_file()]
    if missing:
      raise FileNotFoundError(f"{self.directory}: {len(missing)} shard(s) listed in {INDEX_FILE} "
                              f"are missing: {missing}")
    for file in files:
      self._add_file(self.directory / file)
    wrong = sorted(n for n, f in weight_map.items()
                   if n not in self.tensors or self.tensors[n].file.name != f)
    if wrong:
      raise ValueError(f"{index}: {len(wrong)} tensor(s) are not in the shard the index names, "
                       f"e.g. {wrong[:5]}")

  def _add_file(self, file: Path) -> None:
    tensors, metadata = read_header(file)
    duplicated = sorted(set(tensors) & set(self.tensors))
    if duplicated:
      raise ValueError(f"{self.directory}: tensor(s) stored in more than one file, e.g. "
                       f"{duplicated[:5]}")
    self.tensors.update(tensors)
    self.metadata.update(metadata)

  def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Memory-mapped view of tensor `name`, or of its rows [start, stop) (first axis).

    Drop the result (and anything viewing it) to unmap; copy what must outlive that.
    """
    info = self.tensors[name]
    shape, offset = info.shape, info.offset
    if rows is not None:
      start, stop = rows
      if not (shape and 0 <= start <= stop <= shape[0]):
        raise ValueError(f"{name}: rows {rows} outside a tensor of shape {shape}")
      row_bytes = math.prod(shape[1:]) * info.numpy_dtype.itemsize
      shape, offset = (stop - start,) + shape[1:], offset + start * row_bytes
    if math.prod(shape) == 0:
      return np.zeros(shape, info.numpy_dtype)
    return np.memmap(info.file, dtype=info.numpy_dtype, mode="r", offset=offset, shape=shape)

  @property
  def total_bytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())

  @property
  def total_params(self) -> int:
    return sum(t.size for t in self.tensors.values())


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes: expected > 0, got {max_shard_bytes}")
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def _header_bytes(specs: list[TensorSpec]) -> bytes:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for spec in specs:
    header[spec.name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)       # 8-byte aligned data, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, spec: TensorSpec, pieces: Iterable[np.ndarray]) -> None:
  written = 0
  for piece in pieces:
    if np.dtype(piece.dtype) != np.dtype(spec.dtype):
      raise ValueError(f"{spec.name}: a piece has dtype {piece.dtype}, expected {spec.dtype}")
    piece = np.ascontiguousarray(piece)
    f.write(memoryview(piece.view(np.uint8).reshape(-1)))
    written += piece.nbytes
  if written != spec.nbytes:
    raise ValueError(f"{spec.name}: pieces hold {written} bytes, {spec.dtype}{spec.shape} needs "
                     f"{spec.nbytes}")


def shard_file_name(k: int, n: int) -> str:
  return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(directory: str | os.PathLike, specs: list[TensorSpec],
                  pieces: Callable[[TensorSpec], Iterable[np.ndarray]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Writes `model-0000k-of-0000N.safetensors` + the index into an existing directory.

  pieces(spec) yields arrays whose bytes, concatenated, are the tensor (e.g. row blocks).
  Returns the index dict.
  """
  directory = Path(directory)
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError("write_sharded: duplicate tensor names")
  shards = plan_shards(specs, max_shard_bytes)
  weight_map = {}
  for k, shard in enumerate(shards):
    file = shard_file_name(k, len(shards))
    with open(directory / file, "wb") as f:
      f.write(_header_bytes(shard))
      for spec in shard:
        _write_tensor(f, spec, pieces(spec))
        weight_map[spec.name] = file
  index = {"metadata": {"total_size": sum(s.nbytes for s in specs),
                        "total_parameters": sum(math.prod(s.shape) for s in specs)},
           "weight_map": dict(sorted(weight_map.items()))}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return index
