"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet): chunked, and step by step.

Per batch row and key/value head a state `S [H, Hv]` is written by every step
(Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", eq. 1; Yang, Kautz & Hatamizadeh 2024, "Gated
Delta Networks", eq. 10):

  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale q_t S_t

The step writes `v_t` at key `k_t` after removing a `beta_t` share of what the
decayed state already held there: with `u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`,
`S_t = exp(g_t) S_{t-1} + k_t u_t^T`.

Chunked parallel form (DeltaNet paper, sec. 3.2; Gated DeltaNet, sec. 3.3). Within a
chunk of C steps t = 1..C entered with state `S_0`, let `L[t, s] = sum_{s < i <= t} g_i`
(s <= t, a segment sum: never a difference of large cumulative sums, and never
positive), `D[t, s] = exp(L[t, s])` and `gamma_t = exp(g_1 + ... + g_t)`. Unrolling the
recurrence gives `(I + A) U = diag(beta) V - diag(beta gamma) K S_0` with A strictly
lower, `A[t, s] = beta_t D[t, s] (k_t . k_s)`; so, with the UT transform
`T = (I + A)^{-1} diag(beta)` (one unit-lower inverse, `unit_lower_inverse`), `W = T (gamma K)` and
`U~ = T V` (the WY representation),

  U   = U~ - W S_0                                  pseudo-values   [C, Hv]
  O   = scale ((gamma Q) S_0 + (D * Q K^T) U)       outputs (D lower, diagonal included)
  S_C = gamma_C S_0 + (D[C, :] K)^T U               state handed to the next chunk

Everything but the three lines above is computed for all chunks at once; the lines
run as a `lax.scan` over chunks carrying the float32 state `[B, K, H, Hv]`.

Options:
- `segment_ids` restart the state at each new run of equal ids (nothing crosses a
  segment boundary): decays between steps of different runs are 0.
- a key-padding `mask` makes a masked step the identity (beta = 0, gate = 0): the
  state passes through unchanged; its query still reads the state. k, v, beta and
  gates of masked steps are replaced (`jnp.where`) before any arithmetic, so
  NaN / inf there reaches neither outputs nor gradients.

Einsum alphabet: B batch, T time, N query heads, K key/value heads, G = N / K query
heads per key/value head, H head dim of q and k, V head dim of v (Hv), U chunks,
C and D positions in a chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention import _checks
from efficient_attention._linear import check_chunk_size, check_step_inputs
from pallas import gated
from pallas.common import segment_starts

# Steps per chunk when chunk_size is None.
DEFAULT_CHUNK_SIZE = 64
# qk_norm divides by sqrt(|x|^2 + QK_NORM_EPS): finite value and gradient at x = 0.
QK_NORM_EPS = 1e-6


class DeltaRuleState(NamedTuple):
  """Recurrent state of the delta rule for decoding."""

  s: jax.Array  # float32 [B, K, H, Hv]


def init_delta_rule_state(batch: int, num_kv_heads: int, head_dim: int, v_head_dim: int) -> DeltaRuleState:
  """Empty (zero) state `s [B, K, H, Hv]` for `delta_rule_step`."""
  sizes = dict(batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim, v_head_dim=v_head_dim)
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"init_delta_rule_state: {name} must be a positive int, got {name}={size!r}")
  return DeltaRuleState(s=jnp.zeros((batch, num_kv_heads, head_dim, v_head_dim), jnp.float32))


