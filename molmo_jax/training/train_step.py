"""The sharded train step: state, initialisation on a mesh, micro-batch accumulation.

Legend: B global batch, M micro-batches per step, b = B / M rows per micro-batch, T tokens,
N crop slots (max_crops + 1), P patches per crop, C patch values, Q pooled cells per crop.

Batch (global arrays, batch axis sharded over the mesh's data-parallel axes):
  input_ids, target_ids, subsegment_ids, position_ids [B, T] int32; loss_weights [B, T] float32
  segment_ids [B, T] int32 only in packed batches (several examples per row, data/packing.py)
  images [B, N, P, C] float32; image_masks [B, N, P] float32; image_input_idx [B, N, Q] int32
  (image keys may be absent for text-only training)

One step:
  normaliser = Σ loss_weights over the GLOBAL batch (computed before any micro-batch runs)
  rows are dealt to micro-batches round-robin: micro-batch m = rows m, m+M, m+2M, ...
  grads = Σ_m ∇ [(CE_m + z_m) / normaliser + moe_aux_m / M]     (lax.scan over m)
  params, opt_state = AdamW per component (optimizer.py) applied once

Only trainable leaves are differentiated and accumulated; frozen ones (optimizer label "frozen":
the pretrained token table, or a LoRA run's whole base) pass through the step unchanged, with no
gradient buffer and no optimizer state. A LoRA base held in int8 (lora.base_dtype="int8") is
part of the state as {"qvalue" int8, "scale"} leaves in place of the quantized kernels
(molmo_jax/lora.py); they are frozen like the rest of the base.

Round-robin dealing keeps every device busy in every micro-batch: a device holding rows
[k·B/D, (k+1)·B/D) holds B/(D·M) rows of each micro-batch. Because the loss of each piece is
divided by the global normaliser, M micro-batches give the gradient of one full-batch step.

Dropout uses fold_in(fold_in(state.rng, step), m), so a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from molmo_jax import lora as lora_lib
from molmo_jax import sharding as sharding_lib
from molmo_jax.config import MolmoConfig
from molmo_jax.models import layers
from molmo_jax.models.molmo import Molmo
from molmo_jax.training.loss import (SUM_KEYS, chunked_loss_sums, loss_from_sums, loss_sums,
                                     loss_weight_sum)
from molmo_jax.model_dir import path_name
from molmo_jax.training.optimizer import FROZEN, MolmoOptimizer, component_grad_norms

TEXT_KEYS = ("input_ids", "target_ids", "loss_weights", "subsegment_ids", "position_ids")
IMAGE_KEYS = ("images", "image_masks", "image_input_idx")
REQUIRED_KEYS = ("input_ids", "target_ids", "loss_weights")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `step` counts updates already applied."""

  step: jax.Array          # int32 scalar
  params: Any              # fp32 master weights (MolmoConfig.param_dtype)
  opt_state: Any
  rng: jax.Array           # base PRNG key (uint32 [2]); per-step keys are folded from it


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Knobs of the step that are not the model's or the optimizer's."""

  micro_batches: int = 1
  z_loss_weight: float = 0.0
  # > 0: the LM head and the loss run over chunks of this many sequence positions and the
  # [B, T, V] fp32 logits are never materialised (loss.chunked_loss_sums); 0: whole logits.
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.micro_batches < 1:
      raise ValueError(f"micro_batches: expected >= 1, got {self.micro_batches}")
    if self.z_loss_weight < 0:
      raise ValueError(f"z_loss_weight: expected >= 0, got {self.z_loss_weight}")
    if self.loss_chunk_size < 0:
      raise ValueError(f"loss_chunk_size: expected >= 0 (0 = no chunking), got {self.loss_chunk_size}")

  @classmethod
  def from_config(cls, config: Any) -> "StepConfig":
    """From a training config (configs/base_train.py): micro_batches, z_loss_weight,
    loss_chunk_size (absent = 0)."""
    get = lambda key, default: config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return cls(micro_batches=int(get("micro_batches", 1)), z_loss_weight=float(get("z_loss_weight", 0.0)),
               loss_chunk_size=int(get("loss_chunk_size", 0)))


# ------------------------------------------------------------------------------------------
# Batch shapes and shardings
# ------------------------------------------------------------------------------------------

def batch_spec(model_cfg: MolmoConfig, batch_size: int, seq_len: int, max_crops: int | None = None,
               with_images: bool = True, packed: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes of a training batch (see the module legend); `packed` adds segment_ids [B, T]
  (rows holding several examples, data/packing.py)."""
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f"batch_spec: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
  pre = model_cfg.preprocess
  n = (pre.max_crops if max_crops is None else max_crops) + 1
  spec = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in TEXT_KEYS}
  spec["loss_weights"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)
  if packed:
    spec["segment_ids"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  if with_images:
    vis = model_cfg.vision
    spec["images"] = jax.ShapeDtypeStruct((batch_size, n, vis.num_patches, vis.patch_dim), jnp.float32)
    spec["image_masks"] = jax.ShapeDtypeStruct((batch_size, n, vis.num_patches), jnp.float32)
    spec["image_input_idx"] = jax.ShapeDtypeStruct((batch_size, n, pre.pooled_per_crop), jnp.int32)
  return spec


def data_batch_spec(model_cfg: MolmoConfig, data_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch shapes a training pipeline with `data_cfg` (data.pipeline.DataConfig) produces:
  packed rows (pack_examples) add segment_ids and have pack_crop_slots crop slots."""
  max_crops = data_cfg.max_crops or model_cfg.preprocess.max_crops
  packed = bool(getattr(data_cfg, "pack_examples", False))
  if packed and getattr(data_cfg, "pack_crop_slots", None):
    max_crops = data_cfg.pack_crop_slots - 1
  return batch_spec(model_cfg, data_cfg.global_batch_size, data_cfg.seq_len, max_crops,
                    packed=packed)


def spec_of(batch: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a concrete (global) batch."""
  return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)
          for k, v in batch.items()}


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch axis is split (the activation_batch mesh axes)."""
  axes = sharding_lib.data_sharding(mesh, 1).spec[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def batch_shardings(mesh: Mesh, spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, NamedSharding]:
  return {k: sharding_lib.data_sharding(mesh, len(v.shape)) for k, v in spec.items()}


def check_batch_spec(spec: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh, micro_batches: int) -> None:
  """Clear errors for batches the step cannot split evenly."""
  missing = [k for k in REQUIRED_KEYS if k not in spec]
  if missing:
    raise ValueError(f"batch: missing key(s) {missing}; expected at least {list(REQUIRED_KEYS)}")
  images = [k for k in IMAGE_KEYS if k in spec]
  if images and len(images) != len(IMAGE_KEYS):
    raise ValueError(f"batch: has {images} but not all of {list(IMAGE_KEYS)}")
  sizes = {k: v.shape[0] for k, v in spec.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch: leading (batch) dimensions differ: {sizes}")
  global_batch = next(iter(sizes.values()))
  shards = data_parallel_size(mesh)
  if global_batch % (micro_batches * shards):
    raise ValueError(f"global batch {global_batch} must be divisible by micro_batches ({micro_batches}) "
                     f"x data-parallel shards ({shards}, the mesh's data*fsdp*expert)")


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global sharded arrays (rows of process p follow those of p - 1)."""
  out = {}
  count = jax.process_count()
  for key, local in local_batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * count,) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(
        sharding_lib.data_sharding(mesh, local.ndim), local, global_shape)
  return out


