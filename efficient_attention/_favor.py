"""FAVOR+ (Performer, Choromanski et al. 2021): random-feature attention in linear time.

A random feature map `phi` with `E[phi(x) . phi(y)] = exp(x . y)` turns softmax
attention into kernelised attention, computed by the linear core of `_linear.py`
(so masks, segment ids, causal chunking and decoding behave as in
`linear_attention`). Queries and keys are multiplied by `scale**0.5`, so
`x . y = q . k * scale`. With projection rows `w_1..w_M` (`features [M, H]`):

- "softmax": `phi(x) = exp(w . x - |x|^2 / 2) / sqrt(M)`, positive, so the
  denominator never cancels (sec. 2.3, Lemma 1).
- "trig": `phi(x) = exp(|x|^2 / 2) [sin(w . x), cos(w . x)] / sqrt(M)`, 2M features
  (sec. 2.2); can give near-zero or negative denominators.
- "relu": `phi(x) = relu(w . x) / sqrt(M)`, the generalised attention of sec. 2.2
  (no longer an estimate of softmax; it takes no `scale`, which would cancel).

Stabilisers: a factor common to all features of a query cancels in the ratio, so
"softmax" query features are divided by their per-row maximum and the "trig"
query factor `exp(|x|^2 / 2)` is dropped. Key features are divided by one
constant per (batch, key/value head): the maximum of `exp(w . x - |x|^2 / 2)`
("softmax") or `exp(|x|^2 / 2)` ("trig") over live keys (padded or masked keys
are excluded: they may be huge). Both are under `stop_gradient`; the output does
not depend on them, so gradients are exact. With them, logits `q . k * scale` of
50 and more stay finite in float32. "relu" needs none.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, M features, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attention import _checks, _linear
from efficient_attention._linear import LinearState
from efficient_attention._masking import drop_masked
from pallas import favor, linear
from pallas.favor import LOG_FEATURE_FLOOR

KERNELS = ("softmax", "trig", "relu")
SCALINGS = ("chi", "sqrt_d")


def orthogonal_random_features(
    key: jax.Array,
    num_features: int,
    head_dim: int,
    *,
    orthogonal: bool = True,
    scaling: str = "chi",
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Random projection rows `[M, H]` for FAVOR+ (Choromanski et al. 2021, sec. 2.4).

  Args:
    key: a PRNG key.
    num_features: M, the number of rows.
    head_dim: H.
    orthogonal: True stacks ceil(M / H) independent H x H blocks with orthonormal
      rows (QR of Gaussian matrices) and keeps the first M rows; False draws
      independent directions.
    scaling: row norms. "chi": independent norms of H-dim standard Gaussian
      vectors, so each row is marginally N(0, I_H) ("iid" rows when
      `orthogonal=False`); "sqrt_d": every row has norm sqrt(H).
    dtype: floating dtype of the result.

  Returns:
    `[M, H]` projection rows.
  """
  _check_feature_options(num_features, head_dim, orthogonal, scaling, dtype)
  acc = jnp.promote_types(dtype, jnp.float32)
  block_key, norm_key = jax.random.split(key)
  if orthogonal:
    num_blocks = -(-num_features // head_dim)
    gauss = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), acc)
    q, r = jnp.linalg.qr(gauss)
    # Signs of diag(R) make Q Haar-distributed (Mezzadri 2007, "How to generate random matrices").
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
  else:
    gauss = jax.random.normal(block_key, (num_features, head_dim), acc)
    directions = gauss / jnp.linalg.norm(gauss, axis=-1, keepdims=True)
  if scaling == "chi":
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), acc), axis=-1)
  else:
    norms = jnp.full((num_features,), math.sqrt(head_dim), acc)
  return (directions * norms[:, None]).astype(dtype)


def redraw(
    key: jax.Array, features: jax.Array, *, orthogonal: bool = True, scaling: str = "chi"
) -> jax.Array:
  """New projection rows of the same shape `[M, H]` and dtype from a new key."""
  if not hasattr(features, "shape") or features.ndim != 2:
    raise ValueError(f"features must be [M, H], got {getattr(features, 'shape', type(features).__name__)}")
  return orthogonal_random_features(
      key, features.shape[0], features.shape[1], orthogonal=orthogonal, scaling=scaling, dtype=features.dtype
  )


