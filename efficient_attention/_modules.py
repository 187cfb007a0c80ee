"""Flax nnx attention modules, one per family, and `MultiHeadAttention`, which picks one by name.

Every module has the constructor of `AttentionModule` (`num_heads, in_features,
qkv_features=None, *, out_features, num_kv_heads, is_causal, rope_base, use_bias,
dtype, param_dtype, kernel_init, bias_init, rngs`) plus its family's options, and
the call `module(x, *, mask=None, segment_ids=None, decode=False)`.

Decoding caches (`init_cache`, then `decode=True`):

| module | cache | size |
|---|---|---|
| `SoftmaxAttention` | keys and values | `[B, L, K, H]`, L from `init_cache` |
| `LocalAttention` | ring buffer of the last keys and values | `[B, R, K, H]`, R = `LocalAttention.span` |
| `LinearAttention`, `FavorAttention` | recurrent state (`LinearState`) | `[B, K, M, H]`, independent of length |
| `LinformerAttention`, `BlockSparseAttention` | none: no causal form / no bounded cache | |
| `LSHAttention` | none: the hash sort spans the whole sequence | |
| `GatedLinearAttention` | recurrent state (`LinearState`) and the last `short_conv - 1` projected q, k, v | `[B, K, M, H]`, `[B, W - 1, N + 2K, H]` |
| `DeltaRuleAttention` | recurrent state (`DeltaRuleState.s`) and the same convolution inputs | `[B, K, H, H]`, `[B, W - 1, N + 2K, H]` |

`GatedLinearAttention` and `DeltaRuleAttention` (in `_recurrent_modules.py`) read x itself
too: forget gates and write strengths per step, short convolutions, an output gate.
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention import _favor, _layouts, _linear
from efficient_attention._block_sparse import block_sparse_attention
from efficient_attention._favor import favor_attention, favor_attention_step, orthogonal_random_features, redraw
from efficient_attention._layouts import BlockLayout
from efficient_attention._linear import LinearState, init_state, linear_attention, linear_attention_step
from efficient_attention._linformer import linformer_attention
from efficient_attention._lsh import lsh_attention, lsh_rotations
from efficient_attention._module_base import AttentionModule
from efficient_attention._recurrent_modules import DeltaRuleAttention, GatedLinearAttention
from efficient_attention._softmax import softmax_attention


class SoftmaxAttention(AttentionModule):
  """Exact attention (`softmax_attention`); decodes from a key/value cache.

  Args:
    **kwargs: the shared arguments of `AttentionModule`.
  """

  family = "softmax"

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, **kwargs)
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    return softmax_attention(q, k, v, mask=mask, segment_ids=segment_ids, is_causal=self.is_causal,
                             implementation=self.implementation)

  def _init_cache(self, batch, length, dtype):
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))

  def _capacity(self):
    return self.cached_key.shape[1]

  def _decode(self, q, k, v, index):
    start = (0, index, 0, 0)
    # [B, L, K, H]
    keys = jax.lax.dynamic_update_slice(self.cached_key[...], k.astype(self.cached_key.dtype), start)
    values = jax.lax.dynamic_update_slice(self.cached_value[...], v.astype(self.cached_value.dtype), start)
    self.cached_key[...], self.cached_value[...] = keys, values
    # [1, 1, T, L]: new token t sits at index + t and sees every cached position up to it.
    live = jnp.arange(keys.shape[1])[None, :] <= (index + jnp.arange(q.shape[1]))[:, None]
    # The flash kernel takes no general mask: decoding steps (queries against the cache) use the default.
    implementation = None if self.implementation == "pallas" else self.implementation
    return softmax_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=live[None, None],
                             implementation=implementation)


class BlockSparseAttention(AttentionModule):
  """Block-sparse attention (`block_sparse_attention`) under a static layout.

  Args:
    layout: a `BlockLayout` (for one sequence length) or a function
      `seq_len -> BlockLayout`, e.g. `functools.partial(layouts.bigbird, key, block_size=64)`.
    **kwargs: the shared arguments of `AttentionModule`.

  A general layout has no bounded decoding cache; `LocalAttention` decodes.
  """

  family = "block_sparse"
  implementations = ("xla", "pallas")

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               layout: BlockLayout | Callable[[int], BlockLayout], **kwargs):
    super().__init__(num_heads, in_features, qkv_features, **kwargs)
    if not isinstance(layout, BlockLayout) and not callable(layout):
      raise TypeError(f"layout must be a BlockLayout or a function seq_len -> BlockLayout, got {layout!r}")
    self.layout = layout

  def layout_for(self, seq_len: int) -> BlockLayout:
    """The layout used for sequences of `seq_len` tokens."""
    return self.layout if isinstance(self.layout, BlockLayout) else self.layout(seq_len)

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    return block_sparse_attention(q, k, v, self.layout_for(q.shape[1]), mask=mask, segment_ids=segment_ids,
                                  is_causal=self.is_causal, implementation=self.implementation)

  def _check_decodable(self):
    raise ValueError(f"{self.family}: a general block layout has no bounded decoding cache; use LocalAttention "
                     "(attention='local'), which decodes with a ring buffer")


class LocalAttention(AttentionModule):
  """Sliding-window attention: block-sparse attention under `layouts.local(T, window=, block_size=)`.

  Query t attends key s when s's block ends no more than `window` tokens before
  t's block starts (and, causally, s <= t). Decoding keeps a ring buffer of the
  last `block_size * (ceil(window / block_size) + 1)` keys and values, the most a
  query can see, however long the sequence.

  Args:
    window: tokens of context on either side of a query block.
    block_size: tokens per block.
    **kwargs: the shared arguments of `AttentionModule`.
  """

  family = "local"
  implementations = ("xla", "pallas")

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               window: int = 256, block_size: int = 64, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, **kwargs)
    _layouts.local(1, window=window, block_size=block_size)  # checks window and block_size
    self.window, self.block_size = window, block_size
    self.cached_key: nnx.Cache | None = nnx.data(None)
    self.cached_value: nnx.Cache | None = nnx.data(None)

  def layout_for(self, seq_len: int) -> BlockLayout:
    """The layout used for sequences of `seq_len` tokens."""
    return _layouts.local(seq_len, window=self.window, block_size=self.block_size)

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    return block_sparse_attention(q, k, v, self.layout_for(q.shape[1]), mask=mask, segment_ids=segment_ids,
                                  is_causal=self.is_causal, implementation=self.implementation)

  @property
  def span(self) -> int:
    """Ring buffer length: the most key positions one query of the causal layout sees."""
    return self.block_size * (-(-self.window // self.block_size) + 1)

  def _init_cache(self, batch, length, dtype):
    shape = (batch, self.span, self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))

  def _decode(self, q, k, v, index):
    t, r = q.shape[1], self.span
    slots = jnp.arange(r)
    # Position held by each slot: the latest p < index with p % R == slot (negative: empty).
    held = index - 1 - (index - 1 - slots) % r
    new = index + jnp.arange(t)
    # [B, R + T, K, H]: the ring buffer, then the new tokens.
    keys = jnp.concatenate([self.cached_key[...].astype(k.dtype), k], axis=1)
    values = jnp.concatenate([self.cached_value[...].astype(v.dtype), v], axis=1)
    key_pos = jnp.concatenate([held, new])
    # [T, R + T]
    live = (key_pos >= 0)[None, :] & _local_live(new[:, None], key_pos[None, :], self.window, self.block_size)
    out = softmax_attention(q, keys, values, mask=live[None, None])
    # The last min(T, R) new tokens replace the oldest slots.
    keep = min(t, r)
    write = (index + jnp.arange(t - keep, t)) % r
    self.cached_key[...] = self.cached_key[...].at[:, write].set(k[:, t - keep:].astype(self.cached_key.dtype))
    self.cached_value[...] = self.cached_value[...].at[:, write].set(v[:, t - keep:].astype(self.cached_value.dtype))
    return out


def _local_live(t: jax.Array, s: jax.Array, window: int, block_size: int) -> jax.Array:
  """Causal `layouts.local` at token level: s <= t and s's block ends at most `window` before t's block starts."""
  s_block_end = (s // block_size + 1) * block_size - 1
  t_block_start = (t // block_size) * block_size
  return (s <= t) & (s_block_end >= t_block_start - window)


class LinformerAttention(AttentionModule):
  """Linformer attention (`linformer_attention`) with learned projections E, F along time.

  Args:
    max_len: T_max, the longest sequence; E and F are `[P, max_len]`.
    projected_len: P, the projected length (the paper's k).
    per_head_projections: one E, F per key/value head (`[K, P, max_len]`)
      instead of one shared by every head.
    projection_init: initialiser of E and F (default: LeCun normal over max_len).
    **kwargs: the shared arguments of `AttentionModule`; `is_causal` must be False.

  Linformer has no causal form, so it cannot decode.
  """

  family = "linformer"
  implementations = ("xla",)

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               max_len: int, projected_len: int = 64, per_head_projections: bool = False,
               projection_init: nnx.Initializer | None = None, rngs: nnx.Rngs, **kwargs):
    if kwargs.get("is_causal", False):
      raise ValueError("linformer: is_causal=True is not possible: the projection along time mixes future keys "
                       "into every projected slot, so Linformer has no causal form")
    super().__init__(num_heads, in_features, qkv_features, rngs=rngs, **kwargs)
    for name, size in (("max_len", max_len), ("projected_len", projected_len)):
      if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={size!r}")
    if not isinstance(per_head_projections, bool):
      raise TypeError(f"per_head_projections must be a bool, got {per_head_projections!r}")
    self.max_len, self.projected_len, self.per_head_projections = max_len, projected_len, per_head_projections
    shape = ((self.num_kv_heads,) if per_head_projections else ()) + (projected_len, max_len)
    batch_axis = (0,) if per_head_projections else ()
    init = projection_init or nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2, batch_axis=batch_axis)
    self.e_proj = nnx.Param(init(rngs.params(), shape, self.param_dtype))
    self.f_proj = nnx.Param(init(rngs.params(), shape, self.param_dtype))

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    if k.shape[1] > self.max_len:
      raise ValueError(f"linformer: sequence length {k.shape[1]} exceeds max_len={self.max_len} "
                       f"(E and F are [P, max_len]={tuple(self.e_proj.shape)})")
    return linformer_attention(q, k, v, self.e_proj[...], self.f_proj[...], mask=mask, segment_ids=segment_ids,
                               implementation=self.implementation)

  def _check_decodable(self):
    raise ValueError("linformer: cannot decode: Linformer has no causal form (its projection along time "
                     "mixes every key into every slot)")


class LinearAttention(AttentionModule):
  """Linear attention (`linear_attention`); decodes with the O(1) recurrent state.

  Args:
    feature_map: "elu+1", "relu", "identity" or a hashable callable `[..., H] -> [..., M]`.
    chunk_size: time steps per chunk of the causal form (None: the
      implementation's default, see `linear_attention`).
    **kwargs: the shared arguments of `AttentionModule`.
  """

  family = "linear"
  implementations = ("xla", "pallas")

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               feature_map: str | Callable[[jax.Array], jax.Array] = "elu+1", chunk_size: int | None = None,
               **kwargs):
    super().__init__(num_heads, in_features, qkv_features, **kwargs)
    _linear.feature_map_fn(feature_map)
    self.feature_map, self.chunk_size = feature_map, _linear.check_chunk_size(chunk_size)
    _init_state_cache(self)

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    return linear_attention(q, k, v, feature_map=self.feature_map, mask=mask, segment_ids=segment_ids,
                            is_causal=self.is_causal, chunk_size=self.chunk_size,
                            implementation=self.implementation)

  def _init_cache(self, batch, length, dtype):
    fmap = _linear.feature_map_fn(self.feature_map)
    width = jax.eval_shape(fmap, jax.ShapeDtypeStruct((1, self.head_dim), jnp.float32)).shape[-1]
    _new_state_cache(self, init_state(batch, self.num_kv_heads, width, self.head_dim))

  def _decode(self, q, k, v, index):
    step = functools.partial(linear_attention_step, feature_map=self.feature_map)
    return _scan_steps(self, step, q, k, v)


class RandomFeatures(nnx.Variable):
  """FAVOR+ random-feature state, not trained: the projection rows `[M, H]` and the count of training calls.

  A variable type of its own, so `nnx.state(model, nnx.Param)` leaves it out and
  `nnx.state(model, RandomFeatures)` selects it.
  """


def default_num_features(head_dim: int) -> int:
  """FAVOR+ projection rows when none are given: `max(H, round(H ln H))`, of order H log H as in Performer."""
  return max(head_dim, round(head_dim * math.log(head_dim)))


class _RedrawSchedule(AttentionModule):
  """A module holding random state (`RandomFeatures`) redrawn after every `redraw_interval`-th training call.

  A training call is one with `deterministic=False` and `decode=False`;
  `model.eval()` sets `deterministic=True` and freezes the state (`model.train()`
  undoes it). The schedule is a counter variable (`training_calls`, counted when
  `redraw_interval > 0`) and a `jax.lax.cond` under a transform, so it runs under
  `nnx.jit` and `nnx.grad`. Subclasses set `rngs` (the stream redraws come from),
  `redraw_interval`, `deterministic` and `training_calls`, and say what a redraw
  replaces (`_redraw`).
  """

  def __call__(self, x, *, mask=None, segment_ids=None, decode=False):
    out = super().__call__(x, mask=mask, segment_ids=segment_ids, decode=decode)
    if not decode and not self.deterministic and self.redraw_interval:
      self._count_training_call()
    return out

  def set_view(self, deterministic: bool | None = None):
    """Used by `nnx.view(model, deterministic=...)`."""
    if deterministic is not None:
      self.deterministic = deterministic

  @abc.abstractmethod
  def _redraw(self, key: jax.Array) -> tuple[RandomFeatures, Callable[[], jax.Array]]:
    """The variable a redraw replaces and a function giving its new value from `key`."""

  def _count_training_call(self) -> None:
    calls = self.training_calls[...] + 1
    variable, new = self._redraw(self.rngs())
    old = variable[...]
    due = calls % self.redraw_interval == 0
    if isinstance(due, jax.core.Tracer):
      variable[...] = jax.lax.cond(due, new, lambda: old)
    elif due:
      variable[...] = new()
    self.training_calls[...] = calls


class FavorAttention(_RedrawSchedule):
  """FAVOR+ attention (`favor_attention`) with projection rows held as `RandomFeatures`.

  The rows are redrawn from the module's `features` rng stream after every
  `redraw_interval`-th training call (0 = never). A training call is one with
  `deterministic=False` and `decode=False`; `model.eval()` sets
  `deterministic=True` and freezes them (`model.train()` undoes it). The
  schedule is a counter variable (`training_calls`, counted when
  `redraw_interval > 0`) and a `jax.lax.cond` under a transform, so it runs
  under `nnx.jit` and `nnx.grad`. Decoding uses the O(1) recurrent state and
  never redraws.

  Args:
    num_features: M, projection rows; default `max(H, round(H ln H))`
      (Performer, Theorem 4: M = Theta(H log H)).
    kernel: "softmax" (positive features), "trig" or "relu" (see `favor_attention`).
    orthogonal, scaling: how rows are drawn (see `orthogonal_random_features`).
    redraw_interval: redraw after this many training calls; 0 never redraws.
    chunk_size: time steps per chunk of the causal form (None: the
      implementation's default, see `linear_attention`).
    deterministic: start in eval mode (no redraws).
    **kwargs: the shared arguments of `AttentionModule`; `rngs` also seeds the
      `features` stream (falling back to `default`).
  """

  family = "favor"
  implementations = ("xla", "pallas")

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               num_features: int | None = None, kernel: str = "softmax", orthogonal: bool = True,
               scaling: str = "chi", redraw_interval: int = 0, chunk_size: int | None = None,
               deterministic: bool = False, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, rngs=rngs, **kwargs)
    if kernel not in _favor.KERNELS:
      raise ValueError(f"unknown {kernel=}; valid: {', '.join(map(repr, _favor.KERNELS))}")
    if isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 0:
      raise ValueError(f"redraw_interval must be an int >= 0 (0 = never), got {redraw_interval=}")
    if not isinstance(deterministic, bool):
      raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    h = self.head_dim
    num_features = default_num_features(h) if num_features is None else num_features
    self.kernel, self.orthogonal, self.scaling = kernel, orthogonal, scaling
    self.redraw_interval, self.chunk_size = redraw_interval, _linear.check_chunk_size(chunk_size)
    self.deterministic = deterministic
    self.rngs = rngs.features.fork()
    self.features = RandomFeatures(orthogonal_random_features(
        self.rngs(), num_features, h, orthogonal=orthogonal, scaling=scaling))
    self.training_calls = RandomFeatures(jnp.zeros((), jnp.int32))
    _init_state_cache(self)

  @property
  def num_features(self) -> int:
    return self.features.shape[0]

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    return favor_attention(q, k, v, self.features[...], kernel=self.kernel, mask=mask, segment_ids=segment_ids,
                           is_causal=self.is_causal, chunk_size=self.chunk_size,
                           implementation=self.implementation)

  def _redraw(self, key):
    return self.features, functools.partial(redraw, key, self.features[...], orthogonal=self.orthogonal,
                                            scaling=self.scaling)

  def _init_cache(self, batch, length, dtype):
    width = 2 * self.num_features if self.kernel == "trig" else self.num_features
    _new_state_cache(self, init_state(batch, self.num_kv_heads, width, self.head_dim))

  def _decode(self, q, k, v, index):
    step = functools.partial(favor_attention_step, features=self.features[...], kernel=self.kernel)
    return _scan_steps(self, step, q, k, v)


class LSHAttention(_RedrawSchedule):
  """Reformer's LSH attention (`lsh_attention`): one shared query/key projection, random rotations as `RandomFeatures`.

  The module has no key projection (`shared_qk`): `query` gives the shared
  `qk` (rotated by RoPE when `rope_base` is set), `value` the values, `out` the
  output. The rotations `[num_hashes, H, num_buckets // 2]` are redrawn from the
  `features` rng stream (falling back to `default`) after every
  `redraw_interval`-th training call (0 = never), with the schedule and eval
  freezing of `FavorAttention`.

  LSH attention sorts the whole sequence by hash bucket, so it has no
  incremental form: decoding raises.

  Args:
    num_buckets: hash buckets per round, even; about `2 * T / chunk_size` keeps
      the average bucket at half a chunk.
    num_hashes: hash rounds.
    chunk_size: sorted tokens per chunk; each chunk attends to itself and the
      previous one.
    redraw_interval: redraw the rotations after this many training calls; 0 never redraws.
    deterministic: start in eval mode (no redraws).
    **kwargs: the shared arguments of `AttentionModule`.
  """

  family = "lsh"
  shared_qk = True

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               num_buckets: int = 8, num_hashes: int = 2, chunk_size: int = 64, redraw_interval: int = 0,
               deterministic: bool = False, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, rngs=rngs, **kwargs)
    if isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 0:
      raise ValueError(f"redraw_interval must be an int >= 0 (0 = never), got {redraw_interval=}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size=!r}")
    self.chunk_size, self.redraw_interval, self.deterministic = chunk_size, redraw_interval, deterministic
    self.rngs = rngs.features.fork()
    self.rotations = RandomFeatures(lsh_rotations(self.rngs(), self.head_dim, num_buckets=num_buckets,
                                                  num_hashes=num_hashes))
    self.training_calls = RandomFeatures(jnp.zeros((), jnp.int32))

  @property
  def num_buckets(self) -> int:
    return 2 * self.rotations.shape[2]

  @property
  def num_hashes(self) -> int:
    return self.rotations.shape[0]

  def attend(self, q, k, v, *, mask=None, segment_ids=None):
    """`q` is the shared qk (`k` is the same array, from `project`)."""
    return lsh_attention(q, v, self.rotations[...], chunk_size=self.chunk_size, mask=mask,
                         segment_ids=segment_ids, is_causal=self.is_causal, implementation=self.implementation)

  def _redraw(self, key):
    return self.rotations, functools.partial(lsh_rotations, key, self.head_dim, num_buckets=self.num_buckets,
                                             num_hashes=self.num_hashes, dtype=self.rotations.dtype)

  def _check_decodable(self):
    raise ValueError("lsh: cannot decode: LSH attention sorts the whole sequence by hash bucket, so it has no "
                     "incremental (cached) form; run it on full sequences")


# The recurrent state of linear attention and FAVOR+ as three cache variables.


def _init_state_cache(module: AttentionModule) -> None:
  module.cached_kv = nnx.data(None)
  module.cached_z = nnx.data(None)
  module.cached_stabiliser = nnx.data(None)


def _new_state_cache(module: AttentionModule, state: LinearState) -> None:
  module.cached_kv = nnx.Cache(state.kv)
  module.cached_z = nnx.Cache(state.z)
  module.cached_stabiliser = nnx.Cache(state.stabiliser)


def _store_state(module: AttentionModule, state: LinearState) -> None:
  module.cached_kv[...], module.cached_z[...], module.cached_stabiliser[...] = state


def _scan_steps(module: AttentionModule, step: Callable, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Runs `step(state, q_t, k_t, v_t) -> (state, out_t)` over the T new tokens; returns `[B, T, N, H]`."""
  state = LinearState(module.cached_kv[...], module.cached_z[...], module.cached_stabiliser[...])
  if q.shape[1] == 1:
    state, out = step(state, q[:, 0], k[:, 0], v[:, 0])
    _store_state(module, state)
    return out[:, None]
  # [T, B, heads, H] each
  steps = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v))
  state, out = jax.lax.scan(lambda s, qkv_t: step(s, *qkv_t), state, steps)
  _store_state(module, state)
  return jnp.swapaxes(out, 0, 1)


ATTENTION_FAMILIES: Mapping[str, type[AttentionModule]] = types.MappingProxyType({
    "softmax": SoftmaxAttention,
    "favor": FavorAttention,
    "linear": LinearAttention,
    "linformer": LinformerAttention,
    "local": LocalAttention,
    "block_sparse": BlockSparseAttention,
    "lsh": LSHAttention,
    "gla": GatedLinearAttention,
    "delta_rule": DeltaRuleAttention,
})
"""Family name -> module class, for `MultiHeadAttention(attention=name)` and `LMConfig.attention`."""


def attention_options(attention: str) -> tuple[str, ...]:
  """The keyword options `MultiHeadAttention(attention=name, ...)` takes for one family."""
  cls = _family(attention)
  names = set()
  for klass in cls.__mro__:
    if not issubclass(klass, AttentionModule) or "__init__" not in vars(klass):
      continue
    for param in inspect.signature(klass.__init__).parameters.values():
      if param.kind == param.KEYWORD_ONLY:
        names.add(param.name)
  return tuple(sorted(names))


def _family(attention: Any) -> type[AttentionModule]:
  if attention not in ATTENTION_FAMILIES:
    raise ValueError(f"unknown {attention=}; valid: {', '.join(map(repr, ATTENTION_FAMILIES))}")
  return ATTENTION_FAMILIES[attention]


class MultiHeadAttention(nnx.Module):
  """Self-attention of the family named by `attention`: a thin wrapper around its module.

  `MultiHeadAttention(N, D, attention="favor", num_features=64, rngs=rngs)` builds
  `FavorAttention(N, D, num_features=64, rngs=rngs)` as `self.attention`;
  options a family does not take raise, naming those it does
  (`attention_options(name)`).

  Args:
    num_heads, in_features, qkv_features: as in every attention module.
    attention: a name in `ATTENTION_FAMILIES`.
    **options: the family module's keyword arguments (`rngs` included).
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *,
               attention: str = "softmax", **options):
    cls = _family(attention)
    valid = attention_options(attention)
    unknown = sorted(set(options) - set(valid))
    if unknown:
      raise TypeError(f"{attention!r} attention takes no option(s) {unknown}; its options: {list(valid)}")
    self.family = attention
    self.attention = cls(num_heads, in_features, qkv_features, **options)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    """`[B, T, in_features] -> [B, T, out_features]`; see `AttentionModule.__call__`."""
    return self.attention(x, mask=mask, segment_ids=segment_ids, decode=decode)

  def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
    """See `AttentionModule.init_cache`."""
    self.attention.init_cache(input_shape, dtype)
