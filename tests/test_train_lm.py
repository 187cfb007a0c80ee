"""train_lm.py, lm_data.py and compare.py on shrunk configurations (CPU)."""

import json
import os
import pathlib
import subprocess
import sys
import urllib.request

import jax
import numpy as np
import pytest

from tests.util import load_experiment

_ROOT = pathlib.Path(__file__).resolve().parents[1]
train_lm = load_experiment("train_lm")
lm_data = load_experiment("lm_data")


def _records(out: pathlib.Path, kind: str) -> list[dict]:
  return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _smoke(out, *args) -> dict:
  return train_lm.main(["--preset", "smoke", "--no-progress", "--out-dir", str(out), *args])


# FAVOR+ and Linformer also train in test_compare_trains_each_family_and_writes_table_csv_and_plot.
@pytest.mark.parametrize("family", ["softmax", pytest.param("favor", marks=pytest.mark.slow), "linear",
                                    pytest.param("linformer", marks=pytest.mark.slow), "local", "block_sparse", "lsh"])
def test_every_family_trains_and_the_held_out_loss_falls(tmp_path, family):
  summary = _smoke(tmp_path, "--attention", family)
  evals = _records(tmp_path, "eval")
  assert [r["step"] for r in evals] == [0, 4, 8]
  assert evals[-1]["loss"] < evals[0]["loss"] - 0.2, evals
  assert summary["finished"] and summary["steps"] == 8 and summary["causal"] == (family != "linformer")
  assert summary["eval"]["bpc"] == pytest.approx(evals[-1]["loss"] / np.log(2))
  assert summary["params"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
  assert (tmp_path / "checkpoints" / "8").is_dir()
  assert (summary["sample"] is None) == (family in ("linformer", "block_sparse", "lsh"))


def test_attention_takes_a_comma_separated_hybrid_pattern():
  cfg = train_lm.parse_args(["--attention", "gla,local", "--gate", "step", "--no-output-gate", "--short-conv", "2"])
  model = train_lm.lm_config(cfg)
  assert model.attention == ("gla", "local") and model.is_causal
  assert (model.gate, model.output_gate, model.short_conv) == ("step", False, 2)
  with pytest.raises(SystemExit):
    train_lm.parse_args(["--attention", "gla,lsm"])
  with pytest.raises(SystemExit):
    train_lm.parse_args(["--attention", "gla,local", "--num-layers", "1"])


@pytest.mark.slow  # about 25 s on 2 CPU cores
def test_a_hybrid_of_the_recurrent_families_trains_and_samples(tmp_path):
  summary = _smoke(tmp_path, "--attention", "gla,delta_rule", "--num-layers", "2", "--gated", "--steps", "4",
                   "--warmup-steps", "1", "--eval-every", "4")
  assert [r["step"] for r in _records(tmp_path, "eval")] == [0, 4]
  assert summary["finished"] and summary["causal"] and summary["sample"] is not None


@pytest.mark.slow  # 36 s; resumes matching an uninterrupted run are also checked by test_run_dir's kill tests
def test_resume_continues_the_same_trajectory_bit_for_bit(tmp_path):
  # Dropout and FAVOR+ redraws make the trajectory depend on the restored RNG and feature state too.
  args = ("--attention", "favor", "--redraw-interval", "3", "--dropout", "0.1", "--steps", "8", "--log-every", "1",
          "--checkpoint-every", "3", "--sample-tokens", "0")
  _smoke(tmp_path / "whole", *args)
  _smoke(tmp_path / "split", *args, "--stop-after", "4")
  assert _records(tmp_path / "split", "train")[-1]["step"] == 4
  _smoke(tmp_path / "split", *args, "--resume")
  whole, split = ([(r["kind"], r["step"], r["loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl")
                                                                    .read_text().splitlines()) if r["kind"] != "resume"]
                  for d in ("whole", "split"))
  assert len(whole) == 8 + 3 and whole == split  # exact equality: same losses to the last digit


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_checkpoints(tmp_path):
  _smoke(tmp_path, "--steps", "4", "--sample-tokens", "0")
  with pytest.raises(SystemExit, match="different settings.*learning_rate"):
    _smoke(tmp_path, "--steps", "4", "--learning-rate", "0.1", "--resume")
  with pytest.raises(SystemExit, match="already holds checkpoints"):
    _smoke(tmp_path, "--steps", "4")
  with pytest.raises(SystemExit, match="no checkpoint"):
    _smoke(tmp_path / "new", "--resume")


def test_sharded_run_matches_one_device(tmp_path):
  args = ["--preset", "smoke", "--no-progress", "--steps", "5", "--log-every", "1", "--batch-size", "8",
          "--sample-tokens", "0", "--no-checkpoint"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  subprocess.run([sys.executable, str(_ROOT / "experiments/train_lm.py"), *args, "--mesh", "data=2,fsdp=2",
                  "--out-dir", str(tmp_path / "mesh")], check=True, env=env)
  summary = json.loads((tmp_path / "mesh" / "summary.json").read_text())
  assert summary["mesh"] == {"data": 2, "fsdp": 2} and summary["devices"] == 4
  train_lm.main([*args, "--out-dir", str(tmp_path / "one")])
  sharded, single = ([r["loss"] for r in _records(tmp_path / d, "train")] for d in ("mesh", "one"))
  assert len(single) == 5
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_param_spec_shards_the_largest_divisible_axis():
  assert train_lm.param_spec((256, 64), 2) == train_lm.P("fsdp", None)
  assert train_lm.param_spec((3, 64), 2) == train_lm.P(None, "fsdp")
  assert train_lm.param_spec((3, 5), 2) == train_lm.P()
  assert train_lm.param_spec((256, 64), 1) == train_lm.P()
  assert train_lm.mesh_shape("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  for bad in ("data", "model=2", "data=0", "fsdp=x"):
    with pytest.raises(ValueError, match="--mesh"):
      train_lm.mesh_shape(bad)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  with pytest.raises(SystemExit, match=r"non-finite training values at step \d+"):
    _smoke(tmp_path, "--learning-rate", "1e30", "--warmup-steps", "0")
  stop = _records(tmp_path, "stop")
  assert len(stop) == 1 and stop[0]["reason"] == "non-finite"
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_mqar_task_reports_accuracy(tmp_path):
  summary = _smoke(tmp_path, "--task", "mqar", "--num-kv-pairs", "4", "--mqar-vocab-size", "32")
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and "bpc" not in summary["eval"]
  assert summary["sample"] is None


def test_bad_data_gives_a_clear_error(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "binary.bin").write_bytes(b"ELF\0\1\2" * 10)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
  for path, message in ((tmp_path / "missing.txt", "no such file"), (tmp_path / "empty.txt", "empty"),
                        (tmp_path / "binary.bin", "binary"), (tmp_path / "latin1.txt", "not UTF-8")):
    with pytest.raises(SystemExit, match=message):
      _smoke(tmp_path / "out", "--data", str(path))


def test_text_file_corpus_holds_out_its_tail(tmp_path):
  text = "".join(f"line {i}: the quick brown fox\n" for i in range(400)).encode()
  (tmp_path / "t.txt").write_bytes(text)
  corpus = lm_data.load_corpus(str(tmp_path / "t.txt"))
  assert bytes(corpus.train) + bytes(corpus.eval) == text and len(corpus.eval) == int(len(text) * 0.05)
  summary = _smoke(tmp_path / "out", "--data", str(tmp_path / "t.txt"))
  assert summary["finished"]


def test_stdlib_corpus_is_real_python_split_by_file():
  corpus = lm_data.load_corpus("stdlib")
  assert len(corpus.train) > 1_000_000 and len(corpus.eval) > 20_000
  assert b"def " in bytes(corpus.eval[:100_000]) and 0.02 < len(corpus.eval) / len(corpus.train) < 0.1


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
  a, b = lm_data.lm_batch(tokens, 1, 7, batch=3, seq_len=11), lm_data.lm_batch(tokens, 1, 7, batch=3, seq_len=11)
  c = lm_data.lm_batch(tokens, 1, 8, batch=3, seq_len=11)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0]) and a[0].shape == (3, 11)
  np.testing.assert_array_equal(a[0][:, 1:], a[1][:, :-1])  # labels are the inputs shifted by one
  held = lm_data.eval_batches(tokens, num_batches=2, batch=3, seq_len=11)
  assert len(held) == 2 and held[0][0].shape == (3, 11)
  with pytest.raises(ValueError, match="too short"):
    lm_data.lm_batch(tokens[:10], 0, 0, batch=1, seq_len=11)


def test_named_corpus_checks_the_download_and_says_when_offline(tmp_path, monkeypatch):
  spec = lm_data.NamedCorpus(url="http://example.invalid/t.txt", member=None, sha256=lm_data._sha256(b"x" * 100),
                             size=100, split=(90, 100), description="test corpus")
  monkeypatch.setitem(lm_data.CORPORA, "tiny", spec)

  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(ConnectionError, match="not cached.*--data stdlib"):
    lm_data.load_corpus("tiny", cache_dir=tmp_path)

  class Response:
    def __init__(self, data):
      self.data = data

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def read(self):
      return self.data

  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(b"y" * 100))
  with pytest.raises(ValueError, match="sha256"):
    lm_data.load_corpus("tiny", cache_dir=tmp_path)
  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(b"x" * 100))
  corpus = lm_data.load_corpus("tiny", cache_dir=tmp_path)
  assert len(corpus.train) == 90 and len(corpus.eval) == 10
  monkeypatch.setattr(urllib.request, "urlopen", offline)  # now cached: no download
  assert len(lm_data.load_corpus("tiny", cache_dir=tmp_path).train) == 90


