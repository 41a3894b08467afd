"""Checkpoints: train-state round trip, sharded restore, keep-last-K, SIGKILL, model dirs."""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from molmo_jax import config as config_lib
from molmo_jax import model_dir as model_dir_lib
from molmo_jax.training import checkpoint as ckpt_lib
from molmo_jax.training import optimizer as opt_lib


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "vision": {"patch_embed": {"kernel": f(12, 8)}},
      "connector": {"pad_embed": f(2, 16)},
      "llm": {"embedding": {"pretrained": f(16, 8), "new": f(4, 8)},
              "blocks": {"mlp": {"gate": {"kernel": f(2, 8, 16)}}},
              "lm_head": {"kernel": f(8, 16)}},
  }


def _optimizer(params):
  sched = opt_lib.ComponentSchedule(1e-3, 2)
  return opt_lib.build_optimizer(
      opt_lib.OptimizerConfig(total_steps=20, connector=sched, vit=sched, llm=sched), params)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _spec_for(shape):
  # Shard the leading axis over fsdp and the next over data when they divide; else replicate.
  spec = [None] * len(shape)
  if len(shape) >= 1 and shape[0] % 4 == 0:
    spec[0] = "fsdp"
  if len(shape) >= 2 and shape[1] % 2 == 0:
    spec[1] = "data"
  return P(*spec)


def test_train_state_round_trip_and_sharded_restore_on_2x4_mesh(tmp_path):
  params = _params()
  opt = _optimizer(params)
  state = opt.tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(opt.tx.update)
  _, state = update(grads, state, params)      # non-trivial moments and counts
  rng = jax.random.key(42)
  data_state = {"epoch": 1, "position": [3, 7], "seed": "95818"}

  with ckpt_lib.TrainCheckpointer(tmp_path / "ckpt", save_every=5) as ckpt:
    assert ckpt.save(5, params, state, rng, data_state)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 5

    plain = ckpt.restore()
    _assert_trees_equal(plain["params"], params)
    assert plain["step"] == 5 and plain["data_iterator_state"] == data_state
    np.testing.assert_array_equal(jax.random.key_data(plain["rng"]), jax.random.key_data(rng))

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    shard = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=NamedSharding(mesh, _spec_for(x.shape)))
    abstract = {"params": jax.tree.map(shard, params),
                "opt_state": jax.tree.map(shard, jax.eval_shape(opt.tx.init, params)),
                "rng": jax.ShapeDtypeStruct((), rng.dtype, sharding=NamedSharding(mesh, P()))}
    sharded = ckpt.restore(abstract_state=abstract)
  _assert_trees_equal(sharded["params"], params)
  _assert_trees_equal(sharded["opt_state"], state)
  kernel = sharded["params"]["llm"]["lm_head"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P("fsdp", "data"))
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (2, 8)
  moment = sharded["opt_state"][1].inner_states["llm"].inner_state[0].mu["llm"]["lm_head"]["kernel"]
  assert moment.sharding == kernel.sharding
  assert sharded["rng"].sharding == NamedSharding(mesh, P())
  # The restored state has optax's own structure, so training continues from it.
  updates, _ = update(grads, sharded["opt_state"], sharded["params"])
  expected, _ = update(grads, state, params)
  for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_save_interval_forced_final_save_and_keep_last_k(tmp_path):
  params = _params()
  state = _optimizer(params).tx.init(params)
  with ckpt_lib.TrainCheckpointer(tmp_path, save_every=2, keep=2) as ckpt:
    started = [step for step in range(1, 10) if ckpt.save(step, params, state)]
    assert started == [2, 4, 6, 8]
    assert ckpt.save(9, params, state, force=True)           # the end of training
    assert not ckpt.save(9, params, state, force=True)       # never overwrites a step
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [8, 9] and ckpt.latest_step() == 9
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["8", "9"]
  with ckpt_lib.TrainCheckpointer(tmp_path, save_every=2, keep=2) as again:
    assert again.restore(8)["step"] == 8 and again.restore()["rng"] is None
    with pytest.raises(FileNotFoundError, match="step 4"):
      again.restore(4)


