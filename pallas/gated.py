"""Chunked causal linear attention with forget gates, and the delta rule, in Pallas.

`gated_linear_attention(q, k, v, gates)` takes features `q [B, T, N, M]`,
`k [B, T, K, M]` (N % K == 0, GQA), values `v [B, T, K, Hv]` and log forget gates
(<= 0) per step, `gates [B, T, K]`, or per step and feature, `gates [B, T, K, M]`,
and returns the numerator of gated linear attention (RetNet, Mamba-2, simple GLA;
GLA with per-feature gates):

  S_t = exp(g_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t
      = sum_{s <= t, same run} exp(G_t - G_s) (q_t . k_s) v_s,   G = cumsum(g);

  per feature: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,
      o_t = sum_{s <= t, same run} sum_m q_tm k_sm exp(G_tm - G_sm) v_s.

`delta_rule_recurrence(q, k, w, u, gates)` runs the chunk recurrence of the delta
rule's WY form from the per-chunk `W` and `U~` (`delta_rule_factors` makes them, one
program per chunk: `A`, its unit lower inverse by blocked substitution in float32, two
products; `delta_rule` runs both): per chunk, with the state `S` entering it,

  U = U~ - W S,   O = (gamma Q) S + (D * Q K^T) U,   S' = gamma_C S + (D[C, :] K)^T U.

Both run as a few launches, in the layout of flash-linear-attention's chunked
kernels (Yang et al. 2024, GLA sec. 3.3 and DeltaNet sec. 3.2):

  states    one program per (batch, key/value head, block of state rows and
            columns) walks the chunks in order and writes the state entering
            each chunk `h [B, K, U, M, Hv]` (and, for the delta rule, the
            pseudo-values U); float32 state, stored in the input dtype;
  outputs   one program per (batch, query head, chunk, value block): the
            chunk's masked quadratic form plus its queries against `h`;
  dstates   the same walk backwards, per query head: the cotangent of the state
            leaving each chunk (the delta rule also writes U's cotangent);
  grads     one program per (batch, query head, chunk): dq, dk, dv (delta rule:
            dq, dk, dW, and dU~ is U's cotangent).

Inside a chunk the gates enter through their chunk-local cumulative sums, kept as
a float32 (hi, lo) pair, so every decay is the exponential of a non-positive
number (stable for any gate) and exact to about float32's precision even where
the sums reach hundreds.
The gates' gradient: each pair (t, s) of the output weighs `exp(G_t - G_s)`, so
dL/dG_t = sum_s (dA * A)_ts - sum_s' (dA * A)_s't, made per chunk by the gradient
kernel from its pair matrix and the state's reads and writes (equal to
q_t . dq_t - k_t . dk_t, but with the diagonal cancelled exactly rather than left as
rounding); dL/dg is its reverse cumulative sum, 0 at run starts.

Per-feature gates (GLA) have no `[C, C]` decay matrix: the decay of a pair differs per
feature. Their own outputs and gradient launches (the two walks only take a decay
per state row) split each chunk into sub-chunks of `sub_chunk` steps (16). Query
sub-chunk i reads the keys of the earlier sub-chunks through one product with the
reference point r = its first step: `(q_t exp(G_t - G_r)) . (k_s exp(G_r - G_s))` for
s < r <= t, both factors decays (non-positive exponents, G being non-increasing).
Its own sub-chunk's pairs are made key by key, each a `[c, M]` product
`q_t k_s exp(G_t - G_s)` summed over the features, with the exponent clamped at 0
where s > t (masked afterwards, so never inf * 0). Per feature,
dL/dG_tm = q_tm dq_tm - k_tm dk_tm, with the pairs t = s left out of both
(their decay is 1: they cancel exactly, and would leave rounding); dL/dg is again
its reverse cumulative sum, per feature.

Segment ids restart the state: run labels `[B, T]` (non-decreasing), and
`sees [B, T]`, whether a step's run is the run of the step before its chunk (so
its query reads the state entering the chunk). A chunk hands its state on only
when all of it is that run, and adds only the keys of its last run.

Einsum alphabet: B batch, T time, N query heads, K key/value heads, G = N / K,
M features (of q and k), V value width, U chunks, C steps in a chunk, c steps in a
sub-chunk (per-feature gates).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas.tiling import check_tiling, dot, dot_nt, dot_tn, idiv, matmul_precision, pad_to, pow2_at_least, triton_params


# The delta rule's walks (`GatedBlockSizes.delta_walk`).
DELTA_WALKS = ("direct", "split")


@dataclasses.dataclass(frozen=True)
class GatedBlockSizes:
  """Tiling and launch settings of the gated and delta-rule kernels.

  `chunk`: steps per chunk (the quadratic form is chunk x chunk); shrunk to the
  (power-of-two rounded) sequence length. `block_m` / `block_v`: rows / columns
  of the state per program in the two walks over the chunks (the delta rule
  keeps every row: its correction `W S` reads the whole state). `block_v_out`:
  value columns per program of the output pass. `sub_chunk`: steps per secondary
  sub-chunk with per-feature gates (pairs within one are made key by key; shrunk to
  the chunk). `span_chunks`: gated linear attention only (not the delta rule): the
  two walks run in spans of this many chunks in parallel, each from a zero state,
  and XLA then adds each span's entering state (one contraction over the spans) to its
  chunks' states; None: one span (a single sequential walk). `num_warps` /
  `num_stages`: Triton launch settings; `factor_warps`: warps of the delta rule's
  WY-factor launches (their float32 `[C, C]` and `[C, H]` tiles).
  `delta_walk` (the delta rule's walks over the chunks): `"direct"` makes every
  product of a chunk in the walk (two forward, five backward); `"split"` keeps in the
  backward walk only the two that read the state's cotangent: the chunk's other
  terms (its queries' share and the pseudo-values' local cotangent) come from a
  parallel launch before it, and the gradient pass makes the pseudo-values'
  cotangent from the walk's output. One more launch and more bytes, a shorter
  sequential chain. Defaults: `get_default` (the tiles a first guess, the stages
  from a sweep on an H200; `delta_walk="direct"`: on an H100 at T 4k-16k, B1 N8 H128
  bf16, the split walk was level with it — results/h100/gated/walks.md).
  """

  chunk: int = 64
  block_m: int = 64
  block_v: int = 64
  block_v_out: int = 128
  num_warps: int = 4
  num_stages: int = 2
  sub_chunk: int = 16
  span_chunks: int | None = None
  factor_warps: int = 8
  delta_walk: str = "direct"

  def __post_init__(self):
    check_tiling(self, pow2=("chunk", "block_m", "block_v", "block_v_out", "sub_chunk"),
                 positive=("num_warps", "num_stages", "span_chunks", "factor_warps"), optional=("span_chunks",))
    if self.delta_walk not in DELTA_WALKS:
      raise ValueError(f"delta_walk={self.delta_walk!r} must be one of {', '.join(map(repr, DELTA_WALKS))}")

  @classmethod
  def get_default(cls, dtype: Any, chunk: int | None = None, *, scalar_gates: bool = False) -> GatedBlockSizes:
    """The defaults for inputs of `dtype`: 3 pipeline stages for 16-bit inputs, 2 otherwise;
    `block_v=32` for 16-bit inputs with one gate per step (`scalar_gates`, not the delta rule).

    H200, bf16, B1 N8 H128, T=16k (results/h200/gated/tune.md): 3 stages took forward+backward
    from 1.53 to 1.05 ms (gated linear) and from 2.81 to 2.43 ms (delta rule) against 2; float32
    tiles keep 2 (twice the shared memory per stage, not measured with 3). With 3 stages, whole
    `linear_attention` calls (results/h200/gated/sweep.md): `block_v=32` (twice the walk programs)
    1.24 -> 1.11 ms at 16k, 0.393 -> 0.404 ms at 4k; for the delta rule 3.56 -> 3.55 ms at 16k,
    1.46 -> 1.67 at 4k (kept at 64). Per-feature gates were not swept (kept at 64).
    """
    sixteen = jnp.dtype(dtype).itemsize <= 2
    over = dict(num_stages=3 if sixteen else 2)
    if sixteen and scalar_gates:
      over["block_v"] = 32
    if chunk is not None:
      over["chunk"] = chunk
    return cls(**over)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static settings of one call (hashable)."""

  chunk: int
  chunks: int  # chunks in the padded length
  group: int  # query heads per key/value head
  segments: bool
  delta: bool
  block_m: int
  block_v: int
  block_v_out: int
  interpret: bool
  num_warps: int
  num_stages: int
  precision: Any = None
  features: bool = False  # per-feature gates [B, T, K, M]
  sub_chunk: int = 16  # steps per sub-chunk with per-feature gates (<= chunk)
  span_chunks: int = 0  # chunks per span of the walks (0: one span)
  factor_warps: int = 8  # warps of the WY-factor launches
  delta_walk: str = "direct"  # the delta rule's walks (GatedBlockSizes.delta_walk); "direct" for the others

  @property
  def split_walk(self) -> bool:
    """The delta rule's backward walk reads its state-independent terms from a launch before it."""
    return self.delta_walk == "split"

  @property
  def spans(self) -> int:
    return 1 if not self.span_chunks else -(-self.chunks // self.span_chunks)

  @property
  def params(self) -> dict:
    return triton_params(interpret=self.interpret, num_warps=self.num_warps, num_stages=self.num_stages)


# --------------------------------------------------------------------------- #
# public entry points
# --------------------------------------------------------------------------- #


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block_sizes: GatedBlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Gated causal linear attention (numerator only) from features, chunk by chunk.

  Args:
    q: `[B, T, N, M]` query features.
    k: `[B, T, K, M]` key features, `N % K == 0` (zero a key's features and its
      gate to remove the step, e.g. for key padding).
    v: `[B, T, K, Hv]` values.
    gates: log forget gates (float, <= 0; not checked here), `[B, T, K]` (one per
      step and head) or `[B, T, K, M]` (one per step, head and feature: row m of
      the state decays by `exp(g_tm)`).
    segment_ids: optional int `[B, T]`; the state restarts where a run of equal
      ids begins.
    block_sizes: tiling; default `GatedBlockSizes.get_default(q.dtype)`.
    interpret: run in Pallas' interpreter; default True off GPU.

  Returns:
    `[B, T, N, Hv]` in q's dtype: `sum_{s <= t, same run} exp(G_t - G_s) (q_t . k_s) v_s`
    (per feature: `sum_{s <= t, same run} sum_m q_tm k_sm exp(G_tm - G_sm) v_s`).
  """
  dims, ids = _check_inputs(q, k, v, gates, segment_ids, family="gated_linear_attention", features=True)
  b, t, n, m = q.shape
  if t == 0 or b == 0:
    return jnp.zeros((b, t, n, dims.v_head_dim), q.dtype)
  features = gates.ndim == 4
  st, t_pad, flags = _prepare(dims, ids, block_sizes, interpret, q.dtype, delta=False, features=features)
  m_pad, hv_pad = pow2_at_least(m), pow2_at_least(dims.v_head_dim)
  g = _pad_gates(gates, t_pad, m_pad)
  out = _gated_core(pad_to(q, t_pad, m_pad), pad_to(k, t_pad, m_pad), pad_to(v, t_pad, hv_pad), g, flags, st)
  return out[:, :t, :, : dims.v_head_dim]


def delta_rule_recurrence(
    q: jax.Array,
    k: jax.Array,
    w: jax.Array,
    u: jax.Array,
    gates: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block_sizes: GatedBlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """The delta rule's chunk recurrence from its per-chunk WY factors.

  Args:
    q: `[B, T, N, H]` queries (normalised and scaled).
    k: `[B, T, K, H]` keys (normalised; zero for masked steps).
    w: `[B, T, K, H]` the rows of `W = T (gamma K)` of each chunk.
    u: `[B, T, K, Hv]` the rows of `U~ = T V` of each chunk.
    gates: `[B, T, K]` log forget gates (<= 0; 0 for masked steps).
    segment_ids: optional int `[B, T]`; the state restarts where a run begins.
      `w` and `u` must have been made with the same runs and chunk length.
    block_sizes: tiling; `w` and `u` must be made with chunks of
      `chunk_length(T, block_sizes)` steps.
    interpret: run in Pallas' interpreter; default True off GPU.

  Returns:
    `[B, T, N, Hv]` in q's dtype.
  """
  family = "delta_rule_recurrence"
  dims, ids = _check_inputs(q, k, u, gates, segment_ids, family=family)
  if w.shape != k.shape:
    raise ValueError(f"{family}: w must have k's shape {k.shape}, got {w.shape}")
  b, t, n, h = q.shape
  if t == 0 or b == 0:
    return jnp.zeros((b, t, n, dims.v_head_dim), q.dtype)
  st, t_pad, flags = _prepare(dims, ids, block_sizes, interpret, q.dtype, delta=True)
  h_pad, hv_pad = pow2_at_least(h), pow2_at_least(dims.v_head_dim)
  g = _pad_gates(gates, t_pad)
  out = _delta_core(pad_to(q, t_pad, h_pad), pad_to(k, t_pad, h_pad), pad_to(w, t_pad, h_pad),
                    pad_to(u, t_pad, hv_pad), g, flags, st)
  return out[:, :t, :, : dims.v_head_dim]


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gates: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block_sizes: GatedBlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """The chunked delta rule from prepared inputs, all of it in kernels: the per-chunk WY factors
  (`delta_rule_factors`) and the chunk recurrence (`delta_rule_recurrence`).

  Args:
    q: `[B, T, N, H]` queries (normalised and scaled).
    k: `[B, T, K, H]` keys (normalised; zero for masked steps).
    v: `[B, T, K, Hv]` values.
    beta: `[B, T, K]` write strengths in [0, 1] (0 for masked steps; not checked here).
    gates: `[B, T, K]` log forget gates (<= 0; 0 for masked steps).
    segment_ids: optional int `[B, T]`; the state restarts where a run of equal ids begins.
    block_sizes: tiling; default `GatedBlockSizes.get_default(q.dtype)`.
    interpret: run in Pallas' interpreter; default True off GPU.

  Returns:
    `[B, T, N, Hv]` in q's dtype:
    `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = q_t S_t`.
  """
  family = "delta_rule"
  dims, ids = _check_inputs(q, k, v, gates, segment_ids, family=family)
  _check_beta(beta, gates, family=family)
  b, t, n, h = q.shape
  if t == 0 or b == 0:
    return jnp.zeros((b, t, n, dims.v_head_dim), q.dtype)
  st, t_pad, flags = _prepare(dims, ids, block_sizes, interpret, q.dtype, delta=True)
  h_pad, hv_pad = pow2_at_least(h), pow2_at_least(dims.v_head_dim)
  out = _delta_rule_core(pad_to(q, t_pad, h_pad), pad_to(k, t_pad, h_pad), pad_to(v, t_pad, hv_pad),
                         _pad_gates(beta, t_pad), _pad_gates(gates, t_pad), flags, st)
  return out[:, :t, :, : dims.v_head_dim]


def delta_rule_factors(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    gates: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block_sizes: GatedBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The delta rule's per-chunk WY factors, one program per (batch, head, chunk):
  `(I + A) [U~ | W] = diag(beta) [V | gamma K]` with `A[t, s] = beta_t exp(G_t - G_s) (k_t . k_s)`
  for s < t in one run of the chunk, `gamma_t = exp(G_t)` where step t reads the state
  entering the chunk (else 0), G the gates' chunk-local cumulative sums.

  Args as `delta_rule` (the chunks are `chunk_length(T, block_sizes)` steps).

  Returns:
    `W [B, T, K, H]` and `U~ [B, T, K, Hv]` in k's dtype (`delta_rule_recurrence`'s `w` and `u`).
  """
  family = "delta_rule_factors"
  dims, ids = _check_inputs(k, k, v, gates, segment_ids, family=family)
  _check_beta(beta, gates, family=family)
  b, t, kh, h = k.shape
  if t == 0 or b == 0:
    return jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, k.dtype)
  st, t_pad, flags = _prepare(dims, ids, block_sizes, interpret, k.dtype, delta=True)
  h_pad, hv_pad = pow2_at_least(h), pow2_at_least(dims.v_head_dim)
  w, u = _factors_core(pad_to(k, t_pad, h_pad), pad_to(v, t_pad, hv_pad), _pad_gates(beta, t_pad),
                       _pad_gates(gates, t_pad), flags, st)
  return w[:, :t, :, :h], u[:, :t, :, : dims.v_head_dim]


def chunk_length(t: int, block_sizes: GatedBlockSizes | None = None) -> int:
  """The chunk length the kernels use for a sequence of T steps."""
  return min((block_sizes or GatedBlockSizes()).chunk, pow2_at_least(t))


def _check_inputs(q, k, v, gates, segment_ids, *, family: str, features: bool = False):
  """The contract's checks of both entry points: (dims, segment ids or None).

  `features`: gates may also be per feature, `[B, T, K, M]` (M = q's last axis)."""
  dims = common.check_qkv(q, k, v)
  common.check_causal(True, dims, family=family, need_square=True)
  if q.dtype == jnp.float64:
    raise TypeError(f"{family} computes in float32 at most, got {q.dtype=}; use the xla implementation")
  shape = (dims.batch, dims.q_len, dims.num_kv_heads)
  _check_gates(gates, shape, shape + (q.shape[3],) if features else None, family=family)
  return dims, common.check_shared_segment_ids(segment_ids, dims, family=family)


def _check_gates(gates: Any, shape: tuple[int, ...], feature_shape: tuple[int, ...] | None, *, family: str) -> None:
  if not hasattr(gates, "dtype") or not jnp.issubdtype(gates.dtype, jnp.floating):
    raise TypeError(f"{family}: gates must be a floating-point array, got {getattr(gates, 'dtype', type(gates))}")
  if tuple(gates.shape) not in (shape, feature_shape):
    per_feature = "" if feature_shape is None else f" or [B, T, K, M]={feature_shape}"
    raise ValueError(f"{family}: gates must have shape [B, T, K]={shape}{per_feature}, got {tuple(gates.shape)}")


def _check_beta(beta: Any, gates: jax.Array, *, family: str) -> None:
  if not hasattr(beta, "dtype") or not jnp.issubdtype(beta.dtype, jnp.floating):
    raise TypeError(f"{family}: beta must be a floating-point array, got {getattr(beta, 'dtype', type(beta))}")
  if beta.shape != gates.shape:
    raise ValueError(f"{family}: beta must have the gates' shape [B, T, K]={gates.shape}, got {beta.shape}")


def _prepare(dims: common.Dims, ids, block_sizes, interpret, dtype, *, delta: bool, features: bool = False):
  """Static settings, the padded length and the segment flags (labels, sees) or None."""
  if block_sizes is None:
    block_sizes = GatedBlockSizes.get_default(dtype, scalar_gates=not delta and not features)
  if not isinstance(block_sizes, GatedBlockSizes):
    raise TypeError(f"block_sizes must be a GatedBlockSizes, got {type(block_sizes).__name__}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  chunk = chunk_length(dims.q_len, block_sizes)
  chunks = -(-dims.q_len // chunk)
  t_pad = chunks * chunk
  st = _Static(chunk=chunk, chunks=chunks, group=dims.group, segments=ids is not None, delta=delta,
               block_m=block_sizes.block_m, block_v=block_sizes.block_v, block_v_out=block_sizes.block_v_out,
               interpret=bool(interpret), num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
               precision=matmul_precision(dtype), features=features,
               sub_chunk=min(block_sizes.sub_chunk, chunk),
               span_chunks=0 if block_sizes.span_chunks is None or block_sizes.span_chunks >= chunks
               else block_sizes.span_chunks, factor_warps=block_sizes.factor_warps,
               delta_walk=block_sizes.delta_walk if delta else "direct")
  if delta and block_sizes.span_chunks is not None:
    raise ValueError(f"span_chunks={block_sizes.span_chunks} applies to gated linear attention; the delta rule's "
                     "walk is not split into spans (its state transition is a matrix): leave it None")
  flags = None
  if ids is not None:
    # Run labels, padded steps continuing the last run.
    labels = jnp.pad(common.run_labels(ids), ((0, 0), (0, t_pad - dims.q_len)), mode="edge")
    # The run of the step before each chunk (-1 before the first): [B, U] -> [B, T'].
    before = jnp.concatenate([jnp.full_like(labels[:, :1], -1), labels[:, chunk - 1:-1:chunk]], axis=1)
    sees = (labels == jnp.repeat(before, chunk, axis=1)).astype(jnp.int32)
    flags = (labels, sees)
  return st, t_pad, flags


def _pad_gates(gates: jax.Array, t_pad: int, m_pad: int | None = None) -> jax.Array:
  """`[B, T, K]` -> float32 `[B, K, T']`, or `[B, T, K, M]` -> float32 `[B, K, T', M']` (padding: 0)."""
  g = gates.astype(jnp.float32)
  if g.ndim == 3:
    g = g.transpose(0, 2, 1)
    return jnp.pad(g, ((0, 0), (0, 0), (0, t_pad - g.shape[2])))
  g = g.transpose(0, 2, 1, 3)
  return jnp.pad(g, ((0, 0), (0, 0), (0, t_pad - g.shape[2]), (0, m_pad - g.shape[3])))


def _local_cumsum(g: jax.Array, st: _Static) -> jax.Array:
  """`[B, K, T']` per-step gates -> their cumulative sums within each chunk (inclusive), `[B, K, 2, T']`:
  a float32 pair (hi, lo) whose sum holds each cumulative sum to about twice float32's precision.
  Per-feature gates `[B, K, T', M]` -> `[B, K, 2, T', M]` likewise.

  The kernels take a decay as `exp((hi_t - hi_s) + (lo_t - lo_s))`; with the rounded sums alone, sums
  near -320 (gates of -20 per step) would carry an absolute error of ~2e-5 into every exponent.
  """
  b, kh, t_pad = g.shape[:3]
  x = g.reshape(b, kh, st.chunks, st.chunk, *g.shape[3:])
  hi, lo = lax.associative_scan(_add_pairs, (x, jnp.zeros_like(x)), axis=3)
  return jnp.stack([hi, lo], axis=2).reshape(b, kh, 2, t_pad, *g.shape[3:])


def _add_pairs(x, y):
  """(hi, lo) + (hi, lo), with the rounding error of the his kept in lo (Knuth's TwoSum)."""
  (a, la), (b, lb) = x, y
  total = a + b
  b_part = total - a
  error = (a - (total - b_part)) + (b - b_part)
  return total, la + lb + error


def _gate_grad(dG: jax.Array, flags) -> jax.Array:
  """dL/dg `[B, K, T']` (per feature `[B, K, T', M]`) from dL/dG (G the cumulative gates): reverse
  cumulative sums along T, 0 at run starts."""
  dg = jnp.flip(jnp.cumsum(jnp.flip(dG, 2), axis=2), 2)
  if flags is None:
    starts = (jnp.arange(dg.shape[2]) == 0)[None, None]
  else:
    starts = common.segment_starts(flags[0])[:, None]
  # [B|1, 1, T'] (per feature [B|1, 1, T', 1])
  starts = starts.reshape(starts.shape + (1,) * (dg.ndim - 3))
  # The gate of a run's first step decays only the state of the run before: no effect.
  return jnp.where(starts, 0.0, dg)


# --------------------------------------------------------------------------- #
# custom_vjp cores over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_core(q, k, v, g, flags, st: _Static):
  return _gated_fwd(q, k, v, g, flags, st)[0]


def _gated_fwd(q, k, v, g, flags, st: _Static):
  gc = _local_cumsum(g, st)
  h = _states(k, v, gc, flags, st)
  out = _outputs(q, k, v, gc, h, flags, st)
  return out, (q, k, v, gc, flags, h)


def _gated_bwd(st: _Static, res, do):
  q, k, v, gc, flags, h = res
  do = do.astype(q.dtype)
  dh = _dstates(q, k, do, gc, flags, st)
  dq, dk, dG, dv = _grads(q, k, v, do, gc, h, dh, flags, st)
  kh = k.shape[2]
  dk, dv = _sum_group(dk, kh), _sum_group(dv, kh)
  dg = _gate_grad(_sum_heads(dG, kh), flags)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, None


_gated_core.defvjp(_gated_fwd, _gated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta_core(q, k, w, u, g, flags, st: _Static):
  return _delta_fwd(q, k, w, u, g, flags, st)[0]


def _delta_fwd(q, k, w, u, g, flags, st: _Static):
  return _delta_forward(q, k, w, u, _local_cumsum(g, st), flags, st)


def _delta_forward(q, k, w, u, gc, flags, st: _Static):
  h, pseudo = _states(k, u, gc, flags, st, w=w)
  out = _outputs(q, k, pseudo, gc, h, flags, st)
  return out, (q, k, w, gc, flags, h, pseudo)


def _delta_bwd(st: _Static, res, do):
  q, k, w, gc, flags, h, pseudo = res
  do = do.astype(q.dtype)
  if st.split_walk:
    dh, dpseudo = _split_dstates(q, k, do, gc, w, flags, st), None
  else:
    dh, dpseudo = _dstates(q, k, do, gc, flags, st, w=w)
  dq, dk, dG, dpseudo, dw = _grads(q, k, pseudo, do, gc, h, dh, flags, st, dpseudo=dpseudo)
  kh = k.shape[2]
  dk, dw, du = (_sum_group(x, kh) for x in (dk, dw, dpseudo))
  # With U held fixed, O and the states are gated linear attention over (k, U): the kernel's dL/dG.
  # U = U~ - W S adds the reads of the entering state by W (whose own gamma factor is
  # differentiated outside, with the rest of the WY factors), as queries of the step before the chunk.
  dG = _sum_heads(dG, kh) + _chunk_start_gate_grad(w, dw, st)
  dg = _gate_grad(dG, flags)
  return dq.astype(q.dtype), dk.astype(k.dtype), dw.astype(w.dtype), du.astype(q.dtype), dg, None


_delta_core.defvjp(_delta_fwd, _delta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _factors_core(k, v, beta, g, flags, st: _Static):
  return _factors_fwd(k, v, beta, g, flags, st)[0]


def _factors_fwd(k, v, beta, g, flags, st: _Static):
  gc = _local_cumsum(g, st)
  w, u, inverse = _factors(k, v, beta, gc, flags, st)
  return (w, u), (k, v, beta, gc, flags, inverse)


def _factors_bwd(st: _Static, res, cts):
  k, v, beta, gc, flags, inverse = res
  dw, du = cts
  dk, dv, dbeta, dg = _factor_grads(k, v, beta, gc, flags, inverse, dw, du, st)
  return dk.astype(k.dtype), dv.astype(v.dtype), dbeta, dg, None


_factors_core.defvjp(_factors_fwd, _factors_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta_rule_core(q, k, v, beta, g, flags, st: _Static):
  """The factors and the recurrence as one differentiable piece: the cumulative gates made once."""
  return _delta_rule_fwd(q, k, v, beta, g, flags, st)[0]


def _delta_rule_fwd(q, k, v, beta, g, flags, st: _Static):
  gc = _local_cumsum(g, st)
  w, u, inverse = _factors(k, v, beta, gc, flags, st)
  out, res = _delta_forward(q, k, w, u, gc, flags, st)
  return out, (res, v, beta, inverse)


def _delta_rule_bwd(st: _Static, res, do):
  res, v, beta, inverse = res
  _, k, _, gc, flags, *_ = res
  dq, dk, dw, du, dg, _ = _delta_bwd(st, res, do)
  dk_factors, dv, dbeta, dg_factors = _factor_grads(k, v, beta, gc, flags, inverse, dw, du, st)
  dk = (dk.astype(jnp.float32) + dk_factors).astype(k.dtype)
  return dq, dk, dv.astype(v.dtype), dbeta, dg + dg_factors, None


_delta_rule_core.defvjp(_delta_rule_fwd, _delta_rule_bwd)


def _chunk_start_gate_grad(w, dw, st: _Static) -> jax.Array:
  """dL/dG `[B, K, T']` of the reads `W S_c` of the state entering each chunk.

  `W_t S_c` reads keys s of earlier chunks with weight `exp(G_{c0 - 1} - G_s)`:
  as a query at step c0 - 1 (the step before the chunk), it adds `W_t . dW_t`
  (summed over the chunk's rows) to dL/dG there; the keys' side is inside dk.
  """
  b, t_pad, kh, _ = w.shape
  f32 = jnp.float32
  # [B, K, U]
  per_chunk = (w.astype(f32) * dw).sum(-1).transpose(0, 2, 1).reshape(b, kh, st.chunks, st.chunk).sum(-1)
  out = jnp.zeros((b, kh, st.chunks, st.chunk), f32)
  # Chunk c's reads land on the last step of chunk c - 1 (chunk 0 reads the zero state).
  out = out.at[:, :, :-1, -1].set(per_chunk[:, :, 1:])
  return out.reshape(b, kh, t_pad)


def _sum_heads(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[B, N, T, ...]` per query head -> `[B, K, T, ...]` summed over each GQA group."""
  b, n = x.shape[:2]
  return x.reshape(b, num_kv_heads, n // num_kv_heads, *x.shape[2:]).sum(2)


def _sum_group(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[B, T, N, D]` per query head -> `[B, T, K, D]` summed over each GQA group (float32)."""
  b, t, n, d = x.shape
  if n == num_kv_heads:
    return x
  return x.reshape(b, t, num_kv_heads, n // num_kv_heads, d).sum(3)


# --------------------------------------------------------------------------- #
# launches
# --------------------------------------------------------------------------- #

_SOLVE_BLOCK = 16  # rows of the diagonal blocks the factors' kernel solves by forward substitution


def _flag_inputs(flags, spec_len: int, index) -> dict:
  if flags is None:
    return {}
  labels, sees = flags
  spec = pl.BlockSpec((None, spec_len), index)
  return {"labels": (labels, spec), "sees": (sees, spec)}


def _call(kernel, inputs: dict, outputs: dict, grid, st: _Static, name: str):
  outs = pl.pallas_call(
      functools.partial(_named_refs, kernel, tuple(inputs) + tuple(outputs), st=st),
      grid=grid,
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=[spec for _, spec in outputs.values()],
      out_shape=[shape for shape, _ in outputs.values()],
      interpret=st.interpret,
      name=name,
      **st.params,
  )(*(x for x, _ in inputs.values()))
  return outs


def _named_refs(kernel, names: tuple[str, ...], *refs, st: _Static):
  assert len(names) == len(refs), (names, len(refs))
  return kernel(dict(zip(names, refs)), st=st)


def _launch_name(part: str, st: _Static) -> str:
  family = "delta_rule" if st.delta else "gated_linear_feature" if st.features else "gated_linear"
  return f"{family}_{part}"


def _chunks_pad(st: _Static) -> int:
  # The chunk axis of the stored states is padded to a power of two; the padding is never read.
  return pow2_at_least(st.chunks, 1)


def _states(k, v, gc, flags, st: _Static, w=None):
  """The state entering each chunk `h [B, K, U', M, V]` in k's dtype (and, with w, the pseudo-values)."""
  b, t_pad, kh, m = k.shape
  hv = v.shape[3]
  delta = w is not None
  bm = m if delta else min(st.block_m, m)
  bv = min(st.block_v, hv)
  u_pad = _chunks_pad(st)
  if st.features:
    gc_spec = pl.BlockSpec((None, None, 2, t_pad, bm), lambda i, h, r, j: (i, h, 0, 0, r))
  else:
    gc_spec = pl.BlockSpec((None, None, 2, t_pad), lambda i, h, r, j: (i, h, 0, 0))
  inputs = {
      "k": (k, pl.BlockSpec((None, t_pad, None, bm), lambda i, h, r, j: (i, 0, h, r))),
      "v": (v, pl.BlockSpec((None, t_pad, None, bv), lambda i, h, r, j: (i, 0, h, j))),
      "gc": (gc, gc_spec),
      **_flag_inputs(flags, t_pad, lambda i, h, r, j: (i, 0)),
  }
  if delta:
    inputs["w"] = (w, pl.BlockSpec((None, t_pad, None, m), lambda i, h, r, j: (i, 0, h, 0)))
  spans = 1 if delta else st.spans
  outputs = {"h": (jax.ShapeDtypeStruct((b, kh, u_pad, m, hv), k.dtype if spans == 1 else jnp.float32),
                   pl.BlockSpec((None, None, u_pad, bm, bv), lambda i, h, r, j, *_: (i, h, 0, r, j)))}
  if delta:
    outputs["pseudo"] = (jax.ShapeDtypeStruct((b, t_pad, kh, hv), k.dtype),
                         pl.BlockSpec((None, t_pad, None, bv), lambda i, h, r, j: (i, 0, h, j)))
  outs = _walk(_states_kernel, inputs, outputs, (b, kh, m // bm, hv // bv), spans, st, "states", reverse=False)
  if spans > 1:
    return outs.astype(k.dtype)
  return (outs[0], outs[1]) if delta else outs[0]


def _walk(kernel, inputs: dict, outputs: dict, grid: tuple, spans: int, st: _Static, part: str, *, reverse: bool):
  """Launches a walk over the chunks; with spans, on a grid with a span axis, and returns the joined
  float32 states (`_join_spans`) instead of the launch's outputs."""
  if spans == 1:
    return _call(kernel, inputs, outputs, grid, st, _launch_name(part, st))
  b, heads, m_blocks, v_blocks = grid
  _, _, u_pad, bm, bv = outputs[next(iter(outputs))][1].block_shape  # the states' blocks
  inputs = {name: (x, _with_span_axis(spec)) for name, (x, spec) in inputs.items()}
  outputs = dict(outputs, **_span_outputs(b, heads, u_pad, m_blocks * bm, v_blocks * bv, bm, bv, spans))
  outs = _call(kernel, inputs, outputs, grid + (spans,), st, _launch_name(part, st))
  return _join_spans(*outs, st, reverse=reverse)


def _with_span_axis(spec: pl.BlockSpec) -> pl.BlockSpec:
  """An input's block spec on the walks' grid with a trailing span axis (the same block for every span)."""
  index = spec.index_map
  return pl.BlockSpec(spec.block_shape, lambda *ids: index(*ids[:-1]))


def _span_outputs(b, heads, u_pad, m, hv, bm, bv, spans) -> dict:
  """The spanned walks' other outputs: per chunk the factor `keep` `[B, H, U', M]` its state (row) is
  handed on with, and per span the state (or cotangent) it hands on from a zero start `[B, H, S, M, V]`."""
  return {
      "keeps": (jax.ShapeDtypeStruct((b, heads, u_pad, m), jnp.float32),
                pl.BlockSpec((None, None, u_pad, bm), lambda i, h, r, j, z: (i, h, 0, r))),
      "ends": (jax.ShapeDtypeStruct((b, heads, spans, m, hv), jnp.float32),
               pl.BlockSpec((None, None, None, bm, bv), lambda i, h, r, j, z: (i, h, z, r, j))),
  }


def _join_spans(local, keeps, ends, st: _Static, *, reverse: bool) -> jax.Array:
  """The states (reverse: the cotangents of the states leaving each chunk) `[B, H, U', M, V]` float32 of
  the spanned walks: each span's own part `local` from a zero start, plus what enters the span from
  the ones before (reverse: after), carried through the span's chunks by their `keeps`."""
  b, heads, u_pad, m, hv = local.shape
  n, length, chunks = st.spans, st.span_chunks, st.chunks
  grid_len = n * length
  loc = jnp.pad(local[:, :, :chunks], ((0, 0), (0, 0), (0, grid_len - chunks), (0, 0), (0, 0)))
  loc = loc.reshape(b, heads, n, length, m, hv)
  # Padded chunks (after the last) hand the state on unchanged.
  kp = jnp.pad(keeps[:, :, :chunks], ((0, 0), (0, 0), (0, grid_len - chunks), (0, 0)), constant_values=1.0)
  kp = kp.reshape(b, heads, n, length, m)
  if not reverse:
    # From the span's start to each chunk's start: the keeps of the chunks before it in the span.
    carried = jnp.cumprod(jnp.concatenate([jnp.ones_like(kp[:, :, :, :1]), kp[:, :, :, :-1]], axis=3), axis=3)
  else:
    # From each chunk's end to the span's end: the keeps of the chunks after it in the span.
    after = jnp.concatenate([kp[:, :, :, 1:], jnp.ones_like(kp[:, :, :, :1])], axis=3)
    carried = jnp.flip(jnp.cumprod(jnp.flip(after, 3), axis=3), 3)
  whole = jnp.prod(kp, axis=3)  # [B, H, S, M]: through a whole span
  if reverse:
    whole, ends = jnp.flip(whole, 2), jnp.flip(ends, 2)
  # What enters span j: every earlier span's end, carried through the spans between (one contraction
  # over the spans rather than a scan of S steps, each its own launches).
  entering = jnp.einsum("bhjim,bhimv->bhjmv", _span_weights(whole), ends, precision=lax.Precision.HIGHEST)
  if reverse:
    entering = jnp.flip(entering, 2)
  out = loc + carried[..., None] * entering[:, :, :, None]
  out = out.reshape(b, heads, grid_len, m, hv)[:, :, :chunks]
  return jnp.pad(out, ((0, 0), (0, 0), (0, u_pad - chunks), (0, 0), (0, 0)))


def _span_weights(whole: jax.Array) -> jax.Array:
  """`[B, H, S, M]` factors through each whole span -> `[B, H, S(j), S(i), M]`: the product of the
  factors of the spans strictly between i and j for i < j, 0 for i >= j."""
  n = whole.shape[2]
  j, i = np.arange(n)[:, None, None], np.arange(n)[None, :, None]
  # Row j of the running product takes span j - 1's factor where span j - 1 lies after i.
  before = jnp.concatenate([jnp.ones_like(whole[:, :, :1]), whole[:, :, :-1]], axis=2)
  factors = jnp.where(i < j - 1, before[:, :, :, None, :], 1.0)
  return jnp.where(i < j, jnp.cumprod(factors, axis=2), 0.0)


def _outputs(q, k, v, gc, h, flags, st: _Static):
  """`[B, T', N, V]` in q's dtype: each chunk's quadratic form plus its queries against the entering state."""
  b, t_pad, n, m = q.shape
  hv = v.shape[3]
  c = st.chunk
  bv = min(st.block_v_out, hv)
  kv = lambda n: idiv(n, st.group)
  if st.features:
    gc_spec = pl.BlockSpec((None, None, 2, c, m), lambda i, n, u, j: (i, kv(n), 0, u, 0))
  else:
    gc_spec = pl.BlockSpec((None, None, 2, c), lambda i, n, u, j: (i, kv(n), 0, u))
  inputs = {
      "q": (q, pl.BlockSpec((None, c, None, m), lambda i, n, u, j: (i, u, n, 0))),
      "k": (k, pl.BlockSpec((None, c, None, m), lambda i, n, u, j: (i, u, kv(n), 0))),
      "v": (v, pl.BlockSpec((None, c, None, bv), lambda i, n, u, j: (i, u, kv(n), j))),
      "gc": (gc, gc_spec),
      "h": (h, pl.BlockSpec((None, None, None, m, bv), lambda i, n, u, j: (i, kv(n), u, 0, j))),
      **_flag_inputs(flags, c, lambda i, n, u, j: (i, u)),
  }
  outputs = {"o": (jax.ShapeDtypeStruct((b, t_pad, n, hv), q.dtype),
                   pl.BlockSpec((None, c, None, bv), lambda i, n, u, j: (i, u, n, j)))}
  kernel = _feature_outputs_kernel if st.features else _outputs_kernel
  return _call(kernel, inputs, outputs, (b, n, st.chunks, hv // bv), st, _launch_name("outputs", st))[0]


def _dstates(q, k, do, gc, flags, st: _Static, w=None):
  """Per query head, the cotangent of the state leaving each chunk `dh [B, N, U', M, V]` in q's dtype
  (and, with w, the pseudo-values' cotangent `[B, T', N, V]`: q's dtype without GQA, else float32)."""
  b, t_pad, n, m = q.shape
  hv = do.shape[3]
  delta = w is not None
  bm = m if delta else min(st.block_m, m)
  bv = min(st.block_v, hv)
  u_pad = _chunks_pad(st)
  kv = lambda n: idiv(n, st.group)
  if st.features:
    gc_spec = pl.BlockSpec((None, None, 2, t_pad, bm), lambda i, n, r, j: (i, kv(n), 0, 0, r))
  else:
    gc_spec = pl.BlockSpec((None, None, 2, t_pad), lambda i, n, r, j: (i, kv(n), 0, 0))
  inputs = {
      "q": (q, pl.BlockSpec((None, t_pad, None, bm), lambda i, n, r, j: (i, 0, n, r))),
      "do": (do, pl.BlockSpec((None, t_pad, None, bv), lambda i, n, r, j: (i, 0, n, j))),
      "gc": (gc, gc_spec),
      **_flag_inputs(flags, t_pad, lambda i, n, r, j: (i, 0)),
  }
  if delta:
    inputs["k"] = (k, pl.BlockSpec((None, t_pad, None, m), lambda i, n, r, j: (i, 0, kv(n), 0)))
    inputs["w"] = (w, pl.BlockSpec((None, t_pad, None, m), lambda i, n, r, j: (i, 0, kv(n), 0)))
  spans = 1 if delta else st.spans
  outputs = {"dh": (jax.ShapeDtypeStruct((b, n, u_pad, m, hv), q.dtype if spans == 1 else jnp.float32),
                    pl.BlockSpec((None, None, u_pad, bm, bv), lambda i, n, r, j, *_: (i, n, 0, r, j)))}
  if delta:
    # Read only after a cast to q's dtype: stored in it where no GQA group sums it first.
    outputs["dpseudo"] = (jax.ShapeDtypeStruct((b, t_pad, n, hv), q.dtype if st.group == 1 else jnp.float32),
                          pl.BlockSpec((None, t_pad, None, bv), lambda i, n, r, j: (i, 0, n, j)))
  outs = _walk(_dstates_kernel, inputs, outputs, (b, n, m // bm, hv // bv), spans, st, "dstates", reverse=True)
  if spans > 1:
    return outs.astype(q.dtype)
  return (outs[0], outs[1]) if delta else outs[0]


def _split_dstates(q, k, do, gc, w, flags, st: _Static):
  """The delta rule's split backward walk (`delta_walk="split"`): per query head, the
  cotangent of the state leaving each chunk `dh [B, N, U', H, V]` in q's dtype; the chunks' terms that
  do not read it come from `_dstates_local`, the pseudo-values' cotangent from the gradient pass."""
  b, t_pad, n, m = q.shape
  hv = do.shape[3]
  bv = min(st.block_v, hv)
  u_pad = _chunks_pad(st)
  kv = lambda n: idiv(n, st.group)
  inputs = {
      "local": (_dstates_local(q, k, do, gc, w, flags, st),
                pl.BlockSpec((None, None, u_pad, m, bv), lambda i, n, j: (i, n, 0, 0, j))),
      "gc": (gc, pl.BlockSpec((None, None, 2, t_pad), lambda i, n, j: (i, kv(n), 0, 0))),
      "k": (k, pl.BlockSpec((None, t_pad, None, m), lambda i, n, j: (i, 0, kv(n), 0))),
      "w": (w, pl.BlockSpec((None, t_pad, None, m), lambda i, n, j: (i, 0, kv(n), 0))),
      **_flag_inputs(flags, t_pad, lambda i, n, j: (i, 0)),
  }
  outputs = {"dh": (jax.ShapeDtypeStruct((b, n, u_pad, m, hv), q.dtype),
                    pl.BlockSpec((None, None, u_pad, m, bv), lambda i, n, j: (i, n, 0, 0, j)))}
  return _call(_split_dstates_kernel, inputs, outputs, (b, n, hv // bv), st, _launch_name("dstates", st))[0]


def _dstates_local(q, k, do, gc, w, flags, st: _Static):
  """The delta rule's split backward walk: per query head and chunk, float32 `[B, N, U', M, V]`, the terms of the
  entering state's cotangent that do not read the leaving one: `(exp(G) q)^T dO - W^T ((decay * q k^T)^T dO)`."""
  b, t_pad, n, m = q.shape
  hv = do.shape[3]
  c = st.chunk
  bv = min(st.block_v, hv)
  kv = lambda n: idiv(n, st.group)
  inputs = {
      "q": (q, pl.BlockSpec((None, c, None, m), lambda i, n, u, j: (i, u, n, 0))),
      "k": (k, pl.BlockSpec((None, c, None, m), lambda i, n, u, j: (i, u, kv(n), 0))),
      "w": (w, pl.BlockSpec((None, c, None, m), lambda i, n, u, j: (i, u, kv(n), 0))),
      "do": (do, pl.BlockSpec((None, c, None, bv), lambda i, n, u, j: (i, u, n, j))),
      "gc": (gc, pl.BlockSpec((None, None, 2, c), lambda i, n, u, j: (i, kv(n), 0, u))),
      **_flag_inputs(flags, c, lambda i, n, u, j: (i, u)),
  }
  outputs = {"local": (jax.ShapeDtypeStruct((b, n, _chunks_pad(st), m, hv), jnp.float32),
                       pl.BlockSpec((None, None, None, m, bv), lambda i, n, u, j: (i, n, u, 0, j)))}
  return _call(_dstates_local_kernel, inputs, outputs, (b, n, st.chunks, hv // bv), st,
               _launch_name("dstates_local", st))[0]


def _grads(q, k, v, do, gc, h, dh, flags, st: _Static, dpseudo=None):
  """Per query head: dq `[B, T', N, M]`, dk `[B, T', N, M]`, dL/dG `[B, N, T']` (per-feature gates:
  `[B, N, T', M]`), dv `[B, T', N, V]` (delta rule, with `dpseudo`: dq, dk, dL/dG, the pseudo-values'
  cotangent unchanged, and dW `[B, T', N, M]`). dL/dG and dW in float32; dq, dk and dv in the inputs'
  dtypes without GQA (dk of the delta rule and of per-feature gates in float32), else float32 (summed
  over each group after the kernel)."""
  b, t_pad, n, m = q.shape
  hv = v.shape[3]
  c = st.chunk
  kv = lambda n: idiv(n, st.group)
  delta = st.delta
  inputs = {
      "q": (q, pl.BlockSpec((None, c, None, m), lambda i, n, u: (i, u, n, 0))),
      "k": (k, pl.BlockSpec((None, c, None, m), lambda i, n, u: (i, u, kv(n), 0))),
      "v": (v, pl.BlockSpec((None, c, None, hv), lambda i, n, u: (i, u, kv(n), 0))),
      "do": (do, pl.BlockSpec((None, c, None, hv), lambda i, n, u: (i, u, n, 0))),
      "gc": (gc, pl.BlockSpec((None, None, 2, c, m), lambda i, n, u: (i, kv(n), 0, u, 0)) if st.features
             else pl.BlockSpec((None, None, 2, c), lambda i, n, u: (i, kv(n), 0, u))),
      "h": (h, pl.BlockSpec((None, None, None, m, hv), lambda i, n, u: (i, kv(n), u, 0, 0))),
      "dh": (dh, pl.BlockSpec((None, None, None, m, hv), lambda i, n, u: (i, n, u, 0, 0))),
      **_flag_inputs(flags, c, lambda i, n, u: (i, u)),
  }
  if dpseudo is not None:
    inputs["dpseudo"] = (dpseudo, pl.BlockSpec((None, c, None, hv), lambda i, n, u: (i, u, n, 0)))
  f32 = jnp.float32
  # Without GQA nothing is summed after the kernel: the cotangents leave in the inputs' dtypes (the same
  # rounding as a cast in XLA, without a float32 round trip through memory). dk and dW of the delta rule
  # stay float32 (dk is added to the factors' dk, dW read by the gates' gradient), and dk of per-feature
  # gates (accumulated in place).
  own = st.group == 1
  wide_dk = delta or st.features
  spec_m = pl.BlockSpec((None, c, None, m), lambda i, n, u: (i, u, n, 0))
  outputs = {"dq": (jax.ShapeDtypeStruct((b, t_pad, n, m), q.dtype if own else f32), spec_m),
             "dk": (jax.ShapeDtypeStruct((b, t_pad, n, m), k.dtype if own and not wide_dk else f32), spec_m)}
  if st.features:
    outputs["dG"] = (jax.ShapeDtypeStruct((b, n, t_pad, m), f32),
                     pl.BlockSpec((None, None, c, m), lambda i, n, u: (i, n, u, 0)))
  else:
    outputs["dG"] = (jax.ShapeDtypeStruct((b, n, t_pad), f32),
                     pl.BlockSpec((None, None, c), lambda i, n, u: (i, n, u)))
  if delta:
    outputs["dw"] = (jax.ShapeDtypeStruct((b, t_pad, n, m), f32), spec_m)
  if not delta or dpseudo is None:
    # The pseudo-values' (the delta rule's split walk) or the values' cotangent, made here.
    outputs["dv"] = (jax.ShapeDtypeStruct((b, t_pad, n, hv), v.dtype if own else f32),
                     pl.BlockSpec((None, c, None, hv), lambda i, n, u: (i, u, n, 0)))
  kernel = _feature_grads_kernel if st.features else _grads_kernel
  outs = _call(kernel, inputs, outputs, (b, n, st.chunks), st, _launch_name("grads", st))
  if delta:
    dq, dk, dG, dw, *made = outs
    return dq, dk, dG, made[0] if dpseudo is None else dpseudo, dw
  return tuple(outs)


def _factor_call(kernel, k, v, beta, gc, flags, st: _Static, part: str, extra: dict, outputs: dict):
  """A launch of the factor kernels, one chunk of one key/value head per program: k `[C, H]`, v `[C, V]`,
  beta `[C]`, the (hi, lo) cumulative gates `[2, C]`, run labels / sees `[C]`, and `extra` inputs."""
  b, _, kh, _ = k.shape
  c = st.chunk
  inputs = {
      "k": (k, _factor_spec(c, k.shape[3])),
      "v": (v, _factor_spec(c, v.shape[3])),
      "beta": (beta, pl.BlockSpec((None, None, c), lambda i, j, u: (i, j, u))),
      "gc": (gc, pl.BlockSpec((None, None, 2, c), lambda i, j, u: (i, j, 0, u))),
      **_flag_inputs(flags, c, lambda i, j, u: (i, u)),
      **extra,
  }
  return tuple(_call(kernel, inputs, outputs, (b, kh, st.chunks), dataclasses.replace(st, num_warps=st.factor_warps),
                     _launch_name(part, st)))


def _factor_spec(c: int, width: int) -> pl.BlockSpec:
  """Rows of one chunk of one key/value head of a `[B, T', K, width]` array."""
  return pl.BlockSpec((None, c, None, width), lambda i, j, u: (i, u, j, 0))


def _factors(k, v, beta, gc, flags, st: _Static):
  """W `[B, T', K, H]`, U~ `[B, T', K, V]` in k's dtype and the chunks' inverses `(I + A)^-1`
  `[B, K, T', C]` (float32; row t of its chunk's inverse at step t)."""
  b, t_pad, kh, h = k.shape
  hv, c = v.shape[3], st.chunk
  outputs = {
      "w": (jax.ShapeDtypeStruct((b, t_pad, kh, h), k.dtype), _factor_spec(c, h)),
      "u": (jax.ShapeDtypeStruct((b, t_pad, kh, hv), k.dtype), _factor_spec(c, hv)),
      "inverse": (jax.ShapeDtypeStruct((b, kh, t_pad, c), jnp.float32),
                  pl.BlockSpec((None, None, c, c), lambda i, j, u: (i, j, u, 0))),
  }
  return _factor_call(_factors_kernel, k, v, beta, gc, flags, st, "factors", {}, outputs)


def _factor_grads(k, v, beta, gc, flags, inverse, dw, du, st: _Static):
  """float32 dk `[B, T', K, H]`, dv `[B, T', K, V]`, dL/dbeta and dL/dg `[B, K, T']` of the factors."""
  b, t_pad, kh, h = k.shape
  hv, c = v.shape[3], st.chunk
  f32 = jnp.float32
  extra = {"inverse": (inverse, pl.BlockSpec((None, None, c, c), lambda i, j, u: (i, j, u, 0))),
           "dw": (dw, _factor_spec(c, h)), "du": (du, _factor_spec(c, hv))}
  per_step = pl.BlockSpec((None, None, c), lambda i, j, u: (i, j, u))
  outputs = {
      "dk": (jax.ShapeDtypeStruct((b, t_pad, kh, h), f32), _factor_spec(c, h)),
      "dv": (jax.ShapeDtypeStruct((b, t_pad, kh, hv), f32), _factor_spec(c, hv)),
      "dbeta": (jax.ShapeDtypeStruct((b, kh, t_pad), f32), per_step),
      "dg": (jax.ShapeDtypeStruct((b, kh, t_pad), f32), per_step),
  }
  return _factor_call(_factor_grads_kernel, k, v, beta, gc, flags, st, "factor_grads", extra, outputs)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #


def _chunk_masks(c: int, refs, at=None):
  """Within one chunk: the decay `[C, C]` of key s seen from query t (0 unless s <= t in one run),
  and per step `[C]`: exp(G_t) (0 unless the step reads the entering state) and exp(G_C - G_s)
  (0 unless the step's key is handed on), and the factor `keep` of the entering state handed on.

  G is read from the (hi, lo) pair `refs["gc"]` (`_local_cumsum`), differences taken part by part."""
  f32 = jnp.float32
  steps = slice(None) if at is None else at
  hi, lo = refs["gc"][0, steps], refs["gc"][1, steps]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  live = cols <= rows
  # The chunk's last step: its hi is the least (the gates are <= 0, rounding keeps the order).
  hi_last = jnp.min(hi)
  lo_last = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1, lo, 0.0))
  head = jnp.exp(hi + lo)
  tail = jnp.exp((hi_last - hi) + (lo_last - lo))
  keep = jnp.exp(hi_last + lo_last)
  if "labels" in refs:
    lab = refs["labels"][...] if at is None else refs["labels"][at]
    sees = (refs["sees"][...] if at is None else refs["sees"][at]) == 1
    live = live & (lab[:, None] == lab[None, :])
    head = jnp.where(sees, head, 0.0)
    tail = jnp.where(lab == jnp.max(lab), tail, 0.0)
    keep = keep * jnp.min(sees.astype(f32))
  diff = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
  decay = jnp.where(live, jnp.exp(jnp.where(live, diff, 0.0)), 0.0)
  return decay, head, tail, keep


def _states_kernel(refs: dict, st: _Static):
  """Walks the chunks in order: writes the state entering each, then adds the chunk's keys.

  Refs: k `[T', bm]`, v `[T', bv]` (the delta rule: U~), gc `[2, T']` (per-feature gates: `[2, T', bm]`),
  labels / sees `[T']`, w `[T', M]` (delta rule); outputs h `[U', bm, bv]`, pseudo `[T', bv]` (delta rule).
  """
  k_ref, v_ref, h_ref = refs["k"], refs["v"], refs["h"]
  c = st.chunk
  first, count = _span_range(refs, st)

  def body(i, s):
    u = first + i
    at = pl.ds(pl.multiple_of(u * c, c), c)
    h_ref[u] = s.astype(h_ref.dtype)
    k, v = k_ref[at, :], v_ref[at, :]
    if st.features:
      # Per state row: tail [C, bm], keep [bm, 1].
      _, tail, keep = _feature_walk_decays(c, refs, at)
      _store_keep(refs, u, keep[:, 0])
      kt = (k.astype(jnp.float32) * tail).astype(k.dtype)
      return keep * s + dot_tn(kt, v, st.precision)
    _, _, tail, keep = _chunk_masks(c, refs, at)
    _store_keep(refs, u, keep)
    if st.delta:
      # U = U~ - W S, from the state entering the chunk.
      pseudo = v.astype(jnp.float32) - dot(refs["w"][at, :], s.astype(k.dtype), st.precision)
      v = pseudo.astype(k.dtype)
      refs["pseudo"][at, :] = v
    kt = (k.astype(jnp.float32) * tail[:, None]).astype(k.dtype)
    return keep * s + dot_tn(kt, v, st.precision)

  bm, bv = h_ref.shape[1], h_ref.shape[2]
  end = lax.fori_loop(0, count, body, jnp.zeros((bm, bv), jnp.float32))
  if "ends" in refs:
    refs["ends"][...] = end


def _span_range(refs, st: _Static):
  """The first chunk and the number of chunks of this program's span (every chunk without spans)."""
  if "ends" not in refs:
    return 0, st.chunks
  first = pl.program_id(4) * st.span_chunks
  return first, jnp.minimum(st.span_chunks, st.chunks - first)


def _store_keep(refs, u, keep) -> None:
  """The spanned walks record chunk u's keep (a scalar, or `[bm]` per state row)."""
  if "keeps" in refs:
    refs["keeps"][u] = jnp.broadcast_to(keep, refs["keeps"].shape[1:]).astype(jnp.float32)


def _outputs_kernel(refs: dict, st: _Static):
  """One chunk, one block of value columns: `(decay * q k^T) v + (exp(G) q) h`.

  Refs: q `[C, M]`, k `[C, M]`, v `[C, bv]`, gc `[2, C]`, h `[M, bv]`, labels / sees `[C]`; output o `[C, bv]`.
  """
  q, k, v = refs["q"][...], refs["k"][...], refs["v"][...]
  decay, head, _, _ = _chunk_masks(st.chunk, refs)
  scores = dot_nt(q, k, st.precision) * decay
  q_head = (q.astype(jnp.float32) * head[:, None]).astype(q.dtype)
  out = dot(scores.astype(v.dtype), v, st.precision) + dot(q_head, refs["h"][...], st.precision)
  refs["o"][...] = out.astype(refs["o"].dtype)


def _dstates_kernel(refs: dict, st: _Static):
  """Walks the chunks backwards: writes the cotangent of the state leaving each chunk, then adds the
  chunk's queries' share to the cotangent of the state entering it.

  Refs: q `[T', bm]`, do `[T', bv]`, gc `[2, T']` (per-feature gates: `[2, T', bm]`), labels / sees `[T']`,
  k and w `[T', M]` (delta rule); outputs dh `[U', bm, bv]`, dpseudo `[T', bv]` (delta rule).
  """
  q_ref, do_ref, dh_ref = refs["q"], refs["do"], refs["dh"]
  c = st.chunk
  f32 = jnp.float32
  first, count = _span_range(refs, st)

  def body(i, ds):
    u = first + count - 1 - i
    at = pl.ds(pl.multiple_of(u * c, c), c)
    dh_ref[u] = ds.astype(dh_ref.dtype)
    q, do = q_ref[at, :], do_ref[at, :]
    if st.features:
      # Per state row: head [C, bm], keep [bm, 1].
      head, _, keep = _feature_walk_decays(c, refs, at)
      _store_keep(refs, u, keep[:, 0])
      q_head = (q.astype(f32) * head).astype(q.dtype)
      return keep * ds + dot_tn(q_head, do, st.precision)
    decay, head, tail, keep = _chunk_masks(c, refs, at)
    _store_keep(refs, u, keep)
    q_head = (q.astype(f32) * head[:, None]).astype(q.dtype)
    new = keep * ds + dot_tn(q_head, do, st.precision)
    if st.delta:
      # U's cotangent: its reads by the chunk's queries, and by the state it hands on.
      k = refs["k"][at, :]
      scores = dot_nt(q, k, st.precision) * decay
      kt = (k.astype(f32) * tail[:, None]).astype(k.dtype)
      dpseudo = dot_tn(scores.astype(do.dtype), do, st.precision) + dot(kt, ds.astype(k.dtype), st.precision)
      refs["dpseudo"][at, :] = dpseudo.astype(refs["dpseudo"].dtype)
      # U = U~ - W S: the state entering the chunk gets -W^T dU.
      new = new - dot_tn(refs["w"][at, :], dpseudo.astype(k.dtype), st.precision)
    return new

  bm, bv = dh_ref.shape[1], dh_ref.shape[2]
  end = lax.fori_loop(0, count, body, jnp.zeros((bm, bv), f32))
  if "ends" in refs:
    refs["ends"][...] = end


def _split_dstates_kernel(refs: dict, st: _Static):
  """Walks the chunks backwards: writes the cotangent dS of the state leaving each, then
  `dS <- keep dS + local - W^T (kt dS)`.

  Refs: local `[U', H, bv]`, gc `[2, T']`, labels / sees `[T']`, k, w `[T', H]`; output dh `[U', H, bv]`."""
  dh_ref, c, f32 = refs["dh"], st.chunk, jnp.float32

  def body(i, ds):
    u = st.chunks - 1 - i
    at = pl.ds(pl.multiple_of(u * c, c), c)
    dh_ref[u] = ds.astype(dh_ref.dtype)
    _, _, tail, keep = _chunk_masks(c, refs, at)
    k = refs["k"][at, :]
    kt = (k.astype(f32) * tail[:, None]).astype(k.dtype)
    # The pseudo-values' cotangent through the state handed on; its local part is in `local`.
    through = dot(kt, ds.astype(k.dtype), st.precision)
    return keep * ds + refs["local"][u] - dot_tn(refs["w"][at, :], through.astype(k.dtype), st.precision)

  lax.fori_loop(0, st.chunks, body, jnp.zeros(dh_ref.shape[1:], f32))


def _dstates_local_kernel(refs: dict, st: _Static):
  """One chunk, one block of value columns, of the delta rule's split backward walk:
  `(exp(G) q)^T dO - W^T ((decay * q k^T)^T dO)`, the state's cotangent terms that do not read it.

  Refs: q, k, w `[C, M]`, do `[C, bv]`, gc `[2, C]`, labels / sees `[C]`; output local `[M, bv]`.
  """
  f32 = jnp.float32
  p = st.precision
  q, k, w, do = refs["q"][...], refs["k"][...], refs["w"][...], refs["do"][...]
  decay, head, _, _ = _chunk_masks(st.chunk, refs)
  scores = dot_nt(q, k, p) * decay
  q_head = (q.astype(f32) * head[:, None]).astype(q.dtype)
  # The pseudo-values' cotangent from the chunk's own queries (the walk adds the state's share).
  own = dot_tn(scores.astype(do.dtype), do, p)
  refs["local"][...] = dot_tn(q_head, do, p) - dot_tn(w, own.astype(w.dtype), p)


def _grads_kernel(refs: dict, st: _Static):
  """One chunk of one query head: dq, dk and dv (delta rule: dq, dk and dW).

  Refs: q, k `[C, M]`, v, do `[C, V]` (delta rule: v holds U), gc `[2, C]`, h (entering state),
  dh (cotangent of the leaving state) `[M, V]`, labels / sees `[C]`, dpseudo `[C, V]` (delta rule).
  """
  f32 = jnp.float32
  q, k, v, do = refs["q"][...], refs["k"][...], refs["v"][...], refs["do"][...]
  h, dh = refs["h"][...], refs["dh"][...]
  decay, head, tail, _ = _chunk_masks(st.chunk, refs)
  p = st.precision
  qk = dot_nt(q, k, p)
  scores = qk * decay
  d_scores = dot_nt(do, v, p) * decay
  # dq: through the chunk's keys, and through the entering state.
  dq_state = dot_nt(do, h.astype(do.dtype), p) * head[:, None]
  dq = dot(d_scores.astype(k.dtype), k, p) + dq_state
  # dk: through the chunk's queries, and through the state handed on.
  dk_state = dot_nt(v, dh.astype(v.dtype), p) * tail[:, None]
  dk = dot_tn(d_scores.astype(q.dtype), q, p) + dk_state
  refs["dq"][...] = dq.astype(refs["dq"].dtype)
  refs["dk"][...] = dk.astype(refs["dk"].dtype)
  # dL/dG_t: each pair (t, s) weighs exp(G_t - G_s), so it adds its share (dA * A)_ts to row t and
  # takes it from column s; the state's reads and writes likewise. The diagonal cancels exactly here,
  # where q . dq - k . dk would leave its rounding (large beside the off-diagonal terms under strong decay).
  pairs = d_scores * qk
  refs["dG"][...] = (jnp.sum(pairs, axis=1) - jnp.sum(pairs, axis=0)
                     + jnp.sum(q.astype(f32) * dq_state, axis=1) - jnp.sum(k.astype(f32) * dk_state, axis=1))
  if "dv" in refs:
    # The values' cotangent (the delta rule's split walk: the pseudo-values'), from the queries and the state.
    kt = (k.astype(f32) * tail[:, None]).astype(k.dtype)
    dv = dot_tn(scores.astype(do.dtype), do, p) + dot(kt, dh.astype(k.dtype), p)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)
  if st.delta:
    # U = U~ - W S: dW = -dU S^T.
    dpseudo = dv if "dv" in refs else refs["dpseudo"][...]
    refs["dw"][...] = -dot_nt(dpseudo.astype(q.dtype), h.astype(q.dtype), p)


def _factor_terms(refs, st: _Static):
  """One chunk's WY terms in float32: `A [C, C]` (strictly lower), the right-hand sides
  `beta V [C, V]` and `beta gamma K [C, H]`, and the decays, `k . k` and `gamma` they are made of."""
  f32, c = jnp.float32, st.chunk
  k, beta = refs["k"][...], refs["beta"][...]
  decay, head, _, _ = _chunk_masks(c, refs)
  kk = dot_nt(k, k, st.precision)
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  a = jnp.where(rows > cols, beta[:, None] * decay * kk, 0.0)
  r_v = beta[:, None] * refs["v"][...].astype(f32)
  r_k = (beta * head)[:, None] * k.astype(f32)
  return a, r_v, r_k, decay, kk, head


def _unit_lower_inverse(a, scratch, st: _Static):
  """`(I + A)^-1` of a strictly lower `[C, C]` block in float32, without products of A's powers
  (`efficient_attention._delta.unit_lower_inverse` says why); `scratch` is a float32 `[C, C]` ref
  (the kernel's inverse output), which ends holding the inverse.

  A is stored in `scratch` and read back in blocks. Forward substitution inverts each diagonal
  16-row block (step i makes row i, `T_i = e_i - A_i T`, a 16 x 16 product; the blocks side by side
  in one loop), then pairs of inverted blocks merge into blocks twice as large, 16 -> 32 -> ... -> C:
  `[[T_1, 0], [A_21, T_2]]` -> `[[T_1, 0], [-T_2 A_21 T_1, T_2]]`, in place (A_21 is still A's there).
  Products at (near) float32 precision: 16 x 16 ones in the substitution and two per pair in each of
  the `log2(C / 16)` merge levels, where the earlier form (substitution on the whole block-diagonal
  `[C, C]` at once, then Horner's rule for the blocks below) made every product `[C, C]`.
  """
  c = a.shape[0]
  nb = min(_SOLVE_BLOCK, c)
  exact = _exact_precision(st)
  scratch[...] = a
  _block_barrier(st)
  rows = lax.broadcasted_iota(jnp.int32, (nb, nb), 0)
  cols = lax.broadcasted_iota(jnp.int32, (nb, nb), 1)
  eye = jnp.where(rows == cols, 1.0, 0.0)
  starts = range(0, c, nb)
  diagonal = tuple(scratch[pl.ds(o, nb), pl.ds(o, nb)] for o in starts)

  def body(i, ts):
    step = rows == i
    # Rows not yet made are still rows of I; A_i is 0 there (strictly lower), so they add nothing.
    return tuple(jnp.where(step, eye - dot(jnp.where(step, d, 0.0), t, exact), t) for d, t in zip(diagonal, ts))

  for o, t in zip(starts, lax.fori_loop(1, nb, body, (eye,) * len(diagonal))):
    scratch[pl.ds(o, nb), pl.ds(o, nb)] = t
  size = nb
  while size < c:
    _block_barrier(st)
    for o in range(0, c, 2 * size):
      lo, hi = pl.ds(o, size), pl.ds(o + size, size)
      below = dot(scratch[hi, lo], scratch[lo, lo], exact)
      scratch[hi, lo] = -dot(scratch[hi, hi], below, exact)
    size *= 2
  _block_barrier(st)
  return scratch[...]


def _exact_precision(st: _Static):
  """Products of float32 tiles at about float32's precision: three TF32 passes on a GPU (Triton's
  tf32x3), full float32 in the interpreter."""
  return lax.Precision.HIGHEST if st.interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _factors_kernel(refs: dict, st: _Static):
  """One chunk of one key/value head: `T = (I + A)^-1`, `U~ = T beta V`, `W = T beta gamma K`.

  Refs: k `[C, H]`, v `[C, V]`, beta `[C]`, gc `[2, C]`, labels / sees `[C]`; outputs w `[C, H]`,
  u `[C, V]` (k's dtype), inverse `[C, C]` (float32, for the gradient).
  """
  a, r_v, r_k, _, _, _ = _factor_terms(refs, st)
  t = _unit_lower_inverse(a, refs["inverse"], st)
  operand = _factor_operand(refs, st)
  refs["u"][...] = dot(operand(t), operand(r_v), st.precision).astype(refs["u"].dtype)
  refs["w"][...] = dot(operand(t), operand(r_k), st.precision).astype(refs["w"].dtype)


def _factor_operand(refs, st: _Static):
  """The factor kernels' product operands: in the inputs' dtype when it is 16-bit (the products then
  run at that precision, float32 accumulation, as in the other kernels), float32 otherwise. The
  inverse itself is always made in float32."""
  low = refs["k"].dtype
  return (lambda x: x) if jnp.dtype(low).itemsize >= 4 else (lambda x: x.astype(low))


def _factor_grads_kernel(refs: dict, st: _Static):
  """One chunk: dk, dv, dL/dbeta and dL/dG of the factors, from dW and dU~.

  With X = T R (R the right-hand sides): dR = T^T dX and dA = -(dR X^T), strictly lower. Through
  `A_ts = beta_t D_ts (k_t . k_s)` (D the decays): d(k . k) = beta_t D_ts dA_ts, and each pair (t, s)
  weighs `exp(G_t - G_s)`: `dA_ts A_ts` goes to every gate between them (s < i <= t); through
  `beta gamma K`, `gamma_t = exp(G_t)` gives its share to the gates up to t.

  Refs: those of `_factors_kernel`, inverse `[C, C]`, dw `[C, H]`, du `[C, V]`; outputs dk `[C, H]`,
  dv `[C, V]`, dbeta and dg `[C]` (float32).
  """
  f32, p = jnp.float32, st.precision
  operand = _factor_operand(refs, st)
  a, r_v, r_k, decay, kk, head = _factor_terms(refs, st)
  t, beta = refs["inverse"][...], refs["beta"][...]
  k_op = operand(refs["k"][...])  # the product operand: as loaded when 16-bit (no float32 round trip)
  k, v = k_op.astype(f32), refs["v"][...].astype(f32)
  dr_v = dot_tn(operand(t), operand(refs["du"][...]), p)
  dr_k = dot_tn(operand(t), operand(refs["dw"][...]), p)
  # dA = -(dR X^T) = -(dR R^T) T^T: one [C, C] product in place of making X again.
  d_r = dot_nt(operand(dr_v), operand(r_v), p) + dot_nt(operand(dr_k), operand(r_k), p)
  d_a = -dot_nt(operand(d_r), operand(t), p)
  rows = lax.broadcasted_iota(jnp.int32, d_a.shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, d_a.shape, 1)
  d_a = jnp.where(rows > cols, d_a, 0.0)
  d_kk = operand(beta[:, None] * decay * d_a)
  pairs = d_a * a
  y = jnp.sum(dr_k * k, axis=1)  # dL/d(beta_t gamma_t)
  refs["dk"][...] = dot(d_kk, k_op, p) + dot_tn(d_kk, k_op, p) + (beta * head)[:, None] * dr_k
  refs["dv"][...] = beta[:, None] * dr_v
  refs["dbeta"][...] = jnp.sum(decay * kk * d_a, axis=1) + jnp.sum(dr_v * v, axis=1) + head * y
  # dL/dg_i: g_i lies in the exponent of every pair s < i <= t, and of gamma_t for t >= i. Summed pair by
  # pair (the rows t >= i of each column s, by one product with a triangle of ones, then the columns
  # s < i), not as dL/dG's row sums minus column sums, whose reverse cumulative sum cancels large terms.
  later = jnp.where(cols >= rows, 1.0, 0.0)  # [i, t]: t >= i
  below = dot(later, pairs, _exact_precision(st))  # [i, s]: sum over t >= i of the pairs (t, s)
  refs["dg"][...] = (jnp.sum(jnp.where(cols < rows, below, 0.0), axis=1)
                     + jnp.sum(later * (beta * head * y)[None, :], axis=1))


# --------------------------------------------------------------------------- #
# kernels of per-feature gates
# --------------------------------------------------------------------------- #


def _decay(later, earlier):
  """`exp(G_later - G_earlier)` from (hi, lo) pairs of cumulative gates (broadcast against each other),
  the exponent clamped at 0: a decay where `later` is at or after `earlier`, 1 (to be masked) before."""
  return jnp.exp(jnp.minimum((later[0] - earlier[0]) + (later[1] - earlier[1]), 0.0))


def _gate_rows(refs, rows):
  """The (hi, lo) pair of the chunk-local cumulative gates at `rows`, `[rows, M]` each (`refs["gc"]`
  `[2, steps, M]`)."""
  return refs["gc"][0, rows, :], refs["gc"][1, rows, :]


def _feature_walk_decays(c: int, refs, at):
  """Within one chunk, per state row m (per-feature gates, `refs["gc"]` `[2, T', bm]` or `[2, C, bm]`):
  the decays `exp(G_t)` `[C, bm]` of the entering state seen from step t (0 unless the step reads it),
  `exp(G_C - G_s)` `[C, bm]` of key s to the chunk's end (0 unless it is handed on), and `keep [bm, 1]`,
  the factor of the entering state handed on (`_chunk_masks` per feature)."""
  f32 = jnp.float32
  hi, lo = _gate_rows(refs, at)
  # The chunk's last step: per feature its hi is the least (the gates are <= 0, rounding keeps the order).
  hi_last = jnp.min(hi, axis=0)
  lo_last = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, hi.shape, 0) == c - 1, lo, 0.0), axis=0)
  head = jnp.exp(hi + lo)
  tail = jnp.exp((hi_last[None, :] - hi) + (lo_last[None, :] - lo))
  keep = jnp.exp(hi_last + lo_last)[:, None]
  if "labels" in refs:
    lab, sees = refs["labels"][at], refs["sees"][at] == 1
    head = jnp.where(sees[:, None], head, 0.0)
    tail = jnp.where((lab == jnp.max(lab))[:, None], tail, 0.0)
    keep = keep * jnp.min(sees.astype(f32))
  return head, tail, keep


def _state_reads(g, refs, rows):
  """`exp(G_t)` `[c, M]` at `rows` (pair `g`): the decay of the entering state seen from each query
  (0 unless the query's run is the one entering the chunk)."""
  head = jnp.exp(g[0] + g[1])
  if "labels" in refs:
    head = jnp.where(refs["sees"][rows][:, None] == 1, head, 0.0)
  return head


def _live(x, refs, rows):
  """`x [c, C]` (queries at `rows`, every key of the chunk), 0 where the pair's runs differ."""
  if "labels" not in refs:
    return x
  return jnp.where(refs["labels"][rows][:, None] == refs["labels"][...][None, :], x, 0.0)


def _reference_scales(g, g_all, refs, i: int, st: _Static):
  """Sub-chunk i > 0 against the earlier ones, through its first step r: query scales `exp(G_t - G_r)`
  `[c, M]` (pair `g` at its steps) and key scales `exp(G_r - G_s)` `[C, M]` (pair `g_all`), 0 for s >= r.
  Both are decays, and `(q_t exp(G_t - G_r)) . (k_s exp(G_r - G_s))` is the pair's weight."""
  r = i * st.sub_chunk
  g_r = _gate_rows(refs, pl.ds(r, 1))
  steps = lax.broadcasted_iota(jnp.int32, g_all[0].shape, 0)
  return _decay(g, g_r), jnp.where(steps < r, _decay(g_r, g_all), 0.0)


def _diagonal_scores(q, g, refs, i: int, st: _Static):
  """The pairs within sub-chunk i, key by key: `sum_m q_tm k_sm exp(G_tm - G_sm)` at column s of
  `[c, C]` for s <= t in the sub-chunk (0 elsewhere, segments not applied). `q [c, M]`, pair `g`."""
  f32 = jnp.float32
  c, start = st.sub_chunk, i * st.sub_chunk
  t = lax.broadcasted_iota(jnp.int32, (c, 1), 0) + start
  cols = lax.broadcasted_iota(jnp.int32, (c, st.chunk), 1)
  qf = q.astype(f32)

  def body(j, scores):
    s = start + j
    at = pl.ds(s, 1)
    a = jnp.sum(qf * refs["k"][at, :].astype(f32) * _decay(g, _gate_rows(refs, at)), axis=1)
    return jnp.where((cols == s) & (t >= s), a[:, None], scores)

  return lax.fori_loop(0, c, body, jnp.zeros((c, st.chunk), f32))


def _diagonal_grads(q, do, g, refs, i: int, st: _Static):
  """The pairs within sub-chunk i, key by key: their weights `[c, C]` (as `_diagonal_scores`), and
  the shares of dq and dk `[c, M]` of the pairs s < t (the pairs t = s are left to the caller)."""
  f32 = jnp.float32
  c, start = st.sub_chunk, i * st.sub_chunk
  t = lax.broadcasted_iota(jnp.int32, (c, 1), 0) + start
  cols = lax.broadcasted_iota(jnp.int32, (c, st.chunk), 1)
  qf, dof = q.astype(f32), do.astype(f32)
  runs = refs["labels"][pl.ds(start, c)][:, None] if "labels" in refs else None

  def body(j, carry):
    scores, dq, dk = carry
    s = start + j
    at = pl.ds(s, 1)
    k_s, v_s = refs["k"][at, :].astype(f32), refs["v"][at, :].astype(f32)
    decay = _decay(g, _gate_rows(refs, at))
    a = jnp.sum(qf * k_s * decay, axis=1)
    scores = jnp.where((cols == s) & (t >= s), a[:, None], scores)
    later = t > s
    if runs is not None:
      later = later & (runs == refs["labels"][at][None, :])
    # dL/dA_ts = do_t . v_s, [c, 1]
    d_a = jnp.where(later, jnp.sum(dof * v_s, axis=1)[:, None], 0.0)
    dq = dq + d_a * k_s * decay
    dk = jnp.where(t == s, jnp.sum(d_a * qf * decay, axis=0)[None, :], dk)
    return scores, dq, dk

  m = q.shape[1]
  init = (jnp.zeros((c, st.chunk), f32), jnp.zeros((c, m), f32), jnp.zeros((c, m), f32))
  return lax.fori_loop(0, c, body, init)


def _feature_outputs_kernel(refs: dict, st: _Static):
  """One chunk, one block of value columns, per-feature gates, sub-chunk by sub-chunk of queries:
  `A v + (exp(G) * q) h` with the pairs' weights `A_ts = sum_m q_tm k_sm exp(G_tm - G_sm)`, the
  earlier sub-chunks' through one product at a reference point, the sub-chunk's own key by key.

  Refs: q `[C, M]`, k `[C, M]`, v `[C, bv]`, gc `[2, C, M]`, h `[M, bv]`, labels / sees `[C]`; output o `[C, bv]`.
  """
  f32, p = jnp.float32, st.precision
  k, v, h = refs["k"][...], refs["v"][...], refs["h"][...]
  g_all = _gate_rows(refs, slice(None))
  for i in range(st.chunk // st.sub_chunk):
    rows = pl.ds(i * st.sub_chunk, st.sub_chunk)
    q, g = refs["q"][rows, :], _gate_rows(refs, rows)
    scores = _diagonal_scores(q, g, refs, i, st)
    if i:
      q_scale, k_scale = _reference_scales(g, g_all, refs, i, st)
      q_scaled = (q.astype(f32) * q_scale).astype(q.dtype)
      k_scaled = (k.astype(f32) * k_scale).astype(k.dtype)
      scores = scores + dot_nt(q_scaled, k_scaled, p)
    scores = _live(scores, refs, rows)
    q_head = (q.astype(f32) * _state_reads(g, refs, rows)).astype(q.dtype)
    out = dot(scores.astype(v.dtype), v, p) + dot(q_head, h, p)
    refs["o"][rows, :] = out.astype(refs["o"].dtype)


def _feature_grads_kernel(refs: dict, st: _Static):
  """One chunk of one query head, per-feature gates: dq, dk, dv and dL/dG `[C, M]`, sub-chunk by
  sub-chunk of queries (the pairs made as in `_feature_outputs_kernel`).

  dL/dG_tm = q_tm dq_tm - k_tm dk_tm, the pairs t = s (decay 1, cancelling exactly) left out of both.
  Refs: q, k `[C, M]`, v, do `[C, V]`, gc `[2, C, M]`, h (entering state), dh (cotangent of the
  leaving state) `[M, V]`, labels / sees `[C]`.
  """
  f32, p = jnp.float32, st.precision
  k, v, h, dh = refs["k"][...], refs["v"][...], refs["h"][...], refs["dh"][...]
  g_all = _gate_rows(refs, slice(None))
  # The keys handed on: dk and dv through the cotangent of the leaving state.
  _, tail, _ = _feature_walk_decays(st.chunk, refs, slice(None))
  dk_state = dot_nt(v, dh.astype(v.dtype), p) * tail
  dv = dot((k.astype(f32) * tail).astype(k.dtype), dh.astype(k.dtype), p)
  # dk of the pairs across sub-chunks, [C, M].
  dk_pairs = jnp.zeros_like(dk_state)
  for i in range(st.chunk // st.sub_chunk):
    rows = pl.ds(i * st.sub_chunk, st.sub_chunk)
    q, do, g = refs["q"][rows, :], refs["do"][rows, :], _gate_rows(refs, rows)
    qf, k_rows = q.astype(f32), refs["k"][rows, :].astype(f32)
    scores, dq, dk = _diagonal_grads(q, do, g, refs, i, st)
    if i:
      q_scale, k_scale = _reference_scales(g, g_all, refs, i, st)
      q_scaled = (qf * q_scale).astype(q.dtype)
      k_scaled = (k.astype(f32) * k_scale).astype(k.dtype)
      scores = scores + dot_nt(q_scaled, k_scaled, p)
      # dL/dA of the sub-chunk's queries (keys at or after r have 0 scales).
      d_scores = _live(dot_nt(do, v, p), refs, rows).astype(k.dtype)
      dq = dq + dot(d_scores, k_scaled, p) * q_scale
      dk_pairs = dk_pairs + dot_tn(d_scores, q_scaled, p) * k_scale
    dv = dv + dot_tn(_live(scores, refs, rows).astype(do.dtype), do, p)
    dq = dq + dot_nt(do, h.astype(do.dtype), p) * _state_reads(g, refs, rows)
    # dq and dk without the pairs t = s so far: dL/dG's queries' side here, its keys' side but for
    # the pairs with later sub-chunks and the state handed on, which follow.
    refs["dG"][rows, :] = qf * dq - k_rows * dk
    d_same = jnp.sum(do.astype(f32) * refs["v"][rows, :].astype(f32), axis=1)[:, None]
    refs["dq"][rows, :] = (dq + d_same * k_rows).astype(refs["dq"].dtype)
    refs["dk"][rows, :] = dk + d_same * qf
  dk = dk_pairs + dk_state
  # The rows just stored by sub-chunk are read back whole, by other threads: wait for the stores.
  _block_barrier(st)
  refs["dk"][...] += dk
  refs["dG"][...] -= k.astype(f32) * dk
  refs["dv"][...] = dv.astype(refs["dv"].dtype)


def _block_barrier(st: _Static) -> None:
  """All threads of the program wait here, their earlier stores visible to the loads that follow (a
  no-op in the interpreter, which runs a program as one thread)."""
  if st.interpret:
    return
  from jax.experimental.pallas import triton as pltriton

  pltriton.debug_barrier()


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


def gated_linear_attention_reference(q, k, v, gates, *, segment_ids=None) -> jax.Array:
  """Dense `[B, T, N, Hv]`: `sum_{s <= t, same run} exp(G_t - G_s) (q_t . k_s) v_s`, G = cumsum(gates)
  (per-feature gates `[B, T, K, M]`: `sum_{s <= t, same run} sum_m q_tm k_sm exp(G_tm - G_sm) v_s`).

  The reference of `gated_linear_attention`, building `[B, N, T, T]` (`[B, N, T, T, M]` per
  feature); computes in the inputs' precision (float64 under `jax.enable_x64` for tests). The
  delta rule's recurrence has no dense form here: its reference is `efficient_attention`'s XLA
  path and the tests' float64 recurrence.
  """
  t, n, kh = q.shape[1], q.shape[2], k.shape[2]
  k, v = (jnp.repeat(x, n // kh, axis=2) for x in (k, v))
  per_step = gates.ndim == 3
  # [B, N, T, 1 | M]
  g = (gates[..., None] if per_step else gates).astype(q.dtype)
  cum = jnp.cumsum(jnp.repeat(g, n // kh, axis=2), axis=1).transpose(0, 2, 1, 3)
  runs = None if segment_ids is None else common.run_labels(segment_ids)
  live = common.dense_mask(t, t, is_causal=True, segment_ids=None if runs is None else (runs, runs))
  # [B, N, T, T, 1 | M]
  diff = cum[..., :, None, :] - cum[..., None, :, :]
  weights = jnp.where(live[..., None], jnp.exp(jnp.where(live[..., None], diff, 0.0)), 0.0)
  if per_step:
    scores = jnp.einsum("btnm,bsnm->bnts", q, k) * weights[..., 0]
  else:
    scores = jnp.einsum("btnm,bsnm,bntsm->bnts", q, k, weights)
  return jnp.einsum("bnts,bsnh->btnh", scores, v)