# ------------------------------------------------------------------------------------------
# State initialisation
# ------------------------------------------------------------------------------------------

def _init_batch(spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  # Parameter shapes do not depend on the batch size: initialise with one row of zeros.
  return {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in spec.items()
          if k in ("input_ids", *IMAGE_KEYS)}


def _opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer-state leaves that mirror a parameter (Adam mu/nu) share its sharding.

  A state leaf mirrors parameter `name` when its key path ends with that name and the shapes match;
  every other leaf (counts, per-component norms) is replicated. optax.tree_map_params cannot be
  used here: it does not see through multi_transform's MaskedNodes.
  """
  by_name = {path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = sharding_lib.replicated(mesh)

  def choose(path, leaf):
    parts = path_name(path).split("/")
    for start in range(len(parts)):
      candidate = "/".join(parts[start:])
      if candidate in by_name:
        return by_name[candidate]
    del leaf
    return replicated

  return jax.tree_util.tree_map_with_path(choose, abstract_opt_state)


def _abstract_boxed(model: Molmo, spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), _init_batch(spec))


def abstract_params(model: Molmo, spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
  """ShapeDtypeStructs of the parameter tree (no sharding); enough to build the optimizer."""
  return nn.unbox(_abstract_boxed(model, spec))["params"]


HOST_MEMORY = "pinned_host"


def host_offloaded(shardings: TrainState, abstract_opt_state: Any) -> TrainState:
  """The same shardings with every non-scalar optimizer-state leaf (AdamW mu and nu) held in
  pinned host memory; the train step brings them to the device for the update and back."""
  def host(sharding, leaf):
    return sharding.with_memory_kind(HOST_MEMORY) if len(leaf.shape) else sharding
  return shardings.replace(opt_state=jax.tree.map(host, shardings.opt_state, abstract_opt_state))


def _on_host(sharding: Any) -> bool:
  return getattr(sharding, "memory_kind", None) == HOST_MEMORY


def abstract_train_state(model: Molmo, optimizer: MolmoOptimizer, mesh: Mesh,
                         spec: Mapping[str, jax.ShapeDtypeStruct], frozen_dtype: Any = None,
                         offload_opt_state: bool = False) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs of the state with `.sharding` set, the state's NamedShardings).

  frozen_dtype: optional dtype the frozen float parameters are held in (e.g. bfloat16 for a LoRA
    base); trainable parameters keep the model's param_dtype, integer leaves (an int8 LoRA
    base's values) their own dtype.
  offload_opt_state: keep the optimizer's moments in pinned host memory (`host_offloaded`).
  """
  boxed = _abstract_boxed(model, spec)
  param_sh = sharding_lib.param_shardings(boxed, mesh)["params"]
  abstract_params = _with_frozen_dtype(nn.unbox(boxed)["params"], optimizer.labels, frozen_dtype)
  abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
  replicated = sharding_lib.replicated(mesh)
  shardings = TrainState(step=replicated, params=param_sh,
                         opt_state=_opt_state_shardings(abstract_opt, param_sh, mesh), rng=replicated)
  if offload_opt_state:
    shardings = host_offloaded(shardings, abstract_opt)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  with_sharding = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, shardings)
  return with_sharding, shardings


