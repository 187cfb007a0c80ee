"""FAVOR+ positive random features in Pallas, for the chunked causal kernel.

`positive_features(q, k, w, scale=...)` returns the features that
`efficient_attention.favor_attention(kernel="softmax")` attends with, in the
input dtype, with the feature axis zero-padded to a power of two (the width
`pallas.causal_linear_attention` computes at):

  phi_q = exp(w' q - max_m w'_m q) / sqrt(M)                  (per-row stabiliser)
  phi_k = exp(max(w' k - scale |k|^2 / 2 - c, F)) / sqrt(M)    (c: max over all keys and
                                                               features of a head, F the floor)

with `w' = w * sqrt(scale)`, `F = LOG_FEATURE_FLOOR` and the stabilisers held
constant under differentiation, as the XLA path computes them. Three kernels
(query features; the keys' maximum per time block; key features) read q and k
once each and write only the features, never the float32 `[T, M]` projections;
in the backward two more kernels make q's and k's gradients (w's are XLA matmuls)
from the feature cotangents:

  dq = (dphi_q * phi_q) w',   dk = g w' - scale k sum_m g,   g = dphi_k * phi_k (0 where floored)

`causal_favor_attention(q, k, v, w, scale=...)` is causal FAVOR+ through these
kernels and `pallas.causal_linear_attention`'s chunked kernel under one custom
VJP: its dq and dk passes write dphi * phi themselves (no separate product over
`[T, M]`; the dk pass also its row sums), then the same two gradient kernels.

Einsum alphabet: B batch, T time, N heads, M features, H head width.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas import linear as la
from pallas.tiling import check_tiling, pad_to, pow2_at_least, triton_params

# Lowest stabilised log key feature of a live key: e^-35 ~ 6e-16 of the largest feature, so that a
# denominator stays >= e^-35 / M and its gradient (through 1 / den^2) finite in float32 for M up to 4096;
# features below it (negligible next to any key near the maximum) are raised to it.
LOG_FEATURE_FLOOR = -35.0
# Columns of the per-block maxima (the narrowest block a store takes).
_VEC = 16


@dataclasses.dataclass(frozen=True)
class FeatureBlockSizes:
  """Tiling of the feature kernels: `block_t` rows per program, feature columns
  computed `block_m` at a time (capped at the padded feature count). Defaults: the
  fastest on an H100 at H=128, M=256 and within 4% of it at H=64, M=128 (B1 N8
  bf16; `experiments/profile_linear.py --tune-features`, results/h100/feature_tune)."""

  block_t: int = 128
  block_m: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_tiling(self, pow2=("block_t", "block_m"), positive=("num_warps", "num_stages"))


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  num_features: int  # M, the real number of features (the rest is padding)
  block_t: int
  block_m: int
  interpret: bool
  num_warps: int
  num_stages: int


def positive_features(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    *,
    scale: float,
    block_sizes: FeatureBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Positive FAVOR+ features of `q [B, T, N, H]` and `k [B, S, K, H]` for `w [M, H]`.

  Returns `phi_q [B, T, N, M']`, `phi_k [B, S, K, M']` in q's dtype, M' the
  smallest power of two >= max(M, 16), columns M.. zero. Differentiable in q,
  k and w.
  """
  if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"positive_features: q [B, T, N, H] and k [B, S, K, H], got {q.shape=} {k.shape=}")
  if w.ndim != 2 or w.shape[1] != q.shape[3]:
    raise ValueError(f"positive_features: w must be [M, H={q.shape[3]}], got {w.shape=}")
  if q.dtype != k.dtype or q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise TypeError(f"positive_features: q and k of one dtype among bfloat16, float16, float32, got {q.dtype}, {k.dtype}")
  if block_sizes is None:
    block_sizes = FeatureBlockSizes()
  if not isinstance(block_sizes, FeatureBlockSizes):
    raise TypeError(f"block_sizes must be a FeatureBlockSizes, got {type(block_sizes).__name__}")
  static, w_s = _settings(w, scale, block_sizes, interpret)
  return _features(q, k, w_s, static)


