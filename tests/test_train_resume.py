"""train.py as a job: exact resume after SIGTERM and SIGKILL, two processes, NaN stop, the CLI.

Each run is a real `python train.py --config configs/tiny_test.py` subprocess on 8 simulated CPU
devices (the two-process run: 2 x 4 with jax.distributed and gloo), reading the synthetic data
through the grain pipeline. All runs share a persistent compilation cache, so only the first run
of each program compiles.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train as train_cli  # noqa: E402  (the repository's train.py)
from molmo_jax import config_cli, errors, experiment  # noqa: E402
from molmo_jax.training import loop  # noqa: E402
from molmo_jax.model_dir import load_model_checkpoint, path_name, restore_params_only  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOTAL = 8
RUN_TIMEOUT = 600


def launch(workdir: Path, cache: Path, *overrides: str, devices: int = 8) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "train.py", "--config", "configs/tiny_test.py", "--workdir", str(workdir),
         f"--config.total_steps={TOTAL}", "--config.checkpoint.save_every=4",
         f"--config.compilation_cache_dir={cache}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def finish(proc: subprocess.Popen, expect_rc: int = 0) -> str:
  out, _ = proc.communicate(timeout=RUN_TIMEOUT)
  assert proc.returncode == expect_rc, out[-4000:]
  return out


def losses(workdir: Path) -> dict[int, float]:
  """step -> loss from metrics.jsonl; a step logged twice (re-run after a kill) keeps the last."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["loss"]
  return out


def complete_steps(workdir: Path) -> list[int]:
  root = workdir / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def final_params(workdir: Path, like=None):
  """Parameters of the last checkpoint; `like` (a restored tree) gives the target layout for a
  checkpoint written by another process topology."""
  target = None
  if like is not None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  return jax.device_get(restore_params_only(workdir / "checkpoints" / str(TOTAL), target))


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT,
             poll: float = 0.05):
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited ({proc.returncode}) before {what}:\n"
                           + proc.stdout.read()[-4000:])
    time.sleep(poll)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


def logged_step(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  return max(losses(workdir), default=0) if path.is_file() and path.stat().st_size else 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
  """The uninterrupted run every other run is compared with."""
  workdir = tmp_path_factory.mktemp("straight")
  finish(launch(workdir, cache))
  assert complete_steps(workdir) == [4, 8]
  return workdir


def test_sigterm_then_restart_matches_straight_run(straight, cache, tmp_path):
  proc = launch(tmp_path, cache, "--config.debug_step_sleep_s=0.4")
  wait_for(lambda: logged_step(tmp_path) >= 2, proc, "step 2")
  proc.send_signal(signal.SIGTERM)
  out = finish(proc)
  assert "stopped by signal" in out
  stopped_at = complete_steps(tmp_path)[-1]
  assert 2 <= stopped_at < TOTAL, complete_steps(tmp_path)      # saved off the save interval

  out = finish(launch(tmp_path, cache))
  assert f"resumed from step {stopped_at}" in out
  expected = losses(straight)
  assert sorted(expected) == list(range(1, TOTAL + 1))
  assert losses(tmp_path) == expected                             # bit-identical floats
  resumed, reference = final_params(tmp_path), final_params(straight)
  assert jax.tree.all(jax.tree.map(np.array_equal, resumed, reference))


LORA = ("--config.lora.rank=4", "--config.lora.train=('connector',)")


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_lora_run_resumes_exactly_and_writes_its_adapters(cache, tmp_path_factory, base_dtype):
  from molmo_jax import lora
  overrides = (*LORA, f"--config.lora.base_dtype={base_dtype}")
  straight = tmp_path_factory.mktemp("lora_straight")
  finish(launch(straight, cache, *overrides))
  resumed = tmp_path_factory.mktemp("lora_resumed")
  proc = launch(resumed, cache, *overrides, "--config.debug_step_sleep_s=0.4")
  wait_for(lambda: logged_step(resumed) >= 2, proc, "step 2")
  proc.send_signal(signal.SIGTERM)
  assert "stopped by signal" in finish(proc)
  stopped_at = complete_steps(resumed)[-1]
  assert 2 <= stopped_at < TOTAL
  assert f"resumed from step {stopped_at}" in finish(launch(resumed, cache, *overrides))
  assert losses(resumed) == losses(straight)                      # bit-identical floats
  final = final_params(straight)
  assert jax.tree.all(jax.tree.map(np.array_equal, final_params(resumed), final))
  # The adapters alone, as trained: lora_a/lora_b and the connector, nothing else of the LLM.
  tree, cfg = lora.load_adapters(straight / "adapters")
  assert cfg.rank == 4 and json.loads((straight / "lora.json").read_text())["rank"] == 4
  expected = lora.adapter_params(final, cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(tree), expected))
  assert "kernel" not in tree["llm"]["blocks"]["mlp"]["up"]
  if base_dtype == "int8":      # the checkpoints hold the int8 base; no merged model/ is written
    assert final["llm"]["blocks"]["mlp"]["up"]["kernel"]["qvalue"].dtype == np.int8
    assert not (straight / "model").exists() and (straight / "adapters").is_dir()
    # Loading the workdir as a model says how to get one, in one line.
    with pytest.raises(errors.UserError, match="int8 base.*molmo_jax.lora merge --base"):
      load_model_checkpoint(straight)
  else:
    # The workdir loads as a model: its latest step with the adapters folded in, as model/.
    from molmo_jax.predictor import Predictor
    from_step = Predictor.from_checkpoint(straight).params
    from_model = Predictor.from_checkpoint(straight / "model").params
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(from_step)[0]]
    assert names and not any(n.endswith(("lora_a", "lora_b")) for n in names)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_step, from_model))
    base_only = lora.base_params(final)
    assert not np.array_equal(from_step["llm"]["blocks"]["mlp"]["up"]["kernel"],
                              base_only["llm"]["blocks"]["mlp"]["up"]["kernel"])


