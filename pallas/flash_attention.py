"""Tiled online-softmax attention (FlashAttention-2) in Pallas, forward and backward.

`flash_attention(q, k, v, ...)` takes the shared contract's `[B, T, N, H]` layout,
`is_causal` (top-left aligned), `segment_ids`, GQA (`N % K == 0`) and `scale`;
bf16 / f16 / f32 inputs, float32 accumulation. Any T and S: inputs are padded to
whole blocks and the tail is masked. Head dims are padded to a power of two
(>= 16). A query row with nothing to attend to returns 0 with 0 gradient.

Backends:
  "triton"     Pallas' Triton lowering (GPU; also the CPU interpret path).
  "mosaic_gpu" Hopper warp-specialised kernel, see `_flash_mosaic_gpu.py`.
  "mosaic_tpu" TPU kernel, see `_flash_tpu.py`.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K, H head dim (Hv for values).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from efficient_attention import _checks

LOG2E = math.log2(math.e)
# Masked logits (base-2 units). Running maxima start at half of it, so a block
# whose entries are all masked contributes exp2(-huge) == 0 without a select.
MASKED = -1e30
_M_INIT = 0.5 * MASKED
BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch settings of the forward and the two backward kernels.

  `block_q`/`block_k` tile the forward (and the dQ kernel); `block_q_dkv`/
  `block_k_dkv` tile the dK/dV kernel. `num_warps`/`num_stages` are Triton
  launch settings (ignored elsewhere, except that the mosaic_gpu forward takes
  `block_q` as 64 query rows per consumer warpgroup and `num_stages` as the
  depth of its K/V shared-memory ring).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name.startswith("block_") and (value < 16 or value & (value - 1)):
        raise ValueError(f"{f.name}={value} must be a power of two >= 16")

  @classmethod
  def get_default(cls, backend: str = "triton", head_dim: int = 128) -> BlockSizes:
    """Per-backend defaults (Triton ones tuned on an H100, see pallas/NOTES.md)."""
    if backend == "triton":
      # H100, bf16, T=8k (results/h100/flash_tune/round2.json): forward 345 / 404 TFLOP/s
      # (H=64 / 128, non-causal), forward+backward 312 / 378.
      if head_dim <= 64:
        return cls(block_q=64, block_k=128, block_q_dq=64, block_k_dq=64, block_q_dkv=64,
                   block_k_dkv=64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)
      return cls(block_q=128, block_k=64, block_q_dq=64, block_k_dq=64, block_q_dkv=64,
                 block_k_dkv=64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)
    if backend == "mosaic_tpu":
      # (8, 128) tiling: 128-multiples keep every block legal (see _flash_tpu.py); untuned.
      return cls(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128,
                 block_k_dkv=128)
    if backend == "mosaic_gpu":
      # Forward: two consumer warpgroups of 64 rows, 128-key steps, 2-deep K/V
      # ring (see pallas/NOTES_mosaic_gpu.md); the backward kernels take their own
      # settings (`_flash_mosaic_gpu.default_backward_config`).
      triton = cls.get_default("triton", head_dim)
      return dataclasses.replace(triton, block_q=128, block_k=128, num_stages=2)
    return cls()

  def clamp(self, q_len: int, kv_len: int) -> BlockSizes:
    """Shrinks blocks longer than the (power-of-two rounded) sequence."""
    tq, ts = _pow2_at_least(q_len), _pow2_at_least(kv_len)
    return dataclasses.replace(
        self,
        block_q=min(self.block_q, tq), block_k=min(self.block_k, ts),
        block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, ts),
        block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, ts),
    )


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Static:
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
  precision: Any = None


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Exact attention by tiles, never materialising `[T, S]`.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, Hv]`, `N % K == 0`.
    is_causal: query t attends keys s <= t (top-left aligned).
    segment_ids: int `[B, T]` (T == S) or a (`[B, T]`, `[B, S]`) pair.
    scale: logit scale, default `H**-0.5`.
    block_sizes: tile sizes; default `BlockSizes.get_default(backend, H)`.
    backend: "triton", "mosaic_gpu" or "mosaic_tpu"; default by platform
      ("mosaic_tpu" on TPU, "mosaic_gpu" on Hopper when it applies, else "triton").
    interpret: run the kernels in Pallas' interpreter; default True off GPU/TPU.

  Returns:
    `[B, T, N, Hv]` in the input dtype.
  """
  dims = _checks.check_qkv(q, k, v)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  _checks.check_causal(is_causal, dims, family="flash_attention")
  platform = jax.default_backend()
  if interpret is None:
    interpret = platform not in ("gpu", "tpu")
  if backend is None:
    backend = default_backend(q.dtype, dims, platform, is_causal=is_causal, has_segments=ids is not None)
  if backend not in BACKENDS:
    raise ValueError(f"unknown {backend=}; valid: {', '.join(map(repr, BACKENDS))}")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(backend, dims.head_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  blocks = block_sizes.clamp(dims.q_len, dims.kv_len)
  static = _Static(scale=scale, is_causal=is_causal, has_segments=ids is not None,
                   q_len=dims.q_len, kv_len=dims.kv_len, group=dims.group,
                   blocks=blocks, backend=backend, interpret=bool(interpret),
                   precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)

  t_pad = _round_up(dims.q_len, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  s_pad = _round_up(dims.kv_len, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
  qp = _pad(q, t_pad, _pow2_at_least(dims.head_dim))
  kp = _pad(k, s_pad, _pow2_at_least(dims.head_dim))
  vp = _pad(v, s_pad, _pow2_at_least(dims.v_head_dim))
  q_ids = kv_ids = None
  if ids is not None:
    # Padded queries get an id no key has; padded keys are masked by position.
    q_ids = _pad_ids(ids[0].astype(jnp.int32), t_pad, value=jnp.iinfo(jnp.int32).min)
    kv_ids = _pad_ids(ids[1].astype(jnp.int32), s_pad, value=jnp.iinfo(jnp.int32).max)
  out = _flash(qp, kp, vp, q_ids, kv_ids, static)
  return out[:, : dims.q_len, :, : dims.v_head_dim]


def default_backend(dtype: Any, dims: _checks.Dims, platform: str | None = None, *,
                    is_causal: bool = False, has_segments: bool = False) -> str:
  """The backend `flash_attention` picks when none is named."""
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "mosaic_tpu"
  if platform == "gpu":
    from pallas import _flash_mosaic_gpu
    if _flash_mosaic_gpu.applies(dtype, dims, is_causal=is_causal, has_segments=has_segments):
      return "mosaic_gpu"
  return "triton"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad(x: jax.Array, length: int, head_dim: int) -> jax.Array:
  """Zero-pads `[B, L, N, H]` to `[B, length, N, head_dim]` (no copy when already there)."""
  if x.shape[1] == length and x.shape[3] == head_dim:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3])))


