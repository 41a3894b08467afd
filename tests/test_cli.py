"""The command lines as a user meets them: --help for every tool (exit 0, defaults shown), the
console entry points of pyproject.toml, typo detection in --config overrides, every command in the
README and docs/ parsing, and the README's Python snippet running on a tiny checkpoint."""

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from absl import flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molmo_jax import config_cli  # noqa: E402

# module -> how the docs invoke it
TOOLS = {
    "train": ("python train.py", "molmo-train"),
    "eval": ("python eval.py", "molmo-eval"),
    "aot": ("python aot.py", "molmo-aot"),
    "molmo_jax.predict": ("python -m molmo_jax.predict", "molmo-predict"),
    "molmo_jax.demo": ("python -m molmo_jax.demo", "molmo-demo"),
    "convert.hf_to_orbax": ("python -m convert.hf_to_orbax", "molmo-hf-to-orbax"),
    "convert.orbax_to_hf": ("python -m convert.orbax_to_hf", "molmo-orbax-to-hf"),
    "convert.inspect": ("python -m convert.inspect", "molmo-inspect"),
    "convert.build_initial": ("python -m convert.build_initial", "molmo-build-initial"),
    "molmo_jax.serve.__main__": ("python -m molmo_jax.serve", "molmo-serve"),
    "molmo_jax.quantize": ("python -m molmo_jax.quantize", "molmo-quantize"),
}
ABSL_TOOLS = ("train", "aot")


class Parsed(Exception):
  """Raised instead of running a tool once its flags parsed."""


def tool_main(module: str):
  return importlib.import_module(module).main


def help_text(module: str, capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    tool_main(module)(["--help"])
  assert exit_info.value.code in (0, None), module
  return capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(TOOLS))
def test_help_exits_0_and_shows_defaults(module, capsys):
  text = help_text(module, capsys)
  assert "default" in text, text
  if module in ABSL_TOOLS:
    assert "--config" in text and "(default: required)" in text


def test_entry_points_name_every_tool():
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  by_module = {target.split(":")[0]: (name, target) for name, target in scripts.items()}
  for module, (_, command) in TOOLS.items():
    name, target = by_module[module]
    assert name == command
    attribute = target.split(":")[1]
    assert callable(getattr(importlib.import_module(module), attribute))


def test_recipe_help_lists_fields_and_typos_exit_2(capsys):
  import train
  with pytest.raises(SystemExit) as exit_info:
    train.main(["--config", str(ROOT / "configs/tiny_test.py"), "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "total_steps: 30" in out and "residual_dropout: null" in out
  assert train.main(["--config", str(ROOT / "configs/tiny_test.py"), "--workdir", "w",
                     "--config.total_stepz=3"]) == 2
  err = capsys.readouterr().err
  assert "total_stepz" in err and "total_steps" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------
# Commands in the docs
# ------------------------------------------------------------------------------------------

def doc_commands() -> list[tuple[str, str, list[str]]]:
  """(doc file, module, argv) for every shell command in a bash code block that runs a tool."""
  found = []
  prefixes = {}
  for module, (python_form, console) in TOOLS.items():
    prefixes[tuple(shlex.split(python_form))] = module
    prefixes[(console,)] = module
  docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  for doc in docs:
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", doc.read_text(), re.S):
      for command in block.replace("\\\n", " ").splitlines():
        if not re.match(r"\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3?|molmo-)", command):
          continue     # output, tables and other tools
        words = shlex.split(command, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):   # VAR=value prefixes
          words = words[1:]
        for redirect in (">", "|", "2>", "&&", ";"):
          if redirect in words:
            words = words[:words.index(redirect)]
        for prefix, module in prefixes.items():
          if tuple(words[:len(prefix)]) == prefix:
            found.append((doc.name, module, words[len(prefix):]))
  return found


def test_docs_show_the_tools():
  modules = {module for _, module, _ in doc_commands()}
  assert {"train", "eval", "aot", "molmo_jax.predict", "convert.hf_to_orbax",
          "convert.orbax_to_hf"} <= modules, modules


@pytest.mark.parametrize("doc,module,argv", doc_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_doc_command_parses(doc, module, argv, monkeypatch):
  """The flags of every documented command parse (absl tools: the recipe loads with its
  overrides too); nothing runs."""
  monkeypatch.chdir(ROOT)
  if module in ABSL_TOOLS:
    tool = importlib.import_module(module)
    holders = [h for h in vars(tool).values() if isinstance(h, flags.FlagHolder)]
    try:
      config_cli.parse([module, *argv], module, tool.__doc__, holders, tool.FLAGS)
    except config_cli.UsageError as e:
      pytest.fail(f"{doc}: {module} {' '.join(argv)}: {e}")
    return
  original = argparse.ArgumentParser.parse_args

  def parse_then_stop(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), pytest.raises(Parsed):
    try:
      tool_main(module)(argv)
    except SystemExit as e:
      pytest.fail(f"{doc}: {module} {' '.join(argv)}: exit {e.code}: {stderr.getvalue()}")


def test_readme_python_snippet_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image

  from molmo_jax import config as C
  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
  from molmo_jax.model_dir import save_model_checkpoint
  from molmo_jax.models.molmo import Molmo, example_batch_shapes

  readme = (ROOT / "README.md").read_text()
  snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert snippets, "the README shows the Python API"
  snippet = snippets[0]
  checkpoint = re.search(r'from_checkpoint\("([^"]+)"', snippet).group(1)
  images = set(re.findall(r'"([^"]+\.(?:jpg|png))"', snippet))
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(tmp_path / "tok", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  save_model_checkpoint(tmp_path / checkpoint, jax.device_get(params), cfg,
                        tokenizer_dir=tmp_path / "tok")
  for name in images:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(
        tmp_path / name)
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(snippet, "README.md", "exec"), {})
  assert out.getvalue().strip()
