"""Command line: serve a model directory over HTTP (OpenAI-compatible API and a web page).

  python -m molmo_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]
  python -m molmo_jax.serve --checkpoint WORKDIR [--step N]     (a training workdir)
  python -m molmo_jax.serve --checkpoint ckpt/molmo-7b-d --dtype bfloat16 --mesh fsdp=4 --port 8000

Then open http://127.0.0.1:8000/ or point any OpenAI client at http://127.0.0.1:8000/v1.
Needs the `serve` extra (pip install -e ".[serve]").
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from molmo_jax import errors


def parse_args(argv=None) -> argparse.Namespace:
  p = errors.ArgumentParser(prog="python -m molmo_jax.serve", description=__doc__)
  p.add_argument("--checkpoint", required=True,
                 help="model directory (converted or exported), or a training workdir (its latest "
                      "checkpoint unless --step)")
  p.add_argument("--step", type=int, default=None,
                 help="training step to serve when --checkpoint is a workdir (default: latest)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--model-name", default=None, help="name in /v1/models (default: the directory name)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  p.add_argument("--max-crops", type=int, default=None)
  p.add_argument("--quantize", choices=["none", "int8", "int4", "int8+vit", "int4+vit"],
                 default="none", help="weight-only quantization of the language model (+vit: and "
                 "the vision tower) at load time (molmo_jax.quantize)")
  p.add_argument("--resize-method", choices=["tensorflow", "torchvision"], default=None,
                 help="image resize (default: the checkpoint's config; see docs/fidelity.md)")
  p.add_argument("--mesh", default=None,
                 help='shard over a device mesh, e.g. "fsdp=4" or "data=2,tensor=4" (axes data, '
                      'fsdp, tensor, expert; "auto" = all devices on data); default: one device')
  p.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
  p.add_argument("--batch-sizes", default=None,
                 help='row counts batches are padded to, e.g. "1,8,32" (each compiles once per '
                      'prompt-length bucket); default: powers of two up to --max-batch')
  p.add_argument("--decode-chunk", type=int, default=8,
                 help="tokens decoded per call into the compiled program (streamed together)")
  p.add_argument("--quiet-decode-chunk", type=int, default=32,
                 help="tokens decoded per call for a batch where no request streams (default 32)")
  p.add_argument("--prefill-rows", type=int, default=2,
                 help="rows of a batch whose prompt and images run through the model together "
                      "(0 = the whole batch at once)")
  p.add_argument("--warmup-max-tokens", default=None,
                 help='compile these max_tokens buckets for every batch size before listening, '
                      'e.g. "32,192" (default: --default-max-tokens); "0" skips the warm-up')
  p.add_argument("--warmup-kinds", default="text,image",
                 help='which requests the warm-up compiles for: "text" (no image), "image" (a small '
                      'image) or both')
  p.add_argument("--prepare-threads", type=int, default=2,
                 help="threads that decode images and build model inputs (default 2)")
  p.add_argument("--batch-wait-ms", type=float, default=10.0,
                 help="how long a request waits for others to batch with when the server is idle")
  p.add_argument("--queue-size", type=int, default=128,
                 help="waiting requests beyond which new ones get 503 + Retry-After")
  p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
  p.add_argument("--default-max-tokens", type=int, default=192)
  p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted")
  p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
  p.add_argument("--max-image-pixels", type=int, default=None,
                 help="images with more pixels are refused as decompression bombs (default: "
                      "Pillow's limit, about 89 million, or MOLMO_JAX_MAX_IMAGE_PIXELS)")
  p.add_argument("--local-images", default=None, metavar="DIR",
                 help="also accept image paths / file:// URLs inside DIR (off by default)")
  p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
  args = p.parse_args(argv)
  if args.local_images is not None and not Path(args.local_images).is_dir():
    p.error(f"--local-images {args.local_images}: no such directory")
  for name in ("port", "max_batch", "decode_chunk", "quiet_decode_chunk", "prepare_threads",
               "queue_size", "default_max_tokens", "max_tokens_limit", "max_image_pixels"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  for name in ("request_timeout", "max_body_mb"):
    if not getattr(args, name) > 0:
      p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
  if args.batch_sizes is not None:
    try:
      args.batch_sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
      p.error(f"--batch-sizes {args.batch_sizes}: expected comma-separated integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
      p.error("--batch-sizes: expected positive integers")
  if args.prefill_rows < 0:
    p.error(f"--prefill-rows must be >= 0, got {args.prefill_rows}")
  if args.warmup_max_tokens is None:
    args.warmup_max_tokens = [args.default_max_tokens]
  else:
    try:
      args.warmup_max_tokens = [int(v) for v in args.warmup_max_tokens.split(",") if v.strip()]
    except ValueError:
      p.error(f"--warmup-max-tokens {args.warmup_max_tokens}: expected comma-separated integers")
    if min(args.warmup_max_tokens, default=0) < 0:
      p.error("--warmup-max-tokens: expected integers >= 0")
    args.warmup_max_tokens = [v for v in args.warmup_max_tokens if v > 0]
  args.warmup_kinds = tuple(k.strip() for k in args.warmup_kinds.split(",") if k.strip())
  if not args.warmup_kinds or set(args.warmup_kinds) - {"text", "image"}:
    p.error("--warmup-kinds: expected text, image or text,image")
  if args.batch_wait_ms < 0:
    p.error(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
  from molmo_jax.model_dir import locate_model
  try:   # a model directory or a training workdir, checked before anything is loaded
    args.model_source = locate_model(args.checkpoint, args.step)
  except (FileNotFoundError, ValueError) as e:
    p.error(f"--checkpoint {args.checkpoint}: {e}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    import fastapi  # noqa: F401
    import uvicorn
  except ImportError as e:
    raise errors.UserError("python -m molmo_jax.serve", f"{e.name} is not installed (pip install "
                           "-e '.[serve]')") from e
  from molmo_jax import sharding
  from molmo_jax.predictor import Predictor
  from molmo_jax.preprocess import image_io
  from molmo_jax.serve.app import ServeSettings, create_app
  from molmo_jax.serve.backend import ModelBackend
  from molmo_jax.serve.engine import BatchingEngine

  _check_can_listen(args.host, args.port)   # before loading a model that may take minutes
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if args.max_image_pixels is not None:
    image_io.set_max_image_pixels(args.max_image_pixels)
  try:
    mesh = sharding.mesh_from_spec(args.mesh) if args.mesh else None
  except ValueError as e:
    raise errors.UserError("--mesh", str(e)) from e
  predictor = Predictor.from_checkpoint(args.checkpoint, dtype=args.dtype, mesh=mesh,
                                        max_crops=args.max_crops, resize_method=args.resize_method,
                                        step=args.step, quantize=args.quantize)
  backend = ModelBackend(predictor, decode_chunk=args.decode_chunk, prefill_rows=args.prefill_rows,
                         quiet_chunk=args.quiet_decode_chunk)
  engine = BatchingEngine(backend, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                          queue_size=args.queue_size, batch_sizes=args.batch_sizes)
  if args.warmup_max_tokens:
    print(f"compiling batch sizes {engine.batch_sizes} for max_tokens {args.warmup_max_tokens} ...",
          file=sys.stderr, flush=True)
    engine.warmup(args.warmup_max_tokens, backend.warmup_inputs(args.warmup_kinds))
  engine.start()
  settings = ServeSettings(
      model_name=args.model_name or Path(args.checkpoint).resolve().name,
      max_body_bytes=int(args.max_body_mb * 2**20), default_max_tokens=args.default_max_tokens,
      max_tokens_limit=args.max_tokens_limit, request_timeout_s=args.request_timeout,
      local_image_dir=args.local_images, prepare_threads=args.prepare_threads)
  app = create_app(engine, settings)
  print(f"serving {settings.model_name} on http://{args.host}:{args.port}/ "
        f"(OpenAI API at http://{args.host}:{args.port}/v1)", file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
  finally:
    engine.stop()
  return 0


def _check_can_listen(host: str, port: int) -> None:
  import socket
  try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((host, port))
  except OSError as e:
    raise errors.UserError(f"--host {host} --port {port}", f"cannot listen there ({e.strerror or e})",
                           "choose another --port or stop what is using it") from None


def run() -> None:
  """Console entry point (`molmo-serve`)."""
  sys.exit(errors.run_main(main))


if __name__ == "__main__":
  run()
