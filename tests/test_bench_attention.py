"""Smoke tests of the benchmark suites (experiments/bench_*.py): tiny sizes, outputs exist and are well-formed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import util
from tests.util import load_experiment


def test_softmax_suite_writes_table_json_and_plot(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--out-dir", str(tmp_path), "--run", "softmax"])
  data = json.loads((out / "softmax.json").read_text())
  assert data["env"]["jax"] and data["speed"] and data["memory"]
  for row in data["speed"]:
    assert row["pass_"] in ("fwd", "fwd+bwd")
    assert row["tflops"]["pallas-triton"] > 0 and row["tflops"]["xla"] > 0, row
  for row in data["memory"]:
    assert row["peak_bytes"]["pallas-triton"] >= 8 * row["tensor_bytes"] * 0.5, row
  table = (out / "softmax.md").read_text()
  assert table.count("\n| ") == len(data["speed"]) + 1 + len(data["memory"]) + 1
  assert (out / "softmax.png").stat().st_size > 10_000


@pytest.mark.slow  # every family compiled twice (30 s on 2 cores): the subset test below runs by default
def test_families_suite_times_every_family(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "families", "--out-dir", str(tmp_path), "--run", "fam"])
  rows = json.loads((out / "families.json").read_text())["rows"]
  names = {r["family"] for r in rows}
  assert {"softmax-xla", "softmax-pallas", "favor", "linear", "linformer", "local"} <= names
  for row in rows:
    assert row["status"] == "ok", row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["peak_bytes"] > 0, row
  assert "forward+backward (ms)" in (out / "families.md").read_text()
  assert (out / "families.png").stat().st_size > 10_000


def test_crossover_is_the_first_length_from_which_a_family_stays_faster_than_exact():
  bench = load_experiment("bench_families")

  def row(family, t, ms, status="ok"):
    return dict(family=family, seq_len=t, fwd_bwd_ms=ms, status=status)

  rows = [row("softmax-xla", 1, 1.0), row("softmax-cudnn", 1, 0.5), row("linear", 1, 0.4), row("favor", 1, 2.0),
          row("softmax-xla", 2, 4.0), row("softmax-cudnn", 2, 1.0), row("linear", 2, 1.5), row("favor", 2, 3.0),
          row("softmax-xla", 4, None, "OOM"), row("softmax-cudnn", 4, 4.0), row("linear", 4, 3.0),
          row("favor", 4, 5.0),
          row("softmax-xla", 8, None, "OOM"), row("softmax-cudnn", 8, None, "OOM"), row("linear", 8, 6.0),
          row("favor", 8, 9.0)]
  # linear: faster at 1, slower at 2, faster from 4 on; favor: faster only once exact runs out of memory.
  assert bench.crossovers(rows) == {"favor": 8, "linear": 4}
  assert bench.crossovers(rows[:8]) == {"favor": None, "linear": None}


@pytest.mark.slow  # 19 s on 2 cores
def test_block_sparse_suite_times_densities_and_longformer(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "block_sparse", "--out-dir", str(tmp_path), "--run", "bs"])
  data = json.loads((out / "block_sparse.json").read_text())
  densities = [r for r in data["density"] if "fwd_ratio" in r]
  assert len(densities) == 6 and densities[0]["density"] == 1.0 and densities[0]["fwd_bwd_ratio"] == 1.0
  assert [r["live_blocks"] for r in densities] == sorted(r["live_blocks"] for r in densities)[::-1]
  for row in data["density"] + data["longformer"]:
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
  assert data["agreement"]["rows"] > 0 and data["agreement"]["max_abs_diff"] < 1e-4, data["agreement"]
  table = (out / "block_sparse.md").read_text()
  assert table.count("\n| ") == len(data["density"]) + 1 + len(data["longformer"]) + 1
  assert table.count("the density (target <= 1.3×") == 2
  assert (out / "block_sparse.png").stat().st_size > 10_000


@pytest.mark.slow  # 10 s on 2 cores
def test_favor_suite_times_pallas_and_xla_and_reports_targets(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "favor", "--out-dir", str(tmp_path), "--run", "favor"])
  data = json.loads((out / "favor.json").read_text())
  assert len(data["rows"]) == 4 and len(data["targets"]) == 2
  for row in data["rows"]:
    assert row["ms"]["pallas"] > 0 and row["ms"]["xla"] > 0, row
    assert row["ms_pipelined"]["pallas"] > 0 and row["ms_pipelined"]["xla"] > 0, row
  for target in data["targets"]:
    assert target["longest_over_base"] > 0 and target["xla_over_pallas"] > 0, target
    assert target["longest_over_base_pipelined"] > 0 and target["xla_over_pallas_pipelined"] > 0, target
  table = (out / "favor.md").read_text()
  assert table.count("\n| ") == len(data["rows"]) + 1 + len(data["targets"]) + 1
  assert (out / "favor.png").stat().st_size > 10_000


def test_profile_linear_reads_kernel_times_and_errors(tmp_path):
  # The trace parsing is GPU-only; what the tables are made of is not.
  prof = load_experiment("profile_linear")
  kernels = [{"name": "linear_attention_forward", "us": 5.0}, {"name": "linear_attention_span_sums_forward", "us": 2.0},
             {"name": "linear_attention_dk__1", "us": 3.0}, {"name": "favor_key_features", "us": 7.0}]
  assert prof.pass_times(kernels) == {"forward": 7.0, "dk": 3.0}
  trace = load_experiment("device_trace")
  events = [("a", 0, 10), ("b", 5, 20), ("c", 30, 40), ("a", 50, 54)]
  assert trace.busy_ns(events[:3]) == 30
  summary = trace.kernel_summary(events, calls=2)
  assert summary["busy_ms"] == 34 / 2 / 1e6 and summary["launches"] == 2
  assert [(k["name"], k["launches"], k["us"]) for k in summary["kernels"]] == [
      ("b", 0.5, 15 / 2e3), ("a", 1.0, 14 / 2e3), ("c", 0.5, 10 / 2e3)]
  assert prof.group("linear_attention_span_sums_dq") == "span sums" and prof.group("gemm_fusion_dot_2") == "matmuls"
  row = {}
  assert prof.profile_or_error(lambda: 1 / 0, (), 1, row) is None
  assert row["error"].startswith("ZeroDivisionError")
  # A sweep's table: fastest first per case, None shown as auto, errors in the first result column.
  base = {"head_dim": 64, "num_features": 128, "seq_len": 4096}
  rows = [{**base, "chunk": 64, "block_c": None, "us": 9.0}, {**base, "chunk": 128, "block_c": 32, "us": 4.5},
          {**base, "chunk": 256, "block_c": 32, "error": "RESOURCE_EXHAUSTED"}]
  prof.write_sweep(tmp_path, "sweep", rows, {"chunk": "chunk", "block_c": "block_c"}, ["µs", "x2"],
                   lambda r: [f"{r['us']:.1f}", f"{2 * r['us']:.1f}"], "us")
  lines = (tmp_path / "sweep.md").read_text().splitlines()
  assert lines[0] == "| H | M | T | chunk | block_c | µs | x2 |" and lines[1] == "|---|---|---|---|---|---|---|"
  assert lines[2:] == ["| 64 | 128 | 4096 | 128 | 32 | 4.5 | 9.0 |", "| 64 | 128 | 4096 | 64 | auto | 9.0 | 18.0 |",
                       "| 64 | 128 | 4096 | 256 | 32 | RESOURCE_EXHAUSTED |  |"]
  assert json.loads((tmp_path / "sweep.json").read_text()) == rows


def test_families_suite_times_only_the_families_asked_for(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "families", "--families", "lsh", "linear", "--out-dir", str(tmp_path),
                    "--run", "fam"])
  rows = json.loads((out / "families.json").read_text())["rows"]
  assert sorted(r["family"] for r in rows) == ["linear", "linear", "lsh", "lsh"]  # the smoke run's two lengths
  assert all(r["status"] == "ok" for r in rows), rows


def test_families_suite_runs_gla_and_the_delta_rule_on_the_suite_inputs():
  bench = load_experiment("bench_families")
  q, k, v = util.qkv(b=1, t=9, n=2, kh=2, h=4)
  for name in ("gla", "delta_rule"):
    fn, is_causal, aux = bench.family_fn(name, 9, 4, on_gpu=False, n=2)
    out = fn(q, k, v, *aux)
    assert is_causal and out.shape == q.shape and bool(jnp.isfinite(out).all()), name


def test_gated_suite_times_the_kernels_and_states_the_targets(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "gated", "--out-dir", str(tmp_path), "--run", "gated",
                    "--gated-rows", "gla-pallas", "delta-pallas", "gla-xla"])
  data = json.loads((out / "gated.json").read_text())
  assert {r["row"] for r in data["rows"]} == {"gla-pallas", "delta-pallas", "gla-xla"}
  for row in data["rows"]:
    assert row["status"] == "ok" and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
    assert row["fwd_bwd_pipelined_ms"] > 0, row
  # One length and no cuDNN here: every target is stated, none measured.
  assert len(data["targets"]) == 5 and all(t["met"] is None for t in data["targets"])
  table = (out / "gated.md").read_text()
  assert "forward+backward (ms)" in table and table.count("not measured") == 5
  assert (out / "gated.png").stat().st_size > 10_000


def test_gated_tune_sweeps_tilings_and_marks_the_fastest(tmp_path):
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "gated", "--tune", "--out-dir", str(tmp_path), "--run", "tune"])
  rows = json.loads((out / "tune.json").read_text())["rows"]
  assert [(r["kind"], r["num_stages"]) for r in rows] == [("gla", 2), ("gla", 2), ("delta", 2), ("delta", 2)]
  assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in rows), rows
  table = (out / "tune.md").read_text()
  assert table.count("**") == 4  # one fastest tiling per kernel and length


def test_gated_targets_read_the_ratios():
  bench = load_experiment("bench_gated")

  def row(name, t, ms):
    return dict(row=name, seq_len=t, fwd_bwd_ms=ms, status="ok")

  rows = [row("linear-pallas", 16384, 2.0), row("gla-pallas", 16384, 2.5), row("softmax-cudnn", 4096, 1.0),
          row("gla-pallas", 4096, 0.5), row("softmax-cudnn", 16384, 9.0), row("gla-pallas", 8192, 1.0),
          row("gla-pallas", 65536, 9.0)]
  got = {t["target"]: (t["value"], t["met"]) for t in bench.targets(rows)}
  assert got["gla-pallas / linear-pallas, fwd+bwd, T=16384"] == (1.25, True)
  assert got["gla-pallas / softmax-cudnn, fwd+bwd, every T >= 4096"] == (0.5, True)
  assert got["gla-pallas, fwd+bwd time T=65536 / T=8192"] == (9.0, False)
  assert got["delta-pallas / softmax-cudnn, fwd+bwd, every T >= 4096"] == (None, None)


def test_gated_defaults_sweep_writes_its_rows(tmp_path):
  # CPU smoke: the Pallas rows in the interpreter at T=80, two 64-step chunks: spans of one chunk join two spans.
  from experiments import sweep_gated_defaults

  rows = sweep_gated_defaults.main(["--smoke", "--out-dir", str(tmp_path), "--run", "sweep"])
  assert [(r["row"], r["override"]) for r in rows] == [
      ("linear-pallas", {}), ("gla-pallas", {}), ("gla-pallas", {"span_chunks": 1})]
  assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in rows), rows
  table = (tmp_path / "sweep" / "sweep.md").read_text()
  assert "| gla-pallas | 80 | span_chunks=1 |" in table
  assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"] == rows


def test_forward_backward_keeps_the_output_pass():
  # A training step needs the output and the gradients. The gated kernels' backward does not read the
  # output, so a function returning the gradients alone would let XLA drop the output kernel: check on a
  # CUDA lowering (made on this CPU) that the timed function keeps it, and that its values are the call's.
  import efficient_attention as ea
  import pallas
  from experiments.bench_timing import forward_backward

  t = 80
  q = jax.random.normal(jax.random.key(0), (1, t, 2, 16), jnp.float32).astype(jnp.bfloat16)
  gates = jnp.full((1, t, 2), -0.1, jnp.float32)
  gpu = lambda q, k, v, g: pallas.gated_linear_attention(q, k, v, g, interpret=False)
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  module = jax.export.export(jax.jit(forward_backward(gpu)), platforms=["cuda"], disabled_checks=triton)(
      q, q, q, q, gates).mlir_module()
  assert "gated_linear_outputs" in module and "gated_linear_grads" in module
  gradients_only = jax.export.export(jax.jit(lambda q, k, v, do, g: forward_backward(gpu)(q, k, v, do, g)[1]),
                                     platforms=["cuda"], disabled_checks=triton)(q, q, q, q, gates).mlir_module()
  assert "gated_linear_outputs" not in gradients_only  # what the earlier benchmarks timed
  cpu = lambda q, k, v, g: ea.linear_attention(q, k, v, feature_map="identity", normalize="none", gates=g,
                                               is_causal=True, implementation="xla")
  out, grads = jax.jit(forward_backward(cpu))(q, q, q, q, gates)
  want_out, pull = jax.vjp(lambda q, k, v: cpu(q, k, v, gates), q, q, q)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
  for got, want in zip(grads, pull(q)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6)


def test_density_layouts_reach_the_targets_of_the_suite():
  # T=16k in blocks of 128: two-sided windows + a global block give 6.9% for 6.25%; none lands near 3.125%
  # (2.3% or 3.9%), so a one-sided window (a block and the one before it) + a global block: 508 live blocks.
  bench = load_experiment("bench_block_sparse")
  got = {d: bench.density_layout(16384, 128, d) for d in (0.0625, 0.03125)}
  assert round(100 * got[0.0625].density, 2) == 6.91 and got[0.0625].blocks[5, 6]  # two-sided
  low = got[0.03125]
  assert int(low.blocks.sum()) == 508 and low.blocks[5, 4] and not low.blocks[5, 6]  # one-sided
  assert low.blocks[0].all() and low.blocks[:, 0].all()  # the global block's row and column


def test_gated_trace_writes_a_row_per_row_and_length(tmp_path):
  # CPU: the profiler's trace holds no device kernels, so every row is there with nothing in it.
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "gated", "--trace", "--out-dir", str(tmp_path), "--run", "trace",
                    "--gated-rows", "gla-xla", "delta-xla"])
  rows = json.loads((out / "trace.json").read_text())["rows"]
  assert [(r["row"], r["seq_len"]) for r in rows] == [("gla-xla", 32), ("delta-xla", 32)]
  assert all(r["busy_ms"] == 0 and r["kernels"] == [] for r in rows)
  table = (out / "trace.md").read_text()
  assert "| gla-xla | 32 | 0.000 | 0 | – |" in table
  gated = load_experiment("bench_gated")
  made = gated.trace_markdown([dict(row="delta-pallas", seq_len=4096, busy_ms=0.81, launches=22.0,
                                    kernels=[{"name": "delta_rule_dstates", "us": 286.1, "launches": 1.0},
                                             {"name": "wrapped_convert_1", "us": 22.0, "launches": 3.0}])], "# h")
  assert "| delta-pallas | 4096 | 0.810 | 22 | delta_rule_dstates 286.1 (x1); wrapped_convert_1 22.0 (x3) |" in made


def test_delta_kernel_rows_match_the_library_row():
  bench_gated = load_experiment("bench_gated")
  # The GPU-only rows that call the delta rule's kernels directly (default tiling, and the split backward
  # walk) compute what `delta-pallas` computes; here in Pallas' interpreter.
  q, k, v = (util.normal((1, 40, 2, 16)) for _ in range(3))
  want_fn, aux = bench_gated.row_fn("delta-pallas", 40, 2, on_gpu=False)
  want = jax.jit(want_fn)(q, k, v, *aux)
  for name in ("delta-kernel", "delta-kernel_split"):
    fn, aux = bench_gated.row_fn(name, 40, 2, on_gpu=True)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, *aux), want, rtol=2e-5, atol=2e-5, err_msg=name)
  assert bench_gated.row_fn("delta-kernel_split", 40, 2, on_gpu=False) is None


def test_block_sparse_trace_writes_a_row_per_density_and_pass(tmp_path):
  # CPU: the profiler's trace holds no device kernels, so every row is there with nothing in it.
  bench = load_experiment("bench_attention")
  out = bench.main(["--smoke", "--suite", "block_sparse", "--trace", "--out-dir", str(tmp_path), "--run", "trace"])
  rows = json.loads((out / "trace.json").read_text())["rows"]
  densities = bench.Config.densities
  assert [(r["target"], r["passes"]) for r in rows] == [(d, p) for d in densities for p in ("fwd", "fwd+bwd")]
  assert rows[0]["live_blocks"] == 256 and all(r["busy_ms"] == 0 and r["kernels"] == [] for r in rows)
  table = (out / "trace.md").read_text()
  assert "| 100.00% | 256 | fwd | 0.000 | 0 | – |" in table
  made = load_experiment("bench_block_sparse").trace_markdown(
      [dict(density=0.031, live_blocks=508, passes="fwd+bwd", busy_ms=1.2, launches=9.0,
            kernels=[{"name": "block_sparse_dkdv", "us": 512.4, "launches": 1.0}])], "# h")
  assert "| 3.10% | 508 | fwd+bwd | 1.200 | 9 | block_sparse_dkdv 512.4 (x1) |" in made


@pytest.mark.parametrize("args", [["--suite", "families", "--trace"], ["--suite", "favor", "--tune"]])
def test_trace_and_tune_name_the_suites_they_apply_to(args):
  bench = load_experiment("bench_attention")
  with pytest.raises(SystemExit):
    bench.parse_args(args)
