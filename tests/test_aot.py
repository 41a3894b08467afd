"""Compile-only planning for TPU slices (libtpu from the `tpu` extra; JAX itself stays on the CPU).

CI installs the extra, so these tests must run there: a missing libtpu is a failure, not a skip,
unless MOLMO_SKIP_AOT=1 says so explicitly.
"""

import functools
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


def _tiny_config(family="qwen2", **overrides):
  from molmo_jax import experiment
  config = experiment.load_recipe(str(ROOT / "configs" / "tiny_test.py") + f":{family}")
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


def test_tiny_moe_compiles_expert_parallel_for_tpu():
  """On a v5p slice with expert=2 the dropless MoE moves tokens with ragged-all-to-all and never
  gathers an expert weight [.., E, D, F] (E = 12 so that no other dimension collides)."""
  _require_libtpu()
  import re
  from molmo_jax.training import aot
  config = _tiny_config("olmoe", **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 2,
                                    "model.llm.num_experts": 12})
  report = aot.compile_train_step(config, "v5p:2x2x1", keep_hlo=True)
  assert report.error is None
  hlo = report.hlo_text
  assert re.search(r"\bragged-all-to-all(-start)?\(", hlo)
  assert report.collective_bytes["all-to-all"] > 0
  gathered = []
  for line in hlo.splitlines():
    if re.search(r"\ball-gather(-start)?\(", line):
      result = line.split("=", 1)[1].split("all-gather", 1)[0]
      for dims in re.findall(r"\[([\d,]+)\]", result):
        sizes = [int(d) for d in dims.split(",")]
        if len(sizes) >= 3 and 12 in sizes:
          gathered.append(line.strip()[:160])
  assert gathered == []
  # The planner's efficiency figures are filled in.
  assert report.floor_bytes["state"] == aot.STATE_BYTES_PER_PARAM * report.param_count / 4
  assert report.collective_bytes["all-gather"] > 0
  assert report.fsdp_min_collective_bytes["all-gather"] > 0


