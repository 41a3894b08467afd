"""The training run: set-up, resume, the step loop, checkpoints, pre-emption, logging.

`train(config, workdir)` runs one job described by an ml_collections config (configs/*.py):

  jax.distributed.initialize (multi-host)       -> mesh (data, fsdp, tensor, expert)
  model config (preset / tiny / init_from's)    -> tokenizer -> data iterator (this process's rows)
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
touched), .lock (one run per workdir; molmo_jax.training.workdir).
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
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax import config as model_config_lib
from molmo_jax import errors
from molmo_jax import sharding as sharding_lib
from molmo_jax.config import MolmoConfig
from molmo_jax.models.molmo import Molmo
from molmo_jax.training import flops as flops_lib
from molmo_jax.training import train_step as step_lib
from molmo_jax.training import workdir as workdir_lib
from molmo_jax.training.checkpoint import TrainCheckpointer, restore_params_only
from molmo_jax.training.optimizer import OptimizerConfig, build_optimizer

_log = logging.getLogger("molmo_jax.train")
BUILTIN_DEMO_TOKENIZER = "builtin:demo"
_MODEL_SECTIONS = ("vision", "connector", "llm", "preprocess")


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


def build_model_config(model: Mapping[str, Any], init_from: str = "") -> MolmoConfig:
  """MolmoConfig from `config.model`: a preset or tiny-<family> name, else init_from's config.json,
  then the overrides in model.{dtype, param_dtype, remat_policy, scan_unroll} and
  model.{llm, vision, ...}."""
  name = model.get("name") or ""
  if name.startswith("tiny-"):
    cfg = model_config_lib.tiny(name[len("tiny-"):])
  elif name:
    cfg = model_config_lib.preset(name)
  elif init_from:
    path = Path(init_from) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"model.name is empty and init_from has no config.json ({path})")
    cfg = MolmoConfig.from_json(path.read_text())
  else:
    raise ValueError("config.model.name: give a preset (e.g. molmo-7b-d), tiny-<family>, or set "
                     "init_from to a converted model directory")
  top = {k: model[k] for k in ("dtype", "param_dtype", "remat_policy", "scan_unroll") if model.get(k)}
  for section in _MODEL_SECTIONS:
    overrides = dict(model.get(section) or {})
    if not overrides:
      continue
    current = getattr(cfg, section)
    known = {f.name for f in dataclasses.fields(current)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"config.model.{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    top[section] = dataclasses.replace(current, **overrides)
  return cfg.replace(**top)


def load_tokenizer(tokenizer_dir: str, init_from: str, model_cfg: MolmoConfig):
  from molmo_jax.preprocess.tokens import MolmoTokenizer
  if tokenizer_dir == BUILTIN_DEMO_TOKENIZER:
    from molmo_jax.data.demo_tokenizer import EOS_TOKEN, build_demo_tokenizer
    return MolmoTokenizer(build_demo_tokenizer(), model_cfg.llm.vocab_size, EOS_TOKEN)
  directory = tokenizer_dir or (str(Path(init_from) / "tokenizer") if init_from else "")
  if not directory:
    raise ValueError("config.tokenizer_dir: set it to a directory with tokenizer.json (or "
                     f"{BUILTIN_DEMO_TOKENIZER!r}), or use init_from with a tokenizer/ inside")
  return MolmoTokenizer.from_checkpoint(directory, model_cfg.llm.vocab_size)


def data_config(data: Mapping[str, Any]):
  """DataConfig from `config.data`; `sources` may be {name: source} (CLI-overridable) or a list."""
  from molmo_jax.data.pipeline import DataConfig
  data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
  sources = data.get("sources") or {}
  if isinstance(sources, Mapping):
    sources = [{"name": name, **dict(source)} for name, source in sources.items()]
  data["sources"] = sources
  return DataConfig.from_dict(data)


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

  def __init__(self, workdir: Path, log_every: int, tensorboard: bool, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.log_every = max(int(log_every), 1)
    if self.enabled:     # rows of steps the resumed run will replay go (one row per step)
      workdir_lib.trim_metrics(workdir / "metrics.jsonl", resume_step)
    self._jsonl = open(workdir / "metrics.jsonl", "a") if self.enabled else None
    self._writer = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    if step % self.log_every and step != 1:
      return
    if self._writer is not None:
      for name, value in metrics.items():
        self._writer.add_scalar(name, value, step)
      self._writer.flush()
    mfu = metrics.get("perf/mfu")
    lrs = " ".join(f"{k.split('/')[1]}={v:.2e}" for k, v in metrics.items() if k.startswith("learning_rate/"))
    _log.info("step %d | loss %.4f | acc %.3f | %.0f tok/s | %.3f s/step | MFU %s | lr %s",
              step, metrics["loss"], metrics.get("accuracy", float("nan")),
              metrics.get("perf/tokens_per_s", float("nan")), metrics.get("perf/step_time_s", float("nan")),
              "n/a" if mfu is None else f"{100 * mfu:.1f}%", lrs)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._writer is not None:
      self._writer.close()


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


class _Throughput:
  """Step time from consecutive completions; the first step after (re)start includes compiling."""

  def __init__(self, step_flops: float, tokens_per_step: int, num_devices: int, peak: float):
    self.step_flops, self.tokens_per_step = step_flops, tokens_per_step
    self.num_devices, self.peak = num_devices, peak
    self._last: float | None = None

  def start(self) -> None:
    self._last = time.perf_counter()

  def complete(self) -> dict[str, float]:
    now = time.perf_counter()
    elapsed, self._last = now - self._last, now
    return {"perf/step_time_s": elapsed, "perf/tokens_per_s": self.tokens_per_step / elapsed,
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


def _restore_or_init(config, ckpt: TrainCheckpointer, model, optimizer, mesh, spec, abstract,
                     data_iter) -> step_lib.TrainState:
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
  rng = jax.random.PRNGKey(int(config.seed))
  params = None
  if config.get("init_from"):
    params = restore_params_only(config.init_from, abstract.params)
    _log.info("initialised parameters from %s", config.init_from)
  return step_lib.init_train_state(model, optimizer, mesh, spec, rng, params=params)


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
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:    # before anything in the workdir is read or written
    stack.enter_context(workdir_lib.WorkdirLock(workdir))
  init_from = config.get("init_from") or ""
  model_cfg = build_model_config(config.model, init_from)
  data_cfg = data_config(config.data)
  max_crops = data_cfg.max_crops or model_cfg.preprocess.max_crops
  if jax.process_index() == 0:
    workdir_lib.check_and_record_configs(workdir, model_cfg.to_json(),
                                         config.to_json_best_effort(indent=2))

  mesh = sharding_lib.make_mesh(**dict(config.mesh))
  model = Molmo(model_cfg)
  spec = step_lib.batch_spec(model_cfg, data_cfg.global_batch_size, data_cfg.seq_len, max_crops)
  step_cfg = step_lib.StepConfig(micro_batches=int(config.micro_batches),
                                 z_loss_weight=float(config.z_loss_weight))
  total_steps = int(config.total_steps)
  optimizer = build_optimizer(
      OptimizerConfig.from_mapping({**config.optimizer.to_dict(), "total_steps": total_steps}),
      step_lib.abstract_params(model, spec))
  abstract, shardings = step_lib.abstract_train_state(model, optimizer, mesh, spec)
  step_fn = step_lib.make_train_step(model, optimizer, mesh, shardings, spec, step_cfg)

  if data_iterator is None:
    from molmo_jax.data.pipeline import make_train_iterator
    tokenizer = load_tokenizer(config.get("tokenizer_dir") or "", init_from, model_cfg)
    data_iterator = make_train_iterator(data_cfg, model_cfg, tokenizer,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  ckpt_cfg = config.checkpoint
  ckpt = TrainCheckpointer(workdir / "checkpoints", save_every=int(ckpt_cfg.save_every),
                           keep=int(ckpt_cfg.keep) or None, async_save=bool(ckpt_cfg.async_save))
  logger = MetricsLogger(workdir, config.log_every, bool(config.tensorboard),
                         resume_step=ckpt.latest_step() or 0)
  try:
    state = _restore_or_init(config, ckpt, model, optimizer, mesh, spec, abstract, data_iterator)
    step_flops = flops_lib.train_step_flops(model_cfg, data_cfg.global_batch_size,
                                            data_cfg.seq_len, max_crops + 1).train
    throughput = _Throughput(step_flops, data_cfg.global_batch_size * data_cfg.seq_len,
                             jax.device_count(), _peak_flops(config))
    profiler = Profiler(workdir, config.profile.start_step, config.profile.num_steps)
    return _run_steps(config, state, step_fn, data_iterator, mesh, ckpt, logger, throughput,
                      profiler, stop, total_steps)
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    logger.close()
    if hasattr(data_iterator, "close"):
      data_iterator.close()


def _run_steps(config, state, step_fn, data_iter: Iterator, mesh, ckpt: TrainCheckpointer,
               logger: MetricsLogger, throughput: _Throughput, profiler: Profiler,
               stop: errors.DeferredInterrupt, total_steps: int) -> RunResult:
  step = int(jax.device_get(state.step))
  sleep = float(config.get("debug_step_sleep_s") or 0.0)
  pending: _Pending | None = None
  last: dict[str, float] = {}

  def report(p: _Pending) -> dict[str, float]:
    values = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    values.update(throughput.complete())
    _finite_or_raise(p.step, values)
    logger.write(p.step, values)
    return values

  throughput.start()
  stopped = stop_agreed(stop)
  if stopped:      # signalled during start-up: no step ran, nothing new to save
    why = signal.Signals(stop.received).name if stop.received else "another process's signal"
    _log.warning("%s before the first step: stopped at step %d; rerun the same command to resume",
                 why, step)
    return RunResult(step=step, stopped_by_signal=True, last_metrics={})
  while step < total_steps:
    batch = step_lib.make_global_batch(next(data_iter), mesh)
    profiler.before_step(step + 1)
    state, metrics = step_fn(state, batch)
    step += 1
    profiler.after_step(step, state)
    if pending is not None:          # the previous step has finished by now, or nearly
      last = report(pending)
    pending = _Pending(step, metrics)
    if sleep:
      time.sleep(sleep)
    stopped = stop_agreed(stop)
    if stopped or step == total_steps or ckpt.should_save(step):
      last = report(pending)         # a checkpoint is written only after its step checked out
      pending = None
      ckpt.save(step, state.params, state.opt_state, state.rng, data_iter.get_state(), force=True)
    if stopped:
      why = signal.Signals(stop.received).name if stop.received else "another process's signal"
      _log.warning("%s: stopped at step %d with a checkpoint; rerun the same command to resume",
                   why, step)
      break
  profiler.close(state)
  if pending is not None:
    last = report(pending)
  return RunResult(step=step, stopped_by_signal=stopped, last_metrics=last)
