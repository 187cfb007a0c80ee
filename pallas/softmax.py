"""Tiled online-softmax attention (FlashAttention-2) in Pallas, forward and backward.

`flash_attention(q, k, v, ...)` takes the shared contract's `[B, T, N, H]` layout,
`is_causal` (top-left aligned), `segment_ids`, GQA (`N % K == 0`) and `scale`;
bf16 / f16 / f32 inputs, float32 accumulation. Any T and S: inputs are padded to
whole blocks and the tail is masked. Head dims are padded to a power of two
(>= 16). A query row with nothing to attend to returns 0 with 0 gradient.

Backends:
  "triton"     Pallas' Triton lowering (GPU; also the CPU interpret path).
  "mosaic_gpu" Hopper warp-specialised kernel, see `softmax_mosaic_gpu.py`.
  "mosaic_tpu" TPU kernel, see `softmax_tpu.py`.
  "jax_triton" Triton-language kernels launched through jax_triton (CUDA GPU),
               see `softmax_jax_triton.py`.
`default_backend` picks one per platform and shape.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K, H head dim (Hv for values).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas.flash_tiles import (
    FlashStatic,
    dkdv_step,
    dq_step,
    forward_init,
    forward_result,
    forward_step,
    kv_ranges,
    launch_params,
    output_delta,
    pad_inputs,
    query_block,
    sum_groups,
    with_optional_ids,
)
from pallas.tiling import idiv, matmul_precision, pow2_at_least, triton_lowering_available

BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu", "jax_triton")


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
      # (8, 128) tiling: 128-multiples keep every block legal (see softmax_tpu.py); untuned.
      return cls(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128,
                 block_k_dkv=128)
    if backend == "mosaic_gpu":
      # Forward: two consumer warpgroups of 64 rows, 128-key steps, 2-deep K/V
      # ring (see pallas/NOTES_mosaic_gpu.md); the backward kernels take their own
      # settings (`softmax_mosaic_gpu.default_backward_config`).
      triton = cls.get_default("triton", head_dim)
      return dataclasses.replace(triton, block_q=128, block_k=128, num_stages=2)
    if backend == "jax_triton":
      # The same kernels as "triton", written in the Triton language: the same tiles.
      return cls.get_default("triton", head_dim)
    return cls()

  def clamp(self, q_len: int, kv_len: int) -> BlockSizes:
    """Shrinks blocks longer than the (power-of-two rounded) sequence."""
    tq, ts = pow2_at_least(q_len), pow2_at_least(kv_len)
    return dataclasses.replace(
        self,
        block_q=min(self.block_q, tq), block_k=min(self.block_k, ts),
        block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, ts),
        block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, ts),
    )


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
    backend: "triton", "mosaic_gpu", "mosaic_tpu" or "jax_triton"; default by
      platform and shape (`default_backend`: "mosaic_tpu" on TPU; on a GPU
      "mosaic_gpu" on Hopper where it applies and leads, else "jax_triton" where
      it is installed, else "triton"; interpreted calls "triton").
    interpret: run the kernels in Pallas' interpreter; default True off GPU/TPU.

  Returns:
    `[B, T, N, Hv]` in the input dtype.
  """
  dims = common.check_qkv(q, k, v)
  ids = common.check_segment_ids(segment_ids, dims)
  scale = common.check_scale(scale, dims)
  common.check_causal(is_causal, dims, family="flash_attention")
  empty = common.empty_output(q, dims)
  if empty is not None:
    return empty
  platform = jax.default_backend()
  if interpret is None:
    interpret = platform not in ("gpu", "tpu")
  if backend is None:
    backend = default_backend(q.dtype, dims, platform, is_causal=is_causal, has_segments=ids is not None,
                              interpret=bool(interpret))
  if backend not in BACKENDS:
    raise ValueError(f"unknown {backend=}; valid: {', '.join(map(repr, BACKENDS))}")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(backend, dims.head_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  blocks = block_sizes.clamp(dims.q_len, dims.kv_len)
  static = FlashStatic(scale=scale, is_causal=is_causal, has_segments=ids is not None,
                       q_len=dims.q_len, kv_len=dims.kv_len, group=dims.group,
                       blocks=blocks, backend=backend, interpret=bool(interpret),
                       precision=matmul_precision(q.dtype))
  qp, kp, vp, q_ids, kv_ids = pad_inputs(q, k, v, ids, dims, blocks)
  out = _flash(qp, kp, vp, q_ids, kv_ids, static)
  return out[:, : dims.q_len, :, : dims.v_head_dim]


def default_backend(dtype: Any, dims: common.Dims, platform: str | None = None, *,
                    is_causal: bool = False, has_segments: bool = False, interpret: bool = False) -> str:
  """The backend `flash_attention` picks when none is named.

  TPU: "mosaic_tpu". A GPU (compiled): "mosaic_gpu" where it applies (Hopper, 16-bit,
  head dim 64 / 128), except at head dim <= 64 when jax_triton runs here; else
  "jax_triton" when it runs here; else the Pallas-Triton lowering ("triton"), and an
  error where JAX no longer has it. From the H200 table (results/h200/flash/softmax.md): the
  jax_triton kernels ran at or above the Pallas-Triton lowering on 23 of 24 rows
  (T 2k-16k, head dim 64 / 128, causal or not, forward and forward+backward) and above
  the Mosaic GPU kernel on 9 of the 12 head-dim-64 rows; Mosaic GPU led on 11 of the 12
  head-dim-128 rows. Interpreted calls, and anything else: "triton".
  """
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "mosaic_tpu"
  if platform == "gpu" and not interpret:
    from pallas import softmax_jax_triton, softmax_mosaic_gpu
    jax_triton = softmax_jax_triton.available()
    narrow = max(dims.head_dim, dims.v_head_dim) <= 64
    if (softmax_mosaic_gpu.applies(dtype, dims, is_causal=is_causal, has_segments=has_segments)
        and not (jax_triton and narrow)):
      return "mosaic_gpu"
    if jax_triton:
      return "jax_triton"
    if not triton_lowering_available():
      raise ValueError("flash_attention on this GPU needs jax_triton (pip install 'efficient-attention[gpu]'): "
                       "this JAX has no Pallas-Triton lowering, and the Mosaic GPU kernel does not apply "
                       f"(missing for jax_triton: {', '.join(softmax_jax_triton.missing())})")
  return "triton"


# --------------------------------------------------------------------------- #
# custom_vjp over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, static: FlashStatic):
  return forward(q, k, v, q_ids, kv_ids, static)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, static: FlashStatic):
  out, lse = forward(q, k, v, q_ids, kv_ids, static)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(static: FlashStatic, residuals, d_out):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  delta = output_delta(out, d_out)
  backward = _backend_module(static).backward if static.backend != "triton" else None
  if backward is not None:
    dq, dk, dv = backward(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
  else:
    dq = _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
    dk, dv = _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, static)
  return dq, dk, dv, None, None


