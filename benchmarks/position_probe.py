"""Where does a demo model keep an object's position? Linear probes from each stage to its x and y.

    python benchmarks/position_probe.py --recipe configs/demo.py \
        --checkpoint outputs/demo/train/checkpoints/2000
    python benchmarks/position_probe.py --recipe configs/demo.py --checkpoint init

For `--scenes` single-object scenes of the recipe's scene distribution, runs the model (capture
API: `Molmo.apply(..., capture=...)`) on "Point to the <kind>." and fits ridge regressions onto the
object's x and y (fractions of the width and height; 70 % train / 30 % held-out, best of a few ridge strengths):

  vit_embeddings  the ViT input (patch + positional embedding, pre-LN) at the object's patch
  vit_selected_K  the K-th selected ViT layer at the object's patch (global view)
  image_pooled    the 2x2-pooled cell that holds the object's centre (global view)
  image_feature   that cell's projected feature, i.e. what is added to its <im_patch> token
  mean_features   the mean of all the example's image features (what diffuse attention sees)
  all_cells       every global-view cell's feature, concatenated (position by *which* cell deviates)
  decoder_last    every decoder layer's state at the last prompt position

A held-out R^2 near 0 means the representation holds no linearly readable position. Prints a table
and writes JSON (`--out`). docs/demo.md uses it to show where the demo's position is lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ridge_r2(features, target, train_fraction: float = 0.7) -> float:
  """Held-out R^2 of a ridge regression (standardised features), best over a few strengths."""
  x = np.asarray(features, np.float64).reshape(len(target), -1)
  y = np.asarray(target, np.float64)
  k = int(train_fraction * len(y))
  mu, sd = x[:k].mean(0), x[:k].std(0) + 1e-6
  xs = (x - mu) / sd
  best = -np.inf
  for lam in (0.1, 1.0, 10.0, 100.0, 1000.0):
    a = xs[:k]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[:k] - y[:k].mean()))
    pred = xs[k:] @ w + y[:k].mean()
    best = max(best, 1.0 - float(((pred - y[k:]) ** 2).mean() / y[k:].var()))
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--recipe", default="configs/demo.py")
  p.add_argument("--checkpoint", required=True,
                 help="a training checkpoint step directory or model directory, or 'init' (untrained)")
  p.add_argument("--scenes", type=int, default=240)
  p.add_argument("--seed", type=int, default=7)
  p.add_argument("--out", default=None, help="JSON output (default: print only)")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from molmo_jax import experiment
  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, EOS_TOKEN
  from molmo_jax.data.synthetic import SyntheticConfig, generate_scene, kind_label
  from molmo_jax.model_dir import restore_params_only
  from molmo_jax.models.molmo import Molmo, abstract_params, example_batch_shapes
  from molmo_jax.preprocess.inputs import build_batch
  from molmo_jax.preprocess.tokens import MolmoTokenizer

  config = experiment.load_recipe(args.recipe)
  experiment.import_recipe_plugins(config)
  model_cfg = experiment.build_model_config(config.model)
  model = Molmo(model_cfg)
  if args.checkpoint == "init":
    shapes = example_batch_shapes(model_cfg, 1, 16, model_cfg.preprocess.max_crops + 1)
    dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    params = nn.unbox(model.init(jax.random.PRNGKey(config.seed), dummy))["params"]
  else:
    params = restore_params_only(args.checkpoint, abstract_params(model_cfg))
  tokenizer = MolmoTokenizer(build_demo_tokenizer(), model_cfg.llm.vocab_size, eos_token=EOS_TOKEN)

  sources = [dict(s.get("options", {}).get("config", {})) for s in config.data.sources.values()]
  scene_cfg = SyntheticConfig(**{**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in sources[0].items()}, "max_objects": 1})
  scenes, index = [], 0
  while len(scenes) < args.scenes:
    scene = generate_scene(index, args.seed, scene_cfg)
    index += 1
    if len(scene.objects) == 1:
      scenes.append(scene)

  rows: dict[str, list] = {}
  xs, ys = [], []
  for start in range(0, len(scenes), 16):
    chunk = scenes[start:start + 16]
    prompts = [f"Point to the {kind_label(s.objects[0].colour, s.objects[0].shape)}." for s in chunk]
    batch = build_batch([s.image for s in chunk], prompts, tokenizer, model_cfg, style="pointing")
    _, out = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in batch.arrays.items()},
                         capture=("vit", "connector", "decoder"))
    cap = {k: np.asarray(v) for k, v in out["captured"].items()}
    idx = batch.arrays["image_input_idx"]                 # [B, M, Q]
    crops, cells = idx.shape[1], idx.shape[2]
    grid = int(round(np.sqrt(cells)))
    tokens = cap["vit_embeddings"].shape[1]
    patch_grid = int(np.sqrt(tokens))
    cls = tokens - patch_grid ** 2
    for j, scene in enumerate(chunk):
      (x, y), (w, h) = scene.objects[0].centre, scene.image_size
      cell = int(min(grid - 1, y / h * grid)) * grid + int(min(grid - 1, x / w * grid))
      patch = cls + int(min(patch_grid - 1, y / h * patch_grid)) * patch_grid + \
          int(min(patch_grid - 1, x / w * patch_grid))
      crop0 = j * crops                                   # the global view is crop 0
      rows.setdefault("vit_embeddings", []).append(cap["vit_embeddings"][crop0, patch])
      for k in range(cap["vit_selected"].shape[0]):
        rows.setdefault(f"vit_selected_{k}", []).append(cap["vit_selected"][k, crop0, patch])
      rows.setdefault("image_pooled", []).append(cap["image_pooled"][crop0, cell])
      features = cap["image_features"][j]                 # [M*Q, D]
      rows.setdefault("image_feature", []).append(features[cell])
      valid = idx[j].reshape(-1) >= 0
      rows.setdefault("mean_features", []).append(features[valid].mean(0))
      rows.setdefault("all_cells", []).append(features[:cells].reshape(-1))
      rows.setdefault("decoder_last", []).append(cap["decoder_layers"][:, j, batch.lengths[j] - 1].reshape(-1))
      xs.append(x / w)
      ys.append(y / h)

  results = {name: round(ridge_r2(values, xs), 3) for name, values in rows.items()}
  results_y = {name: round(ridge_r2(values, ys), 3) for name, values in rows.items()}
  print(f"position probe: {args.checkpoint} ({len(xs)} single-object scenes; held-out R^2)")
  print(f"  {'':<16} {'x':>6} {'y':>6}")
  for name, r2 in results.items():
    print(f"  {name:<16} {r2:>6.2f} {results_y[name]:>6.2f}")
  if args.out:
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "checkpoint": args.checkpoint,
                                          "scenes": len(xs), "r2_x": results,
                                          "r2_y": results_y}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
