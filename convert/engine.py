"""The one table engine of every converter: `Rule`, the transform hooks, and applying a table.

Legend: L stacked layers, E experts, R rows of an HF tensor, D its row width; torch Linear
weights are [out, in].

A table (one module per checkpoint family in convert/tables/) is a list of `Rule`s. A rule names
one leaf of our parameter tree, the Hugging Face tensor it comes from (`{i}` = layer, `{e}` =
expert), that tensor's per-layer (per-expert) shape, and one hook from the vocabulary below.
Stacked rules put layer i at index i of our leading axis and expert e at index e of the next,
so a converted tree is already in the scanned layout. Several rules may share one fused HF
tensor, each owning a block of it (`rows`, along `fused_axis`):

  att_proj [Q | K | V, D]  (Molmo release)    ff_proj [up | gate, D]  (Molmo release)
  gate_up_proj [E, gate | up, D]  (transformers' fused OLMoE experts, fused_axis 1)

Hooks (HF per-layer slice x -> our per-layer leaf y; `to_hf` is the exact inverse, used by
export, so a round trip is bit-identical):

  copy            y = x.reshape(ours)                 norms, biases [H*h] -> [H, h], embeddings
  linear          y = x.T.reshape(ours)               torch [out, in] -> [in, *out] or [*in, out]
  experts_linear  y = x.reshape(E, out, in)          [E*out, in] (megablocks w1/v1) or
                       .transpose(0, 2, 1)            [E, out, in] (fused experts) -> [E, in, out]
  patch_conv      [Dv, 3, p, p] -> [p*p*3, Dv]        CLIP's patch conv, rows in (dy, dx, c) order

Weights are read with convert.safetensors_io (memory-mapped, bfloat16 included, no torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from convert.safetensors_io import SafetensorsDir

Params = dict[str, Any]

COPY, LINEAR, EXPERTS_LINEAR, PATCH_CONV = "copy", "linear", "experts_linear", "patch_conv"
HOOKS = (COPY, LINEAR, EXPERTS_LINEAR, PATCH_CONV)


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str                                  # '/'-separated path in our (sub)tree
  hf: str                                    # HF tensor name; '{i}' = layer, '{e}' = expert
  hf_shape: tuple[int, ...]                  # per-layer (per-expert) shape of the whole HF tensor
  hook: str = COPY
  layers: int = 0                            # stacked layers on our axis 0 (0 = not stacked)
  experts: int = 0                           # HF tensors per expert stacked on the next axis
  rows: tuple[int, int] | None = None        # this leaf's block of a fused HF tensor ...
  fused_axis: int = 0                        # ... along this axis of it
  shape: tuple[int, ...] | None = None       # our per-layer (per-expert) leaf; None: the model's

  def __post_init__(self):
    if self.hook not in HOOKS:
      raise ValueError(f"rule {self.ours}: unknown transform hook {self.hook!r}; expected one of "
                       f"{HOOKS}")
    if ("{i}" in self.hf) != bool(self.layers) or ("{e}" in self.hf) != bool(self.experts):
      raise ValueError(f"rule {self.ours}: {self.hf!r} must hold {{i}} exactly when layers > 0 "
                       "and {e} exactly when experts > 0")

  def hf_names(self) -> list[str]:
    """Every HF tensor this rule reads: layer-major, then expert."""
    layers = range(self.layers) if self.layers else [None]
    experts = range(self.experts) if self.experts else [None]
    return [self.hf.format(i=i, e=e) for i in layers for e in experts]

  @property
  def slice_shape(self) -> tuple[int, ...]:
    """Per-layer shape of the HF block this rule reads."""
    if self.rows is None:
      return self.hf_shape
    shape = list(self.hf_shape)
    shape[self.fused_axis] = self.rows[1] - self.rows[0]
    return tuple(shape)


def split_rules(ours_and_sizes: list[tuple[str, int]], hf: str, rest: tuple[int, ...], hook: str,
                layers: int = 0, *, lead: tuple[int, ...] = (), shape=None) -> list[Rule]:
  """Rules for the consecutive blocks of one fused HF tensor [*lead, sum(sizes), *rest].

  `shape(size)` gives our per-layer leaf shape of a block (None: taken from the model)."""
  total = sum(size for _, size in ours_and_sizes)
  rules, start = [], 0
  for ours, size in ours_and_sizes:
    rules.append(Rule(ours, hf, lead + (total,) + rest, hook, layers, rows=(start, start + size),
                      fused_axis=len(lead), shape=None if shape is None else shape(size)))
    start += size
  return rules


def linear_rule(ours: str, hf: str, d_in: int, out: tuple[int, ...], layers: int = 0,
                experts: int = 0) -> Rule:
  """A torch Linear [prod(out), d_in] -> our kernel [d_in, *out] (output split into heads)."""
  return Rule(ours, hf, (math.prod(out), d_in), LINEAR, layers, experts, shape=(d_in, *out))


def linear_out_rule(ours: str, hf: str, inp: tuple[int, ...], d_out: int, layers: int = 0) -> Rule:
  """A torch Linear whose input is (heads, head_dim) -> our kernel [*inp, d_out]."""
  return Rule(ours, hf, (d_out, math.prod(inp)), LINEAR, layers, shape=(*inp, d_out))


def vector_rule(ours: str, hf: str, shape: tuple[int, ...], layers: int = 0) -> Rule:
  """A 1-D HF tensor -> our leaf of `shape` (norm scales, biases split into heads)."""
  return Rule(ours, hf, (math.prod(shape),), COPY, layers, shape=shape)


# ------------------------------------------------------------------------------------------
# Hooks
# ------------------------------------------------------------------------------------------

_TILE = 512
_SAME_SIZE_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose(x: np.ndarray) -> np.ndarray:
  """C-contiguous x.T of a [R, D] (or [E, R, D] -> [E, D, R]) array.

  Tile by tile on an unsigned view of the same width: numpy's strided copy of a large transposed
  view thrashes the cache, and ml_dtypes' bfloat16 has no fast copy loop.
  """
  if x.ndim == 3:
    return np.stack([transpose(part) for part in x])
  rows, cols = x.shape
  src = x.view(_SAME_SIZE_UINT[x.dtype.itemsize]) if x.flags.c_contiguous else x
  out = np.empty((cols, rows), src.dtype)
  for r in range(0, rows, _TILE):
    for c in range(0, cols, _TILE):
      out[c:c + _TILE, r:r + _TILE] = src[r:r + _TILE, c:c + _TILE].T
  return out.view(x.dtype)


def to_ours(hook: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF per-layer slice -> our per-layer leaf of `shape`."""
  if hook == COPY:
    return x.reshape(shape)
  if hook == LINEAR:
    return transpose(x).reshape(shape)
  if hook == EXPERTS_LINEAR:
    experts, d_in, d_out = shape
    return transpose(x.reshape(experts, d_out, d_in))
  if hook == PATCH_CONV:
    return x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1).T.reshape(shape)
  raise ValueError(f"unknown transform hook {hook!r}; expected one of {HOOKS}")


