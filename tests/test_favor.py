"""FAVOR+ vs its float64 reference, vs exact softmax attention, and the random features themselves."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import efficient_attention as ea
from tests import util
from tests.test_linear import B, CASES, H, HV, KH, N, T, bernoulli, options

M = 16


def features(m=M, h=H, **kwargs):
  return ea.orthogonal_random_features(util.fresh_key(), m, h, **kwargs)


class FavorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CASES)
  def test_value_and_grad_vs_f64(self, case):
    s = 11 if case.startswith("noncausal_gqa_t_ne_s") else T
    q, k, v = util.qkv(B, T, s, N, KH, H, hv=HV)
    w = features()
    opts = options(case, s)
    fn = self.variant(lambda q, k, v: ea.favor_attention(q, k, v, w, chunk_size=4, **opts))
    ref = lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts)
    out, _ = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32], jit=False)
    chex.assert_shape(out, (B, T, N, HV))

  @parameterized.parameters("trig", "relu")
  def test_other_kernels_vs_f64(self, kernel):
    # Small logits keep the trig denominator away from 0, where float32 loses digits.
    # relu features have a kink at w.k = 0 where float32 and float64 may pick
    # different sides, and rows with few live features amplify rounding.
    tol = util.TOL[jnp.float32] if kernel == "trig" else dict(rtol=1e-3, atol=1e-3)
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV, scale=0.3)
    w = features()
    opts = dict(kernel=kernel, **options("causal_odd_t_segments_padded", T))
    fn = lambda q, k, v: ea.favor_attention(q, k, v, w, chunk_size=4, **opts)
    ref = lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts)
    util.check_against_f64(fn, ref, (q, k, v), **tol)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV, dtype=jnp.bfloat16)
    w = features()
    opts = options("causal_odd_t_segments_padded", T)
    fn = lambda q, k, v: ea.favor_attention(q, k, v, w, chunk_size=4, **opts)
    ref = lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts)
    out, _ = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16

  @parameterized.parameters("softmax", "trig")
  def test_step_by_step_equals_parallel_causal(self, kernel):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV, scale=0.5)
    # Growing keys raise the running stabiliser along the sequence.
    k = k * jnp.linspace(0.5, 3.0, T)[None, :, None, None]
    w = features()
    state = ea.init_state(B, KH, 2 * M if kernel == "trig" else M, HV)

    def step(state, qkv_t):
      return ea.favor_attention_step(state, *qkv_t, w, kernel=kernel)

    # Time-major: [T, B, N, H]
    _, outs = jax.lax.scan(step, state, tuple(x.transpose(1, 0, 2, 3) for x in (q, k, v)))
    parallel = ea.favor_attention(q, k, v, w, kernel=kernel, is_causal=True, chunk_size=4)
    chex.assert_trees_all_close(outs.transpose(1, 0, 2, 3), parallel, rtol=1e-4, atol=1e-4)

  def test_converges_to_softmax_attention(self):
    # Modest logits (|q.k| * scale < 1), where positive features have small variance.
    # A statistical test: fixed keys keep it deterministic whatever the test order.
    draws = 32
    kq, kk, kv, kd = jax.random.split(jax.random.key(2024), 4)
    q = util.normal((B, T, N, H), scale=0.5, key=kq)
    k = util.normal((B, T, KH, H), scale=0.5, key=kk)
    v = util.normal((B, T, KH, HV), key=kv)
    exact = ea.softmax_attention_reference(q, k, v)
    single, mean = {}, {}
    for m in (16, 256):
      favor = jax.jit(jax.vmap(lambda key: ea.favor_attention(q, k, v, ea.orthogonal_random_features(key, m, H))))
      outs = favor(jax.random.split(jax.random.fold_in(kd, m), draws))
      single[m] = np.mean([util.relative_error(o, exact) for o in outs])
      mean[m] = util.relative_error(outs.mean(0), exact)
    # Averaging draws: unbiased draws would give single / sqrt(32) ~ 0.18 single;
    # the ratio estimator adds a bias, largest for few features.
    assert mean[16] < 0.45 * single[16], (mean, single)
    assert mean[256] < 0.05, mean
    assert single[16] > 0.05, single  # a single draw is visibly approximate
    # Monte Carlo error ~ M**-0.5: 16x more features should cut it about 4x.
    assert single[256] < 0.5 * single[16], single

  def test_orthogonal_blocks_and_norms(self):
    # M = 16, H = 5: three full blocks and one row of a fourth.
    w = np.asarray(features(), np.float64)
    chex.assert_shape(w, (M, H))
    for block in (w[:H], w[H:2 * H], w[2 * H:3 * H]):
      gram = block @ block.T
      np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4 * H)
    # Independent blocks are not orthogonal to each other.
    assert np.abs(w[:H] @ w[H:2 * H].T).max() > 0.1
    sqrt_d = np.asarray(features(scaling="sqrt_d"), np.float64)
    np.testing.assert_allclose(np.linalg.norm(sqrt_d, axis=-1), math.sqrt(H), rtol=1e-5)
    np.testing.assert_allclose(sqrt_d[:H] @ sqrt_d[:H].T, H * np.eye(H), atol=1e-4 * H)

  def test_chi_norms_and_iid_rows(self):
    m = 4096
    for orthogonal in (True, False):
      norms = np.linalg.norm(np.asarray(features(m, orthogonal=orthogonal), np.float64), axis=-1)
      # chi with H degrees of freedom: E[norm^2] = H, Var[norm^2] = 2H.
      assert abs(np.mean(norms**2) - H) < 5 * math.sqrt(2 * H / m), np.mean(norms**2)
      assert abs(np.var(norms**2) - 2 * H) < 0.25 * 2 * H, np.var(norms**2)
    iid = np.asarray(features(m, orthogonal=False), np.float64)
    np.testing.assert_allclose(np.cov(iid.T), np.eye(H), atol=0.1)
    iid_sqrt_d = np.asarray(features(orthogonal=False, scaling="sqrt_d"), np.float64)
    np.testing.assert_allclose(np.linalg.norm(iid_sqrt_d, axis=-1), math.sqrt(H), rtol=1e-5)
    gram = iid_sqrt_d[:H] @ iid_sqrt_d[:H].T
    assert np.abs(gram - np.diag(np.diag(gram))).max() > 0.1  # iid rows are not orthogonal

  def test_redraw(self):
    w = features(dtype=jnp.bfloat16)
    key = util.fresh_key()
    new = ea.redraw(key, w, scaling="sqrt_d")
    assert new.shape == w.shape and new.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(new, np.float32), np.asarray(w, np.float32))
    chex.assert_trees_all_equal(new, ea.orthogonal_random_features(key, M, H, scaling="sqrt_d", dtype=jnp.bfloat16))

  def test_fully_masked_rows_give_zero_and_zero_grad(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    w = features()
    # Batch 0 keeps 9 keys, batch 1 none. Masked keys may hold anything: huge
    # values must not reach the stabiliser (they would zero the live features).
    pad = jnp.asarray(np.arange(T)[None, :] < np.array([[9], [0]]))[:, None, None, :]
    k = jnp.where(pad[:, 0, 0, :, None, None], k, 1e4)
    row_mask = bernoulli(0.8, (B, 1, T, T)).at[:, :, 3].set(False)
    for kernel, mask, causal, dead in (("softmax", pad, True, (1, slice(None))),
                                       ("trig", pad, False, (1, slice(None))),
                                       ("softmax", row_mask, False, (slice(None), 3))):
      fn = lambda q, k, v: ea.favor_attention(q, k, v, w, kernel=kernel, mask=mask, is_causal=causal, chunk_size=4)
      _, grads = util.check_dead_rows(fn, q, k, v, dead=dead, padded_batch=1 if mask is pad else None)
      assert float(jnp.abs(grads[0][0, :3]).sum()) > 0

  def test_large_logits_are_finite(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    q = q.at[..., -1].set(0.0)
    # Rescale q and k so that the largest |q . k| * scale is exactly 50.
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // KH, axis=2)) * H**-0.5
    factor = jnp.sqrt(50.0 / jnp.max(jnp.abs(logits)))
    q, k = q * factor, k * factor
    # A large key component the queries ignore: exp(w.k - |k|^2 / 2) ~ exp(-300)
    # underflows in float32 unless the key stabiliser removes it.
    k = k.at[..., -1].set(40.0)
    w = features()
    for causal in (False, True):
      fn = lambda q, k, v: ea.favor_attention(q, k, v, w, is_causal=causal, chunk_size=4)
      out = fn(q, k, v)
      grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))(q, k, v)
      chex.assert_tree_all_finite((out, grads))
      ref = util.in_f64(lambda q, k, v: ea.favor_attention_reference(q, k, v, w, is_causal=causal), q, k, v)
      # Without the stabiliser every feature underflows (error 1). With it, features more than e^35 below
      # the largest are floored (LOG_FEATURE_FLOOR), and at logits of 50 rows weighted by such features
      # move: over 40 draws the error was 3e-6 for most and up to 0.097, so the bound is 0.2.
      assert util.relative_error(out, ref) < 0.2

  def test_causal_memory_is_linear(self):
    # A [T, M, Hv] cumulative sum would take T * M * Hv * 4 bytes = 64 MiB.
    t, h, m = 4096, 64, 64
    x = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
    w = jax.ShapeDtypeStruct((m, h), jnp.float32)
    fn = lambda q, k, v, w: ea.favor_attention(q, k, v, w, is_causal=True)
    grad = jax.grad(lambda q, k, v, w: jnp.sum(fn(q, k, v, w)), argnums=(0, 1, 2))
    cumsum_bytes = t * m * h * 4
    for f in (fn, grad):
      # No value, forward or backward, is a quarter the size of the cumulative sum.
      assert util.largest_value(f, x, x, x, w) < cumsum_bytes / 4 / 4
      if jax.default_backend() == "cpu":  # A GPU's temp also counts the cuBLAS workspace.
        temp = jax.jit(f).lower(x, x, x, w).compile().memory_analysis().temp_size_in_bytes
        assert temp < cumsum_bytes / 4, (temp, cumsum_bytes)


class FavorErrorsTest(chex.TestCase):

  def test_errors_name_the_values(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    w = features()
    ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match="cannot honour bias"):
      ea.favor_attention(q, k, v, w, bias=jnp.ones((1, 1, T, T)))
    with pytest.raises(ValueError, match="one segment_ids array.*tuple of 2"):
      ea.favor_attention(q, k, v, w, segment_ids=(ids, ids))
    with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys, got T=13, S=4"):
      ea.favor_attention(q, k[:, :4], v[:, :4], w, is_causal=True)
    with pytest.raises(ValueError, match=r"H = 5.*features.shape=\(16, 4\)"):
      ea.favor_attention(q, k, v, w[:, :4])
    with pytest.raises(ValueError, match="unknown kernel='exp'.*'softmax', 'trig', 'relu'"):
      ea.favor_attention(q, k, v, w, kernel="exp")
    with pytest.raises(TypeError, match="floating.*int32"):
      ea.favor_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="positive.*scale=-1.0"):
      ea.favor_attention(q, k, v, w, scale=-1.0)
    with pytest.raises(ValueError, match="num_features must be a positive int, got num_features=0"):
      ea.orthogonal_random_features(util.fresh_key(), 0, H)
    with pytest.raises(ValueError, match="head_dim must be a positive int, got head_dim=-2"):
      ea.orthogonal_random_features(util.fresh_key(), M, -2)
    with pytest.raises(ValueError, match="unknown scaling='gauss'"):
      ea.orthogonal_random_features(util.fresh_key(), M, H, scaling="gauss")
    with pytest.raises(ValueError, match=r"state.kv is float32\[2, 2, 16, 3\], expected float32\[2, 2, 32, 3\]"):
      ea.favor_attention_step(ea.init_state(B, KH, M, HV), q[:, 0], k[:, 0], v[:, 0], w, kernel="trig")


def test_causal_gradient_stays_finite_when_a_prefix_has_only_tiny_features():
  # The first keys are long: their positive features sit ~40-90 nats below the stabiliser (the largest
  # key feature), so the first queries' denominators would be denormal and their gradients infinite.
  q, k, v = util.qkv(1, 48, 48, 2, 2, 32, hv=8)
  w = features(m=32, h=32)
  for scale in (3.0, 3.5, 4.0, 5.0):
    k_long = k.at[:, :3].multiply(scale)
    loss = lambda q, k, v: ea.favor_attention(q, k, v, w, is_causal=True).sum()
    out = ea.favor_attention(q, k_long, v, w, is_causal=True)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k_long, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads), scale
    assert bool(jnp.isfinite(out).all())
    # Queries after the prefix see ordinary keys: the floor leaves them as the reference has them.
    want = ea.favor_attention_reference(q, k_long, v, w, is_causal=True)
    np.testing.assert_allclose(np.asarray(out[:, 8:]), np.asarray(want[:, 8:]), rtol=2e-3, atol=2e-4)