def test_compare_trains_each_family_and_writes_table_csv_and_plot(tmp_path):
  compare = load_experiment("compare")
  result = compare.main(["--preset", "smoke", "--families", "softmax", "linformer", "softmax-pallas",
                         "--out-dir", str(tmp_path), "--run", "cmp"])
  out = tmp_path / "cmp"
  assert {p.name for p in out.iterdir()} >= {"metrics.csv", "summary.json", "table.md", "curves.png", "T64"}
  assert "softmax-pallas" in result["skipped"]  # CPU: the Pallas kernel is not trained in interpret mode
  runs = result["runs"]
  assert [r["family"] for r in runs] == ["softmax", "linformer"] and all(r["error"] is None for r in runs)
  table = (out / "table.md").read_text()
  # A row in the results table and one in the by-position table (Linformer: not causal, not in the latter).
  assert table.count("\n| softmax |") == 2 and table.count("\n| Linformer (not causal) |") == 1
  assert "not comparable" in table
  rows = (out / "metrics.csv").read_text().splitlines()
  assert rows[0].startswith("family,seq_len,kind,step") and len(rows) > 10
  assert (out / "curves.png").stat().st_size > 10_000
  assert (out / "by_position.png").stat().st_size > 10_000
  # Held-out bpc by eighths of the context: its count-weighted mean is the overall held-out bpc.
  final = runs[0]["summary"]["eval"]
  eighths = final["bpc_by_position"]
  assert len(eighths) == train_lm.POSITION_BUCKETS and all(v is not None and v > 0 for v in eighths)
  # T=64: eight positions per eighth, each with a label in every held-out sequence, so equal weights.
  assert np.mean(eighths) == pytest.approx(final["bpc"], rel=1e-5)
  assert "Held-out bpc by position in the context, T = 64" in table and "| 0–7 | 8–15 |" in table