def delta_rule_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    gates: jax.Array | None = None,
    scale: float | None = None,
    qk_norm: bool = True,
    is_causal: bool = True,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """The (gated) delta rule over a sequence, in chunked parallel (WY) form.

  `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale q_t S_t`,
  from `S_0 = 0`, one state `[H, Hv]` per batch row and key/value head; the query
  heads of a GQA group read their key/value head's state.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, T, K, H]` keys, `N % K == 0`.
    v: `[B, T, K, Hv]` values.
    beta: `[B, T, K]` write strengths in [0, 1] (0: the step only decays the state;
      1: the value at `k_t` is replaced). Any floating dtype.
    gates: optional `[B, T, K]` log forget gates `g_t <= 0` (Gated DeltaNet), finite;
      None = 0 (plain DeltaNet).
    scale: output scale, default `H**-0.5`; a positive finite Python float.
    qk_norm: divide q and k by their L2 norm (per head vector, `sqrt(|x|^2 + 1e-6)`)
      first, as DeltaNet does; with unit keys `I - beta k k^T` has norm <= 1.
    is_causal: the delta rule is causal by nature; only True is accepted.
    mask: optional bool key-padding mask `[B|1, N|1, 1, T]` (the shared convention
      for key masks), True = keep. A masked step is the identity on the state
      (beta and gate treated as 0; its k, v, beta, gates are never read); the
      query at that step still reads the state. A mask that differs between the
      query heads of one GQA group gives each query head its own state. Masks with
      a query axis of size T have no meaning for a recurrence and raise.
    segment_ids: optional int `[B, T]`; the state restarts from 0 at each new run
      of equal ids (an id recurring after another id starts a new segment).
    chunk_size: steps per chunk (static); None = 64. Any T works (padded with
      identity steps). "pallas": a power of two >= 16.
    implementation: None or "xla" (pure JAX), or "pallas": the per-chunk WY
      factors and the chunk recurrence in Pallas kernels (`pallas.gated.delta_rule`;
      forward and backward); float32 at most.

  Returns:
    `[B, T, N, Hv]` in q's dtype. Arithmetic and the state are float32 (float64
    inputs stay float64). Values of beta and gates are checked (range, finiteness)
    when they are concrete, i.e. outside `jax.jit`.
  """
  family = "delta_rule_attention"
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla", "pallas"), family=family)
  if dims.q_len != dims.kv_len:
    raise ValueError(f"{family}: q and k/v must share a length T (a recurrence), got {q.shape=} and {k.shape=}")
  if not _checks.check_causal(is_causal, dims, family=family):
    raise ValueError(f"{family} is causal by nature; got {is_causal=}, leave it at True")
  scale = check_finite_scale(scale, dims, family=family)
  qk_norm = check_qk_norm(qk_norm, family=family)
  chunk_size = check_chunk_size(chunk_size)
  pallas = implementation == "pallas"
  if pallas:
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
      raise ValueError(f"{family}: implementation='pallas' needs a power-of-two chunk_size >= 16, got {chunk_size=}")
    if q.dtype == jnp.float64:
      raise TypeError(f"{family}: implementation='pallas' computes in float32 at most, got {q.dtype=}")
  mask = _checks.check_mask(mask, dims)
  if mask is not None and mask.shape[2] != 1:
    raise ValueError(
        f"{family} honours key-padding masks [B|1, N|1, 1, T] (a masked step leaves the state unchanged), "
        f"got {mask.shape=} with a query axis; use segment_ids for packed sequences"
    )
  ids = _checks.check_shared_segment_ids(segment_ids, dims, family=family)
  steps = (dims.batch, dims.q_len, dims.num_kv_heads)
  check_beta_gates(beta, gates, steps, "[B, T, K]", live=_live_kv_steps(mask, dims), family=family)
  return _delta_rule_attention(
      q, k, v, beta, gates, mask, ids, scale=scale, qk_norm=qk_norm, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
      dims=dims, pallas=pallas,
  )


