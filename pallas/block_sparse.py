"""Block-sparse flash attention in Pallas: the flash kernels driven by a static block layout.

`block_sparse_attention(q, k, v, layout, ...)` equals dense softmax attention
under `layout_mask(layout, T, S)` (intersected with `is_causal` and
`segment_ids`), computed tile by tile so that a dead block is never loaded nor
multiplied: time and traffic follow the live blocks.

From the static layout (numpy, at trace time) each kernel gets an int32 walk
table `[N|1, R, W]`, one row per program, R = the tiles it owns (query tiles
for the forward and dQ kernels, key tiles for the dK/dV kernel on the
transposed layout):

  row[0]        the tile this program owns,
  row[1]        U: how many of its live partner tiles need no mask,
  row[2]        L: how many partner tiles are live,
  row[3:3 + L]  the live partner tiles, the U unmasked ones first.

The kernels load the table row, walk `[0, U)` without masks and `[U, L)` with
them (causal diagonal, padded tail, segment ids), dynamic-slicing K/V (or
Q/dO) at the loaded tile index. Rows are sorted by L, longest first (global
rows, causal tails), and the grid runs (heads, batch, rows) so that the long
rows of every head start first. Tiles of the kernels may be finer than the
layout's blocks (the layout is refined by repetition): by default the Triton
flash tiles, clipped to the layout's block sizes.

Einsum alphabet as in `pallas.softmax`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas.block_layout import BlockLayout, check_grid, layout_mask
from pallas.flash_tiles import (
    FlashStatic,
    dkdv_step,
    dq_step,
    forward_init,
    forward_result,
    forward_step,
    launch_params,
    output_delta,
    pad_inputs,
    sum_groups,
    with_optional_ids,
)
from pallas.softmax import BlockSizes, softmax_attention_reference
from pallas.tiling import matmul_precision, pow2_at_least

# Table columns before the partner tiles: owned tile, unmasked count, live count.
_HEAD = 3


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layout: BlockLayout,
    *,
    is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Exact attention over the live blocks of `layout`, tile by tile.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]`, `N % K == 0`.
    layout: a static `BlockLayout` with grid `(ceil(T / block_q), ceil(S / block_k))`,
      shared or with N heads; its block sizes must be powers of two >= 16.
    is_causal: query t attends keys s <= t (top-left aligned).
    segment_ids: int `[B, T]` (T == S) or a (`[B, T]`, `[B, S]`) pair.
    scale: logit scale, default `H**-0.5`.
    block_sizes: kernel tiles (`num_warps`/`num_stages` included), each dividing
      the layout's block size on its axis; default the Triton flash tiles
      clipped to the layout's blocks.
    interpret: run the kernels in Pallas' interpreter; default True off GPU.

  Returns:
    `[B, T, N, Hv]` in the input dtype; rows with no live key are 0 with 0 gradient.
  """
  dims = common.check_qkv(q, k, v)
  check_grid(layout, dims.q_len, dims.kv_len)
  if layout.num_heads not in (None, dims.num_heads):
    raise ValueError(f"per-head layout has num_heads={layout.num_heads} but q has N={dims.num_heads} heads")
  bq, bk = layout.block_q, layout.block_k
  for name, size in (("block_q", bq), ("block_k", bk)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"the kernel tiles by the layout's blocks: layout {name}={size} must be a power of two "
                       f">= 16 (64 or 128 on a GPU); got block_q={bq}, block_k={bk}")
  ids = common.check_segment_ids(segment_ids, dims)
  scale = common.check_scale(scale, dims)
  common.check_causal(is_causal, dims, family="block_sparse_attention")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = _tiles(block_sizes, layout, dims.head_dim)
  static = FlashStatic(scale=scale, is_causal=is_causal, has_segments=ids is not None,
                       q_len=dims.q_len, kv_len=dims.kv_len, group=dims.group, blocks=tiles,
                       backend="triton", interpret=bool(interpret), precision=matmul_precision(q.dtype))
  qp, kp, vp, q_ids, kv_ids = pad_inputs(q, k, v, ids, dims, tiles)
  tables = tuple(jnp.asarray(t) for t in walk_tables(layout, tiles, dims.q_len, dims.kv_len, qp.shape[1],
                                                      kp.shape[1], is_causal=is_causal, has_segments=ids is not None))
  out = _attention(qp, kp, vp, q_ids, kv_ids, tables, static)
  return out[:, : dims.q_len, :, : dims.v_head_dim]