def test_collective_bytes_counts_loop_iterations():
  from molmo_jax.training import aot
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = bf16[4,16]{1,0} all-gather(%y), dimensions={0}
  %rs = f32[2]{0} reduce-scatter(%x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %rs)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ars = f32[8]{0} all-reduce-start(%a), to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %o = f32[8]{0} get-tuple-element(%w), index=1
}
"""
  got = aot.collective_bytes(hlo)
  assert got["all-gather"] == 5 * 4 * 16 * 2          # bf16 result, 5 iterations
  assert got["reduce-scatter"] == 5 * 8 * 4           # f32[8] operand
  assert got["all-reduce"] == 8 * 4                   # start counted, done not
  assert got["all-to-all"] == 0


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_tiny_lora_train_step_compiles_with_state_for_adapters_only(base_dtype):
  _require_libtpu()
  from molmo_jax.training import aot
  sizes = test_tiny_lora_train_step_compiles_with_state_for_adapters_only.sizes
  if "full" not in sizes:
    sizes["full"] = aot.compile_train_step(_tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4}),
                                           "v5p:2x2x1")
  full = sizes["full"]
  config = _tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "lora.rank": 4,
                           "lora.train": ("connector",), "lora.base_dtype": base_dtype,
                           "micro_batches": 2})
  report = aot.compile_train_step(config, "v5p:2x2x1")
  assert report.error is None and report.fits
  assert "llm/blocks/attention/query/lora_a" in report.param_sharding
  # No optimizer state or fp32 copy for the frozen base: the state is much smaller.
  assert report.argument_bytes < 0.6 * full.argument_bytes
  assert 0 < report.trainable_param_count < full.trainable_param_count / 2
  if base_dtype == "bfloat16":
    assert report.param_count > full.param_count                # base + adapters
  else:
    # int8 values + scales in place of the LLM's dense kernels and LM head, sharded like them.
    assert "fsdp" in report.param_sharding["llm/blocks/mlp/up/kernel/qvalue"]
    assert "llm/blocks/mlp/up/kernel" not in report.param_sharding
    assert "llm/lm_head/scale" in report.param_sharding
  sizes[base_dtype] = report.argument_bytes
  if "bfloat16" in sizes and "int8" in sizes:
    assert sizes["int8"] < sizes["bfloat16"]


test_tiny_lora_train_step_compiles_with_state_for_adapters_only.sizes = {}


def test_tiny_train_step_compiles_with_optimizer_state_in_host_memory():
  """offload_optimizer_state: AdamW's moments become pinned-host arguments of the TPU program
  (8 bytes per trainable parameter leave HBM) and the step still compiles."""
  _require_libtpu()
  from molmo_jax.training import aot
  overrides = {"mesh.data": 1, "mesh.fsdp": 4, "micro_batches": 2}
  plain = aot.compile_train_step(_tiny_config(**overrides), "v5p:2x2x1")
  report = aot.compile_train_step(_tiny_config(**overrides, offload_optimizer_state=True), "v5p:2x2x1")
  assert report.error is None and report.fits and plain.host_bytes == 0
  moments = 2 * 4 * report.trainable_param_count / report.chips
  assert report.host_bytes >= 0.9 * moments
  assert plain.argument_bytes - report.argument_bytes >= 0.9 * moments


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


def test_aot_generate_command_compiles_int8_generation_with_compiler_layouts(tmp_path, capsys):
  """`python aot.py --generate` on a model directory's config: prefill + one decode step, the
  weights in the layouts the compiler picks; usage errors exit 2."""
  _require_libtpu()
  import json
  import aot as aot_cli
  from molmo_jax import config as C
  (tmp_path / "config.json").write_text(C.tiny("qwen2", vocab_size=512,
                                               embedding_size=512).to_json())
  argv = ["--generate", "--model", str(tmp_path), "--topology", "v5p:2x2x1", "--batch", "4",
          "--length", "64", "--crops", "2", "--prefill-rows", "2", "--param-layouts", "auto"]
  assert aot_cli.main([*argv, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["kind"] == "generation" and report["quantize"] == "int8"
  assert report["param_layouts"] == "auto" and report["error"] is None
  assert report["mesh"]["tensor"] == 4 and report["argument_bytes"] > 0
  assert aot_cli.main(["--generate", "--topology", "v5p:2x2x1"]) == 2          # no --model
  assert aot_cli.main([*argv, "--mesh", "tensor=four"]) == 2
  assert "--model" in capsys.readouterr().err


def test_generation_keeps_the_layer_scan_when_compiled_for_tpu(monkeypatch):
  """On CPU the decode loop runs each layer from its own weight slice (generate.LayerSlices, a
  second copy of the decoder weights while it runs). An ahead-of-time compile for TPU chips is
  traced on this CPU host under a TPU mesh: it keeps the scan, as do stacks larger than
  LAYER_SLICES_MAX_BYTES."""
  _require_libtpu()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from molmo_jax import config as C
  from molmo_jax import generate as generate_lib
  from molmo_jax.models.molmo import Molmo, abstract_params
  from molmo_jax.training.aot import topology_devices
  cfg = C.tiny("qwen2")
  model = Molmo(cfg)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
  seen = {}

  def probe(x, name):
    seen[name] = generate_lib._use_layer_slices(params, model)
    return x

  meshes = {"cpu": jax.devices()[:1], "tpu": topology_devices("v5e:2x2")}
  for name, devices in meshes.items():
    with jax.set_mesh(jax.sharding.Mesh(np.array(devices), ("data",))):
      jax.jit(functools.partial(probe, name=name)).trace(jax.ShapeDtypeStruct((), jnp.float32))
  assert seen == {"cpu": True, "tpu": False}
  monkeypatch.setattr(generate_lib, "LAYER_SLICES_MAX_BYTES", 1000)
  assert not generate_lib._use_layer_slices(params, model)
