"""What every attention module shares: projections, input checks, RoPE and the decoding cache protocol.

A module holds the q/k/v/out projections and calls one pure attention function;
the math stays in the functions. Each family says how it attends (`attend`) and,
where it can, how it decodes from a cache (`_init_cache`, `_decode`).

Decoding follows `nnx.MultiHeadAttention`: `init_cache(input_shape)` creates
`nnx.Cache` variables, then `module(x, decode=True)` takes the next tokens
(one or more) and appends them. `cache_index` counts the tokens seen so far.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention._checks import check_implementation
from efficient_attention._masking import zero_nonfinite_padding
from efficient_attention._rope import apply_rope

_KERNEL_INIT = nnx.initializers.lecun_normal()
_BIAS_INIT = nnx.initializers.zeros_init()


class AttentionModule(nnx.Module):
  """Base of the attention modules: `[B, T, in_features] -> [B, T, out_features]`.

  Args:
    num_heads: N, query heads.
    in_features: D, the feature size of x.
    qkv_features: N * H, default D; H = qkv_features // N is the head dim.
    out_features: feature size of the output, default D.
    num_kv_heads: K, key/value heads (GQA when K < N), default N.
    is_causal: token t attends tokens s <= t. Needed for decoding.
    rope_base: rotary position embedding of q and k with this base (see
      `apply_rope`); None for none.
    use_bias: biases in the projections.
    implementation: passed to the family's attention function (None = best
      available; "xla", "pallas", "cudnn" where the family has them).
    dtype: computation dtype of the projections (None: inferred from x and the
      parameters, as in `nnx.Linear`).
    param_dtype: parameter dtype.
    kernel_init, bias_init: initialisers of the projections.
    rngs: `nnx.Rngs` for the parameters (and a family's random streams).
  """

  family: ClassVar[str] = "attention"
  # The `implementation` values the family's function takes (besides None).
  implementations: ClassVar[tuple[str, ...]] = ("xla", "pallas", "cudnn")
  # Shared-QK families (LSH) have no key projection: the query projection is the key too.
  shared_qk: ClassVar[bool] = False

  def __init__(
      self,
      num_heads: int,
      in_features: int,
      qkv_features: int | None = None,
      *,
      out_features: int | None = None,
      num_kv_heads: int | None = None,
      is_causal: bool = False,
      rope_base: float | None = None,
      use_bias: bool = True,
      implementation: str | None = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      kernel_init: nnx.Initializer = _KERNEL_INIT,
      bias_init: nnx.Initializer = _BIAS_INIT,
      rngs: nnx.Rngs,
  ):
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_positive(num_heads=num_heads, in_features=in_features, qkv_features=qkv_features,
                    out_features=out_features, num_kv_heads=num_kv_heads)
    if qkv_features % num_heads:
      raise ValueError(f"qkv_features must be a multiple of num_heads, got {qkv_features=}, {num_heads=}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads must be a multiple of num_kv_heads (GQA), got {num_heads=}, {num_kv_heads=}")
    if not isinstance(is_causal, bool):
      raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if not isinstance(use_bias, bool):
      raise TypeError(f"use_bias must be a bool, got {use_bias!r}")
    check_implementation(implementation, self.implementations, family=self.family)
    check_rope_base(rope_base)
    check_dtype(dtype=dtype)
    check_dtype(param_dtype=param_dtype, optional=False)
    head_dim = qkv_features // num_heads
    if rope_base is not None and head_dim % 2:
      raise ValueError(f"rope_base needs an even head dim, got head_dim={head_dim} "
                       f"(qkv_features={qkv_features} / num_heads={num_heads})")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.in_features, self.out_features = in_features, out_features
    self.is_causal, self.rope_base = is_causal, rope_base
    self.implementation = implementation
    self.dtype, self.param_dtype = dtype, param_dtype
    linear = functools.partial(nnx.LinearGeneral, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.query = linear(in_features, (num_heads, head_dim))
    self.key = None if self.shared_qk else linear(in_features, (num_kv_heads, head_dim))
    self.value = linear(in_features, (num_kv_heads, head_dim))
    self.out = linear((num_heads, head_dim), out_features, axis=(-2, -1))
    self.cache_index: nnx.Cache | None = nnx.data(None)
    self.cache_batch: int | None = None

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      decode: bool = False,
  ) -> jax.Array:
    """Self-attention over x.

    Args:
      x: `[B, T, in_features]`.
      mask: optional bool `[B|1, N|1, T|1, T|1]`, True = attend (as in the functions). NaN or
        inf in x at positions no query attends (padding) reaches no output row of a live
        position and no gradient: such entries are read as 0.
      segment_ids: optional int `[B, T]`: attend only within equal ids.
      decode: take x as the next T tokens after those in the cache (see
        `init_cache`); mask and segment_ids must then be None.

    Returns:
      `[B, T, out_features]`.
    """
    self._check_input(x)
    check_segment_ids(segment_ids, x.shape[:2], name=self.family)
    t = x.shape[1]
    if not decode:
      return self.forward(zero_nonfinite_padding(x, mask), mask=mask, segment_ids=segment_ids)
    self._check_decodable()
    if mask is not None or segment_ids is not None:
      raise ValueError(f"{self.family}: decode=True takes no mask or segment_ids (the cache decides what each "
                       f"new token attends to), got mask={_short(mask)}, segment_ids={_short(segment_ids)}")
    if self.cache_index is None:
      raise ValueError(f"{self.family}: no cache; call init_cache(input_shape) before decode=True")
    check_cache_batch(x.shape[0], self.cache_batch, name=self.family)
    index = self.cache_index[...]
    check_capacity(index, t, self._capacity(), name=self.family)
    out = self.forward(x, index=index)
    self.cache_index[...] = index + t
    return out

  def forward(self, x: jax.Array, *, mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
              index: jax.Array | None = None) -> jax.Array:
    """The family's computation on checked x `[B, T, D]`: `[B, T, out_features]`.

    With `index` None, x is the whole sequence, under `mask` and `segment_ids`:
    `out(attend(*project(x)))`. Otherwise x holds the next T tokens after the
    `index` in the cache: `out(_decode(*project(x, index + 0..T-1), index))`.
    `__call__` does the checks and counts `cache_index`; families whose attention
    reads x itself (gates, short convolutions, output gates) override this.
    """
    if index is None:
      q, k, v = self.project(x)
      return self.out(self.attend(q, k, v, mask=mask, segment_ids=segment_ids))
    q, k, v = self.project(x, index + jnp.arange(x.shape[1]))
    return self.out(self._decode(q, k, v, index))

  def project(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x `[B, T, D]` -> q `[B, T, N, H]`, k and v `[B, T, K, H]`; k is q itself when `shared_qk`.

    q and k are rotated when `rope_base` is set, at `positions` (int `[T]`,
    default `0..T-1`).
    """
    q, v = self.query(x), self.value(x)
    k = None if self.shared_qk else self.key(x)
    if self.rope_base is not None:
      positions = jnp.arange(x.shape[1]) if positions is None else positions
      q = apply_rope(q, positions, base=self.rope_base)
      k = None if k is None else apply_rope(k, positions, base=self.rope_base)
    return q, q if k is None else k, v

  @abc.abstractmethod
  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, segment_ids=None) -> jax.Array:
    """The family's pure function on projected q `[B, T, N, H]`, k, v `[B, S, K, H]`: `[B, T, N, H]`."""

  def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
    """Creates an empty decoding cache for inputs x of shape `input_shape = (B, L, in_features)`.

    L is the most tokens the cache must hold; `dtype` (default `dtype`, else
    float32) is the dtype of cached keys and values.
    """
    self._check_decodable()
    if len(input_shape) != 3 or input_shape[-1] != self.in_features:
      raise ValueError(f"input_shape must be (B, L, in_features={self.in_features}), got {input_shape=}")
    batch, length = input_shape[:2]
    _check_positive(batch=batch, length=length)
    if dtype is None:
      dtype = jnp.float32 if self.dtype is None else self.dtype
    self._init_cache(batch, length, dtype)
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
    self.cache_batch = batch

  # Decoding, by family.

  def _check_decodable(self) -> None:
    if not self.is_causal:
      raise ValueError(f"{self.family}: decoding is causal; build the module with is_causal=True")

  def _init_cache(self, batch: int, length: int, dtype: Any) -> None:
    """Creates the family's cache variables (families without a causal form never get here)."""
    raise ValueError(f"{self.family} has no decoding cache")

  def _capacity(self) -> int | None:
    """Most tokens the cache holds; None when it never fills (a ring buffer or a recurrent state)."""
    return None

  def _decode(self, q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array) -> jax.Array:
    """Attends the new tokens (`[B, T, N|K, H]`, positions `index + 0..T-1`) to the cache and updates it."""
    raise ValueError(f"{self.family} has no decoding cache")

  def _check_input(self, x: Any) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{self.family}: x must be an array [B, T, in_features], got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"{self.family}: x must be [B, T, in_features={self.in_features}], got {x.shape=}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{self.family}: x must be floating point, got {x.dtype=}")


