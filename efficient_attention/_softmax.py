"""Exact softmax attention: an XLA path, cuDNN through `jax.nn` and the Pallas flash kernel.

Its reference, `softmax_attention_reference`, is defined beside the kernel in `pallas.softmax`.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K query heads per key/value head, H head dim.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from efficient_attention import _checks
from efficient_attention._masking import drop_masked, mask_infinite_bias, padding_as_segment_ids, split_heads
from pallas.common import dense_mask
from pallas.softmax import flash_attention, softmax_attention_reference  # noqa: F401  (exported by the package)

# Large finite negative logit: masked entries get exactly zero weight without
# creating inf - inf = NaN when a whole row is masked.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Exact multi-head attention `softmax(q k^T * scale + bias) v`.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0` (GQA when K < N).
    v: `[B, S, K, Hv]` values.
    bias: optional float `[B|1, N|1, T|1, S|1]`, added to the logits; -inf
      entries mask their keys (a row of -inf is a row with nothing to attend to).
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend.
    is_causal: query t attends keys s <= t (top-left aligned).
    segment_ids: int `[B, T]` (when T == S) or a (`[B, T]`, `[B, S]`) pair; attend
      only within equal ids.
    scale: logit scale, default `H**-0.5`.
    implementation: None (best available), "xla", "pallas" (the tiled flash
      kernel in `pallas.flash_attention`; honours is_causal, segment_ids and
      key-padding masks `[B|1, 1, 1, S]`, not bias or other masks), "cudnn" (GPU only).

  Returns:
    `[B, T, N, Hv]` in the input dtype; rows with nothing to attend to are 0
    (and have 0 gradient). Accumulation is in float32 for narrower inputs.
  """
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla", "pallas", "cudnn"), family="softmax_attention")
  mask = _checks.check_mask(mask, dims)
  bias = _checks.check_bias(bias, dims)
  ids = _checks.check_segment_ids(segment_ids, dims)
  scale = _checks.check_scale(scale, dims)
  _checks.check_causal(is_causal, dims, family="softmax_attention")
  empty = _checks.empty_output(q, dims)
  if empty is not None:
    return empty
  if bias is not None:
    mask = mask_infinite_bias(bias, mask)
  if implementation is None:
    implementation = _default_implementation(q.dtype, dims, bias=bias, mask=mask)
  # Garbage under the mask (NaN, inf) must not reach live rows or any gradient, on every path.
  q, k, v = drop_masked(q, k, v, mask, dims)
  if implementation == "pallas":
    return _pallas(q, k, v, bias=bias, mask=mask, is_causal=is_causal, ids=ids, scale=scale, dims=dims)
  if implementation == "cudnn":
    return _cudnn(q, k, v, bias=bias, mask=mask, is_causal=is_causal, ids=ids, scale=scale, dims=dims)
  full_mask = dense_mask(dims.q_len, dims.kv_len, is_causal=is_causal, mask=mask, segment_ids=ids)
  return _xla(q, k, v, bias=bias, mask=full_mask, scale=scale, dims=dims)


def _default_implementation(dtype, dims: _checks.Dims, *, bias, mask) -> str:
  """The fastest measured choice per platform: cuDNN on a GPU for bf16/f16, the Pallas kernel on
  TPU (no cuDNN, and XLA materialises [T, S]), XLA elsewhere. On the H200
  (results/h200/flash/softmax.md, T 2k-16k, head dim 64 / 128, causal or not) no Pallas backend
  leads cuDNN forward+backward on any row (best 1.00x); forward alone, Mosaic GPU / jax_triton
  lead by up to 1.06x on 4 of 12 rows, too little to pick by (the call may be differentiated)."""
  backend = jax.default_backend()
  if (backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
      and _cudnn_head_dim(dims) <= _CUDNN_MAX_HEAD_DIM):
    return "cudnn"
  key_padding = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
  if backend == "tpu" and bias is None and key_padding:
    return "pallas"
  return "xla"


