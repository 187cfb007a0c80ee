"""linformer_attention against the float64 per-query-projection reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
from tests import util

ALL_ARGS = (0, 1, 2, 3, 4)  # q, k, v, e_proj, f_proj

normal, qkv, bernoulli = util.normal, util.qkv, util.bernoulli


def projections(p, t_max, kh=None, dtype=jnp.float32):
  """Random E, F: `[P, T_max]`, or `[K, P, T_max]` per key/value head."""
  shape = (p, t_max) if kh is None else (kh, p, t_max)
  return normal(shape, dtype, t_max**-0.5), normal(shape, dtype, t_max**-0.5)


def general_case():
  """GQA, T != S < T_max, per-head projections, a per-head general mask and a segment-id pair."""
  b, t, s, n, kh, h = 2, 7, 11, 6, 2, 5
  q, k, v = qkv(b, t, s, n, kh, h, hv=3)
  e, f = projections(4, 13, kh)
  ids = (util.packed_segment_ids(b, t, 2), util.packed_segment_ids(b, s, 2))
  return dict(mask=bernoulli(0.7, (b, n, t, s)), segment_ids=ids), (q, k, v, e, f)


def check(fn_options, args, *, dtype=jnp.float32):
  """Value and gradient (all five inputs) of jitted linformer_attention against the float64 reference."""
  def fn(*a):
    return ea.linformer_attention(*a, **fn_options)

  def ref(*a):
    return ea.linformer_attention_reference(*a, **fn_options)

  return util.check_against_f64(jax.jit(fn), ref, args, argnums=ALL_ARGS, **util.TOL[dtype])


class LinformerTest(chex.TestCase):

  def test_value_and_grad_shared_projection_key_padding_gqa(self):
    b, t, s, n, kh, h = 2, 7, 11, 6, 3, 5
    q, k, v = qkv(b, t, s, n, kh, h, hv=3)
    e, f = projections(4, 13)  # S = 11 < T_max = 13
    check(dict(mask=util.padding_mask(b, s), scale=0.4), (q, k, v, e, f))

  def test_general_mask_segment_ids_per_head_projection(self):
    check(*general_case())

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_values(self):
    options, args = general_case()
    out = self.variant(lambda *a: ea.linformer_attention(*a, **options))(*args)
    ref = util.in_f64(lambda *a: ea.linformer_attention_reference(*a, **options), *args)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])

  def test_per_query_head_key_padding_per_head_projection(self):
    b, t, s, n, kh, h = 2, 7, 11, 6, 3, 5
    q, k, v = qkv(b, t, s, n, kh, h, hv=3)
    e, f = projections(5, 11, kh)
    check(dict(mask=bernoulli(0.6, (b, n, 1, s))), (q, k, v, e, f))

  def test_padding_removes_keys_before_projection(self):
    # A padded suffix of keys is the same as a shorter sequence, whatever the padded values.
    b, t, s, n, kh, h = 1, 7, 11, 6, 3, 5
    q, k, v = qkv(b, t, s, n, kh, h)
    e, f = projections(4, 13)
    keep = 6
    mask = (jnp.arange(s) < keep)[None, None, None, :]
    fn = jax.jit(ea.linformer_attention)
    out = fn(q, k, v, e, f, mask=mask)
    short = fn(q, k[:, :keep], v[:, :keep], e, f)
    chex.assert_trees_all_close(out, short, rtol=1e-5, atol=1e-5)
    noisy = fn(q, k.at[:, keep:].set(100.0), v.at[:, keep:].set(-100.0), e, f, mask=mask)
    chex.assert_trees_all_close(out, noisy, rtol=1e-5, atol=1e-5)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = qkv(2, 7, 11, 6, 3, 5, hv=3, dtype=jnp.bfloat16)
    e, f = projections(4, 13, dtype=jnp.bfloat16)
    out, _ = check(dict(mask=bernoulli(0.7, (2, 1, 7, 11))), (q, k, v, e, f), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16

  def test_f32_projections_with_bf16_inputs(self):
    q, k, v = qkv(2, 7, 7, 6, 3, 8, dtype=jnp.bfloat16)
    e, f = projections(4, 7)
    out = jax.jit(ea.linformer_attention)(q, k, v, e, f)
    assert out.dtype == jnp.bfloat16
    ref = util.in_f64(ea.linformer_attention_reference, q, k, v, e, f)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.bfloat16])

  @parameterized.parameters(False, True)
  def test_fully_masked_rows_give_zero_and_zero_grad(self, general):
    b, t, s, n, kh, h = 2, 5, 7, 6, 3, 8
    q, k, v = qkv(b, t, s, n, kh, h)
    e, f = projections(3, 9)
    mask = util.padding_mask(b, s, fully_masked_batch=1)
    if general:
      # Also a dead query row (t = 2) in batch 0, so the per-query path is taken.
      mask = jnp.broadcast_to(mask, (b, 1, t, s)).at[0, :, 2].set(False)
    fn = jax.jit(lambda *a: ea.linformer_attention(*a, mask=mask))
    args = (q, k, v, e, f)
    out = fn(*args)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2 + fn(*a)), argnums=ALL_ARGS)(*args)
    chex.assert_tree_all_finite(grads)
    for g in grads[:3]:
      np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    assert float(jnp.abs(grads[0][0]).sum()) > 0
    # Nothing flows from the dead rows into the projections.
    dead = jax.grad(lambda *a: jnp.sum(fn(*a)[1] * 3.0 + 1.0), argnums=ALL_ARGS)(*args)
    for g in dead:
      np.testing.assert_array_equal(np.asarray(g), 0.0)
    if general:
      np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)
      np.testing.assert_array_equal(np.asarray(grads[0][0, 2]), 0.0)

  def test_vmap_over_a_leading_axis(self):
    q, k, v = (jnp.stack(x) for x in zip(qkv(2, 7, 7, 6, 3, 5), qkv(2, 7, 7, 6, 3, 5)))
    e, f = projections(4, 7)
    fn = lambda q, k, v: ea.linformer_attention(q, k, v, e, f)
    out = jax.jit(jax.vmap(fn))(q, k, v)
    chex.assert_trees_all_close(out[1], jax.jit(fn)(q[1], k[1], v[1]), rtol=1e-6, atol=1e-6)

  @settings(max_examples=3, deadline=None)
  @given(t=st.integers(1, 12), s=st.integers(1, 12), extra=st.integers(0, 3), p=st.integers(1, 6),
         kh=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 2]), per_head=st.booleans())
  def test_shapes_property(self, t, s, extra, p, kh, g, per_head):
    q, k, v = qkv(2, t, s, kh * g, kh, 4, hv=3)
    e, f = projections(p, s + extra, kh if per_head else None)
    out = jax.jit(ea.linformer_attention)(q, k, v, e, f)
    chex.assert_shape(out, (2, t, kh * g, 3))
    ref = util.in_f64(ea.linformer_attention_reference, q, k, v, e, f)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-5)


class LinformerErrorsTest(chex.TestCase):

  def test_options_it_cannot_honour(self):
    q, k, v = qkv(2, 5, 5, 6, 3, 8)
    e, f = projections(3, 8)
    with pytest.raises(ValueError, match=r"cannot honour is_causal=True"):
      ea.linformer_attention(q, k, v, e, f, is_causal=True)
    with pytest.raises(ValueError, match=r"cannot honour bias=<array shape=\(1, 6, 5, 5\)"):
      ea.linformer_attention(q, k, v, e, f, bias=normal((1, 6, 5, 5)))
    with pytest.raises(TypeError, match="is_causal must be a bool"):
      ea.linformer_attention(q, k, v, e, f, is_causal=1)
    with pytest.raises(ValueError, match="linformer_attention has no implementation='pallas'"):
      ea.linformer_attention(q, k, v, e, f, implementation="pallas")

  def test_bad_projections_name_the_values(self):
    q, k, v = qkv(2, 5, 9, 6, 3, 8)
    e, f = projections(3, 12)
    with pytest.raises(ValueError, match=r"S=9 exceeds the projection's T_max=8"):
      ea.linformer_attention(q, k, v, e[:, :8], f[:, :8])
    with pytest.raises(ValueError, match=r"e_proj.shape=\(3, 12\) and f_proj.shape=\(2, 12\)"):
      ea.linformer_attention(q, k, v, e, f[:2])
    per_head = projections(3, 12, 2)
    with pytest.raises(ValueError, match=r"e_proj.shape=\(2, 3, 12\) must have K=3"):
      ea.linformer_attention(q, k, v, *per_head)
    with pytest.raises(ValueError, match=r"\[P, T_max\] or \[K, P, T_max\], got e_proj.shape=\(12,\)"):
      ea.linformer_attention(q, k, v, e[0], f[0])
    with pytest.raises(TypeError, match="f_proj must be floating point, got f_proj.dtype=int32"):
      ea.linformer_attention(q, k, v, e, f.astype(jnp.int32))
    with pytest.raises(TypeError, match="e_proj must be an array"):
      ea.linformer_attention(q, k, v, [[1.0]], f)
    with pytest.raises(TypeError, match="q must be floating point"):
      ea.linformer_attention(q.astype(jnp.int32), k, v, e, f)
    with pytest.raises(ValueError, match="broadcast"):
      ea.linformer_attention(q, k, v, e, f, mask=jnp.ones((2, 4, 5, 9), bool))
