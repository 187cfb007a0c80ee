"""Flash attention (FlashAttention-2) written in the Triton language and launched through jax_triton.

The "jax_triton" backend of `pallas.flash_attention`: three `@triton.jit` kernels,
called with `jax_triton.triton_call` instead of Pallas' Triton lowering.

  * `_forward_kernel`: one program per (query block, b * N + n); walks the key
    blocks with the online softmax in base 2 (FlashAttention-2, sec. 3.1.1) and
    writes the output and lse.
  * `_dq_kernel`: one program per (query block, b * N + n); recomputes P from
    lse and adds `dS K` over the key blocks (FlashAttention-2, alg. 2).
  * `_dkdv_kernel`: one program per (key block, b * K + k); walks the G query
    heads of the group and their query blocks, adding `P^T dO` to dV and
    `dS^T Q` to dK, so dK/dV come out summed over the group.

Causal programs skip the key (query) blocks above the diagonal and, in the
forward and dQ kernels, take their heaviest query blocks first. Blocks that
need no mask (below the diagonal, before the key tail, without segment ids)
run without one.

Contract (see `pallas/softmax.py`): inputs padded by `flash_tiles.pad_inputs`
to whole blocks of `static.blocks` and head dims to powers of two >= 16;
q `[B, T, N, H]`, k `[B, S, K, H]`, v `[B, S, K, Hv]`; segment ids int32
`[B, T]` / `[B, S]` or None (`static.has_segments`); lse `[B, N, T]` float32 in
base-2 units, +inf on rows that see no key (their output is 0, their gradient
0); float32 accumulation; float32 inputs multiply in IEEE float32 (not TF32).

triton and jax_triton are optional (`pip install 'efficient-attention[gpu]'`):
this module imports without them and `available()` says whether the backend
runs here. The kernels are plain Triton, so they also run in Triton's
interpreter (`TRITON_INTERPRET=1`) on torch CPU tensors, launched with the
arguments of `forward_launch` / `dq_launch` / `dkdv_launch` (Triton 3.6's
interpreter wants numpy < 2.4 for tensor loop bounds, and multiplies bf16 tiles
as their raw bits: widen them to float32 in its `create_dot` to check bf16).

The family's reference, `softmax_attention_reference`, ends `softmax.py`;
`tests/test_softmax_jax_triton.py` checks this backend against it.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K, H head dim (Hv for values).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas.flash_tiles import LOG2E

try:
  import triton
  import triton.language as tl
except ImportError:  # CPU machines and CI: the wrapper imports, `available()` is False.
  triton = tl = None

# Masked logits are -1e30 and running maxima start at -0.5e30 (base-2 units),
# as in `flash_tiles.MASKED` / `M_INIT`: a block whose entries are all masked
# adds exp2(-0.5e30) == 0. Written as literals below: Triton kernels read no
# non-constexpr globals.

_jit = triton.jit if triton is not None else (lambda fn: fn)
# CUDA caps a grid's second axis at 2**16 - 1 programs.
_MAX_GRID_Y = 65535


# --------------------------------------------------------------------------- #
# availability
# --------------------------------------------------------------------------- #


def missing() -> tuple[str, ...]:
  """What this machine lacks for the backend: "jax_triton", "triton", "a CUDA GPU ..." (empty: none)."""
  lacking = []
  for name in ("jax_triton", "triton"):
    try:
      importlib.import_module(name)
    except ImportError:
      lacking.append(name)
  if not _cuda_is_default():
    lacking.append(f"a CUDA GPU as JAX's default backend (it is {jax.default_backend()!r})")
  return tuple(lacking)


def _cuda_is_default() -> bool:
  if jax.default_backend() != "gpu":
    return False
  version = getattr(jax.devices()[0].client, "platform_version", "")
  return "cuda" in str(version).lower()


@functools.cache
def available() -> bool:
  """jax_triton and triton import and JAX's default backend is a CUDA GPU."""
  return not missing()


def _check_runnable(static) -> None:
  lacking = missing()
  if lacking:
    raise ValueError(f"flash_attention(backend='jax_triton') needs jax_triton, triton and a CUDA GPU "
                     f"(pip install 'efficient-attention[gpu]'); missing: {', '.join(lacking)}")
  if static.interpret:
    raise ValueError("backend='jax_triton' has no interpret mode (interpret=True); "
                     "use backend='triton' to interpret")


