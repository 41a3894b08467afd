"""Assemble an initial (untrained) Molmo from a CLIP directory and an LLM directory (the reference's scripts/convert_hf_to_molmo.py).

  python -m convert.build_initial --clip DIR --llm DIR --out DIR [--preset molmo-7b-d]

What comes from where, as in the reference's `reset_with_pretrained_weights`:
  vision/                  CLIP vision tower, its last block and post-LN dropped (23 of 24 kept)
  llm/ (but embedding/new) the base LLM (Qwen2 / OLMo2 / OLMoE)
  llm/embedding/new        N(0, 0.02), [additional_vocab_size, D]
  connector/               pooling q/k/v/out kernels N(0, 0.02), biases 0; projector kernels
                           N(0, 0.02); pad_embed zeros

The config is derived from the two config.json files. With --preset, the preset is the config and
the derived one must agree with it on every field that fixes a tensor shape; fields that only
change numerics (norm eps, RoPE base or table length, activation) follow the preset, with a notice.
The parameter tree is checked against `jax.eval_shape(Molmo(cfg).init, ...)` before it is written.
Tokenizer files found in the LLM directory are copied to <out>/tokenizer/.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert import hf_components as hfc
from molmo_jax import config as C
from molmo_jax import errors
from molmo_jax.models.connector import Connector
from molmo_jax.models.molmo import Molmo
from molmo_jax.model_dir import check_tree_matches, path_name, save_model_checkpoint
from molmo_jax.output_dirs import check_output_target, is_model_directory

INIT_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")

_VISION_SHAPE_FIELDS = ("image_size", "patch_size", "width", "num_heads", "head_dim", "num_layers",
                        "mlp_dim")
_LLM_SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "norm_placement", "qk_norm", "qkv_bias", "num_experts", "experts_per_token",
                     "expert_mlp_dim")
_NUMERIC_FIELDS = {"vision": ("activation", "layer_norm_eps"),
                   "llm": ("norm_eps", "rope_theta", "rope_max_length", "moe_normalize_topk")}


def derived_config(clip_hf: dict[str, Any], llm_hf: dict[str, Any], *,
                   vit_layers: tuple[int, ...] | None = None, drop_last_vit_layer: bool = True,
                   **llm_overrides: Any) -> C.MolmoConfig:
  """A MolmoConfig built from the two HF configs alone (no preset)."""
  vision = hfc.vision_config_from_hf(clip_hf, drop_last_layer=drop_last_vit_layer,
                                     selected_layers=vit_layers)
  llm = hfc.llm_config_from_hf(llm_hf, **llm_overrides)
  connector = C.ConnectorConfig(pool_heads=vision.num_heads, pool_head_dim=vision.head_dim,
                                projector_hidden=llm.expert_mlp_dim if llm.is_moe else llm.mlp_dim)
  preprocess = C.PreprocessConfig(crop_size=vision.image_size, patch_size=vision.patch_size)
  return C.MolmoConfig(name="molmo-initial", vision=vision, connector=connector, llm=llm,
                       preprocess=preprocess)


def reconcile_with_preset(derived: C.MolmoConfig, preset: C.MolmoConfig) -> C.MolmoConfig:
  """The preset, after checking that the HF components fit it (see the module docstring)."""
  mismatched, notices = [], []
  for part, shape_fields in (("vision", _VISION_SHAPE_FIELDS), ("llm", _LLM_SHAPE_FIELDS)):
    ours, theirs = getattr(derived, part), getattr(preset, part)
    for name in shape_fields:
      if getattr(ours, name) != getattr(theirs, name):
        mismatched.append(f"{part}.{name}: HF {getattr(ours, name)!r}, "
                          f"preset {getattr(theirs, name)!r}")
    for name in _NUMERIC_FIELDS[part]:
      if getattr(ours, name) != getattr(theirs, name):
        notices.append(f"{part}.{name}: HF {getattr(ours, name)!r} -> "
                       f"preset {getattr(theirs, name)!r}")
  if derived.llm.embedding_size > preset.llm.embedding_size:
    mismatched.append(f"llm.embedding_size: HF vocab {derived.llm.embedding_size} > preset "
                      f"{preset.llm.embedding_size}")
  if mismatched:
    raise ValueError(f"components do not fit preset {preset.name!r}: " + "; ".join(mismatched))
  for line in notices:
    print(f"build_initial: using the preset's value for {line}", file=sys.stderr)
  return preset


def dummy_batch(cfg: C.MolmoConfig, crops: int = 2, length: int = 8) -> dict[str, jax.Array]:
  """Smallest batch that builds every parameter of Molmo(cfg) (for init / eval_shape)."""
  v = cfg.vision
  cells = lambda pool: -(-v.grid_size // pool)      # the connector pads a ragged grid
  pooled = cells(cfg.connector.pool_height) * cells(cfg.connector.pool_width)
  return {"input_ids": jnp.zeros((1, length), jnp.int32),
          "images": jnp.zeros((1, crops, v.num_patches, v.patch_dim), jnp.float32),
          "image_masks": jnp.ones((1, crops, v.num_patches), jnp.float32),
          "image_input_idx": jnp.zeros((1, crops, pooled), jnp.int32)}


def expected_param_shapes(cfg: C.MolmoConfig) -> Any:
  """ShapeDtypeStructs of Molmo(cfg)'s parameters (no memory is allocated)."""
  shapes = jax.eval_shape(Molmo(cfg).init, jax.random.PRNGKey(0), dummy_batch(cfg))
  return nn.unbox(shapes)["params"]