def favor_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    features: jax.Array,
    *,
    kernel: str = "softmax",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """FAVOR+ attention: `phi(q) (phi(k)^T v) / phi(q) sum_s phi(k_s)`, linear in T.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0` (GQA when K < N).
    v: `[B, S, K, Hv]` values.
    features: `[M, H]` projection rows from `orthogonal_random_features`.
    kernel: "softmax" (positive features), "trig" or "relu".
    is_causal: query t attends keys s <= t; needs T == S. Chunked, linear memory.
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend. A T axis of size 1
      is a key-padding mask (linear memory); a T axis of size T is honoured exactly
      through an O(T * S) masked quadratic form.
    segment_ids: optional int `[B, T]` (T == S), shared by queries and keys;
      attend within maximal runs of equal ids (an id recurring after another id
      starts a new segment).
    scale: logit scale, default `H**-0.5`; q and k are each multiplied by `scale**0.5`.
      kernel="relu" takes none (it would cancel): it must then be None.
    chunk_size: time steps per chunk of the causal / segmented form (static);
      "pallas": a power of two >= 16. None: 64 for "xla", the kernel's choice
      for "pallas" (`pallas.LinearBlockSizes`).
    bias: not supported; must be None.
    implementation: None or "xla" (the default), or "pallas": the chunked
      causal kernel `pallas.causal_linear_attention` (is_causal=True; honours
      segment_ids and key-padding masks, not masks with a T axis). With
      kernel="softmax" and no key mask, the features too come from Pallas
      kernels (`pallas.causal_favor_attention`) where Pallas' Triton lowering
      runs; otherwise from XLA. The kernel's backend is
      `pallas.linear.default_backend` (jax_triton on a GPU whose JAX lacks the
      Triton lowering).

  Returns:
    `[B, T, N, Hv]` in the input dtype; rows whose denominator is exactly 0 (no
    live key) are 0 with 0 gradient.
  """
  family = "favor_attention"
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla", "pallas"), family=family)
  _checks.reject(family, bias=bias)
  _check_kernel(kernel)
  _check_features(features, dims.head_dim)
  mask = _checks.check_mask(mask, dims)
  ids = _checks.check_shared_segment_ids(segment_ids, dims, family=family)
  scale = _check_scale(scale, kernel, dims, family=family)
  _checks.check_causal(is_causal, dims, family=family, need_square=True)
  chunk_size = _linear.check_chunk_size(chunk_size)
  pallas = implementation == "pallas"
  if pallas:
    _linear.check_pallas_options(q.dtype, mask, is_causal, chunk_size, family=family)
  empty = _checks.empty_output(q, dims)
  if empty is not None:
    return empty
  return _favor_attention(
      q, k, v, features, mask, ids, kernel=kernel, scale=scale, is_causal=is_causal, chunk_size=chunk_size,
      dims=dims, pallas=pallas,
  )


