"""The package import graph: dependencies run one way and no module reaches into another's private names.

Layers, lowest first: `pallas` (kernels and the contract they check), `efficient_attention`
(families, modules, the LM), `experiments`. Every import of the three packages is read with
`ast` (imports inside functions included) and checked:

- a package imports only packages below it (so there is no cycle), and `pallas` imports neither
  Flax nor anything of the layers above;
- no module imports a private (underscore) name of another module, nor reads one as an
  attribute of a module it imported (`from pallas.softmax import _forward`, `la._prepare`);
  importing a private module of one's own package (`from pallas import softmax_tpu`,
  `from efficient_attention import _checks`) is allowed, a private module of another package is not.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("pallas", "efficient_attention", "experiments")
# Third-party packages a layer must not import.
FORBIDDEN = {"pallas": ("flax", "optax", "orbax")}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, source: str):
  """(line, imported module, imported name or None, alias) for every import of the file, and
  (line, alias, attribute) for every attribute read on a name."""
  tree = ast.parse(source, str(path))
  package = _module_name(path).split(".")[0]
  imports, attributes = [], []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        imports.append((node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0]))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join([package] + ([base] if base else []))
      for alias in node.names:
        imports.append((node.lineno, base, alias.name, alias.asname or alias.name))
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      attributes.append((node.lineno, node.value.id, node.attr))
  return imports, attributes


def _is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def violations(files: list[tuple[pathlib.Path, str]]) -> list[str]:
  """Every breach of the rules above in `files` ((path, source) pairs), as `path:line: what`."""
  found = []
  for path, source in files:
    here = _module_name(path)
    package = here.split(".")[0]
    imports, attributes = _imports(path, source)
    module_aliases = {}
    for line, module, name, alias in imports:
      where = f"{path.relative_to(ROOT)}:{line}"
      target = module if name is None else f"{module}.{name}"
      top = module.split(".")[0]
      if top in FORBIDDEN.get(package, ()):
        found.append(f"{where}: {package} imports {top}")
      if top in LAYERS and LAYERS.index(top) > LAYERS.index(package):
        found.append(f"{where}: {package} imports {top}, a layer above it")
      if top not in LAYERS:
        continue
      parts = target.split(".")
      for i, part in enumerate(parts[1:], start=1):
        if not _private(part):
          continue
        prefix = ".".join(parts[:i + 1])
        if _is_module(prefix):
          if top != package:
            found.append(f"{where}: imports {prefix}, a private module of another package")
        elif ".".join(parts[:i]) != here:
          found.append(f"{where}: imports the private name {prefix}")
      if _is_module(target) and target != here:
        module_aliases[alias] = target
    for line, alias, attr in attributes:
      if alias in module_aliases and _private(attr) and not _is_module(f"{module_aliases[alias]}.{attr}"):
        found.append(f"{path.relative_to(ROOT)}:{line}: reads the private name {module_aliases[alias]}.{attr}")
  return found


def _files() -> list[tuple[pathlib.Path, str]]:
  return [(p, p.read_text()) for p in sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))]


def test_dependencies_run_one_way_and_stay_public():
  files = _files()
  assert {_module_name(p).split(".")[0] for p, _ in files} == set(LAYERS)
  assert violations(files) == []


# Each probe is read as if it were a module of the layer named first.
@pytest.mark.parametrize("layer, source, expected", [
    ("pallas", "from efficient_attention import _checks\n", "pallas imports efficient_attention, a layer above it"),
    ("pallas", "import efficient_attention\n", "pallas imports efficient_attention, a layer above it"),
    ("pallas", "def f():\n  from experiments import cli\n", "pallas imports experiments, a layer above it"),
    ("pallas", "from flax import nnx\n", "pallas imports flax"),
    ("pallas", "from pallas.softmax import _q_ranges\n", "imports the private name pallas.softmax._q_ranges"),
    ("pallas", "from pallas import linear as la\nx = la._core\n", "reads the private name pallas.linear._core"),
    ("efficient_attention", "from pallas.linear import _kernel\n", "imports the private name pallas.linear._kernel"),
    ("efficient_attention", "from experiments import cli\n",
     "efficient_attention imports experiments, a layer above it"),
    ("experiments", "from efficient_attention import _checks\n",
     "imports efficient_attention._checks, a private module of another package"),
    ("experiments", "from efficient_attention._linear import plan_masks\n",
     "imports efficient_attention._linear, a private module of another package"),
])
def test_a_bad_import_fails(layer, source, expected):
  found = violations([(ROOT / layer / "probe.py", source)])
  assert any(f.endswith(expected) for f in found), found


def test_allowed_imports_pass():
  sources = {
      "pallas": "from pallas import common\nfrom pallas.tiling import pow2_at_least\nimport jax\n",
      "efficient_attention": ("from efficient_attention import _checks\nfrom pallas import linear\n"
                              "x = linear.prepare\n"),
      "experiments": ("import efficient_attention as ea\nfrom experiments import cli\n"
                      "from pallas.softmax import BlockSizes\n"),
  }
  assert violations([(ROOT / layer / "probe.py", source) for layer, source in sources.items()]) == []


def test_import_pallas_leaves_flax_and_the_families_out():
  import subprocess
  import sys

  code = ("import sys, pallas; loaded = [m for m in ('flax', 'efficient_attention', 'experiments') "
          "if m in sys.modules]; assert not loaded, loaded")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
