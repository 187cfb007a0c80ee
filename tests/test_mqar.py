"""MQAR: the data generator's sequences are what the task says, and `--smoke` writes a well-formed JSON, table and figure."""

import json

import numpy as np
import pytest

from tests.util import load_experiment

mqar = load_experiment("mqar")
SIZES = dict(batch=6, seq_len=40, num_kv_pairs=5, vocab_size=64)


def test_batches_pair_each_query_with_its_value():
  inputs, labels = map(np.asarray, mqar.mqar_batch(3, 7, **SIZES))
  b, t, n, v = SIZES["batch"], SIZES["seq_len"], SIZES["num_kv_pairs"], SIZES["vocab_size"]
  assert inputs.shape == labels.shape == (b, t) and inputs.dtype == labels.dtype == np.int32
  assert ((inputs >= 0) & (inputs < v)).all()
  for row_in, row_lab in zip(inputs, labels):
    keys, values = row_in[:2 * n:2], row_in[1:2 * n:2]
    # Distinct keys in the lower half, distinct values in the upper half (disjoint), filler 0 elsewhere.
    assert len(set(keys)) == n and len(set(values)) == n, row_in
    assert ((keys >= 1) & (keys < v // 2)).all() and (values >= v // 2).all(), row_in
    assert set(row_in[2 * n:]) <= set(keys) | set(values) | {mqar.FILLER}
    # One query per key after the context; its target is the paired value; nothing else is scored.
    query = np.flatnonzero(row_lab != mqar.IGNORE)
    assert len(query) == n and (query >= 2 * n).all(), row_lab
    paired = dict(zip(keys, values))
    assert sorted(row_in[query]) == sorted(keys)
    assert all(row_lab[q] == paired[row_in[q]] for q in query), (row_in, row_lab)
    assert all(row_in[q + 1] == row_lab[q] for q in query if q + 1 < t)  # the value follows its query


def test_batches_are_a_pure_function_of_seed_and_step():
  a = mqar.mqar_batch(0, 1, **SIZES)
  np.testing.assert_array_equal(a[0], mqar.mqar_batch(0, 1, **SIZES)[0])
  np.testing.assert_array_equal(a[1], mqar.mqar_batch(0, 1, **SIZES)[1])
  assert not np.array_equal(a[0], mqar.mqar_batch(0, 2, **SIZES)[0])
  assert not np.array_equal(a[0], mqar.mqar_batch(1, 1, **SIZES)[0])


def test_sizes_that_cannot_hold_the_queries_raise():
  with pytest.raises(ValueError, match="num_kv_pairs=11"):
    mqar.mqar_batch(0, 0, **{**SIZES, "num_kv_pairs": 11})
  with pytest.raises(ValueError, match="vocab_size=8"):
    mqar.mqar_batch(0, 0, **{**SIZES, "vocab_size": 8})


@pytest.mark.slow  # 20 s on 2 cores; test_one_model_per_pair_count_without_mix runs the script by default
def test_smoke_run_writes_json_table_and_figure(tmp_path):
  mqar.main(["--smoke", "--out-dir", str(tmp_path), "--run", "smoke"])
  out = tmp_path / "smoke"

  result = json.loads((out / "mqar.json").read_text())
  cfg = result["config"]
  axes = result["axes"]
  assert list(axes) == ["family", "width", "num_kv_pairs", "seed"]
  assert "linformer" in result["skipped"] and "linformer" not in axes["family"]
  shape = tuple(len(v) for v in axes.values())
  accuracy = np.asarray(result["accuracy"])
  assert accuracy.shape == shape and np.isfinite(accuracy).all() and ((accuracy >= 0) & (accuracy <= 1)).all()
  assert len(result["runs"]) == int(np.prod(shape))
  for run in result["runs"]:
    assert run["steps"] == cfg["steps"] and run["seconds"] > 0 and 0 <= run["accuracy"] <= 1, run
    assert run["trained_on"] == cfg["num_kv_pairs"], run  # Zoology's protocol: one model sees every pair count

  table = (out / "mqar.md").read_text()
  assert table.count("\n| ") == len(cfg["widths"]) * (1 + len(cfg["families"]))  # a header + a row per family
  assert "nan" not in table and "linformer" in table

  png = (out / "mqar.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_one_model_per_pair_count_without_mix(tmp_path):
  result = mqar.main(["--smoke", "--no-mix", "--families", "softmax", "--steps", "3", "--out-dir", str(tmp_path),
                      "--run", "per_count"])
  assert [r["trained_on"] for r in result["runs"]] == [[n] for n in result["config"]["num_kv_pairs"]]
  assert (tmp_path / "per_count" / "mqar.png").exists()


def test_mixed_batches_must_split_evenly():
  with pytest.raises(SystemExit):
    mqar.parse_args(["--smoke", "--batch", "9"])  # two pair counts


@pytest.mark.slow  # 11 s on 2 cores
def test_training_steps_per_call_do_not_change_the_result():
  cfg = mqar.parse_args(["--smoke", "--steps", "6", "--steps-per-call", "1"])
  one = mqar.train_one(cfg, "softmax", 16, (2, 4), 0)
  cfg4 = mqar.parse_args(["--smoke", "--steps", "6", "--steps-per-call", "4"])  # 4 + 2 steps
  four = mqar.train_one(cfg4, "softmax", 16, (2, 4), 0)
  for a, b in zip(one, four, strict=True):
    assert a["steps"] == b["steps"] == 6
    np.testing.assert_allclose(a["final_train_loss"], b["final_train_loss"], rtol=1e-5)
    np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-5)


@pytest.mark.slow  # 20 s on 2 cores
def test_merge_joins_sweeps_of_other_seeds_and_refuses_other_settings(tmp_path):
  common = ["--smoke", "--families", "softmax", "--steps", "3", "--out-dir", str(tmp_path)]
  a = mqar.main([*common, "--seed", "0", "--run", "a"])
  b = mqar.main([*common, "--seed", "5", "--run", "b"])
  merged = mqar.main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--run", "ab", "--out-dir", str(tmp_path)])
  assert merged["config"]["seeds"] == 2 and merged["axes"]["seed"] == [0, 1]
  accuracy = np.asarray(merged["accuracy"])  # [family, width, pairs, seed]
  np.testing.assert_array_equal(accuracy[..., 0], np.asarray(a["accuracy"])[..., 0])
  np.testing.assert_array_equal(accuracy[..., 1], np.asarray(b["accuracy"])[..., 0])
  assert sorted({r["data_seed"] for r in merged["runs"]}) == [0, 5]
  assert (tmp_path / "ab" / "mqar.png").exists()
  with pytest.raises(SystemExit, match="same seeds"):
    mqar.main(["merge", str(tmp_path / "a"), str(tmp_path / "a"), "--out-dir", str(tmp_path)])
  mqar.main([*common, "--seed", "1", "--steps", "4", "--run", "c"])
  with pytest.raises(SystemExit, match="steps"):
    mqar.main(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out-dir", str(tmp_path)])
