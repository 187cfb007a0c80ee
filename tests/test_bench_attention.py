"""Smoke tests of experiments/bench_attention.py: tiny sizes, outputs exist and are well-formed."""

import json

from tests.test_experiments import _load


def test_flash_suite_writes_table_json_and_plot(tmp_path):
  bench = _load("bench_attention")
  out = bench.main(["--smoke", "--out-dir", str(tmp_path), "--run", "flash"])
  data = json.loads((out / "flash.json").read_text())
  assert data["env"]["jax"] and data["speed"] and data["memory"]
  for row in data["speed"]:
    assert row["pass_"] in ("fwd", "fwd+bwd")
    assert row["tflops"]["pallas-triton"] > 0 and row["tflops"]["xla"] > 0, row
  for row in data["memory"]:
    assert row["peak_bytes"]["pallas-triton"] >= 8 * row["tensor_bytes"] * 0.5, row
  table = (out / "flash.md").read_text()
  assert table.count("\n| ") == len(data["speed"]) + 1 + len(data["memory"]) + 1
  assert (out / "flash.png").stat().st_size > 10_000


def test_families_suite_times_every_family(tmp_path):
  bench = _load("bench_attention")
  out = bench.main(["--smoke", "--suite", "families", "--out-dir", str(tmp_path), "--run", "fam"])
  rows = json.loads((out / "families.json").read_text())["rows"]
  names = {r["family"] for r in rows}
  assert {"softmax-xla", "softmax-pallas", "favor", "linear", "linformer", "local"} <= names
  for row in rows:
    assert row["status"] == "ok", row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["peak_bytes"] > 0, row
  assert "forward+backward (ms)" in (out / "families.md").read_text()
  assert (out / "families.png").stat().st_size > 10_000
