"""What the kernels share with the attention families: the input checks of the shared
contract, the dense mask of `is_causal` / `mask` / `segment_ids`, segment runs, and the
division that gives 0 (with 0 gradient) where nothing was attended to.

Every check runs on static shapes and dtypes, so it raises the same way with or
without `jax.jit`, before any tracing-time surprise. Messages name the values.

No kernel here: checks and numerics the kernels and the families share.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp


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
  for name, size in (("q/k head dim H", q.shape[3]), ("v head dim Hv", v.shape[3]), ("query heads N", q.shape[2]),
                     ("key/value heads K", k.shape[2])):
    if size == 0:
      raise ValueError(f"{name} must be positive, got {q.shape=}, {k.shape=}, {v.shape=}")
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
  """Returns the logit scale as a Python float, `H**-0.5` by default.

  A Python or numpy real or a concrete 0-d array is taken; a traced value is not (the
  scale is a static option). It must be finite and positive: an infinite scale makes
  every logit infinite and the output NaN.
  """
  if scale is None:
    return dims.head_dim**-0.5
  if isinstance(scale, jax.core.Tracer):
    raise TypeError(f"scale must be concrete (it is a static option), got the traced value {scale}")
  if hasattr(scale, "shape") and hasattr(scale, "dtype") and scale.shape == () and (
      jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)):
    scale = scale.item()
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise TypeError(f"scale must be a real number (a static option), got {scale!r}")
  scale = float(scale)
  if not (scale > 0 and math.isfinite(scale)):
    raise ValueError(f"scale must be finite and positive, got {scale=}")
  return scale


def check_causal(is_causal: Any, dims: Dims, *, family: str, need_square: bool = False) -> bool:
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
  if is_causal and need_square and dims.q_len != dims.kv_len:
    raise ValueError(f"{family}: is_causal=True needs as many queries as keys, got T={dims.q_len}, S={dims.kv_len}")
  return is_causal


def check_shared_segment_ids(segment_ids: Any, dims: Dims, *, family: str) -> jax.Array | None:
  """One int `[B, T]` array shared by queries and keys (T == S), or None."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError(
        f"{family} takes one segment_ids array [B, T] shared by queries and keys, got a "
        f"{type(segment_ids).__name__} of {len(segment_ids)}: its prefix sums restart where the "
        "run of ids changes, which needs a single sequence of ids (packed sequences)"
    )
  if dims.q_len != dims.kv_len:
    raise ValueError(f"{family}: segment_ids need as many queries as keys, got T={dims.q_len}, S={dims.kv_len}")
  return check_segment_ids(segment_ids, dims)[0]


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """`[T, S]` lower-triangular mask, aligned top-left like `jax.nn.dot_product_attention`."""
  return jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]


def dense_mask(
    q_len: int,
    kv_len: int,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array | None:
  """Combines the three masking options into one bool `[B|1, N|1, T, S]` (None if all unset)."""
  out = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if is_causal:
    out = conj(out, causal_mask(q_len, kv_len)[None, None])
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids
    # [B, 1, T, S]
    out = conj(out, (q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
  if mask is not None:
    out = conj(out, mask)
  if out is not None and out.shape[-2:] != (q_len, kv_len):
    out = jnp.broadcast_to(out, out.shape[:-2] + (q_len, kv_len))
  return out


def carry_ids_over_masked(ids: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Segment ids `[B, T]` (shared by queries and keys) where each position no query attends takes
  the id of the last attended position before it, so the ids found there never start or end a run.

  For the families whose segments are runs of equal ids (linear, FAVOR+): a masked position may
  hold any id. Masked positions before the first attended one take the id at position 0 (only
  masked keys lie before them).
  """
  if mask is None:
    return ids
  # [B|1, S|1] -> [B, T]: positions some query (of some head) attends.
  live = jnp.broadcast_to(jnp.any(mask, axis=(1, 2)), ids.shape)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  source = jax.lax.cummax(jnp.where(live, pos, 0), axis=1)
  return jnp.take_along_axis(ids, source, axis=1)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
  """bool `[B, T]`: True where a new run of equal ids begins (always at t = 0)."""
  first = jnp.ones(segment_ids.shape[:1] + (1,), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def run_labels(ids: jax.Array) -> jax.Array:
  """int `[B, T]`: the index of each position's run of equal ids (a new label per run)."""
  return jnp.cumsum(segment_starts(ids).astype(jnp.int32), axis=1)


def attended_runs(ids: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
  """Run labels `[B, T]` of the segment ids after `carry_ids_over_masked` (None without ids): the
  segments of the families whose runs of equal ids are read by position (linear, FAVOR+, gated)."""
  return None if ids is None else run_labels(carry_ids_over_masked(ids, mask))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den`, and 0 with 0 gradient where `den == 0` (a `where` on both sides)."""
  empty = den == 0
  return jnp.where(empty, 0.0, num / jnp.where(empty, 1.0, den))


def int32_segment_ids(q_ids: jax.Array, kv_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Query and key segment ids `[B, T]`, `[B, S]` as int32, with the same equalities.

  Ids that int32 holds are cast; wider ones (int64 or uint32, e.g. under
  `jax_enable_x64`) are relabelled by `dense_segment_ids`, since casting would
  wrap distinct ids (0 and 2**32) onto one.
  """
  if jnp.can_cast(q_ids.dtype, jnp.int32) and jnp.can_cast(kv_ids.dtype, jnp.int32):
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
  return dense_segment_ids(q_ids, kv_ids)


def dense_segment_ids(q_ids: jax.Array, kv_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int32 `[B, T]`, `[B, S]` labels `0..T+S-1`: each id's rank among the distinct ids of its batch row.

  Two positions of a row (query or key) get the same label exactly when their ids
  are equal, whatever the ids' dtype, so attention "within equal ids" is unchanged.
  """
  wide = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
  if not jnp.issubdtype(wide, jnp.integer):
    raise TypeError(f"segment ids of dtypes {q_ids.dtype} and {kv_ids.dtype} have no common integer type")
  both = jnp.concatenate([q_ids.astype(wide), kv_ids.astype(wide)], axis=1)
  # [B, T + S]: sort each row, count the distinct ids before each position, scatter back.
  order = jnp.argsort(both, axis=1)
  ordered = jnp.take_along_axis(both, order, axis=1)
  changes = jnp.concatenate([jnp.zeros_like(ordered[:, :1], jnp.int32),
                             (ordered[:, 1:] != ordered[:, :-1]).astype(jnp.int32)], axis=1)
  rows = jnp.arange(both.shape[0])[:, None]
  labels = jnp.zeros(both.shape, jnp.int32).at[rows, order].set(jnp.cumsum(changes, axis=1))
  return labels[:, :q_ids.shape[1]], labels[:, q_ids.shape[1]:]


def empty_output(q: jax.Array, dims: Dims) -> jax.Array | None:
  """Zeros `[B, T, N, Hv]` in q's dtype when there is nothing to compute (B, T or S is 0), else None.

  With no key (S = 0) every query row has nothing to attend to, so it is 0 (with
  0 gradient), as for a fully masked row; with no query (T = 0) or no batch row
  (B = 0) the output is empty.
  """
  if dims.batch and dims.q_len and dims.kv_len:
    return None
  return jnp.zeros((dims.batch, dims.q_len, dims.num_heads, dims.v_head_dim), q.dtype)
