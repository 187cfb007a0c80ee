"""softmax_attention (XLA path) against the float64 dense reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
from tests import util


class SoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_grad_all_options(self):
    b, t, s, n, kh, h = 2, 7, 11, 6, 3, 5
    q, k, v = util.qkv(b, t, s, n, kh, h, hv=3)
    bias = util.normal((1, n, t, s))
    mask = jax.random.bernoulli(util.fresh_key(), 0.8, (b, 1, t, s))
    ids = (util.packed_segment_ids(b, t, 2), util.packed_segment_ids(b, s, 2))

    def fn(q, k, v, bias):
      return ea.softmax_attention(q, k, v, bias=bias, mask=mask, segment_ids=ids, is_causal=True)

    def ref(q, k, v, bias):
      return ea.softmax_attention_reference(q, k, v, bias=bias, mask=mask, segment_ids=ids, is_causal=True)

    util.check_against_f64(self.variant(fn), ref, (q, k, v, bias), argnums=(0, 1, 2, 3), jit=False,
                           **util.TOL[jnp.float32])

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_jax_nn(self):
    q, k, v = util.qkv(2, 13, 13, 6, 2, 8)
    out = self.variant(lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, scale=0.3))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-5)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = util.qkv(2, 13, 13, 6, 3, 8, dtype=jnp.bfloat16)
    fn = lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True)
    ref = lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=True)
    out, grads = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16

  def test_fully_masked_rows_give_zero_and_zero_grad(self):
    q, k, v = util.qkv(2, 5, 7, 4, 2, 8)
    mask = util.padding_mask(2, 7, fully_masked_batch=1)
    fn = lambda q, k, v: ea.softmax_attention(q, k, v, mask=mask)
    out = fn(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2 + fn(*a)), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    for g in grads:
      np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    # Rows of batch 0 are live, so their gradient is not trivially zero.
    assert float(jnp.abs(grads[0][0]).sum()) > 0

  @settings(max_examples=6, deadline=None)
  @given(t=st.integers(1, 17), s=st.integers(1, 17), kh=st.sampled_from([1, 2, 3]),
         g=st.sampled_from([1, 2]), h=st.sampled_from([3, 8]), causal=st.booleans())
  def test_shapes_property(self, t, s, kh, g, h, causal):
    q, k, v = util.qkv(2, t, s, kh * g, kh, h)
    out = ea.softmax_attention(q, k, v, is_causal=causal)
    chex.assert_shape(out, (2, t, kh * g, h))
    ref = util.in_f64(lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=causal), q, k, v)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-5)


class SoftmaxErrorsTest(chex.TestCase):

  def test_errors_name_the_values(self):
    q, k, v = util.qkv(2, 5, 5, 6, 3, 8)
    with pytest.raises(ValueError, match="head dim"):
      ea.softmax_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="rank 4"):
      ea.softmax_attention(q[0], k, v)
    with pytest.raises(ValueError, match="GQA"):
      ea.softmax_attention(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="batch"):
      ea.softmax_attention(q[:1], k, v)
    with pytest.raises(TypeError, match="floating"):
      ea.softmax_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with pytest.raises(TypeError, match="share a dtype"):
      ea.softmax_attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(TypeError, match="boolean"):
      ea.softmax_attention(q, k, v, mask=jnp.ones((2, 1, 5, 5)))
    with pytest.raises(ValueError, match="broadcast"):
      ea.softmax_attention(q, k, v, mask=jnp.ones((2, 4, 5, 5), bool))
    with pytest.raises(ValueError, match="segment_ids"):
      ea.softmax_attention(q, k, v, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
      ea.softmax_attention(q, k, v, segment_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="implementation"):
      ea.softmax_attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="positive"):
      ea.softmax_attention(q, k, v, scale=-1.0)

  @pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
  def test_cudnn_off_gpu_is_a_clear_error(self):
    q, k, v = util.qkv(1, 4, 4, 2, 2, 8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU"):
      ea.softmax_attention(q, k, v, implementation="cudnn")



@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t,s,masked,causal", [(200, 200, True, True), (77, 77, True, False),
                                               (77, 53, False, False), (64, 33, False, True)])
@pytest.mark.parametrize("implementation", ["cudnn", None])
def test_cudnn_value_and_grad(dtype, t, s, masked, causal, implementation):
  """Odd lengths are padded for cuDNN's backward; rows with nothing to attend to stay 0."""
  b, n, kh, h = 2, 8, 2, 40
  q, k, v = util.qkv(b, t, s, n, kh, h, dtype=dtype)
  mask = util.padding_mask(b, s, fully_masked_batch=1) if masked else None
  ids = util.packed_segment_ids(b, t, 3) if masked and t == s else None

  def fn(q, k, v):
    return ea.softmax_attention(q, k, v, mask=mask, segment_ids=ids, is_causal=causal,
                                implementation=implementation)

  def ref(q, k, v):
    return ea.softmax_attention_reference(q, k, v, mask=mask, segment_ids=ids, is_causal=causal)

  out, grads = util.check_against_f64(fn, ref, (q, k, v), **util.TOL[dtype])
  if masked:
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    for g in grads:
      np.testing.assert_array_equal(g[1], 0.0)
