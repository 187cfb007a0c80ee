"""pallas.causal_linear_attention and implementation="pallas" of linear / FAVOR+ attention.

Values and gradients against the float64 dense references. Runs in Pallas'
interpreter on CPU and compiled on a GPU (same tests). Chunks of 16 and short
spans make every odd T span several chunks and several programs, so the
intra-chunk mask, the carried state, the span scan and the padded tail are all
exercised.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attention as ea
from pallas import LinearBlockSizes, causal_linear_attention, common, kernel_attention_reference, linear
from pallas.favor import (
  FeatureBlockSizes,
  causal_favor_attention,
  positive_features,
  positive_features_reference,
)
from tests import util


def _features(m, h):
  return ea.orthogonal_random_features(util.fresh_key(), m, h)


# The Pallas FAVOR+ path stores 16-bit inputs' features in their dtype (the XLA path keeps float32
# features): q's and k's bf16 gradients are then 0.6-1.0% off the float64 reference (H100, 8 draws at
# T=48 and T=300: up to 1.00e-2; CPU interpreter: up to 0.92e-2), at the bf16 bound of 1e-2. 2e-2.
_FAVOR_BF16_NORM_TOL = 2e-2


@pytest.mark.parametrize(
    "family, dtype, b, t, n, kh, h, hv, segments, padding",
    [
        ("elu+1", jnp.float32, 2, 37, 4, 2, 8, 5, True, "keys"),  # odd T, GQA, packed runs + key padding
        ("relu", jnp.float32, 2, 29, 3, 1, 6, 7, False, None),  # MQA, odd head dims
        ("favor", jnp.float32, 1, 35, 4, 2, 5, 3, True, "per_head"),  # per-head padding within GQA groups
        ("elu+1", jnp.bfloat16, 2, 41, 4, 2, 16, 16, True, None),
        ("favor", jnp.bfloat16, 1, 33, 2, 2, 8, 8, False, "keys"),
    ],
)
def test_value_and_grad_vs_f64(family, dtype, b, t, n, kh, h, hv, segments, padding):
  q, k, v = util.qkv(b, t, t, n, kh, h, hv=hv, dtype=dtype)
  opts = {"is_causal": True}
  if segments:
    opts["segment_ids"] = util.packed_segment_ids(b, t, 3)
  if padding == "keys":
    opts["mask"] = util.padding_mask(b, t)
  elif padding == "per_head":
    opts["mask"] = util.bernoulli(0.8, (b, n, 1, t))
  if family == "favor":
    w = _features(16, h)
    fn = lambda q, k, v: ea.favor_attention(q, k, v, w, chunk_size=16, implementation="pallas", **opts)
    ref = lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts)
  else:
    fn = lambda q, k, v: ea.linear_attention(
        q, k, v, feature_map=family, chunk_size=16, implementation="pallas", **opts)
    ref = lambda q, k, v: ea.linear_attention_reference(q, k, v, feature_map=family, **opts)
  # relu features vanish on half the inputs: rows with few live features amplify rounding.
  tol = {"rtol": 1e-3, "atol": 1e-3} if family == "relu" else util.TOL[dtype]
  out, _ = util.check_against_f64(fn, ref, (q, k, v), **tol)
  chex.assert_shape(out, (b, t, n, hv))
  assert out.dtype == dtype


def test_kernel_recurring_ids_and_spans_vs_f64():
  # Runs that start mid-chunk, a run longer than a span, and an id that recurs
  # after another (a new run): states restart inside chunks and between spans.
  b, t, n, kh, m, hv = 2, 77, 2, 1, 16, 8
  phi_q, phi_k = (jax.nn.softplus(util.normal((b, t, x, m))) for x in (n, kh))
  v = util.normal((b, t, kh, hv))
  ids = np.zeros((b, t), np.int32)
  ids[0, 5:60], ids[0, 60:] = 1, 0
  ids[1, 17:18], ids[1, 18:] = 2, 3
  ids = jnp.asarray(ids)
  # 5 chunks in spans of 2, 2 and 1.
  blocks = LinearBlockSizes(chunk=16, block_c=16, span_chunks=2)
  fn = lambda q, k, v: causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=blocks)
  ref = lambda q, k, v: ea.linear_attention_reference(
      q, k, v, feature_map=lambda x: x, is_causal=True, segment_ids=ids)
  util.check_against_f64(fn, ref, (phi_q, phi_k, v), **util.TOL[jnp.float32])


def test_default_tiling_vs_f64():
  # chunk_size=None: the kernel picks its chunk (128 steps for narrow features and values) and warps;
  # T=300 spans three chunks, several spans, a ragged tail and packed runs. FAVOR+ and elu+1, bf16.
  b, t, n, kh, h = 1, 300, 2, 1, 16
  q, k, v = util.qkv(b, t, t, n, kh, h, dtype=jnp.bfloat16)
  ids = util.packed_segment_ids(b, t, 3)
  w = _features(16, h)
  opts = {"is_causal": True, "segment_ids": ids}
  for fn, ref, norm_tol in [
      (lambda q, k, v: ea.favor_attention(q, k, v, w, implementation="pallas", **opts),
       lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts), _FAVOR_BF16_NORM_TOL),
      (lambda q, k, v: ea.linear_attention(q, k, v, implementation="pallas", **opts),
       lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts), None),
  ]:
    util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.bfloat16], norm_tol=norm_tol)
  # Which tiling that was: 128-step chunks, 8 warps (16 features, 16 value columns).
  static = linear.prepare(common.check_qkv(q, k, v), 16, q.dtype, None, LinearBlockSizes(), True)[0]
  assert (static.chunk, static.num_warps, static.spans) == (128, 8, 3), static


def test_rows_with_nothing_to_attend_are_zero_with_zero_grad():
  b, t = 2, 23
  q, k, v = util.qkv(b, t, t, 2, 1, 8)
  mask = util.padding_mask(b, t, fully_masked_batch=1)
  fn = lambda q, k, v: ea.linear_attention(
      q, k, v, is_causal=True, mask=mask, chunk_size=16, implementation="pallas")
  out, grads = util.check_dead_rows(fn, q, k, v, dead=(1, slice(None)), padded_batch=1)
  want = ea.linear_attention_reference(q, k, v, is_causal=True, mask=mask)
  chex.assert_trees_all_close(out, want, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(grads[0][0]).sum()) > 0


def test_reference_matches_float64_reference():
  phi_q, phi_k = (jax.nn.softplus(util.normal((2, 13, x, 5))) for x in (6, 3))
  v = util.normal((2, 13, 3, 7))
  ids = util.packed_segment_ids(2, 13, 3)
  got = kernel_attention_reference(phi_q, phi_k, v, is_causal=True, segment_ids=ids)
  want = util.in_f64(lambda q, k, v: ea.linear_attention_reference(
      q, k, v, feature_map=lambda x: x, is_causal=True, segment_ids=ids), phi_q, phi_k, v)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)


def test_jit_and_vmap():
  phi_q, phi_k, v = (jax.nn.softplus(x) for x in util.qkv(3, 19, 19, 2, 2, 16))
  blocks = LinearBlockSizes(chunk=16, span_chunks=1)
  fn = jax.jit(jax.vmap(lambda q, k, v: causal_linear_attention(q[None], k[None], v[None], block_sizes=blocks)[0]))
  want = kernel_attention_reference(phi_q, phi_k, v, is_causal=True)
  chex.assert_trees_all_close(fn(phi_q, phi_k, v), want, atol=1e-5, rtol=1e-5)


def test_errors_name_the_values():
  q, k, v = util.qkv(1, 8, 8, 2, 2, 8)
  w = _features(16, 8)
  with pytest.raises(ValueError, match=r"implementation='pallas' honours key-padding.*mask.shape=\(1, 1, 8, 8\)"):
    ea.linear_attention(q, k, v, is_causal=True, mask=jnp.ones((1, 1, 8, 8), bool), implementation="pallas")
  with pytest.raises(ValueError, match="chunked causal kernel, got is_causal=False"):
    ea.favor_attention(q, k, v, w, implementation="pallas")
  with pytest.raises(ValueError, match="power-of-two chunk_size >= 16, got chunk_size=24"):
    ea.favor_attention(q, k, v, w, is_causal=True, chunk_size=24, implementation="pallas")
  with pytest.raises(ValueError, match="chunk=8 must be a power of two >= 16"):
    LinearBlockSizes(chunk=8)
  with pytest.raises(ValueError, match="span_chunks=0"):
    LinearBlockSizes(span_chunks=0)
  with pytest.raises(TypeError, match="block_sizes must be a LinearBlockSizes"):
    causal_linear_attention(q, k, v, block_sizes=(16, 16))
  with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys, got T=8, S=4"):
    causal_linear_attention(q, k[:, :4], v[:, :4])
  ids = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="one segment_ids array.*tuple of 2"):
    causal_linear_attention(q, k, v, segment_ids=(ids, ids))


def test_favor_matches_xla_on_floored_keys():
  # Logits up to ~60: many key features sit on LOG_FEATURE_FLOOR below the stabiliser, and queries
  # whose keys are all floored have denominators near e^-35 and huge cotangents (a carried state
  # formed by subtracting sums, not by adding them, loses them).
  b, t, n, h = 1, 29, 2, 8
  q, k, v = util.qkv(b, t, t, n, n, h)
  q, k = 4.0 * q, 4.0 * k
  w = _features(16, h)
  fn = lambda q, k, v: ea.favor_attention(q, k, v, w, is_causal=True, chunk_size=16, implementation="pallas")
  ref = lambda q, k, v: ea.favor_attention(q, k, v, w, is_causal=True, implementation="xla")
  got, want = jax.vjp(fn, q, k, v), jax.vjp(ref, q, k, v)
  chex.assert_trees_all_close(got[0], want[0], atol=1e-4, rtol=1e-4)
  d_out = util.normal(got[0].shape)
  chex.assert_trees_all_close(got[1](d_out), want[1](d_out), atol=1e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "dtype, b, t, n, kh, h, m, blocks",
    [
        # odd T (ragged time blocks), GQA, M not a power of two, two column blocks
        (jnp.float32, 2, 37, 4, 2, 8, 20, FeatureBlockSizes(block_t=16, block_m=16)),
        (jnp.float32, 1, 64, 2, 2, 16, 16, None),  # whole time blocks, one column block
        # 16-bit matmuls on a high and a low part of the projection, two column blocks
        (jnp.bfloat16, 1, 33, 2, 1, 16, 40, FeatureBlockSizes(block_t=32, block_m=32)),
        (jnp.bfloat16, 1, 20, 2, 2, 8, 16, None),  # H=8: float32 matmuls
    ],
)
def test_positive_features_value_and_grad_vs_f64(dtype, b, t, n, kh, h, m, blocks):
  q, k = util.normal((b, t, n, h), dtype), util.normal((b, t, kh, h), dtype)
  w = _features(m, h)
  scale = h**-0.5
  fn = lambda q, k, w: positive_features(q, k, w, scale=scale, block_sizes=blocks)
  ref = lambda q, k, w: positive_features_reference(q, k, w, scale=scale)
  (phi_q, phi_k), pull = jax.vjp(fn, q, k, w)
  m_pad = max(16, 1 << (m - 1).bit_length())
  chex.assert_shape([phi_q, phi_k], [(b, t, n, m_pad), (b, t, kh, m_pad)])
  assert phi_q.dtype == phi_k.dtype == dtype
  # Padding columns are exactly zero; live ones positive.
  assert not np.any(np.asarray(phi_q[..., m:], np.float32)) and not np.any(np.asarray(phi_k[..., m:], np.float32))
  assert np.all(np.asarray(phi_q[..., :m], np.float32) > 0) and np.all(np.asarray(phi_k[..., :m], np.float32) > 0)
  d_q, d_k = util.normal(phi_q.shape, dtype), util.normal(phi_k.shape, dtype)
  grads = pull((d_q, d_k))
  with jax.enable_x64(True):
    args64 = util.f64((q, k, w))
    want, pull64 = jax.vjp(ref, *args64)
    want_grads = pull64(util.f64((d_q, d_k)))
  tol = util.TOL[dtype]
  for name, got, ref_value in [("phi_q", phi_q, want[0]), ("phi_k", phi_k, want[1]), ("dq", grads[0], want_grads[0]),
                               ("dk", grads[1], want_grads[1]), ("dw", grads[2], want_grads[2])]:
    got, ref_value = np.asarray(got, np.float64), np.asarray(ref_value)
    chex.assert_trees_all_close(got, ref_value, rtol=tol["rtol"], atol=tol["atol"] * np.abs(ref_value).max(),
                                custom_message=name)
    assert util.relative_error(got, ref_value) <= util.NORM_TOL[dtype], name


@pytest.mark.parametrize(
    "dtype, b, t, n, kh, h, segments",
    [
        (jnp.float32, 2, 37, 4, 2, 8, True),  # odd T, GQA, packed runs: Pallas features end to end
        (jnp.float32, 2, 37, 4, 2, 16, True),  # the same through the gradient kernels (H a power of two)
        (jnp.bfloat16, 1, 48, 2, 2, 16, False),
    ],
)
def test_favor_pallas_features_vs_f64(dtype, b, t, n, kh, h, segments):
  q, k, v = util.qkv(b, t, t, n, kh, h, dtype=dtype)
  opts = {"is_causal": True}
  if segments:
    opts["segment_ids"] = util.packed_segment_ids(b, t, 3)
  w = _features(24, h)
  fn = lambda q, k, v: ea.favor_attention(q, k, v, w, chunk_size=16, implementation="pallas", **opts)
  ref = lambda q, k, v: ea.favor_attention_reference(q, k, v, w, **opts)
  # The features come from the Pallas feature kernels (no key mask); q's and k's gradients from
  # kernels where H is a power of two >= 16 (XLA matmuls otherwise).
  assert "favor_key_features" in util.pallas_call_names(fn, q, k, v)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  names = util.pallas_call_names(jax.grad(loss, argnums=(0, 1)), q, k, v)
  assert ("favor_query_gradient" in names and "favor_key_gradient" in names) == (h % 16 == 0), names
  util.check_against_f64(fn, ref, (q, k, v), **util.TOL[dtype],
                         norm_tol=_FAVOR_BF16_NORM_TOL if dtype == jnp.bfloat16 else None)


def test_favor_pallas_gradient_of_the_projection_vs_f64():
  # The projection rows are differentiable too (features learned or tuned by a caller).
  b, t, n, kh, h = 1, 27, 2, 1, 16
  q, k, v = util.qkv(b, t, t, n, kh, h)
  w = _features(20, h)
  ids = util.packed_segment_ids(b, t, 2)
  fn = lambda w, q, k, v: ea.favor_attention(q, k, v, w, is_causal=True, segment_ids=ids, chunk_size=16,
                                             implementation="pallas")
  ref = lambda w, q, k, v: ea.favor_attention_reference(q, k, v, w, is_causal=True, segment_ids=ids)
  util.check_against_f64(fn, ref, (w, q, k, v), argnums=(0,), **util.TOL[jnp.float32])


def test_favor_kernels_errors_name_the_values():
  q = util.normal((1, 16, 2, 16))
  w = _features(16, 16)
  with pytest.raises(ValueError, match=r"w must be \[M, H=16\], got w.shape=\(16, 8\)"):
    causal_favor_attention(q, q, q, w[:, :8], scale=0.25)
  with pytest.raises(ValueError, match="needs as many queries as keys"):
    causal_favor_attention(q, q[:, :8], q[:, :8], w, scale=0.25)
  with jax.enable_x64(True):
    q64 = q.astype(jnp.float64)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32, got float64"):
      causal_favor_attention(q64, q64, q64, w, scale=0.25)
  with pytest.raises(TypeError, match="block_sizes must be a LinearBlockSizes"):
    causal_favor_attention(q, q, q, w, scale=0.25, block_sizes=(16, 16))
  with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
    FeatureBlockSizes(block_m=24)
  with pytest.raises(ValueError, match=r"w must be \[M, H=16\]"):
    positive_features(q, q, w[:, :8], scale=0.25)
