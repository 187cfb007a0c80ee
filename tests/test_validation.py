"""Argument validation: bad arguments raise at once with messages naming the values,
and the edge cases the contract defines (empty sizes, -inf bias rows, wide segment
ids, x64) give defined results in every family and implementation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
import pallas
from efficient_attention import lm
from tests import util

# --------------------------------------------------------------------------- #
# argument validation
# --------------------------------------------------------------------------- #

B, T, N, K, H = 2, 7, 6, 3, 8


def _families(t, s):
  """`fn(q, k, v, **kw)` of each family / implementation for T=t queries and S=s keys (fresh features
  and projections, shared by all)."""
  features = ea.orthogonal_random_features(util.fresh_key(), 16, H)
  proj = util.normal((5, max(s, 1)))
  if t and s:
    layout = ea.layouts.local(t, window=4, block_size=16, kv_len=s)
  else:  # no layout has an empty grid: any one is taken when nothing is computed
    layout = ea.layouts.local(16, window=4, block_size=16)
  return {
      "softmax": lambda q, k, v, **kw: ea.softmax_attention(q, k, v, implementation="xla", **kw),
      "softmax_pallas": lambda q, k, v, **kw: ea.softmax_attention(q, k, v, implementation="pallas", **kw),
      "favor": lambda q, k, v, **kw: ea.favor_attention(q, k, v, features, **kw),
      "favor_pallas": lambda q, k, v, **kw: ea.favor_attention(q, k, v, features, implementation="pallas", **kw),
      "linear": lambda q, k, v, **kw: ea.linear_attention(q, k, v, **kw),
      "linear_pallas": lambda q, k, v, **kw: ea.linear_attention(q, k, v, implementation="pallas", **kw),
      "linformer": lambda q, k, v, **kw: ea.linformer_attention(q, k, v, proj, proj, **kw),
      "block_sparse": lambda q, k, v, **kw: ea.block_sparse_attention(q, k, v, layout, **kw),
      "block_sparse_pallas": lambda q, k, v, **kw: ea.block_sparse_attention(q, k, v, layout, implementation="pallas",
                                                                             **kw),
  }


def _family(name, t, s):
  return _families(t, s)[name]


SCALED = ["softmax", "softmax_pallas", "favor", "linformer", "block_sparse", "block_sparse_pallas"]
CAUSAL_ONLY = ("favor_pallas", "linear_pallas")  # the Pallas linear kernels are causal
ALL = SCALED + ["favor_pallas", "linear", "linear_pallas"]


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 0.0, -0.5])
@pytest.mark.parametrize("name", SCALED)
def test_scale_must_be_finite_and_positive(name, scale):
  q, k, v = util.qkv(B, T, T, N, K, H)
  with pytest.raises(ValueError, match=rf"scale must be finite and positive, got scale={scale}"):
    _family(name, T, T)(q, k, v, scale=scale)


def test_scale_takes_concrete_arrays_not_tracers():
  q, k, v = util.qkv(B, T, T, N, K, H)
  want = ea.softmax_attention(q, k, v, scale=0.25)
  for scale in (np.float32(0.25), jnp.float32(0.25), jnp.asarray(0.25)):
    chex.assert_trees_all_close(ea.softmax_attention(q, k, v, scale=scale), want)
  with pytest.raises(ValueError, match="got scale=inf"):
    ea.softmax_attention(q, k, v, scale=jnp.float32(jnp.inf))
  with pytest.raises(TypeError, match="scale must be concrete"):
    jax.jit(lambda s: ea.softmax_attention(q, k, v, scale=s))(0.25)
  with pytest.raises(TypeError, match="scale must be a real number"):
    ea.softmax_attention(q, k, v, scale="0.25")


def test_favor_step_scale_is_checked():
  q, k, v = util.qkv(B, 1, 1, N, K, H)
  features = ea.orthogonal_random_features(util.fresh_key(), 16, H)
  state = ea.init_state(B, K, 16, H)
  with pytest.raises(ValueError, match="got scale=inf"):
    ea.favor_attention_step(state, q[:, 0], k[:, 0], v[:, 0], features, scale=math.inf)


def test_favor_relu_takes_no_scale_like_linear_attention():
  q, k, v = util.qkv(B, T, T, N, K, H)
  features = ea.orthogonal_random_features(util.fresh_key(), 16, H)
  with pytest.raises(ValueError, match=r"kernel='relu'\) has no logit scale.*got scale=0\.3"):
    ea.favor_attention(q, k, v, features, kernel="relu", scale=0.3)
  with pytest.raises(ValueError, match=r"has no logit scale.*got scale=0\.3"):
    ea.linear_attention(q, k, v, scale=0.3)
  state = ea.init_state(B, K, 16, H)
  with pytest.raises(ValueError, match=r"favor_attention_step\(kernel='relu'\) has no logit scale.*got scale=2\.0"):
    ea.favor_attention_step(state, q[:, 0], k[:, 0], v[:, 0], features, kernel="relu", scale=2.0)
  assert ea.favor_attention(q, k, v, features, kernel="relu").shape == (B, T, N, H)


@pytest.mark.parametrize("shapes,what", [
    (((B, T, N, 0), (B, T, K, 0), (B, T, K, H)), "q/k head dim H"),
    (((B, T, N, H), (B, T, K, H), (B, T, K, 0)), "v head dim Hv"),
    (((B, T, 0, H), (B, T, 0, H), (B, T, 0, H)), "query heads N"),
    (((B, T, N, H), (B, T, 0, H), (B, T, 0, H)), "key/value heads K"),
], ids=["H=0", "Hv=0", "N=K=0", "K=0"])
@pytest.mark.parametrize("name", ["softmax", "favor", "linear", "linformer", "block_sparse"])
def test_zero_heads_or_head_dims_raise(name, shapes, what):
  q, k, v = (util.normal(shape) for shape in shapes)
  with pytest.raises(ValueError, match=rf"{what} must be positive, got q.shape=\({B}, {T}, "):
    _family(name, T, T)(q, k, v)


def test_zero_features_and_projections_raise():
  q, k, v = util.qkv(B, T, T, N, K, H)
  with pytest.raises(ValueError, match=r"at least one row.*features.shape=\(0, 8\)"):
    ea.favor_attention(q, k, v, jnp.zeros((0, H)))
  with pytest.raises(ValueError, match=r"num_features must be a positive int, got num_features=0"):
    ea.orthogonal_random_features(util.fresh_key(), 0, H)
  with pytest.raises(ValueError, match=r"feature_map gave no features \(phi_q.shape=\(2, 7, 6, 0\)\)"):
    ea.linear_attention(q, k, v, feature_map=lambda x: x[..., :0])
  with pytest.raises(ValueError, match=r"e_proj projects to P=0 slots \(e_proj.shape=\(0, 7\)\)"):
    ea.linformer_attention(q, k, v, jnp.zeros((0, T)), jnp.zeros((0, T)))
  with pytest.raises(ValueError, match=r"e_proj projects to P=0 slots \(e_proj.shape=\(3, 0, 7\)\)"):
    ea.linformer_attention(q, k, v, jnp.zeros((K, 0, T)), jnp.zeros((K, 0, T)))


def _zero_size_cases():
  cases = []
  for name in ALL:
    for b, t, s in ((B, 0, 0), (0, T, T), (B, 0, T), (B, T, 0)):
      for causal in (False, True):
        if (causal and t != s) or (name in CAUSAL_ONLY and not causal) or (name == "linformer" and causal):
          continue
        cases.append(pytest.param(name, b, t, s, causal, id=f"{name}-B{b}-T{t}-S{s}-{'causal' if causal else 'full'}"))
  return cases


@pytest.mark.parametrize("name,b,t,s,causal", _zero_size_cases())
def test_zero_lengths_give_empty_or_zero_outputs(name, b, t, s, causal):
  """T = 0 or B = 0: an empty output; S = 0: every row has nothing to attend to, so 0 with 0 gradient."""
  q, k, v = util.qkv(b, t, s, N, K, H, hv=5)
  fn = _family(name, t, s)
  out = fn(q, k, v, is_causal=causal)
  assert out.shape == (b, t, N, 5) and out.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  w = util.normal(out.shape)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a, is_causal=causal) * w), argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def _recent_families():
  """`fn(q, k, v, **kw)` of LSH, the delta rule and gated linear attention (fresh rotations, beta, gates)."""
  rotations = ea.lsh_rotations(util.fresh_key(), H, num_buckets=4, num_hashes=2)
  beta = lambda q: jax.nn.sigmoid(util.normal(q.shape[:2] + (K,)))  # noqa: E731
  gates = jnp.log(jnp.linspace(0.5, 0.9, K))
  return {
      "lsh": lambda q, k, v, **kw: ea.lsh_attention(q, v, rotations, chunk_size=4, **kw),
      "delta_rule": lambda q, k, v, **kw: ea.delta_rule_attention(q, k, v, beta(q), **kw),
      "gated_linear": lambda q, k, v, **kw: ea.linear_attention(q, k, v, is_causal=True, gates=gates, **kw),
  }


@pytest.mark.parametrize("name", ["lsh", "delta_rule"])
@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -0.5])
def test_recent_families_check_scale(name, scale):
  q, k, v = util.qkv(B, T, T, N, K, H)
  with pytest.raises(ValueError, match=rf"scale must be finite.*got scale={scale}"):
    _recent_families()[name](q, k, v, scale=scale)


@pytest.mark.parametrize("b,t", [(B, 0), (0, T)])
@pytest.mark.parametrize("name", ["lsh", "delta_rule", "gated_linear"])
def test_recent_families_give_empty_outputs(name, b, t):
  q, k, v = util.qkv(b, t, t, N, K, H, hv=5)
  out = _recent_families()[name](q, k, v)
  assert out.shape == (b, t, N, 5) and out.dtype == q.dtype


@pytest.mark.parametrize("name", ["softmax", "block_sparse"])
def test_bias_of_minus_inf_on_every_key_is_a_fully_masked_row(name):
  q, k, v = util.qkv(B, T, T, N, K, H)
  bias = util.normal((B, N, T, T))
  # Row 3 of head 1, batch 0: -inf on every key. Row 5 of head 2: -inf on some keys.
  bias = bias.at[0, 1, 3].set(-jnp.inf).at[1, 2, 5, ::2].set(-jnp.inf)
  fn = jax.jit(lambda q, k, v: _family(name, T, T)(q, k, v, bias=bias))
  out, _ = util.check_dead_rows(fn, q, k, v, dead=[(0, 3, 1)])
  # -inf entries are masked keys: the same as the mask they imply, with the finite bias elsewhere.
  live = bias != -jnp.inf
  want = ea.softmax_attention_reference(q, k, v, bias=jnp.where(live, bias, 0.0), mask=live)
  chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-5)


# The Pallas interpreter runs one program per (batch, head, block): small B and N keep it quick.
B1, N1, K1 = 1, 2, 1


def _ids(t, hi, *, dtype):
  """int `[B1, t]` ids alternating runs of 0 and hi, which collide when cut to 32 bits."""
  return jnp.asarray(np.where(np.arange(t)[None] % 3 == 1, hi, 0), dtype)


@pytest.mark.parametrize("name,grad", [
    # The flash kernels' index math (forward, dQ, dK/dV): value and gradient.
    ("softmax_pallas", True),
    # Same tile steps, the ids the point: value here, gradient in the slow run.
    ("block_sparse_pallas", False), pytest.param("block_sparse_pallas", True, marks=pytest.mark.slow),
    # Their run labels compare the ids in their own dtype (no cast): the slow run covers them.
    pytest.param("linear_pallas", True, marks=pytest.mark.slow),
    pytest.param("favor_pallas", True, marks=pytest.mark.slow)])
def test_pallas_paths_under_x64_with_int64_ids_match_the_reference(name, grad):
  """Under `jax_enable_x64` (int64 index math, int64 segment ids) the Pallas paths keep their
  values and gradients; ids 0 and 2**32, which an int32 cast would merge, stay apart."""
  causal = name in CAUSAL_ONLY
  with jax.enable_x64(True):
    q, k, v = util.qkv(B1, T, T, N1, K1, H)
    ids = _ids(T, 2**32, dtype=jnp.int64)
    families = _families(T, T)
    ref_name = name.removesuffix("_pallas")
    fn = lambda q, k, v: families[name](q, k, v, segment_ids=ids, is_causal=causal)  # noqa: E731
    ref = lambda q, k, v: families[ref_name](q, k, v, segment_ids=ids, is_causal=causal)  # noqa: E731
    if grad:
      util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])
    else:
      chex.assert_trees_all_close(fn(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    # The ids cut to int32 would be one segment: the output must differ from that.
    merged = families[ref_name](q, k, v, is_causal=causal)
    assert util.relative_error(fn(q, k, v), merged) > 1e-2


def test_int64_ids_with_a_key_padding_mask_on_the_flash_kernel():
  with jax.enable_x64(True):
    q, k, v = util.qkv(B1, T, T, N1, K1, H)
    ids = _ids(T, 2**32, dtype=jnp.int64)
    mask = util.padding_mask(B1, T)
    got = ea.softmax_attention(q, k, v, segment_ids=ids, mask=mask, implementation="pallas")
    want = ea.softmax_attention(q, k, v, segment_ids=ids, mask=mask, implementation="xla")
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    # The extreme int32 ids: a padded key still gets an id no query has.
    ids32 = _ids(T, jnp.iinfo(jnp.int32).min, dtype=jnp.int32).at[:, -1].set(jnp.iinfo(jnp.int32).max)
    got = ea.softmax_attention(q, k, v, segment_ids=ids32, mask=mask, implementation="pallas")
    want = ea.softmax_attention(q, k, v, segment_ids=ids32, mask=mask, implementation="xla")
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the TPU kernels in the interpreter: test_softmax_tpu.py covers them without x64
def test_flash_kernel_tpu_backend_under_x64():
  with jax.enable_x64(True):
    q, k, v = util.qkv(B1, T, T, N1, K1, H)
    fn = lambda q, k, v: pallas.flash_attention(q, k, v, is_causal=True, backend="mosaic_tpu",  # noqa: E731
                                              interpret=True)
    ref = lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=True)  # noqa: E731
    util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=2, max_size=12), st.data())
def test_dense_segment_ids_keep_exactly_the_equalities(values, data):
  """Labels are equal exactly where the (64-bit) ids are, across queries and keys (T=5, S=7)."""
  with jax.enable_x64(True):
    picks = data.draw(st.lists(st.sampled_from(values), min_size=12, max_size=12))
    ids = np.asarray(picks, np.int64)[None]
    q_lab, kv_lab = pallas.common.dense_segment_ids(jnp.asarray(ids[:, :5]), jnp.asarray(ids[:, 5:]))
    labels = np.concatenate([np.asarray(q_lab), np.asarray(kv_lab)], axis=1)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels[0][:, None] == labels[0][None, :], ids[0][:, None] == ids[0][None, :])


# Modules and the LM


@pytest.mark.parametrize("options,error,match", [
    (dict(implementation="cuda"), ValueError, r"unknown implementation='cuda'; valid: None, 'xla', 'pallas', 'cudnn'"),
    (dict(attention="linformer", max_len=8, implementation="pallas"), ValueError,
     r"linformer has no implementation='pallas'; it supports: None, 'xla'"),
    (dict(attention="favor", implementation="cudnn"), ValueError, r"favor has no implementation='cudnn'"),
    (dict(rope_base=-1.0), ValueError, r"rope_base must be a finite positive number.*got rope_base=-1\.0"),
    (dict(rope_base=math.inf), ValueError, r"got rope_base=inf"),
    (dict(rope_base="10k"), TypeError, r"rope_base must be None or a number, got rope_base='10k'"),
    (dict(dtype="float33"), TypeError, r"dtype must be a floating-point dtype or None, got dtype='float33'"),
    (dict(dtype=jnp.int32), TypeError, r"dtype must be a floating-point dtype or None"),
    (dict(param_dtype=None), TypeError, r"param_dtype must be a floating-point dtype, got param_dtype=None"),
    (dict(use_bias=1), TypeError, r"use_bias must be a bool, got 1"),
    (dict(attention="favor", deterministic=None), TypeError, r"deterministic must be a bool, got None"),
    (dict(attention="linformer", max_len=8, per_head_projections="yes"), TypeError,
     r"per_head_projections must be a bool, got 'yes'"),
])
def test_module_options_are_checked_at_construction(options, error, match):
  with pytest.raises(error, match=match):
    ea.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("options,error,match", [
    (dict(implementation="cuda"), ValueError, r"unknown implementation='cuda'"),
    (dict(attention="linear", implementation="cudnn"), ValueError, r"linear has no implementation='cudnn'"),
    (dict(rope_base=-1.0), ValueError, r"got rope_base=-1\.0"),
    (dict(rope_base=None), ValueError, r"got rope_base=None"),
    (dict(dtype="float33"), TypeError, r"got dtype='float33'"),
    (dict(param_dtype="float33"), TypeError, r"got param_dtype='float33'"),
    (dict(mlp_ratio=math.inf), ValueError, r"mlp_ratio must be a finite positive number, got mlp_ratio=inf"),
    (dict(mlp_ratio=0), ValueError, r"got mlp_ratio=0"),
    (dict(dropout=math.nan), ValueError, r"dropout must be a number in \[0, 1\), got dropout=nan"),
    (dict(dropout="0.1"), ValueError, r"got dropout='0.1'"),
    (dict(num_kv_heads=3), ValueError, r"num_kv_heads must be None or a positive int dividing num_heads=4, got "
                                       r"num_kv_heads=3"),
    (dict(is_causal=1), TypeError, r"is_causal must be a bool, got is_causal=1"),
    (dict(num_features=0), ValueError, r"num_features must be None or a positive int, got num_features=0"),
    (dict(redraw_interval=-1), ValueError, r"got redraw_interval=-1"),
    (dict(feature_map="tanh"), ValueError, r"unknown feature_map='tanh'"),
    (dict(projected_len=0), ValueError, r"projected_len must be a positive int, got projected_len=0"),
    (dict(window=-1), ValueError, r"window must be >= 0, got window=-1"),
    (dict(block_size=0), ValueError, r"block_size must be positive, got block_size=0"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be None or a positive int .*got chunk_size=0"),
])
def test_lm_config_fields_are_checked_at_construction(options, error, match):
  with pytest.raises(error, match=match):
    lm.LMConfig(**options)


@pytest.mark.parametrize("name", ["softmax", "favor", "linear", "local"])
def test_decoding_a_batch_other_than_the_caches_raises(name):
  options = {"local": dict(window=4, block_size=4)}.get(name, {})
  module = ea.MultiHeadAttention(4, 16, attention=name, is_causal=True, rngs=nnx.Rngs(0), **options)
  module.init_cache((2, 8, 16))
  with pytest.raises(ValueError, match=rf"{name}: decoding a batch of B=3 from a cache built for B=2"):
    module(util.normal((3, 1, 16)), decode=True)


def test_lm_decoding_a_batch_other_than_the_caches_raises():
  config = lm.LMConfig(num_layers=1, width=16, num_heads=2, max_len=16)
  model = lm.LanguageModel(config, rngs=nnx.Rngs(0))
  model.init_cache((2, 8))
  with pytest.raises(ValueError, match=r"LanguageModel: decoding a batch of B=1 from a cache built for B=2"):
    model(jnp.ones((1, 1), jnp.int32), decode=True)


def _lm(attention="softmax", **options):
  config = lm.LMConfig(attention=attention, num_layers=1, width=16, num_heads=2, max_len=16, window=4, block_size=4,
                       projected_len=4, is_causal=attention != "linformer",
                       layout=(lambda t: ea.layouts.local(t, window=4, block_size=4)) if attention == "block_sparse"
                       else None, **options)
  return lm.LanguageModel(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [256, 300, -1])
def test_tokens_outside_the_vocabulary_raise(bad):
  model = _lm()
  tokens = jnp.array([[1, bad, 3]])
  low, high = min(1, bad), max(3, bad)
  message = rf"tokens must lie in \[0, vocab_size=256\), got tokens from {low} to {high}"
  with pytest.raises(ValueError, match="LanguageModel: " + message):
    model(tokens)
  with pytest.raises(ValueError, match=r"generate: prompt: " + message):
    lm.generate(model, tokens, max_new_tokens=2, temperature=0.0)


def test_tokens_outside_the_vocabulary_fail_the_call_under_jit():
  model = _lm()
  tokens = jnp.array([[1, 300, 3]])
  message = r"tokens must lie in \[0, vocab_size=256\), got tokens from 1 to 300"
  # Under jit the check runs on the host and fails the call (as the decoding caches' length check does).
  with pytest.raises(jax.errors.JaxRuntimeError, match=message):
    jax.block_until_ready(nnx.jit(lambda m, t: m(t))(model, tokens))
  with pytest.raises(jax.errors.JaxRuntimeError, match=message):
    jax.block_until_ready(jax.jit(lambda p: lm.generate(model, p, max_new_tokens=2, temperature=0.0))(tokens))
  good = jnp.array([[1, 255, 0]])
  assert nnx.jit(lambda m, t: m(t))(model, good).shape == (1, 3, 256)


@pytest.mark.parametrize("attention", ["softmax", "favor", "linear", "linformer", "local", "block_sparse"])
def test_segment_ids_of_the_wrong_shape_raise_in_the_lm_and_modules(attention):
  model = _lm(attention)
  tokens = jnp.array([[1, 2, 3]])
  wrong = r"segment_ids.shape=\(1, 4\) must be the input's \[B, T\]=\(1, 3\)"
  with pytest.raises(ValueError, match=r"LanguageModel: " + wrong):
    model(tokens, segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(TypeError, match=r"LanguageModel: segment_ids must be an int array \[B, T\], got "
                                      r"segment_ids.dtype=dtype\('float32'\)"):
    model(tokens, segment_ids=jnp.zeros((1, 3)))
  module = model.blocks[0].attention
  with pytest.raises(ValueError, match=rf"{attention}: segment_ids.shape=\(2, 3\) must be the input's \[B, T\]"):
    module(util.normal((1, 3, 16)), segment_ids=jnp.zeros((2, 3), jnp.int32))
