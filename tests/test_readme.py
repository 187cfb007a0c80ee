"""The README's Python examples run as written."""

import pathlib
import re

import pytest

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), re.S)


def test_readme_has_examples():
  assert _BLOCKS


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_example_runs(index):
  namespace = {}
  exec(compile(_BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
  for name in ("exact", "favor", "linear", "linformer", "sparse", "lsh"):
    if name in namespace:
      assert namespace[name].shape == namespace["q"].shape, name
