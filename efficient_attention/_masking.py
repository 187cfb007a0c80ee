"""Turning `is_causal`, `mask` and `segment_ids` into one dense boolean mask.

The dense mask is what exact attention and every fp32/fp64 reference use; the
approximate families derive cheaper forms of the same rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The families and the LM use these from here.
from pallas.common import dense_mask, dense_segment_ids, segment_starts  # noqa: F401


def split_heads(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
  """A mask or bias `[B|1, N|1, T, S]` -> `[B|1, K|1, G|1, T, S]` (N = K * G query heads)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])


def mask_infinite_bias(bias: jax.Array, mask: jax.Array | None) -> jax.Array:
  """`mask` (True = attend) and `bias != -inf`, bool `[B|1, N|1, T|1, S|1]`.

  A key whose bias is -inf gets weight 0 either way; as a masked key, a query row
  whose bias is -inf on every key is a row with nothing to attend to (0, with 0
  gradient) rather than the NaN of `softmax` over all -inf logits.
  """
  live = bias != -jnp.inf
  return live if mask is None else jnp.logical_and(mask, live)


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
    return jnp.zeros((batch, q_len), jnp.int32), jnp.where(live, 0, -1).astype(jnp.int32)
  # Dense labels are >= 0 (and int32 whatever the ids' dtype), so -1 is an id no query has.
  q_ids, kv_ids = dense_segment_ids(*segment_ids)
  return q_ids, jnp.where(live, kv_ids, -1)
