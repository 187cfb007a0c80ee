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
  row[3]        p: which piece of the tile's partners this is (below),
  row[4]        the slot the piece writes to (below), -1 when the tile is not split,
  row[4:4 + L]  the live partner tiles, the U unmasked ones first.

The kernels load the table row, walk `[0, U)` without masks and `[U, L)` with
them (causal diagonal, padded tail, segment ids), dynamic-slicing K/V (or
Q/dO) at the loaded tile index. Rows are sorted by L, longest first (global
rows, causal tails), and the grid runs (heads, batch, rows) so that the long
rows of every head start first. Tiles of the kernels may be finer than the
layout's blocks (the layout is refined by repetition): by default the Triton
flash tiles, clipped to the layout's block sizes.

Long rows are split: a tile whose partners outnumber `max_tiles_per_program`
(by default twice the mean row length, at least 8: a global row among local
ones) gets several programs, each walking one piece of its partners. Tiles that
are not split write their result where it belongs, in the input dtype; each
piece of a split tile writes its partial result (forward: output and lse;
backward: dQ or dK/dV) to its own slot of a small float32 buffer with a slot
per piece of the split tiles only, and XLA combines the slots (softmax states
by their lse, gradients by a sum) and puts the combined tiles in place. Time
then follows the live blocks even when one row holds most of them, and the
combination costs memory traffic in proportion to the split tiles alone.

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