def _with_frozen_dtype(params: Any, labels: Any, dtype: Any) -> Any:
  if dtype is None:
    return params
  dtype = jnp.dtype(dtype)

  def cast(p, label):
    if label != FROZEN or p.dtype == dtype or not jnp.issubdtype(p.dtype, jnp.floating):
      return p
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
    return p.astype(dtype)

  return jax.tree.map(cast, params, labels)


def _quantized_base(model: Any) -> bool:
  return isinstance(model, lora_lib.LoraModel) and model.lora.quantized_base


def float_params_target(model: Molmo, mesh: Mesh, spec: Mapping[str, jax.ShapeDtypeStruct]
                        ) -> Any:
  """ShapeDtypeStructs (with shardings) of the float parameter tree that `init_train_state`
  takes as `params` and a model directory (plus fresh adapters) provides: the state's own tree,
  except for a LoRA model with an int8 base, whose quantized kernels are float here (its
  `float_model`'s tree; a LoRA model's frozen float leaves in lora.frozen_dtype)."""
  float_model = model.float_model if _quantized_base(model) else model
  boxed = _abstract_boxed(float_model, spec)
  params = nn.unbox(boxed)["params"]
  if isinstance(model, lora_lib.LoraModel):
    params = lora_lib.cast_frozen(params, model.lora)
  shardings = sharding_lib.param_shardings(boxed, mesh)["params"]
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                      shardings)