def _tiles(block_sizes: BlockSizes | None, layout: BlockLayout, head_dim: int) -> BlockSizes:
  """Kernel tiles: each divides the layout's block size on its axis."""
  bq, bk = layout.block_q, layout.block_k
  if block_sizes is None:
    d = BlockSizes.get_default("triton", head_dim)
    return dataclasses.replace(
        d, block_q=min(d.block_q, bq), block_k=min(d.block_k, bk), block_q_dq=min(d.block_q_dq, bq),
        block_k_dq=min(d.block_k_dq, bk), block_q_dkv=min(d.block_q_dkv, bq), block_k_dkv=min(d.block_k_dkv, bk))
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  for f in dataclasses.fields(block_sizes):
    if f.name.startswith("block_"):
      size, block = getattr(block_sizes, f.name), bq if f.name.startswith("block_q") else bk
      if block % size:
        raise ValueError(f"tile {f.name}={size} must divide the layout's block size {block} "
                         f"(block_q={bq}, block_k={bk})")
  return block_sizes


# --------------------------------------------------------------------------- #
# walk tables (numpy, at trace time)
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=64)
def walk_tables(layout: BlockLayout, tiles: BlockSizes, q_len: int, kv_len: int, t_pad: int, s_pad: int, *,
                is_causal: bool, has_segments: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The int32 walk tables `[N|1, R, W]` of the forward, dQ and dK/dV kernels (see the module doc)."""

  def live_and_masked(tq: int, tk: int) -> tuple[np.ndarray, np.ndarray]:
    """bool `[N|1, t_pad / tq, s_pad / tk]` live tiles and `[t_pad / tq, s_pad / tk]` tiles needing a mask."""
    blocks = layout.blocks if layout.num_heads is not None else layout.blocks[None]
    rows, cols = np.arange(t_pad // tq), np.arange(s_pad // tk)
    # Query tile i lies in layout block i * tq // block_q (tiles divide blocks).
    live = blocks[:, rows * tq // layout.block_q][:, :, cols * tk // layout.block_k]
    # Tiles wholly past T or S hold padding only.
    live = live & (rows * tq < q_len)[:, None] & (cols * tk < kv_len)[None, :]
    first_q, last_q = rows[:, None] * tq, rows[:, None] * tq + tq - 1
    first_k, last_k = cols[None, :] * tk, cols[None, :] * tk + tk - 1
    masked = np.broadcast_to(last_k >= kv_len, live.shape[1:]) | has_segments
    if is_causal:
      live = live & (first_k <= last_q)
      masked = masked | (last_k > first_q)
    return live, masked

  fwd = _walk(*live_and_masked(tiles.block_q, tiles.block_k))
  dq = _walk(*live_and_masked(tiles.block_q_dq, tiles.block_k_dq))
  live, masked = live_and_masked(tiles.block_q_dkv, tiles.block_k_dkv)
  return fwd, dq, _walk(live.transpose(0, 2, 1), masked.T)


def _walk(live: np.ndarray, masked: np.ndarray) -> np.ndarray:
  """Walk table `[N|1, R, W]` from live tiles `[N|1, R, C]` and tiles needing a mask `[R, C]`."""
  heads, num_rows, _ = live.shape
  unmasked = live & ~masked
  # Unmasked live tiles first, then masked live ones, each in increasing order.
  order = np.argsort(np.where(unmasked, 0, np.where(live, 1, 2)), axis=-1, kind="stable")
  counts, free = live.sum(-1), unmasked.sum(-1)
  width = int(counts.max(initial=0))
  partners = np.where(np.arange(width) < counts[..., None], order[..., :width], 0)
  # Longest rows first: their programs start first and the short ones fill in behind.
  rows = np.argsort(-counts, axis=-1, kind="stable")
  table = np.zeros((heads, num_rows, pow2_at_least(_HEAD + width, floor=4)), np.int32)
  table[..., 0] = rows
  table[..., 1] = np.take_along_axis(free, rows, axis=-1)
  table[..., 2] = np.take_along_axis(counts, rows, axis=-1)
  table[..., _HEAD:_HEAD + width] = np.take_along_axis(partners, rows[..., None], axis=1)
  return table


# --------------------------------------------------------------------------- #
# custom_vjp over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_ids, kv_ids, tables, static: FlashStatic):
  return _forward(q, k, v, q_ids, kv_ids, tables[0], static)[0]


def _attention_fwd(q, k, v, q_ids, kv_ids, tables, static: FlashStatic):
  out, lse = _forward(q, k, v, q_ids, kv_ids, tables[0], static)
  return out, (q, k, v, q_ids, kv_ids, tables, out, lse)


def _attention_bwd(static: FlashStatic, residuals, d_out):
  q, k, v, q_ids, kv_ids, tables, out, lse = residuals
  delta = output_delta(out, d_out)
  dq = _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, tables[1], static)
  dk, dv = _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, tables[2], static)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _table_spec(table) -> pl.BlockSpec:
  """The walk-table row of program (n, b, r): `[W]`."""
  per_head = table.shape[0] > 1
  return pl.BlockSpec((None, None, table.shape[2]), lambda n, b, r: (n if per_head else 0, r, 0))


def _call(kernel, table, args, out_shape, out_specs, static: FlashStatic, *, num_inputs: int, name: str,
          backward: bool):
  """pallas_call over the grid (N, B, R): heads fastest, so every head's long rows start first.

  `args` (and `out_specs`) are whole sequences: `[B, L, N|K, H]` tensors (query or
  key/value heads by their head count), `[B, N, L]` lse / delta and `[B, L]`
  segment ids; the kernel gets the program's table row first.
  """
  batch, num_heads = args[0].shape[0], args[0].shape[2]
  group = static.group

  def spec(x):
    if x.ndim == 2:
      return pl.BlockSpec((None, x.shape[1]), lambda n, b, r: (b, 0))
    if x.ndim == 3:
      return pl.BlockSpec((None, None, x.shape[2]), lambda n, b, r: (b, n, 0))
    heads = (lambda n: n) if x.shape[2] == num_heads else (lambda n: n // group)
    return pl.BlockSpec((None, x.shape[1], None, x.shape[3]), lambda n, b, r: (b, 0, heads(n), 0))

  return pl.pallas_call(
      with_optional_ids(kernel, static, num_inputs=num_inputs),
      grid=(num_heads, batch, table.shape[1]),
      in_specs=[_table_spec(table)] + [spec(x) for x in args],
      out_specs=[spec(x) for x in out_specs],
      out_shape=out_shape,
      interpret=static.interpret,
      name=name,
      **launch_params(static, backward=backward),
  )(table, *args)


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *,
                    static: FlashStatic):
  bq, bk = static.blocks.block_q, static.blocks.block_k
  q_start = table_ref[0] * bq
  rows = pl.ds(q_start, bq)
  q = q_ref[rows, :]  # [bq, H]
  q_ids = q_ids_ref[rows] if static.has_segments else None

  def body(slot, carry, *, masked):
    k_start = table_ref[_HEAD + slot] * bk
    return forward_step(q, q_ids, q_start, k_start, k_ref, v_ref, kv_ids_ref, carry, masked=masked,
                         static=static)

  free, count = table_ref[1], table_ref[2]
  carry = lax.fori_loop(0, free, functools.partial(body, masked=False), forward_init(bq, v_ref.shape[-1]))
  carry = lax.fori_loop(free, count, functools.partial(body, masked=True), carry)
  out, lse = forward_result(*carry)
  o_ref[rows, :] = out.astype(o_ref.dtype)
  lse_ref[rows] = lse


def _forward(q, k, v, q_ids, kv_ids, table, static: FlashStatic):
  """Output `[B, T, N, Hv]` and lse `[B, N, T]` (base 2, +inf on dead rows) of padded inputs."""
  batch, t_pad, num_heads, _ = q.shape
  v_dim = v.shape[3]
  out_shape = [jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), q.dtype),
               jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)]
  args = [q, k, v] + ([q_ids, kv_ids] if static.has_segments else [])
  return _call(_forward_kernel, table, args, out_shape, out_shape, static, num_inputs=4,
               name="block_sparse_forward", backward=False)


# --------------------------------------------------------------------------- #
# backward: dQ by query tiles, dK/dV by key tiles (the transposed layout)
# --------------------------------------------------------------------------- #


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref, *,
               static: FlashStatic):
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  q_start = table_ref[0] * bq
  rows = pl.ds(q_start, bq)
  tile = (q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows],
          q_ids_ref[rows] if static.has_segments else None)

  def body(slot, dq, *, masked):
    k_start = table_ref[_HEAD + slot] * bk
    return dq_step(tile, q_start, k_start, k_ref, v_ref, kv_ids_ref, dq, masked=masked, static=static)

  free, count = table_ref[1], table_ref[2]
  dq = lax.fori_loop(0, free, functools.partial(body, masked=False), jnp.zeros((bq, q_ref.shape[1]), jnp.float32))
  dq = lax.fori_loop(free, count, functools.partial(body, masked=True), dq)
  dq_ref[rows, :] = (dq * static.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, table, static: FlashStatic):
  args = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if static.has_segments else [])
  out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  return _call(_dq_kernel, table, args, [out_shape], [out_shape], static, num_inputs=7,
               name="block_sparse_backward_dq", backward=True)[0]


def _dkdv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
                 dk_ref, dv_ref, *, static: FlashStatic):
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  k_start = table_ref[0] * bk
  cols = pl.ds(k_start, bk)
  tile = (k_ref[cols, :], v_ref[cols, :], kv_ids_ref[cols] if static.has_segments else None)
  refs = (q_ref, do_ref, lse_ref, delta_ref, q_ids_ref)

  def body(slot, carry, *, masked):
    q_start = table_ref[_HEAD + slot] * bq
    return dkdv_step(tile, q_start, k_start, refs, carry, masked=masked, static=static)

  free, count = table_ref[1], table_ref[2]
  carry = (jnp.zeros((bk, k_ref.shape[1]), jnp.float32), jnp.zeros((bk, v_ref.shape[1]), jnp.float32))
  carry = lax.fori_loop(0, free, functools.partial(body, masked=False), carry)
  dk, dv = lax.fori_loop(free, count, functools.partial(body, masked=True), carry)
  dk_ref[cols, :] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[cols, :] = dv.astype(dv_ref.dtype)


def _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, table, static: FlashStatic):
  """dK, dV per query head (summed over each GQA group afterwards)."""
  batch, _, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  group = static.group
  out_dtype = k.dtype if group == 1 else jnp.float32
  out_shape = [jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), out_dtype),
               jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), out_dtype)]
  args = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if static.has_segments else [])
  dk, dv = _call(_dkdv_kernel, table, args, out_shape, out_shape, static, num_inputs=7,
                 name="block_sparse_backward_dkdv", backward=True)
  return sum_groups(dk, dv, k, v, group)


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


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