def test_bad_inputs_are_reported_before_saving(tmp_path):
  params = _params()
  with ckpt_lib.TrainCheckpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(ValueError, match="data_iterator_state"):
      ckpt.save(1, params, {}, data_iterator_state={"buf": np.zeros(3)})
    with pytest.raises(ValueError, match="data_iterator_state"):
      ckpt.save(1, params, {}, data_iterator_state={"pos": (1, 2)})
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore()
  with pytest.raises(ValueError, match="save_every"):
    ckpt_lib.TrainCheckpointer(tmp_path, save_every=0)


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from orbax.checkpoint._src.path import async_path
    from molmo_jax.training.checkpoint import TrainCheckpointer

    root, mode = sys.argv[1], sys.argv[2]
    ckpt = TrainCheckpointer(root, save_every=1, keep=5)
    small = {"llm": {"lm_head": {"kernel": jnp.full((4, 4), 1.0)}}}
    ckpt.save(1, small, {"mu": small}, jax.random.key(1), {"pos": 1})
    ckpt.wait_until_finished()
    if mode == "at_commit":
      # Stall orbax's final rename, so the kill lands when every byte is written but the step
      # is not committed: the most tempting moment to mistake a checkpoint for complete.
      real_rename = async_path.rename
      async def stalled_rename(src, dst):
        if str(dst).endswith("/2"):          # the step directory, not one of its items
          print("COMMITTING", flush=True)
          time.sleep(600)
        return await real_rename(src, dst)
      async_path.rename = stalled_rename
    noise = np.random.default_rng(2).standard_normal((2048, 2048), dtype=np.float32)
    big = {"llm": {"lm_head": {"kernel": jnp.asarray(noise)}}}   # 16 MiB per item, incompressible
    ckpt.save(2, big, {"mu": big}, jax.random.key(2), {"pos": 2})
    print("SAVING", flush=True)
    ckpt.wait_until_finished()
    print("DONE", flush=True)
    time.sleep(600)
