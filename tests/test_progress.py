"""molmo_jax.progress: a bar only on a terminal, readable lines in a log."""

import io

from molmo_jax import progress as progress_lib


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_log_file_gets_plain_lines_with_totals():
  log = io.StringIO()
  bar = progress_lib.progress(3 * 2**30, "writing model", unit="B", interval_s=0.0, file=log)
  assert isinstance(bar, progress_lib.LineProgress)
  bar.update(2**30)
  bar.update(2 * 2**30)
  bar.close()
  bar.close()                                     # closing twice reports once
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue()
  assert lines[0].startswith("writing model: 1.0 GiB/3.0 GiB (33%)")
  assert lines[-1].startswith("writing model: 3.0 GiB/3.0 GiB (100%)")
  assert len(lines) == 3


def test_lines_are_rate_limited_and_count_items():
  log = io.StringIO()
  with progress_lib.progress(None, "eval", unit="ex", interval_s=3600, file=log) as bar:
    for _ in range(50):
      bar.update(1)
  assert log.getvalue().splitlines()[0].startswith("eval: 50 ex")
  assert len(log.getvalue().splitlines()) == 1     # only the closing line within the interval


def test_terminal_gets_a_tqdm_bar():
  from tqdm import tqdm
  bar = progress_lib.progress(10, "predict", unit="batch", file=_Terminal())
  assert isinstance(bar, tqdm)
  bar.close()
