"""Command line: ask a model about images.

  python -m molmo_jax.predict --checkpoint DIR --image bike.jpg --prompt "Point to the bike"
  python -m molmo_jax.predict --checkpoint DIR --image a.jpg --prompt "Describe" \\
      --image b.jpg --prompt "How many cats?" --json --draw out.png

--checkpoint is a model directory (converted or exported) or a training workdir (its latest
checkpoint, or --step N).
Pairs of --image/--prompt run as batches. --json prints one object per answer (answer, points in
pixels of the original image, count, finish reason). --draw saves each image with its predicted
points (OUT.png for one image, OUT-<i>.png for several); its folder must exist.
Flags and images are checked before the model is loaded; a prompt that does not fit the model's
positions with --max-new-tokens is refused (or, with --shorten-to-fit, answered shorter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from molmo_jax import errors
from molmo_jax.generate import DEFAULT_MAX_NEW_TOKENS, SamplingConfig
from molmo_jax.preprocess import image_io


def parse_args(argv=None) -> argparse.Namespace:
  p = errors.ArgumentParser(prog="python -m molmo_jax.predict", description=__doc__)
  p.add_argument("--checkpoint", required=True,
                 help="model directory, or a training workdir (latest checkpoint unless --step)")
  p.add_argument("--step", type=int, default=None,
                 help="training step to load when --checkpoint is a workdir (default: latest)")
  p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
  p.add_argument("--prompt", action="append", default=[], help="question (repeatable, pairs with --image)")
  p.add_argument("--style", default=None, help="style prefix, e.g. vqa2 (default: none, as the demo)")
  p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                 help="stop generating after this many tokens")
  p.add_argument("--shorten-to-fit", action="store_true",
                 help="when prompt + --max-new-tokens exceed the model's positions, generate fewer "
                      "tokens instead of refusing")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--max-crops", type=int, default=None,
                 help="high-resolution crops per image (default: the model's)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute and parameter dtype (default: the checkpoint's config)")
  p.add_argument("--quantize", choices=["none", "int8", "int4", "int8+vit", "int4+vit"],
                 default="none", help="weight-only quantization of the language model (+vit: and "
                 "the vision tower) at load time (molmo_jax.quantize)")
  p.add_argument("--resize-method", choices=["tensorflow", "torchvision"], default=None,
                 help="image resize: tensorflow (what converted release checkpoints use, as the HF "
                      "processor) or torchvision (the native repo's default); default: the "
                      "checkpoint's config (see docs/fidelity.md)")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--json", action="store_true",
                 help="print JSON on stdout instead of text (one object per answer)")
  p.add_argument("--draw", default=None, help="PNG path for the image(s) with predicted points")
  p.add_argument("--max-image-pixels", type=int, default=None,
                 help="Pillow's decompression-bomb limit (default %d pixels; 0 = no limit)"
                      % image_io.DEFAULT_MAX_IMAGE_PIXELS)
  args = p.parse_args(argv)
  if not args.prompt:
    p.error("at least one --prompt is needed")
  if args.image and len(args.image) != len(args.prompt):
    p.error(f"{len(args.image)} --image but {len(args.prompt)} --prompt; give them in pairs")
  for name, minimum in (("max_new_tokens", 1), ("batch_size", 1), ("max_crops", 1), ("top_k", 0),
                        ("max_image_pixels", 0)):
    value = getattr(args, name)
    if value is not None and value < minimum:
      p.error(f"--{name.replace('_', '-')}: expected >= {minimum}, got {value}")
  if args.temperature < 0:
    p.error(f"--temperature: expected >= 0, got {args.temperature}")
  if not 0 < args.top_p <= 1:
    p.error(f"--top-p: expected a number in (0, 1], got {args.top_p}")
  if args.draw and not args.image:
    p.error("--draw needs --image (there is nothing to draw on)")
  for path in args.image:
    if not Path(path).is_file():
      p.error(f"--image {path}: no such file")
  return args


def draw_paths(base: str, n: int) -> list[Path]:
  base = Path(base)
  if n == 1:
    return [base]
  return [base.with_name(f"{base.stem}-{i}{base.suffix or '.png'}") for i in range(n)]


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.max_image_pixels is not None:
    image_io.set_max_image_pixels(args.max_image_pixels or None)
  draw_targets = []
  if args.draw:
    draw_targets = draw_paths(args.draw, len(args.image))
    for path in draw_targets:      # before the model is loaded, not after generating
      errors.writable_output(path, "--draw")
  for path in args.image:   # a corrupt file is reported before the model is loaded
    image_io.load_image(path, name=path)

  from molmo_jax.predictor import Predictor
  from molmo_jax.preprocess import inputs, points as points_lib

  predictor = Predictor.from_checkpoint(args.checkpoint, dtype=args.dtype, max_crops=args.max_crops,
                                        resize_method=args.resize_method, step=args.step,
                                        quantize=args.quantize)
  images = args.image or [None] * len(args.prompt)
  sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
  preds = list(predictor.predict_many(images, args.prompt, batch_size=args.batch_size,
                                      progress=len(args.prompt) > args.batch_size, sampling=sampling,
                                      style=args.style, stop_strings=args.stop, seed=args.seed,
                                      shorten_to_fit=args.shorten_to_fit))
  for img, prompt, pred in zip(images, args.prompt, preds):
    if args.json:
      print(json.dumps({"image": img, "prompt": prompt, **pred.to_json()}))
    else:
      print(pred.text if len(preds) == 1 else f"[{img}] {prompt}\n{pred.text}\n")
  for img, pred, path in zip(args.image, preds, draw_targets):
    points_lib.draw_points(inputs.load_pixels(img, predictor.config), pred.points, out_path=path)
    print(f"wrote {path}", file=sys.stderr)
  return 0


def run() -> None:
  """Console entry point (`molmo-predict`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
