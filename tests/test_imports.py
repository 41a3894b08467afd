"""The import rules, checked on the source (ast): the library (molmo_jax/, convert/) never imports a
recipe (configs/), the demo or a command-line module, and no command-line module imports another.

The demo registers its pieces (synthetic source kind, demo tokenizer, synthetic eval tasks) in the
library's registries when imported; recipes name it in config.plugins, eval.py in --plugins. Its
scoring (evals/synthetic_scores.py) is shared by the demo and the benchmarks that score a
demo-trained model.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Command-line modules: top-level tools, benchmarks, and the two tools inside the package.
CLI_MODULES = {"train", "eval", "aot", "molmo_jax.predict", "molmo_jax.demo", "molmo_jax.serve.__main__"} | {
    f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
DEMO_MODULES = {"molmo_jax.demo", "molmo_jax.data.synthetic", "molmo_jax.data.demo_tokenizer",
                "molmo_jax.evals.synthetic_tasks", "molmo_jax.evals.synthetic_scores"}


def module_name(path: Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
  """Every module an import statement in `path` names (anywhere, also inside functions)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      # `from configs import demo` / `from molmo_jax.data import synthetic` name a module too.
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _matches(name: str, modules: set[str]) -> set[str]:
  return {m for m in modules if name == m or name.startswith(m + ".")}


def library_files() -> list[Path]:
  files = sorted((ROOT / "molmo_jax").rglob("*.py")) + sorted((ROOT / "convert").rglob("*.py"))
  return [p for p in files if module_name(p) not in DEMO_MODULES | CLI_MODULES]


def test_the_walk_finds_what_it_should(tmp_path):
  # The checker itself: every form of import is seen.
  probe = tmp_path / "probe.py"
  probe.write_text("import configs.demo\nfrom molmo_jax.data import synthetic\n"
                   "def f():\n  from molmo_jax import demo\n  import train\n")
  names = imported_modules(probe)
  assert {"configs.demo", "molmo_jax.data.synthetic", "molmo_jax.demo", "train"} <= names
  assert _matches("configs.demo", {"configs"}) == {"configs"}
  assert not _matches("molmo_jax.demo_tools", {"molmo_jax.demo"})
  assert len(library_files()) > 40


@pytest.mark.parametrize("forbidden,label", [
    ({"configs"}, "a recipe (configs/)"),
    (DEMO_MODULES, "a demo module"),
    (CLI_MODULES, "a command-line module"),
])
def test_library_imports_no_recipe_demo_or_cli(forbidden, label):
  bad = []
  for path in library_files():
    for name in sorted(imported_modules(path)):
      if _matches(name, forbidden):
        bad.append(f"{path.relative_to(ROOT)} imports {name}")
  assert not bad, f"library code imports {label}:\n" + "\n".join(bad)


def test_no_command_line_module_imports_another():
  bad = []
  for name in sorted(CLI_MODULES):
    path = ROOT / (name.replace(".", "/") + ".py")
    assert path.is_file(), path
    for imported in sorted(imported_modules(path)):
      others = _matches(imported, CLI_MODULES - {name})
      if others:
        bad.append(f"{path.relative_to(ROOT)} imports {imported}")
  assert not bad, "command-line modules import each other:\n" + "\n".join(bad)
