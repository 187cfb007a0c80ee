"""LSH attention (Reformer: Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", sec. 2).

Shared-QK attention: one projection `x` per token serves as its query and,
unit-normalised, as its key, so the logit of query t and key s is
`(x_t . x_s / |x_s|) * scale`. Each hash round r draws the bucket of every token
as `argmax([x R_r ; -x R_r])` (random rotations `R_r: [H, num_buckets / 2]`,
angular LSH, sec. 2, "Locality sensitive hashing"), sorts the tokens by (bucket, position),
cuts the sorted order into chunks of `chunk_size` and lets each chunk attend to
itself and to the chunk before it. Choices, all shared by the reference:

- Wrap-around: the first chunk's previous chunk is the last one, as in the
  paper. With a single chunk (`chunk_size >= T`) a chunk attends to itself only,
  so no key is seen twice in one round.
- A query attends to every key in its window, subject to `is_causal`, `mask`
  and `segment_ids`, all by ORIGINAL positions. Keys of other buckets that fall
  in the window are attended to as well (the paper's formulation masks them;
  here the window is the unit of attention, and the reference agrees).
- Self: a query never attends to itself while any other key is live for it in
  any round; when none is, its output is its own value (the limit of the
  paper's large negative self logit, exact here). A query whose own position is
  masked too (no live key at all) returns 0 with 0 gradient.
- Rounds combine by the softmax of their log-sum-exps, and a key seen in n of a
  query's windows (over all rounds) has each of its logits reduced by log n
  (sec. 2, "Multi-round LSH attention"): together the rounds compute ONE
  softmax over the union of the query's windows, each key counted once. The
  reference is exactly that dense softmax.

Causality caveat: masking is by positions, so no value or key of a later token
reaches an earlier output; but the sort is global, so WHICH earlier keys share
an earlier query's chunk can depend on the buckets of later tokens (how many of
them sort before it). Later tokens leak through their bucket assignment only:
changes to them that keep their buckets (values; keys rescaled, or moved within
their buckets) leave earlier outputs unchanged. With one chunk (`chunk_size >= T`)
the attention is exactly causal.

Cost per head and round: O(T log T) for the sort, O(T * c * H) for the chunked
logits and O(T * c * R) for the duplicate counts (c = chunk_size, R rounds);
memory O(R * T * (c + H)) per head, never a `[T, T]` array.

Einsum alphabet: b batch, n heads, r rounds, u chunks, i queries of a chunk,
j keys of a chunk's window (2c, or c with one chunk), t time, h head dim,
k half the number of buckets.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attention import _checks
from efficient_attention._masking import dense_mask
from pallas.common import safe_divide


def lsh_rotations(
    key: jax.Array, head_dim: int, *, num_buckets: int, num_hashes: int, dtype: Any = jnp.float32
) -> jax.Array:
  """Random rotations `[num_hashes, H, num_buckets // 2]` (independent standard Gaussians), one per hash round.

  Shared by every batch element and head. A redraw is a call with a new key.
  """
  _check_hash_options(num_buckets, num_hashes)
  if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
    raise ValueError(f"head_dim must be a positive int, got {head_dim=!r}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating point, got {dtype=}")
  return jax.random.normal(key, (num_hashes, head_dim, num_buckets // 2), dtype)


def lsh_buckets(qk: jax.Array, rotations: jax.Array) -> jax.Array:
  """int32 `[B, T, N, R]`: the bucket `argmax([x R_r ; -x R_r])` of every token, head and round.

  Computed in float32 (or wider) from `stop_gradient(qk)`; buckets carry no gradient.
  """
  if not hasattr(qk, "ndim") or qk.ndim != 4:
    raise ValueError(f"qk must be [B, T, N, H], got {getattr(qk, 'shape', type(qk).__name__)}")
  _check_rotations(rotations, qk.shape[-1])
  acc = jnp.promote_types(qk.dtype, jnp.float32)
  x = jax.lax.stop_gradient(qk).astype(acc)
  # [B, T, N, R, K]
  proj = jnp.einsum("btnh,rhk->btnrk", x, rotations.astype(acc))
  return jnp.argmax(jnp.concatenate([proj, -proj], axis=-1), axis=-1).astype(jnp.int32)


def lsh_attention(
    qk: jax.Array,
    v: jax.Array,
    rotations: jax.Array,
    *,
    chunk_size: int,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Reformer's shared-QK LSH attention: sorted hash buckets, chunked, several rounds.

  Args:
    qk: `[B, T, N, H]`, the shared query/key projection; keys are `qk / |qk|`.
    v: `[B, T, K, Hv]` values, `N % K == 0` (K < N: value heads shared by groups).
    rotations: `[R, H, num_buckets // 2]` from `lsh_rotations`, shared by every
      batch element and head; R = number of hash rounds.
    chunk_size: c, sorted tokens per chunk (static); each chunk attends to itself
      and the previous chunk (wrapping around). Any T: the sorted order is padded
      to whole chunks, and padding is never attended to. `chunk_size >= T` is
      exact shared-QK attention.
    is_causal: query t attends keys s <= t (by original position).
    mask: optional bool `[B|1, N|1, T|1, T|1]`, True = attend, looked up at the
      original positions of each (query, key) pair in a window.
    segment_ids: optional int `[B, T]` (one array: queries and keys are the same
      tokens); attend only within equal ids.
    scale: logit scale, default `H**-0.5`.
    bias: not supported; must be None.
    implementation: None or "xla" (pure JAX; there is no kernel).

  Returns:
    `[B, T, N, Hv]` in the input dtype (accumulated in float32). A query attends
    to itself only when no other key is live for it (then it returns its own
    value); with no live key at all it returns 0 with 0 gradient.
  """
  family = "lsh_attention"
  dims = _check_inputs(qk, v)
  _checks.check_implementation(implementation, ("xla",), family=family)
  _checks.reject(family, bias=bias)
  _check_rotations(rotations, dims.head_dim)
  _check_chunk_size(chunk_size)
  mask = _checks.check_mask(mask, dims)
  ids = _check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  _checks.check_causal(is_causal, dims, family=family)
  if dims.q_len == 0:
    return jnp.zeros((dims.batch, 0, dims.num_heads, dims.v_head_dim), qk.dtype)
  return _lsh_attention(qk, v, rotations, mask, ids, chunk_size=chunk_size, is_causal=is_causal, scale=scale,
                        dims=dims)


