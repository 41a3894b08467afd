"""Training: loss, optimizer (parameter groups, schedules, per-component clipping), checkpoints."""

from molmo_jax.training.checkpoint import (ModelCheckpoint, TrainCheckpointer, load_model_checkpoint,
                                           restore_params_only, save_model_checkpoint)
from molmo_jax.training.loss import (loss_from_sums, loss_sums, loss_weight_sum,
                                     token_cross_entropy)
from molmo_jax.training.optimizer import (COMPONENT_RULES, MolmoOptimizer, OptimizerConfig,
                                          ComponentSchedule, build_optimizer, make_schedule,
                                          param_groups)