# --------------------------------------------------------------------------- #
# launches
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel launch: `kernel[grid](*inputs, *outputs, num_warps=, num_stages=, **constants)`.

  `outputs` are the shapes and dtypes of the arrays the kernel writes (passed
  after the inputs, as `jax_triton.triton_call` does).
  """

  kernel: Callable[..., Any]
  name: str
  grid: tuple[int, int]
  outputs: tuple[jax.ShapeDtypeStruct, ...]
  num_warps: int
  num_stages: int
  constants: dict[str, Any]


def _constants(q_shape, k_shape, v_shape, q_dtype, static) -> dict[str, Any]:
  """The constexpr settings every kernel takes (sizes, mask, scale, dot precision)."""
  _, t_pad, num_heads, head_dim = q_shape
  s_pad, num_kv_heads, v_dim = k_shape[1], k_shape[2], v_shape[3]
  if num_heads != num_kv_heads * static.group:
    raise ValueError(f"{num_heads=} != {num_kv_heads=} * group={static.group}")
  return dict(
      SCALE=float(static.scale), LOGIT_SCALE=float(static.scale * LOG2E),
      IS_CAUSAL=bool(static.is_causal), HAS_SEGMENTS=bool(static.has_segments),
      KV_LEN=int(static.kv_len), T_PAD=int(t_pad), S_PAD=int(s_pad),
      NUM_HEADS=int(num_heads), NUM_KV_HEADS=int(num_kv_heads),
      HEAD_DIM=int(head_dim), V_DIM=int(v_dim),
      # float32 inputs multiply in IEEE float32, as `tiling.matmul_precision` asks.
      PRECISION="ieee" if jnp.dtype(q_dtype) == jnp.float32 else "tf32",
  )


def _check_tiles(length: int, block: int, what: str) -> int:
  if length % block:
    raise ValueError(f"{what}={length} must be a multiple of its block {block} (pad with pad_inputs)")
  return length // block


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
  if grid[1] > _MAX_GRID_Y:
    raise ValueError(f"{grid=}: batch * heads = {grid[1]} exceeds the {_MAX_GRID_Y} programs of a grid axis")
  return grid


def _launch(kernel, name, grid, outputs, shapes, q_dtype, static, *, block_q: int, block_k: int,
            backward: bool) -> Launch:
  blocks = static.blocks
  return Launch(
      kernel=kernel, name=name, grid=_check_grid(grid), outputs=outputs,
      num_warps=blocks.num_warps_bwd if backward else blocks.num_warps,
      num_stages=blocks.num_stages_bwd if backward else blocks.num_stages,
      constants=dict(_constants(*shapes, q_dtype, static), BLOCK_Q=block_q, BLOCK_K=block_k))


def forward_launch(q_shape, k_shape, v_shape, q_dtype, static) -> Launch:
  """Forward of padded q `[B, T, N, H]`, k `[B, S, K, H]`, v `[B, S, K, Hv]`:
  inputs (q, k, v, q_ids, kv_ids), outputs (out `[B, T, N, Hv]`, lse `[B, N, T]` float32)."""
  batch, t_pad, num_heads, _ = q_shape
  bq, bk = static.blocks.block_q, static.blocks.block_k
  nq = _check_tiles(t_pad, bq, "T")
  _check_tiles(k_shape[1], bk, "S")
  outputs = (jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_shape[3]), q_dtype),
             jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32))
  return _launch(_forward_kernel, "flash_forward_jax_triton", (nq, batch * num_heads), outputs,
                 (q_shape, k_shape, v_shape), q_dtype, static, block_q=bq, block_k=bk, backward=False)


def dq_launch(q_shape, k_shape, v_shape, q_dtype, static) -> Launch:
  """dQ: inputs (q, k, v, d_out, lse, delta, q_ids, kv_ids), output dq `[B, T, N, H]` in q's dtype."""
  batch, t_pad, num_heads, _ = q_shape
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  nq = _check_tiles(t_pad, bq, "T")
  _check_tiles(k_shape[1], bk, "S")
  return _launch(_dq_kernel, "flash_backward_dq_jax_triton", (nq, batch * num_heads),
                 (jax.ShapeDtypeStruct(tuple(q_shape), q_dtype),), (q_shape, k_shape, v_shape), q_dtype, static,
                 block_q=bq, block_k=bk, backward=True)


