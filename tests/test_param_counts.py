"""Parameter counts and shapes of the four released presets (the reference's launch_scripts/utils.py (model presets); released safetensors names (olmo/hf_molmo.py)), via jax.eval_shape.

Shapes are compared with the HF safetensors table after undoing the fusions of the released fused tensor layouts (olmo/hf_molmo.py):
att_proj rows = query + key + value widths, ff_proj rows = gate + up widths (2 x mlp_dim),
MoE w1/v1/w2 rows = experts x expert width. Nothing is allocated: eval_shape only traces.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from molmo_jax import config as C
from molmo_jax.models.molmo import Molmo

# 7B-D is the released model.safetensors.index.json total; the others were measured by the lead
# and agree with the spec's rounded totals (72B ~73.31 B, 7B-O ~7.67 B, MolmoE ~7.22 B).
TOTALS = {
    "molmo-7b-d": 8_021_025_280,
    "molmo-72b": 73_308_285_952,
    "molmo-7b-o": 7_665_032_192,
    "molmoe-1b": 7_221_875_712,
}

# HF shapes from the released safetensors names (olmo/hf_molmo.py) (rows of fused tensors; the LM head / embedding tables).
HF_SHAPES = {
    "molmo-7b-d": dict(att_proj=4608, ff_proj=37888, ff_out=(3584, 18944), wte=(152064, 3584)),
    "molmo-72b": dict(att_proj=10240, ff_proj=59136, ff_out=(8192, 29568), wte=(152064, 8192)),
    "molmo-7b-o": dict(att_proj=12288, ff_proj=22016, ff_out=(4096, 11008), wte=(100352, 4096)),
    "molmoe-1b": dict(att_proj=6144, experts_rows=65536, router=(64, 2048), wte=(50304, 2048)),
}


def abstract_params(cfg):
  v, c, p = cfg.vision, cfg.preprocess, cfg.vision.num_patches
  batch = {"input_ids": jax.ShapeDtypeStruct((1, 8), jnp.int32),
           "images": jax.ShapeDtypeStruct((1, 1, p, v.patch_dim), jnp.float32),
           "image_masks": jax.ShapeDtypeStruct((1, 1, p), jnp.float32),
           "image_input_idx": jax.ShapeDtypeStruct((1, 1, c.pooled_per_crop), jnp.int32)}
  variables = jax.eval_shape(Molmo(cfg).init, jax.random.PRNGKey(0), batch)
  return nn.unbox(variables["params"])


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module", params=sorted(TOTALS))
def preset(request):
  cfg = C.preset(request.param)
  return request.param, cfg, abstract_params(cfg)


def test_total(preset):
  name, _, params = preset
  assert count(params) == TOTALS[name]


def test_component_split_7b_d():
  params = abstract_params(C.preset("molmo-7b-d"))
  assert count(params["vision"]) == 290_909_184
  assert count(params["connector"]) == 114_040_832
  assert count(params["llm"]) == 7_616_075_264


def test_vision_and_connector_shapes(preset):
  _, cfg, params = preset
  vis, con = params["vision"], params["connector"]
  assert vis["positional_embedding"].shape == (577, 1024)
  assert vis["class_embedding"].shape == (1024,)
  assert vis["patch_embed"]["kernel"].shape == (588, 1024)            # HF [1024, 588] transposed
  assert vis["blocks"]["attention"]["query"]["kernel"].shape == (23, 1024, 16, 64)
  assert vis["blocks"]["fc1"]["kernel"].shape == (23, 1024, 4096)
  assert con["pad_embed"].shape == (2, 2048)
  assert con["pooling"]["query"]["kernel"].shape == (2048, 16, 64)    # HF wq [1024, 2048]
  assert con["pooling"]["out"]["kernel"].shape == (16, 64, 1024)
  hidden = cfg.connector.projector_hidden
  assert con["projector"]["gate"]["kernel"].shape == (1024, hidden)
  assert con["projector"]["down"]["kernel"].shape == (hidden, cfg.llm.d_model)


def test_llm_shapes_match_hf_table(preset):
  name, cfg, params = preset
  want = HF_SHAPES[name]
  llm, blocks = params["llm"], params["llm"]["blocks"]
  layers, d = cfg.llm.num_layers, cfg.llm.d_model
  attention = blocks["attention"]
  qkv_rows = sum(math.prod(attention[n]["kernel"].shape[2:]) for n in ("query", "key", "value"))
  assert qkv_rows == want["att_proj"]
  for n in ("query", "key", "value"):
    assert attention[n]["kernel"].shape[:2] == (layers, d)
    assert ("bias" in attention[n]) == cfg.llm.qkv_bias
  assert math.prod(attention["query"]["kernel"].shape[2:]) == d          # query width = d_model
  assert attention["out"]["kernel"].shape[0] == layers
  assert math.prod(attention["out"]["kernel"].shape[1:3]) == d          # attn_out [d, d]
  assert attention["out"]["kernel"].shape[3] == d
  if cfg.llm.qk_norm:
    assert attention["q_norm"]["scale"].shape == (layers, d)
    assert attention["k_norm"]["scale"].shape == (layers, (want["att_proj"] - d) // 2)   # K * h
  assert llm["embedding"]["pretrained"].shape == want["wte"]
  assert llm["embedding"]["new"].shape == (128, d)
  assert llm["lm_head"].shape == want["wte"][::-1]
  if cfg.llm.is_moe:
    moe = blocks["moe"]
    assert moe["router"].shape == (layers,) + want["router"][::-1]
    for n in ("gate", "up"):                                             # megablocks w1 / v1
      e, d_in, f = moe[n].shape[1:]
      assert (e * f, d_in) == (want["experts_rows"], d)
    e, f, d_out = moe["down"].shape[1:]                                  # w2, stored [F, D] per expert
    assert (e * f, d_out) == (want["experts_rows"], d)
  else:
    mlp = blocks["mlp"]
    assert mlp["gate"]["kernel"].shape[-1] + mlp["up"]["kernel"].shape[-1] == want["ff_proj"]
    assert mlp["down"]["kernel"].shape == (layers,) + want["ff_out"][::-1]
