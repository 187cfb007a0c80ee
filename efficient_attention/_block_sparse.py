"""Block-sparse attention: exact softmax attention restricted to the live blocks of a static layout.

From the layout (numpy, at trace time) each query block gets a padded list of
its live key blocks; those blocks are gathered and attended to, so work and
memory grow with the number of live blocks, never with `T * S`.

Einsum alphabet: b batch, k key/value heads, g query heads per key/value head
(G = N / K), i query block, t query offset in its block, l live-block slot,
c key offset in its block, h head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention import _checks
from efficient_attention._layouts import BlockLayout, check_grid, layout_mask
from efficient_attention._softmax import _MASKED, _split_heads, softmax_attention_reference


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Softmax attention in which query block i attends only the key blocks live in `layout`.

  Equals dense softmax attention under the mask `layout_mask(layout, T, S)`
  (intersected with `is_causal`, `mask` and `segment_ids`). T and S need not be
  multiples of the block sizes: they are padded internally and the tail masked.

  Cost: with L the most live key blocks of any query-block row (after the
  causal cut), logits are `[B, N, nq, L, bq, bk]`, about `B * N * T * L * bk`
  entries. Shorter rows are padded to L, so work follows the longest row:
  nothing is wasted for banded layouts (local, strided, BigBird), while a causal
  dense layout costs the full square. With a layout shared by every head,
  key/value blocks are gathered once per key/value head (`[B, K, nq, L, bk, H]`),
  never repeated for GQA; a per-head layout gathers them per query head.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0`.
    v: `[B, S, K, Hv]` values.
    layout: a static `BlockLayout` with grid `(ceil(T / block_q), ceil(S / block_k))`,
      shared or with N heads. Pass it as a static argument under `jax.jit`.
    is_causal: query t attends keys s <= t (top-left aligned); blocks above the
      block diagonal are skipped.
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend.
    segment_ids: int `[B, T]` (when T == S) or a (`[B, T]`, `[B, S]`) pair.
    bias: optional float `[B|1, N|1, T|1, S|1]` added to the logits.
    scale: logit scale, default `H**-0.5`.
    implementation: None or "xla".

  Returns:
    `[B, T, N, Hv]` in the input dtype (float32 accumulation); rows with no live
    key are 0 with 0 gradient.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla",), family="block_sparse_attention")
  check_grid(layout, dims.q_len, dims.kv_len)
  if layout.num_heads not in (None, dims.num_heads):
    raise ValueError(f"per-head layout has num_heads={layout.num_heads} but q has N={dims.num_heads} heads")
  mask = _checks.check_mask(mask, dims)
  bias = _checks.check_bias(bias, dims)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  is_causal = _checks.check_causal(is_causal, dims, family="block_sparse_attention")

  acc = jnp.promote_types(q.dtype, jnp.float32)
  bq, bk = layout.block_q, layout.block_k
  nq, nk = layout.grid
  idx, valid = _live_slots(layout, is_causal, dims.q_len)
  # Per query head when the layout is: [K|1, G|1, nq, L].
  heads = (dims.num_kv_heads, dims.group) if layout.num_heads is not None else (1, 1)
  idx, valid = idx.reshape(heads + idx.shape[1:]), valid.reshape(heads + valid.shape[1:])

  # [B, nq, bq, K, G, H]
  qb = _pad(q, 1, nq * bq).reshape(dims.batch, nq, bq, dims.num_kv_heads, dims.group, dims.head_dim)
  # [B, K, 1, 1, nk, bk, H] -> gathered [B, K, G|1, nq, L, bk, H]
  kg = _gather(_kv_blocks(k, nk, bk), idx)
  vg = _gather(_kv_blocks(v, nk, bk), idx)
  # [B, K, G, nq, L, bq, bk]
  logits = jnp.einsum("bitkgh,bkgilch->bkgiltc", qb, kg, preferred_element_type=acc) * scale
  if bias is not None:
    logits = logits + _gathered(bias.astype(acc), idx, dims, layout, fill=0.0)

  live = _static_live(idx, valid, layout, dims, is_causal)
  if mask is not None:
    live = live & _gathered(mask, idx, dims, layout, fill=False)
  if ids is not None:
    q_ids, kv_ids = ids
    # [B, 1, 1, nq, 1, bq, 1] == [B, K|1, G|1, nq, L, 1, bk]
    q_blocks = _pad(q_ids, 1, nq * bq).reshape(dims.batch, 1, 1, nq, 1, bq, 1)
    kv_blocks = _pad(kv_ids, 1, nk * bk).reshape(dims.batch, 1, 1, 1, nk, 1, bk)
    live = live & (q_blocks == _gather(kv_blocks, idx))

  # Softmax over every live key of a query row: the (l, c) axes.
  logits = jnp.where(live, logits, _MASKED)
  weights = jax.nn.softmax(logits, axis=(-3, -1))
  # A row with no live key: softmax gave uniform weights over masked keys; zero them.
  weights = jnp.where(jnp.any(live, axis=(-3, -1), keepdims=True), weights, 0.0)
  # [B, nq, bq, K, G, Hv]
  out = jnp.einsum("bkgiltc,bkgilch->bitkgh", weights, vg.astype(acc), preferred_element_type=acc)
  out = out.reshape(dims.batch, nq * bq, dims.num_heads, dims.v_head_dim)[:, :dims.q_len]
  return out.astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _live_slots(layout: BlockLayout, is_causal: bool, q_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Live key blocks of each query-block row, in increasing order, padded to the longest row.

  Returns int32 `idx` and bool `valid`, both `[N|1, nq, L]` with L the most
  live blocks in any row (at least 1); padding slots point at block 0 and are
  not valid. With `is_causal`, blocks wholly above the diagonal are dropped.
  """
  blocks = layout.blocks if layout.num_heads is not None else layout.blocks[None]
  nq, nk = layout.grid
  if is_causal:
    last_query = np.minimum((np.arange(nq) + 1) * layout.block_q, q_len) - 1
    blocks = blocks & (np.arange(nk)[None, :] * layout.block_k <= last_query[:, None])
  width = max(1, int(blocks.sum(-1).max()))
  # A stable sort of ~blocks puts the live blocks first, in increasing order.
  order = np.argsort(~blocks, axis=-1, kind="stable")[..., :width]
  valid = np.take_along_axis(blocks, order, axis=-1)
  return np.where(valid, order, 0).astype(np.int32), valid