def dkdv_launch(q_shape, k_shape, v_shape, q_dtype, static, kv_dtype=None) -> Launch:
  """dK/dV: inputs (q, k, v, d_out, lse, delta, q_ids, kv_ids), outputs dk `[B, S, K, H]`,
  dv `[B, S, K, Hv]` (summed over each group) in k's dtype (`kv_dtype`, default q's)."""
  batch, s_pad, num_kv_heads, _ = k_shape
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  _check_tiles(q_shape[1], bq, "T")
  nk = _check_tiles(s_pad, bk, "S")
  kv_dtype = q_dtype if kv_dtype is None else kv_dtype
  outputs = (jax.ShapeDtypeStruct(tuple(k_shape), kv_dtype), jax.ShapeDtypeStruct(tuple(v_shape), kv_dtype))
  return _launch(_dkdv_kernel, "flash_backward_dkdv_jax_triton", (nk, batch * num_kv_heads), outputs,
                 (q_shape, k_shape, v_shape), q_dtype, static, block_q=bq, block_k=bk, backward=True)


def _call(launch: Launch, *inputs):
  """Runs `launch` on JAX arrays through `jax_triton.triton_call`."""
  import jax_triton

  return jax_triton.triton_call(
      *inputs, kernel=launch.kernel, out_shape=launch.outputs, grid=launch.grid, name=launch.name,
      num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.constants)


def with_placeholder_ids(ids: tuple) -> tuple:
  """The id arrays the kernels take: `ids` (q_ids, kv_ids), or without segments (`ids == ()`)
  a 1-element placeholder for each, never read (triton_call drops None arguments)."""
  if ids:
    return ids
  none = jnp.zeros((1,), jnp.int32)
  return none, none


def vmappable(fn: Callable[..., tuple]) -> Callable[..., tuple]:
  """`fn(*arrays) -> tuple of arrays`, every array with the batch B as its leading axis, made
  `jax.vmap`-able (triton_call has no batching rule): a vmapped axis is folded into B,
  and unbatched arguments are broadcast along it."""
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip(args, in_batched)]
    # [V, B, ...] -> [V * B, ...] and back
    outs = fn(*[x.reshape(-1, *x.shape[2:]) for x in args])
    return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), tuple(True for _ in outs)

  return fn


def forward(q, k, v, q_ids, kv_ids, static):
  """Padded forward: q `[B, T, N, H]`, k/v `[B, S, K, H|Hv]` -> (out `[B, T, N, Hv]`, lse `[B, N, T]`)."""
  _check_runnable(static)

  def run(q, k, v, *ids):
    launch = forward_launch(q.shape, k.shape, v.shape, q.dtype, static)
    return tuple(_call(launch, q, k, v, *with_placeholder_ids(ids)))

  ids = (q_ids, kv_ids) if static.has_segments else ()
  out, lse = vmappable(run)(q, k, v, *ids)
  return out, lse


def backward(q, k, v, q_ids, kv_ids, d_out, lse, delta, static):
  """Padded backward: q/d_out `[B, T, N, H|Hv]`, k/v `[B, S, K, H|Hv]`, lse/delta `[B, N, T]`
  float32 -> (dq `[B, T, N, H]`, dk `[B, S, K, H]`, dv `[B, S, K, Hv]`)."""
  _check_runnable(static)

  def run(q, k, v, d_out, lse, delta, *ids):
    args = (q, k, v, d_out, lse, delta, *with_placeholder_ids(ids))
    (dq,) = _call(dq_launch(q.shape, k.shape, v.shape, q.dtype, static), *args)
    dk, dv = _call(dkdv_launch(q.shape, k.shape, v.shape, q.dtype, static, kv_dtype=k.dtype), *args)
    return dq, dk, dv

  ids = (q_ids, kv_ids) if static.has_segments else ()
  return vmappable(run)(q, k, v, d_out, lse, delta, *ids)