def init_train_state(model: Molmo, optimizer: MolmoOptimizer, mesh: Mesh,
                     spec: Mapping[str, jax.ShapeDtypeStruct], rng: jax.Array,
                     params: Any = None, frozen_dtype: Any = None,
                     offload_opt_state: bool = False) -> TrainState:
  """A fresh state built directly in its shards (nothing is materialised on one device).

  rng: seeds the random parameter init (split off) and becomes the dropout base key.
  params: optional parameters to start from (e.g. a converted checkpoint); the optimizer state
    is then initialised for them and the random init is skipped. For a LoRA model with an int8
    base: the float tree (`float_params_target`), quantized here once.
  frozen_dtype, offload_opt_state: as for abstract_train_state.
  """
  abstract, shardings = abstract_train_state(model, optimizer, mesh, spec, frozen_dtype,
                                             offload_opt_state)
  init_rng, dropout_rng = jax.random.split(rng)
  init_batch = _init_batch(spec)
  quantize = _quantized_base(model)

  def fresh_params():
    return nn.unbox(model.init(init_rng, init_batch))["params"]

  def build(params):
    if params is None:
      params = fresh_params()
    elif quantize:
      params = model.quantize_base(params)
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract.params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.tx.init(params), rng=dropout_rng)

  if params is not None:
    expected = float_params_target(model, mesh, spec) if quantize else abstract.params
    if jax.tree.structure(params) != jax.tree.structure(expected):
      raise ValueError("init_train_state: the given params do not have the model's parameter tree"
                       + (" (an int8 LoRA base starts from the float tree)" if quantize else ""))
    params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, expected))
    # Donated: the given parameters become the state's without a second copy in memory.
    return jax.jit(build, out_shardings=shardings, donate_argnums=0)(params)
  return jax.jit(lambda: build(None), out_shardings=shardings)()


# ------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------

def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The model's view of a training batch; answer tokens drive response-only dropout."""
  inputs = {k: batch[k] for k in ("input_ids", "position_ids", "subsegment_ids", "segment_ids",
                                  *IMAGE_KEYS) if k in batch}
  inputs["response_mask"] = batch["loss_weights"] > 0
  return inputs


