"""Static block layouts for block-sparse attention, and the builders of the usual patterns.

A layout is a boolean map over (query block, key block) pairs, shared by every
head (`[nq, nk]`) or given per query head (`[N, nq, nk]`). It lives in numpy and
is hashable, so it can be a static argument of `jax.jit`; block-sparse attention
reads it at trace time to build its gather indices.

Builders take token counts and return blocks; a sequence of `length` tokens has
`ceil(length / block_size)` blocks (the last one may be partial).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BlockLayout",
    "bigbird",
    "dense",
    "global_tokens",
    "layout_mask",
    "local",
    "longformer",
    "random",
    "strided",
]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Which key blocks each query block attends to.

  Attributes:
    blocks: numpy bool `[nq, nk]` (shared by every head) or `[N, nq, nk]` (per
      query head); `blocks[..., i, j]` is True when query block i attends key block j.
    block_q: query tokens per block.
    block_k: key tokens per block.

  Layouts compare and hash by value, and combine with `|` (union) and `&`
  (intersection); a shared layout broadcasts against a per-head one.
  """

  blocks: np.ndarray
  block_q: int
  block_k: int

  def __post_init__(self):
    blocks = np.array(self.blocks)
    if blocks.dtype != np.bool_:
      raise TypeError(f"blocks must be a boolean array, got blocks.dtype={blocks.dtype}")
    if blocks.ndim not in (2, 3) or 0 in blocks.shape:
      raise ValueError(f"blocks must be a non-empty [nq, nk] or [N, nq, nk] array, got blocks.shape={blocks.shape}")
    _check_positive(block_q=self.block_q, block_k=self.block_k)
    blocks.flags.writeable = False
    object.__setattr__(self, "blocks", blocks)

  @property
  def grid(self) -> tuple[int, int]:
    """`(nq, nk)`: query blocks and key blocks."""
    return self.blocks.shape[-2], self.blocks.shape[-1]

  @property
  def num_heads(self) -> int | None:
    """N for a per-head layout, None for one shared by every head."""
    return self.blocks.shape[0] if self.blocks.ndim == 3 else None

  @property
  def density(self) -> float:
    """Fraction of live blocks (averaged over heads)."""
    return float(self.blocks.mean())

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, BlockLayout):
      return NotImplemented
    return ((self.block_q, self.block_k) == (other.block_q, other.block_k)
            and self.blocks.shape == other.blocks.shape
            and bool(np.array_equal(self.blocks, other.blocks)))

  def __hash__(self) -> int:
    return hash((self.blocks.shape, self.blocks.tobytes(), self.block_q, self.block_k))

  def __or__(self, other: BlockLayout) -> BlockLayout:
    return self._combine(other, operator.or_, "|")

  def __and__(self, other: BlockLayout) -> BlockLayout:
    return self._combine(other, operator.and_, "&")

  def _combine(self, other: Any, op: Callable, symbol: str) -> BlockLayout:
    if not isinstance(other, BlockLayout):
      return NotImplemented
    sizes, other_sizes = (self.block_q, self.block_k), (other.block_q, other.block_k)
    if sizes != other_sizes:
      raise ValueError(f"cannot combine layouts with (block_q, block_k)={sizes} {symbol} {other_sizes}")
    if self.grid != other.grid:
      raise ValueError(f"cannot combine layouts with grids (nq, nk)={self.grid} {symbol} {other.grid}")
    if None not in (self.num_heads, other.num_heads) and self.num_heads != other.num_heads:
      raise ValueError(f"cannot combine per-head layouts with num_heads={self.num_heads} {symbol} {other.num_heads}")
    a, b = self.blocks, other.blocks
    if a.ndim != b.ndim:
      a, b = (a[None], b) if a.ndim == 2 else (a, b[None])
    return BlockLayout(op(a, b), self.block_q, self.block_k)

  def __repr__(self) -> str:
    heads = "shared" if self.num_heads is None else f"num_heads={self.num_heads}"
    return (f"BlockLayout(grid={self.grid}, {heads}, block_q={self.block_q}, block_k={self.block_k}, "
            f"live={int(self.blocks.sum())}/{self.blocks.size}, density={self.density:.3f})")