# --------------------------------------------------------------------------- #
# Triton kernels (contiguous arrays; constexpr names as in `_constants`)
# --------------------------------------------------------------------------- #


@_jit
def _tile(ptr, b, head, start, ROWS: tl.constexpr, LENGTH: tl.constexpr, HEADS: tl.constexpr,
          DIM: tl.constexpr):
  """Pointers `[ROWS, DIM]` to rows `[start, start + ROWS)` of `head` in batch `b` of a
  contiguous `[B, LENGTH, HEADS, DIM]` array (64-bit offsets)."""
  base = ((b.to(tl.int64) * LENGTH + start) * HEADS + head) * DIM
  return ptr + base + tl.arange(0, ROWS)[:, None] * (HEADS * DIM) + tl.arange(0, DIM)[None, :]


@_jit
def _live(q_idx, k_idx, q_ids, kv_ids_ptr, KV_LEN: tl.constexpr, IS_CAUSAL: tl.constexpr,
          HAS_SEGMENTS: tl.constexpr):
  """Which (query, key) pairs attend; `q_idx`, `q_ids` and `k_idx` are 2-D and broadcast
  against each other (`[bq, 1]` with `[1, bk]`, or transposed). `kv_ids_ptr` points at
  this batch's key ids."""
  keep = k_idx < KV_LEN
  if IS_CAUSAL:
    keep = keep & (k_idx <= q_idx)
  if HAS_SEGMENTS:
    keep = keep & (q_ids == tl.load(kv_ids_ptr + k_idx))
  return keep