def test_train_lines_cover_every_step_once_with_deferred_logging(tmp_path):
  # Logging-only boundaries (steps 2 and 6) are read while the next step runs; evaluation boundaries wait.
  _smoke(tmp_path, "--steps", "9", "--log-every", "2", "--eval-every", "4", "--learning-rate", "1e-12")
  train = _records(tmp_path, "train")
  assert [r["step"] for r in train] == [2, 4, 6, 8, 9]
  # With a vanishing learning rate every step's loss is the initial model's on its batch: recompute the means.
  run = train_lm.Run(train_lm.parse_args(["--preset", "smoke", "--no-progress", "--out-dir", str(tmp_path / "x")]))
  step = jax.jit(run.model._train_step)  # no donation: the same state for every batch
  losses = [float(step(run.state, *(run.model.place(x) for x in run.batches.train(s)))[1]["loss"]) for s in range(9)]
  for record, (lo, hi) in zip(train, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]):
    assert record["loss"] == pytest.approx(np.mean(losses[lo:hi]), rel=1e-5), record
  assert all(np.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in train[1:])
  assert all(r["mfu"] is None for r in train)  # no known peak rate on a CPU
  seconds = [r["train_seconds"] for r in train]
  assert seconds == sorted(seconds)


def test_every_compare_family_makes_a_valid_gpu_preset_config(tmp_path):
  # The argument lists compare.py hands to train_lm.py, for every family, parse and pass train_lm's checks;
  # a family's own flags win over the preset's (e.g. 2 heads of 256 against the preset's 8 of 64).
  compare = load_experiment("compare")
  cfg = compare.parse_args(["--preset", "gpu", "--families", *compare.FAMILIES])
  for family in compare.FAMILIES:
    args = train_lm.parse_args(compare.train_args(cfg, family, 1024, tmp_path / family))
    assert args.families == tuple(compare.FAMILIES[family].args[1].split(",")), family
    assert args.width == 512 and args.seq_len == 1024 and args.batch_size == 64, family
    assert args.num_heads == (2 if family.endswith("-h256") else 8), family