def _xla(q, k, v, *, bias, mask, scale, dims: _checks.Dims) -> jax.Array:
  acc = jnp.promote_types(q.dtype, jnp.float32)
  # [B, T, K, G, H]
  qg = q.reshape(dims.batch, dims.q_len, dims.num_kv_heads, dims.group, dims.head_dim)
  # [B, K, G, T, S]
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=acc) * scale
  if bias is not None:
    logits = logits + split_heads(bias.astype(acc), dims.num_kv_heads, dims.group)
  if mask is not None:
    mask = split_heads(mask, dims.num_kv_heads, dims.group)
    logits = jnp.where(mask, logits, MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # A row with no live key: softmax gave uniform weights over masked keys; zero them.
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  # [B, T, K, G, Hv]
  out = jnp.einsum("bkgts,bskh->btkgh", weights, v.astype(acc), preferred_element_type=acc)
  return out.reshape(dims.batch, dims.q_len, dims.num_heads, dims.v_head_dim).astype(q.dtype)


def _pallas(q, k, v, *, bias, mask, is_causal, ids, scale, dims: _checks.Dims) -> jax.Array:
  if bias is not None:
    raise ValueError("implementation='pallas' takes no bias; use 'xla' or 'cudnn'")
  if mask is not None:
    ids = padding_as_segment_ids(mask, ids, dims.batch, dims.q_len, dims.kv_len, what="softmax_attention(implementation='pallas')")
  return flash_attention(q, k, v, is_causal=is_causal, segment_ids=ids, scale=scale)


# cuDNN's fused kernel: head dim a multiple of 8 and at most 256 (Hopper, cuDNN >= 9.5);
# its backward needs even T and S whenever a mask or bias is present.
_CUDNN_MAX_HEAD_DIM = 256


def _cudnn_head_dim(dims: _checks.Dims) -> int:
  """The head dim cuDNN runs at: the larger of q/k's and v's, padded to a multiple of 8."""
  return -(-max(dims.head_dim, dims.v_head_dim) // 8) * 8


def _cudnn(q, k, v, *, bias, mask, is_causal, ids, scale, dims: _checks.Dims) -> jax.Array:
  if jax.default_backend() != "gpu":
    raise ValueError(f"implementation='cudnn' needs a GPU; the default backend is {jax.default_backend()!r}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise TypeError(f"implementation='cudnn' needs bfloat16 or float16 inputs, got {q.dtype=}")
  head = _cudnn_head_dim(dims)
  if head > _CUDNN_MAX_HEAD_DIM:
    raise ValueError(f"implementation='cudnn' takes head dims up to {_CUDNN_MAX_HEAD_DIM}, got "
                     f"{dims.head_dim=}, {dims.v_head_dim=}")
  pad_t, pad_s = dims.q_len % 2, dims.kv_len % 2

  def pad(x, time, hd):
    return jnp.pad(x, ((0, 0), (0, time), (0, 0), (0, head - hd)))

  # Zero head-dim padding leaves q.k unchanged; the padded value columns are sliced off.
  q_p, k_p, v_p = pad(q, pad_t, dims.head_dim), pad(k, pad_s, dims.head_dim), pad(v, pad_s, dims.v_head_dim)
  user_mask = dense_mask(dims.q_len, dims.kv_len, mask=mask, segment_ids=ids)
  kv_lengths = None
  if user_mask is not None:
    # The padded key is never live; the padded query row is sliced off.
    user_mask = jnp.pad(user_mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
  elif pad_s:
    kv_lengths = jnp.full((dims.batch,), dims.kv_len, jnp.int32)
  if bias is not None:
    bias = jnp.pad(bias, [(0, 0), (0, 0), (0, pad_t if bias.shape[2] > 1 else 0),
                          (0, pad_s if bias.shape[3] > 1 else 0)])
  out = jax.nn.dot_product_attention(
      q_p, k_p, v_p, bias=bias, mask=user_mask, scale=scale, is_causal=is_causal,
      key_value_seq_lengths=kv_lengths, implementation="cudnn")
  out = out[:, :dims.q_len, :, :dims.v_head_dim]
  live = dense_mask(dims.q_len, dims.kv_len, is_causal=is_causal, mask=mask, segment_ids=ids)
  if live is not None:
    # [B|1, N|1, T] -> [B|1, T, N|1, 1]: zero rows with nothing to attend to.
    row_live = jnp.any(live, axis=-1).transpose(0, 2, 1)[..., None]
    out = jnp.where(row_live, out, jnp.zeros((), out.dtype))
  return out