def init_connector(cfg: C.MolmoConfig, rng: np.random.Generator) -> dict[str, Any]:
  """Connector parameters as the reference resets them: kernels N(0, 0.02), biases and
  pad_embed zero. Done here explicitly so that the rule does not depend on module defaults."""
  v = cfg.vision
  layers = tuple(jnp.zeros((1, v.num_positions, v.width)) for _ in v.selected_layers)
  module = Connector(v, cfg.connector, cfg.llm.d_model)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), layers,
                                    jnp.ones((1, v.num_patches)), jnp.ones((1,), bool)))["params"]

  def init(path, leaf):
    name = path_name(path)
    if name == "pad_embed" or name.endswith("bias"):
      return np.zeros(leaf.shape, np.float32)
    return (INIT_STD * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


def initial_params(clip_dir: str | Path, llm_dir: str | Path, cfg: C.MolmoConfig,
                   seed: int = 0) -> dict[str, Any]:
  """The full parameter tree (float32 numpy arrays), checked against Molmo(cfg)."""
  rng = np.random.default_rng(seed)
  llm = hfc.convert_llm(llm_dir, cfg.llm, np.float32, rng)
  llm["embedding"]["new"] = (INIT_STD * rng.standard_normal(
      (cfg.llm.additional_vocab_size, cfg.llm.d_model))).astype(np.float32)
  params = {"vision": hfc.convert_clip(clip_dir, cfg.vision, np.float32),
            "connector": init_connector(cfg, rng), "llm": llm}
  check_tree_matches(params, expected_param_shapes(cfg), "initial Molmo parameters")
  return params


def _stage_tokenizer(llm_dir: Path, staging: Path) -> Path | None:
  found = [llm_dir / f for f in TOKENIZER_FILES if (llm_dir / f).is_file()]
  if not found:
    return None
  staging.mkdir()
  for file in found:
    shutil.copy2(file, staging / file.name)
  return staging


def build_initial(clip_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, *,
                  preset: str | None = None, vit_layers: tuple[int, ...] | None = None,
                  drop_last_vit_layer: bool = True, seed: int = 0, overwrite: bool = False,
                  **llm_overrides: Any) -> Path:
  """Writes a model directory (params/, config.json, tokenizer/) and returns its path."""
  clip_dir, llm_dir = Path(clip_dir), Path(llm_dir)
  cfg = derived_config(hfc.read_hf_config(clip_dir), hfc.read_hf_config(llm_dir),
                       vit_layers=vit_layers, drop_last_vit_layer=drop_last_vit_layer,
                       **llm_overrides)
  if preset is not None:
    # Explicit choices still win over the preset's.
    chosen = C.preset(preset)
    chosen = chosen.replace(llm=dataclasses.replace(chosen.llm, **llm_overrides))
    if vit_layers is not None:
      chosen = chosen.replace(vision=dataclasses.replace(chosen.vision, selected_layers=vit_layers))
    cfg = reconcile_with_preset(cfg, chosen)
  params = initial_params(clip_dir, llm_dir, cfg, seed)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = _stage_tokenizer(llm_dir, Path(tmp) / "tokenizer")
    return save_model_checkpoint(out_dir, params, cfg, tokenizer_dir=tokenizer, overwrite=overwrite)


def _int_tuple(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
  parser = errors.ArgumentParser(prog="python -m convert.build_initial", description=__doc__)
  parser.add_argument("--clip", required=True, type=Path, help="HF CLIP(Vision)Model directory")
  parser.add_argument("--llm", required=True, type=Path, help="HF Qwen2/OLMo2/OLMoE directory")
  parser.add_argument("--out", required=True, type=Path, help="model directory to write")
  parser.add_argument("--preset", choices=sorted(C.PRESETS), help="released model to match")
  parser.add_argument("--vit-layers", type=_int_tuple, help="ViT layers for the connector, "
                      "e.g. -2,-9 (default: the preset's or -2,-9)")
  parser.add_argument("--keep-last-vit-layer", action="store_true",
                      help="keep every CLIP block (Molmo drops the last one)")
  parser.add_argument("--vocab-size", type=int, help="llm.vocab_size (padded tokenizer size)")
  parser.add_argument("--embedding-size", type=int, help="llm.embedding_size (>= HF vocab)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the new (connector) weights")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it is a model directory")
  parser.add_argument("--force", action="store_true", help="replace --out whatever it holds")
  args = parser.parse_args(argv)
  check_output_target(args.out, sources=[args.clip, args.llm], overwrite=args.overwrite,
                      force=args.force, kind="model directory", is_kind=is_model_directory,
                      flag="--out")
  overrides = {k: v for k, v in (("vocab_size", args.vocab_size),
                                 ("embedding_size", args.embedding_size)) if v is not None}
  out = build_initial(args.clip, args.llm, args.out, preset=args.preset, vit_layers=args.vit_layers,
                      drop_last_vit_layer=not args.keep_last_vit_layer, seed=args.seed,
                      overwrite=args.overwrite or args.force, **overrides)
  print(f"wrote {out}")


def run() -> None:
  """Console entry point (`molmo-build-initial`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
