"""pallas.block_sparse against dense float64 attention under the layout's mask.

Runs in Pallas' interpreter on CPU and compiled on a GPU (same tests). Layout
blocks of 16 on T=67 (five query blocks, the last one partial) make every
kernel walk several live tiles per row, masked and unmasked, and skip others.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention import layouts
from pallas import BlockSizes, block_sparse
from pallas.block_sparse import block_sparse_attention, block_sparse_attention_reference
from tests import util

B, T, N, K, H, HV = 2, 67, 4, 2, 8, 5
# Tiles finer than the layout's blocks of 32 (and unequal across the three kernels).
FINE = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16, block_k_dkv=16)


def check(layout, args, *, dtype=jnp.float32, block_sizes=None, max_tiles_per_program=None, **options):
  """Value and gradient of the jitted kernel against the float64 reference under `layout_mask`."""

  def fn(q, k, v):
    return block_sparse_attention(q, k, v, layout, block_sizes=block_sizes,
                                  max_tiles_per_program=max_tiles_per_program, **options)

  def ref(q, k, v):
    return ea.block_sparse_attention_reference(q, k, v, layout, **options)

  return util.check_against_f64(jax.jit(fn), ref, args, **util.TOL[dtype])


def random_layout(t, s, block_q, block_k, *, num_heads=None, p=0.5):
  grid = (-(-t // block_q), -(-s // block_k))
  shape = grid if num_heads is None else (num_heads,) + grid
  return ea.BlockLayout(np.asarray(util.bernoulli(p, shape)), block_q, block_k)


BUILDERS = {  # name -> (kv_len, build)
    "local": (T, lambda: layouts.local(T, window=20, block_size=16)),
    "strided_rectangular": (45, lambda: layouts.strided(T, stride=2, block_size=16, kv_len=45)),
    "global_tokens": (T, lambda: layouts.global_tokens(T, num_global=5, block_size=16)),
    "random_per_head": (T, lambda: layouts.random(util.fresh_key(), T, num_random_blocks=2, block_size=16,
                                                  num_heads=N)),
    "bigbird_per_head": (T, lambda: layouts.bigbird(util.fresh_key(), T, block_size=16, num_global_blocks=1,
                                                    num_random_blocks=1, num_heads=N)),
    "longformer": (T, lambda: layouts.longformer(T, window=16, num_global=9, block_size=16)),
    "dense": (T, lambda: layouts.dense(T, block_size=16)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_value_and_grad(name):
  kv_len, build = BUILDERS[name]
  check(build(), util.qkv(1, T, kv_len, N, K, H, hv=HV), is_causal=name == "longformer")


def test_random_per_head_layout_causal_segments_gqa():
  t, s = 53, 61  # T != S, both odd
  layout = random_layout(t, s, 16, 32, num_heads=6)
  ids = (util.packed_segment_ids(B, t, 3), util.packed_segment_ids(B, s, 3))
  check(layout, util.qkv(B, t, s, 6, 2, 8, hv=HV), is_causal=True, segment_ids=ids, scale=0.4)


def test_tiles_finer_than_layout_blocks():
  layout = layouts.bigbird(util.fresh_key(), T, block_size=32, num_global_blocks=1, num_random_blocks=1)
  check(layout, util.qkv(1, T, T, N, K, 16), block_sizes=FINE, is_causal=True,
        segment_ids=util.packed_segment_ids(1, T, 2))


def test_bf16_keeps_dtype():
  layout = layouts.longformer(T, window=16, num_global=16, block_size=16)
  q, k, v = util.qkv(B, T, T, N, K, 16, dtype=jnp.bfloat16)
  out, _ = check(layout, (q, k, v), dtype=jnp.bfloat16, is_causal=True)
  assert out.dtype == jnp.bfloat16


def test_dead_rows_are_zero_with_zero_grad():
  blocks = np.ones((5, 5), bool)
  blocks[2] = False  # query tokens 32..47 see no key block
  layout = ea.BlockLayout(blocks, 16, 16)
  q, k, v = util.qkv(B, T, T, N, K, H)
  # Batch 0 keeps 50 keys, batch 1 none.
  mask = (jnp.arange(T)[None, :] < jnp.array([50, 0])[:, None])[:, None, None, :]

  def fn(q, k, v):
    return ea.block_sparse_attention(q, k, v, layout, mask=mask, implementation="pallas")

  out, _ = util.check_dead_rows(fn, q, k, v, dead=[1, (0, slice(32, 48))], padded_batch=1)
  want = ea.block_sparse_attention_reference(q, k, v, layout, mask=mask)
  chex.assert_trees_all_close(out, want, atol=1e-5, rtol=1e-5)


def test_dispatch_with_key_padding_segments_and_causal():
  layout = layouts.longformer(T, window=16, num_global=9, block_size=16)
  options = dict(mask=util.padding_mask(B, T), segment_ids=util.packed_segment_ids(B, T, 2), is_causal=True)

  def fn(q, k, v):
    return ea.block_sparse_attention(q, k, v, layout, implementation="pallas", **options)

  def ref(q, k, v):
    return ea.block_sparse_attention_reference(q, k, v, layout, **options)

  util.check_against_f64(fn, ref, util.qkv(B, T, T, N, K, H), **util.TOL[jnp.float32])


@pytest.mark.parametrize("is_causal,cap", [(False, None), (True, None), (True, 2)])
def test_walk_tables_hold_exactly_the_live_tiles(is_causal, cap):
  layout = layouts.bigbird(jax.random.key(0), 300, block_size=64, num_heads=3) | layouts.global_tokens(
      300, num_global=64, block_size=64)
  tiles = BlockSizes(block_q=64, block_k=32, block_q_dq=32, block_k_dq=32, block_q_dkv=32, block_k_dkv=64)
  t_pad = s_pad = 320
  walks = block_sparse.walk_tables(layout, tiles, 300, 300, t_pad, s_pad, is_causal=is_causal,
                                   has_segments=False, cap=cap)
  dense = np.asarray(ea.layout_mask(layout, 300))[0]  # [N, T, S]
  if is_causal:
    dense = dense & np.tri(300, dtype=bool)
  head = block_sparse._HEAD
  for (table, pieces), tq, tk, transposed in zip(walks, (64, 32, 32), (32, 32, 64), (False, False, True)):
    tiles_owned = pieces.shape[1]
    counts = table[..., 2]
    assert np.all(np.diff(counts, axis=-1) <= 0), "pieces run longest first"
    if cap is not None:
      assert counts.max() <= cap and pieces.max() > 1
    else:
      assert pieces.max() == 1, "no row of this layout is long enough to split"
    for n in range(3):
      # Every (tile, piece) has a row; a head with fewer pieces repeats rows (identical writes).
      owned = {(int(r[0]), int(r[3])) for r in table[n]}
      assert owned == {(r, p) for r in range(tiles_owned) for p in range(pieces[n, r])}
      # Only the pieces of split tiles get slots of the float32 buffer, one each: 0, 1, ... in (tile, piece)
      # order, so the buffer holds the split tiles alone; the other tiles write in place (-1).
      slots = {(int(r[0]), int(r[3])): int(r[4]) for r in table[n]}
      split = sorted((r, p) for r, p in slots if pieces[n, r] > 1)
      assert [slots[rp] for rp in split] == list(range(len(split)))
      assert all(slots[r, p] == -1 for r, p in slots if pieces[n, r] == 1)
      walked = np.zeros((tiles_owned, (s_pad if not transposed else t_pad) // (tk if not transposed else tq)), int)
      for row in {tuple(r) for r in table[n]}:
        free, count = row[1], row[2]
        assert 0 <= free <= count
        partners = np.asarray(row[head:head + count])
        walked[row[0], partners] += 1
        # Unmasked partners first: the last key tile (tail) and causal diagonal tiles are masked.
        own = row[0]
        q_tile, k_tile = (partners, own) if transposed else (own, partners)
        needs_mask = ((k_tile + 1) * tk > 300) | (is_causal & ((k_tile + 1) * tk - 1 > q_tile * tq))
        np.testing.assert_array_equal(needs_mask, np.arange(count) >= free)
      # A tile is live when any of its tokens is live in the dense mask; the pieces walk each once.
      padded = np.pad(dense[n], ((0, t_pad - 300), (0, s_pad - 300)))
      live = padded.reshape(t_pad // tq, tq, s_pad // tk, tk).any(axis=(1, 3))
      np.testing.assert_array_equal(walked, (live.T if transposed else live).astype(int))


@pytest.mark.parametrize("cap", [1, 2])
def test_split_rows_value_and_grad(cap):
  # Rows split over programs (max_tiles_per_program): pieces combined by their lse (forward) and summed
  # (dQ, dK/dV). A causal Longformer layout with global tokens (long rows and columns), GQA, segments.
  layout = layouts.longformer(T, window=16, num_global=9, block_size=16)
  check(layout, util.qkv(B, T, T, N, K, H, hv=HV), is_causal=True, segment_ids=util.packed_segment_ids(B, T, 2),
        max_tiles_per_program=cap)


def test_split_rows_per_head_layout_dead_rows_and_bf16():
  blocks = np.ones((4, 5, 5), bool)
  blocks[1, 2] = False  # head 1: query tokens 32..47 see no key block
  blocks[2, :, 1:] = False  # head 2: one key block, so one piece per row while other heads have several
  layout = ea.BlockLayout(blocks, 16, 16)
  check(layout, util.qkv(B, T, T, N, K, H, hv=HV), max_tiles_per_program=2)
  q, k, v = util.qkv(B, T, T, N, K, 16, dtype=jnp.bfloat16)
  out, _ = check(layout, (q, k, v), dtype=jnp.bfloat16, is_causal=True, max_tiles_per_program=2)
  assert out.dtype == jnp.bfloat16


def test_reference_matches_float64_reference():
  layout = random_layout(13, 21, 16, 16, num_heads=6)
  q, k, v = util.qkv(2, 13, 21, 6, 3, 5, hv=7)
  ids = (util.packed_segment_ids(2, 13, 2), util.packed_segment_ids(2, 21, 2))
  got = block_sparse_attention_reference(q, k, v, layout, is_causal=True, segment_ids=ids)
  want = util.in_f64(lambda *a: block_sparse_attention_reference(*a, layout, is_causal=True, segment_ids=ids),
                     q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)


def test_errors_name_the_values():
  q, k, v = util.qkv(1, 24, 24, 2, 2, 8)
  with pytest.raises(ValueError, match="layout block_q=8 must be a power of two >= 16"):
    block_sparse_attention(q, k, v, layouts.dense(24, block_size=8))
  with pytest.raises(ValueError, match="tile block_k=32 must divide the layout's block size 16"):
    block_sparse_attention(q, k, v, layouts.dense(24, block_size=16),
                           block_sizes=dataclasses.replace(FINE, block_q=16, block_k=32))
  with pytest.raises(ValueError, match="num_heads=3 but q has N=2"):
    block_sparse_attention(q, k, v, random_layout(24, 24, 16, 16, num_heads=3))
  layout = layouts.dense(24, block_size=16)
  with pytest.raises(ValueError, match=r"takes no bias \(got bias.shape=\(1, 2, 24, 24\)\)"):
    ea.block_sparse_attention(q, k, v, layout, bias=util.normal((1, 2, 24, 24)), implementation="pallas")
  with pytest.raises(ValueError, match=r"key-padding masks .* mask.shape=\(1, 1, 24, 24\)"):
    ea.block_sparse_attention(q, k, v, layout, mask=jnp.ones((1, 1, 24, 24), bool), implementation="pallas")


def test_split_rows_lower_to_triton_for_a_gpu():
  # Cross-lowering on this CPU (Pallas' Triton lowering for a CUDA target) of the three kernels with a
  # layout whose global row and column are split by the default rule (16 tiles against a mean near 5).
  t = 2048
  layout = layouts.longformer(t, window=256, num_global=128, block_size=128)
  tiles = BlockSizes(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128, block_k_dkv=128)
  walks = block_sparse.walk_tables(layout, tiles, t, t, t, t, is_causal=False, has_segments=False)
  assert all(pieces.max() > 1 for _, pieces in walks)
  q = jnp.ones((1, t, 2, 64), jnp.bfloat16)
  f = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_sizes=tiles, interpret=False)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  module = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=triton)(q, q, q).mlir_module()
  assert module.count("xla.gpu.triton") == 3  # forward (for lse), dQ, dK/dV
