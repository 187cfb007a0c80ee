"""The FAVOR+ kernels (pallas.favor): positive features and causal FAVOR+ through Pallas end to end.

Values and gradients against the float64 dense references, in Pallas' interpreter on CPU and
compiled on a GPU (same tests). The chunked kernel they feed is tested in test_linear_kernel.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attention as ea
from pallas.favor import (
  FeatureBlockSizes,
  causal_favor_attention,
  positive_features,
  positive_features_reference,
)
from tests import util
from tests.test_linear_kernel import _FAVOR_BF16_NORM_TOL, _features


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