""")


def _run_child_and_kill(root: Path, mode: str, kill_after: str) -> list[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  seen = []
  try:
    deadline = time.monotonic() + 120
    while kill_after not in seen:
      ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
      line = proc.stdout.readline() if ready else ""
      if not line:
        raise AssertionError(f"child ended or timed out before {kill_after!r}; saw {seen}")
      seen.append(line.strip())
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  return seen


@pytest.mark.parametrize("mode, kill_after", [("at_commit", "COMMITTING"), ("writing", "SAVING")])
def test_save_killed_by_sigkill_is_never_restored(tmp_path, mode, kill_after):
  seen = _run_child_and_kill(tmp_path, mode, kill_after)
  leftovers = [p.name for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]
  if mode == "at_commit":
    assert leftovers and (tmp_path / leftovers[0] / "params").is_dir()   # data really written
    assert not (tmp_path / "2").exists()
  with ckpt_lib.TrainCheckpointer(tmp_path, save_every=1, keep=5) as ckpt:
    if mode == "at_commit" or "DONE" not in seen:
      # "writing" races the kill against the write; whichever step is latest must be whole.
      assert ckpt.latest_step() in ((1,) if mode == "at_commit" else (1, 2))
    restored = ckpt.restore()
    expected = (np.full((4, 4), 1.0, np.float32) if restored["step"] == 1 else
                np.random.default_rng(2).standard_normal((2048, 2048), dtype=np.float32))
    assert restored["data_iterator_state"] == {"pos": restored["step"]}
    np.testing.assert_array_equal(restored["params"]["llm"]["lm_head"]["kernel"], expected)
    np.testing.assert_array_equal(restored["opt_state"]["mu"]["llm"]["lm_head"]["kernel"], expected)
    if ckpt.latest_step() == 1:       # the interrupted step can be saved again
      assert ckpt.save(2, {"a": jnp.ones(3)}, {"b": jnp.zeros(2)})
      ckpt.wait_until_finished()
      assert ckpt.restore(2)["step"] == 2
  # The manager removes the leftovers (asynchronously, finished before its first save).
  assert not [p for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]


# ------------------------------------------------------------------------------------------
# Model directories
# ------------------------------------------------------------------------------------------

def _tokenizer_dir(tmp_path):
  tok = tmp_path / "tok_src"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"model": "tiny"}')
  return tok


def test_model_directory_round_trip_with_sharded_load(tmp_path):
  params, cfg = _params(1), config_lib.tiny("qwen2")
  out = model_dir_lib.save_model_checkpoint(tmp_path / "model", params, cfg.to_json(),
                                            tokenizer_dir=_tokenizer_dir(tmp_path))
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "params", "tokenizer"]
  loaded = model_dir_lib.load_model_checkpoint(out)
  _assert_trees_equal(loaded.params, params)
  assert loaded.config == cfg
  assert (loaded.tokenizer_dir / "tokenizer.json").read_text() == '{"model": "tiny"}'

  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, jnp.bfloat16, sharding=NamedSharding(mesh, _spec_for(x.shape))), params)
  sharded = model_dir_lib.load_model_checkpoint(out, expected_params=expected).params
  head = sharded["llm"]["lm_head"]["kernel"]
  assert head.dtype == jnp.bfloat16 and head.sharding.spec == P("fsdp", "data")
  np.testing.assert_allclose(np.asarray(head, np.float32), params["llm"]["lm_head"]["kernel"],
                             rtol=1e-2)
  # A training run can start from it.
  _assert_trees_equal(model_dir_lib.restore_params_only(out), params)


def test_model_directory_load_errors_are_clear(tmp_path):
  params = _params()
  out = model_dir_lib.save_model_checkpoint(tmp_path / "m", params, config_lib.tiny("olmo"))
  wrong = jax.tree.map(lambda x: x, params)
  wrong["llm"]["lm_head"]["kernel"] = jnp.zeros((8, 17))
  del wrong["vision"]
  wrong["connector"]["extra"] = jnp.zeros(3)
  with pytest.raises(ValueError) as err:
    model_dir_lib.load_model_checkpoint(out, expected_params=wrong)
  message = str(err.value)
  assert "llm/lm_head/kernel: stored (8, 16), expected (8, 17)" in message
  assert "missing: connector/extra" in message
  assert "unexpected: vision/patch_embed/kernel" in message

  text = json.loads((out / "config.json").read_text())
  text["llm"]["rope_scaling"] = 2.0
  (out / "config.json").write_text(json.dumps(text))
  with pytest.raises(ValueError, match="rope_scaling"):
    model_dir_lib.load_model_checkpoint(out)
  (out / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    model_dir_lib.load_model_checkpoint(out)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    model_dir_lib.load_model_checkpoint(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="unknown field"):
    model_dir_lib.save_model_checkpoint(tmp_path / "bad", params, '{"no_such_field": 1}')
  assert not (tmp_path / "bad").exists()


def test_failed_model_write_leaves_nothing_and_overwrite_is_atomic(tmp_path, monkeypatch):
  params, cfg = _params(), config_lib.tiny("qwen2")
  target = tmp_path / "model"

  def broken_copy(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(model_dir_lib.shutil, "copytree", broken_copy)       # fails after params are written
    with pytest.raises(OSError, match="disk full"):
      model_dir_lib.save_model_checkpoint(target, params, cfg, tokenizer_dir=_tokenizer_dir(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tok_src"]

  model_dir_lib.save_model_checkpoint(target, params, cfg)
  with pytest.raises(FileExistsError):
    model_dir_lib.save_model_checkpoint(target, _params(5), cfg)
  with monkeypatch.context() as m:
    m.setattr(model_dir_lib.shutil, "copytree", broken_copy)
    with pytest.raises(OSError):
      model_dir_lib.save_model_checkpoint(target, _params(5), cfg, tokenizer_dir=tmp_path / "tok_src",
                                          overwrite=True)
  _assert_trees_equal(model_dir_lib.load_model_checkpoint(target).params, params)   # old one intact
  model_dir_lib.save_model_checkpoint(target, _params(5), cfg, overwrite=True)
  _assert_trees_equal(model_dir_lib.load_model_checkpoint(target).params, _params(5))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tok_src"]


def test_restore_params_only_from_a_training_step(tmp_path):
  params = _params(3)
  with ckpt_lib.TrainCheckpointer(tmp_path / "run", save_every=1) as ckpt:
    ckpt.save(7, params, _optimizer(params).tx.init(params))
  _assert_trees_equal(model_dir_lib.restore_params_only(tmp_path / "run" / "7"), params)
  with pytest.raises(FileNotFoundError, match="no Orbax parameter checkpoint"):
    model_dir_lib.restore_params_only(tmp_path / "run")


def test_model_directory_relative_paths(tmp_path, monkeypatch):
  """Orbax refuses relative paths; every model-directory function resolves them first."""
  params, cfg = _params(2), config_lib.tiny("qwen2")
  _tokenizer_dir(tmp_path)
  monkeypatch.chdir(tmp_path)
  out = model_dir_lib.save_model_checkpoint("models/m", params, cfg, tokenizer_dir="tok_src")
  assert out == tmp_path / "models" / "m"
  loaded = model_dir_lib.load_model_checkpoint("models/m")
  _assert_trees_equal(loaded.params, params)
  assert loaded.tokenizer_dir == tmp_path / "models" / "m" / "tokenizer"
  _assert_trees_equal(model_dir_lib.restore_params_only("models/m"), params)
  _assert_trees_equal(model_dir_lib.restore_params_only("./models/../models/m/params"), params)
