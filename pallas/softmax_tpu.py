"""Flash attention on TPU through Pallas' Mosaic lowering (FlashAttention-2, forward and backward).

Backend "mosaic_tpu" of `pallas.flash_attention`, which pads the inputs and
calls `forward` / `backward` here; shapes, masking and the base-2 `lse`
convention are those of the Triton kernels in `softmax.py`.

Layout. The kernels see heads-major `[B, N, T, H]` arrays, so that every block's
two minor dims are (time, head dim), the (sublane, lane) tiling of the TPU's
vector registers and VMEM.

Grids. One grid step handles one (query block, key block) pair:
  forward  (B, N, T / bq, S / bk)   the key axis is the sequential reduction;
  dQ       (B, N, T / bq, S / bk)   likewise;
  dK / dV  (B, K, S / bk, G, T / bq) the GQA group and the query axis are both
                                    sequential, so dK / dV of a key/value head
                                    are summed over its G query heads in VMEM.
Running statistics and accumulators live in VMEM scratch that persists across
the sequential axes. Under `is_causal` a fully masked block is skipped
(`pl.when`), and its index map repeats the previous block index so that the
pipeline does not fetch its operands either; key blocks wholly in the padded
tail (s >= kv_len) and query blocks wholly past q_len are skipped the same way.
Only blocks that cross the diagonal, the key tail or have segment ids build a
mask.

Per-row vectors are laid out for Mosaic's (8, 128) tiling (R = 128 lanes):
  running max / sum   [bq, R] scratch, lane-replicated (each lane holds the row's value);
  lse                 the forward transposes its [bq, R] statistics and writes
                      [B, N, 8, T] (the 8 rows are copies; row 0 is returned);
  lse / delta         enter the backward as [B, N, 8, T] rows the same way;
  segment ids         rows [B, 8, L] (ids along lanes) or columns [B, L, R].
The dK / dV kernel works on transposed `[bk, bq]` tiles, so that lse and delta
broadcast as rows and dV = P^T dO, dK = dS^T Q need no transpose; the dQ kernel
keeps `[bq, bk]` tiles and turns the lse / delta rows into columns.

Validated in Pallas' interpreters (tests/testsoftmax_tpu.py); the default block
sizes (`BlockSizes.get_default("mosaic_tpu")`, 128 throughout) are untuned.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K, H head dim (Hv for values).

The family's reference, `softmax_attention_reference`, ends `softmax.py`, the module that
dispatches to this backend; `tests/test_softmax_tpu.py` checks this backend against it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas.flash_tiles import LOG2E, MASKED
from pallas.tiling import idiv

LANES = 128
SUBLANES = 8
# Running maxima start at half of MASKED, so masked logits add exp2(-huge) == 0.
_M_INIT = 0.5 * MASKED


# --------------------------------------------------------------------------- #
# entry points (padded [B, T, N, H] in, as `softmax.forward` expects)
# --------------------------------------------------------------------------- #


def forward(q, k, v, q_ids, kv_ids, static) -> tuple[jax.Array, jax.Array]:
  """Attention output and its base-2 log-sum-exp on padded inputs.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]` (T, S multiples
      of the block sizes).
    q_ids: int32 `[B, T]` and kv_ids: int32 `[B, S]`, or None (no segments).
    static: `flash_tiles.FlashStatic`.

  Returns:
    out `[B, T, N, Hv]` in q's dtype and lse `[B, N, T]` float32 (base 2,
    +inf on rows with nothing to attend to, whose output is 0).
  """
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  bq, bk = static.blocks.block_q, static.blocks.block_k
  _check_blocks("forward", bq, bk, t_pad, s_pad, static)
  q_map, in_specs, id_specs = _query_grid_specs(bq, bk, head_dim, v_dim, static)
  args = [_heads_major(q), _heads_major(k), _heads_major(v)]
  if static.has_segments:
    in_specs += id_specs
    args += [_id_columns(q_ids), _id_rows(kv_ids)]
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, static=static),
      grid=(batch, num_heads, t_pad // bq, s_pad // bk),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, bq, v_dim), q_map),
          pl.BlockSpec((None, None, SUBLANES, bq), lambda b, n, i, j: (b, n, 0, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, num_heads, t_pad, v_dim), q.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, SUBLANES, t_pad), jnp.float32),
      ],
      scratch_shapes=[
          pltpu.VMEM((bq, LANES), jnp.float32),  # running max (base 2)
          pltpu.VMEM((bq, LANES), jnp.float32),  # running sum
          pltpu.VMEM((bq, v_dim), jnp.float32),  # unnormalised output
      ],
      compiler_params=_compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
      interpret=_interpret(static),
      cost_estimate=_cost(batch=batch, num_heads=num_heads, t_pad=t_pad, s_pad=s_pad,
                          head_dim=head_dim, v_dim=v_dim, itemsize=q.dtype.itemsize,
                          static=static, kernel="forward"),
      name="flash_forward_tpu",
  )(*args)
  return _time_major(out), lse[:, :, 0, :]


def backward(q, k, v, q_ids, kv_ids, d_out, lse, delta, static) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of `forward`'s output (FlashAttention-2, alg. 2).

  Args:
    q, k, v, q_ids, kv_ids, static: as for `forward`.
    d_out: `[B, T, N, Hv]` cotangent of the output.
    lse: `[B, N, T]` float32 from `forward`.
    delta: `[B, N, T]` float32, `sum(d_out * out, -1)`.

  Returns:
    dq `[B, T, N, H]`, dk `[B, S, K, H]`, dv `[B, S, K, Hv]` (summed over each
    GQA group), in the inputs' dtypes.
  """
  qt, kt, vt, do_t = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(d_out)
  lse_rows, delta_rows = _stat_rows(lse), _stat_rows(delta)
  dq = _backward_dq(qt, kt, vt, do_t, lse_rows, delta_rows, q_ids, kv_ids, static)
  dk, dv = _backward_dkdv(qt, kt, vt, do_t, lse_rows, delta_rows, q_ids, kv_ids, static)
  return _time_major(dq), _time_major(dk), _time_major(dv)


# --------------------------------------------------------------------------- #
# layout helpers
# --------------------------------------------------------------------------- #


def _heads_major(x: jax.Array) -> jax.Array:
  """`[B, L, N, H]` -> `[B, N, L, H]`."""
  return jnp.swapaxes(x, 1, 2)


def _time_major(x: jax.Array) -> jax.Array:
  """`[B, N, L, H]` -> `[B, L, N, H]`."""
  return jnp.swapaxes(x, 1, 2)


def _stat_rows(x: jax.Array) -> jax.Array:
  """`[B, N, L]` -> `[B, N, 8, L]`, each row repeated over the 8 sublanes."""
  return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], SUBLANES, x.shape[2]))


def _id_rows(ids: jax.Array) -> jax.Array:
  """int32 `[B, L]` -> `[B, 8, L]` (row form: ids along lanes)."""
  return jnp.broadcast_to(ids[:, None, :], (ids.shape[0], SUBLANES, ids.shape[1]))


def _id_columns(ids: jax.Array) -> jax.Array:
  """int32 `[B, L]` -> `[B, L, 128]` (column form: ids along sublanes)."""
  return jnp.broadcast_to(ids[:, :, None], (*ids.shape, LANES))


def _lanes(x: jax.Array, n: int) -> jax.Array:
  """Lane-replicated `[rows, 128]` -> `[rows, n]` (n a power of two)."""
  if n == LANES:
    return x
  if n < LANES:
    return x[:, :n]
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _interpret(static) -> Any:
  """Pallas' generic interpreter off TPU: several times faster on CPU than
  `pltpu.InterpretParams()` (the TPU simulator, which the tests also run)."""
  return bool(static.interpret)


def _check_blocks(kernel: str, bq: int, bk: int, t_pad: int, s_pad: int, static, *,
                  key_ids_in_lanes: bool = True) -> None:
  """Mosaic tiling: a block's minor dim is a multiple of 128 lanes or the whole axis.

  Query blocks are minor in the lse / delta / id rows; key blocks are minor in
  the key id rows of the forward and dQ kernels. Interpret mode has no tiling
  and takes any power-of-two block.
  """
  if static.interpret:
    return
  if bq % LANES and bq != t_pad:
    raise ValueError(
        f"mosaic_tpu {kernel}: query block {bq} must be a multiple of {LANES} or the whole "
        f"padded query length {t_pad}")
  if static.has_segments and key_ids_in_lanes and bk % LANES and bk != s_pad:
    raise ValueError(
        f"mosaic_tpu {kernel}: with segment ids, key block {bk} must be a multiple of {LANES} "
        f"or the whole padded key length {s_pad}")


def _cost(*, batch: int, num_heads: int, t_pad: int, s_pad: int, head_dim: int, v_dim: int,
          itemsize: int, static, kernel: str) -> pl.CostEstimate:
  """Rough matmul FLOPs, exponentials and HBM bytes of one kernel (causal: half the tiles)."""
  pairs = batch * num_heads * t_pad * s_pad
  if static.is_causal:
    pairs //= 2
  # products per (query, key) pair: forward QK^T, PV; dQ: QK^T, dO V^T, dS K;
  # dK/dV: QK^T, dO V^T, P^T dO, dS^T Q.
  per_pair = {"forward": head_dim + v_dim, "dq": 2 * head_dim + v_dim,
              "dkdv": 2 * head_dim + 2 * v_dim}[kernel]
  q_bytes = batch * num_heads * t_pad * (head_dim + v_dim) * itemsize
  kv_bytes = batch * num_heads // static.group * s_pad * (head_dim + v_dim) * itemsize
  return pl.CostEstimate(flops=int(2 * pairs * per_pair), transcendentals=int(pairs),
                         bytes_accessed=int(2 * q_bytes + kv_bytes))


def _compiler_params(*semantics) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=tuple(semantics))


# --------------------------------------------------------------------------- #
# which blocks run, and which need a mask
# --------------------------------------------------------------------------- #


def _last_kv_block(q_block, *, block_q: int, block_k: int, static):
  """Last key block query block `q_block` meets (the key index maps clamp to it).

  A query block wholly in the padded tail meets none; it is given key block 0
  so that its (skipped) steps fetch nothing new.
  """
  last = max(static.kv_len - 1, 0) // block_k
  if static.is_causal:
    last = jnp.minimum(last, idiv(q_block * block_q + block_q - 1, block_k))
  return jnp.where(q_block * block_q < static.q_len, last, 0)


def _query_grid_specs(bq: int, bk: int, head_dim: int, v_dim: int, static):
  """Block specs of the kernels on the grid (batch, head, query block i, key block j), the forward
  and dQ: the index map of a query tile of a heads-major `[B, N, T, *]` array, the specs of q
  `[B, N, T, H]`, k `[B, K, S, H]` and v `[B, K, S, Hv]`, and those of the query ids (columns)
  and key ids (rows). Key blocks past the last one query block i sees map to that one (no new copy).
  """
  last_kv = functools.partial(_last_kv_block, block_q=bq, block_k=bk, static=static)
  group = static.group

  def q_map(b, n, i, j):
    return b, n, i, 0

  def kv_map(b, n, i, j):
    return b, idiv(n, group), jnp.minimum(j, last_kv(i)), 0

  specs = [
      pl.BlockSpec((None, None, bq, head_dim), q_map),
      pl.BlockSpec((None, None, bk, head_dim), kv_map),
      pl.BlockSpec((None, None, bk, v_dim), kv_map),
  ]
  id_specs = [
      pl.BlockSpec((None, bq, LANES), lambda b, n, i, j: (b, i, 0)),
      pl.BlockSpec((None, SUBLANES, bk), lambda b, n, i, j: (b, 0, jnp.minimum(j, last_kv(i)))),
  ]
  return q_map, specs, id_specs


def _q_range(kv_block, *, block_q: int, block_k: int, static):
  """Query blocks `[first, last]` that key block `kv_block` meets (empty when first > last)."""
  first = idiv(kv_block * block_k, block_q) if static.is_causal else jnp.int32(0)
  last = max(static.q_len - 1, 0) // block_q
  first = jnp.where(kv_block * block_k < static.kv_len, first, last + 1)
  return first, last


def _q_block_index(kv_block, i, *, block_q: int, block_k: int, static):
  """Query block fetched at step i of key block `kv_block`: i clamped to the blocks it meets."""
  first, last = _q_range(kv_block, block_q=block_q, block_k=block_k, static=static)
  return jnp.where(first <= last, jnp.clip(i, first, last), 0)


def _needs_mask(q_block, kv_block, *, block_q: int, block_k: int, static):
  """Whether tile (q_block, kv_block) holds a masked entry (causal edge, key tail, segments)."""
  if static.has_segments:
    return True
  k_end = (kv_block + 1) * block_k  # one past the tile's last key
  needs = k_end > static.kv_len
  if static.is_causal:
    needs = needs | (k_end - 1 > q_block * block_q)
  return needs


def _apply_mask(s, *, q_pos, k_pos, same_segment, static):
  """`s` with entries outside the causal / key-length / segment mask set to MASKED."""
  keep = k_pos < static.kv_len
  if static.is_causal:
    keep = keep & (k_pos <= q_pos)
  if same_segment is not None:
    keep = keep & same_segment
  return jnp.where(keep, s, MASKED)


def _dot(a, b, static, dims):
  return lax.dot_general(a, b, (dims, ((), ())), precision=static.precision,
                         preferred_element_type=jnp.float32)


_NN = ((1,), (0,))  # a @ b
_NT = ((1,), (1,))  # a @ b.T


def _branch_on_mask(run, needs_mask, step) -> None:
  """`step(masked)` under `pl.when`: the masked variant only on tiles that need it."""
  if needs_mask is True:
    pl.when(run)(lambda: step(True))
    return
  pl.when(run & needs_mask)(lambda: step(True))
  pl.when(run & jnp.logical_not(needs_mask))(lambda: step(False))


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #


def _forward_kernel(q_ref, k_ref, v_ref, *refs, static):
  """One (query block i, key block j) step; writes out / lse after the last key block."""
  if static.has_segments:
    q_ids_ref, kv_ids_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  else:
    q_ids_ref = kv_ids_ref = None
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  bq, bk = static.blocks.block_q, static.blocks.block_k
  v_dim = acc_ref.shape[-1]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, _M_INIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = _dot(q, k, static, _NT) * (static.scale * LOG2E)  # [bq, bk], base 2
    if masked:
      same = None
      if static.has_segments:
        same = _lanes(q_ids_ref[...], bk) == kv_ids_ref[:1, :]
      s = _apply_mask(s, q_pos=i * bq + lax.broadcasted_iota(jnp.int32, s.shape, 0),
                      k_pos=j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1),
                      same_segment=same, static=static)
    m_prev = m_ref[...]  # [bq, R]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # FlashAttention-2, sec. 3.1.1: rescale the running sums once per block.
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - _lanes(m_next, bk))  # [bq, bk]
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _lanes(alpha, v_dim) + _dot(p.astype(v.dtype), v, static, _NN)

  last = _last_kv_block(i, block_q=bq, block_k=bk, static=static)
  run = (j <= last) & (i * bq < static.q_len)
  _branch_on_mask(run, _needs_mask(i, j, block_q=bq, block_k=bk, static=static), step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    dead = l == 0.0  # nothing to attend to: output 0, lse +inf
    safe_l = jnp.where(dead, 1.0, l)
    o_ref[...] = (acc_ref[...] * _lanes(1.0 / safe_l, v_dim)).astype(o_ref.dtype)
    lse = jnp.where(dead, jnp.inf, m_ref[...] + jnp.log2(safe_l))  # [bq, R]
    lse_ref[...] = lse.T[:SUBLANES, :]  # [8, bq]: the rows are copies


# --------------------------------------------------------------------------- #
# backward: dQ over key blocks
# --------------------------------------------------------------------------- #


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static):
  """dQ of query block i, accumulated over key blocks j in `[bq, bk]` tiles."""
  if static.has_segments:
    q_ids_ref, kv_ids_ref, dq_ref, acc_ref = refs
  else:
    q_ids_ref = kv_ids_ref = None
    dq_ref, acc_ref = refs
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    lse = jnp.expand_dims(lse_ref[0], 1)  # [bq, 1]
    delta = jnp.expand_dims(delta_ref[0], 1)  # [bq, 1]
    s = _dot(q, k, static, _NT) * (static.scale * LOG2E)  # [bq, bk]
    if masked:
      same = None
      if static.has_segments:
        same = _lanes(q_ids_ref[...], bk) == kv_ids_ref[:1, :]
      s = _apply_mask(s, q_pos=i * bq + lax.broadcasted_iota(jnp.int32, s.shape, 0),
                      k_pos=j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1),
                      same_segment=same, static=static)
    p = jnp.exp2(s - lse)  # 0 where masked and on dead rows (lse = +inf)
    dp = _dot(do, v, static, _NT)  # [bq, bk]
    ds = p * (dp - delta)
    acc_ref[...] += _dot(ds.astype(k.dtype), k, static, _NN)

  last = _last_kv_block(i, block_q=bq, block_k=bk, static=static)
  run = (j <= last) & (i * bq < static.q_len)
  _branch_on_mask(run, _needs_mask(i, j, block_q=bq, block_k=bk, static=static), step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * static.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, d_out, lse_rows, delta_rows, q_ids, kv_ids, static):
  """dQ `[B, N, T, H]` from heads-major q `[B, N, T, H]`, k / v `[B, K, S, H]`."""
  batch, num_heads, t_pad, head_dim = q.shape
  s_pad, v_dim = k.shape[2], v.shape[3]
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  _check_blocks("dq", bq, bk, t_pad, s_pad, static)
  q_map, in_specs, id_specs = _query_grid_specs(bq, bk, head_dim, v_dim, static)

  def row_map(b, n, i, j):
    return b, n, 0, i

  in_specs += [
      pl.BlockSpec((None, None, bq, v_dim), q_map),
      pl.BlockSpec((None, None, SUBLANES, bq), row_map),
      pl.BlockSpec((None, None, SUBLANES, bq), row_map),
  ]
  args = [q, k, v, d_out, lse_rows, delta_rows]
  if static.has_segments:
    in_specs += id_specs
    args += [_id_columns(q_ids), _id_rows(kv_ids)]
  return pl.pallas_call(
      functools.partial(_dq_kernel, static=static),
      grid=(batch, num_heads, t_pad // bq, s_pad // bk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      compiler_params=_compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
      interpret=_interpret(static),
      cost_estimate=_cost(batch=batch, num_heads=num_heads, t_pad=t_pad, s_pad=s_pad,
                          head_dim=head_dim, v_dim=v_dim, itemsize=q.dtype.itemsize,
                          static=static, kernel="dq"),
      name="flash_backward_dq_tpu",
  )(*args)


# --------------------------------------------------------------------------- #
# backward: dK / dV over query blocks and the GQA group
# --------------------------------------------------------------------------- #


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static):
  """dK / dV of key block j, accumulated over group member g and query block i.

  Tiles are transposed (`[bk, bq]`: keys down, queries across), so lse and
  delta broadcast as rows and dV = P^T dO, dK = dS^T Q are plain products.
  """
  if static.has_segments:
    q_ids_ref, kv_ids_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
  else:
    q_ids_ref = kv_ids_ref = None
    dk_ref, dv_ref, dk_acc, dv_acc = refs
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  first_step = (g == 0) & (i == 0)
  last_step = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

  @pl.when(first_step)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    lse, delta = lse_ref[:1, :], delta_ref[:1, :]  # [1, bq]
    s_t = _dot(k, q, static, _NT) * (static.scale * LOG2E)  # [bk, bq]
    if masked:
      same = None
      if static.has_segments:
        same = _lanes(kv_ids_ref[...], bq) == q_ids_ref[:1, :]
      s_t = _apply_mask(s_t, q_pos=i * bq + lax.broadcasted_iota(jnp.int32, s_t.shape, 1),
                        k_pos=j * bk + lax.broadcasted_iota(jnp.int32, s_t.shape, 0),
                        same_segment=same, static=static)
    p_t = jnp.exp2(s_t - lse)  # [bk, bq]
    dv_acc[...] += _dot(p_t.astype(do.dtype), do, static, _NN)
    dp_t = _dot(v, do, static, _NT)  # [bk, bq]
    ds_t = p_t * (dp_t - delta)
    dk_acc[...] += _dot(ds_t.astype(q.dtype), q, static, _NN)

  first, last = _q_range(j, block_q=bq, block_k=bk, static=static)
  run = (i >= first) & (i <= last)
  _branch_on_mask(run, _needs_mask(i, j, block_q=bq, block_k=bk, static=static), step)

  @pl.when(last_step)
  def _finish():
    dk_ref[...] = (dk_acc[...] * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward_dkdv(q, k, v, d_out, lse_rows, delta_rows, q_ids, kv_ids, static):
  """dK `[B, K, S, H]`, dV `[B, K, S, Hv]` from heads-major inputs."""
  batch, num_heads, t_pad, head_dim = q.shape
  num_kv_heads, s_pad, v_dim = k.shape[1], k.shape[2], v.shape[3]
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  _check_blocks("dkdv", bq, bk, t_pad, s_pad, static, key_ids_in_lanes=False)
  group = static.group
  q_block = functools.partial(_q_block_index, block_q=bq, block_k=bk, static=static)

  def q_map(b, h, j, g, i):
    return b, h * group + g, q_block(j, i), 0

  def row_map(b, h, j, g, i):
    return b, h * group + g, 0, q_block(j, i)

  def kv_map(b, h, j, g, i):
    return b, h, j, 0

  in_specs = [
      pl.BlockSpec((None, None, bq, head_dim), q_map),
      pl.BlockSpec((None, None, bk, head_dim), kv_map),
      pl.BlockSpec((None, None, bk, v_dim), kv_map),
      pl.BlockSpec((None, None, bq, v_dim), q_map),
      pl.BlockSpec((None, None, SUBLANES, bq), row_map),
      pl.BlockSpec((None, None, SUBLANES, bq), row_map),
  ]
  args = [q, k, v, d_out, lse_rows, delta_rows]
  if static.has_segments:
    in_specs += [
        pl.BlockSpec((None, SUBLANES, bq), lambda b, h, j, g, i: (b, 0, q_block(j, i))),
        pl.BlockSpec((None, bk, LANES), lambda b, h, j, g, i: (b, j, 0)),
    ]
    args += [_id_rows(q_ids), _id_columns(kv_ids)]
  return pl.pallas_call(
      functools.partial(_dkdv_kernel, static=static),
      grid=(batch, num_kv_heads, s_pad // bk, group, t_pad // bq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bk, head_dim), kv_map),
                 pl.BlockSpec((None, None, bk, v_dim), kv_map)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                      pltpu.VMEM((bk, v_dim), jnp.float32)],
      compiler_params=_compiler_params(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL,
                                       pltpu.ARBITRARY, pltpu.ARBITRARY),
      interpret=_interpret(static),
      cost_estimate=_cost(batch=batch, num_heads=num_heads, t_pad=t_pad, s_pad=s_pad,
                          head_dim=head_dim, v_dim=v_dim, itemsize=q.dtype.itemsize,
                          static=static, kernel="dkdv"),
      name="flash_backward_dkdv_tpu",
  )(*args)
