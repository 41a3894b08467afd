"""Defaults shared by every training recipe (not a runnable config itself).

Each recipe's `get_config(arg)` starts from `base_config()` and sets what its stage changes.
Field reference (all overridable with --config.<path>=value):

  model.name            preset (molmo-7b-d, molmo-72b, molmo-7b-o, molmoe-1b), tiny-<family>, or
                        "" to take init_from's config.json
  model.dtype           compute dtype (bfloat16 on accelerators); params stay model.param_dtype
  model.remat_policy    none | full | dots | dots_no_batch | qkv_proj | minimal (scanned layers)
  model.scan_unroll     layers per iteration of the layer scans (1; >= layers unrolls: faster on CPU)
  model.{llm,vision,connector,preprocess}.<field>   any MolmoConfig field, e.g. dropout rates
                        (None = the preset's / init_from's value; recipes set them with .update)
  init_from             model directory (converted checkpoint) or training workdir (its latest
                        checkpoint) whose params start the run; ignored
                        once the workdir holds a checkpoint (the run then resumes from it)
  tokenizer_dir         tokenizer.json directory; default <init_from>/tokenizer
  plugins               modules to import first: they register data source kinds, tokenizers,
                        eval tasks (the demo's: molmo_jax.data.synthetic, ...data.demo_tokenizer)
  data.*                molmo_jax.data.pipeline.DataConfig; data.sources is {name: SourceConfig}
  optimizer.*           molmo_jax.training.optimizer.OptimizerConfig (total_steps comes from the top)
  lora.{rank,alpha,dropout,targets,train,base_dtype}   LoRA fine-tuning (molmo_jax.lora.LoraConfig);
                        rank 0 (the default) = full fine-tuning
  micro_batches         gradient accumulation: the global batch runs as this many slices
  loss_chunk_size       LM head + loss over chunks of this many positions, never holding the
                        [B, T, V] fp32 logits (0 = whole logits at once)
  offload_optimizer_state   keep AdamW's moments (8 bytes per trainable parameter) in pinned host
                        memory between steps; the step copies them to the chip for the update and
                        back (TPU; saves their HBM at the cost of two host transfers per step)
  mesh.{data,fsdp,tensor,expert}   mesh axis sizes; one may be -1 (all remaining devices)
  checkpoint.{save_every,keep,async_save,replica_parallel}
  export_model          write <workdir>/model/ when the run ends (finished or stopped by a signal)
  compilation_cache_dir persistent compilation cache (a restart after pre-emption skips compiling)
  profile.{start_step,num_steps}  jax.profiler trace window (start_step 0 = off)
  preview.{every,num_examples,max_new_tokens,source}  pictures while training (TensorBoard)
  distributed.*         multi-host start-up (see molmo_jax.training.loop.initialize_distributed)

Every field is listed with its value by `python train.py --config <recipe> --help`.
"""

import dataclasses
import types
import typing

import ml_collections

from molmo_jax import config as model_config_lib

_SECTIONS = {"llm": model_config_lib.LLMConfig, "vision": model_config_lib.VisionConfig,
             "connector": model_config_lib.ConnectorConfig,
             "preprocess": model_config_lib.PreprocessConfig}


def _flag_type(annotation) -> type:
  """The type a command-line override of a field is parsed as."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _flag_type(args[0]) if len(args) == 1 else object
  if origin is typing.Literal:
    return type(typing.get_args(annotation)[0])
  if origin is tuple or annotation is tuple:
    return tuple
  return annotation if annotation in (int, float, bool, str) else object


def model_section(name: str) -> ml_collections.ConfigDict:
  """Every field of one MolmoConfig section, unset (None = keep the preset's value), typed so
  that `--config.model.<name>.<field>=value` parses and misspelt fields are caught."""
  cls = _SECTIONS[name]
  hints = typing.get_type_hints(cls)
  return ml_collections.ConfigDict({
      f.name: ml_collections.FieldReference(None, field_type=_flag_type(hints[f.name]))
      for f in dataclasses.fields(cls)})


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      name="", dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_unroll=1,
      **{name: model_section(name) for name in _SECTIONS}))
  c.plugins = ()                   # modules that register data source kinds, tokenizers, tasks
  c.init_from = ""
  c.tokenizer_dir = ""
  c.seed = 6198                    # the reference's run seed (the reference's launch_scripts/train_multitask_model.py and train_captioner.py)
  c.total_steps = 1000
  c.micro_batches = 1
  c.loss_chunk_size = 512
  c.offload_optimizer_state = False
  # LoRA (rank > 0): adapters on `targets`, `train` trained in full, everything else frozen and
  # held in base_dtype: float32, bfloat16, or int8 (the LLM's dense kernels and LM head as int8
  # values + scales, every other frozen leaf bfloat16; docs/training.md).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=("llm",),
                                          train=(), base_dtype="float32"))
  c.z_loss_weight = 1e-4           # softmax_auxiliary_loss (the reference's olmo/train.py (loss))

  # AdamW per component, warmup from 0 then cosine to alpha_f * lr, per-component clip 1.0.
  c.optimizer = ml_collections.ConfigDict(dict(
      connector=dict(learning_rate=5e-6, warmup_steps=200),
      vit=dict(learning_rate=5e-6, warmup_steps=200),
      llm=dict(learning_rate=1e-5, warmup_steps=200),
      b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0, max_grad_norm=1.0, alpha_f=0.1))

  c.data = ml_collections.ConfigDict(dict(
      sources={}, group_rates={}, seq_len=2304,
      max_crops=ml_collections.FieldReference(None, field_type=int), global_batch_size=256, seed=0,
      shuffle=True, on_overflow="drop", pack_conversations=True, max_conversations=0,
      root_subsegment_weighting=True, num_workers=8, prefetch=2))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  # replica_parallel: Orbax splits each replicated array's write over its replicas (faster on
  # pods; on CPU hosts the first save stalls while it compiles a slice per array shape).
  c.checkpoint = ml_collections.ConfigDict(dict(save_every=1000, keep=3, async_save=True,
                                                replica_parallel=True))
  c.export_model = True            # write <workdir>/model/ (a model directory) when the run ends
  c.compilation_cache_dir = ""     # persistent XLA cache: restarts skip compiling the step
  c.log_every = 10
  c.tensorboard = True
  # Every `every` steps (0 = off): answer the first `num_examples` examples of `source` (default:
  # the first training source) and log images with points drawn + text to TensorBoard.
  c.preview = ml_collections.ConfigDict(dict(every=0, num_examples=4, max_new_tokens=64,
                                             source={}))
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=5))
  c.distributed = ml_collections.ConfigDict(dict(
      initialize="auto", coordinator_address="", num_processes=1, process_id=0, cpu_collectives=""))
  c.peak_flops_per_device = 0.0    # 0 = look the chip up (molmo_jax.training.flops)
  c.debug_step_sleep_s = 0.0       # tests of pre-emption slow the loop down with this
  return c


def parse_arg(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
  """"a=1,b=x" (or a bare value for the first key) -> {key: value} over `defaults`."""
  out = dict(defaults)
  if not arg:
    return out
  first = next(iter(defaults))
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep:
      key, value = first, item
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
    out[key] = value
  return out
