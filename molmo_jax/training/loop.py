"""The training run: set-up, resume, the step loop, checkpoints, pre-emption, logging.

`train(config, workdir)` runs one job described by an ml_collections config (configs/*.py):

  jax.distributed.initialize (multi-host)       -> mesh (data, fsdp, tensor, expert)
  molmo_jax.experiment.build(config): model config, mesh, state shapes, jitted step
  tokenizer -> data iterator (this process's rows)
  latest checkpoint under workdir?  yes: restore params, optimizer state, step, rng, data position
                                    no:  fresh state, or params from `init_from` (a converted model)
  loop: next local batch -> global array -> jitted step -> log the PREVIOUS step's metrics
        (so the host never waits on the step it just dispatched) -> save every N steps
  SIGTERM / SIGINT: finish the current step, save, return (a second SIGINT aborts at once)
  non-finite loss or gradient norm: stop with NonFiniteLossError; a checkpoint is only ever
        written after its step's metrics were checked, so the last one on disk is good.

Workdir layout: checkpoints/<step>/ (Orbax), tensorboard/ (event files), metrics.jsonl (one
line per step, process 0; on resume the rows after the restored step are dropped, so after any
kill exactly one row per step remains), profile/ (jax.profiler traces), model_config.json and
train_config.json (a resume with another model or data config is refused before they are
touched), .lock (one run per workdir; molmo_jax.training.workdir), tokenizer/ and, when the run
ends (finished or stopped by a signal), model/: a model directory (molmo_jax.model_dir) of the
last step's parameters. Every model loader also takes the workdir itself (its latest
checkpoint, or a chosen step).
SIGTERM / SIGINT are caught from the start of `train` (train.py installs the handler before
importing JAX): a signal during set-up or compilation stops the run before or after its first
step, never losing a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax import errors
from molmo_jax import lora as lora_lib
from molmo_jax import experiment as experiment_lib
from molmo_jax import sharding as sharding_lib
from molmo_jax.model_dir import (TOKENIZER_DIR, WORKDIR_LORA, locate_model, restore_params_only,
                                 save_model_checkpoint)
from molmo_jax.output_dirs import staged_directory
from molmo_jax.training import flops as flops_lib
from molmo_jax.training import train_step as step_lib
from molmo_jax.training import workdir as workdir_lib
from molmo_jax.training.checkpoint import TrainCheckpointer

_log = logging.getLogger("molmo_jax.train")


class NonFiniteLossError(RuntimeError):
  """The loss or a gradient norm became NaN/Inf; the run stopped before saving that state."""


@dataclasses.dataclass
class RunResult:
  step: int                          # updates applied when the run returned
  stopped_by_signal: bool
  last_metrics: dict[str, float]


# ------------------------------------------------------------------------------------------
# Set-up pieces
# ------------------------------------------------------------------------------------------

def _cluster_hint() -> bool:
  """Environment variables of launchers that start one process per host (or per task)."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize_distributed(dist: Mapping[str, Any]) -> None:
  """jax.distributed.initialize per `config.distributed`, before any device is touched.

  initialize: "true", "false" or "auto" = when a coordinator address is given or a multi-process
  launcher is visible (TPU_WORKER_HOSTNAMES with several hosts, MEGASCALE, SLURM, Open MPI).
  On Cloud TPU VMs started with `gcloud ... --worker=all` set it to "true": JAX then finds the
  coordinator itself. On CPU the cross-process collectives use gloo (or cpu_collectives).
  """
  mode = str(dist.get("initialize", "auto")).lower()
  if mode not in ("auto", "true", "false"):
    raise ValueError(f"distributed.initialize: expected auto, true or false, got {mode!r}")
  address = dist.get("coordinator_address") or None
  if mode == "false" or (mode == "auto" and not address and not _cluster_hint()):
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist.get("cpu_collectives") or "gloo")
  kwargs = {}
  if address:
    kwargs = dict(coordinator_address=address, num_processes=int(dist["num_processes"]),
                  process_id=int(dist["process_id"]))
  jax.distributed.initialize(**kwargs)


class StopRequest(errors.DeferredInterrupt):
  """Turns SIGTERM/SIGINT into a flag the loop polls; a second SIGINT raises KeyboardInterrupt."""

  def agreed(self) -> bool:
    return stop_agreed(self)