def check_grid(layout: Any, q_len: int, kv_len: int) -> None:
  """Raises unless `layout` is a BlockLayout whose grid is `(ceil(T / block_q), ceil(S / block_k))`."""
  if not isinstance(layout, BlockLayout):
    raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
  want = (_num_blocks(q_len, layout.block_q), _num_blocks(kv_len, layout.block_k))
  if layout.grid != want:
    raise ValueError(
        f"layout grid (nq, nk)={layout.grid} does not match (ceil(T/block_q), ceil(S/block_k))={want} "
        f"for T={q_len}, S={kv_len}, block_q={layout.block_q}, block_k={layout.block_k}"
    )


def layout_mask(layout: BlockLayout, seq_len: int, kv_len: int | None = None) -> jax.Array:
  """The token-level mask of a layout: bool `[1, N|1, T, S]` (True = attend).

  This is the dense mask that block-sparse attention honours; references and
  tests pass it to dense attention.
  """
  kv_len = seq_len if kv_len is None else kv_len
  check_grid(layout, seq_len, kv_len)
  blocks = layout.blocks if layout.num_heads is not None else layout.blocks[None]
  tokens = np.repeat(np.repeat(blocks, layout.block_q, axis=1), layout.block_k, axis=2)
  return jnp.asarray(tokens[None, :, :seq_len, :kv_len])


def local(seq_len: int, *, window: int, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """Sliding window: query block i sees every key block within `window` tokens of its range.

  Key block j is live when its token range overlaps query block i's range
  widened by `window` tokens on either side, so the layout covers every pair
  `|t - s| <= window` (`window=0`: the diagonal blocks).
  """
  kv_len = seq_len if kv_len is None else kv_len
  _check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  _check_non_negative(window=window)
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
  _check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size, stride=stride)
  i = np.arange(_num_blocks(seq_len, block_size))[:, None]
  j = np.arange(_num_blocks(kv_len, block_size))[None, :]
  return BlockLayout((i - j) % stride == 0, block_size, block_size)


def global_tokens(seq_len: int, *, num_global: int, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """The first `ceil(num_global / block_size)` blocks attend to everything and are attended by everything."""
  kv_len = seq_len if kv_len is None else kv_len
  _check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  _check_non_negative(num_global=num_global)
  g = _num_blocks(num_global, block_size)
  blocks = np.zeros((_num_blocks(seq_len, block_size), _num_blocks(kv_len, block_size)), bool)
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
  _check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  _check_non_negative(num_random_blocks=num_random_blocks)
  if num_heads is not None:
    _check_positive(num_heads=num_heads)
  nq, nk = _num_blocks(seq_len, block_size), _num_blocks(kv_len, block_size)
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
  _check_positive(seq_len=seq_len, block_size=block_size, num_window_blocks=num_window_blocks)
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


def dense(seq_len: int, *, block_size: int = 64, kv_len: int | None = None) -> BlockLayout:
  """Every block live: block-sparse attention then equals dense attention."""
  kv_len = seq_len if kv_len is None else kv_len
  _check_positive(seq_len=seq_len, kv_len=kv_len, block_size=block_size)
  shape = (_num_blocks(seq_len, block_size), _num_blocks(kv_len, block_size))
  return BlockLayout(np.ones(shape, bool), block_size, block_size)


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _token_ranges(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """First and last token of each block: two int `[ceil(length / block)]`."""
  first = np.arange(_num_blocks(length, block)) * block
  return first, np.minimum(first + block, length) - 1


def _check_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")


def _check_positive(**sizes: Any) -> None:
  for name, value in sizes.items():
    _check_int(name, value)
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {name}={value}")


def _check_non_negative(**counts: Any) -> None:
  for name, value in counts.items():
    _check_int(name, value)
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {name}={value}")