def _pad_ids(ids: jax.Array, length: int, *, value: int) -> jax.Array:
  if ids.shape[1] == length:
    return ids
  return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=value)


# --------------------------------------------------------------------------- #
# custom_vjp over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, static: _Static):
  return _forward(q, k, v, q_ids, kv_ids, static)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, static: _Static):
  out, lse = _forward(q, k, v, q_ids, kv_ids, static)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(static: _Static, residuals, d_out):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  # delta_t = sum_h dO_th O_th  (FlashAttention-2, sec. 3.1.2, D_i)  [B, N, T]
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  backward = _backend_module(static).backward if static.backend != "triton" else None
  if backward is not None:
    dq, dk, dv = backward(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
  else:
    dq = _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
    dk, dv = _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
  return dq, dk, dv, None, None


def _backend_module(static: _Static):
  """The module of a non-Triton backend: `forward(q, k, v, q_ids, kv_ids, static) -> (out, lse)`
  and `backward(...) -> (dq, dk, dv)` (None: the Triton backward kernels are used),
  both on padded `[B, T, N, H]` inputs with `lse` `[B, N, T]` in base-2 units
  (+inf on rows with nothing to attend to)."""
  if static.backend == "mosaic_gpu":
    from pallas import _flash_mosaic_gpu as module
  else:
    from pallas import _flash_tpu as module
  return module


_flash.defvjp(_flash_fwd, _flash_bwd)


def _params(static: _Static, *, backward: bool):
  if static.interpret:
    return {}
  from jax.experimental.pallas import triton as pltriton
  b = static.blocks
  warps, stages = (b.num_warps_bwd, b.num_stages_bwd) if backward else (b.num_warps, b.num_stages)
  return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}


def _query_block(program, num_programs, static: _Static):
  """Causal query blocks run longest first (the last block sees every key): less tail idle."""
  return num_programs - 1 - program if static.is_causal else program