def check_rope_base(rope_base: Any) -> None:
  """Raises unless `rope_base` is None or a finite positive number (RoPE's frequencies are `base**(-2i/H)`)."""
  if rope_base is None:
    return
  if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real):
    raise TypeError(f"rope_base must be None or a number, got {rope_base=!r}")
  if not (math.isfinite(rope_base) and rope_base > 0):
    raise ValueError(f"rope_base must be a finite positive number (None: no RoPE), got {rope_base=!r}")


def check_dtype(*, optional: bool = True, **dtypes: Any) -> None:
  """Raises unless each `name=dtype` names a floating-point dtype (or is None, when `optional`)."""
  for name, dtype in dtypes.items():
    if dtype is None and optional:
      continue
    try:
      ok = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise TypeError(f"{name} must be a floating-point dtype{' or None' if optional else ''}, got {name}={dtype!r}")


def check_segment_ids(segment_ids: Any, batch_time: tuple[int, int], *, name: str) -> None:
  """Raises unless `segment_ids` is None or an int array `[B, T]` of the input's batch and length."""
  if segment_ids is None:
    return
  if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
    raise TypeError(f"{name}: segment_ids must be an int array [B, T], got {type(segment_ids).__name__}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(f"{name}: segment_ids must be an int array [B, T], got {segment_ids.dtype=}")
  if tuple(segment_ids.shape) != tuple(batch_time):
    raise ValueError(f"{name}: segment_ids.shape={tuple(segment_ids.shape)} must be the input's [B, T]="
                     f"{tuple(batch_time)}")


def check_cache_batch(batch: int, cache_batch: int | None, *, name: str) -> None:
  """Raises when decoding a batch of `batch` rows from a cache built for `cache_batch`."""
  if cache_batch is not None and batch != cache_batch:
    raise ValueError(f"{name}: decoding a batch of B={batch} from a cache built for B={cache_batch}; "
                     f"call init_cache with input_shape[0]={batch}")


def check_capacity(index: jax.Array, steps: int, capacity: int | None, *, name: str) -> None:
  """Raises when `steps` more tokens at `index` overflow a cache of `capacity` positions.

  A value check (see `check_values`): ValueError at once for a concrete index,
  the runtime error of the call for a traced one.
  """
  if capacity is None:
    return
  check_values(functools.partial(_raise_on_overflow, steps=steps, capacity=capacity, name=name), index)


def check_values(check: Callable[..., None], *values: jax.Array) -> None:
  """Runs `check(*values)`, which raises ValueError on bad values, wherever the values are known.

  With concrete values (eager calls) it raises at once. Under a transform
  (`nnx.jit`, `jax.jit`, scan) they are traced: the same check runs on the host
  through `jax.debug.callback`, and the ValueError surfaces as the runtime error
  of the call (a `jax.errors.JaxRuntimeError` quoting it), unless traced under
  `inputs_checked_ahead()`. Pass small values (scalars: reduce on the device first).
  """
  if not any(isinstance(value, jax.core.Tracer) for value in values):
    check(*values)
  elif _CHECK_TRACED.get():
    jax.debug.callback(check, *values)


_CHECK_TRACED = contextvars.ContextVar("check_traced_values", default=True)


@contextlib.contextmanager
def inputs_checked_ahead() -> Iterator[None]:
  """Traced calls within skip the host callbacks of `check_values`: the caller checked the inputs
  (cache lengths, token ranges) ahead.

  (A host callback per layer and token would synchronise every decoding step.)
  """
  token = _CHECK_TRACED.set(False)
  try:
    yield
  finally:
    _CHECK_TRACED.reset(token)


def _raise_on_overflow(index, *, steps: int, capacity: int, name: str) -> None:
  index = int(index)
  if index + steps > capacity:
    raise ValueError(f"{name}: decoding {steps} token(s) at cache_index={index} overflows the cache of "
                     f"{capacity} positions; call init_cache with a longer input_shape")


def _check_positive(**sizes: Any) -> None:
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"{name} must be a positive int, got {name}={size!r}")


def _short(value: Any) -> str:
  if hasattr(value, "shape"):
    return f"<array shape={tuple(value.shape)} dtype={value.dtype}>"
  return repr(value)
