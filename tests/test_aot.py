"""Compile-only planning for TPU slices (libtpu from the `tpu` extra; JAX itself stays on the CPU).

CI installs the extra, so these tests must run there: a missing libtpu is a failure, not a skip,
unless MOLMO_SKIP_AOT=1 says so explicitly.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _require_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    if os.environ.get("MOLMO_SKIP_AOT") == "1":
      pytest.skip("MOLMO_SKIP_AOT=1 and libtpu is not installed")
    pytest.fail("libtpu is not installed: pip install -e '.[tpu]' (or set MOLMO_SKIP_AOT=1)")


def _tiny_config(**overrides):
  from molmo_jax import experiment
  config = experiment.load_recipe(str(ROOT / "configs" / "tiny_test.py"))
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def test_topology_names_are_validated():
  from molmo_jax.training import aot
  assert aot.parse_topology("v5p:2x2x1") == ("v5p", 4)
  assert aot.parse_topology("v6e:16x16") == ("v6e", 256)
  for bad in ("v5p", "v7:2x2", "v5p:2", "tpu:2x2x2"):
    with pytest.raises(ValueError, match="topology"):
      aot.parse_topology(bad)


def test_tiny_train_step_compiles_for_a_v5p_slice_and_reports_memory():
  _require_libtpu()
  from molmo_jax.training import aot
  config = _tiny_config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  report = aot.compile_train_step(config, "v5p:2x2x1")
  assert report.error is None
  assert report.fits
  assert report.chips == 4 and report.mesh["fsdp"] == 2 and report.mesh["tensor"] == 2
  assert report.argument_bytes > 0 and report.temp_bytes > 0
  assert 0 < report.total_bytes < report.hbm_per_chip_bytes
  # Donated state: the new state reuses the argument buffers.
  assert report.alias_bytes > 0
  # Parameters really are sharded over the named axes.
  assert "fsdp" in report.param_sharding["llm/blocks/mlp/gate/kernel"]
  assert "tensor" in report.param_sharding["llm/blocks/mlp/gate/kernel"]
  assert report.model_flops_per_step > 0
  # Compiling for a TPU slice leaves the default backend alone.
  assert jax.default_backend() == "cpu"


def test_a_step_that_does_not_fit_is_reported_not_raised():
  _require_libtpu()
  from molmo_jax.training import aot
  # A decoder far too wide for 16 GiB chips, replicated (pure data parallelism).
  config = _tiny_config(**{"mesh.data": 4, "mesh.fsdp": 1, "model.llm.d_model": 16384,
                           "model.llm.mlp_dim": 131072, "model.llm.num_layers": 2,
                           "model.llm.num_heads": 128, "model.llm.num_kv_heads": 128,
                           "model.llm.head_dim": 128})
  report = aot.compile_train_step(config, "v5e:2x2")
  assert not report.fits
  assert "RESOURCE_EXHAUSTED" in report.error or "HBM" in report.error


def test_aot_command_line_exit_status_and_json(tmp_path):
  _require_libtpu()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "aot.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
       "--topology", "v5p:2x2x1", "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--json"],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  import json
  report = json.loads(proc.stdout)
  assert report["fits"] and report["total_bytes"] > 0
  assert report["chips"] == 4 and report["mesh"]["fsdp"] == 4
  bad = subprocess.run([sys.executable, str(ROOT / "aot.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
                        "--topology", "v9:1x1"], env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "topology" in bad.stderr


def test_tiny_lora_train_step_compiles_with_state_for_adapters_only():
  _require_libtpu()
  from molmo_jax.training import aot
  full = aot.compile_train_step(_tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4}), "v5p:2x2x1")
  config = _tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "lora.rank": 4,
                           "lora.train": ("connector",), "lora.base_dtype": "bfloat16",
                           "micro_batches": 2})
  report = aot.compile_train_step(config, "v5p:2x2x1")
  assert report.error is None and report.fits
  assert "llm/blocks/attention/query/lora_a" in report.param_sharding
  assert report.param_count > full.param_count                  # base + adapters
  assert 0 < report.trainable_param_count < full.trainable_param_count / 2
  # No optimizer state or fp32 copy for the frozen base: the state is much smaller.
  assert report.argument_bytes < 0.6 * full.argument_bytes


@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_tiny_generation_step_compiles_int8_smaller_than_bf16(quantize):
  _require_libtpu()
  from molmo_jax import config as C
  from molmo_jax.training import aot
  cfg = C.tiny("qwen2", vocab_size=512, embedding_size=512)
  report = aot.compile_generation_step(cfg, "v5p:2x2x1", batch_size=4, prompt_length=64,
                                       quantize=quantize, dtype="bfloat16", crops=2,
                                       prefill_rows_per_pass=2)
  assert report.error is None and report.fits
  assert report.mesh["tensor"] == 4
  assert report.argument_bytes > 0 and report.temp_bytes > 0
  test_tiny_generation_step_compiles_int8_smaller_than_bf16.sizes[quantize] = report.argument_bytes
  sizes = test_tiny_generation_step_compiles_int8_smaller_than_bf16.sizes
  if len(sizes) == 2:
    assert sizes["int8"] < sizes["none"]


test_tiny_generation_step_compiles_int8_smaller_than_bf16.sizes = {}