@_jit
def _key_blocks(i, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, KV_LEN: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
  """Key blocks query block `i` visits: unmasked `[0, full)`, masked `[full, end)`
  (as `flash_tiles.kv_ranges`)."""
  if IS_CAUSAL:
    end = tl.minimum((i * BLOCK_Q + BLOCK_Q + BLOCK_K - 1) // BLOCK_K, (KV_LEN + BLOCK_K - 1) // BLOCK_K)
    full = tl.minimum(tl.minimum((i * BLOCK_Q + 1) // BLOCK_K, KV_LEN // BLOCK_K), end)
  else:
    end = (KV_LEN + BLOCK_K - 1) // BLOCK_K
    full = KV_LEN // BLOCK_K
  if HAS_SEGMENTS:
    full = 0
  return full, end


@_jit
def _query_blocks(j, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NUM_Q_BLOCKS: tl.constexpr,
                  KV_LEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
  """Query blocks key block `j` meets: masked `[lo, mid)`, unmasked `[mid, NUM_Q_BLOCKS)`."""
  if IS_CAUSAL:
    # The first query block at or below key j * BLOCK_K, and the first whose
    # first row is at or after the block's last key.
    lo = tl.minimum(j * BLOCK_K // BLOCK_Q, NUM_Q_BLOCKS)
    mid = tl.minimum(((j + 1) * BLOCK_K - 1 + BLOCK_Q - 1) // BLOCK_Q, NUM_Q_BLOCKS)
  else:
    lo = 0
    mid = 0
  if HAS_SEGMENTS:
    mid = NUM_Q_BLOCKS
  else:
    # A block holding the key tail is masked for every query.
    mid = tl.where((j + 1) * BLOCK_K > KV_LEN, NUM_Q_BLOCKS, mid)
  return lo, mid


@_jit
def _forward_step(acc, m, l, q, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, start,
                  LOGIT_SCALE: tl.constexpr, KV_LEN: tl.constexpr, S_PAD: tl.constexpr,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                  BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                  PRECISION: tl.constexpr, MASK: tl.constexpr):
  """Folds keys `[start, start + BLOCK_K)` into a query block's running (acc `[bq, Hv]`,
  max m `[bq]`, sum l `[bq]`)."""
  k = tl.load(_tile(k_ptr, b, kh, start, BLOCK_K, S_PAD, NUM_KV_HEADS, HEAD_DIM))  # [bk, H]
  # [bq, bk], base-2 units
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * LOGIT_SCALE
  if MASK:
    cols = start + tl.arange(0, BLOCK_K)
    keep = _live(rows[:, None], cols[None, :], q_ids[:, None], kv_ids_ptr, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
    s = tl.where(keep, s, -1.0e30)
  m_new = tl.maximum(m, tl.max(s, axis=1))
  # FlashAttention-2, sec. 3.1.1: rescale the running sums once per block.
  alpha = tl.exp2(m - m_new)
  p = tl.exp2(s - m_new[:, None])
  l = alpha * l + tl.sum(p, axis=1)
  v = tl.load(_tile(v_ptr, b, kh, start, BLOCK_K, S_PAD, NUM_KV_HEADS, V_DIM))  # [bk, Hv]
  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
  return acc, m_new, l


@_jit
def _query_program(q_ptr, IS_CAUSAL: tl.constexpr, T_PAD: tl.constexpr, NUM_HEADS: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr):
  """A (query block, b * N + n) program's block i, b * N + n, b, n, kv head, rows and q `[bq, H]`."""
  i = tl.program_id(0)
  if IS_CAUSAL:  # the last query blocks see the most keys: run them first
    i = tl.num_programs(0) - 1 - i
  bn = tl.program_id(1)
  b = bn // NUM_HEADS
  n = bn % NUM_HEADS
  kh = n // (NUM_HEADS // NUM_KV_HEADS)
  rows = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
  q = tl.load(_tile(q_ptr, b, n, i * BLOCK_Q, BLOCK_Q, T_PAD, NUM_HEADS, HEAD_DIM))  # [bq, H]
  return i, bn, b, n, kh, rows, q


@_jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, q_ids_ptr, kv_ids_ptr, out_ptr, lse_ptr,
                    SCALE: tl.constexpr, LOGIT_SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_SEGMENTS: tl.constexpr, KV_LEN: tl.constexpr,
                    T_PAD: tl.constexpr, S_PAD: tl.constexpr, NUM_HEADS: tl.constexpr,
                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
  """Program (query block, b * N + n): out `[bq, Hv]` and lse `[bq]` of one head."""
  i, bn, b, n, kh, rows, q = _query_program(q_ptr, IS_CAUSAL, T_PAD, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_Q)
  kv_ids_ptr += b.to(tl.int64) * S_PAD
  if HAS_SEGMENTS:
    q_ids = tl.load(q_ids_ptr + b.to(tl.int64) * T_PAD + rows)
  else:
    q_ids = rows  # unused
  acc = tl.zeros([BLOCK_Q, V_DIM], tl.float32)
  m = tl.full([BLOCK_Q], -0.5e30, tl.float32)
  l = tl.zeros([BLOCK_Q], tl.float32)
  full, end = _key_blocks(i, BLOCK_Q, BLOCK_K, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
  for j in range(0, full):
    acc, m, l = _forward_step(acc, m, l, q, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, j * BLOCK_K,
                              LOGIT_SCALE, KV_LEN, S_PAD, NUM_KV_HEADS, HEAD_DIM, V_DIM, BLOCK_K,
                              IS_CAUSAL, HAS_SEGMENTS, PRECISION, False)
  for j in range(full, end):
    acc, m, l = _forward_step(acc, m, l, q, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, j * BLOCK_K,
                              LOGIT_SCALE, KV_LEN, S_PAD, NUM_KV_HEADS, HEAD_DIM, V_DIM, BLOCK_K,
                              IS_CAUSAL, HAS_SEGMENTS, PRECISION, True)
  # A row that saw no key (l == 0) returns 0 and lse +inf, so the backward's
  # exp2(s - lse) is 0 there.
  dead = l == 0.0
  out = acc / tl.where(dead, 1.0, l)[:, None]
  lse = tl.where(dead, float("inf"), m + tl.log2(tl.where(dead, 1.0, l)))
  tl.store(_tile(out_ptr, b, n, i * BLOCK_Q, BLOCK_Q, T_PAD, NUM_HEADS, V_DIM), out.to(out_ptr.dtype.element_ty))
  tl.store(lse_ptr + bn.to(tl.int64) * T_PAD + rows, lse)


@_jit
def _dq_step(dq, q, do, lse, delta, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, start,
             LOGIT_SCALE: tl.constexpr, KV_LEN: tl.constexpr, S_PAD: tl.constexpr,
             NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
             BLOCK_K: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
             PRECISION: tl.constexpr, MASK: tl.constexpr):
  """Adds keys `[start, start + BLOCK_K)` to a query block's dq `[bq, H]` (unscaled)."""
  k = tl.load(_tile(k_ptr, b, kh, start, BLOCK_K, S_PAD, NUM_KV_HEADS, HEAD_DIM))  # [bk, H]
  v = tl.load(_tile(v_ptr, b, kh, start, BLOCK_K, S_PAD, NUM_KV_HEADS, V_DIM))  # [bk, Hv]
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * LOGIT_SCALE  # [bq, bk]
  if MASK:
    cols = start + tl.arange(0, BLOCK_K)
    keep = _live(rows[:, None], cols[None, :], q_ids[:, None], kv_ids_ptr, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
    s = tl.where(keep, s, -1.0e30)
  p = tl.exp2(s - lse[:, None])
  dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [bq, bk]
  # FlashAttention-2, alg. 2: dS = P * (dP - D).
  ds = p * (dp - delta[:, None])
  return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@_jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_ids_ptr, kv_ids_ptr, dq_ptr,
               SCALE: tl.constexpr, LOGIT_SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_SEGMENTS: tl.constexpr, KV_LEN: tl.constexpr,
               T_PAD: tl.constexpr, S_PAD: tl.constexpr, NUM_HEADS: tl.constexpr,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
  """Program (query block, b * N + n): dq `[bq, H]` of one head."""
  i, bn, b, n, kh, rows, q = _query_program(q_ptr, IS_CAUSAL, T_PAD, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_Q)
  do = tl.load(_tile(do_ptr, b, n, i * BLOCK_Q, BLOCK_Q, T_PAD, NUM_HEADS, V_DIM))  # [bq, Hv]
  lse = tl.load(lse_ptr + bn.to(tl.int64) * T_PAD + rows)
  delta = tl.load(delta_ptr + bn.to(tl.int64) * T_PAD + rows)
  kv_ids_ptr += b.to(tl.int64) * S_PAD
  if HAS_SEGMENTS:
    q_ids = tl.load(q_ids_ptr + b.to(tl.int64) * T_PAD + rows)
  else:
    q_ids = rows  # unused
  dq = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
  full, end = _key_blocks(i, BLOCK_Q, BLOCK_K, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
  for j in range(0, full):
    dq = _dq_step(dq, q, do, lse, delta, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, j * BLOCK_K,
                  LOGIT_SCALE, KV_LEN, S_PAD, NUM_KV_HEADS, HEAD_DIM, V_DIM, BLOCK_K,
                  IS_CAUSAL, HAS_SEGMENTS, PRECISION, False)
  for j in range(full, end):
    dq = _dq_step(dq, q, do, lse, delta, rows, q_ids, k_ptr, v_ptr, kv_ids_ptr, b, kh, j * BLOCK_K,
                  LOGIT_SCALE, KV_LEN, S_PAD, NUM_KV_HEADS, HEAD_DIM, V_DIM, BLOCK_K,
                  IS_CAUSAL, HAS_SEGMENTS, PRECISION, True)
  dq = dq * SCALE
  tl.store(_tile(dq_ptr, b, n, i * BLOCK_Q, BLOCK_Q, T_PAD, NUM_HEADS, HEAD_DIM), dq.to(dq_ptr.dtype.element_ty))


@_jit
def _dkdv_step(dk, dv, k, v, cols, q_ptr, do_ptr, lse_ptr, delta_ptr, q_ids_ptr, kv_ids_ptr, b, n, start,
               LOGIT_SCALE: tl.constexpr, KV_LEN: tl.constexpr, T_PAD: tl.constexpr,
               NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
               BLOCK_Q: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               PRECISION: tl.constexpr, MASK: tl.constexpr):
  """Adds queries `[start, start + BLOCK_Q)` of head n to a key block's (dk `[bk, H]`
  unscaled, dv `[bk, Hv]`). Works on transposed tiles (`[bk, bq]`), so that
  neither product needs a transposed P or dS."""
  rows = start + tl.arange(0, BLOCK_Q)
  q = tl.load(_tile(q_ptr, b, n, start, BLOCK_Q, T_PAD, NUM_HEADS, HEAD_DIM))  # [bq, H]
  do = tl.load(_tile(do_ptr, b, n, start, BLOCK_Q, T_PAD, NUM_HEADS, V_DIM))  # [bq, Hv]
  lse = tl.load(lse_ptr + rows)
  delta = tl.load(delta_ptr + rows)
  s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * LOGIT_SCALE  # [bk, bq]
  if MASK:
    if HAS_SEGMENTS:
      q_ids = tl.load(q_ids_ptr + rows)
    else:
      q_ids = rows  # unused
    keep = _live(rows[None, :], cols[:, None], q_ids[None, :], kv_ids_ptr, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
    s_t = tl.where(keep, s_t, -1.0e30)
  p_t = tl.exp2(s_t - lse[None, :])
  dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
  dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [bk, bq]
  ds_t = p_t * (dp_t - delta[None, :])
  dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
  return dk, dv


@_jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_ids_ptr, kv_ids_ptr, dk_ptr, dv_ptr,
                 SCALE: tl.constexpr, LOGIT_SCALE: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_SEGMENTS: tl.constexpr, KV_LEN: tl.constexpr,
                 T_PAD: tl.constexpr, S_PAD: tl.constexpr, NUM_HEADS: tl.constexpr,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
  """Program (key block, b * K + k): dk `[bk, H]` and dv `[bk, Hv]` of one key/value
  head, summed over the G query heads of its group."""
  j = tl.program_id(0)
  bk = tl.program_id(1)
  b = bk // NUM_KV_HEADS
  kh = bk % NUM_KV_HEADS
  cols = j * BLOCK_K + tl.arange(0, BLOCK_K)
  k = tl.load(_tile(k_ptr, b, kh, j * BLOCK_K, BLOCK_K, S_PAD, NUM_KV_HEADS, HEAD_DIM))  # [bk, H]
  v = tl.load(_tile(v_ptr, b, kh, j * BLOCK_K, BLOCK_K, S_PAD, NUM_KV_HEADS, V_DIM))  # [bk, Hv]
  q_ids_ptr += b.to(tl.int64) * T_PAD
  kv_ids_ptr += b.to(tl.int64) * S_PAD
  dk = tl.zeros([BLOCK_K, HEAD_DIM], tl.float32)
  dv = tl.zeros([BLOCK_K, V_DIM], tl.float32)
  lo, mid = _query_blocks(j, BLOCK_Q, BLOCK_K, T_PAD // BLOCK_Q, KV_LEN, IS_CAUSAL, HAS_SEGMENTS)
  group: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
  for g in range(0, group):
    n = kh * group + g
    head_rows = (b.to(tl.int64) * NUM_HEADS + n) * T_PAD
    for i in range(lo, mid):
      dk, dv = _dkdv_step(dk, dv, k, v, cols, q_ptr, do_ptr, lse_ptr + head_rows, delta_ptr + head_rows,
                          q_ids_ptr, kv_ids_ptr, b, n, i * BLOCK_Q, LOGIT_SCALE, KV_LEN, T_PAD, NUM_HEADS,
                          HEAD_DIM, V_DIM, BLOCK_Q, IS_CAUSAL, HAS_SEGMENTS, PRECISION, True)
    for i in range(mid, T_PAD // BLOCK_Q):
      dk, dv = _dkdv_step(dk, dv, k, v, cols, q_ptr, do_ptr, lse_ptr + head_rows, delta_ptr + head_rows,
                          q_ids_ptr, kv_ids_ptr, b, n, i * BLOCK_Q, LOGIT_SCALE, KV_LEN, T_PAD, NUM_HEADS,
                          HEAD_DIM, V_DIM, BLOCK_Q, IS_CAUSAL, HAS_SEGMENTS, PRECISION, False)
  dk = dk * SCALE
  tl.store(_tile(dk_ptr, b, kh, j * BLOCK_K, BLOCK_K, S_PAD, NUM_KV_HEADS, HEAD_DIM), dk.to(dk_ptr.dtype.element_ty))
  tl.store(_tile(dv_ptr, b, kh, j * BLOCK_K, BLOCK_K, S_PAD, NUM_KV_HEADS, V_DIM), dv.to(dv_ptr.dtype.element_ty))
