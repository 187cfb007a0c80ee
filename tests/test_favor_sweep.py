"""Smoke test of the FAVOR+ error sweep: `--smoke` writes a well-formed JSON, table and figure."""

import json

import numpy as np

from tests.util import load_experiment


def test_smoke_sweep_writes_json_table_and_figure(tmp_path):
  sweep = load_experiment("favor_sweep")
  sweep.main(["--smoke", "--out-dir", str(tmp_path), "--run", "smoke"])
  out = tmp_path / "smoke"

  result = json.loads((out / "favor_sweep.json").read_text())
  assert result["config"]["num_features"] == [16, 32] and result["config"]["seeds"] == 2
  axes = result["axes"]
  assert list(axes) == ["logit_std", "kernel", "features", "num_features", "seed"]
  shape = tuple(len(v) for v in axes.values())
  assert set(result["errors"]) == set(sweep.METRICS)
  for name, errs in result["errors"].items():
    errs = np.asarray(errs)
    assert errs.shape == shape, (name, errs.shape, shape)
    assert np.isfinite(errs).all() and (errs > 0).all(), name
  for key in ("slopes", "slope_std"):
    for name, slopes in result[key].items():
      assert np.asarray(slopes).shape == shape[:3] and np.isfinite(slopes).all(), (key, name)
  ratios = result["ratios"]
  assert np.asarray(ratios["orthogonal_over_iid"]["attention_mse"]).shape == shape[:2]
  assert np.asarray(ratios["positive_over_trig"]["attention_mse"]).shape == (shape[0], shape[2])

  table = (out / "favor_sweep.md").read_text()
  assert table.count("\n| ") == 1 + shape[0] * shape[1] * shape[2]  # header + a row per setting
  assert "nan" not in table and "inf" not in table

  png = (out / "favor_sweep.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
