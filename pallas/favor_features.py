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
the backward is XLA (two matmuls and a row sum over the feature cotangents):

  dq = (dphi_q * phi_q) w',   dk = g w' - scale k sum_m g,   g = dphi_k * phi_k (0 where floored)

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

from efficient_attention._favor import LOG_FEATURE_FLOOR

# Columns of the per-block maxima (the narrowest block a store takes).
_VEC = 16


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  num_features: int  # M, the real number of features (the rest is padding)
  block_t: int
  interpret: bool
  num_warps: int
  num_stages: int


def positive_features(
    q: jax.Array, k: jax.Array, w: jax.Array, *, scale: float, block_t: int = 64, interpret: bool | None = None
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
  if block_t < 16 or block_t & (block_t - 1):
    raise ValueError(f"positive_features: block_t must be a power of two >= 16, got {block_t=}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  m = w.shape[0]
  m_pad = max(16, 1 << (m - 1).bit_length())
  # Wide feature rows take shorter time blocks (the [block_t, M'] float32 tile stays in registers).
  block_t = min(block_t, max(16, 8192 // m_pad))
  static = _Static(scale=float(scale), num_features=m, block_t=block_t, interpret=bool(interpret),
                   num_warps=4, num_stages=2)
  # [M', H]: scaled projection rows, zero rows past M.
  w_s = jnp.pad(w.astype(jnp.float32) * math.sqrt(scale), ((0, m_pad - m), (0, 0)))
  return _features(q, k, w_s, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _features(q, k, w_s, static: _Static):
  return _features_fwd(q, k, w_s, static)[0]


def _features_fwd(q, k, w_s, static: _Static):
  phi_q = _call(_query_kernel, q, w_s, None, static, "favor_query_features")
  maxima = _call(_key_max_kernel, k, w_s, None, static, "favor_key_maxima")
  # [B, K]: the keys' stabiliser (every key is live; T > 0 keys make it finite).
  stabiliser = jnp.max(maxima, axis=(1, 3))
  phi_k = _call(_key_kernel, k, w_s, stabiliser, static, "favor_key_features")
  return (phi_q, phi_k), (q, k, w_s, phi_q, phi_k)


def _features_bwd(static: _Static, residuals, cotangents):
  q, k, w_s, phi_q, phi_k = residuals
  d_phi_q, d_phi_k = cotangents
  f32 = jnp.float32
  # [B, T, N, M']
  g_q = d_phi_q.astype(f32) * phi_q.astype(f32)
  # Floored key features carry no gradient (the floor is a constant); their
  # value in the features' dtype marks them.
  floor = jnp.asarray(math.exp(LOG_FEATURE_FLOOR) / math.sqrt(static.num_features), f32)
  floor = (floor * (1 + 4 * jnp.finfo(phi_k.dtype).eps)).astype(f32)
  g_k = jnp.where(phi_k.astype(f32) > floor, d_phi_k.astype(f32) * phi_k.astype(f32), 0.0)
  dq = jnp.einsum("btnm,mh->btnh", g_q, w_s)
  dk = jnp.einsum("bsnm,mh->bsnh", g_k, w_s) - static.scale * k.astype(f32) * jnp.sum(g_k, -1, keepdims=True)
  dw_s = jnp.einsum("btnm,btnh->mh", g_q, q.astype(f32)) + jnp.einsum("bsnm,bsnh->mh", g_k, k.astype(f32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dw_s


_features.defvjp(_features_fwd, _features_bwd)


def _call(kernel, x, w_s, stabiliser, static: _Static, name: str):
  """One feature kernel over `x [B, T, N, H]`: a program per (batch, head, time block)."""
  b, t, n, h = x.shape
  m_pad = w_s.shape[0]
  c = static.block_t
  blocks = -(-t // c)
  params = {}
  if not static.interpret:
    from jax.experimental.pallas import triton as pltriton
    params["compiler_params"] = pltriton.CompilerParams(num_warps=static.num_warps, num_stages=static.num_stages)
  in_specs = [pl.BlockSpec((None, c, None, h), lambda i, j, s: (i, s, j, 0)),
              pl.BlockSpec((m_pad, h), lambda i, j, s: (0, 0))]
  args = [x, w_s]
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


def _projection(x_ref, w_ref, static: _Static, length: int):
  """`[C, M']` float32 `w' x` of the block's rows, the rows' live mask `[C, 1]` and
  the live-column mask `[1, M']`; rows past the sequence read as 0."""
  from jax.experimental.pallas import triton as pltriton

  c = static.block_t
  rows = pl.program_id(2) * c + lax.broadcasted_iota(jnp.int32, (c, 1), 0)
  live_rows = rows < length
  if length % c:
    x = pltriton.load(x_ref, mask=jnp.broadcast_to(live_rows, x_ref.shape), other=0.0)
  else:
    x = x_ref[...]
  x = x.astype(jnp.float32)
  w = w_ref[...]
  wx = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  cols = lax.broadcasted_iota(jnp.int32, (1, w.shape[0]), 1) < static.num_features
  return x, wx, live_rows, cols


def _store(o_ref, value, live_rows, length: int, c: int):
  from jax.experimental.pallas import triton as pltriton

  if length % c:
    pltriton.store(o_ref, value.astype(o_ref.dtype), mask=jnp.broadcast_to(live_rows, value.shape))
  else:
    o_ref[...] = value.astype(o_ref.dtype)


def _query_kernel(x_ref, w_ref, o_ref, *, static: _Static, length: int):
  _, wx, live_rows, cols = _projection(x_ref, w_ref, static, length)
  wx = jnp.where(cols, wx, -jnp.inf)
  phi = jnp.exp(wx - jnp.max(wx, axis=1, keepdims=True)) * (1.0 / math.sqrt(static.num_features))
  _store(o_ref, phi, live_rows, length, static.block_t)


def _log_factor(x_ref, w_ref, static: _Static, length: int):
  x, wx, live_rows, cols = _projection(x_ref, w_ref, static, length)
  log_factor = wx - (0.5 * static.scale) * jnp.sum(x * x, axis=1, keepdims=True)
  return log_factor, live_rows, cols


def _key_max_kernel(x_ref, w_ref, o_ref, *, static: _Static, length: int):
  log_factor, live_rows, cols = _log_factor(x_ref, w_ref, static, length)
  top = jnp.max(jnp.where(live_rows & cols, log_factor, -jnp.inf))
  o_ref[...] = jnp.full(o_ref.shape, top, jnp.float32)


def _key_kernel(x_ref, w_ref, stab_ref, o_ref, *, static: _Static, length: int):
  log_factor, live_rows, cols = _log_factor(x_ref, w_ref, static, length)
  stabiliser = jnp.max(stab_ref[...])
  log_factor = jnp.maximum(log_factor - stabiliser, LOG_FEATURE_FLOOR)
  phi = jnp.where(cols, jnp.exp(log_factor), 0.0) * (1.0 / math.sqrt(static.num_features))
  _store(o_ref, phi, live_rows, length, static.block_t)


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


def positive_features_reference(q, k, w, *, scale: float):
  """fp32 einsum form of the same contract (the XLA path's feature maps), padded as the kernels pad."""
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  m = w.shape[0]
  m_pad = max(16, 1 << (m - 1).bit_length())
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