@functools.partial(jax.jit, static_argnames=("chunk_size", "is_causal", "scale", "dims"))
def _lsh_attention(qk, v, rotations, mask, ids, *, chunk_size, is_causal, scale, dims):
  b, t, n, _ = qk.shape
  acc = jnp.promote_types(qk.dtype, jnp.float32)
  c = min(chunk_size, t)
  num_chunks = -(-t // c)
  padded = num_chunks * c
  # [B, N, R, T]: padded positions get bucket num_buckets, so they sort after every token.
  buckets = jnp.moveaxis(lsh_buckets(qk, rotations), 1, -1)
  buckets = jnp.pad(buckets, ((0, 0), (0, 0), (0, 0), (0, padded - t)), constant_values=2 * rotations.shape[-1])
  perm = jax.lax.stop_gradient(jnp.argsort(buckets, axis=-1, stable=True))  # sorted slot -> original position
  inverse = jnp.argsort(perm, axis=-1)  # original position -> sorted slot

  # [B, N, T, H]; a key dead for every query is zeroed, so garbage there never reaches a sum or a gradient.
  x = jnp.swapaxes(qk.astype(acc), 1, 2)
  vals = jnp.swapaxes(jnp.repeat(v, dims.group, axis=2).astype(acc), 1, 2)
  if mask is not None:
    # [B|1, N|1, T, 1]
    key_used = jnp.any(jnp.broadcast_to(mask, mask.shape[:3] + (t,)), axis=2)[..., None]
    keys, vals = jnp.where(key_used, x, 0.0), jnp.where(key_used, vals, 0.0)
  else:
    keys = x
  keys = keys * _safe_rsqrt(jnp.sum(keys * keys, axis=-1, keepdims=True))
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, padded - t), (0, 0)))
  x, keys, vals = pad(x), pad(keys), pad(vals)

  def sort(a):
    """`[B, N|1, Tp, ...]` -> `[B, N, R, U, c, ...]`: each round's sorted order, in chunks."""
    bi = jnp.arange(b)[:, None, None, None]
    ni = jnp.arange(n)[None, :, None, None] if a.shape[1] > 1 else 0
    out = a[bi, ni, perm]
    return out.reshape(out.shape[:3] + (num_chunks, c) + out.shape[4:])

  def window(a):
    """Chunks `[B, N, R, U, c, ...]` -> each chunk's window: itself, then the previous chunk (wrapping)."""
    if num_chunks == 1:
      return a
    return jnp.concatenate([a, jnp.roll(a, 1, axis=3)], axis=4)

  # Positions: queries [B, N, R, U, c, 1], keys [B, N, R, U, 1, W].
  pos_q = perm.reshape(perm.shape[:3] + (num_chunks, c))
  pos_k = window(pos_q)
  pos_q, pos_k = pos_q[..., :, None], pos_k[..., None, :]
  live = (pos_k < t) & (pos_k != pos_q)
  if is_causal:
    live &= pos_k <= pos_q
  if ids is not None:
    # [B, 1, Tp]
    ids_p = jnp.pad(ids, ((0, 0), (0, padded - t)))[:, None, :, None]
    ids_q = sort(ids_p)[..., 0]
    live &= ids_q[..., :, None] == window(ids_q)[..., None, :]
  if mask is not None:
    live &= _lookup(mask, jnp.minimum(pos_q, t - 1), jnp.minimum(pos_k, t - 1), b, n)

  # Duplicates: in how many windows of all rounds each (query, key) pair meets (sec. 2, "Multi-round LSH attention").
  rounds = rotations.shape[0]
  if num_chunks <= 2:
    count = jnp.full((), float(rounds), acc)  # every window holds every key
  else:
    # [B, N, R, U, c, R']: the chunk of each sorted token in every round r'.
    chunk_of = sort(jnp.swapaxes(inverse // c, -1, -2))
    chunk_k = window(chunk_of)
    count = 0
    for r in range(rounds):
      gap = (chunk_of[..., :, None, r] - chunk_k[..., None, :, r]) % num_chunks
      count += ((gap == 0) | (gap == 1)).astype(acc)

  # [B, N, R, U, c, W]
  logits = jnp.einsum("bnruih,bnrujh->bnruij", sort(x), window(sort(keys))) * scale
  m = jnp.max(jnp.where(live, logits, -jnp.inf), axis=-1)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(live, jnp.exp(jnp.where(live, logits, m[..., None]) - m[..., None]) / count, 0.0)
  # Per round, in sorted order: sums [B, N, R, U, c], weighted values [B, N, R, U, c, Hv].
  total = jnp.sum(p, axis=-1)
  weighted = jnp.einsum("bnruij,bnrujh->bnruih", p, window(sort(vals)))

  def unsort(a):
    """`[B, N, R, U, c, ...]` in sorted order -> `[B, N, R, Tp, ...]` in original order."""
    a = a.reshape(a.shape[:3] + (padded,) + a.shape[5:])
    return jnp.take_along_axis(a, inverse.reshape(inverse.shape + (1,) * (a.ndim - 4)), axis=3)

  total, m, weighted = unsort(total), unsort(m), unsort(weighted)
  # Rounds combine by the softmax of their log-sum-exps: weights exp(m_r - max_r m_r) on the sums.
  m = jnp.where(total > 0, m, -jnp.inf)
  top = jnp.max(m, axis=2, keepdims=True)
  scale_r = jnp.exp(m - jnp.where(jnp.isfinite(top), top, 0.0))
  den = jnp.sum(scale_r * total, axis=2)[..., None]
  out = safe_divide(jnp.sum(scale_r[..., None] * weighted, axis=2), den)[:, :, :t]
  # Nothing else live: the query's own value if it may attend to itself, else 0.
  out = jnp.where(den[:, :, :t] > 0, out, jnp.where(_self_live(mask, b, n, t)[..., None], vals[:, :, :t], 0.0))
  return jnp.swapaxes(out, 1, 2).astype(qk.dtype)


def _lookup(mask: jax.Array, pos_q: jax.Array, pos_k: jax.Array, b: int, n: int) -> jax.Array:
  """`mask[b, n, pos_q, pos_k]` for a mask `[B|1, N|1, T|1, T|1]` and positions of shape `[B, N, ...]`."""
  lead = (1,) * (pos_q.ndim - 2)
  bi = jnp.arange(b).reshape((b, 1) + lead) if mask.shape[0] > 1 else 0
  ni = jnp.arange(n).reshape((1, n) + lead) if mask.shape[1] > 1 else 0
  ti = pos_q if mask.shape[2] > 1 else 0
  si = pos_k if mask.shape[3] > 1 else 0
  return mask[bi, ni, ti, si]


def _self_live(mask: jax.Array | None, b: int, n: int, t: int) -> jax.Array:
  """bool `[B|1, N|1, T]`: whether each query may attend to itself (causality and segment ids always allow it)."""
  if mask is None:
    return jnp.ones((1, 1, t), bool)
  pos = jnp.arange(t)[None, None, :]
  return jnp.broadcast_to(_lookup(mask, pos, pos, b, n), (mask.shape[0], mask.shape[1], t))


def _safe_rsqrt(sq: jax.Array) -> jax.Array:
  """`sq**-0.5`, and 0 with 0 gradient where `sq == 0` (a zero key stays zero)."""
  positive = sq > 0
  return jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1.0)), 0.0)