# Options are static and checked by the caller; eager calls compile once per shape.
@functools.partial(jax.jit, static_argnames=("kernel", "scale", "is_causal", "chunk_size", "dims", "pallas"))
def _favor_attention(q, k, v, features, mask, ids, *, kernel, scale, is_causal, chunk_size, dims, pallas):
  acc = jnp.promote_types(q.dtype, jnp.float32)
  # Garbage under the mask (NaN, inf) must not reach live rows or any gradient.
  q, k, v = drop_masked(q, k, v, mask, dims)
  w = features.astype(acc)
  plan = _linear.plan_masks(mask, ids, is_causal, dims)
  if (pallas and kernel == "softmax" and _linear.live_keys(plan, dims) is None and dims.kv_len > 0
      and linear.default_backend() == "triton"):
    # Every key live: features from Pallas kernels, and one custom VJP over them and the chunked kernel
    # (where the Pallas-Triton lowering runs; else features from XLA and the kernel through jax_triton).
    return favor.causal_favor_attention(q, k, v, features, scale=scale, segment_ids=plan.ids,
                                        block_sizes=linear.LinearBlockSizes(chunk=chunk_size))
  phi_q = _query_features(kernel, q.astype(acc) * math.sqrt(scale), w)
  x_k = k.astype(acc) * math.sqrt(scale)
  # [B, S, K, M]
  wx = jnp.einsum("bskh,mh->bskm", x_k, w)
  log_factor = _key_log_factor(kernel, x_k, wx)
  if log_factor is not None:
    live = _linear.live_keys(plan, dims)
    # [B, 1, K, 1]: max over live keys; 0 where a head has none (its features are 0).
    masked = log_factor if live is None else jnp.where(live[..., None], log_factor, -jnp.inf)
    stabiliser = jnp.max(masked, axis=(1, 3), keepdims=True)
    stabiliser = jax.lax.stop_gradient(jnp.where(jnp.isfinite(stabiliser), stabiliser, 0.0))
    # Live keys' stabilised log features are floored at LOG_FEATURE_FLOOR: a causal prefix whose keys all sit
    # far below the stabiliser would otherwise have a denormal denominator, finite in value but with an
    # infinite gradient (d(n/d)/dd = -n/d^2); masked keys get -inf (feature 0).
    log_factor = jnp.maximum(log_factor - stabiliser, LOG_FEATURE_FLOOR)
    if live is not None:
      log_factor = jnp.where(live[..., None], log_factor, -jnp.inf)
  phi_k = _key_features(kernel, wx, log_factor)
  if pallas:
    return _linear.attend_pallas(phi_q, phi_k, v, plan, chunk_size=chunk_size, dims=dims, dtype=q.dtype)
  out = _linear.attend(phi_q, phi_k, v, plan, is_causal=is_causal, chunk_size=chunk_size or _linear.XLA_CHUNK_SIZE,
                       dims=dims)
  return out.astype(q.dtype)


def favor_attention_step(
    state: LinearState,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    features: jax.Array,
    *,
    kernel: str = "softmax",
    scale: float | None = None,
) -> tuple[LinearState, jax.Array]:
  """One causal FAVOR+ decoding step in O(1) memory.

  The key stabiliser is a running maximum kept in the state; when a key raises
  it, the carried sums are rescaled by `exp(old - new)`. Stepping through a
  sequence equals `favor_attention(..., is_causal=True)` to float tolerance.

  Args:
    state: from `init_state(B, K, M', Hv)` with M' = M ("softmax", "relu") or
      2 * M ("trig"), or a previous step.
    q_t: `[B, N, H]` query of this step.
    k_t: `[B, K, H]` key of this step.
    v_t: `[B, K, Hv]` value of this step.
    features: `[M, H]` projection rows.
    kernel: as in `favor_attention`.
    scale: as in `favor_attention`.

  Returns:
    The new state and the output `[B, N, Hv]` in the input dtype.
  """
  family = "favor_attention_step"
  dims = _linear.check_step_inputs(q_t, k_t, v_t, family=family)
  _check_kernel(kernel)
  _check_features(features, dims.head_dim)
  scale = _check_scale(scale, kernel, dims, family=family)
  num_features = 2 * features.shape[0] if kernel == "trig" else features.shape[0]
  _linear.check_state(state, dims, num_features, family=family)
  return _favor_attention_step(state, q_t, k_t, v_t, features, kernel=kernel, scale=scale)


@functools.partial(jax.jit, static_argnames=("kernel", "scale"))
def _favor_attention_step(state, q_t, k_t, v_t, features, *, kernel, scale):
  w = features.astype(jnp.float32)
  phi_q = _query_features(kernel, q_t.astype(jnp.float32) * math.sqrt(scale), w)
  x_k = k_t.astype(jnp.float32) * math.sqrt(scale)
  # [B, K, M]
  wx = jnp.einsum("bkh,mh->bkm", x_k, w)
  log_factor = _key_log_factor(kernel, x_k, wx)
  stabiliser = state.stabiliser
  if log_factor is not None:
    # [B, K]
    stabiliser = jax.lax.stop_gradient(jnp.maximum(stabiliser, jnp.max(log_factor, axis=-1)))
    log_factor = log_factor - stabiliser[..., None]
  phi_k = _key_features(kernel, wx, log_factor)
  state, out = _linear.recurrent_update(state, phi_q, phi_k, v_t, stabiliser)
  return state, out.astype(q_t.dtype)


