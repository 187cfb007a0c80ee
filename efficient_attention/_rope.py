"""Rotary position embedding (RoFormer, Su et al. 2021, sec. 3.4).

Pairs of channels `(x_i, x_{i + H/2})` are rotated by the angle
`position * base**(-i / (H/2))`, so `rope(q, t) . rope(k, s)` depends on the
positions only through `t - s` (the half-split channel pairing of GPT-NeoX and
Gemma, not RoFormer's interleaved one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
  """Rotates queries or keys by their positions.

  Args:
    x: `[B, T, N, H]` queries or keys, H even.
    positions: int `[T]` or `[B|1, T]` absolute positions.
    base: wavelength base of the rotation frequencies.

  Returns:
    `[B, T, N, H]` in the dtype of x (rotated in float32).
  """
  if not hasattr(x, "ndim") or x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H], got shape {getattr(x, 'shape', type(x).__name__)}")
  if x.shape[-1] % 2:
    raise ValueError(f"rotary embedding needs an even head dim, got {x.shape=}")
  if not base > 0:
    raise ValueError(f"base must be positive, got {base=}")
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  if positions.ndim != 2 or positions.shape[1] != x.shape[1] or positions.shape[0] not in (1, x.shape[0]):
    raise ValueError(f"positions must be [T] or [B|1, T] for {x.shape=}, got {positions.shape=}")
  half = x.shape[-1] // 2
  # [H/2]
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  # [B|1, T, 1, H/2]
  angle = (positions.astype(jnp.float32)[..., None] * freq[None, None])[:, :, None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