def test_sigkill_during_async_save_resumes_from_last_complete(straight, cache, tmp_path):
  proc = launch(tmp_path, cache, "--config.checkpoint.save_every=1",
                "--config.debug_step_sleep_s=0.3")
  root = tmp_path / "checkpoints"

  def save_in_flight():
    if not root.is_dir() or not complete_steps(tmp_path):
      return None      # let one save complete first
    partial = [p.name for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name]
    return partial or None

  partial = wait_for(save_in_flight, proc, "an in-flight save", poll=0.002)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed_step = int(partial[0].split(".")[0])
  survivors = complete_steps(tmp_path)
  if killed_step not in survivors:      # else the save won the race against the kill
    # One async save runs at a time, so the step before the killed one is complete.
    assert survivors[-1] == killed_step - 1, (partial, survivors)

  out = finish(launch(tmp_path, cache))
  assert f"resumed from step {survivors[-1]}" in out
  assert not [p for p in root.iterdir() if "orbax-checkpoint-tmp" in p.name]
  assert losses(tmp_path) == losses(straight)
  assert jax.tree.all(jax.tree.map(np.array_equal, final_params(tmp_path), final_params(straight)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow       # two processes compile in parallel on the CPU cores: about a minute
def test_two_processes_match_one_process(straight, cache, tmp_path):
  port = _free_port()
  procs = [launch(tmp_path, cache, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                  devices=4) for i in range(2)]
  outs = [finish(p) for p in procs]
  assert "finished at step 8" in outs[0]
  two, one = losses(tmp_path), losses(straight)
  assert sorted(two) == sorted(one)
  # Same global batch, rows in another order (process p reads stream positions p, p+2, ...):
  # equal up to the order of fp32 sums.
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=0, atol=1e-5)
  reference = final_params(straight)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       final_params(tmp_path, like=reference), reference)
  assert max(jax.tree.leaves(diffs)) <= 1e-4


# ------------------------------------------------------------------------------------------
# In-process: start from a converted model, NaN stop
# ------------------------------------------------------------------------------------------