def _backend_module(static: FlashStatic):
  """The module of a non-Triton backend: `forward(q, k, v, q_ids, kv_ids, static) -> (out, lse)`
  and `backward(...) -> (dq, dk, dv)` (None: the Triton backward kernels are used),
  both on padded `[B, T, N, H]` inputs with `lse` `[B, N, T]` in base-2 units
  (+inf on rows with nothing to attend to)."""
  if static.backend == "mosaic_gpu":
    from pallas import softmax_mosaic_gpu as module
  elif static.backend == "jax_triton":
    from pallas import softmax_jax_triton as module
  else:
    from pallas import softmax_tpu as module
  return module


_flash.defvjp(_flash_fwd, _flash_bwd)


def _q_ranges(kv_block, num_q_blocks: int, *, block_q: int, block_k: int, static: FlashStatic):
  """Query blocks key block `kv_block` meets: masked `[lo, mid)`, unmasked `[mid, hi)`."""
  hi = jnp.int32(num_q_blocks)
  if static.is_causal:
    lo = jnp.minimum(idiv(kv_block * block_k, block_q), hi)
    mid = jnp.minimum(idiv((kv_block + 1) * block_k - 1 + block_q - 1, block_q), hi)
  else:
    lo = mid = jnp.int32(0)
  tail = (kv_block + 1) * block_k > static.kv_len
  if static.has_segments:
    mid = hi
  else:
    mid = jnp.where(tail, hi, mid)
  return lo, mid, hi


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *, static: FlashStatic):
  bq, bk = static.blocks.block_q, static.blocks.block_k
  i = query_block(pl.program_id(0), pl.num_programs(0), static)
  q = q_ref[...]  # [bq, H]
  q_ids = q_ids_ref[...] if static.has_segments else None

  def body(j, carry, *, masked):
    return forward_step(q, q_ids, i * bq, j * bk, k_ref, v_ref, kv_ids_ref, carry, masked=masked, static=static)

  full, end = kv_ranges(i, block_q=bq, block_k=bk, static=static)
  carry = lax.fori_loop(0, full, functools.partial(body, masked=False), forward_init(bq, v_ref.shape[-1]))
  carry = lax.fori_loop(full, end, functools.partial(body, masked=True), carry)
  out, lse = forward_result(*carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def forward(q, k, v, q_ids, kv_ids, static: FlashStatic):
  """Output `[B, T, N, Hv]` and lse `[B, N, T]` (base 2, +inf on dead rows) of padded inputs, by `static.backend`."""
  if static.backend != "triton":
    return _backend_module(static).forward(q, k, v, q_ids, kv_ids, static)
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  bq = static.blocks.block_q
  group = static.group
  nq = t_pad // bq
  grid = (nq, batch, num_heads)
  qb = lambda i: query_block(i, nq, static)  # noqa: E731
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
  kernel = with_optional_ids(_forward_kernel, static, num_inputs=3)
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
      **launch_params(static, backward=False),
  )(*args)


