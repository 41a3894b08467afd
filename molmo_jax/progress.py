"""Progress that stays readable in logs: a tqdm bar on a terminal, plain periodic lines elsewhere.

`progress(total, desc)` returns an object with `update(n)` and `close()` (also a context
manager). On a terminal it is a tqdm bar; when stderr is a file or a pipe, carriage-return bars
would turn a log into one unreadable line, so it prints `desc: n/total (p%)` at most every
`interval_s` seconds and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO


def _format(n: float, unit: str) -> str:
  if unit != "B":
    return f"{int(n)}"
  for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {name}"
  return f"{int(n)} B"


class LineProgress:
  """Periodic one-line reports; the same `update`/`close` surface as a tqdm bar."""

  def __init__(self, total: float | None, desc: str, unit: str, interval_s: float, file: TextIO):
    self.total, self.desc, self.unit, self.interval_s, self.file = total, desc, unit, interval_s, file
    self.n = 0.0
    self._start = self._last = time.monotonic()
    self._closed = False

  def _report(self) -> None:
    done = _format(self.n, self.unit)
    if self.total:
      line = f"{self.desc}: {done}/{_format(self.total, self.unit)} ({100 * self.n / self.total:.0f}%)"
    else:
      line = f"{self.desc}: {done} {self.unit}"
    print(f"{line}, {time.monotonic() - self._start:.0f} s", file=self.file, flush=True)

  def update(self, n: float = 1) -> None:
    self.n += n
    now = time.monotonic()
    if now - self._last >= self.interval_s:
      self._last = now
      self._report()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._report()

  def __enter__(self) -> "LineProgress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(total: float | None, desc: str, unit: str = "it", *, interval_s: float = 15.0,
             file: TextIO | None = None):
  """A tqdm bar when `file` (default stderr) is a terminal, else a `LineProgress`."""
  file = file or sys.stderr
  if getattr(file, "isatty", lambda: False)():
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                dynamic_ncols=True, file=file)
  return LineProgress(total, desc, unit, interval_s, file)


def quiet_training_logs() -> None:
  """Root logging for a run driven from a script (the demo, benchmarks that train): training
  progress (molmo_jax.train) at INFO with short timestamps; libraries (absl, Orbax, JAX, grain)
  and per-example data notes at WARNING."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                      force=True)
  for name in ("absl", "orbax", "jax", "grain", "molmo_jax.data"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass
