"""linear_attention (chunked causal core, masks, segment ids) and its recurrent step vs the float64 reference.

Most tests share one set of shapes: drawing random inputs and compiling cost per
shape, and shared shapes let tests reuse both.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
from tests import util

B, T, N, KH, H, HV = 2, 13, 6, 2, 5, 3

CASES = ("noncausal_gqa_t_ne_s_per_head_padding", "causal_odd_t_segments_padded", "noncausal_segments_padded",
         "general_mask_causal_segments")

_seeds = itertools.count(1)
bernoulli = util.bernoulli


def long_padding(b, s):
  """bool `[B, 1, 1, S]` keeping a random prefix of at least S / 2 keys."""
  lengths = np.random.default_rng(next(_seeds)).integers(s // 2, s + 1, (b,))
  return jnp.asarray(np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]


def options(case, s):
  """Named option sets; masks and ids are drawn fresh for each test."""
  ids = util.packed_segment_ids(B, T, 3)
  return {
      # Per-query-head key sets within a GQA group take the expanded-heads path.
      "noncausal_gqa_t_ne_s_per_head_padding": dict(mask=bernoulli(0.7, (B, N, 1, s))),
      "causal_odd_t_segments_padded": dict(segment_ids=ids, is_causal=True, mask=long_padding(B, s)),
      "noncausal_segments_padded": dict(segment_ids=ids, mask=long_padding(B, s)),
      "general_mask_causal_segments": dict(mask=bernoulli(0.7, (B, 1, T, s)), is_causal=True, segment_ids=ids),
  }[case]


class LinearTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CASES)
  def test_value_and_grad_vs_f64(self, case):
    s = 11 if case.startswith("noncausal_gqa_t_ne_s") else T
    q, k, v = util.qkv(B, T, s, N, KH, H, hv=HV)
    opts = options(case, s)
    fn = self.variant(lambda q, k, v: ea.linear_attention(q, k, v, chunk_size=4, **opts))
    ref = lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts)
    out, _ = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32], jit=False)
    chex.assert_shape(out, (B, T, N, HV))

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV, dtype=jnp.bfloat16)
    opts = options("causal_odd_t_segments_padded", T)
    fn = lambda q, k, v: ea.linear_attention(q, k, v, chunk_size=4, **opts)
    ref = lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts)
    out, _ = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16

  def test_chunk_sizes_match_naive_causal(self):
    # One step per chunk, a chunk that does not divide T, a chunk longer than T.
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    opts = options("causal_odd_t_segments_padded", T)
    ref = util.in_f64(lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts), q, k, v)
    for chunk_size in (1, 5, 64):
      out = ea.linear_attention(q, k, v, chunk_size=chunk_size, **opts)
      chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])

  def test_callable_feature_map_noncausal(self):
    # M = 2H != H: relu of x and of -x, plus a constant so no row is empty.
    fmap = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x) + 0.1], -1)
    q, k, v = util.qkv(B, T, 11, N, KH, H, hv=HV)
    fn = lambda q, k, v: ea.linear_attention(q, k, v, feature_map=fmap)
    ref = lambda q, k, v: ea.linear_attention_reference(q, k, v, feature_map=fmap)
    util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])

  def test_recurring_id_starts_a_new_segment(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    ids = jnp.array([[0] * 4 + [1] * 4 + [0] * 5] * B, jnp.int32)
    for causal in (False, True):
      out = ea.linear_attention(q, k, v, segment_ids=ids, is_causal=causal, chunk_size=4)
      # The second run of 0s sees only its own keys: as if positions 8.. were alone.
      alone = ea.linear_attention(q[:, 8:], k[:, 8:], v[:, 8:], is_causal=causal, chunk_size=4)
      chex.assert_trees_all_close(out[:, 8:], alone, rtol=1e-5, atol=1e-5)

  @settings(max_examples=4, deadline=None)
  @given(t=st.integers(1, 19), chunk_size=st.integers(1, 9), causal=st.booleans(),
         segments=st.booleans(), feature_map=st.sampled_from(["elu+1", "relu"]))
  def test_chunked_property(self, t, chunk_size, causal, segments, feature_map):
    q, k, v = (x[:, :t] for x in util.qkv(2, 19, 19, 3, 1, 4))
    ids = util.packed_segment_ids(2, 19, 3)[:, :t] if segments else None
    opts = dict(feature_map=feature_map, is_causal=causal, segment_ids=ids)
    out = ea.linear_attention(q, k, v, chunk_size=chunk_size, **opts)
    ref = util.in_f64(lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts), q, k, v)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])

  def test_vmap_matches_loop(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    fn = lambda q, k, v: ea.linear_attention(q[None], k[None], v[None], is_causal=True, chunk_size=4)[0]
    out = jax.vmap(fn)(q, k, v)
    for i in range(B):
      chex.assert_trees_all_close(out[i], fn(q[i], k[i], v[i]), rtol=1e-6, atol=1e-6)

  def test_step_by_step_equals_parallel_causal(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    state = ea.init_state(B, KH, H, HV)

    def step(state, qkv_t):
      return ea.linear_attention_step(state, *qkv_t)

    # Time-major: [T, B, N, H]
    state, outs = jax.lax.scan(step, state, tuple(x.transpose(1, 0, 2, 3) for x in (q, k, v)))
    parallel = ea.linear_attention(q, k, v, is_causal=True, chunk_size=4)
    chex.assert_trees_all_close(outs.transpose(1, 0, 2, 3), parallel, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(state.z, jnp.sum(jax.nn.elu(k) + 1, axis=1), rtol=1e-5, atol=1e-5)

  def test_fully_masked_rows_give_zero_and_zero_grad(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    pad = util.padding_mask(B, T, fully_masked_batch=1)
    row_mask = bernoulli(0.8, (B, 1, T, T)).at[:, :, 3].set(False)
    for mask, causal, dead in ((pad, True, (1, slice(None))), (row_mask, False, (slice(None), 3))):
      fn = lambda q, k, v: ea.linear_attention(q, k, v, mask=mask, is_causal=causal, chunk_size=4)
      _, grads = util.check_dead_rows(fn, q, k, v, dead=dead, padded_batch=1 if mask is pad else None)
      # Live rows do get a gradient.
      assert float(jnp.abs(grads[0][0, :3]).sum()) > 0

  def test_causal_memory_is_linear(self):
    # A [T, M, Hv] cumulative sum would take T * M * Hv * 4 bytes = 64 MiB.
    t, h = 4096, 64
    x = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
    fn = lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    cumsum_bytes = t * h * h * 4
    for f in (fn, grad):
      # No value, forward or backward, is a quarter the size of the cumulative sum.
      assert util.largest_value(f, x, x, x) < cumsum_bytes / 4 / 4
      if jax.default_backend() == "cpu":  # A GPU's temp also counts the cuBLAS workspace.
        temp = jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
        assert temp < cumsum_bytes / 4, (temp, cumsum_bytes)


class LinearErrorsTest(chex.TestCase):

  def test_errors_name_the_values(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match="cannot honour bias"):
      ea.linear_attention(q, k, v, bias=jnp.ones((1, 1, T, T)))
    with pytest.raises(ValueError, match="no logit scale.*scale=0.5"):
      ea.linear_attention(q, k, v, scale=0.5)
    with pytest.raises(ValueError, match="one segment_ids array.*tuple of 2"):
      ea.linear_attention(q, k, v, segment_ids=(ids, ids))
    with pytest.raises(ValueError, match="segment_ids need as many queries as keys, got T=13, S=4"):
      ea.linear_attention(q, k[:, :4], v[:, :4], segment_ids=ids)
    with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys, got T=13, S=4"):
      ea.linear_attention(q, k[:, :4], v[:, :4], is_causal=True)
    with pytest.raises(ValueError, match="unknown feature_map='softmax'.*'elu\\+1', 'relu'"):
      ea.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="feature_map must map"):
      ea.linear_attention(q, k, v, feature_map=lambda x: x[..., 0])
    with pytest.raises(TypeError, match="floating.*int32"):
      ea.linear_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with pytest.raises(ValueError, match="chunk_size=0"):
      ea.linear_attention(q, k, v, is_causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="implementation='pallas'"):
      ea.linear_attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="num_features must be a positive int, got num_features=0"):
      ea.init_state(B, KH, 0, HV)
    state = ea.init_state(B, KH, 7, HV)
    with pytest.raises(ValueError, match=r"state.kv is float32\[2, 2, 7, 3\], expected float32\[2, 2, 5, 3\]"):
      ea.linear_attention_step(state, q[:, 0], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="q_t must have rank 3"):
      ea.linear_attention_step(state, q, k[:, 0], v[:, 0])
