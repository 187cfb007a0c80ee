"""pallas.flash_attention (Triton-lowered kernels) against the float64 reference.

Runs in Pallas' interpreter on CPU and compiled on a GPU (same tests). Blocks of
16 make every shape span several tiles, so the masked and unmasked loops, the
causal diagonal and the padded tail are all exercised.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attention as ea
from pallas import BlockSizes, flash_attention, softmax_attention_reference
from tests import util

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
# Unequal tiles: the forward and the two backward kernels walk different grids.
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16)


def _ref(is_causal, ids):
  return lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=is_causal, segment_ids=ids)


# (b, t, s, n, kh, h, hv, is_causal, segments, blocks): the float32 cases every flash backend is checked on.
F32_CASES = [
    (2, 37, 37, 4, 2, 8, 8, True, False, SMALL),  # odd T, GQA, causal
    (2, 29, 45, 3, 3, 5, 7, False, False, SMALL),  # T != S, odd head dims
    (1, 40, 40, 6, 2, 16, 16, True, True, MIXED),  # packed segments + causal, G=3
    (2, 33, 33, 2, 1, 32, 16, False, True, SMALL),  # segments, MQA
    (1, 48, 21, 2, 2, 8, 8, True, False, MIXED),  # causal with T > S
]


def case_inputs(b, t, s, n, kh, h, hv, segments):
  """q, k, v and the segment ids (None, `[B, T]`, or a pair when T != S) of one case."""
  q, k, v = util.qkv(b, t, s, n, kh, h, hv=hv)
  ids = None
  if segments:
    ids = (util.packed_segment_ids(b, t, 3), util.packed_segment_ids(b, s, 3)) if t != s else util.packed_segment_ids(b, t, 3)
  return q, k, v, ids


@pytest.mark.parametrize("b, t, s, n, kh, h, hv, is_causal, segments, blocks", F32_CASES)
def test_value_and_grad_f32(b, t, s, n, kh, h, hv, is_causal, segments, blocks):
  q, k, v, ids = case_inputs(b, t, s, n, kh, h, hv, segments)

  def fn(q, k, v):
    return flash_attention(q, k, v, is_causal=is_causal, segment_ids=ids, block_sizes=blocks)

  util.check_against_f64(jax.jit(fn), _ref(is_causal, ids), (q, k, v), **util.TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
  q, k, v = util.qkv(2, 45, 45, 4, 2, 16, dtype=dtype)
  ids = util.packed_segment_ids(2, 45, 2)
  fn = lambda q, k, v: flash_attention(q, k, v, is_causal=True, segment_ids=ids, block_sizes=SMALL)  # noqa: E731
  out, _ = util.check_against_f64(fn, _ref(True, ids), (q, k, v), **util.TOL[dtype])
  assert out.dtype == dtype


def test_scale_and_default_blocks():
  q, k, v = util.qkv(1, 50, 50, 2, 2, 64)
  fn = lambda q, k, v: flash_attention(q, k, v, is_causal=True, scale=0.3)  # noqa: E731
  ref = lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=True, scale=0.3)  # noqa: E731
  util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])


def dead_row_case():
  """q, k, v `[2, 21, 2|1, 8]` and (query, key) segment ids where batch 1's row 3 sees no key."""
  b, t = 2, 21
  q, k, v = util.qkv(b, t, t, 2, 1, 8)
  q_ids = util.packed_segment_ids(b, t, 2)
  kv_ids = q_ids.at[0, :5].set(7)  # batch 0, rows 0..4 (id 0 or 1) lose some keys
  q_ids = q_ids.at[1, 3].set(99)  # batch 1, row 3 has no key with its id
  return q, k, v, (q_ids, kv_ids)