def to_hf(hook: str, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Our per-layer leaf -> HF per-layer slice of `shape` (inverse of `to_ours`)."""
  if hook == COPY:
    return y.reshape(shape)
  if hook == LINEAR:
    return transpose(y.reshape(shape[::-1]))
  if hook == EXPERTS_LINEAR:
    return transpose(y).reshape(shape)
  if hook == PATCH_CONV:
    width, channels, p, _ = shape
    return y.T.reshape(width, p, p, channels).transpose(0, 3, 1, 2).reshape(shape)
  raise ValueError(f"unknown transform hook {hook!r}; expected one of {HOOKS}")


def read_block(reader: SafetensorsDir, rule: Rule, name: str) -> np.ndarray:
  """Memory-mapped view of tensor `name`, or of the block of it that `rule` owns."""
  if rule.rows is None or rule.fused_axis == 0:
    return reader.read(name, rule.rows)
  return reader.read(name)[(slice(None),) * rule.fused_axis + (slice(*rule.rows),)]


# ------------------------------------------------------------------------------------------
# Tables as a whole
# ------------------------------------------------------------------------------------------

def hf_tensor_shapes(rules: list[Rule]) -> dict[str, tuple[int, ...]]:
  """Every HF tensor the rules imply (fused ones once), in table order."""
  shapes: dict[str, tuple[int, ...]] = {}
  for rule in rules:
    for name in rule.hf_names():
      shapes.setdefault(name, rule.hf_shape)
  return shapes


def fused_groups(rules: list[Rule]) -> dict[str, list[Rule]]:
  """HF name template -> the rules reading it, in row order (one rule unless fused)."""
  groups: dict[str, list[Rule]] = {}
  for rule in rules:
    groups.setdefault(rule.hf, []).append(rule)
  return {k: sorted(v, key=lambda r: r.rows or (0, 0)) for k, v in groups.items()}


def row_splittable(rule: Rule, shape: tuple[int, ...]) -> bool:
  """Whether a whole 2-D HF table maps its row blocks onto our rows (copy) or columns (linear),
  so a large one (embeddings, LM head) can be streamed in blocks."""
  return (rule.layers == 0 and rule.rows is None and len(shape) == 2 and
          ((rule.hook == COPY and shape == rule.hf_shape) or
           (rule.hook == LINEAR and shape == rule.hf_shape[::-1])))


def check_rules_match(rules: list[Rule], ours_shapes: dict[str, tuple[int, ...]]) -> None:
  """The table must produce exactly our model's leaves with their shapes (a config the table
  cannot express fails here, before any tensor is read)."""
  by_path = {r.ours: r for r in rules}
  problems = sorted(set(ours_shapes) ^ set(by_path))
  for path in sorted(set(ours_shapes) & set(by_path)):
    rule, want = by_path[path], ours_shapes[path]
    layer_shape = want[1:] if rule.layers else want
    if (rule.layers and want[:1] != (rule.layers,)) or \
        math.prod(rule.slice_shape) != math.prod(layer_shape):
      problems.append(f"{path}: table implies {rule.slice_shape} x {rule.layers or 1}, model has {want}")
  if problems:
    raise ValueError(f"release tables do not match the model's parameter tree: {problems[:10]}")


def set_leaf(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def listing(names: list[str], limit: int = 20) -> str:
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------------------
# Converting a whole (small) checkpoint in memory: the base components
# ------------------------------------------------------------------------------------------

def convert_tensors(reader: SafetensorsDir, rules: list[Rule], dtype: Any = np.float32,
                    where: str = "checkpoint") -> tuple[Params, set[str]]:
  """Reads, checks, transforms and stacks every rule's tensors -> (nested params, names used).

  Every rule must give its `shape`. Missing tensors and shapes that disagree with the table
  are errors listing the names."""
  used = {n for r in rules for n in r.hf_names()}
  missing = sorted(used - set(reader.tensors))
  if missing:
    raise ValueError(f"{where}: {len(missing)} tensor(s) the config implies are missing: "
                     + listing(missing))
  wrong = [f"{n}: {reader.tensors[n].shape}, expected {r.hf_shape}"
           for r in rules for n in r.hf_names() if reader.tensors[n].shape != r.hf_shape]
  if wrong:
    raise ValueError(f"{where}: shape mismatch against config.json: " + "; ".join(wrong[:20]))

  params: Params = {}
  for rule in rules:
    convert = lambda name: to_ours(rule.hook, read_block(reader, rule, name).astype(dtype),
                                   rule.shape)
    leaves = [convert(n) for n in rule.hf_names()]
    if not rule.layers:
      value = leaves[0]
    elif rule.experts:
      value = np.stack([np.stack(leaves[i * rule.experts:(i + 1) * rule.experts])
                        for i in range(rule.layers)])                          # [L, E, ...]
    else:
      value = np.stack(leaves)                                                 # [L, ...]
    set_leaf(params, rule.ours, np.ascontiguousarray(value))
  return params, used


def check_leftovers(reader: SafetensorsDir, used: set[str], dropped: Callable[[str], bool],
                    where: str) -> None:
  """Every tensor of the checkpoint was converted or is deliberately `dropped`."""
  extra = sorted(n for n in set(reader.tensors) - used if not dropped(n))
  if extra:
    raise ValueError(f"{where}: {len(extra)} unexpected tensor(s) that the config does not "
                     "explain: " + listing(extra))