def stop_agreed(stop: errors.DeferredInterrupt) -> bool:
  """True on every process when any process was signalled (all must save the same step)."""
  local = stop.received is not None
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


class MetricsLogger:
  """Console, metrics.jsonl and TensorBoard; everything is written by process 0 only."""

  def __init__(self, workdir: Path, log_every: int, tensorboard: bool, total_steps: int = 0,
               is_moe: bool = True, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.log_every = max(int(log_every), 1)
    self.total_steps = int(total_steps)
    self.is_moe = is_moe
    if self.enabled:     # rows of steps the resumed run will replay go (one row per step)
      workdir_lib.trim_metrics(workdir / "metrics.jsonl", resume_step)
    self._jsonl = open(workdir / "metrics.jsonl", "a") if self.enabled else None
    self._writer = None
    self._step_times: list[float] = []      # steps after the first of this (re)start
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        _log.warning("tensorboard=True but tensorboardX is not installed (pip install -e "
                     "'.[tensorboard]'); metrics go to metrics.jsonl only")
      else:
        self._writer = SummaryWriter(str(workdir / "tensorboard"))
        _log.info("TensorBoard events: %s (view: tensorboard --logdir %s)",
                  workdir / "tensorboard", workdir / "tensorboard")

  @property
  def writer(self):
    return self._writer

  def write(self, step: int, metrics: dict[str, float], first_of_run: bool = False) -> None:
    if not self.enabled:
      return
    if not self.is_moe:   # a dense model's router metrics are constant zeros
      metrics = {k: v for k, v in metrics.items() if not k.startswith("moe_")}
    if not first_of_run and "perf/step_time_s" in metrics:
      self._step_times = (self._step_times + [metrics["perf/step_time_s"]])[-50:]
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    if step % self.log_every and step != 1 and step != self.total_steps:
      return
    if self._writer is not None:
      for name, value in metrics.items():
        self._writer.add_scalar(name, value, step)
      self._writer.flush()
    _log.info("%s", self.progress_line(step, metrics))

  def progress_line(self, step: int, metrics: dict[str, float]) -> str:
    """step/total (%), loss, accuracy, samples/s, non-padding tokens/s, s/step, ETA, MFU, LRs."""
    total = self.total_steps
    where = f"step {step}/{total} ({100 * step / total:.1f}%)" if total else f"step {step}"
    parts = [where, f"loss {metrics['loss']:.4f}", f"acc {metrics.get('accuracy', float('nan')):.3f}"]
    if "perf/samples_per_s" in metrics:
      parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s")
    if "perf/tokens_per_s" in metrics:
      parts.append(f"{metrics['perf/tokens_per_s']:.0f} tok/s")
    if "perf/step_time_s" in metrics:
      parts.append(f"{metrics['perf/step_time_s']:.3f} s/step")
    if total and self._step_times and step < total:
      parts.append(f"ETA {format_duration((total - step) * float(np.mean(self._step_times)))}")
    mfu = metrics.get("perf/mfu")
    if mfu is not None:
      parts.append(f"MFU {100 * mfu:.1f}%")
    lrs = " ".join(f"{k.split('/')[1]}={v:.2e}" for k, v in metrics.items()
                   if k.startswith("learning_rate/"))
    if lrs:
      parts.append(f"lr {lrs}")
    return " | ".join(parts)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._writer is not None:
      self._writer.close()


def format_duration(seconds: float) -> str:
  """1h02m, 6m38s, 42s."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PaddingCheck:
  """Warns once when the first batches are mostly padding, with the seq_len that would fit."""

  def __init__(self, seq_len: int, batches: int = 10, threshold: float = 0.5):
    self.seq_len, self.batches, self.threshold = seq_len, batches, threshold
    self._real = self._total = 0
    self._longest = 0
    self._seen = 0
    self.done = jax.process_index() != 0

  def observe(self, local_batch: Mapping[str, np.ndarray]) -> None:
    if self.done:
      return
    ids = np.asarray(local_batch["input_ids"])
    real = ids >= 0
    self._real += int(real.sum())
    self._total += ids.size
    if real.any():
      last = ids.shape[1] - np.argmax(real[:, ::-1], axis=1)   # one past the last real token
      self._longest = max(self._longest, int(last[real.any(axis=1)].max()))
    self._seen += 1
    if self._seen >= self.batches:
      self.done = True
      padding = 1 - self._real / max(self._total, 1)
      if padding > self.threshold:
        suggested = min(self.seq_len, -(-self._longest // 64) * 64)
        _log.warning("the first %d batches are %.0f%% padding: the longest example has %d of "
                     "data.seq_len=%d tokens. A shorter sequence trains faster: "
                     "--config.data.seq_len=%d", self._seen, 100 * padding, self._longest,
                     self.seq_len, suggested)


class Profiler:
  """jax.profiler trace of steps [start, start + num_steps) on process 0 (start <= 0: off)."""

  def __init__(self, workdir: Path, start: int, num_steps: int):
    self.start, self.stop_at = int(start), int(start) + max(int(num_steps), 1)
    self.directory = workdir / "profile"
    self.active = False
    self.enabled = self.start > 0 and jax.process_index() == 0

  def before_step(self, step: int) -> None:
    if self.enabled and not self.active and step == self.start:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after_step(self, step: int, state: Any) -> None:
    if self.active and step + 1 >= self.stop_at:
      self.close(state)

  def close(self, state: Any = None) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      _log.info("profile of steps %d..%d written to %s", self.start, self.stop_at - 1, self.directory)


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Pending:
  step: int
  metrics: Any          # device arrays of the step's metrics
  tokens: int = 0       # non-padding input tokens of the global batch


class _Throughput:
  """Step time from consecutive completions; the first step after (re)start includes compiling."""

  def __init__(self, step_flops: float, samples_per_step: int, num_devices: int, peak: float):
    self.step_flops, self.samples_per_step = step_flops, samples_per_step
    self.num_devices, self.peak = num_devices, peak
    self._last: float | None = None

  def start(self) -> None:
    self._last = time.perf_counter()

  def complete(self, tokens: int) -> dict[str, float]:
    """Metrics of the step that just completed; `tokens`: its non-padding input tokens."""
    now = time.perf_counter()
    elapsed, self._last = now - self._last, now
    return {"perf/step_time_s": elapsed, "perf/samples_per_s": self.samples_per_step / elapsed,
            "perf/tokens_per_s": tokens / elapsed,
            "perf/mfu": flops_lib.mfu(self.step_flops, elapsed, self.num_devices, self.peak)}


def _finite_or_raise(step: int, metrics: dict[str, float]) -> None:
  bad = {k: v for k, v in metrics.items()
         if (k in ("loss", "ce_loss", "z_loss", "update_norm") or k.startswith("grad_norm/"))
         and not math.isfinite(v)}
  if bad:
    raise NonFiniteLossError(f"step {step}: non-finite {bad}; stopping. The last checkpoint on disk "
                             "was written before this step and is intact; lower the learning rate or "
                             "inspect the batch before resuming")


def _peak_flops(config: Mapping[str, Any]) -> float:
  override = float(config.get("peak_flops_per_device") or 0)
  if override > 0:
    return override
  device = jax.devices()[0]
  name, peak = flops_lib.peak_flops_per_device(device.device_kind, device.platform)
  _log.info("MFU against %s peak %.3g FLOP/s per device", name, peak)
  return peak


def _restore_or_init(exp: experiment_lib.Experiment, ckpt: TrainCheckpointer,
                     data_iter) -> step_lib.TrainState:
  config, mesh, abstract = exp.config, exp.mesh, exp.abstract_state
  latest = ckpt.latest_step()
  if latest is not None:
    restored = ckpt.restore(latest, abstract_state={"params": abstract.params,
                                                    "opt_state": abstract.opt_state,
                                                    "rng": abstract.rng})
    if restored["data_iterator_state"] is not None:
      data_iter.set_state(restored["data_iterator_state"])
    _log.info("resumed from step %d of %s", restored["step"], ckpt.directory)
    step = jax.device_put(jnp.asarray(restored["step"], jnp.int32), sharding_lib.replicated(mesh))
    return step_lib.TrainState(step=step, params=restored["params"],
                               opt_state=restored["opt_state"], rng=restored["rng"])
  params = None
  if config.get("init_from"):
    try:     # a model directory or a training workdir (its latest step) ...
      where = locate_model(config.init_from).params_dir
    except FileNotFoundError:   # ... or a checkpoint step / Orbax PyTree directory itself
      where = config.init_from
    if exp.frozen_dtype is None:
      params = restore_params_only(where, abstract.params)
    else:
      # A LoRA run starts from a plain model: restore the base (in its training dtype; an int8
      # base is restored in bfloat16 and quantized by init_state), add fresh adapters (A random,
      # B zero: the model's outputs start unchanged).
      target = step_lib.float_params_target(exp.model, mesh, exp.batch_spec)
      params = restore_params_only(where, lora_lib.base_params(target))
      adapters = lora_lib.init_adapters(exp.model, jax.random.fold_in(
          jax.random.PRNGKey(int(config.seed)), 1), step_lib._init_batch(exp.batch_spec))
      params = lora_lib.combine(params, adapters)
    _log.info("initialised parameters from %s", config.init_from)
  return exp.init_state(params=params)


def configure_jax(config: Any) -> None:
  """Process-wide settings: the persistent compilation cache and Orbax's array saving mode."""
  cache = config.get("compilation_cache_dir") or ""
  if cache:
    # Restarts after a pre-emption then skip compiling the step (minutes for big models).
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if not config.checkpoint.get("replica_parallel", True):
    # Replica-parallel saving slices every replicated array per replica, compiling one slice per
    # distinct shape on the first save: seconds of stall on CPU hosts for many tiny arrays.
    import orbax.checkpoint as ocp
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def train(config: Any, workdir: str | os.PathLike, data_iterator: Any = None,
          stop: errors.DeferredInterrupt | None = None) -> RunResult:
  """Runs (or resumes) the job `config` describes in `workdir`; see the module docstring.

  data_iterator: optional replacement for the configured input pipeline: an iterator of local
    batches (dicts of numpy arrays, [global_batch / process_count, ...]) with get_state() /
    set_state() returning / taking JSON-able dicts, like pipeline.TrainIterator.
  stop: a StopRequest the caller entered already (train.py does so before importing JAX, so a
    SIGTERM during start-up is honoured); by default one is installed before anything compiles.
  """
  with contextlib.ExitStack() as stack:
    if stop is None:
      stop = stack.enter_context(StopRequest())
    return _train(config, workdir, data_iterator, stop, stack)


def _train(config: Any, workdir: str | os.PathLike, data_iterator: Any,
           stop: errors.DeferredInterrupt,
           stack: contextlib.ExitStack) -> RunResult:
  initialize_distributed(config.get("distributed") or {})
  configure_jax(config)
  if jax.process_index() != 0:    # progress is reported by process 0; others only warn
    logging.getLogger("molmo_jax").setLevel(logging.WARNING)
  workdir = Path(os.path.abspath(Path(workdir).expanduser()))
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:    # before anything in the workdir is read or written
    stack.enter_context(workdir_lib.WorkdirLock(workdir))
  exp = experiment_lib.build(config)
  lora_cfg = exp.lora
  if lora_cfg.enabled and jax.process_index() == 0:
    (workdir / WORKDIR_LORA).write_text(lora_cfg.to_json())
  if jax.process_index() == 0:
    _warn_if_total_steps_changed(workdir, exp.total_steps)
    workdir_lib.check_and_record_configs(workdir, exp.model_config.to_json(),
                                         config.to_json_best_effort(indent=2))
  total_steps = exp.total_steps
  step_fn = exp.train_step
  tokenizer = None
  if data_iterator is None:
    tokenizer = exp.tokenizer()
    data_iterator = exp.train_iterator(tokenizer)
  if jax.process_index() == 0:
    _save_tokenizer(workdir, exp, tokenizer)
  ckpt_cfg = config.checkpoint
  ckpt = TrainCheckpointer(workdir / "checkpoints", save_every=int(ckpt_cfg.save_every),
                           keep=int(ckpt_cfg.keep) or None, async_save=bool(ckpt_cfg.async_save))
  logger = MetricsLogger(workdir, config.log_every, bool(config.tensorboard), total_steps,
                         exp.model_config.llm.is_moe, resume_step=ckpt.latest_step() or 0)
  try:
    state = _restore_or_init(exp, ckpt, data_iterator)
    throughput = _Throughput(exp.step_flops(), exp.data_config.global_batch_size,
                             jax.device_count(), _peak_flops(config))
    profiler = Profiler(workdir, config.profile.start_step, config.profile.num_steps)
    preview = _make_preview(exp, config, tokenizer, logger)
    result, state = _run_steps(config, state, step_fn, data_iterator, exp.mesh, ckpt, logger,
                               throughput, profiler, stop, total_steps,
                               PaddingCheck(exp.data_config.seq_len, min(10, total_steps)), preview)
    ckpt.wait_until_finished()
    params = state.params
    if lora_cfg.enabled:
      _save_run_adapters(workdir, state, lora_cfg)
      params = None if lora_cfg.quantized_base else lora_lib.merged_run_params(params, lora_cfg)
    if config.get("export_model", True) and result.last_metrics:   # not when stopped before a step
      if params is None:
        _log.info("int8 LoRA base: no %s/model/ (the run holds no float base); fold the adapters "
                  "into the float base with python -m molmo_jax.lora merge --base %s "
                  "--adapters %s --out DIR", workdir, exp.init_from or "BASE_MODEL_DIR",
                  workdir / "adapters")
      else:
        export_model(workdir, exp.model_config, params, result.step)
    return result
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    logger.close()
    if hasattr(data_iterator, "close"):
      data_iterator.close()


def _warn_if_total_steps_changed(workdir: Path, total_steps: int) -> None:
  """A resumed run with a new total_steps re-times the schedule from the current step on."""
  from molmo_jax.model_dir import checkpoint_steps
  steps = checkpoint_steps(workdir)
  try:
    before = int(json.loads((workdir / "train_config.json").read_text())["total_steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return
  if steps and before != total_steps:
    _log.warning("resuming at step %d with total_steps=%d (the run started with %d): warmup and "
                 "cosine decay are functions of total_steps, so the learning rate from step %d "
                 "on follows the %d-step schedule (it %s)", steps[-1], total_steps, before,
                 steps[-1] + 1, total_steps,
                 "jumps up: the decay is stretched" if total_steps > before
                 else "drops: the decay is compressed")


def _make_preview(exp: experiment_lib.Experiment, config: Any, tokenizer: Any,
                  logger: MetricsLogger) -> Any:
  """The training preview (molmo_jax.training.preview) when config.preview.every > 0."""
  options = config.get("preview") or {}
  if int(options.get("every", 0) or 0) <= 0 or logger.writer is None:
    return None
  if exp.lora is not None and exp.lora.quantized_base:
    _log.warning("no training preview: the Predictor does not run an int8 LoRA base")
    return None
  from molmo_jax.training.preview import TrainingPreview
  try:
    tokenizer = tokenizer or exp.tokenizer()
    return TrainingPreview(exp, tokenizer, logger.writer, int(options["every"]),
                           int(options.get("num_examples", 4)),
                           int(options.get("max_new_tokens", 64)), options.get("source") or None)
  except (ValueError, FileNotFoundError, OSError) as e:
    _log.warning("no training preview: %s", e)
    return None


def _save_tokenizer(workdir: Path, exp: experiment_lib.Experiment, tokenizer: Any) -> None:
  """workdir/tokenizer/: the run's tokenizer files, so that the workdir (and model/) is a model."""
  try:
    location = experiment_lib.tokenizer_location(exp.config.get("tokenizer_dir") or "",
                                                 exp.init_from)
    if not Path(location).is_dir():
      tokenizer = tokenizer or exp.tokenizer()
  except (ValueError, FileNotFoundError) as e:
    _log.warning("no tokenizer saved with the run (%s); predict/eval need one in "
                 "%s/tokenizer/", e, workdir)
    return
  with staged_directory(workdir / TOKENIZER_DIR) as staging:
    if Path(location).is_dir():
      for path in sorted(Path(location).iterdir()):
        if path.is_file():
          shutil.copy2(path, staging / path.name)
    else:   # a built-in tokenizer: its files as a tokenizer directory
      tokenizer.tokenizer.save(str(staging / "tokenizer.json"))
      (staging / "tokenizer_config.json").write_text(json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
           "bos_token": tokenizer.eos_token}, indent=2))


def export_model(workdir: Path, model_cfg: Any, params: Any, step: int) -> Path | None:
  """workdir/model/: the parameters of `step` as a model directory (replacing an older one)."""
  if jax.process_count() > 1:
    # The staged rename is done by one process; a multi-host job keeps the checkpoints, which
    # every loader reads directly (`--checkpoint WORKDIR [--step N]`).
    _log.info("multi-process run: no %s/model/ written; use the workdir itself as the model", workdir)
    return None
  start = time.perf_counter()
  tokenizer = workdir / TOKENIZER_DIR
  out = save_model_checkpoint(workdir / "model", params, model_cfg,
                              tokenizer_dir=tokenizer if tokenizer.is_dir() else None, overwrite=True)
  _log.info("model directory of step %d -> %s (%.1f s)", step, out, time.perf_counter() - start)
  return out


def _save_run_adapters(workdir: Path, state: Any, lora_cfg: lora_lib.LoraConfig) -> None:
  """workdir/adapters: the run's latest adapters alone (lora.json + Orbax tree), for merging."""
  if jax.process_count() > 1:
    _log.info("multi-process run: adapters are not written separately; the exported model "
              "has them merged")
    return
  out = lora_lib.save_adapters(workdir / "adapters", state.params, lora_cfg, overwrite=True)
  _log.info("adapters of step %d written to %s", int(jax.device_get(state.step)), out)


def _run_steps(config, state, step_fn, data_iter: Iterator, mesh, ckpt: TrainCheckpointer,
               logger: MetricsLogger, throughput: _Throughput, profiler: Profiler,
               stop: errors.DeferredInterrupt, total_steps: int, padding: PaddingCheck | None = None,
               preview: Any = None) -> tuple[RunResult, Any]:
  step = int(jax.device_get(state.step))
  first_step = step + 1
  sleep = float(config.get("debug_step_sleep_s") or 0.0)
  pending: _Pending | None = None
  last: dict[str, float] = {}
  started = time.perf_counter()
  if step < total_steps:
    _log.info("training steps %d..%d of %d; compiling the train step...", first_step, total_steps,
              total_steps)

  def report(p: _Pending) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    values.update(throughput.complete(p.tokens))
    _finite_or_raise(p.step, values)
    if p.step == first_step:
      _log.info("compiled the train step and ran step %d in %.1f s", p.step,
                time.perf_counter() - started)
    logger.write(p.step, values, first_of_run=p.step == first_step)
    return values

  throughput.start()
  stopped = stop_agreed(stop)
  if stopped:      # signalled during start-up: no step ran, nothing new to save
    why = signal.Signals(stop.received).name if stop.received else "another process's signal"
    _log.warning("%s before the first step: stopped at step %d; rerun the same command to resume",
                 why, step)
    return RunResult(step=step, stopped_by_signal=True, last_metrics={}), state
  while step < total_steps:
    local = next(data_iter)
    tokens = int(np.count_nonzero(np.asarray(local["input_ids"]) >= 0)) * jax.process_count()
    if padding is not None:
      padding.observe(local)
    batch = step_lib.make_global_batch(local, mesh)
    profiler.before_step(step + 1)
    state, metrics = step_fn(state, batch)
    step += 1
    profiler.after_step(step, state)
    if pending is not None:          # the previous step has finished by now, or nearly
      last = report(pending)
    pending = _Pending(step, metrics, tokens)
    if preview is not None and preview.due(step):
      preview.log(step, state.params)
    if sleep:
      time.sleep(sleep)
    stopped = stop_agreed(stop)
    if stopped or step == total_steps or ckpt.should_save(step):
      last = report(pending)         # a checkpoint is written only after its step checked out
      pending = None
      save_start = time.perf_counter()
      ckpt.save(step, state.params, state.opt_state, state.rng, data_iter.get_state(), force=True)
      _log.info("saved checkpoint %d (%.1f s%s) -> %s", step, time.perf_counter() - save_start,
                ", writing on in the background" if ckpt.async_save else "",
                ckpt.directory / str(step))
    if stopped:
      why = signal.Signals(stop.received).name if stop.received else "another process's signal"
      _log.warning("%s: stopped at step %d with a checkpoint; rerun the same command to resume",
                   why, step)
      break
  profiler.close(state)
  if pending is not None:
    last = report(pending)
  return RunResult(step=step, stopped_by_signal=stopped, last_metrics=last), state
