"""AdamW with per-component parameter groups, schedules and gradient clipping (the reference's launch_scripts/train_multitask_model.py and train_captioner.py).

Molmo trains three components with their own learning rate and warmup: the connector (plus the
new token embeddings), the ViT and the LLM. The pretrained input-embedding table is frozen
(`ft_embedding="lm_head"`, pitfall 29) and gradients are clipped to norm 1.0 separately per
component, not globally (pitfall 28).

Parameters are named by their "/"-joined path in the tree of docs/architecture.md
("llm/blocks/attention/query/kernel"). `COMPONENT_RULES` is the one table mapping names to groups.

Step convention: every schedule here takes optax's `count`, the number of updates already applied
(the train state's step before the update). The reference increments `global_step` before each
step, so the update at count c uses the LR of 1-based step s = c + 1 and the first update uses
lr / warmup.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from molmo_jax.model_dir import path_name

FROZEN = "frozen"
COMPONENTS = ("connector", "vit", "llm")

# (component, regex searched in the "/"-joined parameter path); the first match wins. Frozen
# patterns (OptimizerConfig.frozen_patterns) are checked before this table.
COMPONENT_RULES: tuple[tuple[str, str], ...] = (
    ("connector", r"^connector/"),
    ("connector", r"^llm/embedding/new(/|$)"),
    ("vit", r"^vision/"),
    ("llm", r"^llm/"),
)

# ft_embedding="lm_head": the pretrained token table never changes; new rows and LM head train.
DEFAULT_FROZEN_PATTERNS: tuple[str, ...] = (r"^llm/embedding/pretrained(/|$)",)

# Weight decay is 0 in every released recipe; with wd > 0 these are exempt, as in the reference
# (embeddings, norms, pre-LN, positional/class embedding) plus biases (OLMo's
# decay_norm_and_bias=False default).
NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"^llm/embedding/",
    r"norm/",
    r"^vision/pre_ln/",
    r"^vision/(positional_embedding|class_embedding)$",
    r"(^|/)bias$",
)

# torch's clip_grad_norm_ (and the reference's multi-modal clipping) divide by norm + 1e-6.
_CLIP_EPS = 1e-6


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ComponentSchedule:
  """Peak learning rate and linear warmup length of one component."""

  learning_rate: float
  warmup_steps: int


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything `build_optimizer` needs. Defaults are the multitask fine-tuning recipe."""

  total_steps: int
  connector: ComponentSchedule = ComponentSchedule(5e-6, 200)
  vit: ComponentSchedule = ComponentSchedule(5e-6, 200)
  llm: ComponentSchedule = ComponentSchedule(1e-5, 200)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-6
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0        # per component; None = no clipping (norms still logged)
  alpha_f: float = 0.1                     # cosine ends at alpha_f * lr
  frozen_patterns: tuple[str, ...] = DEFAULT_FROZEN_PATTERNS
  # When non-empty, only parameters matching one of these regexes train; all others are frozen
  # (LoRA: the adapters and any fully trained part; see molmo_jax.lora).
  trainable_patterns: tuple[str, ...] = ()

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f"optimizer.total_steps: expected >= 1, got {self.total_steps}")
    for name in COMPONENTS:
      sched = getattr(self, name)
      if not isinstance(sched, ComponentSchedule):
        raise ValueError(f"optimizer.{name}: expected a ComponentSchedule, "
                         f"got {type(sched).__name__}")
      _validate_schedule(f"optimizer.{name}", sched.learning_rate, sched.warmup_steps,
                         self.total_steps, self.alpha_f)
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"optimizer.max_grad_norm: expected > 0 or None, got {self.max_grad_norm}")
    for field in ("frozen_patterns", "trainable_patterns"):
      for pattern in getattr(self, field):
        try:
          re.compile(pattern)
        except re.error as e:
          raise ValueError(f"optimizer.{field}: {pattern!r} is not a valid regex: "
                           f"{e}") from None

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "OptimizerConfig":
    """From a dict or ml_collections.ConfigDict with the field names of this class."""
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f"optimizer config: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = dict(cfg)
    for name in COMPONENTS:
      if name in kwargs and not isinstance(kwargs[name], ComponentSchedule):
        sub = dict(kwargs[name])
        extra = sorted(set(sub) - {"learning_rate", "warmup_steps"})
        if extra:
          raise ValueError(f"optimizer config.{name}: unknown field(s) {extra}; "
                           "known: ['learning_rate', 'warmup_steps']")
        kwargs[name] = ComponentSchedule(**sub)
    for field in ("frozen_patterns", "trainable_patterns"):
      if field in kwargs:
        kwargs[field] = tuple(kwargs[field])
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------
# Parameter names and groups
# ------------------------------------------------------------------------------------------

