"""aot.py on bad input: no usable libtpu, a bad topology, an unwritable --json (before compiling)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_in_process

sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("aot_cli", REPO / "aot.py")
aot_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot_cli)

CONFIG = ["--config", str(REPO / "configs/tiny_test.py")]


def test_missing_libtpu_is_a_user_error(monkeypatch, capfd):
  from jax.experimental import topologies

  def no_tpu(**kwargs):
    raise RuntimeError("Unable to initialize backend 'tpu': no libtpu found")

  monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
  code, err = run_in_process(aot_cli.main, [*CONFIG, "--topology", "v5p:2x2x1"], capfd)
  assert_one_line_error(code, err, 2, "--topology v5p:2x2x1", "libtpu")


@pytest.mark.parametrize("args,names", [
    (["--topology", "v9x:2x2"], ("--topology", "v9x:2x2")),
    (["--topology", "v5p:2x2x1", "--json", "/no/such/folder/report.json"], ("unexpected argument",)),
    (["--topology", "v5p:2x2x1", "--config.model.llm.d_modle=64"], ("d_modle",)),
])
def test_bad_arguments_are_refused_before_compiling(args, names, capfd):
  code, err = run_in_process(aot_cli.main, [*CONFIG, *args], capfd)
  assert_one_line_error(code, err, 2, *names)