@functools.partial(jax.jit, static_argnames=("scale", "qk_norm", "chunk_size", "dims", "pallas"))
def _delta_rule_attention(q, k, v, beta, gates, mask, ids, *, scale, qk_norm, chunk_size, dims, pallas=False):
  out_dtype = q.dtype
  acc = jnp.promote_types(q.dtype, jnp.float32)
  q, k, v, beta = (x.astype(acc) for x in (q, k, v, beta))
  gates = jnp.zeros_like(beta) if gates is None else gates.astype(acc)
  kh, g = dims.num_kv_heads, dims.group
  if mask is not None:
    # [B|1, T, N|1]
    live = jnp.broadcast_to(mask[:, :, 0, :], mask.shape[:2] + (dims.kv_len,)).transpose(0, 2, 1)
    if live.shape[2] != 1 and g > 1:
      # Step sets differ within a GQA group: one state per query head.
      k, v, beta, gates = (jnp.repeat(x, g, axis=2) for x in (k, v, beta, gates))
      kh, g = dims.num_heads, 1
    # Masked steps are identity steps; their inputs are never read.
    k, v = (jnp.where(live[..., None], x, 0.0) for x in (k, v))
    beta, gates = (jnp.where(live, x, 0.0) for x in (beta, gates))
  if qk_norm:
    q, k = l2_normalize(q), l2_normalize(k)
  b, t = dims.batch, dims.q_len
  if pallas:
    return _pallas(q * scale, k, v, beta, gates, ids, chunk_size=chunk_size, dtype=out_dtype)
  starts = None if ids is None else segment_starts(ids)
  q = (q * scale).reshape(b, t, kh, g, dims.head_dim)
  out = chunked_delta_rule(q, k, v, beta, gates, starts, chunk_size=chunk_size)
  return out.reshape(b, t, dims.num_heads, dims.v_head_dim).astype(out_dtype)


def _pallas(q, k, v, beta, gates, ids, *, chunk_size, dtype):
  """The chunked form through the Pallas kernels (`pallas.gated.delta_rule`): the per-chunk WY
  factors and the chunk recurrence, q, k, v in the input dtype, beta and the gates in float32,
  the state and the factors' solve in float32. `[B, T, N, V]` in `dtype`."""
  blocks = gated.GatedBlockSizes.get_default(dtype, chunk_size)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  return gated.delta_rule(q, k, v, beta, gates, segment_ids=ids, block_sizes=blocks)


def delta_rule_step(
    state: DeltaRuleState,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    beta_t: jax.Array,
    *,
    gates_t: jax.Array | None = None,
    mask_t: jax.Array | None = None,
    scale: float | None = None,
    qk_norm: bool = True,
) -> tuple[DeltaRuleState, jax.Array]:
  """One decoding step of the delta rule in O(1) memory; stepping equals `delta_rule_attention`.

  Args:
    state: from `init_delta_rule_state(B, K, H, Hv)` or a previous step. To start a
      new segment, pass a fresh state (or zero rows of `state.s`).
    q_t: `[B, N, H]` query of this step.
    k_t: `[B, K, H]` key.
    v_t: `[B, K, Hv]` value.
    beta_t: `[B, K]` write strength in [0, 1].
    gates_t: optional `[B, K]` log forget gate <= 0.
    mask_t: optional bool `[B]`; False makes this step the identity on the state
      (as a masked key in `delta_rule_attention`); the query still reads it.
    scale, qk_norm: as in `delta_rule_attention`.

  Returns:
    The new state and the output `[B, N, Hv]` in q_t's dtype.
  """
  family = "delta_rule_step"
  dims = check_step_inputs(q_t, k_t, v_t, family=family)
  scale = check_finite_scale(scale, dims, family=family)
  qk_norm = check_qk_norm(qk_norm, family=family)
  want = (dims.batch, dims.num_kv_heads, dims.head_dim, dims.v_head_dim)
  if not isinstance(state, DeltaRuleState):
    raise TypeError(f"{family}: state must be a DeltaRuleState from init_delta_rule_state, got {type(state).__name__}")
  if state.s.shape != want or state.s.dtype != jnp.float32:
    raise ValueError(
        f"{family}: state.s is {state.s.dtype}{list(state.s.shape)}, expected float32{list(want)} for [B, K, H, Hv]"
    )
  if mask_t is not None:
    if not hasattr(mask_t, "dtype") or mask_t.dtype != jnp.bool_ or mask_t.shape != (dims.batch,):
      raise ValueError(
          f"{family}: mask_t must be bool [B]=({dims.batch},), got "
          f"{getattr(mask_t, 'dtype', type(mask_t))}{list(getattr(mask_t, 'shape', ()))}"
      )
  live = None if mask_t is None else mask_t[:, None]
  check_beta_gates(beta_t, gates_t, (dims.batch, dims.num_kv_heads), "[B, K]", live=live, family=family,
                   names=("beta_t", "gates_t"))
  return _delta_rule_step(state, q_t, k_t, v_t, beta_t, gates_t, mask_t, scale=scale, qk_norm=qk_norm, dims=dims)


