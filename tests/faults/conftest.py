"""Shared pieces of the fault suite (tests/faults/): one tiny model directory and one release
directory for the whole session, tool runners, and the assertions every fault test makes.

Every fault test asserts (docs/reliability.md):
  * the exit code of the errors.py table;
  * the first line of stderr (after timestamped progress-log lines, which some tools print before
    they reach the failing input) is `error: ...` and names the input;
  * no traceback without --debug;
  * no file outside the intended output changed (hash of the source trees before and after).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Progress output a tool may print before it reaches the failing input: timestamped log lines
# (train.py) and eval.py's "<checkpoint>: <model>, data-parallel over N device(s)" banner.
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) "
                       r"|\S.*: \S+, data-parallel over \d+ device)")


def tree_hash(*roots: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
  """{relative path: sha256} of every file under the roots (names in `exclude` skipped)."""
  out = {}
  for root in roots:
    root = Path(root)
    if root.is_file():
      out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
      continue
    for path in sorted(root.rglob("*")):
      if path.is_file() and path.name not in exclude:
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def error_line(stderr: str) -> str:
  """The first stderr line that is not a progress-log line; it must be the error."""
  lines = [line for line in stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert lines, f"nothing on stderr:\n{stderr}"
  return lines[0]


def assert_one_line_error(code: int, stderr: str, expected_code: int, *names: str) -> str:
  assert code == expected_code, f"exit {code}, expected {expected_code}; stderr:\n{stderr[-3000:]}"
  line = error_line(stderr)
  assert line.startswith("error: "), stderr[-3000:]
  for name in names:
    assert name in line, f"{name!r} not in the first line {line!r}"
  assert "Traceback" not in stderr, stderr[-3000:]
  assert "FATAL" not in stderr, stderr[-3000:]
  return line


def tool_env(devices: int = 1, **extra: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("MOLMO_JAX_DEBUG", None)
  env.update(extra)
  return env


def run_tool(args: list[str], timeout: float = 600, **popen) -> subprocess.CompletedProcess:
  """`python <args>` in the repository root, as a user would run it."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=popen.pop("env", tool_env()),
                        capture_output=True, text=True, timeout=timeout, **popen)


def run_in_process(main, argv: list[str], capfd) -> tuple[int, str]:
  """errors.run_main(main, argv) -> (exit code, stderr): the wrapper the tool's __main__ uses."""
  from molmo_jax import errors
  capfd.readouterr()
  code = errors.run_main(main, argv)
  return code, capfd.readouterr().err


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
  """A tiny random model directory (params/, config.json, tokenizer/) shared by the session.
  Tests copy it before changing anything."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from molmo_jax import config as C
  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
  from molmo_jax.models.molmo import Molmo, example_batch_shapes
  from molmo_jax.model_dir import save_model_checkpoint

  root = tmp_path_factory.mktemp("tiny_model")
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(root / "tokenizer", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  return save_model_checkpoint(root / "model", jax.device_get(params), cfg,
                               tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="session")
def tiny_release(tiny_model, tmp_path_factory) -> Path:
  """The tiny model exported in the release (HF safetensors) format."""
  from convert.orbax_to_hf import convert_orbax_to_hf
  return convert_orbax_to_hf(tiny_model, tmp_path_factory.mktemp("tiny_release") / "hf")