def test_rows_with_nothing_to_attend_are_zero_with_zero_grad():
  q, k, v, ids = dead_row_case()
  fn = lambda q, k, v: flash_attention(q, k, v, segment_ids=ids, block_sizes=SMALL)  # noqa: E731
  out, _ = util.check_dead_rows(fn, q, k, v, dead=(1, 3))
  want = ea.softmax_attention_reference(q, k, v, segment_ids=ids)
  chex.assert_trees_all_close(out, want, atol=1e-5, rtol=1e-5)


def test_softmax_attention_dispatches_here_with_key_padding():
  b, t = 2, 23
  q, k, v = util.qkv(b, t, t, 4, 2, 8)
  mask = util.padding_mask(b, t)  # [B, 1, 1, S]
  ids = util.packed_segment_ids(b, t, 2)

  def fn(q, k, v):
    return ea.softmax_attention(q, k, v, mask=mask, segment_ids=ids, is_causal=True, implementation="pallas")

  def ref(q, k, v):
    return ea.softmax_attention_reference(q, k, v, mask=mask, segment_ids=ids, is_causal=True)

  util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])


def test_reference_matches_float64_reference():
  q, k, v = util.qkv(2, 13, 11, 6, 3, 5, hv=7)
  ids = (util.packed_segment_ids(2, 13, 2), util.packed_segment_ids(2, 11, 2))
  got = softmax_attention_reference(q, k, v, is_causal=True, segment_ids=ids)
  want = util.in_f64(_ref(True, ids), q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)


def test_vmap_and_jit():
  q, k, v = util.qkv(3, 19, 19, 2, 2, 8)
  fn = jax.jit(jax.vmap(lambda q, k, v: flash_attention(q[None], k[None], v[None], is_causal=True,
                                                        block_sizes=SMALL)[0]))
  want = ea.softmax_attention_reference(q, k, v, is_causal=True)
  chex.assert_trees_all_close(fn(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_errors_name_the_values():
  q, k, v = util.qkv(1, 8, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="backend='cuda'"):
    flash_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
    BlockSizes(block_q=24)
  with pytest.raises(TypeError, match="block_sizes must be a BlockSizes"):
    flash_attention(q, k, v, block_sizes=(16, 16))
  with pytest.raises(ValueError, match="takes no bias"):
    ea.softmax_attention(q, k, v, bias=util.normal((1, 2, 8, 8)), implementation="pallas")
  with pytest.raises(ValueError, match=r"mask.shape=\(1, 1, 8, 8\)"):
    ea.softmax_attention(q, k, v, mask=jnp.ones((1, 1, 8, 8), bool), implementation="pallas")


def _hopper() -> bool:
  from pallas import softmax_mosaic_gpu
  return jax.default_backend() == "gpu" and softmax_mosaic_gpu._on_hopper()


# (h, is_causal, segments): bf16 at T=333 with a backend's default tiles.
BF16_DEFAULT_TILE_CASES = [(64, True, True), (128, False, False), (128, True, False), (64, False, True)]


def check_bf16_default_tiles(backend, h, is_causal, segments):
  """A backend with its default tiles on bf16, B2 T=333 (odd: padded to whole tiles, tail masked), GQA."""
  b, t = 2, 333
  q, k, v = util.qkv(b, t, t, 4, 2, h, dtype=jnp.bfloat16)
  ids = util.packed_segment_ids(b, t, 3) if segments else None
  fn = lambda q, k, v: flash_attention(q, k, v, is_causal=is_causal, segment_ids=ids, backend=backend)  # noqa: E731
  out, _ = util.check_against_f64(fn, _ref(is_causal, ids), (q, k, v), **util.TOL[jnp.bfloat16])
  assert out.dtype == jnp.bfloat16


@pytest.mark.skipif(not _hopper(), reason="the Mosaic GPU forward needs a Hopper GPU")
@pytest.mark.parametrize("h, is_causal, segments", BF16_DEFAULT_TILE_CASES)
def test_mosaic_gpu_value_and_grad(h, is_causal, segments):
  check_bf16_default_tiles("mosaic_gpu", h, is_causal, segments)