class PoisonedBatches:
  """Fixed random batches; the batch of step `poison_step` carries NaN pixels."""

  def __init__(self, cfg, batch: int, length: int, poison_step: int):
    from test_train_step import make_batch
    self.make = lambda i: make_batch(cfg, seed=i, batch=batch, length=length)
    self.poison_step, self.index = poison_step, 0

  def __next__(self):
    batch = self.make(self.index)
    self.index += 1
    if self.index == self.poison_step:
      batch["images"][:, 0] = np.nan
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def converted_model_dir(directory: Path, cfg) -> dict:
  """A model directory as the converter writes it, with random (finite) weights."""
  from molmo_jax.models.molmo import Molmo
  from molmo_jax.training import train_step as ts
  from molmo_jax.model_dir import save_model_checkpoint
  rng = np.random.default_rng(7)
  shapes = ts.abstract_params(Molmo(cfg), ts.batch_spec(cfg, 1, 8))
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
                       else (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  save_model_checkpoint(directory, params, cfg)
  return params


def test_init_from_model_dir_and_nan_stop_keeps_last_good_checkpoint(tmp_path):
  config = experiment.load_recipe(str(REPO / "configs/tiny_test.py"))
  cfg = experiment.build_model_config(config.model)
  start = converted_model_dir(tmp_path / "model", cfg)
  config.model.name = ""                  # as finetune_custom: the architecture comes from init_from
  config.model.llm.update(vocab_size=None, embedding_size=None)
  config.init_from = str(tmp_path / "model")
  config.total_steps = 10
  config.data.seq_len = 32
  config.checkpoint.save_every = 2
  config.tensorboard = True
  config.profile.update(dict(start_step=2, num_steps=1))
  batches = PoisonedBatches(cfg, config.data.global_batch_size, 32, poison_step=5)
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteLossError, match="step 5"):
    loop.train(config, workdir, data_iterator=batches)
  assert complete_steps(workdir) == [2, 4]
  assert sorted(losses(workdir)) == [1, 2, 3, 4]
  restored = jax.device_get(restore_params_only(workdir / "checkpoints" / "4"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
  # The frozen token table still holds the converted model's rows: training started from them.
  frozen = restored["llm"]["embedding"]["pretrained"]
  assert np.array_equal(frozen, start["llm"]["embedding"]["pretrained"])
  assert not np.array_equal(restored["llm"]["lm_head"], start["llm"]["lm_head"])
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert [p for p in (workdir / "profile").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _parse(*args):
  """train.py's flags parsed in-process -> (config, workdir)."""
  config_cli.parse(["train.py", *args], "train.py", train_cli.__doc__,
                   [train_cli.CONFIG, train_cli.WORKDIR], train_cli.FLAGS)
  return train_cli.CONFIG.value, train_cli.WORKDIR.value


def test_cli_overrides_follow_field_types(tmp_path):
  config, workdir = _parse(
      "--config", f"{REPO}/configs/tiny_test.py:olmoe", "--workdir", str(tmp_path),
      "--config.total_steps=5", "--config.optimizer.llm.learning_rate=2e-4",
      "--config.tensorboard=true", "--config.model.dtype", "bfloat16",
      "--config.data.max_crops=2", "--config.model.llm.residual_dropout=0.1",
      "--config.data.sources.shapes.options.num_examples=32", "--config.plugins=('a', 'b')")
  assert workdir == str(tmp_path)
  assert config.total_steps == 5 and config.optimizer.llm.learning_rate == 2e-4
  assert config.tensorboard is True and config.model.dtype == "bfloat16"
  assert config.data.max_crops == 2 and config.model.llm.residual_dropout == 0.1
  assert config.model.name == "tiny-olmoe" and config.data.sources.shapes.options.num_examples == 32
  assert config.plugins == ("a", "b")
  assert experiment.build_model_config(config.model).llm.residual_dropout == 0.1


@pytest.mark.parametrize("args,message", [
    (["--config.total_steps=five"], "invalid literal for int"),
    (["--config.optimizer.lr=1"], "no such config field 'lr'"),
    (["--config.total_stepz=3"], "no such config field 'total_stepz' \\(did you mean 'total_steps'"),
    (["--config.tensorboard=maybe"], "tensorboard"),
    (["--config.nosuch.x=1"], "no such config field 'nosuch'"),
    (["--bogus"], "bogus"),
])
def test_cli_rejects_bad_overrides(tmp_path, args, message):
  with pytest.raises(config_cli.UsageError, match=message):
    _parse("--config", f"{REPO}/configs/tiny_test.py", "--workdir", str(tmp_path), *args)


def test_cli_usage_error_exits_2(capsys):
  assert train_cli.main(["--config", f"{REPO}/configs/tiny_test.py"]) == 2
  assert "--workdir" in capsys.readouterr().err
  assert train_cli.main(["--config", f"{REPO}/configs/tiny_test.py", "--workdir", "w",
                         "--config.total_stepz=3"]) == 2
  assert "total_stepz" in capsys.readouterr().err
