"""Block layouts and block_sparse_attention against dense float64 attention under the layout's mask.

Most value/gradient checks share one set of shapes (B=2, T=S=37, N=6, K=3, H=5,
Hv=3, blocks of 8: a 5 x 5 grid with a partial last block), which keeps
compilation, and so test time, down.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
from efficient_attention import _block_sparse, layouts
from tests import util

B, T, N, K, H, HV = 2, 37, 6, 3, 5, 3

normal, qkv, bernoulli = util.normal, util.qkv, util.bernoulli


def random_layout(grid, block_q, block_k, *, num_heads=None, p=0.4):
  """A random boolean `BlockLayout` (per head when `num_heads` is given)."""
  shape = grid if num_heads is None else (num_heads,) + grid
  return ea.BlockLayout(np.asarray(bernoulli(p, shape)), block_q, block_k)


def check(layout, args, options=None, *, dtype=jnp.float32, argnums=(0, 1, 2)):
  """Value and gradient of jitted block_sparse_attention against the dense float64 reference."""
  options = options or {}

  def fn(q, k, v, bias=None):
    return ea.block_sparse_attention(q, k, v, layout, bias=bias, **options)

  def ref(q, k, v, bias=None):
    return ea.block_sparse_attention_reference(q, k, v, layout, bias=bias, **options)

  return util.check_against_f64(jax.jit(fn), ref, args, argnums=argnums, **util.TOL[dtype])


BUILDERS = (  # (name, kv_len, build)
    ("local", T, lambda: layouts.local(T, window=5, block_size=8)),
    ("strided_rectangular", 29, lambda: layouts.strided(T, stride=2, block_size=8, kv_len=29)),
    ("global_tokens", T, lambda: layouts.global_tokens(T, num_global=3, block_size=8)),
    ("random", T, lambda: layouts.random(util.fresh_key(), T, num_random_blocks=2, block_size=8)),
    ("bigbird_per_head", T, lambda: layouts.bigbird(util.fresh_key(), T, block_size=8, num_window_blocks=1,
                                                    num_global_blocks=1, num_random_blocks=1, num_heads=N)),
    ("longformer", T, lambda: layouts.longformer(T, window=4, num_global=9, block_size=8)),
    ("dense", T, lambda: layouts.dense(T, block_size=8)),
    ("random_boolean_8x4", T, lambda: random_layout((5, 10), 8, 4)),
)

MULTI_BUCKET = (  # (name, build, is_causal): global rows put the 10 query-block rows in several buckets.
    ("longformer", lambda: layouts.longformer(T, window=4, num_global=5, block_size=4), False),
    ("bigbird", lambda: layouts.bigbird(jax.random.key(3), T, block_size=4), False),
    ("bigbird_causal", lambda: layouts.bigbird(jax.random.key(3), T, block_size=4), True),
    ("bigbird_per_head", lambda: layouts.bigbird(jax.random.key(4), T, block_size=4, num_random_blocks=2, num_heads=N),
     False),
)


class BlockSparseTest(chex.TestCase):

  @parameterized.named_parameters(*BUILDERS)
  def test_builder_value_and_grad(self, kv_len, build):
    q, k, v = qkv(B, T, kv_len, N, K, H, hv=HV)
    layout = build()
    check(layout, (q, k, v))

  def test_all_options_per_head_gqa(self):
    check(*all_options_case(), argnums=(0, 1, 2, 3))

  @parameterized.named_parameters(*MULTI_BUCKET)
  def test_several_buckets_value_and_grad(self, build, is_causal):
    layout = build()
    assert len(_block_sparse._plan(layout, is_causal, T).buckets) >= 2
    check(layout, qkv(B, T, T, N, K, H, hv=HV), dict(is_causal=is_causal))

  def test_several_buckets_all_options_per_head_gqa(self):
    s = 29
    layout = (layouts.random(jax.random.key(5), T, num_random_blocks=3, block_size=4, kv_len=s, num_heads=N)
              | layouts.global_tokens(T, num_global=4, block_size=4, kv_len=s))
    assert len(_block_sparse._plan(layout, True, T).buckets) >= 2
    q, k, v = qkv(B, T, s, N, K, H, hv=HV)
    options = dict(is_causal=True, mask=bernoulli(0.8, (B, 1, T, s)),
                   segment_ids=(util.packed_segment_ids(B, T, 2), util.packed_segment_ids(B, s, 2)))
    check(layout, (q, k, v, normal((1, N, T, s))), options, argnums=(0, 1, 2, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_values(self):
    layout, args, options = all_options_case()
    out = self.variant(lambda *a: ea.block_sparse_attention(*a[:3], layout, bias=a[3], **options))(*args)
    ref = util.in_f64(lambda *a: ea.block_sparse_attention_reference(*a[:3], layout, bias=a[3], **options), *args)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])

  def test_causal_local_with_padding_and_scale(self):
    q, k, v = qkv(B, T, T, N, K, H, hv=HV)
    mask = util.padding_mask(B, T)
    options = dict(is_causal=True, mask=mask, segment_ids=util.packed_segment_ids(B, T, 3), scale=0.3)
    check(layout_local(), (q, k, v), options)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = qkv(B, T, T, N, K, H, hv=HV, dtype=jnp.bfloat16)
    out, _ = check(layout_local(), (q, k, v), dict(is_causal=True), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16

  def test_fully_masked_rows_give_zero_and_zero_grad(self):
    blocks = np.ones((5, 5), bool)
    blocks[2] = False  # query tokens 16..23 see no key block
    layout = ea.BlockLayout(blocks, 8, 8)
    q, k, v = qkv(B, T, T, N, K, H, hv=HV)
    # Batch 0 keeps 30 keys, batch 1 none.
    mask = (jnp.arange(T)[None, :] < jnp.array([30, 0])[:, None])[:, None, None, :]
    fn = jax.jit(lambda q, k, v: ea.block_sparse_attention(q, k, v, layout, mask=mask))
    out = fn(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[0, 16:24]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2 + fn(*a)), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    for g in grads:
      np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][0, 16:24]), 0.0)
    assert float(jnp.abs(grads[0][0]).sum()) > 0

  def test_vmap_and_layout_as_static_jit_argument(self):
    traces = []

    def fn(q, k, v, layout):
      traces.append(layout)
      return ea.block_sparse_attention(q, k, v, layout)

    jitted = jax.jit(fn, static_argnums=3)
    q, k, v = qkv(B, T, T, N, K, H, hv=HV)
    a, b = layout_local(), layout_local()
    assert a is not b
    out = jitted(q, k, v, a)
    jitted(q, k, v, b)
    assert len(traces) == 1  # equal layouts hash alike: one trace
    jitted(q, k, v, layouts.dense(T, block_size=8))
    assert len(traces) == 2
    batched = jax.jit(jax.vmap(lambda q, k, v: ea.block_sparse_attention(q, k, v, a)))(q[None], k[None], v[None])
    chex.assert_trees_all_close(batched[0], out, rtol=1e-6, atol=1e-6)

  def test_work_follows_live_blocks(self):
    t = 512
    sparse, full = layouts.local(t, window=0, block_size=64), layouts.dense(t, block_size=64)
    assert sparse.density == 0.125
    q, k, v = qkv(1, t, t, 2, 1, 8)

    def flops(layout):
      return util.matmul_flops(lambda q, k, v: ea.block_sparse_attention(q, k, v, layout), q, k, v)

    ratio = flops(full) / flops(sparse)
    assert 7.0 < ratio < 9.0, ratio
    # Nothing of dense [T, S] size is built, forward or backward (the sparse logits are 2 * T * 64).
    loss = lambda q, k, v: jnp.sum(ea.block_sparse_attention(q, k, v, sparse))
    assert util.largest_value(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v) == 2 * t * 64
    assert util.largest_value(lambda q, k, v: ea.block_sparse_attention(q, k, v, full), q, k, v) == 2 * t * t

  def test_work_follows_live_blocks_with_global_rows(self):
    t = 1024
    # One global row of 16 blocks, the others 3 or 4: 74 of 256 blocks live.
    sparse, full = layouts.longformer(t, window=64, num_global=64, block_size=64), layouts.dense(t, block_size=64)
    live = int(sparse.blocks.sum())
    plan = _block_sparse._plan(sparse, False, t)
    padded = sum(len(bucket.rows) * bucket.idx.shape[-1] for bucket in plan.buckets)
    assert padded <= 2 * live, (padded, live)
    q, k, v = qkv(1, t, t, 2, 1, 8)

    def flops(layout):
      return util.matmul_flops(lambda q, k, v: ea.block_sparse_attention(q, k, v, layout), q, k, v)

    ratio = flops(sparse) / flops(full)
    assert ratio <= 2.5 * live / full.blocks.size, (ratio, live)

  def test_plan_buckets_cover_each_row_once(self):
    # Rows of widths 1, 2, 4, .., 32, as many rows of each width as leaves the same work to each.
    widths = np.repeat(2 ** np.arange(6), 2 ** np.arange(6)[::-1])
    staircase = ea.BlockLayout(np.arange(32)[None, :] < widths[:, None], 64, 64)
    cases = (  # (layout, is_causal)
        (layouts.longformer(1024, window=64, num_global=64, block_size=64), False),
        (layouts.bigbird(jax.random.key(0), 1024, block_size=64, num_heads=4), False),
        (layouts.dense(1024, block_size=64), True),  # 16 distinct widths
        (staircase, False),  # within 1.25x of the live blocks only with 5 buckets, more than allowed
    )
    for layout, is_causal in cases:
      nq = layout.grid[0]
      plan = _block_sparse._plan(layout, is_causal, nq * layout.block_q)
      blocks = layout.blocks if layout.num_heads is not None else layout.blocks[None]
      if is_causal:
        blocks = blocks & np.tri(nq, dtype=bool)
      assert 2 <= len(plan.buckets) <= _block_sparse._MAX_BUCKETS, len(plan.buckets)
      rows = np.concatenate([bucket.rows for bucket in plan.buckets])
      np.testing.assert_array_equal(rows[plan.inverse], np.arange(nq))
      rebuilt = np.zeros_like(blocks)
      for bucket in plan.buckets:
        head, row, slot = np.nonzero(bucket.valid)
        rebuilt[head, bucket.rows[row], bucket.idx[head, row, slot]] = True
      np.testing.assert_array_equal(rebuilt, blocks)
      padded = sum(len(bucket.rows) * bucket.idx.shape[-1] for bucket in plan.buckets)
      widths = blocks.sum(-1).max(0)
      assert padded <= 2 * widths.sum(), (padded, widths)

  @settings(max_examples=3, deadline=None)
  @given(t=st.integers(1, 19), s=st.integers(1, 19), bq=st.sampled_from([2, 4, 8]), bk=st.sampled_from([2, 4, 8]),
         kh=st.sampled_from([1, 2]), per_head=st.booleans(), causal=st.booleans(), seed=st.integers(0, 2**16))
  def test_random_layouts_property(self, t, s, bq, bk, kh, per_head, causal, seed):
    rng = np.random.default_rng(seed)
    n = 2 * kh
    grid = (-(-t // bq), -(-s // bk))
    layout = ea.BlockLayout(rng.random(((n,) if per_head else ()) + grid) < 0.5, bq, bk)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((2, t, n, 4), (2, s, kh, 4), (2, s, kh, 3)))
    out = jax.jit(lambda *a: ea.block_sparse_attention(*a, layout, is_causal=causal))(q, k, v)
    chex.assert_shape(out, (2, t, n, 3))
    ref = util.in_f64(lambda *a: ea.block_sparse_attention_reference(*a, layout, is_causal=causal), q, k, v)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, rtol=1e-5, atol=1e-5)


def all_options_case():
  """A per-head layout with GQA, T != S, block_q != block_k, causal, mask, segment ids and bias."""
  b, t, s, n, kh, h = 2, 13, 21, 6, 2, 5
  layout = random_layout((4, 3), 4, 8, num_heads=n, p=0.6)
  q, k, v = qkv(b, t, s, n, kh, h, hv=HV)
  options = dict(is_causal=True, mask=bernoulli(0.8, (b, 1, t, s)),
                 segment_ids=(util.packed_segment_ids(b, t, 2), util.packed_segment_ids(b, s, 2)))
  return layout, (q, k, v, normal((1, n, t, s))), options


def layout_local():
  return layouts.local(T, window=5, block_size=8)


class LayoutTest(chex.TestCase):

  def test_local_covers_the_token_window_and_no_more_blocks(self):
    for t, s, window, block in ((37, 37, 5, 8), (37, 21, 0, 8), (13, 13, 9, 4)):
      layout = layouts.local(t, window=window, block_size=block, kv_len=s)
      dense = np.asarray(ea.layout_mask(layout, t, s))[0, 0]
      band = np.abs(np.arange(t)[:, None] - np.arange(s)[None, :]) <= window
      assert np.all(dense[band])
      # Every live block holds at least one in-window pair.
      for i, j in zip(*np.nonzero(layout.blocks)):
        assert band[i * block:(i + 1) * block, j * block:(j + 1) * block].any(), (i, j)
    np.testing.assert_array_equal(layouts.local(40, window=0, block_size=8).blocks, np.eye(5, dtype=bool))

  def test_strided_global_dense_longformer(self):
    i, j = np.arange(5)[:, None], np.arange(4)[None, :]
    np.testing.assert_array_equal(layouts.strided(37, stride=3, block_size=8, kv_len=29).blocks, (i - j) % 3 == 0)
    glob = layouts.global_tokens(37, num_global=9, block_size=8).blocks  # 2 global blocks
    want = np.zeros((5, 5), bool)
    want[:2] = want[:, :2] = True
    np.testing.assert_array_equal(glob, want)
    assert not layouts.global_tokens(37, num_global=0, block_size=8).blocks.any()
    assert layouts.dense(37, block_size=8, kv_len=9).blocks.all()
    assert layouts.dense(37, block_size=8, kv_len=9).grid == (5, 2)
    assert layouts.longformer(37, window=3, num_global=1, block_size=8) == (
        layouts.local(37, window=3, block_size=8) | layouts.global_tokens(37, num_global=1, block_size=8))

  def test_random_is_keyed_distinct_and_per_head(self):
    key = util.fresh_key()
    a = layouts.random(key, 100, num_random_blocks=3, block_size=8)
    assert a == layouts.random(key, 100, num_random_blocks=3, block_size=8)
    assert a != layouts.random(util.fresh_key(), 100, num_random_blocks=3, block_size=8)
    np.testing.assert_array_equal(a.blocks.sum(-1), 3)
    per_head = layouts.random(key, 100, num_random_blocks=2, block_size=8, kv_len=30, num_heads=4)
    assert per_head.blocks.shape == (4, 13, 4) and per_head.num_heads == 4
    np.testing.assert_array_equal(per_head.blocks.sum(-1), 2)
    assert not all(np.array_equal(per_head.blocks[0], h) for h in per_head.blocks[1:])
    with pytest.raises(TypeError, match="outside jax.jit"):
      jax.jit(lambda key: layouts.random(key, 16, num_random_blocks=1, block_size=8))(key)

  def test_bigbird_is_window_global_random(self):
    key = util.fresh_key()
    bb = layouts.bigbird(key, 100, block_size=8, num_heads=3)
    window = np.abs(np.arange(13)[:, None] - np.arange(13)[None, :]) <= 1
    rand = layouts.random(key, 100, num_random_blocks=3, block_size=8, num_heads=3)
    want = window | rand.blocks
    want[:, :2] = want[:, :, :2] = True
    np.testing.assert_array_equal(bb.blocks, want)

  def test_algebra_density_hash_and_repr(self):
    a, b = random_layout((4, 6), 4, 8), random_layout((4, 6), 4, 8)
    per_head = random_layout((4, 6), 4, 8, num_heads=3)
    np.testing.assert_array_equal((a | b).blocks, a.blocks | b.blocks)
    np.testing.assert_array_equal((a & b).blocks, a.blocks & b.blocks)
    np.testing.assert_array_equal((a | per_head).blocks, a.blocks[None] | per_head.blocks)
    np.testing.assert_array_equal((per_head & a).blocks, per_head.blocks & a.blocks[None])
    assert (a | b).density == pytest.approx(np.mean(a.blocks | b.blocks))
    copy = ea.BlockLayout(a.blocks.copy(), 4, 8)
    assert copy == a and hash(copy) == hash(a) and len({a, copy, b}) == (1 if a == b else 2)
    assert ea.BlockLayout(a.blocks, 4, 4) != a
    assert ea.BlockLayout(a.blocks[None], 4, 8) != a
    with pytest.raises(ValueError, match="read-only"):
      a.blocks[0, 0] = True
    text = repr(layouts.local(40, window=0, block_size=8))
    assert text == "BlockLayout(grid=(5, 5), shared, block_q=8, block_k=8, live=5/25, density=0.200)", text
    assert "num_heads=3" in repr(per_head)

  def test_layout_mask_shape_and_tail(self):
    layout = random_layout((4, 3), 4, 8, num_heads=6)
    mask = np.asarray(ea.layout_mask(layout, 13, 21))
    assert mask.shape == (1, 6, 13, 21)
    for t, s in ((0, 0), (12, 20), (5, 17)):
      assert mask[0, 4, t, s] == layout.blocks[4, t // 4, s // 8]
    assert ea.layout_mask(layouts.dense(13, block_size=4), 13).shape == (1, 1, 13, 13)

  def test_local_strided_is_one_function_per_setting(self):
    fn = layouts.local_strided(window=8, stride=3, block_size=4)
    assert fn is layouts.local_strided(window=8, stride=3, block_size=4)
    assert fn is not layouts.local_strided(window=8, stride=2, block_size=4)
    for t in (13, 29):
      assert fn(t) == layouts.local(t, window=8, block_size=4) | layouts.strided(t, stride=3, block_size=4)


class BlockSparseErrorsTest(chex.TestCase):

  def test_attention_errors_name_the_values(self):
    q, k, v = qkv(B, 13, 13, N, K, H, hv=HV)
    with pytest.raises(ValueError, match=r"grid \(nq, nk\)=\(5, 5\) does not match .*=\(4, 4\) for T=13, S=13"):
      ea.block_sparse_attention(q, k, v, ea.BlockLayout(np.ones((5, 5), bool), 4, 4))
    with pytest.raises(ValueError, match="num_heads=3 but q has N=6"):
      ea.block_sparse_attention(q, k, v, random_layout((4, 4), 4, 4, num_heads=3))
    with pytest.raises(TypeError, match="layout must be a BlockLayout, got ndarray"):
      ea.block_sparse_attention(q, k, v, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="block_sparse_attention has no implementation='cudnn'"):
      ea.block_sparse_attention(q, k, v, layouts.dense(13, block_size=4), implementation="cudnn")
    with pytest.raises(ValueError, match="broadcast"):
      ea.block_sparse_attention(q, k, v, layouts.dense(13, block_size=4), bias=jnp.ones((2, 6, 12, 13)))
    with pytest.raises(ValueError, match="grid"):
      ea.layout_mask(layouts.dense(13, block_size=4), 17, 13)

  def test_layout_errors_name_the_values(self):
    a = layouts.dense(37, block_size=8)
    with pytest.raises(ValueError, match=r"\(block_q, block_k\)=\(8, 8\) \| \(4, 4\)"):
      a | layouts.dense(20, block_size=4)
    with pytest.raises(ValueError, match=r"grids \(nq, nk\)=\(5, 5\) & \(4, 5\)"):
      a & layouts.dense(30, block_size=8, kv_len=37)
    with pytest.raises(ValueError, match=r"num_heads=2 \| 3"):
      random_layout((5, 5), 8, 8, num_heads=2) | random_layout((5, 5), 8, 8, num_heads=3)
    with pytest.raises(TypeError, match="boolean"):
      ea.BlockLayout(np.ones((2, 2)), 4, 4)
    with pytest.raises(ValueError, match=r"blocks.shape=\(2,\)"):
      ea.BlockLayout(np.ones(2, bool), 4, 4)
    with pytest.raises(ValueError, match="block_k must be positive, got block_k=0"):
      ea.BlockLayout(np.ones((2, 2), bool), 4, 0)
    with pytest.raises(ValueError, match="window must be >= 0, got window=-1"):
      layouts.local(16, window=-1)
    with pytest.raises(ValueError, match="seq_len must be positive, got seq_len=0"):
      layouts.dense(0)
    with pytest.raises(ValueError, match="stride must be positive, got stride=0"):
      layouts.strided(16, stride=0)
    with pytest.raises(TypeError, match="block_size must be an int, got block_size=8.0"):
      layouts.global_tokens(16, num_global=1, block_size=8.0)
    with pytest.raises(ValueError, match="num_random_blocks=3 exceeds the 2 key blocks of kv_len=16"):
      layouts.random(util.fresh_key(), 64, num_random_blocks=3, block_size=8, kv_len=16)
    with pytest.raises(ValueError, match="num_window_blocks must be odd"):
      layouts.bigbird(util.fresh_key(), 64, block_size=8, num_window_blocks=2)
