"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along time by learned matrices E, F `[P, T_max]`
(the paper's k = P): `softmax(q (E K)^T * scale) (F V)` (sec. 4, eq. 7), so the
logits are `[T, P]` instead of `[T, S]`. Sequences shorter than T_max use the
first S columns of E and F.

Einsum alphabet: b batch, t query time, s key time, k key/value heads, g query
heads per key/value head (G = N / K), n query heads, p projected length, h head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_attention import _checks
from efficient_attention._masking import dense_mask, drop_masked, split_heads


def linformer_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    e_proj: jax.Array,
    f_proj: jax.Array,
    *,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Linformer attention with learned key/value projections along time.

  Masking. A key-padding mask (T-axis 1: `[B|1, N|1, 1, S|1]`) removes the
  padded keys before the projection (they are zeroed in K and V), so every
  query shares `E K` and `F V`: O(P * H) memory per head and O(S * P * H) work.
  A general mask (T-axis T) or `segment_ids` give each query its own key set,
  honoured exactly by the per-query projection `K'_t = sum_s E[:, s] m_ts K_s`
  (V'_t likewise): O(T * P * H) memory per head (plus the `[T, S]` boolean
  mask and an `[S, P, H]` intermediate) and O(T * S * P * H) work. Either way
  a query whose key set is empty returns 0 with 0 gradient.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0`.
    v: `[B, S, K, Hv]` values.
    e_proj: key projection `[P, T_max]` shared by every head, or `[K, P, T_max]`
      per key/value head; `S <= T_max`.
    f_proj: value projection, the same shape as `e_proj`.
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend.
    segment_ids: int `[B, T]` (when T == S) or a (`[B, T]`, `[B, S]`) pair.
    is_causal: must be False: the projection along time mixes future keys into
      every projected slot, so Linformer has no causal form.
    scale: logit scale, default `H**-0.5`.
    bias: must be None: the logits live in projected space, where a `[T, S]`
      bias has no meaning.
    implementation: None or "xla".

  Returns:
    `[B, T, N, Hv]` in the input dtype; accumulation is in float32 (or in the
    projections' dtype when wider).
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla",), family="linformer_attention")
  _checks.check_causal(is_causal, dims, family="linformer_attention")
  _checks.reject("linformer_attention", is_causal=is_causal, bias=bias)
  _check_projections(e_proj, f_proj, dims)
  mask = _checks.check_mask(mask, dims)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  empty = _checks.empty_output(q, dims)
  if empty is not None:
    return empty
  # Garbage under the mask (NaN, inf) must not reach live rows or any gradient.
  q, k, v = drop_masked(q, k, v, mask, dims)

  acc = functools.reduce(jnp.promote_types, (q.dtype, e_proj.dtype, f_proj.dtype, jnp.float32))
  per_query = ids is not None or (mask is not None and mask.shape[2] > 1)
  live = dense_mask(dims.q_len if per_query else 1, dims.kv_len, mask=mask, segment_ids=ids)
  # [B|1, K|1, G|1, T|1, S], or None when every key is live
  live = None if live is None else split_heads(live, dims.num_kv_heads, dims.group)
  kp = _project(_per_kv_head(e_proj, dims.kv_len).astype(acc), k.astype(acc), live)
  vp = _project(_per_kv_head(f_proj, dims.kv_len).astype(acc), v.astype(acc), live)
  # [B, T, K, G, H]
  qg = q.reshape(dims.batch, dims.q_len, dims.num_kv_heads, dims.group, dims.head_dim).astype(acc)
  # [B, K, G, T, P]
  logits = jnp.einsum("btkgh,bkgtph->bkgtp", qg, kp) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  # [B, T, K, G, Hv]
  out = jnp.einsum("bkgtp,bkgtph->btkgh", weights, vp)
  if live is not None:
    # An empty key set projects to K' = V' = 0; zero the row explicitly so its
    # value and gradient are exactly 0. [B|1, K|1, G|1, T|1] -> [B|1, T|1, K|1, G|1, 1]
    row_live = jnp.any(live, axis=-1).transpose(0, 3, 1, 2)[..., None]
    out = jnp.where(row_live, out, 0.0)
  return out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.v_head_dim).astype(q.dtype)


def _check_projections(e_proj, f_proj, dims: _checks.Dims) -> None:
  for name, proj in (("e_proj", e_proj), ("f_proj", f_proj)):
    if not hasattr(proj, "shape") or not hasattr(proj, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(proj).__name__}")
    if not jnp.issubdtype(proj.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {name}.dtype={proj.dtype}")
    if proj.ndim not in (2, 3):
      raise ValueError(f"{name} must be [P, T_max] or [K, P, T_max], got {name}.shape={proj.shape}")
    if proj.shape[-2] == 0:
      raise ValueError(f"{name} projects to P=0 slots ({name}.shape={proj.shape}); the projected length must be >= 1")
    if proj.ndim == 3 and proj.shape[0] != dims.num_kv_heads:
      raise ValueError(
          f"per-head {name}.shape={proj.shape} must have K={dims.num_kv_heads} key/value heads on axis 0"
      )
    if proj.shape[-1] < dims.kv_len:
      raise ValueError(
          f"key length S={dims.kv_len} exceeds the projection's T_max={proj.shape[-1]} ({name}.shape={proj.shape})"
      )
  if e_proj.shape != f_proj.shape:
    raise ValueError(f"e_proj and f_proj must have the same shape, got {e_proj.shape=} and {f_proj.shape=}")


def _per_kv_head(proj: jax.Array, kv_len: int) -> jax.Array:
  """`[P, T_max]` or `[K, P, T_max]` -> `[K|1, P, S]` (the first S columns)."""
  proj = proj[..., :kv_len]
  return proj if proj.ndim == 3 else proj[None]


def _project(proj: jax.Array, x: jax.Array, live: jax.Array | None) -> jax.Array:
  """Projects keys or values along time, dropping keys that are not live.

  `out[b, k, g, t, p, h] = sum_s proj[k, p, s] live[b, k, g, t, s] x[b, s, k, h]`
  for proj `[K|1, P, S]`, x `[B, S, K, H]`, live bool `[B|1, K|1, G|1, T|1, S]` or None.
  Returns `[B, K, G|1, T|1, P, H]`.
  """
  if live is None:
    # [B, K, P, H]
    return jnp.einsum("kps,bskh->bkph", proj, x)[:, :, None, None]
  if live.shape[3] == 1:
    # Key padding: zero the padded keys, then project once for every query.
    # [B, K, G|1, 1, S, H]
    kept = jnp.where(live[..., None], x.transpose(0, 2, 1, 3)[:, :, None, None], 0.0)
    return jnp.einsum("kps,bkgtsh->bkgtph", proj, kept)
  # Per-query projection K'_t = E diag(m_t) K, as one matmul over s.
  # [B, K, S, P, H]
  weighted = jnp.einsum("kps,bskh->bksph", proj, x)
  # [B, K, G|1, T, P, H]
  return jnp.einsum("bkgts,bksph->bkgtph", live.astype(x.dtype), weighted)


@functools.partial(jax.jit, static_argnames=("scale",))
def linformer_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    e_proj: jax.Array,
    f_proj: jax.Array,
    *,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Per-query projection under the dense mask, in the inputs' precision (float64 under `jax.enable_x64`).

  Heads are repeated for GQA; `K'_t = sum_s E[:, s] m_ts K_s`, `V'_t` likewise,
  `out_t = softmax(q_t K'_t^T * scale) V'_t`, and rows with no live key are 0.
  """
  b, t, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  k = jnp.repeat(k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  e, f = e_proj[..., :s], f_proj[..., :s]
  if e.ndim == 2:
    e, f = jnp.broadcast_to(e, (n,) + e.shape), jnp.broadcast_to(f, (n,) + f.shape)
  else:
    e, f = jnp.repeat(e, n // kh, axis=0), jnp.repeat(f, n // kh, axis=0)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if segment_ids is not None and not isinstance(segment_ids, (tuple, list)):
    segment_ids = (segment_ids, segment_ids)
  live = dense_mask(t, s, mask=mask, segment_ids=segment_ids)
  live = jnp.ones((b, n, t, s), bool) if live is None else jnp.broadcast_to(live, (b, n, t, s))
  m = live.astype(q.dtype)
  # [B, N, T, P, H]
  kp = jnp.einsum("nps,bnts,bsnh->bntph", e, m, k)
  vp = jnp.einsum("nps,bnts,bsnh->bntph", f, m, v)
  # [B, N, T, P]
  weights = jax.nn.softmax(jnp.einsum("btnh,bntph->bntp", q, kp) * scale, axis=-1)
  out = jnp.einsum("bntp,bntph->btnh", weights, vp)
  # [B, N, T] -> [B, T, N, 1]
  row_live = jnp.any(live, axis=-1).transpose(0, 2, 1)[..., None]
  return jnp.where(row_live, out, 0.0)
