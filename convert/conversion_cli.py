"""The command-line skeleton both converters share (convert.hf_to_orbax, convert.orbax_to_hf).

Arguments SOURCE OUT_DIR, `--dtype auto|float32|bfloat16`, the tool's own options, then
`--overwrite` / `--force`; the conversion runs on the CPU with Ctrl-C deferred to the next
block (errors.deferred_interrupt) and ends with one line: output, seconds, MiB/s of safetensors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from molmo_jax import errors

OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jax.numpy.bfloat16)}


def requested_dtype(requested: str) -> np.dtype | None:
  """The dtype `--dtype` names, or None for `auto` (the caller decides from what is stored)."""
  if requested in OUT_DTYPES:
    return OUT_DTYPES[requested]
  if requested != "auto":
    raise ValueError(f"dtype: expected auto, float32 or bfloat16, got {requested!r}")
  return None


def converter_parser(prog: str, doc: str | None, *, source: str, source_help: str, out_help: str,
                     written: str, out_kind: str,
                     options: Sequence[tuple[str, dict[str, Any]]] = ()) -> errors.ArgumentParser:
  """SOURCE OUT_DIR --dtype [options] --overwrite --force; `out_kind` is what --overwrite
  may replace ("a model directory"), `written` what --dtype sets ("parameters")."""
  parser = errors.ArgumentParser(prog=prog, description=doc)
  parser.add_argument(source, help=source_help)
  parser.add_argument("out_dir", help=out_help)
  parser.add_argument("--dtype", default="auto", choices=["auto", *OUT_DTYPES],
                      help=f"dtype of the written {written} (auto: as stored)")
  for flag, kwargs in options:
    parser.add_argument(flag, **kwargs)
  parser.add_argument("--overwrite", action="store_true",
                      help=f"replace OUT_DIR if it is {out_kind} (after the new one is complete)")
  parser.add_argument("--force", action="store_true",
                      help="replace OUT_DIR whatever it holds (never the source or a folder around it)")
  return parser


def run_conversion(convert: Callable[[Callable[[], None]], Path],
                   safetensors_bytes: Callable[[Path], int], moved: str) -> int:
  """convert(check_interrupt) -> output path; prints the closing line (`moved`: "read" or
  "written", of `safetensors_bytes(output)` bytes)."""
  jax.config.update("jax_platforms", "cpu")   # conversion needs no accelerator
  start = time.perf_counter()
  with errors.deferred_interrupt("conversion interrupted") as interrupt:
    out = convert(interrupt.check)
  seconds = time.perf_counter() - start
  size = safetensors_bytes(out)
  print(f"wrote {out} in {seconds:.1f} s ({size / 2**20 / seconds:.1f} MiB/s of safetensors {moved})")
  return 0