def param_names(params: Any) -> Any:
  """Pytree of the "/"-joined name of every leaf (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), params)


def assign_group(name: str, frozen_patterns: tuple[str, ...] = DEFAULT_FROZEN_PATTERNS,
                 trainable_patterns: tuple[str, ...] = ()) -> str:
  """Group label of one parameter name: 'frozen', 'connector', 'vit' or 'llm'.

  Frozen: matches a frozen pattern, or trainable_patterns is non-empty and it matches none.
  """
  if any(re.search(p, name) for p in frozen_patterns):
    return FROZEN
  if trainable_patterns and not any(re.search(p, name) for p in trainable_patterns):
    return FROZEN
  for component, pattern in COMPONENT_RULES:
    if re.search(pattern, name):
      return component
  raise ValueError(f"parameter {name!r} belongs to no optimizer group; expected a path under "
                   "vision/, connector/ or llm/ (see COMPONENT_RULES)")


def param_groups(params: Any, frozen_patterns: tuple[str, ...] = DEFAULT_FROZEN_PATTERNS,
                 trainable_patterns: tuple[str, ...] = ()) -> Any:
  """Pytree of group labels with the structure of `params`."""
  return jax.tree.map(lambda name: assign_group(name, frozen_patterns, trainable_patterns),
                      param_names(params))


def _decay_mask(params: Any) -> Any:
  # Called by optax on the group's masked tree, whose paths are still the full parameter paths.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(re.search(p, path_name(path)) for p in NO_DECAY_PATTERNS), params)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------

def _validate_schedule(where: str, lr: float, warmup: int, total_steps: int, alpha_f: float):
  if not lr >= 0:
    raise ValueError(f"{where}.learning_rate: expected >= 0, got {lr}")
  if warmup < 0:
    raise ValueError(f"{where}.warmup_steps: expected >= 0, got {warmup}")
  if warmup >= total_steps:
    raise ValueError(f"{where}.warmup_steps: expected < total_steps ({total_steps}), got {warmup}; "
                     "the cosine phase would be empty")
  if not 0 <= alpha_f <= 1:
    raise ValueError(f"alpha_f: expected a fraction in [0, 1], got {alpha_f}")


def learning_rate_at_step(step: jax.Array | int, lr: float, warmup: int, total_steps: int,
                          alpha_f: float = 0.1) -> jax.Array:
  """LR of the reference at 1-based `step`: lr·s/warmup, then cosine to alpha_f·lr at total_steps.

  Past total_steps the LR stays at alpha_f·lr rather than climbing back up the cosine.
  """
  s = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
  lr_min = alpha_f * lr
  warm = lr * s / max(warmup, 1)
  progress = (s - warmup) / (total_steps - warmup)
  cosine = lr_min + (lr - lr_min) * (1 + jnp.cos(math.pi * progress)) / 2
  return jnp.where(s < warmup, warm, cosine)


def make_schedule(lr: float, warmup: int, total_steps: int, alpha_f: float = 0.1) -> optax.Schedule:
  """optax schedule: count (updates already applied) -> LR of 1-based step count + 1."""
  _validate_schedule("schedule", lr, warmup, total_steps, alpha_f)

  def schedule(count):
    return learning_rate_at_step(count + 1, lr, warmup, total_steps, alpha_f)

  return schedule


# ------------------------------------------------------------------------------------------
# Transformations
# ------------------------------------------------------------------------------------------

class ComponentClipState(NamedTuple):
  """Pre-clip global gradient norm of each component, from the latest update."""

  grad_norms: dict[str, jax.Array]


def _component_norm(updates: Any, labels: Any, component: str) -> jax.Array:
  leaves = [g for g, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels))
            if label == component]
  squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def clip_by_component_norm(labels: Any, max_norm: float | None,
                           components: tuple[str, ...] = COMPONENTS
                           ) -> optax.GradientTransformation:
  """Scale each component's gradients by min(1, max_norm / (norm + 1e-6)) of their own norm.

  Leaves with other labels (the frozen group) pass through and count in no norm. The pre-clip
  norms are kept in the state (`ComponentClipState`) so the train step can log them.
  """
  def init(params):
    del params
    return ComponentClipState({c: jnp.zeros((), jnp.float32) for c in components})

  def update(updates, state, params=None):
    del state, params
    if jax.tree.structure(updates) != jax.tree.structure(labels):
      raise ValueError("clip_by_component_norm: the gradient tree does not match the parameter "
                       "tree the optimizer was built for")
    norms = {c: _component_norm(updates, labels, c) for c in components}
    if max_norm is None:
      return updates, ComponentClipState(norms)
    scales = {c: jnp.minimum(1.0, max_norm / (norms[c] + _CLIP_EPS)) for c in components}
    updates = jax.tree.map(
        lambda g, label: g * scales[label].astype(g.dtype) if label in scales else g,
        updates, labels)
    return updates, ComponentClipState(norms)

  return optax.GradientTransformation(init, update)


def freeze() -> optax.GradientTransformation:
  """Like optax.set_to_zero, but the updates are -0.0: p + (-0.0) == p bit for bit for every p,
  while p + 0.0 turns a -0.0 parameter into +0.0. Holds no state."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: jnp.full_like(g, -0.0), updates), state

  return optax.GradientTransformation(init, update)