def favor_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    features: jax.Array,
    *,
    kernel: str = "softmax",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Dense reference in the inputs' precision (use float64 inputs under `jax.enable_x64`).

  Unstabilised features; the whole `[B, N, T, S]` matrix `phi(q) phi(k)^T` is built.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  w = features.astype(q.dtype)

  def phi(x):
    x = x * scale**0.5
    wx = jnp.einsum("...h,mh->...m", x, w)
    half_sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if kernel == "softmax":
      return jnp.exp(wx - half_sq) / math.sqrt(w.shape[0])
    if kernel == "trig":
      return jnp.exp(half_sq) * jnp.concatenate([jnp.sin(wx), jnp.cos(wx)], axis=-1) / math.sqrt(w.shape[0])
    return jax.nn.relu(wx) / math.sqrt(w.shape[0])

  return linear.kernel_attention_reference(
      phi(q), phi(k), v, is_causal=is_causal, mask=mask, segment_ids=segment_ids
  )


def _query_features(kernel: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`[..., H]` scaled queries -> `[..., M']` features, up to a per-row factor (it cancels)."""
  wx = jnp.einsum("...h,mh->...m", x, w)
  norm = 1.0 / math.sqrt(w.shape[0])
  if kernel == "softmax":
    # exp(w.x - |x|^2/2) / exp(max_m w.x - |x|^2/2): the row max is the stabiliser.
    return jnp.exp(wx - jax.lax.stop_gradient(jnp.max(wx, axis=-1, keepdims=True))) * norm
  if kernel == "trig":
    # The factor exp(|x|^2 / 2) is common to the row's features and dropped.
    return jnp.concatenate([jnp.sin(wx), jnp.cos(wx)], axis=-1) * norm
  return jax.nn.relu(wx) * norm


def _key_log_factor(kernel: str, x: jax.Array, wx: jax.Array) -> jax.Array | None:
  """Log of the key features' magnitude, which the stabiliser bounds: `[..., M]`, `[..., 1]` or None."""
  if kernel == "softmax":
    return wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if kernel == "trig":
    return 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  return None


def _key_features(kernel: str, wx: jax.Array, log_factor: jax.Array | None) -> jax.Array:
  """`[..., M']` key features from `wx = w . x` and the stabilised log factor."""
  norm = 1.0 / math.sqrt(wx.shape[-1])
  if kernel == "softmax":
    return jnp.exp(log_factor) * norm
  if kernel == "trig":
    return jnp.exp(log_factor) * jnp.concatenate([jnp.sin(wx), jnp.cos(wx)], axis=-1) * norm
  return jax.nn.relu(wx) * norm


def _check_kernel(kernel: Any) -> None:
  if kernel not in KERNELS:
    raise ValueError(f"unknown {kernel=}; valid: {', '.join(map(repr, KERNELS))}")


def _check_features(features: Any, head_dim: int) -> None:
  if not hasattr(features, "shape") or not hasattr(features, "dtype"):
    raise TypeError(f"features must be an [M, H] array, got {type(features).__name__}")
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise TypeError(f"features must be floating point, got {features.dtype=}")
  if features.ndim != 2 or features.shape[1] != head_dim:
    raise ValueError(f"features must be [M, H] with H = {head_dim} (the q/k head dim), got {features.shape=}")
  if features.shape[0] == 0:
    raise ValueError(f"features must have at least one row (M >= 1), got {features.shape=}")


def _check_scale(scale: Any, kernel: str, dims: _checks.Dims, *, family: str) -> float:
  """The logit scale; "relu" features take none (relu is positively homogeneous: a scale cancels)."""
  if kernel == "relu" and scale is not None:
    raise ValueError(f"{family}(kernel='relu') has no logit scale (relu features are positively homogeneous, "
                     f"so a scale cancels in the ratio), got {scale=}; leave it unset")
  return _checks.check_scale(scale, dims)


def _check_feature_options(num_features: Any, head_dim: Any, orthogonal: Any, scaling: Any, dtype: Any) -> None:
  for name, size in (("num_features", num_features), ("head_dim", head_dim)):
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"{name} must be a positive int, got {name}={size!r}")
  if not isinstance(orthogonal, bool):
    raise TypeError(f"orthogonal must be a bool, got {orthogonal!r}")
  if scaling not in SCALINGS:
    raise ValueError(f"unknown {scaling=}; valid: {', '.join(map(repr, SCALINGS))}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating point, got {dtype=}")
