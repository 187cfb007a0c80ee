"""The tile steps of the flash kernels, shared by the dense (`softmax.py`) and the
block-sparse (`block_sparse.py`) Triton kernels: their static settings, the
padding of the inputs, the masked logits of a tile, and the steps that fold one
key tile into a query tile's running sums (forward, FlashAttention-2 sec. 3.1.1),
into dQ, or one query tile into dK / dV (FlashAttention-2, alg. 2).

Logits are in base-2 units (scaled by log2 e); lse likewise, +inf on rows with
nothing to attend to, so that the backward's exp2(s - lse) is 0 there.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K, H head dim (Hv for values).

No kernel of its own: the kernels that use these steps end with their references
(`softmax.py`, `block_sparse.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas.tiling import dot, dot_nt, dot_tn, idiv, pad_ids, pad_to, pow2_at_least, round_up, triton_params

if TYPE_CHECKING:
  from pallas.softmax import BlockSizes

LOG2E = math.log2(math.e)
# Masked logits (base-2 units). Running maxima start at half of it, so a block
# whose entries are all masked contributes exp2(-huge) == 0 without a select.
MASKED = -1e30
M_INIT = 0.5 * MASKED


@dataclasses.dataclass(frozen=True)
class FlashStatic:
  """Everything the kernels need to know at trace time (hashable)."""

  scale: float
  is_causal: bool
  has_segments: bool
  q_len: int
  kv_len: int
  group: int
  blocks: BlockSizes
  backend: str
  interpret: bool
  # float32 inputs multiply in full float32 (not TF32); narrower ones as they are.
  precision: Any = None  # see tiling.matmul_precision


def pad_inputs(q, k, v, ids, dims: common.Dims, blocks: BlockSizes):
  """q, k, v zero-padded to whole tiles of every kernel and head dims to powers of two
  (>= 16), and the int32 query and key ids padded likewise (None without segments)."""
  t_pad = round_up(dims.q_len, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  s_pad = round_up(dims.kv_len, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
  qp = pad_to(q, t_pad, pow2_at_least(dims.head_dim))
  kp = pad_to(k, s_pad, pow2_at_least(dims.head_dim))
  vp = pad_to(v, s_pad, pow2_at_least(dims.v_head_dim))
  q_ids = kv_ids = None
  if ids is not None:
    # Padded queries get an id no key has; padded keys are masked by position.
    q_ids, kv_ids = common.int32_segment_ids(*ids)
    q_ids = pad_ids(q_ids, t_pad, value=jnp.iinfo(jnp.int32).min)
    kv_ids = pad_ids(kv_ids, s_pad, value=jnp.iinfo(jnp.int32).max)
  return qp, kp, vp, q_ids, kv_ids


def output_delta(out, d_out):
  """delta_t = sum_h dO_th O_th  (FlashAttention-2, sec. 3.1.2, D_i): float32 `[B, N, T]`."""
  return jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))


def sum_groups(dk, dv, k, v, group: int):
  """Per-query-head dK `[B, S, N, H]`, dV `[B, S, N, Hv]` summed over each GQA group, in k's and v's dtypes."""
  if group == 1:
    return dk, dv
  batch, s_pad, num_kv_heads, head_dim = k.shape
  # [B, S, K, G, H] -> [B, S, K, H]
  dk = dk.reshape(batch, s_pad, num_kv_heads, group, head_dim).sum(3).astype(k.dtype)
  dv = dv.reshape(batch, s_pad, num_kv_heads, group, v.shape[3]).sum(3).astype(v.dtype)
  return dk, dv


def launch_params(static: FlashStatic, *, backward: bool) -> dict:
  """The Triton launch settings of the forward or the backward kernels."""
  b = static.blocks
  warps, stages = (b.num_warps_bwd, b.num_stages_bwd) if backward else (b.num_warps, b.num_stages)
  return triton_params(interpret=static.interpret, num_warps=warps, num_stages=stages)


def query_block(program, num_programs, static: FlashStatic):
  """Causal query blocks run longest first (the last block sees every key): less tail idle."""
  return num_programs - 1 - program if static.is_causal else program


def kv_ranges(q_block, *, block_q: int, block_k: int, static: FlashStatic):
  """Key blocks query block `q_block` visits: unmasked `[0, full)`, masked `[full, end)`."""
  kv_len = static.kv_len
  if static.is_causal:
    end = jnp.minimum(idiv(q_block * block_q + block_q + block_k - 1, block_k), pl.cdiv(kv_len, block_k))
    full = jnp.minimum(idiv(q_block * block_q + 1, block_k), kv_len // block_k)
  else:
    end = jnp.int32(pl.cdiv(kv_len, block_k))
    full = jnp.int32(kv_len // block_k)
  if static.has_segments:
    full = jnp.int32(0)
  return jnp.minimum(full, end), end


def logits(q, k, q_start, k_start, q_ids, kv_ids, *, masked: bool, static: FlashStatic):
  """Scaled logits in base-2 units `[bq, bk]`, masked entries set to MASKED."""
  # [bq, bk]
  s = dot_nt(q, k, static.precision) * (static.scale * LOG2E)
  if not masked:
    return s
  rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  keep = cols < static.kv_len
  if static.is_causal:
    keep = keep & (cols <= rows)
  if static.has_segments:
    keep = keep & (q_ids[:, None] == kv_ids[None, :])
  return jnp.where(keep, s, MASKED)


def forward_init(bq: int, v_dim: int):
  """Running (accumulator `[bq, Hv]`, max `[bq]`, sum `[bq]`) of a query tile before any key."""
  return (jnp.zeros((bq, v_dim), jnp.float32), jnp.full((bq,), M_INIT, jnp.float32),
          jnp.zeros((bq,), jnp.float32))


def forward_step(q, q_ids, q_start, k_start, k_ref, v_ref, kv_ids_ref, carry, *, masked: bool,
                 static: FlashStatic):
  """Folds keys `[k_start, k_start + block_k)` into the running sums of query tile q `[bq, H]`."""
  acc, m, l = carry
  bk = static.blocks.block_k
  k = k_ref[pl.ds(k_start, bk), :]
  kv_ids = kv_ids_ref[pl.ds(k_start, bk)] if static.has_segments else None
  s = logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # FlashAttention-2, sec. 3.1.1: rescale the running sums once per block.
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  v = v_ref[pl.ds(k_start, bk), :]
  acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, static.precision)
  return acc, m_new, l


def forward_result(acc, m, l):
  """Output `[bq, Hv]` (float32) and lse `[bq]` of a query tile from its running sums."""
  dead = l == 0.0
  out = acc / jnp.where(dead, 1.0, l)[:, None]
  # log2-sum-exp2 of the row; +inf for rows with nothing to attend to, so the
  # backward's exp2(s - lse) is 0 there.
  return out, jnp.where(dead, jnp.inf, m + jnp.log2(jnp.where(dead, 1.0, l)))


def with_optional_ids(kernel, static: FlashStatic, *, num_inputs: int):
  """Binds `static` and inserts None for the segment-id refs when there are none."""
  if static.has_segments:
    return functools.partial(kernel, static=static)

  def without_ids(*refs):
    return kernel(*refs[:num_inputs], None, None, *refs[num_inputs:], static=static)

  return without_ids


def dq_step(rows, q_start, k_start, k_ref, v_ref, kv_ids_ref, dq, *, masked: bool, static: FlashStatic):
  """Adds the keys `[k_start, k_start + block_k_dq)` to dq `[bq, H]` (unscaled) of a query tile.

  `rows` = (q `[bq, H]`, dO `[bq, Hv]`, lse `[bq]`, delta `[bq]`, query ids `[bq]` or None).
  """
  q, do, lse, delta, q_ids = rows
  bk = static.blocks.block_k_dq
  k = k_ref[pl.ds(k_start, bk), :]
  v = v_ref[pl.ds(k_start, bk), :]
  kv_ids = kv_ids_ref[pl.ds(k_start, bk)] if static.has_segments else None
  s = logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  p = jnp.exp2(s - lse[:, None])
  dp = dot_nt(do, v, static.precision)  # [bq, bk]
  ds = p * (dp - delta[:, None])
  return dq + dot(ds.astype(k.dtype), k, static.precision)


def dkdv_step(cols, q_start, k_start, refs, carry, *, masked: bool, static: FlashStatic):
  """Adds the queries `[q_start, q_start + block_q_dkv)` to (dk `[bk, H]` unscaled, dv `[bk, Hv]`) of a key tile.

  `cols` = (k `[bk, H]`, v `[bk, Hv]`, key ids `[bk]` or None); `refs` = the
  whole-sequence refs (q, dO, lse, delta, query ids or None).
  """
  k, v, kv_ids = cols
  q_ref, do_ref, lse_ref, delta_ref, q_ids_ref = refs
  dk, dv = carry
  bq = static.blocks.block_q_dkv
  q = q_ref[pl.ds(q_start, bq), :]
  do = do_ref[pl.ds(q_start, bq), :]
  lse = lse_ref[pl.ds(q_start, bq)]
  delta = delta_ref[pl.ds(q_start, bq)]
  q_ids = q_ids_ref[pl.ds(q_start, bq)] if static.has_segments else None
  s = logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  p = jnp.exp2(s - lse[:, None])  # [bq, bk]
  dv = dv + dot_tn(p.astype(do.dtype), do, static.precision)
  dp = dot_nt(do, v, static.precision)
  ds = p * (dp - delta[:, None])
  dk = dk + dot_tn(ds.astype(q.dtype), q, static.precision)
  return dk, dv