def _adamw(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
  if cfg.weight_decay:
    # Decoupled decay scaled by the scheduled LR, as torch.optim.AdamW.
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


# ------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MolmoOptimizer:
  """The optax transformation plus what a train loop needs to log about it."""

  tx: optax.GradientTransformation
  labels: Any                                  # pytree of group labels, structure of params
  schedules: dict[str, optax.Schedule]         # per trainable component present in params
  config: OptimizerConfig

  def current_learning_rates(self, count: jax.Array | int) -> dict[str, jax.Array]:
    """LR of each component for the update applied when `count` updates are already done."""
    return {name: schedule(jnp.asarray(count)) for name, schedule in self.schedules.items()}

  def grad_norms(self, opt_state: Any) -> dict[str, jax.Array]:
    """Pre-clip gradient norms of the latest update: {'connector': ..., 'vit': ..., 'llm': ...}."""
    return component_grad_norms(opt_state)


def component_grad_norms(opt_state: Any) -> dict[str, jax.Array]:
  """Finds the ComponentClipState anywhere in an optimizer state (also inside wrappers)."""
  is_clip_state = lambda x: isinstance(x, ComponentClipState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_clip_state) if is_clip_state(x)]
  if len(found) != 1:
    raise ValueError(f"opt_state: expected exactly one ComponentClipState, found {len(found)}; "
                     "was it built by build_optimizer?")
  return dict(found[0].grad_norms)


def build_optimizer(train_cfg: OptimizerConfig | Mapping[str, Any], params_or_shapes: Any
                    ) -> MolmoOptimizer:
  """AdamW per component + per-component clipping + frozen pretrained embedding.

  Args:
    train_cfg: an OptimizerConfig, or a dict / ConfigDict with its fields.
    params_or_shapes: the parameter tree (arrays or jax.ShapeDtypeStruct); only paths are read.
  """
  cfg = (train_cfg if isinstance(train_cfg, OptimizerConfig)
         else OptimizerConfig.from_mapping(train_cfg))
  labels = param_groups(params_or_shapes, cfg.frozen_patterns, cfg.trainable_patterns)
  present = set(jax.tree.leaves(labels))
  schedules = {}
  transforms: dict[str, optax.GradientTransformation] = {FROZEN: freeze()}
  for name in COMPONENTS:
    sched = getattr(cfg, name)
    schedules[name] = make_schedule(sched.learning_rate, sched.warmup_steps, cfg.total_steps,
                                    cfg.alpha_f)
    transforms[name] = _adamw(cfg, schedules[name])
  schedules = {name: s for name, s in schedules.items() if name in present}
  tx = optax.chain(
      clip_by_component_norm(labels, cfg.max_grad_norm),
      optax.multi_transform(transforms, labels),
  )
  return MolmoOptimizer(tx=tx, labels=labels, schedules=schedules, config=cfg)