# --------------------------------------------------------------------------- #
# backward: dQ by query blocks, dK/dV by key blocks (FlashAttention-2, alg. 2)
# --------------------------------------------------------------------------- #


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref, *,
               static: FlashStatic):
  bq, bk = static.blocks.block_q_dq, static.blocks.block_k_dq
  i = query_block(pl.program_id(0), pl.num_programs(0), static)
  rows = (q_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
          q_ids_ref[...] if static.has_segments else None)

  def body(j, dq, *, masked):
    return dq_step(rows, i * bq, j * bk, k_ref, v_ref, kv_ids_ref, dq, masked=masked, static=static)

  dq = jnp.zeros(q_ref.shape, jnp.float32)
  full, end = kv_ranges(i, block_q=bq, block_k=bk, static=static)
  dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(full, end, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _backward_dq(q, k, v, q_ids, kv_ids, d_out, lse, delta, static: FlashStatic):
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
  bq = static.blocks.block_q_dq
  group = static.group
  nq = t_pad // bq
  qb = lambda i: query_block(i, nq, static)  # noqa: E731
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
      with_optional_ids(_dq_kernel, static, num_inputs=6),
      grid=(nq, batch, num_heads),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, head_dim), q_block),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=static.interpret,
      name="flash_backward_dq",
      **launch_params(static, backward=True),
  )(*args)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
                 dk_ref, dv_ref, *, static: FlashStatic):
  bq, bk = static.blocks.block_q_dkv, static.blocks.block_k_dkv
  j = pl.program_id(0)
  cols = (k_ref[...], v_ref[...], kv_ids_ref[...] if static.has_segments else None)
  refs = (q_ref, do_ref, lse_ref, delta_ref, q_ids_ref)

  def body(i, carry, *, masked):
    return dkdv_step(cols, i * bq, j * bk, refs, carry, masked=masked, static=static)

  carry = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
  num_q_blocks = q_ref.shape[0] // bq
  lo, mid, hi = _q_ranges(j, num_q_blocks, block_q=bq, block_k=bk, static=static)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=True), carry)
  dk, dv = lax.fori_loop(mid, hi, functools.partial(body, masked=False), carry)
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkdv(q, k, v, q_ids, kv_ids, d_out, lse, delta, static: FlashStatic):
  """dK, dV per query head (summed over each GQA group afterwards)."""
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, v_dim = k.shape[1], v.shape[3]
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
      with_optional_ids(_dkdv_kernel, static, num_inputs=6),
      grid=(s_pad // bk, batch, num_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, head_dim), per_head),
                 pl.BlockSpec((None, bk, None, v_dim), per_head)],
      out_shape=[jax.ShapeDtypeStruct((batch, s_pad, num_heads, head_dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), out_dtype)],
      interpret=static.interpret,
      name="flash_backward_dkdv",
      **launch_params(static, backward=True),
  )(*args)
  return sum_groups(dk, dv, k, v, group)


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


@functools.partial(jax.jit, static_argnames=("is_causal", "scale"))
def softmax_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Dense reference in the inputs' precision (use float64 inputs under `jax.enable_x64`).

  Heads are repeated for GQA and the whole `[B, N, T, S]` matrix is built.
  """
  n, kh = q.shape[2], k.shape[2]
  k = jnp.repeat(k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if segment_ids is not None and not isinstance(segment_ids, (tuple, list)):
    segment_ids = (segment_ids, segment_ids)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + bias
  live = common.dense_mask(q.shape[1], k.shape[1], is_causal=is_causal, mask=mask, segment_ids=segment_ids)
  if live is None:
    live = jnp.ones((1, 1) + logits.shape[-2:], bool)
  logits = jnp.where(live, logits, -jnp.inf)
  row_live = jnp.any(live, axis=-1, keepdims=True)
  logits = jnp.where(row_live, logits, 0.0)
  weights = jnp.where(live, jax.nn.softmax(logits, axis=-1), 0.0)
  return jnp.einsum("bnts,bsnh->btnh", weights, v)
