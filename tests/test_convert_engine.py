"""The converter table engine (convert/engine.py) and the family registry (convert/tables/):
every hook's inverse, fused blocks along any axis, rule validation, the decoder-family interface.

Legend: E experts, D width, F MLP width, p patch side, Dv ViT width.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from convert import engine
from convert.safetensors_io import SafetensorsDir
from convert.tables import DECODERS, decoder_family


@pytest.mark.parametrize("hook, hf_shape, ours_shape", [
    (engine.COPY, (24,), (4, 6)),
    (engine.LINEAR, (12, 5), (5, 3, 4)),                 # torch [out, in] -> [in, heads, head_dim]
    (engine.LINEAR, (5, 12), (3, 4, 5)),                 # input split into heads -> [H, h, out]
    (engine.EXPERTS_LINEAR, (3 * 4, 5), (3, 5, 4)),      # megablocks [E*F, D] -> [E, D, F]
    (engine.EXPERTS_LINEAR, (3, 4, 5), (3, 5, 4)),       # fused experts [E, F, D] -> [E, D, F]
    (engine.PATCH_CONV, (7, 3, 2, 2), (2 * 2 * 3, 7)),   # CLIP conv [Dv, 3, p, p] -> [p*p*3, Dv]
])
def test_every_hook_has_an_exact_inverse(hook, hf_shape, ours_shape):
  x = np.random.default_rng(0).standard_normal(hf_shape).astype(np.float32)
  y = engine.to_ours(hook, x, ours_shape)
  assert y.shape == ours_shape
  back = engine.to_hf(hook, y, hf_shape)
  assert back.shape == hf_shape and back.tobytes() == x.tobytes()


def test_linear_and_patch_conv_put_values_where_the_model_expects_them():
  x = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)          # [H*h, D], H=3, h=4
  q = engine.to_ours(engine.LINEAR, x, (5, 3, 4))
  np.testing.assert_array_equal(q[:, 2, :], x[8:12].T)              # head 2 = rows 8..11
  conv = np.arange(7 * 3 * 2 * 2, dtype=np.float32).reshape(7, 3, 2, 2)
  kernel = engine.to_ours(engine.PATCH_CONV, conv, (12, 7))
  np.testing.assert_array_equal(kernel[(1 * 2 + 0) * 3 + 2], conv[:, 2, 1, 0])   # (dy, dx, c)


def test_fused_blocks_along_axis_1_are_read_and_stacked(tmp_path):
  # transformers' fused OLMoE experts: gate_up_proj [E, 2F, D] per layer, gate rows first.
  layers, e, f, d = 2, 3, 4, 5
  rng = np.random.default_rng(1)
  tensors = {f"l.{i}.gate_up": rng.standard_normal((e, 2 * f, d)).astype(np.float32)
             for i in range(layers)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  rules = engine.split_rules([("gate", f), ("up", f)], "l.{i}.gate_up", (d,),
                             engine.EXPERTS_LINEAR, layers, lead=(e,), shape=lambda s: (e, d, s))
  assert [r.slice_shape for r in rules] == [(e, f, d), (e, f, d)]
  params, used = engine.convert_tensors(SafetensorsDir(tmp_path), rules)
  assert used == set(tensors)
  for i in range(layers):
    np.testing.assert_array_equal(params["gate"][i], tensors[f"l.{i}.gate_up"][:, :f].transpose(0, 2, 1))
    np.testing.assert_array_equal(params["up"][i], tensors[f"l.{i}.gate_up"][:, f:].transpose(0, 2, 1))


def test_per_expert_tensors_stack_layer_major(tmp_path):
  rng = np.random.default_rng(2)
  tensors = {f"l.{i}.x.{j}.w": rng.standard_normal((4, 5)).astype(np.float32)
             for i in range(2) for j in range(3)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  rule = engine.linear_rule("w", "l.{i}.x.{e}.w", 5, (4,), layers=2, experts=3)
  params, _ = engine.convert_tensors(SafetensorsDir(tmp_path), [rule])
  assert params["w"].shape == (2, 3, 5, 4)
  np.testing.assert_array_equal(params["w"][1, 2], tensors["l.1.x.2.w"].T)


def test_rules_refuse_unknown_hooks_and_unstacked_templates():
  with pytest.raises(ValueError, match="unknown transform hook 'tranpose'"):
    engine.Rule("a", "b", (1,), "tranpose")
  with pytest.raises(ValueError, match=r"must hold \{i\} exactly when layers > 0"):
    engine.Rule("a", "blocks.{i}.w", (1,))
  with pytest.raises(ValueError, match=r"\{e\} exactly when experts > 0"):
    engine.Rule("a", "blocks.{i}.w", (1,), layers=2, experts=4)


def test_decoder_registry_names_every_family_by_model_type():
  assert list(DECODERS) == ["qwen2", "olmo2", "olmoe"]
  for model_type, family in DECODERS.items():
    assert family.MODEL_TYPE == model_type
    for name in ("config_fields", "refused", "rules"):
      assert callable(getattr(family, name)), (model_type, name)
  with pytest.raises(ValueError, match=r"here: model_type 'llama' is not supported; expected one "
                                       r"of \['qwen2', 'olmo2', 'olmoe'\]"):
    decoder_family("llama", "here")
