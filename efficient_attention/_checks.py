"""Input validation shared by every attention family.

Every check runs on static shapes and dtypes, so it raises the same way with or
without `jax.jit`, before any tracing-time surprise. Messages name the values.
The checks the kernels need too live below them, in `pallas.common`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas.common import (  # noqa: F401  (the checks the kernels share)
    Dims,
    check_causal,
    check_qkv,
    check_scale,
    check_segment_ids,
    check_shared_segment_ids,
    empty_output,
)

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


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
