"""flash_attention(backend="mosaic_tpu") in interpret mode against the float64 reference.

The TPU kernels run on CPU in Pallas' interpreters (the generic one the backend
uses off TPU, and once the TPU simulator), on small shapes and blocks of 16 / 32
so that every grid has several query and key blocks; two more tests lower the
kernels for TPU without running them. Skipped on GPU, where interpreting a TPU
kernel tells nothing new.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import efficient_attention as ea
from pallas import BlockSizes, softmax_tpu, flash_attention
from tests import util

pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu",
                                reason="TPU kernels in interpret mode; pointless on a GPU")

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
# Different tiles per kernel: T and S are padded to 32, so some 16-blocks are all padding.
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16, block_k_dkv=32)


def _fn(blocks=SMALL, **kwargs):
  return lambda q, k, v: flash_attention(q, k, v, backend="mosaic_tpu", block_sizes=blocks, **kwargs)


def _ref(**kwargs):
  return lambda q, k, v: ea.softmax_attention_reference(q, k, v, **kwargs)


@pytest.mark.parametrize("t,s,causal", [(29, 37, False), (37, 29, True)])
def test_value_and_grad_gqa(t, s, causal):
  """GQA (N=4 on K=2), odd lengths (padded key tail and query tail), causal or not."""
  q, k, v = util.qkv(2, t, s, 4, 2, 16)
  util.check_against_f64(jax.jit(_fn(is_causal=causal)), _ref(is_causal=causal), (q, k, v),
                         **util.TOL[jnp.float32])


def test_segment_pair_mqa_value_head_dim_and_mixed_blocks():
  """(q ids, kv ids) of different lengths, one kv head (G=4), H=8 != Hv=24, per-kernel tiles."""
  q, k, v = util.qkv(2, 13, 15, 4, 1, 8, hv=24)
  ids = (util.packed_segment_ids(2, 13, 2), util.packed_segment_ids(2, 15, 2))
  util.check_against_f64(_fn(MIXED, segment_ids=ids, scale=0.3), _ref(segment_ids=ids, scale=0.3),
                         (q, k, v), **util.TOL[jnp.float32])


def test_bf16_within_norm_tolerance_and_keeps_dtype():
  q, k, v = util.qkv(2, 29, 29, 4, 2, 16, dtype=jnp.bfloat16)
  out, _ = util.check_against_f64(_fn(is_causal=True), _ref(is_causal=True), (q, k, v),
                                 **util.TOL[jnp.bfloat16])
  assert out.dtype == jnp.bfloat16
  grad_types = jax.eval_shape(jax.grad(lambda *a: jnp.sum(_fn(is_causal=True)(*a).astype(jnp.float32)),
                                       argnums=(0, 1, 2)), q, k, v)
  assert all(g.dtype == jnp.bfloat16 for g in grad_types)


def test_rows_with_no_key_give_zero_and_zero_grad():
  """Queries whose segment id no key has (batch 0, t = 3 and 20) return 0, with dq 0."""
  q, k, v = util.qkv(2, 29, 29, 4, 2, 16)
  q_ids = util.packed_segment_ids(2, 29, 3)
  kv_ids = q_ids
  q_ids = q_ids.at[0, 3].set(7).at[0, 20].set(7)
  fn = _fn(segment_ids=(q_ids, kv_ids))
  out, grads = util.check_dead_rows(fn, q, k, v, dead=[(0, 3), (0, 20)])
  ref = util.in_f64(_ref(segment_ids=(q_ids, kv_ids)), q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])
  assert float(jnp.abs(grads[0][0, 4]).sum()) > 0  # live rows have a gradient


def test_tpu_interpreter_shuffled_parallel_axes(monkeypatch):
  """Causal + packed segments + GQA + per-kernel tiles under the TPU interpreter proper.

  There, scratch starts as NaN and the parallel grid axes run in a random order.
  """
  monkeypatch.setattr(softmax_tpu, "_interpret", lambda static: pltpu.InterpretParams(random_seed=3))
  q, k, v = util.qkv(1, 29, 29, 4, 2, 16)
  ids = util.packed_segment_ids(1, 29, 2)
  util.check_against_f64(_fn(MIXED, is_causal=True, segment_ids=ids),
                         _ref(is_causal=True, segment_ids=(ids, ids)), (q, k, v), **util.TOL[jnp.float32])


def test_causal_skips_unreachable_key_blocks():
  """Keys past the last query (s >= 32, whole blocks) are never read: NaNs there stay out.

  A masked-but-computed block would give NaN through 0 * NaN in P V and dS^T Q.
  """
  q, k, v = util.qkv(2, 29, 64, 4, 2, 16)
  k = k.at[:, 32:].set(jnp.nan)
  v = v.at[:, 32:].set(jnp.nan)
  fn = _fn(is_causal=True)
  out = fn(q, k, v)
  dq, dk, dv = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for x in (out, dq, dk[:, :32], dv[:, :32]):
    assert np.isfinite(np.asarray(x)).all()
  np.testing.assert_array_equal(np.asarray(dk[:, 32:]), 0.0)
  np.testing.assert_array_equal(np.asarray(dv[:, 32:]), 0.0)
  ref = util.in_f64(_ref(is_causal=True), q, k[:, :32], v[:, :32])
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])


def test_default_blocks():
  """No block_sizes: the TPU defaults, clamped to the (short) sequence."""
  assert BlockSizes.get_default("mosaic_tpu", 64) == BlockSizes(
      block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128, block_k_dkv=128)
  q, k, v = util.qkv(2, 13, 13, 4, 2, 16)
  out = flash_attention(q, k, v, backend="mosaic_tpu", is_causal=True)
  ref = util.in_f64(_ref(is_causal=True), q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])


def _lower_for_tpu(t, s, blocks, *, segments=False, **kwargs):
  """StableHLO text of value-and-grad lowered for TPU (Mosaic's Python lowering runs on CPU)."""
  q = jax.ShapeDtypeStruct((2, t, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, s, 2, 64), jnp.bfloat16)
  ids = (jax.ShapeDtypeStruct((2, t), jnp.int32), jax.ShapeDtypeStruct((2, s), jnp.int32))

  def loss(q, k, v, ids):
    out = flash_attention(q, k, v, backend="mosaic_tpu", block_sizes=blocks, interpret=False,
                          segment_ids=ids if segments else None, **kwargs)
    return jnp.sum(out.astype(jnp.float32))

  traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids)
  return traced.lower(lowering_platforms=("tpu",)).as_text()


def test_lowers_to_mosaic_for_tpu():
  """Forward, dQ and dK/dV kernels pass Mosaic's lowering and (8, 128) block rules.

  Only the Python side: compiling the Mosaic kernels needs a TPU.
  """
  text = _lower_for_tpu(200, 312, None, is_causal=True, segments=True)
  assert text.count("tpu_custom_call") == 3


def test_compiled_blocks_must_tile():
  """Off interpret mode, blocks that break Mosaic's (8, 128) tiling are refused by name."""
  with pytest.raises(ValueError, match="query block 64 .* 256"):
    _lower_for_tpu(256, 256, dataclasses.replace(BlockSizes.get_default("mosaic_tpu"), block_q=64))
  blocks = dataclasses.replace(BlockSizes.get_default("mosaic_tpu"), block_k=64)
  with pytest.raises(ValueError, match="key block 64 .* 256"):
    _lower_for_tpu(256, 256, blocks, segments=True)
  _lower_for_tpu(256, 256, blocks)  # key blocks are never minor without segment ids