@functools.partial(jax.jit, static_argnames=("scale", "qk_norm", "dims"))
def _delta_rule_step(state, q_t, k_t, v_t, beta_t, gates_t, mask_t, *, scale, qk_norm, dims):
  f32 = jnp.float32
  q, k, v, beta = (x.astype(f32) for x in (q_t, k_t, v_t, beta_t))
  gates = jnp.zeros_like(beta) if gates_t is None else gates_t.astype(f32)
  if mask_t is not None:
    k, v = (jnp.where(mask_t[:, None, None], x, 0.0) for x in (k, v))
    beta, gates = (jnp.where(mask_t[:, None], x, 0.0) for x in (beta, gates))
  if qk_norm:
    q, k = l2_normalize(q), l2_normalize(k)
  decay = jnp.exp(gates)[..., None, None]
  # exp(g) S: [B, K, H, V]
  s = decay * state.s
  # u = beta (v - (exp(g) S)^T k): [B, K, V]
  u = beta[..., None] * (v - jnp.einsum("bkhv,bkh->bkv", s, k))
  s = s + jnp.einsum("bkh,bkv->bkhv", k, u)
  b, n, h = q.shape
  # [B, K, G, V]
  out = jnp.einsum("bkgh,bkhv->bkgv", (q * scale).reshape(b, dims.num_kv_heads, dims.group, h), s)
  return DeltaRuleState(s=s), out.reshape(b, n, dims.v_head_dim).astype(q_t.dtype)


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x / sqrt(|x|^2 + QK_NORM_EPS)` over the last axis (finite value and gradient at 0)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + QK_NORM_EPS)


def chunked_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gates: jax.Array,
    starts: jax.Array | None,
    *,
    chunk_size: int,
) -> jax.Array:
  """The chunked WY form (module docstring): `[B, T, K, G, V]` from scaled queries.

  Args:
    q: `[B, T, K, G, H]` queries, already normalised and scaled.
    k: `[B, T, K, H]` keys. v: `[B, T, K, V]` values.
    beta: `[B, T, K]` write strengths. gates: `[B, T, K]` log gates (<= 0).
    starts: bool `[B, T]`, True where a segment begins (state restarts), or None.
    chunk_size: steps per chunk; T is padded with identity steps (beta = gate = 0).
  """
  b, t, kh, g, h = q.shape
  hv = v.shape[-1]
  if t == 0:
    return jnp.zeros((b, 0, kh, g, hv), q.dtype)
  c = min(chunk_size, t)
  u = -(-t // c)
  chunks = functools.partial(_chunks, c=c)
  qc = chunks(q).transpose(0, 1, 3, 4, 2, 5)  # [B, U, K, G, C, H]
  kc, decay, gamma, tail, u_tilde, w = chunk_terms(k, v, beta, gates, starts, c=c)
  # [B, U, K, G, C, D]: queries against the chunk's keys, decayed.
  qk = jnp.einsum("bukgch,bukdh->bukgcd", qc, kc) * decay[:, :, :, None]
  q_gamma = qc * gamma[:, :, :, None, :, None]
  k_tail = kc * tail[..., None]
  gamma_end = gamma[..., -1]  # [B, U, K]

  def chunk_step(s, xs):
    """Carries the state `s [B, K, H, V]` through one chunk."""
    u_tilde, w, q_gamma, qk, k_tail, gamma_end = xs
    # [B, K, C, V]
    pseudo = u_tilde - jnp.einsum("bkch,bkhv->bkcv", w, s)
    # [B, K, G, C, V]
    out = jnp.einsum("bkgch,bkhv->bkgcv", q_gamma, s) + jnp.einsum("bkgcd,bkdv->bkgcv", qk, pseudo)
    s = gamma_end[..., None, None] * s + jnp.einsum("bkch,bkcv->bkhv", k_tail, pseudo)
    return s, out

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u_tilde, w, q_gamma, qk, k_tail, gamma_end))
  s0 = jnp.zeros((b, kh, h, hv), q.dtype)
  _, out = jax.lax.scan(chunk_step, s0, xs)
  # [U, B, K, G, C, V] -> [B, U, C, K, G, V]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, u * c, kh, g, hv)
  return out[:, :t]


def _chunks(x: jax.Array, *, c: int) -> jax.Array:
  """`[B, T, ...]` -> `[B, U, C, ...]`, zero-padded at the end."""
  u = -(-x.shape[1] // c)
  x = jnp.pad(x, [(0, 0), (0, u * c - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(x.shape[0], u, c, *x.shape[2:])


def chunk_terms(k, v, beta, gates, starts, *, c: int):
  """Per-chunk pieces of the WY form (module docstring), all chunks at once.

  Returns head-major chunks: keys `[B, U, K, C, H]`, the decays `D [B|1, U|1, K|1, C, D]`,
  `gamma` and `tail` `[B, U, K, C]` (from the chunk's entry state to step t, and from step
  s to the chunk's end, 0 across a segment start), `U~ [B, U, K, C, V]` and `W [B, U, K, C, H]`.
  """
  hv = v.shape[-1]
  chunks = functools.partial(_chunks, c=c)
  # Head-major chunks: [B, U, K, C, H], [B, U, K, C, V], [B, U, K, C].
  kc, vc = (chunks(x).transpose(0, 1, 3, 2, 4) for x in (k, v))
  bc, gc = (chunks(x).transpose(0, 1, 3, 2) for x in (beta, gates))
  pos = np.arange(c)
  # [1, 1, 1, C, D]: s <= t and s < t.
  incl = (pos[:, None] >= pos[None, :])[None, None, None]
  strict = (pos[:, None] > pos[None, :])[None, None, None]
  # Segment sums L[t, s] = sum_{s < i <= t} g_i (t >= s), by a masked cumulative sum over i
  # (Mamba-2's segsum): exact for decays far below exp(-88), where cumulative-sum differences
  # would lose the small ones. [B, U, K, C(i -> t), D(s)]
  seg = jnp.cumsum(jnp.where(strict, gc[..., :, None], 0.0), axis=-2)
  cum = jnp.cumsum(gc, axis=-1)  # [B, U, K, C]: L[t, chunk start - 1]
  if starts is None:
    same = incl  # [1, 1, 1, C, D]
    from_start = np.ones((1, 1, c), bool)  # [B|1, U|1, C]: no restart since the chunk start
    to_end = np.ones((1, 1, c), bool)  # [B|1, U|1, D]: same segment as the chunk's last step
  else:
    # [B, U, C]: restarts so far within the chunk; equal counts = same segment.
    local = jnp.cumsum(chunks(starts).astype(jnp.int32), axis=2)
    # [B, U, 1, C, D]
    same = jnp.logical_and((local[..., :, None] == local[..., None, :])[:, :, None], incl)
    from_start = local == 0
    to_end = local == local[..., -1:]
  # Decays within a chunk, 0 where the step is later or in another segment. [B|1, U|1, K|1, C, D]
  decay = jnp.where(same, jnp.exp(jnp.where(same, seg, 0.0)), 0.0)
  # [B, U, K, C]: from the chunk's entry state to step t, and from step s to the chunk's end.
  gamma = jnp.where(from_start[:, :, None], jnp.exp(cum), 0.0)
  tail = jnp.where(to_end[:, :, None], jnp.exp(seg[..., -1, :]), 0.0)

  # A[t, s] = beta_t D[t, s] (k_t . k_s), strictly lower. [B, U, K, C, D]
  kk = jnp.einsum("bukch,bukdh->bukcd", kc, kc)
  a = jnp.where(strict, bc[..., None] * decay * kk, 0.0)
  # UT transform: (I + A) [U~ | W] = diag(beta) [V | gamma K]. [B, U, K, C, V + H]
  rhs = bc[..., None] * jnp.concatenate([vc, gamma[..., None] * kc], axis=-1)
  x = jnp.einsum("bukcd,bukdx->bukcx", unit_lower_inverse(a), rhs)
  u_tilde, w = x[..., :hv], x[..., hv:]
  return kc, decay, gamma, tail, u_tilde, w


# Checks shared by the sequence function and the step.


def check_finite_scale(scale: Any, dims: _checks.Dims, *, family: str) -> float:
  if scale is not None and isinstance(scale, (int, float)) and not isinstance(scale, bool) and not math.isfinite(scale):
    raise ValueError(f"{family}: scale must be finite, got {scale=}")
  return _checks.check_scale(scale, dims)


def check_qk_norm(qk_norm: Any, *, family: str) -> bool:
  if not isinstance(qk_norm, bool):
    raise TypeError(f"{family}: qk_norm must be a bool (it is static), got {qk_norm!r}")
  return qk_norm


def check_beta_gates(beta: Any, gates: Any, shape: tuple[int, ...], axes: str, *, live: Any, family: str,
                     names: tuple[str, str] = ("beta", "gates")) -> None:
  """Shapes and dtypes of beta and gates; their values too where every array is concrete.

  `live` is a bool array broadcasting to `shape` (None: every step counts): values
  of masked steps are never read, so they are not checked either.
  """
  for name, x in zip(names, (beta, gates)):
    if x is None and name == names[1]:
      continue
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{family}: {name} must be an array {axes}={shape}, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{family}: {name} must be floating point, got {name}.dtype={x.dtype}")
    if x.shape != shape:
      raise ValueError(f"{family}: {name}.shape={x.shape} must be {axes}={shape}")
  arrays = [x for x in (beta, gates, live) if x is not None]
  if any(isinstance(x, jax.core.Tracer) for x in arrays):
    return
  keep = np.ones(shape, bool) if live is None else np.broadcast_to(np.asarray(live), shape)
  values = np.asarray(beta, np.float64)[keep]
  bad = ~((values >= 0) & (values <= 1))
  if bad.any():
    raise ValueError(
        f"{family}: {names[0]} must lie in [0, 1] at unmasked steps, got {bad.sum()} values outside "
        f"(e.g. {float(values[bad][0])}; min {float(values.min())}, max {float(values.max())})"
    )
  if gates is not None:
    values = np.asarray(gates, np.float64)[keep]
    bad = ~(np.isfinite(values) & (values <= 0))
    if bad.any():
      raise ValueError(
          f"{family}: {names[1]} are log forget gates and must be finite and <= 0 at unmasked steps, "
          f"got {bad.sum()} values that are not (e.g. {float(values[bad][0])})"
      )


def _live_kv_steps(mask: jax.Array | None, dims: _checks.Dims) -> jax.Array | None:
  """bool `[B|1, T, K|1]`: steps some query head of the group keeps (None: all)."""
  if mask is None:
    return None
  # [B|1, N|1, T]
  live = mask[:, :, 0, :]
  if live.shape[1] != 1:
    live = jnp.any(live.reshape(live.shape[0], dims.num_kv_heads, dims.group, live.shape[2]), axis=2)
  return jnp.broadcast_to(live, live.shape[:2] + (dims.kv_len,)).transpose(0, 2, 1)


# Rows solved one by one in the diagonal blocks of `unit_lower_inverse`; larger blocks are merged.
_SOLVE_BLOCK = 16
_HIGHEST = jax.lax.Precision.HIGHEST


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """`(I + A)^{-1}` of strictly lower triangular `A [..., C, C]` (only its strictly lower part is read).

  Forward substitution, row by row, inside diagonal blocks of 16 (all blocks at once), then
  blocks merged pairwise up to C: `[[T1, 0], [A21, ...]]` gives `[[T1, 0], [-T2 A21 T1, T2]]`.
  Every product involves only blocks of the inverse itself, never powers of A: a series in A
  (`prod (I + (-A)^(2^k))`) cancels terms of 1e17 when the keys of a chunk are nearly parallel
  (A near the all-ones lower triangle) and returned errors of 1e10 where the inverse is within
  [-1, 1]. Matmuls at full float32 precision (no TF32). No triangular solve: on a CPU that is a
  LAPACK call, and inside a training step JAX 0.10.2 stalled on it. The gradient is the
  inverse's own: `dA = -T^T dT T^T`, strictly lower.
  """
  return _unit_lower_inverse(a)


def _unit_lower_inverse(a):
  c = a.shape[-1]
  n = 1 << max(0, (c - 1).bit_length())  # C rounded up to a power of two; padding A with 0 adds I
  b = min(_SOLVE_BLOCK, n)
  a = jnp.tril(a, -1)
  if n != c:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, n - c), (0, n - c)])
  lead = a.shape[:-2]
  # Diagonal blocks [..., n / b, b, b], solved row by row: T_i = e_i - A_i T (rows >= i of T still 0).
  diag = jnp.stack([a[..., i:i + b, i:i + b] for i in range(0, n, b)], axis=-3)
  eye = jnp.eye(b, dtype=a.dtype)

  def row(i, t):
    a_i = jax.lax.dynamic_index_in_dim(diag, i, axis=-2, keepdims=False)  # [..., n / b, b]
    e_i = eye[i].reshape((1,) * (a_i.ndim - 1) + (b,))
    t_i = e_i - jnp.einsum("...j,...jx->...x", a_i, t, precision=_HIGHEST)
    return jax.lax.dynamic_update_index_in_dim(t, t_i, i, axis=-2)

  t = jax.lax.fori_loop(0, b, row, jnp.zeros(diag.shape, a.dtype))
  s = b
  while s < n:
    pairs = t.reshape(lead + (n // (2 * s), 2, s, s))
    t1, t2 = pairs[..., 0, :, :], pairs[..., 1, :, :]
    # [..., n / 2s, s, s]: the block of A below each pair's first diagonal block.
    a21 = jnp.stack([a[..., i + s:i + 2 * s, i:i + s] for i in range(0, n, 2 * s)], axis=-3)
    low = -jnp.einsum("...ij,...jk,...kl->...il", t2, a21, t1, precision=_HIGHEST)
    top = jnp.concatenate([t1, jnp.zeros_like(t1)], axis=-1)
    bottom = jnp.concatenate([low, t2], axis=-1)
    t = jnp.concatenate([top, bottom], axis=-2)
    s *= 2
  return t[..., 0, :c, :c]


def _unit_lower_inverse_fwd(a):
  t = _unit_lower_inverse(a)
  return t, t


def _unit_lower_inverse_bwd(t, dt):
  da = -jnp.einsum("...ji,...jk,...lk->...il", t, dt, t, precision=_HIGHEST)
  return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)