def test_compare_seeds_train_each_family_per_seed_and_table_the_spread_and_paired_gap(tmp_path, monkeypatch):
  compare = load_experiment("compare")
  # Stand-in training runs: held-out bpc per (family, seed), so the table's arithmetic can be checked.
  bpc = {("softmax", 5): 2.0, ("softmax", 6): 2.4, ("softmax", 7): 2.2,
         ("linear", 5): 2.5, ("linear", 6): 2.6, ("linear", 7): None}  # seed 7 of linear failed
  calls = []

  def run_one(cfg, family, seq_len, out_dir, seed):
    args = compare.train_args(cfg, family, seq_len, out_dir, seed)
    calls.append((family, seed, out_dir.relative_to(tmp_path / "s").as_posix(), args[args.index("--seed") + 1]))
    value = bpc[family, seed]
    summary = None if value is None else dict(
        eval=dict(bpc=value, bpc_by_position=[value] * 8), final_train_loss=1.0, tokens_per_s=1.0, mfu=None,
        peak_memory_bytes=2**20, peak_memory_kind="host", params=10, train_seconds=1.0, compile_seconds=0.0,
        device_kind="cpu")
    records = [dict(kind="eval", step=s, bpc=value or 8.0, train_seconds=float(s)) for s in (0, 6)]
    return dict(family=family, label=compare.FAMILIES[family].label, causal=True, seq_len=seq_len, seed=seed,
                summary=summary, records=records, error=None if summary else "failed (exit code 1)", seconds=1.0)

  monkeypatch.setattr(compare, "run_one", run_one)
  result = compare.main(["--preset", "smoke", "--families", "softmax", "linear", "--seed", "5", "--seeds", "3",
                         "--out-dir", str(tmp_path), "--run", "s"])
  # Seed by seed; the first seed in the usual directories, the others beside them.
  assert calls == [("softmax", 5, "T64/softmax", "5"), ("linear", 5, "T64/linear", "5"),
                   ("softmax", 6, "T64/softmax-seed6", "6"), ("linear", 6, "T64/linear-seed6", "6"),
                   ("softmax", 7, "T64/softmax-seed7", "7"), ("linear", 7, "T64/linear-seed7", "7")]
  assert [r["seed"] for r in result["runs"]] == [5, 5, 6, 6, 7, 7]
  table = (tmp_path / "s" / "table.md").read_text()
  assert "seeds 5–7 (the tables of single runs: seed 5)" in table
  assert table.count("\n| softmax | 1.443 | 2.000 |") == 1  # the single-run table: seed 5 only
  # softmax: mean 2.2, sample std 0.2; linear: seeds 5 and 6 only, gaps +0.5 and +0.2.
  assert "| softmax | 2.000 | 2.400 | 2.200 | 2.200 | 0.200 | – | – |" in table
  assert "| linear (elu+1) | 2.500 | 2.600 | – | 2.550 | 0.071 | +0.350 | +0.200 – +0.500 |" in table
  rows = (tmp_path / "s" / "metrics.csv").read_text().splitlines()
  assert rows[0].endswith(",seed") and rows[-1].endswith(",7")
  assert (tmp_path / "s" / "curves.png").stat().st_size > 10_000
  with pytest.raises(SystemExit):
    compare.parse_args(["--seeds", "0"])
