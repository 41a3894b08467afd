"""Weight-only int8 / int4 vs float logits on teacher-forced positions: KL divergence, top-1
agreement, weight bytes.

    python benchmarks/quantize.py [--checkpoint MODEL_DIR] [--modes int8,int4,int8+vit]
                                  [--batches 4 --batch-size 8 --seq-len 256]

Batches come from the synthetic shapes/counting/pointing data through the training pipeline
(images, prompts and answers), teacher-forced: every position whose next token is an answer token
(loss weight > 0) is scored. Without --checkpoint a tiny random qwen2-family model with the
built-in demo tokenizer is used (a random model's logits are nearly flat, so its KL is small but
its top-1 agreement is a harder test than a trained model's). With a model directory (e.g. the
demo's trained model) its own tokenizer is used.

KL = mean over scored positions of KL(p_float || p_quantized) in nats. Prints a table and writes
benchmarks/results/quantize.json (or --json PATH).

With `--scores RECIPE` (a demo-trained --checkpoint and the demo recipe it was trained with) it
also runs the demo's held-out evaluation (`molmo_jax.evals.synthetic_scores.score_scenes`: counting accuracy,
pointing F1, on `--scores-examples` scenes per task drawn as RECIPE draws them) for the float
model and every mode, each with float32 and bfloat16 compute:

    python benchmarks/quantize.py --checkpoint outputs/demo-pointing/model \
        --scores configs/demo_pointing.py --modes int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from molmo_jax import config as C  # noqa: E402
from molmo_jax import quantize as Q  # noqa: E402
from molmo_jax.models.molmo import Molmo, abstract_params  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"


def load_model(checkpoint: str | None):
  """(config, float params, tokenizer, where)."""
  from molmo_jax.preprocess.tokens import MolmoTokenizer
  if checkpoint:
    from molmo_jax.model_dir import load_model_checkpoint
    ckpt = load_model_checkpoint(checkpoint)
    if ckpt.tokenizer_dir is None:
      raise SystemExit(f"error: {checkpoint} has no tokenizer/ folder")
    tokenizer = MolmoTokenizer.from_checkpoint(ckpt.tokenizer_dir, ckpt.config.llm.vocab_size)
    return ckpt.config, ckpt.params, tokenizer, checkpoint
  from molmo_jax.data.demo_tokenizer import EOS_TOKEN, build_demo_tokenizer
  cfg = C.tiny("qwen2", vocab_size=512, embedding_size=512)
  shapes = abstract_params(cfg)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree.unflatten(tree, [
      (1.0 + 0.1 * jax.random.normal(k, s.shape) if s.shape and len(s.shape) == 1 else
       0.15 * jax.random.normal(k, s.shape)).astype(s.dtype) for k, s in zip(keys, leaves)])
  tokenizer = MolmoTokenizer(build_demo_tokenizer(), cfg.llm.vocab_size, EOS_TOKEN)
  return cfg, params, tokenizer, "tiny-qwen2 (random weights)"


def batches(cfg, tokenizer, count: int, batch_size: int, seq_len: int):
  from molmo_jax.data import synthetic  # noqa: F401 (registers the 'synthetic' source kind)
  from molmo_jax.data.pipeline import DataConfig, make_train_iterator
  data_cfg = DataConfig.from_dict({
      "sources": [{"name": "shapes", "kind": "synthetic",
                   "options": {"num_examples": count * batch_size, "seed": 123}}],
      "seq_len": seq_len, "global_batch_size": batch_size, "num_workers": 0, "shuffle": False})
  it = make_train_iterator(data_cfg, cfg, tokenizer)
  try:
    return [next(it) for _ in range(count)]
  finally:
    if hasattr(it, "close"):
      it.close()


def logits_fn(model):
  keys = ("input_ids", "position_ids", "subsegment_ids", "images", "image_masks", "image_input_idx")
  return jax.jit(lambda p, b: model.apply({"params": p}, {k: b[k] for k in keys if k in b})[0])


def compare(reference: np.ndarray, quantized: np.ndarray, weights: np.ndarray) -> dict[str, float]:
  mask = weights > 0
  ref = jax.nn.log_softmax(jnp.asarray(reference[mask], jnp.float32), axis=-1)
  q = jax.nn.log_softmax(jnp.asarray(quantized[mask], jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(ref) * (ref - q), axis=-1)
  agree = jnp.argmax(ref, axis=-1) == jnp.argmax(q, axis=-1)
  return {"kl_sum": float(jnp.sum(kl)), "kl_max": float(jnp.max(kl)),
          "agree": int(jnp.sum(agree)), "positions": int(mask.sum())}


def demo_scores(checkpoint: str, recipe: str, modes, examples: int, out_dir: Path) -> list[dict]:
  """Held-out counting / pointing of the float model and each quantized mode (float32 and
  bfloat16 compute), scored by the demo's evaluation on the recipe's scenes."""
  from molmo_jax import experiment
  from molmo_jax.evals.synthetic_scores import recipe_scenes, score_scenes
  from molmo_jax.predictor import Predictor
  try:
    scene_config = recipe_scenes(experiment.load_recipe(recipe))
  except ValueError as e:
    raise SystemExit(f"error: --scores {recipe}: {e}") from None
  rows = []
  for mode in [None, *modes]:
    name = "float" if mode is None else mode.name
    for dtype in ("float32", "bfloat16"):
      predictor = Predictor.from_checkpoint(checkpoint, dtype=dtype, quantize=mode)
      scores = score_scenes(predictor, out_dir / f"{name}-{dtype}", f"{name}/{dtype}", examples, 16,
                            scene_config, quiet=True)
      rows.append({"mode": name, "compute": dtype,
                   **{k: v for k, v in scores.items() if not isinstance(v, dict)}})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="model directory (default: tiny random model)")
  p.add_argument("--modes", default="int8,int4", help="comma-separated: int8, int4, int8+vit, ...")
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--scores", default=None, metavar="RECIPE",
                 help="also score held-out counting/pointing with RECIPE's scenes (a demo model)")
  p.add_argument("--scores-examples", type=int, default=200, help="held-out scenes per task")
  p.add_argument("--json", default=str(RESULTS))
  args = p.parse_args(argv)
  if args.scores and not args.checkpoint:
    p.error("--scores needs --checkpoint (a model trained by the demo with that recipe)")
  modes = [Q.from_mapping(m) for m in args.modes.split(",") if m]

  cfg, params, tokenizer, where = load_model(args.checkpoint)
  data = batches(cfg, tokenizer, args.batches, args.batch_size, args.seq_len)
  model = Molmo(cfg)
  float_fn = logits_fn(model)
  reference = [np.asarray(float_fn(params, {k: jnp.asarray(v) for k, v in b.items()})) for b in data]
  rows = []
  for mode in modes:
    qmodel = Q.quantized_model(model, mode)
    start = time.perf_counter()
    qparams = Q.quantize_params(qmodel, params)
    jax.block_until_ready(qparams)
    seconds = time.perf_counter() - start
    fn = logits_fn(qmodel)
    totals = {"kl_sum": 0.0, "kl_max": 0.0, "agree": 0, "positions": 0}
    for b, ref in zip(data, reference):
      out = np.asarray(fn(qparams, {k: jnp.asarray(v) for k, v in b.items()}))
      part = compare(ref, out, b["loss_weights"])
      totals = {k: (max(totals[k], part[k]) if k == "kl_max" else totals[k] + part[k]) for k in totals}
    rows.append({"mode": mode.name, "positions": totals["positions"],
                 "kl_mean_nats": totals["kl_sum"] / max(totals["positions"], 1),
                 "kl_max_nats": totals["kl_max"],
                 "top1_agreement": totals["agree"] / max(totals["positions"], 1),
                 "param_bytes": Q.param_bytes(qparams), "float_param_bytes": Q.param_bytes(params),
                 "quantize_seconds": seconds})

  print(f"model: {where} ({cfg.name}), {args.batches} x {args.batch_size} synthetic examples, "
        f"teacher-forced answer positions")
  print(f"{'mode':10s} {'positions':>9s} {'KL mean':>10s} {'KL max':>10s} {'top-1 agree':>12s} "
        f"{'weights':>12s}")
  for r in rows:
    print(f"{r['mode']:10s} {r['positions']:9d} {r['kl_mean_nats']:10.2e} {r['kl_max_nats']:10.2e} "
          f"{100 * r['top1_agreement']:11.2f}% {r['param_bytes'] / r['float_param_bytes']:11.1%}")
  out = {"model": where, "config": cfg.name, "batches": args.batches, "batch_size": args.batch_size,
         "seq_len": args.seq_len, "backend": jax.default_backend(), "rows": rows}
  if args.scores:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      scores = demo_scores(args.checkpoint, args.scores, modes, args.scores_examples, Path(tmp))
    print(f"\nheld-out scenes ({args.scores_examples} per task, scenes of {args.scores})")
    print(f"{'mode':10s} {'compute':9s} {'counting':>9s} {'2-3 objects':>12s} {'pointing F1':>12s} "
          f"{'F1 with objects':>16s}")
    for r in scores:
      print(f"{r['mode']:10s} {r['compute']:9s} {r['count_accuracy']:9.3f} "
            f"{r.get('count_accuracy_2_or_more', float('nan')):12.3f} {r['pointing_f1']:12.3f} "
            f"{r.get('pointing_f1_with_objects', float('nan')):16.3f}")
    out["scores"] = {"recipe": args.scores, "examples_per_task": args.scores_examples, "rows": scores}
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
