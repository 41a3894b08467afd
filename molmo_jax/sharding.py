"""Device meshes and THE logical-axis rule table.

Model code names logical axes only (`embed`, `heads`, `mlp`, `exp`, `activation_batch`, ...).
This module is the one place that maps them onto the physical mesh axes:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style tensor parallelism over heads / MLP width / vocabulary
  expert  expert parallelism for MoE layers; every other layer treats it as more FSDP (it shards
          the batch and, for weights without an expert dimension, the embed axis), so an
          expert-parallel slice keeps no replicated parameters

Changing a parallelism layout means changing `LOGICAL_AXIS_RULES` or the mesh shape, never model
code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# (logical axis, mesh axis or tuple of mesh axes or None). First match wins; a mesh axis is used at
# most once per array (flax drops a rule whose mesh axis is already taken).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # --- activations ---
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_exp", "expert"),
    ("activation_capacity", None),
    ("activation_crops", None),
    # --- parameters: language model ---
    ("layers", None),
    ("vocab", "tensor"),
    # "exp" before "embed": flax resolves the rules in this order, so an expert weight's expert
    # dimension takes the expert axis first and its embed axis falls back to fsdp alone.
    ("exp", "expert"),
    ("embed", ("fsdp", "expert")),   # weights without an expert dimension: FSDP over both
    ("embed", "fsdp"),               # expert weights (expert already taken by "exp")
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # LoRA adapters (molmo_jax/lora.py): A [.., in, rank] is sharded by its input axes; B [.., rank,
    # out] takes FSDP on the rank axis unless its output axes already hold fsdp (an "embed" out).
    ("lora_rank", ("fsdp", "expert")),
    # --- parameters: vision tower and connector ---
    ("vit_embed", ("fsdp", "expert")),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_patch", None),
    ("vit_positions", None),
    ("vit_concat", ("fsdp", "expert")),
    ("pad_kinds", None),
)


def logical_axis_rules() -> tuple[tuple[str, Any], ...]:
  return LOGICAL_AXIS_RULES


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor, expert) mesh. One size may be -1: it takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {fill}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} ({sizes})")
    sizes[fill[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f"mesh: axis sizes {sizes} need {total} devices, {len(devices)} available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU topologies mesh_utils cannot lay out: plain row-major order
    device_grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from a command-line spec such as "data=2,fsdp=4" (omitted axes are 1; "data=-1"
  takes the remaining devices; "" or "auto" means all devices on the data axis)."""
  sizes: dict[str, int] = {}
  for part in [p.strip() for p in spec.split(",") if p.strip() and spec.strip() != "auto"]:
    name, sep, value = part.partition("=")
    if not sep or name.strip() not in MESH_AXES:
      raise ValueError(f"mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in "
                       f"{', '.join(MESH_AXES)}, got {part!r}")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"mesh spec {spec!r}: size of {name.strip()} must be an integer, got "
                       f"{value!r}") from None
  if not sizes:
    sizes = {"data": -1}
  elif "data" not in sizes and -1 not in sizes.values():
    sizes["data"] = -1
  return make_mesh(devices=devices, **{**{"data": 1}, **sizes})


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
  """Context in which `nn.with_logical_constraint` inside the model binds to `mesh`.

  `jax.set_mesh` (not the deprecated `with mesh:`) is what makes flax see a global mesh: under
  the old context manager every activation constraint silently became a no-op.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Tree of logical PartitionSpecs (or `nn.Partitioned` boxes) -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def param_shardings(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for the (boxed) variables returned by `jax.eval_shape(model.init, ...)`.

  A mesh axis that does not divide its dimension (2 KV heads over tensor=4, say) is dropped for
  that dimension, which is then replicated over it: jit refuses uneven argument shardings.
  """
  specs = nn.get_partition_spec(abstract_variables)
  shardings = logical_to_sharding(specs, mesh, rules)
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)
  # Shapes read off the boxes (`unbox` would apply sharding constraints under an active mesh).
  shape_of = lambda x: jax.ShapeDtypeStruct(np.shape(x.value if boxed(x) else x), np.float32)
  shapes = jax.tree.map(shape_of, abstract_variables, is_leaf=boxed)
  return jax.tree.map(lambda leaf, sharding: _divisible(sharding, leaf.shape, mesh), shapes, shardings)


def _divisible(sharding: NamedSharding, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  entries, changed = [], False
  for i, entry in enumerate(sharding.spec):
    axes = entry if isinstance(entry, tuple) else (() if entry is None else (entry,))
    kept, ways = [], 1
    for axis in axes:
      if i < len(shape) and shape[i] % (ways * mesh.shape[axis]) == 0:
        kept.append(axis)
        ways *= mesh.shape[axis]
    changed |= len(kept) != len(axes)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return NamedSharding(mesh, PartitionSpec(*entries)) if changed else sharding


def data_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a batch-major input array: the batch axis over the activation_batch mesh axes."""
  spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(shardings: Any) -> dict[str, str]:
  """'/'-joined parameter path -> PartitionSpec string, for reports and the compile-only planner."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  out = {}
  for path, sharding in flat:
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    out[key] = str(getattr(sharding, "spec", sharding))
  return out
