"""Input validation shared by every attention family.

Every check runs on static shapes and dtypes, so it raises the same way with or
without `jax.jit`, before any tracing-time surprise. Messages name the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class Dims:
  """Sizes of a q/k/v triple in the shared `[B, T, N, H]` layout."""

  batch: int  # B
  q_len: int  # T
  kv_len: int  # S
  num_heads: int  # N (query heads)
  num_kv_heads: int  # K (key/value heads; N % K == 0)
  head_dim: int  # H (queries and keys)
  v_head_dim: int  # H of the values (may differ from q/k)

  @property
  def group(self) -> int:
    """Query heads per key/value head (GQA group size G = N / K)."""
    return self.num_heads // self.num_kv_heads


def check_qkv(q: Any, k: Any, v: Any) -> Dims:
  """Checks ranks, dtypes and sizes of q `[B, T, N, H]`, k `[B, S, K, H]`, v `[B, S, K, Hv]`."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [B, T, N, H], got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
  if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
    raise ValueError(f"batch sizes differ: {q.shape=}, {k.shape=}, {v.shape=}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on [B, S, K]: {k.shape=} and {v.shape=}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{q.shape=} and {k.shape=} differ in head dim")
  if q.shape[2] % k.shape[2] != 0:
    raise ValueError(
        f"query heads must be a multiple of key/value heads (GQA): {q.shape[2]=} % {k.shape[2]=} != 0"
    )
  return Dims(
      batch=q.shape[0],
      q_len=q.shape[1],
      kv_len=k.shape[1],
      num_heads=q.shape[2],
      num_kv_heads=k.shape[2],
      head_dim=q.shape[3],
      v_head_dim=v.shape[3],
  )


def check_mask(mask: Any, dims: Dims, name: str = "mask") -> jax.Array | None:
  """Checks a boolean mask of shape `[B|1, N|1, T|1, S|1]` (True = attend)."""
  if mask is None:
    return None
  if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean array (True = attend), got dtype={getattr(mask, 'dtype', type(mask))}")
  if mask.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [B, N|1, T, S], got {name}.shape={mask.shape}")
  full = (dims.batch, dims.num_heads, dims.q_len, dims.kv_len)
  for size, want, axis in zip(mask.shape, full, "BNTS"):
    if size not in (1, want):
      raise ValueError(f"{name}.shape={mask.shape} does not broadcast to [B, N, T, S]={full} (axis {axis})")
  return jnp.asarray(mask)


def check_bias(bias: Any, dims: Dims) -> jax.Array | None:
  """Checks an additive bias of shape `[B|1, N|1, T|1, S|1]`."""
  if bias is None:
    return None
  if not hasattr(bias, "dtype") or not jnp.issubdtype(bias.dtype, jnp.floating):
    raise TypeError(f"bias must be a floating-point array, got dtype={getattr(bias, 'dtype', type(bias))}")
  if bias.ndim != 4:
    raise ValueError(f"bias must have rank 4 [B, N|1, T, S], got bias.shape={bias.shape}")
  full = (dims.batch, dims.num_heads, dims.q_len, dims.kv_len)
  for size, want, axis in zip(bias.shape, full, "BNTS"):
    if size not in (1, want):
      raise ValueError(f"bias.shape={bias.shape} does not broadcast to [B, N, T, S]={full} (axis {axis})")
  return jnp.asarray(bias)


def check_segment_ids(segment_ids: Any, dims: Dims) -> tuple[jax.Array, jax.Array] | None:
  """Checks segment ids: one int array `[B, T]` (when T == S) or a pair (`[B, T]`, `[B, S]`).

  Returns the (query ids, key ids) pair, or None.
  """
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids must be one array or a (q_ids, kv_ids) pair, got {len(segment_ids)} items")
    q_ids, kv_ids = segment_ids
  else:
    q_ids = kv_ids = segment_ids
  for name, ids, length in (("query", q_ids, dims.q_len), ("key/value", kv_ids, dims.kv_len)):
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} segment_ids must be an integer array, got dtype={getattr(ids, 'dtype', type(ids))}")
    if ids.shape != (dims.batch, length):
      raise ValueError(f"{name} segment_ids.shape={ids.shape} must be [B, {'T' if length == dims.q_len else 'S'}]={(dims.batch, length)}")
  return jnp.asarray(q_ids), jnp.asarray(kv_ids)


def check_scale(scale: Any, dims: Dims) -> float:
  """Returns the logit scale, `H**-0.5` by default."""
  if scale is None:
    return dims.head_dim**-0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python float (it is static), got {scale!r}")
  if not scale > 0:
    raise ValueError(f"scale must be positive, got {scale=}")
  return float(scale)


def check_causal(is_causal: Any, dims: Dims, *, family: str, need_square: bool = False) -> bool:
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
  if is_causal and need_square and dims.q_len != dims.kv_len:
    raise ValueError(f"{family}: is_causal=True needs as many queries as keys, got T={dims.q_len}, S={dims.kv_len}")
  return is_causal


def check_implementation(implementation: Any, supported: tuple[str, ...], *, family: str) -> None:
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {implementation=}; valid: None, {', '.join(map(repr, IMPLEMENTATIONS))}")
  if implementation is not None and implementation not in supported:
    raise ValueError(
        f"{family} has no {implementation=}; it supports: None, {', '.join(map(repr, supported))}"
    )


def reject(family: str, **options: Any) -> None:
  """Raises for options a family cannot honour (passed as name=value; None means unset)."""
  for name, value in options.items():
    if value is not None and value is not False:
      raise ValueError(f"{family} cannot honour {name}={_short(value)}; leave it unset")


def _short(value: Any) -> str:
  if hasattr(value, "shape"):
    return f"<array shape={tuple(value.shape)} dtype={value.dtype}>"
  return repr(value)
