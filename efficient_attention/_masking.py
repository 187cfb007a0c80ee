"""Turning `is_causal`, `mask` and `segment_ids` into one dense boolean mask.

The dense mask is what exact attention and every fp32/fp64 reference use; the
approximate families derive cheaper forms of the same rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas.common import dense_mask, segment_starts  # noqa: F401  (the families and the LM use them from here)


def split_heads(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
  """A mask or bias `[B|1, N|1, T, S]` -> `[B|1, K|1, G|1, T, S]` (N = K * G query heads)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])


def padding_as_segment_ids(mask: jax.Array, segment_ids: tuple[jax.Array, jax.Array] | None, batch: int,
                           q_len: int, kv_len: int, *, what: str) -> tuple[jax.Array, jax.Array]:
  """A key-padding mask `[B|1, 1, 1, S]` folded into (q, kv) segment ids: a padded key gets an id no query has.

  For kernels that honour segment ids but no general mask; `what` names the caller in the error
  raised for any other mask shape.
  """
  if mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(f"{what} honours key-padding masks [B|1, 1, 1, S] (and is_causal, segment_ids); got "
                     f"{mask.shape=}; use implementation='xla' for per-head or per-query masks")
  live = jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))
  if segment_ids is None:
    segment_ids = (jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32))
  q_ids, kv_ids = segment_ids[0].astype(jnp.int32), segment_ids[1].astype(jnp.int32)
  outside = jnp.minimum(jnp.min(q_ids), jnp.min(kv_ids)) - 1
  return q_ids, jnp.where(live, kv_ids, outside)