def _kv_ranges(q_block, *, block_q: int, block_k: int, static: _Static):
  """Key blocks query block `q_block` visits: unmasked `[0, full)`, masked `[full, end)`."""
  kv_len = static.kv_len
  if static.is_causal:
    end = jnp.minimum(lax.div(q_block * block_q + block_q + block_k - 1, block_k), pl.cdiv(kv_len, block_k))
    full = jnp.minimum(lax.div(q_block * block_q + 1, block_k), kv_len // block_k)
  else:
    end = jnp.int32(pl.cdiv(kv_len, block_k))
    full = jnp.int32(kv_len // block_k)
  if static.has_segments:
    full = jnp.int32(0)
  return jnp.minimum(full, end), end


def _q_ranges(kv_block, num_q_blocks: int, *, block_q: int, block_k: int, static: _Static):
  """Query blocks key block `kv_block` meets: masked `[lo, mid)`, unmasked `[mid, hi)`."""
  hi = jnp.int32(num_q_blocks)
  if static.is_causal:
    lo = jnp.minimum(lax.div(kv_block * block_k, block_q), hi)
    mid = jnp.minimum(lax.div((kv_block + 1) * block_k - 1 + block_q - 1, block_q), hi)
  else:
    lo = mid = jnp.int32(0)
  tail = (kv_block + 1) * block_k > static.kv_len
  if static.has_segments:
    mid = hi
  else:
    mid = jnp.where(tail, hi, mid)
  return lo, mid, hi


def _logits(q, k, q_start, k_start, q_ids, kv_ids, *, masked: bool, static: _Static):
  """Scaled logits in base-2 units `[bq, bk]`, masked entries set to MASKED."""
  # [bq, bk]
  s = _dot_nt(q, k, static) * (static.scale * LOG2E)
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


def _dot(a, b, static: _Static):
  """`a b` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=static.precision,
                         preferred_element_type=jnp.float32)


def _dot_nt(a, b, static: _Static):
  """`a b^T` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=static.precision,
                         preferred_element_type=jnp.float32)


def _dot_tn(a, b, static: _Static):
  """`a^T b` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=static.precision,
                         preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *, static: _Static):
  bq, bk = static.blocks.block_q, static.blocks.block_k
  i = _query_block(pl.program_id(0), pl.num_programs(0), static)
  q = q_ref[...]  # [bq, H]
  q_ids = q_ids_ref[...] if static.has_segments else None

  def body(j, carry, *, masked):
    return _forward_step(q, q_ids, i * bq, j * bk, k_ref, v_ref, kv_ids_ref, carry, masked=masked, static=static)

  full, end = _kv_ranges(i, block_q=bq, block_k=bk, static=static)
  carry = lax.fori_loop(0, full, functools.partial(body, masked=False), _forward_init(bq, v_ref.shape[-1]))
  carry = lax.fori_loop(full, end, functools.partial(body, masked=True), carry)
  out, lse = _forward_result(*carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _forward_init(bq: int, v_dim: int):
  """Running (accumulator `[bq, Hv]`, max `[bq]`, sum `[bq]`) of a query tile before any key."""
  return (jnp.zeros((bq, v_dim), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
          jnp.zeros((bq,), jnp.float32))


def _forward_step(q, q_ids, q_start, k_start, k_ref, v_ref, kv_ids_ref, carry, *, masked: bool,
                  static: _Static):
  """Folds keys `[k_start, k_start + block_k)` into the running sums of query tile q `[bq, H]`."""
  acc, m, l = carry
  bk = static.blocks.block_k
  k = k_ref[pl.ds(k_start, bk), :]
  kv_ids = kv_ids_ref[pl.ds(k_start, bk)] if static.has_segments else None
  s = _logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # FlashAttention-2, sec. 3.1.1: rescale the running sums once per block.
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  v = v_ref[pl.ds(k_start, bk), :]
  acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, static)
  return acc, m_new, l


def _forward_result(acc, m, l):
  """Output `[bq, Hv]` (float32) and lse `[bq]` of a query tile from its running sums."""
  dead = l == 0.0
  out = acc / jnp.where(dead, 1.0, l)[:, None]
  # log2-sum-exp2 of the row; +inf for rows with nothing to attend to, so the
  # backward's exp2(s - lse) is 0 there.
  return out, jnp.where(dead, jnp.inf, m + jnp.log2(jnp.where(dead, 1.0, l)))


def _forward(q, k, v, q_ids, kv_ids, static: _Static):
  if static.backend != "triton":
    return _backend_module(static).forward(q, k, v, q_ids, kv_ids, static)
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  bq = static.blocks.block_q
  group = static.group
  nq = t_pad // bq
  grid = (nq, batch, num_heads)
  qb = lambda i: _query_block(i, nq, static)  # noqa: E731
  in_specs = [
      pl.BlockSpec((None, bq, None, head_dim), lambda i, b, n: (b, qb(i), n, 0)),
      pl.BlockSpec((None, s_pad, None, head_dim), lambda i, b, n: (b, 0, n // group, 0)),
      pl.BlockSpec((None, s_pad, None, v_dim), lambda i, b, n: (b, 0, n // group, 0)),
  ]
  args = [q, k, v]
  if static.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, qb(i))),
                 pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0))]
    args += [q_ids, kv_ids]
  kernel = _with_optional_ids(_forward_kernel, static, num_inputs=3)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, v_dim), lambda i, b, n: (b, qb(i), n, 0)),
          pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qb(i))),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), q.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
      ],
      interpret=static.interpret,
      name="flash_forward",
      **_params(static, backward=False),
  )(*args)


def _with_optional_ids(kernel, static: _Static, *, num_inputs: int):
  """Binds `static` and inserts None for the segment-id refs when there are none."""
  if static.has_segments:
    return functools.partial(kernel, static=static)

  def without_ids(*refs):
    return kernel(*refs[:num_inputs], None, None, *refs[num_inputs:], static=static)

  return without_ids


# --------------------------------------------------------------------------- #
# backward: dQ by query blocks, dK/dV by key blocks (FlashAttention-2, alg. 2)
# --------------------------------------------------------------------------- #


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref, *,
               static: _Static):
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  i = _query_block(pl.program_id(0), pl.num_programs(0), static)
  rows = (q_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
          q_ids_ref[...] if static.has_segments else None)

  def body(j, dq, *, masked):
    return _dq_step(rows, i * bq, j * bk, k_ref, v_ref, kv_ids_ref, dq, masked=masked, static=static)

  dq = jnp.zeros(q_ref.shape, jnp.float32)
  full, end = _kv_ranges(i, block_q=bq, block_k=bk, static=static)
  dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(full, end, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _dq_step(rows, q_start, k_start, k_ref, v_ref, kv_ids_ref, dq, *, masked: bool, static: _Static):
  """Adds the keys `[k_start, k_start + block_k_dq)` to dq `[bq, H]` (unscaled) of a query tile.

  `rows` = (q `[bq, H]`, dO `[bq, Hv]`, lse `[bq]`, delta `[bq]`, query ids `[bq]` or None).
  """
  q, do, lse, delta, q_ids = rows
  bk = static.blocks.block_k_dq
  k = k_ref[pl.ds(k_start, bk), :]
  v = v_ref[pl.ds(k_start, bk), :]
  kv_ids = kv_ids_ref[pl.ds(k_start, bk)] if static.has_segments else None
  s = _logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  p = jnp.exp2(s - lse[:, None])
  dp = _dot_nt(do, v, static)  # [bq, bk]
  ds = p * (dp - delta[:, None])
  return dq + _dot(ds.astype(k.dtype), k, static)


def _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, static: _Static):
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  bq = static.blocks.block_q_dq
  group = static.group
  nq = t_pad // bq
  qb = lambda i: _query_block(i, nq, static)  # noqa: E731
  q_block = lambda i, b, n: (b, qb(i), n, 0)  # noqa: E731
  kv_full = lambda i, b, n: (b, 0, n // group, 0)  # noqa: E731
  in_specs = [
      pl.BlockSpec((None, bq, None, head_dim), q_block),
      pl.BlockSpec((None, s_pad, None, head_dim), kv_full),
      pl.BlockSpec((None, s_pad, None, v_dim), kv_full),
      pl.BlockSpec((None, bq, None, v_dim), q_block),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qb(i))),
      pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qb(i))),
  ]
  args = [q, k, v, d_out, lse, delta]
  if static.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, qb(i))),
                 pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0))]
    args += [q_ids, kv_ids]
  return pl.pallas_call(
      _with_optional_ids(_dq_kernel, static, num_inputs=6),
      grid=(nq, batch, num_heads),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, head_dim), q_block),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=static.interpret,
      name="flash_backward_dq",
      **_params(static, backward=True),
  )(*args)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
                 dk_ref, dv_ref, *, static: _Static):
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  j = pl.program_id(0)
  cols = (k_ref[...], v_ref[...], kv_ids_ref[...] if static.has_segments else None)
  refs = (q_ref, do_ref, lse_ref, delta_ref, q_ids_ref)

  def body(i, carry, *, masked):
    return _dkdv_step(cols, i * bq, j * bk, refs, carry, masked=masked, static=static)

  carry = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
  num_q_blocks = q_ref.shape[0] // bq
  lo, mid, hi = _q_ranges(j, num_q_blocks, block_q=bq, block_k=bk, static=static)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=True), carry)
  dk, dv = lax.fori_loop(mid, hi, functools.partial(body, masked=False), carry)
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_step(cols, q_start, k_start, refs, carry, *, masked: bool, static: _Static):
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
  s = _logits(q, k, q_start, k_start, q_ids, kv_ids, masked=masked, static=static)
  p = jnp.exp2(s - lse[:, None])  # [bq, bk]
  dv = dv + _dot_tn(p.astype(do.dtype), do, static)
  dp = _dot_nt(do, v, static)
  ds = p * (dp - delta[:, None])
  dk = dk + _dot_tn(ds.astype(q.dtype), q, static)
  return dk, dv


def _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, static: _Static):
  """dK, dV per query head (summed over each GQA group afterwards)."""
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[3]
  bk = static.blocks.block_k_dkv
  group = static.group
  kv_block = lambda j, b, n: (b, j, n // group, 0)  # noqa: E731
  q_full = lambda j, b, n: (b, 0, n, 0)  # noqa: E731
  in_specs = [
      pl.BlockSpec((None, t_pad, None, head_dim), q_full),
      pl.BlockSpec((None, bk, None, head_dim), kv_block),
      pl.BlockSpec((None, bk, None, v_dim), kv_block),
      pl.BlockSpec((None, t_pad, None, v_dim), q_full),
      pl.BlockSpec((None, None, t_pad), lambda j, b, n: (b, n, 0)),
      pl.BlockSpec((None, None, t_pad), lambda j, b, n: (b, n, 0)),
  ]
  args = [q, k, v, d_out, lse, delta]
  if static.has_segments:
    in_specs += [pl.BlockSpec((None, t_pad), lambda j, b, n: (b, 0)),
                 pl.BlockSpec((None, bk), lambda j, b, n: (b, j))]
    args += [q_ids, kv_ids]
  out_dtype = k.dtype if group == 1 else jnp.float32
  per_head = lambda j, b, n: (b, j, n, 0)  # noqa: E731
  dk, dv = pl.pallas_call(
      _with_optional_ids(_dkdv_kernel, static, num_inputs=6),
      grid=(s_pad // bk, batch, num_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, head_dim), per_head),
                 pl.BlockSpec((None, bk, None, v_dim), per_head)],
      out_shape=[jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), out_dtype)],
      interpret=static.interpret,
      name="flash_backward_dkdv",
      **_params(static, backward=True),
  )(*args)
  if group > 1:
    # [B, S, K, G, H] -> [B, S, K, H]
    dk = dk.reshape(batch, s_pad, num_kv_heads, group, head_dim).sum(3).astype(k.dtype)
    dv = dv.reshape(batch, s_pad, num_kv_heads, group, v_dim).sum(3).astype(v.dtype)
  return dk, dv


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


def flash_attention_reference(q, k, v, *, is_causal=False, segment_ids=None, scale=None, keep=None):
  """fp32 einsum attention with the same contract (materialises `[T, S]`).

  `keep`, optional bool `[1|B, K|1, G|1, T, S]`, restricts attention further (the block-sparse reference).
  """
  dims = _checks.check_qkv(q, k, v)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  # [B, T, K, G, H]
  qg = q.astype(f32).reshape(dims.batch, dims.q_len, dims.num_kv_heads, dims.group, dims.head_dim)
  # [B, K, G, T, S]
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(f32), precision=lax.Precision.HIGHEST) * scale
  if keep is None:
    keep = jnp.ones((dims.q_len, dims.kv_len), bool)[None, None, None]
  if is_causal:
    keep = keep & (jnp.arange(dims.q_len)[:, None] >= jnp.arange(dims.kv_len)[None, :])[None, None, None]
  if ids is not None:
    keep = keep & (ids[0][:, None, None, :, None] == ids[1][:, None, None, None, :])
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(keep, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  # [B, T, K, G, Hv]
  out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(f32), precision=lax.Precision.HIGHEST)
  return out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.v_head_dim).astype(q.dtype)
