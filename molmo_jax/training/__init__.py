"""Training: loss, optimizer (parameter groups, schedules, per-component clipping), training checkpoints.

Model directories (save / load) are `molmo_jax.model_dir`."""

from molmo_jax.training.checkpoint import TrainCheckpointer
from molmo_jax.training.loss import (loss_from_sums, loss_sums, loss_weight_sum,
                                     token_cross_entropy)
from molmo_jax.training.optimizer import (COMPONENT_RULES, MolmoOptimizer, OptimizerConfig,
                                          ComponentSchedule, build_optimizer, make_schedule,
                                          param_groups)