def _settings(w, scale: float, block_sizes: FeatureBlockSizes, interpret: bool | None):
  """Static settings and the scaled projection rows `[M', H]` (zero rows past M)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  m = w.shape[0]
  m_pad = pow2_at_least(m)
  static = _Static(scale=float(scale), num_features=m, block_t=block_sizes.block_t,
                   block_m=min(block_sizes.block_m, m_pad), interpret=bool(interpret),
                   num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)
  return static, jnp.pad(w.astype(jnp.float32) * math.sqrt(scale), ((0, m_pad - m), (0, 0)))


def causal_favor_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    block_sizes: la.LinearBlockSizes | None = None,
    feature_block_sizes: FeatureBlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Causal FAVOR+ attention (positive features, every key live) through Pallas end to end.

  The features of `positive_features` feed `pallas.causal_linear_attention`'s
  kernel under one custom VJP, so that the backward passes write the
  cotangents of the features' logarithms (dphi * phi, 0 on floored keys)
  directly, and q's and k's gradients are two matmuls with the projection.

  Args:
    q: `[B, T, N, H]`, k: `[B, T, K, H]` (N % K == 0), v: `[B, T, K, Hv]`.
    w: `[M, H]` projection rows; scale: the logit scale (q and k are each
      multiplied by its square root).
    segment_ids: optional int `[B, T]` (sums restart with every run of equal ids).
    block_sizes: a `pallas.LinearBlockSizes` for the chunked kernel.
    feature_block_sizes: tiling of the feature kernels.
    interpret: run in Pallas' interpreter; default True off GPU.

  Returns:
    `[B, T, N, Hv]` in q's dtype.
  """
  family = "causal_favor_attention"
  dims = common.check_qkv(q, k, v)
  common.check_causal(True, dims, family=family, need_square=True)
  if w.ndim != 2 or w.shape[1] != dims.head_dim:
    raise ValueError(f"{family}: w must be [M, H={dims.head_dim}], got {w.shape=}")
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise TypeError(f"{family}: q, k, v in bfloat16, float16 or float32, got {q.dtype}")
  ids = common.check_shared_segment_ids(segment_ids, dims, family=family)
  block_sizes = la.LinearBlockSizes() if block_sizes is None else block_sizes
  if not isinstance(block_sizes, la.LinearBlockSizes):
    raise TypeError(f"block_sizes must be a LinearBlockSizes, got {type(block_sizes).__name__}")
  feature_block_sizes = FeatureBlockSizes() if feature_block_sizes is None else feature_block_sizes
  if not isinstance(feature_block_sizes, FeatureBlockSizes):
    raise TypeError(f"feature_block_sizes must be a FeatureBlockSizes, got {type(feature_block_sizes).__name__}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if dims.q_len == 0:
    return jnp.zeros((dims.batch, 0, dims.num_heads, dims.v_head_dim), q.dtype)
  fstatic, w_s = _settings(w, scale, feature_block_sizes, interpret)
  static, t_pad, labels = la.prepare(dims, w_s.shape[0], q.dtype, ids, block_sizes, interpret)
  v = pad_to(v, t_pad, pow2_at_least(dims.v_head_dim))
  return la.finish(_favor_core(q, k, v, w_s, labels, static, fstatic), dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _favor_core(q, k, v, w_s, labels, static, fstatic: _Static):
  return _favor_core_fwd(q, k, v, w_s, labels, static, fstatic)[0]


def _favor_core_fwd(q, k, v, w_s, labels, static, fstatic: _Static):
  (phi_q, phi_k), _ = _features_fwd(q, k, w_s, fstatic)
  t_pad, m_pad = v.shape[1], w_s.shape[0]
  phi_q, phi_k = pad_to(phi_q, t_pad, m_pad), pad_to(phi_k, t_pad, m_pad)
  out, rows, sums = la.forward(phi_q, phi_k, v, labels, static)
  return out, (q, k, v, w_s, labels, phi_q, phi_k, sums, out, rows)


def _favor_core_bwd(static, fstatic: _Static, residuals, g):
  q, k, v, w_s, labels, phi_q, phi_k, sums, out, rows = residuals
  g_q, g_k, dv, k_sums = la.backward(static, phi_q, phi_k, v, labels, sums, *la.num_den_cotangents(g, out, *rows),
                                      key_floor=_floor_threshold(fstatic, phi_k.dtype))
  t = q.shape[1]
  dq, dk, dw_s = _input_grads(fstatic, q, k, w_s, g_q[:, :t], g_k[:, :t], k_sums[:, :t])
  return dq, dk, dv, dw_s, None


_favor_core.defvjp(_favor_core_fwd, _favor_core_bwd)


def _floor_threshold(static: _Static, dtype) -> float:
  """Key features at or below this value sit on the floor (in `dtype`, with rounding room)."""
  return math.exp(LOG_FEATURE_FLOOR) / math.sqrt(static.num_features) * (1 + 4 * float(jnp.finfo(dtype).eps))


def _split(w_s: jax.Array, dtype) -> jax.Array:
  """`[P, M', H]` parts of the projection for matmuls with inputs of `dtype`: for 16-bit
  inputs (exact in their dtype) a high and a low part in that dtype, whose products add up
  to float32 accuracy on the matrix units; for float32 inputs, and head widths that are not
  a multiple of 16 (too narrow a contraction for 16-bit matrix instructions), the float32 rows."""
  if jnp.dtype(dtype).itemsize != 2 or w_s.shape[1] % 16:
    return w_s[None]
  hi = w_s.astype(dtype)
  return jnp.stack([hi, (w_s - hi.astype(jnp.float32)).astype(dtype)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _features(q, k, w_s, static: _Static):
  return _features_fwd(q, k, w_s, static)[0]


def _features_fwd(q, k, w_s, static: _Static):
  parts = _split(w_s, q.dtype)
  phi_q = _call(_query_kernel, q, parts, None, static, "favor_query_features")
  maxima = _call(_key_max_kernel, k, parts, None, static, "favor_key_maxima")
  # [B, K]: the keys' stabiliser (every key is live; T > 0 keys make it finite).
  stabiliser = jnp.max(maxima, axis=(1, 3))
  phi_k = _call(_key_kernel, k, parts, stabiliser, static, "favor_key_features")
  return (phi_q, phi_k), (q, k, w_s, phi_q, phi_k)


def _features_bwd(static: _Static, residuals, cotangents):
  q, k, w_s, phi_q, phi_k = residuals
  d_phi_q, d_phi_k = cotangents
  f32 = jnp.float32
  # The cotangents of the features' logarithms; floored key features carry none
  # (the floor is a constant), their value in the features' dtype marks them.
  g_q = d_phi_q.astype(f32) * phi_q.astype(f32)
  floored = phi_k.astype(f32) <= _floor_threshold(static, phi_k.dtype)
  g_k = jnp.where(floored, 0.0, d_phi_k.astype(f32) * phi_k.astype(f32))
  return _input_grads(static, q, k, w_s, g_q, g_k, jnp.sum(g_k, axis=-1))


def _input_grads(static: _Static, q, k, w_s, g_q, g_k, k_sums):
  """dq, dk, dw' from the cotangents `g = dphi * phi` of the features' logarithms `[B, T', N|K, M']`
  and the float32 row sums of g_k `[B, T', K]` (the gradient of k's -|k|^2 / 2 term); rows past
  q's length T <= T' are ignored.

  dq = g_q w' and dk = g_k w' - scale k sum_m g_k come from a kernel each (the
  float32 product never leaves it) for head widths that are powers of two >= 16,
  from XLA matmuls otherwise; dw' from two XLA matmuls (dropped when unused).
  The matmuls take g in the input dtype when it is 16-bit, float32 otherwise;
  their sums are float32.
  """
  f32 = jnp.float32
  t = q.shape[1]
  low = q.dtype if jnp.dtype(q.dtype).itemsize == 2 else f32
  g_q, g_k, w_low = g_q.astype(low), g_k.astype(low), w_s.astype(low)
  h = w_s.shape[1]
  if h >= 16 and not h & (h - 1):
    dq = _grad_call(g_q, w_low, None, None, static, t, "favor_query_gradient")
    # [B, K, T']
    sums = jnp.transpose(k_sums.astype(f32), (0, 2, 1))
    dk = _grad_call(g_k, w_low, k, sums, static, t, "favor_key_gradient")
  else:
    dq = jnp.einsum("btnm,mh->btnh", g_q[:, :t], w_low, preferred_element_type=f32).astype(q.dtype)
    gw = jnp.einsum("bsnm,mh->bsnh", g_k[:, :t], w_low, preferred_element_type=f32)
    dk = (gw - static.scale * k.astype(f32) * k_sums[:, :t, :, None]).astype(k.dtype)
  dw_s = jnp.einsum("btnm,btnh->mh", g_q[:, :t], q.astype(low), preferred_element_type=f32) + jnp.einsum(
      "bsnm,bsnh->mh", g_k[:, :t], k.astype(low), preferred_element_type=f32)
  return dq, dk, dw_s


def _grad_call(g, w, x, sums, static: _Static, length: int, name: str):
  """`g [B, T', N, M'] w [M', H]`, minus `scale x sums` with x `[B, T, N, H]` and
  `sums [B, N, T']`, for the first `length` rows, `[B, length, N, H]` in the input dtype."""
  b, _, n, m_pad = g.shape
  h = w.shape[1]
  c = static.block_t
  params = triton_params(interpret=static.interpret, num_warps=static.num_warps, num_stages=static.num_stages)
  in_specs = [pl.BlockSpec((None, c, None, m_pad), lambda i, j, s: (i, s, j, 0)),
              pl.BlockSpec((m_pad, h), lambda i, j, s: (0, 0))]
  args = [g, w]
  if x is not None:
    in_specs += [pl.BlockSpec((None, c, None, h), lambda i, j, s: (i, s, j, 0)),
                 pl.BlockSpec((None, None, c), lambda i, j, s: (i, j, s))]
    args += [x, sums]
  dtype = x.dtype if x is not None else (g.dtype if jnp.dtype(g.dtype).itemsize == 2 else jnp.float32)
  return pl.pallas_call(
      functools.partial(_grad_kernel, static=static, length=length, key=x is not None),
      grid=(b, n, -(-length // c)),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, c, None, h), lambda i, j, s: (i, s, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, length, n, h), dtype),
      interpret=static.interpret,
      name=name,
      **params,
  )(*args)


_features.defvjp(_features_fwd, _features_bwd)


def _call(kernel, x, parts, stabiliser, static: _Static, name: str):
  """One feature kernel over `x [B, T, N, H]`: a program per (batch, head, time block)."""
  b, t, n, h = x.shape
  m_pad = parts.shape[1]
  c = static.block_t
  blocks = -(-t // c)
  params = triton_params(interpret=static.interpret, num_warps=static.num_warps, num_stages=static.num_stages)
  in_specs = [pl.BlockSpec((None, c, None, h), lambda i, j, s: (i, s, j, 0)),
              pl.BlockSpec(parts.shape, lambda i, j, s: (0, 0, 0))]
  args = [x, parts]
  if stabiliser is not None:
    # [B, N, 16]: the head's stabiliser, broadcast to a loadable block.
    in_specs.append(pl.BlockSpec((None, None, _VEC), lambda i, j, s: (i, j, 0)))
    args.append(jnp.broadcast_to(stabiliser[..., None], (b, n, _VEC)))
  if kernel is _key_max_kernel:
    out_spec = pl.BlockSpec((None, None, None, _VEC), lambda i, j, s: (i, s, j, 0))
    out_shape = jax.ShapeDtypeStruct((b, blocks, n, _VEC), jnp.float32)
  else:
    out_spec = pl.BlockSpec((None, c, None, m_pad), lambda i, j, s: (i, s, j, 0))
    out_shape = jax.ShapeDtypeStruct((b, t, n, m_pad), x.dtype)
  return pl.pallas_call(
      functools.partial(kernel, static=static, length=t),
      grid=(b, n, blocks),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      interpret=static.interpret,
      name=name,
      **params,
  )(*args)


def _rows(x_ref, static: _Static, length: int):
  """The block's rows `[C, H]` in the input dtype (rows past the sequence read as 0) and their live mask `[C, 1]`."""
  from jax.experimental.pallas import triton as pltriton

  c = static.block_t
  rows = pl.program_id(2) * c + lax.broadcasted_iota(jnp.int32, (c, 1), 0)
  live_rows = rows < length
  if length % c:
    x = pltriton.load(x_ref, mask=jnp.broadcast_to(live_rows, x_ref.shape), other=0.0)
  else:
    x = x_ref[...]
  return x, live_rows


def _start(j, size: int):
  return j * size if isinstance(j, int) else pl.multiple_of(j * size, size)


def _columns(x, w_ref, j, static: _Static):
  """`w' x` for the feature columns of block j, `[C, bm]` float32 (a matmul per part of the
  projection, see `_split`), and the live-column mask `[1, bm]`."""
  bm = static.block_m
  x = x.astype(w_ref.dtype)
  wx = None
  for part in range(w_ref.shape[0]):
    w = w_ref[part, pl.ds(_start(j, bm), bm), :]
    term = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    wx = term if wx is None else wx + term
  cols = j * bm + lax.broadcasted_iota(jnp.int32, (1, bm), 1) < static.num_features
  return wx, cols


def _store(o_ref, j, value, live_rows, static: _Static, length: int):
  from jax.experimental.pallas import triton as pltriton

  bm = static.block_m
  at = (slice(None), pl.ds(_start(j, bm), bm))
  if length % static.block_t:
    pltriton.store(o_ref.at[at], value.astype(o_ref.dtype), mask=jnp.broadcast_to(live_rows, value.shape))
  else:
    o_ref[at] = value.astype(o_ref.dtype)


def _num_blocks(w_ref, static: _Static) -> int:
  return w_ref.shape[1] // static.block_m


def _query_kernel(x_ref, w_ref, o_ref, *, static: _Static, length: int):
  x, live_rows = _rows(x_ref, static, length)
  norm = 1.0 / math.sqrt(static.num_features)
  blocks = _num_blocks(w_ref, static)
  if blocks == 1:
    wx, cols = _columns(x, w_ref, 0, static)
    wx = jnp.where(cols, wx, -jnp.inf)
    _store(o_ref, 0, jnp.exp(wx - jnp.max(wx, axis=1, keepdims=True)) * norm, live_rows, static, length)
    return

  # Wide rows: the row maximum over every column block first, then the features block by block.
  def row_max(j, top):
    wx, cols = _columns(x, w_ref, j, static)
    return jnp.maximum(top, jnp.max(jnp.where(cols, wx, -jnp.inf), axis=1))

  top = lax.fori_loop(0, blocks, row_max, jnp.full((static.block_t,), -jnp.inf, jnp.float32))

  def write(j, carry):
    wx, cols = _columns(x, w_ref, j, static)
    _store(o_ref, j, jnp.where(cols, jnp.exp(wx - top[:, None]), 0.0) * norm, live_rows, static, length)
    return carry

  lax.fori_loop(0, blocks, write, 0)


def _grad_kernel(g_ref, w_ref, *refs, static: _Static, length: int, key: bool):
  """One block of rows of `_grad_call`: `g w`, minus `scale x sums` for keys."""
  from jax.experimental.pallas import triton as pltriton

  x_ref, s_ref, o_ref = refs if key else (None, None, *refs)
  c, bm = static.block_t, static.block_m
  rows = pl.program_id(2) * c + lax.broadcasted_iota(jnp.int32, (c, 1), 0)
  live_rows = rows < length
  precision = lax.Precision.HIGHEST if g_ref.dtype == jnp.float32 else None

  # A block of feature columns at a time (loads of the next one overlap the matmul of this one).
  def add(j, out):
    at = (slice(None), pl.ds(_start(j, bm), bm))
    if length % c:
      g = pltriton.load(g_ref.at[at], mask=jnp.broadcast_to(live_rows, (c, bm)), other=0.0)
    else:
      g = g_ref[at]
    w = w_ref[pl.ds(_start(j, bm), bm), :]
    return out + lax.dot_general(g, w, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)

  out = lax.fori_loop(0, w_ref.shape[0] // bm, add, jnp.zeros((c, o_ref.shape[1]), jnp.float32))
  if key:
    x, _ = _rows(x_ref, static, length)
    if length % static.block_t:
      sums = pltriton.load(s_ref, mask=live_rows[:, 0], other=0.0)
    else:
      sums = s_ref[...]
    out = out - static.scale * x.astype(jnp.float32) * sums[:, None]
  if length % static.block_t:
    pltriton.store(o_ref, out.astype(o_ref.dtype), mask=jnp.broadcast_to(live_rows, out.shape))
  else:
    o_ref[...] = out.astype(o_ref.dtype)


def _half_sq_norm(x, static: _Static):
  """`[C, 1]`: scale |x|^2 / 2 per row, float32."""
  x = x.astype(jnp.float32)
  return (0.5 * static.scale) * jnp.sum(x * x, axis=1, keepdims=True)


def _key_max_kernel(x_ref, w_ref, o_ref, *, static: _Static, length: int):
  x, live_rows = _rows(x_ref, static, length)
  sq = _half_sq_norm(x, static)

  def block_max(j, top):
    wx, cols = _columns(x, w_ref, j, static)
    return jnp.maximum(top, jnp.max(jnp.where(live_rows & cols, wx - sq, -jnp.inf)))

  top = lax.fori_loop(0, _num_blocks(w_ref, static), block_max, jnp.float32(-jnp.inf))
  o_ref[...] = jnp.full(o_ref.shape, top, jnp.float32)


def _key_kernel(x_ref, w_ref, stab_ref, o_ref, *, static: _Static, length: int):
  x, live_rows = _rows(x_ref, static, length)
  # [C, 1]: the stabiliser joins the row term.
  shift = _half_sq_norm(x, static) + jnp.max(stab_ref[...])
  norm = 1.0 / math.sqrt(static.num_features)

  def write(j, carry):
    wx, cols = _columns(x, w_ref, j, static)
    phi = jnp.exp(jnp.maximum(wx - shift, LOG_FEATURE_FLOOR))
    _store(o_ref, j, jnp.where(cols, phi, 0.0) * norm, live_rows, static, length)
    return carry

  lax.fori_loop(0, _num_blocks(w_ref, static), write, 0)


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


def positive_features_reference(q, k, w, *, scale: float):
  """fp32 einsum form of the same contract (the XLA path's feature maps), padded as the kernels pad."""
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  m = w.shape[0]
  m_pad = pow2_at_least(m)
  norm = 1.0 / math.sqrt(m)
  hi = lax.Precision.HIGHEST
  w_s = w.astype(f32) * math.sqrt(scale)
  wx_q = jnp.einsum("btnh,mh->btnm", q.astype(f32), w_s, precision=hi)
  phi_q = jnp.exp(wx_q - lax.stop_gradient(jnp.max(wx_q, axis=-1, keepdims=True))) * norm
  x_k = k.astype(f32)
  log_factor = jnp.einsum("bsnh,mh->bsnm", x_k, w_s, precision=hi) - 0.5 * scale * jnp.sum(
      x_k * x_k, axis=-1, keepdims=True)
  stabiliser = lax.stop_gradient(jnp.max(log_factor, axis=(1, 3), keepdims=True))
  phi_k = jnp.exp(jnp.maximum(log_factor - stabiliser, LOG_FEATURE_FLOOR)) * norm
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, m_pad - m)))
  return pad(phi_q), pad(phi_k)
