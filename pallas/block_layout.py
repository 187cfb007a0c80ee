"""Block layouts: which (query block, key block) pairs block-sparse attention computes.

`BlockLayout` is the static map the block-sparse kernel walks and the dense and
XLA paths expand with `layout_mask`; the builders of the usual patterns are in
`efficient_attention.layouts`.

No kernel here: the layouts are data the block-sparse kernel walks (its reference ends
`block_sparse.py`).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


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
    check_positive(block_q=self.block_q, block_k=self.block_k)
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
  want = (num_blocks(q_len, layout.block_q), num_blocks(kv_len, layout.block_k))
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


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _check_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")


def check_positive(**sizes: Any) -> None:
  for name, value in sizes.items():
    _check_int(name, value)
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {name}={value}")


def check_non_negative(**counts: Any) -> None:
  for name, value in counts.items():
    _check_int(name, value)
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {name}={value}")