def _deal_micro_batches(batch: Mapping[str, jax.Array], micro: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[B, ...] -> [M, B/M, ...] with row r in micro-batch r % M, batch axis still sharded."""
  out = {}
  for key, x in batch.items():
    b = x.shape[0]
    dealt = x.reshape((b // micro, micro) + x.shape[1:]).swapaxes(0, 1)
    spec = sharding_lib.data_sharding(mesh, x.ndim).spec
    out[key] = jax.lax.with_sharding_constraint(
        dealt, NamedSharding(mesh, PartitionSpec(None, *spec)))
  return out


class _TrainableSplit:
  """Splits a parameter tree into trainable and frozen leaf lists (by optimizer label) and back.

  Only the trainable leaves are differentiated: frozen ones (the pretrained token table; a LoRA
  base) get no gradient buffer, no micro-batch accumulator and no update.
  """

  def __init__(self, labels: Any):
    flat = jax.tree.leaves(labels)
    self.treedef = jax.tree.structure(labels)
    self.trainable = tuple(i for i, label in enumerate(flat) if label != FROZEN)
    self.frozen = tuple(i for i, label in enumerate(flat) if label == FROZEN)

  def split(self, tree: Any) -> tuple[list, list]:
    leaves = self.treedef.flatten_up_to(tree)
    return [leaves[i] for i in self.trainable], [leaves[i] for i in self.frozen]

  def join(self, trainable: list, frozen: list) -> Any:
    leaves: list = [None] * (len(self.trainable) + len(self.frozen))
    for i, x in zip(self.trainable, trainable):
      leaves[i] = x
    for i, x in zip(self.frozen, frozen):
      leaves[i] = x
    return self.treedef.unflatten(leaves)


def make_loss_fn(model: Molmo, labels: Any, step_cfg: StepConfig, host_gemm: bool = False) -> Callable:
  """(params, micro_batch, rng, normaliser) -> (loss, (sums, aux)); gradients add over pieces.

  host_gemm: kernel gradients as plain GEMMs on a transposed copy of the input
  (`layers.host_gemm_gradients`; for CPU meshes)."""
  del labels
  llm = model.config.llm
  vocab = llm.embedding_size

  compute_dtype = jnp.dtype(model.config.dtype)

  def loss_fn(params, batch, rng, normaliser):
    with layers.host_gemm_gradients(host_gemm):
      return _loss(params, batch, rng, normaliser)

  def _loss(params, batch, rng, normaliser):
    # The chunked loss applies the plain LM-head kernel itself to the model's final hidden states
    # (LoRA adapters live in DenseGeneral layers, never on the raw `lm_head` parameter, so they
    # are in those states); an int8 LoRA base's head ({"qvalue", "scale"}) runs there as int8
    # values times scales; any other head keeps the model's own logits.
    head = params["llm"].get("lm_head") if isinstance(params.get("llm"), dict) else None
    head_scale = None
    if isinstance(head, dict) and set(head) == {"qvalue", "scale"}:
      head, head_scale = head["qvalue"], head["scale"]
    else:
      head = head.astype(compute_dtype) if isinstance(head, jax.Array) else head
    chunked = step_cfg.loss_chunk_size > 0 and isinstance(head, jax.Array)
    logits, out = model.apply({"params": params}, model_inputs(batch), rngs={"dropout": rng},
                              compute_logits=not chunked)
    if chunked:
      sums = chunked_loss_sums(out["hidden"], head, batch["target_ids"], batch["loss_weights"],
                               step_cfg.z_loss_weight, step_cfg.loss_chunk_size, head_scale)
    else:
      if logits.shape[-1] != vocab:
        raise ValueError(f"model logits have {logits.shape[-1]} classes, expected {vocab}")
      sums = loss_sums(logits, batch["target_ids"], batch["loss_weights"], step_cfg.z_loss_weight)
    denominator = jnp.where(normaliser > 0, normaliser, 1.0)
    aux = out["aux"]
    aux_loss = (llm.moe_load_balance_weight * aux["moe_load_balance"]
                + llm.moe_router_z_weight * aux["moe_router_z"])
    loss = (sums["ce_sum"] + sums["z_sum"]) / denominator + aux_loss / step_cfg.micro_batches
    return loss, (sums, aux)

  return loss_fn


def make_train_step(model: Molmo, optimizer: MolmoOptimizer, mesh: Mesh, state_shardings: TrainState,
                    spec: Mapping[str, jax.ShapeDtypeStruct], step_cfg: StepConfig = StepConfig(),
                    donate: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """A jitted `step(state, batch) -> (new_state, metrics)` with explicit shardings.

  The state argument is donated (its buffers are reused for the new state) unless donate=False.
  metrics: loss, ce_loss, z_loss, accuracy, weight_sum, token_count, out_of_range_count,
  moe_load_balance, moe_router_z, update_norm, grad_norm/<component>, learning_rate/<component>
  (all replicated fp32 scalars).
  """
  check_batch_spec(spec, mesh, step_cfg.micro_batches)
  micro = step_cfg.micro_batches
  vocab = model.config.llm.embedding_size
  # On CPU meshes the kernel gradients run as plain GEMMs (layers.host_gemm_gradients); an
  # accelerator mesh, or a compile-only TPU topology, keeps XLA's fused transposed dots.
  host_gemm = all(d.platform == "cpu" for d in mesh.devices.flat)
  loss_fn = make_loss_fn(model, optimizer.labels, step_cfg, host_gemm)
  split = _TrainableSplit(optimizer.labels)

  def split_loss(trainable, frozen, batch, rng, normaliser):
    return loss_fn(split.join(trainable, frozen), batch, rng, normaliser)

  grad_fn = jax.value_and_grad(split_loss, has_aux=True)
  trainable_sh, _ = split.split(state_shardings.params)
  offloaded = any(_on_host(s) for s in jax.tree.leaves(state_shardings.opt_state))

  def accumulate(params, batch, step_rng, normaliser):
    """-> (gradients of the trainable leaves (list, split order), sums, aux)."""
    trainable, frozen = split.split(params)
    if micro == 1:
      (_, (sums, aux)), grads = grad_fn(trainable, frozen, batch, jax.random.fold_in(step_rng, 0),
                                        normaliser)
      return grads, sums, aux
    dealt = _deal_micro_batches(batch, micro, mesh)

    def body(carry, xs):
      grads_acc, sums_acc, aux_acc = carry
      piece, index = xs
      (_, (sums, aux)), grads = grad_fn(trainable, frozen, piece,
                                        jax.random.fold_in(step_rng, index), normaliser)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      grads_acc = jax.lax.with_sharding_constraint(grads_acc, trainable_sh)
      sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
      aux_acc = jax.tree.map(lambda a, x: a + x / micro, aux_acc, aux)
      return (grads_acc, sums_acc, aux_acc), None

    # A zero-filled accumulator as the scan carry: folding the first micro-batch's gradients in
    # instead (a second copy of the step outside the scan) compiled to 17 MiB more temporaries
    # on a 134 M-parameter model (docs/scaling.md), as XLA shares no buffers between the two.
    zeros = jax.lax.with_sharding_constraint(
        [jnp.zeros(p.shape, jnp.float32) for p in trainable], trainable_sh)
    init = (zeros, {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS},
            {"moe_load_balance": jnp.zeros((), jnp.float32), "moe_router_z": jnp.zeros((), jnp.float32)})
    (grads, sums, aux), _ = jax.lax.scan(body, init, (dealt, jnp.arange(micro)))
    grads = [g.astype(p.dtype) for g, p in zip(grads, trainable)]
    return grads, sums, aux

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    normaliser = loss_weight_sum(batch["target_ids"], batch["loss_weights"], vocab)
    step_rng = jax.random.fold_in(state.rng, state.step)
    trainable_grads, sums, aux = accumulate(state.params, batch, step_rng, normaliser)
    # Frozen leaves get zero gradients only for the optimizer's tree structure: their updates are
    # never applied (below), so XLA drops them.
    _, frozen = split.split(state.params)
    grads = split.join(trainable_grads, [jnp.zeros(p.shape, p.dtype) for p in frozen])
    opt_state = state.opt_state
    if offloaded:    # host -> device for the update, and back below
      opt_state = jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind("device"))
                               if _on_host(s) else x, opt_state, state_shardings.opt_state)
    updates, opt_state = optimizer.tx.update(grads, opt_state, state.params)
    if offloaded:
      opt_state = jax.tree.map(lambda x, s: jax.device_put(x, s) if _on_host(s) else x,
                               opt_state, state_shardings.opt_state)
    params = jax.tree.map(lambda p, u, label: p if label == FROZEN else (p + u).astype(p.dtype),
                          state.params, updates, optimizer.labels)
    _, metrics = loss_from_sums(sums, normaliser)
    metrics.update(aux)
    # Finite loss and gradients can still give a non-finite update (an overflowing LR); the loop
    # checks this too before it saves the new parameters.
    metrics["update_norm"] = optax.tree.norm(split.split(updates)[0])
    for name, value in component_grad_norms(opt_state).items():
      metrics[f"grad_norm/{name}"] = value
    for name, value in optimizer.current_learning_rates(state.step).items():
      metrics[f"learning_rate/{name}"] = value
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    return new_state, metrics

  replicated = sharding_lib.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings(mesh, spec)),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())

  def run(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding_lib.activate(mesh):
      return jitted(state, batch)

  run.jitted = jitted          # for .lower(...) / AOT compilation
  return run


def make_eval_step(model: Molmo, mesh: Mesh, param_shardings: Any,
                   spec: Mapping[str, jax.ShapeDtypeStruct], z_loss_weight: float = 0.0
                   ) -> Callable[[Any, dict], dict]:
  """A jitted `eval_step(params, batch) -> metrics` on held-out batches: the train step's loss
  without dropout (no "dropout" rng) and without an update.

  metrics: loss, ce_loss, z_loss, accuracy, weight_sum, token_count, out_of_range_count,
  moe_load_balance, moe_router_z (replicated fp32 scalars; sums are over the global batch).
  """
  vocab = model.config.llm.embedding_size

  def evaluate(params, batch):
    logits, out = model.apply({"params": params}, model_inputs(batch))
    if logits.shape[-1] != vocab:
      raise ValueError(f"model logits have {logits.shape[-1]} classes, expected {vocab}")
    sums = loss_sums(logits, batch["target_ids"], batch["loss_weights"], z_loss_weight)
    _, metrics = loss_from_sums(sums)
    metrics.update(out["aux"])
    return metrics

  jitted = jax.jit(evaluate, in_shardings=(param_shardings, batch_shardings(mesh, spec)),
                   out_shardings=sharding_lib.replicated(mesh))

  def run(params: Any, batch: dict) -> dict:
    with sharding_lib.activate(mesh):
      return jitted(params, batch)

  run.jitted = jitted
  return run
