"""Block-sparse attention: exact softmax attention restricted to the live blocks of a static layout.

From the layout (numpy, at trace time) the query-block rows are grouped into a
few buckets of rows with similar numbers of live key blocks; each row gets a
list of its live key blocks padded to the widest row of its bucket, and those
blocks are gathered and attended to bucket by bucket, so work and memory grow
with the number of live blocks, never with `T * S`.

Einsum alphabet: b batch, k key/value heads, g query heads per key/value head
(G = N / K), i query block (of a bucket), t query offset in its block, l
live-block slot, c key offset in its block, h head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention import _checks
from efficient_attention._masking import drop_masked, mask_infinite_bias, padding_as_segment_ids, split_heads
from efficient_attention._softmax import MASKED_LOGIT
from pallas import block_sparse as kernel
from pallas.block_layout import BlockLayout, check_grid
from pallas.block_sparse import block_sparse_attention_reference  # noqa: F401  (exported by the package)

# Row buckets: at most this many (each is a separate pair of einsums), and no
# more than needed to keep the padded work within this factor of the live blocks.
_MAX_BUCKETS = 4
_SLACK = 1.25


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

  Cost: the width of a query-block row is its number of live key blocks (after
  the causal cut; the most over heads for a per-head layout). Rows are grouped
  by width into at most 4 buckets, each padded to its widest row: a bucket of R
  rows and width L has logits `[B, N, R, L, bq, bk]`. The buckets are the fewest
  whose padded work `sum R * L` is within 1.25x of the summed row widths (or the
  4 that come closest), so work follows the live blocks even when a few global
  rows see every key block (Longformer, BigBird, `global_tokens`), and a causal
  dense layout costs about 5/8 of the full square. With a layout shared by every
  head, key/value blocks are gathered once per key/value head
  (`[B, K, R, L, bk, H]`), never repeated for GQA; a per-head layout gathers
  them per query head.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0`.
    v: `[B, S, K, Hv]` values.
    layout: a static `BlockLayout` with grid `(ceil(T / block_q), ceil(S / block_k))`,
      shared or with N heads. Pass it as a static argument under `jax.jit`. With
      T = 0 or S = 0 no grid matches and any layout is taken (nothing is computed).
    is_causal: query t attends keys s <= t (top-left aligned); blocks above the
      block diagonal are skipped.
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend.
    segment_ids: int `[B, T]` (when T == S) or a (`[B, T]`, `[B, S]`) pair.
    bias: optional float `[B|1, N|1, T|1, S|1]` added to the logits; -inf
      entries mask their keys (a row of -inf is a row with nothing to attend to).
    scale: logit scale, default `H**-0.5`.
    implementation: None or "xla" (the bucketed gathers above), or "pallas" (the
      tiled kernel `pallas.block_sparse`, whose time follows the live blocks;
      honours is_causal, segment_ids and key-padding masks `[B|1, 1, 1, S]`, not
      bias or other masks; the layout's block sizes must be powers of two >= 16).

  Returns:
    `[B, T, N, Hv]` in the input dtype (float32 accumulation); rows with no live
    key are 0 with 0 gradient.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla", "pallas"), family="block_sparse_attention")
  empty = _checks.empty_output(q, dims)
  if empty is None:
    check_grid(layout, dims.q_len, dims.kv_len)
  elif not isinstance(layout, BlockLayout):  # no layout has an empty grid: any one is taken
    raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
  if layout.num_heads not in (None, dims.num_heads):
    raise ValueError(f"per-head layout has num_heads={layout.num_heads} but q has N={dims.num_heads} heads")
  mask = _checks.check_mask(mask, dims)
  bias = _checks.check_bias(bias, dims)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  is_causal = _checks.check_causal(is_causal, dims, family="block_sparse_attention")
  if empty is not None:
    return empty
  if bias is not None:
    mask = mask_infinite_bias(bias, mask)
  # Garbage under the mask (NaN, inf) must not reach live rows or any gradient.
  q, k, v = drop_masked(q, k, v, mask, dims)
  if implementation == "pallas":
    return _pallas(q, k, v, layout, bias=bias, mask=mask, is_causal=is_causal, ids=ids, scale=scale, dims=dims)

  acc = jnp.promote_types(q.dtype, jnp.float32)
  bq, bk = layout.block_q, layout.block_k
  nq, nk = layout.grid
  plan = _plan(layout, is_causal, dims.q_len)
  # Slot lists are per query head when the layout is: [K|1, G|1, R, L].
  heads = (dims.num_kv_heads, dims.group) if layout.num_heads is not None else (1, 1)

  # [B, nq, bq, K, G, H]
  qb = _pad(q, 1, nq * bq).reshape(dims.batch, nq, bq, dims.num_kv_heads, dims.group, dims.head_dim)
  # [B, K, 1, 1, nk, bk, H]
  kb, vb = _kv_blocks(k, nk, bk), _kv_blocks(v, nk, bk)
  # [B|1, K|1, G|1, nq|1, nk|1, bq|1, bk|1]
  if bias is not None:
    bias = _blocked(bias.astype(acc), dims, layout, fill=0.0)
  if mask is not None:
    mask = _blocked(mask, dims, layout, fill=False)
  if ids is not None:
    q_ids, kv_ids = ids
    # [B, 1, 1, nq, 1, bq, 1] and [B, 1, 1, 1, nk, 1, bk]
    ids = (_pad(q_ids, 1, nq * bq).reshape(dims.batch, 1, 1, nq, 1, bq, 1),
           _pad(kv_ids, 1, nk * bk).reshape(dims.batch, 1, 1, 1, nk, 1, bk))

  def attend(bucket: _Bucket) -> jax.Array:
    """Attention of the R query blocks of `bucket`: `[B, R, bq, K, G, Hv]`."""
    rows = bucket.rows
    idx = bucket.idx.reshape(heads + bucket.idx.shape[1:])
    valid = bucket.valid.reshape(heads + bucket.valid.shape[1:])
    # [B, K, G|1, R, L, bk, H]
    kg, vg = _select(kb, rows, idx), _select(vb, rows, idx)
    # [B, K, G, R, L, bq, bk]
    logits = jnp.einsum("bitkgh,bkgilch->bkgiltc", qb[:, rows], kg, preferred_element_type=acc) * scale
    if bias is not None:
      logits = logits + _select(bias, rows, idx)
    live = _static_live(rows, idx, valid, layout, dims, is_causal)
    if mask is not None:
      live = live & _select(mask, rows, idx)
    if ids is not None:
      # [B, 1, 1, R, 1, bq, 1] == [B, K|1, G|1, R, L, 1, bk]
      live = live & (_select(ids[0], rows, idx) == _select(ids[1], rows, idx))

    # Softmax over every live key of a query row: the (l, c) axes.
    logits = jnp.where(live, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=(-3, -1))
    # A row with no live key: softmax gave uniform weights over masked keys; zero them.
    weights = jnp.where(jnp.any(live, axis=(-3, -1), keepdims=True), weights, 0.0)
    # [B, R, bq, K, G, Hv]
    return jnp.einsum("bkgiltc,bkgilch->bitkgh", weights, vg.astype(acc), preferred_element_type=acc)

  outs = [attend(bucket) for bucket in plan.buckets]
  # The buckets' rows back in query-block order: [B, nq, bq, K, G, Hv].
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)[:, plan.inverse]
  out = out.reshape(dims.batch, nq * bq, dims.num_heads, dims.v_head_dim)[:, :dims.q_len]
  return out.astype(q.dtype)


def _pallas(q, k, v, layout: BlockLayout, *, bias, mask, is_causal, ids, scale, dims: _checks.Dims) -> jax.Array:
  if bias is not None:
    raise ValueError(f"block_sparse_attention(implementation='pallas') takes no bias (got {bias.shape=}); use 'xla'")
  if mask is not None:
    ids = padding_as_segment_ids(mask, ids, dims.batch, dims.q_len, dims.kv_len, what="block_sparse_attention(implementation='pallas')")
  return kernel.block_sparse_attention(q, k, v, layout, is_causal=is_causal, segment_ids=ids, scale=scale)


class _Bucket(NamedTuple):
  """Query-block rows attended together, each with L key-block slots.

  Attributes:
    rows: int `[R]` query-block rows, increasing.
    idx: int32 `[N|1, R, L]` the live key blocks of each row in increasing order,
      then padding slots pointing at block 0.
    valid: bool `[N|1, R, L]`, False on padding slots.
  """

  rows: np.ndarray
  idx: np.ndarray
  valid: np.ndarray


class _Plan(NamedTuple):
  """Buckets holding every query-block row once.

  Attributes:
    buckets: the buckets, narrowest first.
    inverse: int `[nq]`; row i is row `inverse[i]` of the buckets' rows concatenated.
  """

  buckets: tuple[_Bucket, ...]
  inverse: np.ndarray


@functools.lru_cache(maxsize=64)
def _plan(layout: BlockLayout, is_causal: bool, q_len: int) -> _Plan:
  """Buckets the query-block rows of `layout` by width (live key blocks, at least 1).

  With `is_causal`, blocks wholly above the diagonal are dropped first.
  """
  blocks = layout.blocks if layout.num_heads is not None else layout.blocks[None]
  nq, nk = layout.grid
  if is_causal:
    last_query = np.minimum((np.arange(nq) + 1) * layout.block_q, q_len) - 1
    blocks = blocks & (np.arange(nk)[None, :] * layout.block_k <= last_query[:, None])
  width = np.maximum(blocks.sum(-1).max(0), 1)
  buckets = []
  for rows in _group_rows(width):
    # A stable sort of ~blocks puts the live blocks first, in increasing order.
    order = np.argsort(~blocks[:, rows], axis=-1, kind="stable")[..., :width[rows].max()]
    valid = np.take_along_axis(blocks[:, rows], order, axis=-1)
    buckets.append(_Bucket(rows, np.where(valid, order, 0).astype(np.int32), valid))
  return _Plan(tuple(buckets), np.argsort(np.concatenate([b.rows for b in buckets])))


def _group_rows(width: np.ndarray) -> list[np.ndarray]:
  """Groups rows of int `width` `[nq]` (>= 1) into buckets, each padded to its widest row.

  Starts from one bucket per distinct width and merges the pair of neighbouring
  widths that adds the least padding, while there are more than `_MAX_BUCKETS`
  or the padded work stays within `_SLACK` of `sum(width)`. Returns the rows of
  each bucket, narrowest bucket first.
  """
  widths, counts = (list(a) for a in np.unique(width, return_counts=True))
  work, budget = int(width.sum()), _SLACK * int(width.sum())
  while len(widths) > 1:
    # Merging bucket j into bucket j + 1 pads its rows from widths[j] to widths[j + 1].
    extra = [counts[j] * (widths[j + 1] - widths[j]) for j in range(len(widths) - 1)]
    j = int(np.argmin(extra))
    if len(widths) <= _MAX_BUCKETS and work + extra[j] > budget:
      break
    work += extra[j]
    counts[j + 1] += counts[j]
    del counts[j], widths[j]
  return [np.flatnonzero((lower < width) & (width <= upper)) for lower, upper in zip([0] + widths[:-1], widths)]


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


def _blocked(x: jax.Array, dims: _checks.Dims, layout: BlockLayout, *, fill) -> jax.Array:
  """A mask or bias `[B|1, N|1, T|1, S|1]` -> blocks `[B|1, K|1, G|1, nq|1, nk|1, bq|1, bk|1]`."""
  nq, nk = layout.grid
  x = split_heads(x, dims.num_kv_heads, dims.group)
  t_blocks = (nq, layout.block_q) if x.shape[3] > 1 else (1, 1)
  s_blocks = (nk, layout.block_k) if x.shape[4] > 1 else (1, 1)
  x = _pad(_pad(x, 3, t_blocks[0] * t_blocks[1], fill), 4, s_blocks[0] * s_blocks[1], fill)
  return x.reshape(x.shape[:3] + t_blocks + s_blocks).transpose(0, 1, 2, 3, 5, 4, 6)


def _select(x: jax.Array, rows: np.ndarray, idx: np.ndarray) -> jax.Array:
  """A bucket's rows and live key blocks: x `[B', K|1, G|1, nq|1, nk|1, ...]`, rows `[R]`, idx `[K|1, G|1, R, L]`.

  Returns `[B', K|1, G|1, R|1, L|1, ...]` with
  `out[:, k, g, r, l] = x[:, k, g, rows[r], idx[k, g, r, l]]` (size-1 axes broadcast).
  """
  kx, gx, ix, jx = x.shape[1:5]
  if ix > 1:
    x = x[:, :, :, rows]
  if jx == 1:
    return x
  return x[:, np.arange(kx)[:, None, None, None], np.arange(gx)[:, None, None], np.arange(x.shape[3])[:, None], idx]


def _static_live(rows: np.ndarray, idx: np.ndarray, valid: np.ndarray, layout: BlockLayout, dims: _checks.Dims,
                 is_causal: bool) -> jax.Array:
  """bool `[1, K|1, G|1, R, L, bq|1, bk]`: valid slots, keys before S, and the causal cut."""
  bq, bk = layout.block_q, layout.block_k
  # [1, K|1, G|1, R, L, 1, bk]
  key_pos = jnp.asarray(idx[None, ..., None, None] * bk + np.arange(bk))
  live = jnp.asarray(valid[None, ..., None, None]) & (key_pos < dims.kv_len)
  if is_causal:
    # [1, 1, 1, R, 1, bq, 1]
    query_pos = jnp.asarray((rows[:, None] * bq + np.arange(bq)).reshape(1, 1, 1, len(rows), 1, bq, 1))
    live = live & (query_pos >= key_pos)
  return live