def lsh_attention_reference(
    qk: jax.Array,
    v: jax.Array,
    rotations: jax.Array,
    *,
    chunk_size: int,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Dense reference in the inputs' precision (use float64 inputs under `jax.enable_x64`).

  The buckets come from `lsh_buckets` in float32, as in `lsh_attention`. From them
  it builds, per round, every token's chunk in the sorted order, and the `[B, N, T, T]`
  mask of the pairs that share a window in ANY round (same chunk, or the key's chunk
  just before the query's, wrapping around, when there is more than one chunk); then
  one softmax over those keys (each once) that pass `is_causal`, `mask` and
  `segment_ids`, the query itself excluded. Rows with no such key take their own
  value where the masks let them attend to themselves, else 0.
  """
  b, t, n, h = qk.shape
  scale = h**-0.5 if scale is None else scale
  buckets = lsh_buckets(qk.astype(jnp.float32), rotations.astype(jnp.float32))
  c = min(chunk_size, t)
  num_chunks = -(-t // c)
  # [B, T, N, R]: each token's sorted slot, hence chunk, per round.
  chunk = jnp.argsort(jnp.argsort(buckets, axis=1, stable=True), axis=1) // c
  cq, ck = chunk[:, :, None], chunk[:, None, :]
  shared = cq == ck
  if num_chunks > 1:
    shared |= ck == (cq - 1) % num_chunks
  # [B, N, T, S]
  union = jnp.transpose(jnp.any(shared, axis=-1), (0, 3, 1, 2))
  ids = None if segment_ids is None else (segment_ids, segment_ids)
  masks = dense_mask(t, t, is_causal=is_causal, mask=mask, segment_ids=ids)
  masks = jnp.ones((1, 1, t, t), bool) if masks is None else jnp.broadcast_to(masks, masks.shape[:2] + (t, t))
  other = masks & union & ~jnp.eye(t, dtype=bool)[None, None]
  self_live = jnp.diagonal(masks, axis1=-2, axis2=-1)  # [B|1, N|1, T]
  keys = qk * _safe_rsqrt(jnp.sum(qk * qk, axis=-1, keepdims=True))
  vals = jnp.repeat(v, n // v.shape[2], axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", qk, keys) * scale
  m = jnp.max(jnp.where(other, logits, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(other, jnp.exp(jnp.where(other, logits, m) - m), 0.0)
  den = jnp.sum(p, axis=-1)[..., None]
  out = safe_divide(jnp.einsum("bnts,bsnh->bnth", p, vals), den)
  own = jnp.where(self_live[..., None], jnp.swapaxes(vals, 1, 2), 0.0)
  return jnp.swapaxes(jnp.where(den > 0, out, own), 1, 2)


# Checks.


def _check_inputs(qk: Any, v: Any) -> _checks.Dims:
  for name, x in (("qk", qk), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [B, T, N, H], got {name}.shape={x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
  if qk.dtype != v.dtype:
    raise TypeError(f"qk and v must share a dtype, got {qk.dtype=}, {v.dtype=}")
  if qk.shape[:2] != v.shape[:2]:
    raise ValueError(f"qk and v must agree on [B, T] (shared-QK attention is self-attention), got {qk.shape=} and "
                     f"{v.shape=}")
  if qk.shape[2] % v.shape[2]:
    raise ValueError(f"qk heads must be a multiple of v heads: {qk.shape[2]=} % {v.shape[2]=} != 0")
  b, t, n, h = qk.shape
  return _checks.Dims(batch=b, q_len=t, kv_len=t, num_heads=n, num_kv_heads=v.shape[2], head_dim=h,
                      v_head_dim=v.shape[3])


def _check_rotations(rotations: Any, head_dim: int) -> None:
  if not hasattr(rotations, "shape") or not hasattr(rotations, "dtype"):
    raise TypeError(f"rotations must be an array [num_hashes, H, num_buckets // 2], got {type(rotations).__name__}")
  if not jnp.issubdtype(rotations.dtype, jnp.floating):
    raise TypeError(f"rotations must be floating point, got {rotations.dtype=}")
  if rotations.ndim != 3 or rotations.shape[1] != head_dim or 0 in rotations.shape:
    raise ValueError(f"rotations must be [num_hashes, H, num_buckets // 2] with H = {head_dim} (the qk head dim) "
                     f"and no empty axis, got {rotations.shape=}")


def _check_hash_options(num_buckets: Any, num_hashes: Any) -> None:
  if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 2 or num_buckets % 2:
    raise ValueError(f"num_buckets must be an even int >= 2 (buckets come in +/- pairs), got {num_buckets=!r}")
  if isinstance(num_hashes, bool) or not isinstance(num_hashes, int) or num_hashes < 1:
    raise ValueError(f"num_hashes must be a positive int, got {num_hashes=!r}")


def _check_chunk_size(chunk_size: Any) -> None:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size=!r}")


def _check_segment_ids(segment_ids: Any, dims: _checks.Dims) -> jax.Array | None:
  if isinstance(segment_ids, (tuple, list)):
    raise ValueError(f"lsh_attention takes one segment_ids array [B, T]: queries and keys are the same tokens "
                     f"(shared QK); got a {type(segment_ids).__name__} of {len(segment_ids)}")
  ids = _checks.check_segment_ids(segment_ids, dims)
  return None if ids is None else ids[0]
