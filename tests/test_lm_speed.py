"""What the LM's speed figures rest on: the model-FLOP count, the bf16 embedding gradient, bench_lm.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attention as ea
from efficient_attention import lm
from tests import util

bench_lm = util.load_experiment("bench_lm")
train_lm = util.load_experiment("train_lm")


def _forward_matmul_flops(config, seq_len, batch=2):
  model = lm.LanguageModel(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, config.vocab_size)
  return util.matmul_flops(lambda t: model(t), tokens) / (batch * seq_len)


@pytest.mark.parametrize("seq_len", [16, 24])
@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_flops_per_token_match_the_matmuls_of_exact_attention(seq_len, num_kv_heads):
  # XLA's exact attention multiplies all T x T pairs: compare with the bidirectional count.
  config = lm.LMConfig(num_layers=2, width=32, num_heads=4, num_kv_heads=num_kv_heads, max_len=32, is_causal=False,
                       implementation="xla")
  assert lm.training_flops_per_token(config, seq_len) == pytest.approx(3 * _forward_matmul_flops(config, seq_len))


def test_flops_per_token_of_linformer_match_its_matmuls():
  config = lm.LMConfig(attention="linformer", num_layers=1, width=32, num_heads=4, max_len=24, projected_len=8,
                       is_causal=False)
  assert lm.training_flops_per_token(config, 24) == pytest.approx(3 * _forward_matmul_flops(config, 24))


def test_flops_per_token_of_masked_families():
  t = 64
  exact = lm.LMConfig(num_layers=2, width=32, num_heads=4, max_len=t)
  # Causal exact attention: half the pairs and the diagonal, 4 H FLOPs per head and pair.
  dense = lm.training_flops_per_token(dataclasses.replace(exact, is_causal=False), t)
  assert dense - lm.training_flops_per_token(exact, t) == pytest.approx(3 * 2 * 4 * 4 * 8 * (t * t - t * (t + 1) / 2) / t)
  # A window covering the sequence is exact causal attention; a short one costs less.
  wide = dataclasses.replace(exact, attention="local", window=t, block_size=16)
  assert lm.training_flops_per_token(wide, t) == pytest.approx(lm.training_flops_per_token(exact, t))
  narrow = dataclasses.replace(wide, window=16)
  assert lm.training_flops_per_token(narrow, t) < lm.training_flops_per_token(exact, t)
  layout = lambda n: ea.layouts.local(n, window=16, block_size=16)
  sparse = dataclasses.replace(exact, attention="block_sparse", layout=layout)
  assert lm.training_flops_per_token(sparse, t) == pytest.approx(lm.training_flops_per_token(narrow, t))
  # Linear attention (M = H = 8 features) vs FAVOR+ with M = 8: FAVOR+ adds the q and k feature projections.
  linear = dataclasses.replace(exact, attention="linear")
  favor = dataclasses.replace(exact, attention="favor", num_features=8)
  assert lm.training_flops_per_token(favor, t) - lm.training_flops_per_token(linear, t) == pytest.approx(
      3 * 2 * 2 * 8 * 8 * (4 + 4))
  assert lm.training_flops_per_token(linear, 4 * t) == lm.training_flops_per_token(linear, t)  # linear in T


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_flops_per_token_of_linear_attention_match_its_decoding_step(num_kv_heads):
  # A step reads phi(q) S and phi(q) . z per query head and adds phi(k)^T v per key/value head: matmuls of
  # 2 M H, 2 M and 2 M H FLOPs; the count adds the normaliser's update phi(k) (2 M per key/value head).
  n, h = 4, 8
  kv = num_kv_heads or n
  config = lm.LMConfig(attention="linear", num_layers=1, width=n * h, num_heads=n, num_kv_heads=num_kv_heads,
                       max_len=16)
  attention = lm._attention_flops_per_token(config, "linear", 16)
  q, k, v = (util.normal((1, heads, h)) for heads in (n, kv, kv))
  state = ea.init_state(1, kv, h, h)
  step = util.matmul_flops(lambda s, q, k, v: ea.linear_attention_step(s, q, k, v, feature_map="identity"),
                           state, q, k, v)
  assert attention == pytest.approx(step + 2 * h * kv)


def _scatter_dtypes(fn, *args):
  return [eqn.invars[0].aval.dtype for eqn in util._equations(jax.make_jaxpr(fn)(*args).jaxpr)
          if eqn.primitive.name.startswith("scatter")]


@pytest.mark.parametrize("attention", ["softmax", "linear"])  # RoPE; learned positions (a second table)
def test_bf16_embedding_gradients_accumulate_in_float32(attention):
  # A bfloat16 scatter-add of the embedding gradient (many tokens, few rows) was what made bf16 training slow.
  config = lm.LMConfig(attention=attention, num_layers=1, width=16, num_heads=2, max_len=16, dtype=jnp.bfloat16)
  model = lm.LanguageModel(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return nnx.merge(graphdef, params, rest)(tokens).mean()

  dtypes = _scatter_dtypes(jax.grad(loss), params)
  assert dtypes and all(d == jnp.float32 for d in dtypes), dtypes
  # The lookup is nnx.Embed's, rounded the same way.
  np.testing.assert_array_equal(lm._lookup(model.embed, tokens), model.embed(tokens))


@pytest.mark.slow  # 13 s on 2 cores
def test_bench_lm_smoke_writes_rows(tmp_path):
  rows = bench_lm.main(["--smoke", "--out-dir", str(tmp_path), "--run", "speed", "--peak-tflops", "1"])
  saved = json.loads((tmp_path / "speed" / "lm_speed.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert [(r["family"], r["dtype"]) for r in rows] == [("softmax", "float32"), ("linear", "float32")]
  for r in rows:
    for key in ("family", "dtype", "seq_len", "width", "num_layers", "batch_size", "tokens_per_s", "mfu"):
      assert key in r, key
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["host_ms"] > 0
    config = train_lm.lm_config(bench_lm.train_config(bench_lm.Config(), "smoke", r["family"], r["dtype"]))
    flops = lm.training_flops_per_token(config, r["seq_len"])
    assert r["flops_per_token"] == flops
    assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e12)
  table = (tmp_path / "speed" / "lm_speed.md").read_text()
  assert table.count("| smoke (1 x 32) |") == 2


def test_peak_flops():
  assert train_lm.peak_flops("NVIDIA H200") == 989.4e12
  assert train_lm.peak_flops("cpu") is None
  assert train_lm.peak_flops("cpu", 2.0) == 2e12