# Table columns before the partner tiles: owned tile, unmasked count, live count, piece, slot.
_HEAD = 5
# Rows split when longer than this many times the mean row length (and than _MIN_PIECE tiles).
_SPLIT_OVER_MEAN, _MIN_PIECE = 2, 8


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
    max_tiles_per_program: int | None = None,
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
    max_tiles_per_program: the most partner tiles one program walks; longer rows
      are split over several programs and their partial results combined. None:
      twice the mean row length of each kernel's table, at least 8.

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
  if max_tiles_per_program is not None and (isinstance(max_tiles_per_program, bool)
                                            or not isinstance(max_tiles_per_program, int) or max_tiles_per_program < 1):
    raise ValueError(f"max_tiles_per_program must be None or a positive int, got {max_tiles_per_program=!r}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = _tiles(block_sizes, layout, dims.head_dim)
  static = FlashStatic(scale=scale, is_causal=is_causal, has_segments=ids is not None,
                       q_len=dims.q_len, kv_len=dims.kv_len, group=dims.group, blocks=tiles,
                       backend="triton", interpret=bool(interpret), precision=matmul_precision(q.dtype))
  qp, kp, vp, q_ids, kv_ids = pad_inputs(q, k, v, ids, dims, tiles)
  walks = walk_tables(layout, tiles, dims.q_len, dims.kv_len, qp.shape[1], kp.shape[1], is_causal=is_causal,
                      has_segments=ids is not None, cap=max_tiles_per_program)
  tables = tuple(jnp.asarray(table) for table, _ in walks)
  splits = tuple(_Split.of(table, dims.num_heads) for table, _ in walks)
  out = _attention(qp, kp, vp, q_ids, kv_ids, tables, static, splits)
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
                is_causal: bool, has_segments: bool, cap: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """(walk table `[N|1, R', W]`, pieces per tile `[N|1, R]`) of the forward, dQ and dK/dV kernels (module doc)."""

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

  fwd = _walk(*live_and_masked(tiles.block_q, tiles.block_k), cap=cap)
  dq = _walk(*live_and_masked(tiles.block_q_dq, tiles.block_k_dq), cap=cap)
  live, masked = live_and_masked(tiles.block_q_dkv, tiles.block_k_dkv)
  return fwd, dq, _walk(live.transpose(0, 2, 1), masked.T, cap=cap)


def _walk(live: np.ndarray, masked: np.ndarray, *, cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Walk table `[N|1, R', W]` from live tiles `[N|1, R, C]` and tiles needing a mask `[R, C]`, and the
  number of pieces (programs) of each tile `[N|1, R]` (module doc); R' >= R rows, one per piece."""
  heads, num_rows, _ = live.shape
  unmasked = live & ~masked
  # Unmasked live tiles first, then masked live ones, each in increasing order.
  order = np.argsort(np.where(unmasked, 0, np.where(live, 1, 2)), axis=-1, kind="stable")
  counts, free = live.sum(-1), unmasked.sum(-1)
  if cap is None:
    cap = max(_MIN_PIECE, int(np.ceil(_SPLIT_OVER_MEAN * counts.mean()))) if counts.size else 1
  # Pieces of (nearly) equal length: ceil(L / pieces) partners each, the last one shorter.
  pieces = np.maximum(1, -(-counts // cap))
  length = -(-counts // pieces)
  # One entry per (head, tile, piece): (tile, piece, first partner slot, partners).
  entries = []
  for h in range(heads):
    mine = []
    for r in range(num_rows):
      for p in range(pieces[h, r]):
        lo, hi = p * length[h, r], min(counts[h, r], (p + 1) * length[h, r])
        mine.append((r, p, lo, hi))
    entries.append(mine)
  # Every head gets as many rows: a head with fewer pieces repeats its first (longest) entries, whose
  # programs then write the same values to the same place twice.
  num_entries = max(len(e) for e in entries)
  width = int(max((hi - lo for e in entries for _, _, lo, hi in e), default=0))
  table = np.zeros((heads, num_entries, pow2_at_least(_HEAD + width, floor=4)), np.int32)
  for h, mine in enumerate(entries):
    # The pieces of split tiles get slots 0, 1, ... in (tile, piece) order; the others -1.
    slots, nxt = {}, 0
    for r, p, _, _ in mine:
      if pieces[h, r] > 1:
        slots[r, p], nxt = nxt, nxt + 1
    # Longest pieces first: their programs start first and the short ones fill in behind.
    mine = sorted(mine, key=lambda e: -(e[3] - e[2]))
    mine = (mine * -(-num_entries // len(mine)))[:num_entries]
    for i, (r, p, lo, hi) in enumerate(mine):
      table[h, i, 0] = r
      table[h, i, 1] = max(0, min(free[h, r], hi) - lo)
      table[h, i, 2] = hi - lo
      table[h, i, 3] = p
      table[h, i, 4] = slots.get((r, p), -1)
      table[h, i, _HEAD:_HEAD + hi - lo] = order[h, r, lo:hi]
  return table, pieces.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Split:
  """Which tile each slot of one kernel's partial results belongs to, per head: `owners[h][e]` is the
  tile whose piece writes slot e of head h (-1: unused by that head). Hashable (a static argument)."""

  owners: tuple[tuple[int, ...], ...]  # [N, E]

  @classmethod
  def of(cls, table: np.ndarray, num_heads: int) -> _Split:
    tables = np.broadcast_to(table, (num_heads,) + table.shape[1:])
    slots = int(table[..., 4].max(initial=-1)) + 1
    owners = np.full((num_heads, slots), -1, np.int64)
    for h in range(num_heads):
      used = tables[h, :, 4] >= 0
      owners[h, tables[h, used, 4]] = tables[h, used, 0]
    return cls(tuple(tuple(int(x) for x in row) for row in owners))

  @property
  def slots(self) -> int:
    return len(self.owners[0]) if self.owners else 0

  def indices(self, tile: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(target `[N * E]`: which combined tile of `[N * C]` each slot adds to, N * C where unused;
    rows `[N, C, tile]`: the positions each combined tile goes to, `length` (out of range) where
    unused; used `[N * E]`; C, the most split tiles of a head)."""
    owners = np.asarray(self.owners, np.int64)
    heads = owners.shape[0]
    tiles = [sorted({int(r) for r in row if r >= 0}) for row in owners]
    c = max(1, max(len(t) for t in tiles))
    target = np.full(owners.shape, heads * c, np.int64)
    rows = np.full((heads, c, tile), length, np.int64)
    for h, mine in enumerate(tiles):
      where = {r: i for i, r in enumerate(mine)}
      for e, r in enumerate(owners[h]):
        if r >= 0:
          target[h, e] = h * c + where[int(r)]
      for i, r in enumerate(mine):
        rows[h, i] = r * tile + np.arange(tile)
    return target.reshape(-1), rows, (owners >= 0).reshape(-1), c


def _slots_by_head(x: jax.Array, slots: int) -> jax.Array:
  """`[B, E * tile, N, D]` slot outputs -> `[B, N * E, tile, D]`."""
  batch, total, heads, width = x.shape
  x = x.reshape(batch, slots, total // slots, heads, width).transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, heads * slots, total // slots, width)


def _put_tiles(main: jax.Array, tiles: jax.Array, rows: np.ndarray) -> jax.Array:
  """`main [B, L, N, D]` with the combined tiles `[B, N * C, tile, D]` written at `rows [N, C, tile]`."""
  heads, c, tile = rows.shape
  tiles = tiles.reshape(tiles.shape[0], heads, c, tile, tiles.shape[-1]).astype(main.dtype)
  return main.at[:, rows, np.arange(heads)[:, None, None]].set(tiles, mode="drop")


def _sum_slots(main: jax.Array, extra: jax.Array | None, split: _Split) -> jax.Array:
  """`main [B, L, N, D]` with each split tile replaced by the sum of its pieces' slots (`extra`)."""
  if extra is None:
    return main
  tile = extra.shape[1] // split.slots
  target, rows, used, c = split.indices(tile, main.shape[1])
  x = jnp.where(jnp.asarray(used)[None, :, None, None], _slots_by_head(extra, split.slots), 0.0)
  summed = jnp.zeros((x.shape[0], main.shape[2] * c) + x.shape[2:], jnp.float32)
  return _put_tiles(main, summed.at[:, target].add(x, mode="drop"), rows)


# --------------------------------------------------------------------------- #
# custom_vjp over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, q_ids, kv_ids, tables, static: FlashStatic, splits):
  return _forward(q, k, v, q_ids, kv_ids, tables[0], static, splits[0])[0]


def _attention_fwd(q, k, v, q_ids, kv_ids, tables, static: FlashStatic, splits):
  out, lse = _forward(q, k, v, q_ids, kv_ids, tables[0], static, splits[0])
  return out, (q, k, v, q_ids, kv_ids, tables, out, lse)


def _attention_bwd(static: FlashStatic, splits, residuals, d_out):
  q, k, v, q_ids, kv_ids, tables, out, lse = residuals
  delta = output_delta(out, d_out)
  dq = _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, tables[1], static, splits[1])
  dk, dv = _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, tables[2], static, splits[2])
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


def _store(table_ref, start: int, size: int, values, refs, slot_refs) -> None:
  """Writes `values` to `refs` at rows `[start, start + size)` when the program's tile is not split,
  else to `slot_refs` at its slot (rows `[slot * size, (slot + 1) * size)`)."""

  def put(dest, at):
    for ref, x in zip(dest, values):
      ref[(pl.ds(at, size),) + (slice(None),) * (len(ref.shape) - 1)] = x.astype(ref.dtype)

  if not slot_refs:
    put(refs, start)
    return
  slot = table_ref[4]

  @pl.when(slot < 0)
  def _():
    put(refs, start)

  @pl.when(slot >= 0)
  def _():
    put(slot_refs, slot * size)


def _outputs(shapes: list[jax.ShapeDtypeStruct], split: _Split, tile: int, axis: list[int]):
  """The kernel's outputs: `shapes`, then (when tiles are split) their float32 slot buffers, the
  sequence axis (`axis[i]` of output i) holding `split.slots` tiles."""
  if not split.slots:
    return shapes
  slots = []
  for x, ax in zip(shapes, axis):
    shape = list(x.shape)
    shape[ax] = split.slots * tile
    slots.append(jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
  return shapes + slots


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *slot_refs,
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
  _store(table_ref, q_start, bq, (out, lse), (o_ref, lse_ref), slot_refs)


def _forward(q, k, v, q_ids, kv_ids, table, static: FlashStatic, split: _Split):
  """Output `[B, T, N, Hv]` and lse `[B, N, T]` (base 2, +inf on dead rows) of padded inputs."""
  batch, t_pad, num_heads, _ = q.shape
  v_dim, tile = v.shape[3], static.blocks.block_q
  shapes = [jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)]
  out_shape = _outputs(shapes, split, tile, [1, 2])
  args = [q, k, v] + ([q_ids, kv_ids] if static.has_segments else [])
  results = _call(_forward_kernel, table, args, out_shape, out_shape, static, num_inputs=4,
                  name="block_sparse_forward", backward=False)
  out, lse = results[:2]
  if not split.slots:
    return out, lse
  # The split tiles' pieces: combined by their lse, then put in place.
  target, rows, used, c = split.indices(tile, t_pad)
  used = jnp.asarray(used)[None, :, None]
  # [B, N * E, tile] and [B, N * E, tile, Hv]
  part_lse = results[3].reshape(batch, num_heads * split.slots, tile)
  part_lse = jnp.where(used & (part_lse != jnp.inf), part_lse, -jnp.inf)  # dead pieces weigh nothing
  part_out = _slots_by_head(results[2], split.slots)
  combined = (batch, num_heads * c, tile)
  top = jnp.full(combined, -jnp.inf).at[:, target].max(part_lse, mode="drop")
  top_of_part = top[:, np.minimum(target, num_heads * c - 1)]
  live = part_lse > -jnp.inf
  weight = jnp.where(live, jnp.exp2(jnp.where(live, part_lse - top_of_part, 0.0)), 0.0)
  total = jnp.zeros(combined).at[:, target].add(weight, mode="drop")
  acc = jnp.zeros(combined + (v_dim,)).at[:, target].add(
      jnp.where(live[..., None], part_out, 0.0) * weight[..., None], mode="drop")
  dead = total == 0
  acc = acc / jnp.where(dead, 1.0, total)[..., None]
  tile_lse = jnp.where(dead, jnp.inf, top + jnp.log2(jnp.where(dead, 1.0, total)))
  out = _put_tiles(out, acc, rows)
  lse = lse.at[:, np.arange(num_heads)[:, None, None], rows].set(
      tile_lse.reshape(batch, num_heads, c, tile), mode="drop")
  return out, lse


# --------------------------------------------------------------------------- #
# backward: dQ by query tiles, dK/dV by key tiles (the transposed layout)
# --------------------------------------------------------------------------- #


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref,
               *slot_refs, static: FlashStatic):
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
  _store(table_ref, q_start, bq, (dq * static.scale,), (dq_ref,), slot_refs)


def _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, table, static: FlashStatic, split: _Split):
  args = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if static.has_segments else [])
  out_shape = _outputs([jax.ShapeDtypeStruct(q.shape, q.dtype)], split, static.blocks.block_q_dq, [1])
  results = _call(_dq_kernel, table, args, out_shape, out_shape, static, num_inputs=7,
                  name="block_sparse_backward_dq", backward=True)
  return _sum_slots(results[0], results[1] if split.slots else None, split)


def _dkdv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
                 dk_ref, dv_ref, *slot_refs, static: FlashStatic):
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
  _store(table_ref, k_start, bk, (dk * static.scale, dv), (dk_ref, dv_ref), slot_refs)


def _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, table, static: FlashStatic, split: _Split):
  """dK, dV per query head (summed over each GQA group afterwards)."""
  batch, _, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  group = static.group
  out_dtype = k.dtype if group == 1 else jnp.float32
  shapes = [jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), out_dtype),
            jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), out_dtype)]
  out_shape = _outputs(shapes, split, static.blocks.block_k_dkv, [1, 1])
  args = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if static.has_segments else [])
  results = _call(_dkdv_kernel, table, args, out_shape, out_shape, static, num_inputs=7,
                  name="block_sparse_backward_dkdv", backward=True)
  dk = _sum_slots(results[0], results[2] if split.slots else None, split)
  dv = _sum_slots(results[1], results[3] if split.slots else None, split)
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
