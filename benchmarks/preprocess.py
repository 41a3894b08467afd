"""Image pre-processing throughput on one CPU core: JPEG decode + multi-crop (the reference's olmo/data/model_preprocessor.py).

Run:  .venv/bin/python benchmarks/preprocess.py [--repeats 40] [--out PATH]
      (default PATH: benchmarks/results/preprocess.json)

Encodes a synthetic 1024x768 JPEG in memory (no files or network), then times, with the process's
CPU clock (robust to other jobs sharing the machine), `load_image` alone and `load_image` +
`multicrop_image` at 12 and 36 crops, for both resize methods. Images/s per core = 1 / median
CPU seconds per image. Thread pools are pinned to one thread before NumPy is imported.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
  os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from molmo_jax.config import PreprocessConfig  # noqa: E402
from molmo_jax.preprocess.image import multicrop_image  # noqa: E402
from molmo_jax.preprocess.image_io import load_image  # noqa: E402

WIDTH, HEIGHT = 1024, 768


def synthetic_jpeg(width: int = WIDTH, height: int = HEIGHT, quality: int = 90) -> bytes:
  """A photo-like JPEG: smooth colour waves plus sensor-like noise (so decoding is not trivial)."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = [128 + 90 * np.sin(x / (31 + 7 * c) + c) * np.cos(y / (23 + 5 * c) - c)
              for c in range(3)]
  pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def cpu_seconds_per_call(fn, repeats: int) -> dict:
  fn()   # warm caches and scratch buffers
  samples = []
  for _ in range(repeats):
    start = time.process_time()
    fn()
    samples.append(time.process_time() - start)
  samples = np.array(samples)
  return {"median_ms": float(np.median(samples) * 1e3), "best_ms": float(samples.min() * 1e3),
          "images_per_s": float(1.0 / np.median(samples))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "preprocess.json"))
  args = parser.parse_args()

  data = synthetic_jpeg()
  rows = [("decode only", None, None, lambda: load_image(data))]
  for method in ("tensorflow", "torchvision"):
    cfg = PreprocessConfig(resize_method=method)
    for max_crops in (12, 36):
      rows.append(("decode+multicrop", method, max_crops,
                   lambda cfg=cfg, m=max_crops: multicrop_image(load_image(data), cfg, m)))

  results = []
  print(f"{WIDTH}x{HEIGHT} JPEG ({len(data)} bytes), one thread, {args.repeats} repeats")
  print(f"{'stage':18s} {'resize':12s} {'crops':>5s} {'crops+1':>7s} {'median ms':>10s} "
        f"{'best ms':>8s} {'img/s/core':>10s}")
  for stage, method, max_crops, fn in rows:
    timing = cpu_seconds_per_call(fn, args.repeats)
    n_crops = multicrop_image(load_image(data), PreprocessConfig(), max_crops).num_crops \
        if max_crops else 0
    results.append({"stage": stage, "resize_method": method, "max_crops": max_crops,
                    "num_crops": n_crops, **timing})
    print(f"{stage:18s} {method or '-':12s} {max_crops or '-':>5} {n_crops or '-':>7} "
          f"{timing['median_ms']:10.2f} {timing['best_ms']:8.2f} {timing['images_per_s']:10.1f}")

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"image": f"{WIDTH}x{HEIGHT} JPEG", "jpeg_bytes": len(data), "threads": 1,
               "clock": "process CPU time", "repeats": args.repeats,
               "machine": platform.processor() or platform.machine(),
               "numpy": np.__version__, "results": results}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