def _pad(x: jax.Array, axis: int, size: int, fill=0) -> jax.Array:
  """Pads `axis` of `x` at the end up to `size`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=fill)


def _kv_blocks(x: jax.Array, nk: int, bk: int) -> jax.Array:
  """`[B, S, K, H]` -> `[B, K, 1, 1, nk, bk, H]` (padded to whole blocks)."""
  b, _, kh, h = x.shape
  x = _pad(x, 1, nk * bk).reshape(b, nk, bk, kh, h)
  return x.transpose(0, 3, 1, 2, 4)[:, :, None, None]


def _gather(x: jax.Array, idx: np.ndarray) -> jax.Array:
  """Gathers key blocks: x `[B', K|1, G|1, nq|1, nk, ...]`, idx `[K|1, G|1, nq, L]`.

  Returns `[B', K|1, G|1, nq, L, ...]` with `out[:, k, g, i, l] = x[:, k, g, i, idx[k, g, i, l]]`
  (size-1 axes broadcast).
  """
  kx, gx, ix = x.shape[1:4]
  return x[:, np.arange(kx)[:, None, None, None], np.arange(gx)[:, None, None], np.arange(ix)[:, None], idx]


def _gathered(x: jax.Array, idx: np.ndarray, dims: _checks.Dims, layout: BlockLayout, *, fill) -> jax.Array:
  """A mask or bias `[B|1, N|1, T|1, S|1]` -> its live blocks `[B|1, K|1, G|1, nq|1, L|1, bq|1, bk|1]`."""
  nq, nk = layout.grid
  x = _split_heads(x, dims)
  t_blocks = (nq, layout.block_q) if x.shape[3] > 1 else (1, 1)
  s_blocks = (nk, layout.block_k) if x.shape[4] > 1 else (1, 1)
  x = _pad(_pad(x, 3, t_blocks[0] * t_blocks[1], fill), 4, s_blocks[0] * s_blocks[1], fill)
  # [B|1, K|1, G|1, nq|1, nk|1, bq|1, bk|1]
  x = x.reshape(x.shape[:3] + t_blocks + s_blocks).transpose(0, 1, 2, 3, 5, 4, 6)
  return _gather(x, idx) if x.shape[4] > 1 else x


def _static_live(idx: np.ndarray, valid: np.ndarray, layout: BlockLayout, dims: _checks.Dims,
                 is_causal: bool) -> jax.Array:
  """bool `[1, K|1, G|1, nq, L, bq|1, bk]`: valid slots, keys before S, and the causal cut."""
  nq, bq, bk = layout.grid[0], layout.block_q, layout.block_k
  # [1, K|1, G|1, nq, L, 1, bk]
  key_pos = jnp.asarray(idx[None, ..., None, None] * bk + np.arange(bk))
  live = jnp.asarray(valid[None, ..., None, None]) & (key_pos < dims.kv_len)
  if is_causal:
    # [1, 1, 1, nq, 1, bq, 1]
    query_pos = jnp.asarray((np.arange(nq)[:, None] * bq + np.arange(bq)).reshape(1, 1, 1, nq, 1, bq, 1))
    live = live & (query_pos >= key_pos)
  return live


def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Dense softmax attention under `layout_mask(layout, T, S) & mask`, in the inputs' precision.

  Builds the whole `[B, N, T, S]` matrix; use float64 inputs under `jax.enable_x64`.
  """
  live = layout_mask(layout, q.shape[1], k.shape[1])
  if mask is not None:
    live = live & mask
  return softmax_attention_reference(
      q, k, v, bias=bias, mask=live, is_causal=is_causal, segment_ids=segment_ids, scale=scale
  )
