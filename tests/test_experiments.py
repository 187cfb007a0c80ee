"""Smoke test of the README's main job on a shrunk configuration."""


import numpy as np

from tests.util import load_experiment


def test_approx_error_runs_every_family_and_writes_a_table():
  approx_error = load_experiment("approx_error")
  for causal in (False, True):
    cfg = approx_error.Config(seq_len=96, num_heads=2, num_kv_heads=1, head_dim=8, num_features=16,
                         linformer_k=12, block_size=16, window=16, repeats=1, causal=causal)
    rows = approx_error.main(cfg)
    names = [r["family"] for r in rows]
    assert names[0] == "softmax (xla)" and any(n.startswith("favor+") for n in names)
    assert any(n.startswith("linformer") for n in names) == (not causal)
    for row in rows:
      assert np.isfinite(row["ms"]) and row["ms"] > 0 and np.isfinite(row["rel_err_vs_exact"])
      if "rel_err_vs_exact_same_mask" in row:  # block-sparse equals exact attention under its layout
        assert row["rel_err_vs_exact_same_mask"] < 1e-5, row
    assert rows[0]["rel_err_vs_exact"] < 1e-5
    table = approx_error.to_markdown(cfg, rows)
    assert table.count("\n|") == len(rows) + 2


def test_pooling_projection_rows_average_contiguous_spans():
  pool = np.asarray(load_experiment("approx_error").pooling_projection(4, 10))
  np.testing.assert_allclose(pool.sum(axis=1), 1.0, rtol=1e-6)
  assert (np.count_nonzero(pool, axis=0) == 1).all()  # every position in exactly one span
