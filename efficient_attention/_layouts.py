"""Static block layouts for block-sparse attention, and the builders of the usual patterns.

A layout is a boolean map over (query block, key block) pairs, shared by every
head (`[nq, nk]`) or given per query head (`[N, nq, nk]`). It lives in numpy and
is hashable, so it can be a static argument of `jax.jit`; block-sparse attention
reads it at trace time to build its gather indices. `BlockLayout`, `layout_mask`
and `check_grid` are defined beside the kernel that walks them, in
`pallas.block_layout`, and exported here.

Builders take token counts and return blocks; a sequence of `length` tokens has
`ceil(length / block_size)` blocks (the last one may be partial).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from pallas.block_layout import (  # noqa: F401  (BlockLayout, check_grid and layout_mask are this module's API too)
    BlockLayout,
    check_grid,
    check_non_negative,
    check_positive,
    layout_mask,
    num_blocks,
)

__all__ = [
    "BlockLayout",
    "bigbird",
    "dense",
    "global_tokens",
    "layout_mask",
    "local",
    "local_strided",
    "longformer",
    "random",
    "strided",
]


def local(seq_len: int, *, window: int, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """Sliding window: query block i sees every key block within `window` tokens of its range.

  Key block j is live when its token range overlaps query block i's range
  widened by `window` tokens on either side, so the layout covers every pair
  `|t - s| <= window` (`window=0`: the diagonal blocks).
  """
  kv_len = seq_len if kv_len is None else kv_len
  check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  check_non_negative(window=window)
  q_first, q_last = _token_ranges(seq_len, block_size)
  k_first, k_last = _token_ranges(kv_len, block_size)
  blocks = (k_first[None, :] <= q_last[:, None] + window) & (k_last[None, :] >= q_first[:, None] - window)
  return BlockLayout(blocks, block_size, block_size)


def strided(seq_len: int, *, stride: int, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """Strided pattern, `stride` in blocks: key block j is live for query block i when `(i - j) % stride == 0`.

  The strided half of the factorised attention of the Sparse Transformer
  (Child et al. 2019, sec. 4), at block granularity.
  """
  kv_len = seq_len if kv_len is None else kv_len
  check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size, stride=stride)
  i = np.arange(num_blocks(seq_len, block_size))[:, None]
  j = np.arange(num_blocks(kv_len, block_size))[None, :]
  return BlockLayout((i - j) % stride == 0, block_size, block_size)


def global_tokens(seq_len: int, *, num_global: int, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """The first `ceil(num_global / block_size)` blocks attend to everything and are attended by everything."""
  kv_len = seq_len if kv_len is None else kv_len
  check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  check_non_negative(num_global=num_global)
  g = num_blocks(num_global, block_size)
  blocks = np.zeros((num_blocks(seq_len, block_size), num_blocks(kv_len, block_size)), bool)
  blocks[:g, :] = True
  blocks[:, :g] = True
  return BlockLayout(blocks, block_size, block_size)


def random(
    key: jax.Array,
    seq_len: int,
    *,
    num_random_blocks: int,
    block_size: int = 64,
    kv_len: int | None = None,
    num_heads: int | None = None,
) -> BlockLayout:
  """Each query block row attends `num_random_blocks` distinct key blocks drawn uniformly with `key`.

  Per head (`[num_heads, nq, nk]`) when `num_heads` is given, else shared. The
  key must be concrete: the layout is static, so build it outside `jax.jit`.
  """
  kv_len = seq_len if kv_len is None else kv_len
  check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  check_non_negative(num_random_blocks=num_random_blocks)
  if num_heads is not None:
    check_positive(num_heads=num_heads)
  nq, nk = num_blocks(seq_len, block_size), num_blocks(kv_len, block_size)
  if num_random_blocks > nk:
    raise ValueError(f"{num_random_blocks=} exceeds the {nk} key blocks of {kv_len=} at {block_size=}")
  heads = 1 if num_heads is None else num_heads
  try:
    noise = np.asarray(jax.random.uniform(key, (heads, nq, nk)))
  except jax.errors.TracerArrayConversionError as e:
    raise TypeError("random() builds a static layout: call it outside jax.jit with a concrete key") from e
  # The indices of the r smallest iid uniforms are r distinct blocks, uniformly drawn.
  chosen = np.argsort(noise, axis=-1)[..., :num_random_blocks]
  blocks = np.zeros((heads, nq, nk), bool)
  np.put_along_axis(blocks, chosen, True, axis=-1)
  return BlockLayout(blocks if num_heads is not None else blocks[0], block_size, block_size)


def bigbird(
    key: jax.Array,
    seq_len: int,
    *,
    block_size: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    num_heads: int | None = None,
) -> BlockLayout:
  """BigBird (Zaheer et al. 2020, sec. 2 and app. D): window | global | random blocks.

  Query block i sees key blocks `|i - j| <= num_window_blocks // 2` (odd
  `num_window_blocks`), the first `num_global_blocks` blocks are global, and
  each row adds `num_random_blocks` random blocks (which may coincide with
  window or global ones). Random blocks are per head when `num_heads` is given.
  """
  check_positive(seq_len=seq_len, block_size=block_size, num_window_blocks=num_window_blocks)
  if num_window_blocks % 2 != 1:
    raise ValueError(f"num_window_blocks must be odd (a window centred on the diagonal), got {num_window_blocks=}")
  window = local(seq_len, window=(num_window_blocks // 2) * block_size, block_size=block_size)
  glob = global_tokens(seq_len, num_global=num_global_blocks * block_size, block_size=block_size)
  rand = random(key, seq_len, num_random_blocks=num_random_blocks, block_size=block_size, num_heads=num_heads)
  return window | glob | rand


def longformer(seq_len: int, *, window: int, num_global: int, block_size: int = 64) -> BlockLayout:
  """Longformer (Beltagy et al. 2020, sec. 3.1): a sliding window of `window` tokens | `num_global` global tokens."""
  return (local(seq_len, window=window, block_size=block_size)
          | global_tokens(seq_len, num_global=num_global, block_size=block_size))


@functools.cache
def local_strided(*, window: int, stride: int, block_size: int = 64) -> Callable[[int], BlockLayout]:
  """`seq_len -> BlockLayout`: `local(window)` | `strided(stride)`, the fixed pattern of the Sparse
  Transformer (Child et al. 2019, sec. 4), for a model whose sequence length varies.

  One function per setting (the same object for equal arguments), so that configs holding it
  compare and hash equal.
  """

  def layout(seq_len: int) -> BlockLayout:
    return local(seq_len, window=window, block_size=block_size) | strided(seq_len, stride=stride, block_size=block_size)

  return layout


def dense(seq_len: int, *, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """Every block live: block-sparse attention then equals dense attention."""
  kv_len = seq_len if kv_len is None else kv_len
  check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  shape = (num_blocks(seq_len, block_size), num_blocks(kv_len, block_size))
  return BlockLayout(np.ones(shape, bool), block_size, block_size)


def _token_ranges(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """First and last token of each block: two int `[ceil(length / block)]`."""
  first = np.arange(num_blocks(length, block)) * block
  return first, np.minimum(first + block, length) - 1
