"""pallas.causal_linear_attention and implementation="pallas" of linear / FAVOR+ attention (the chunked kernel).

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
  # bf16 FAVOR+ features: q's and k's gradients sit at the bf16 norm bound (see _FAVOR_BF16_NORM_TOL).
  norm_tol = _FAVOR_BF16_NORM_TOL if family == "favor" and dtype == jnp.bfloat16 else None
  out, _ = util.check_against_f64(fn, ref, (q, k, v), **tol, norm_tol=norm_tol)
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


@pytest.mark.slow  # 15 s on 2 cores; the other kernel tests pin their tiling
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
