"""Turning `is_causal`, `mask` and `segment_ids` into one dense boolean mask.

The dense mask is what exact attention and every fp32/fp64 reference use; the
approximate families derive cheaper forms of the same rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The families and the LM use these from here.
from pallas.common import attended_runs, carry_ids_over_masked, dense_mask, int32_segment_ids, run_labels, segment_starts  # noqa: F401


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
  # int32 ids keep every equality (wider ones are relabelled densely, never cast).
  q_ids, kv_ids = int32_segment_ids(*segment_ids)
  # The padded keys' own ids may be anything: they are replaced by one that no query has.
  return q_ids, jnp.where(live, kv_ids, id_outside(q_ids))


def drop_masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                dims) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v with what `mask` removes set to 0 by a `where`, so garbage there (NaN, inf) cannot leak.

  A product with a zero weight still spreads a NaN (0 * NaN = NaN), in the forward sums and in
  every gradient contraction, so masked entries are replaced before any math, not multiplied away:
  - keys no query attends (mask False along the whole T axis, for every query head of the
    key/value head's group): their k and v become 0, and so does their gradient;
  - query rows with nothing to attend to (mask False along the whole S axis): their q becomes 0
    (their output is 0 anyway), and so does their gradient;
  - in self-attention (T == S) under a key-padding mask `[B|1, N|1, 1, S]`, a padded position is
    padding for its query too, but its row still attends the live keys (the mask's broadcast
    meaning): its output is computed as before, except that non-finite entries of its query are
    read as 0, so they cannot reach other rows' gradients through a zero cotangent.
  Nothing is added without a mask. k/v `where`s and the q `where` are elementwise and fuse into
  the producers or consumers of q, k, v.
  """
  if mask is None:
    return q, k, v
  # [B|1, N|1, S|1]: keys some query attends.
  key_live = jnp.any(mask, axis=2)
  if key_live.shape[1] != 1:
    key_live = jnp.any(key_live.reshape(key_live.shape[0], dims.num_kv_heads, dims.group, key_live.shape[2]), axis=2)
  # [B|1, S|1, K|1, 1]
  key_live = key_live.transpose(0, 2, 1)[..., None]
  k = jnp.where(key_live, k, jnp.zeros((), k.dtype))
  v = jnp.where(key_live, v, jnp.zeros((), v.dtype))
  # [B|1, T|1, N|1, 1]: query rows with a live key.
  keep_q = jnp.any(mask, axis=3).transpose(0, 2, 1)[..., None]
  if mask.shape[2] == 1 and mask.shape[3] == dims.kv_len == dims.q_len:
    # [B|1, T, N|1, 1]: the key-padding mask read at query positions.
    padded = ~mask[:, :, 0, :].transpose(0, 2, 1)[..., None]
    keep_q = keep_q & ~(padded & ~jnp.isfinite(q))
  q = jnp.where(keep_q, q, jnp.zeros((), q.dtype))
  return q, k, v


def id_outside(q_ids: jax.Array) -> jax.Array:
  """An int32 scalar that no entry of `q_ids` (int32) equals, whatever ids they hold (no overflow)."""
  info = jnp.iinfo(jnp.int32)
  if q_ids.size == 0:
    return jnp.int32(0)
  lo, hi = jnp.min(q_ids), jnp.max(q_ids)
  if q_ids.size == 1:
    return jnp.where(lo > info.min, lo - 1, hi + 1)

  def first_gap():
    # Both extremes are taken: a gap between sorted neighbours exists (fewer than 2**32 ids).
    ids = jnp.sort(q_ids.ravel())
    cur, nxt = ids[:-1], ids[1:]
    gap = (cur != nxt) & (cur + 1 != nxt)  # cur < nxt <= max, so cur + 1 cannot overflow
    return cur[jnp.argmax(gap)] + 1

  def below_or_above():
    return jnp.where(lo > info.min, lo - 1, hi + 1)

  return jax.lax.cond((lo == info.min) & (hi == info.max), first_gap, below_or_above)


def zero_nonfinite_padding(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Self-attention input x `[B, T, ...]` with its non-finite entries at positions no query attends
  (mask `[B|1, N|1, T|1, T]` False along N and T) read as 0; x itself where no such mask is given.

  The projections' weight gradients sum x over every position (`x^T dq`), so a NaN or inf left in
  a padded position would reach them through a zero cotangent. Finite entries are kept, so
  padded rows compute as before. A mask of any other shape is left to the family's checks.
  """
  if (mask is None or getattr(mask, "dtype", None) != jnp.bool_ or getattr(mask, "ndim", 0) != 4
      or mask.shape[3] != x.shape[1] or mask.shape[0] not in (1, x.shape[0])):
    return x
  # [B|1, T, 1, ...]
  padded = ~jnp.any(mask, axis=(1, 2)).reshape(mask.shape[0], x.shape[1], *(1,) * (x.ndim - 2))
  return jnp.where(padded & ~jnp.isfinite(x), jnp.zeros((), x.dtype), x)
