"""Small pieces every kernel of this package uses: sizes, padding, block products, launch settings.

No kernel here, so no reference.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def pow2_at_least(n: int, floor: int = 16) -> int:
  """The smallest power of two >= max(n, floor)."""
  return max(floor, 1 << max(0, n - 1).bit_length())


def round_up(n: int, m: int) -> int:
  """The smallest multiple of m >= n."""
  return -(-n // m) * m


def pad_to(x: jax.Array, length: int, width: int) -> jax.Array:
  """Zero-pads `[B, L, N, H]` to `[B, length, N, width]` (no copy when already there)."""
  if x.shape[1] == length and x.shape[3] == width:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))


def pad_ids(ids: jax.Array, length: int, *, value: int) -> jax.Array:
  """Pads int `[B, L]` segment ids to `[B, length]` with `value`."""
  if ids.shape[1] == length:
    return ids
  return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=value)


def idiv(a, b) -> jax.Array:
  """`a // b` for non-negative index math, in int32 whatever the operands' int type.

  Under `jax_enable_x64` a Python int operand is int64 while program ids and
  `iota` are int32, and `lax.div` takes one dtype: both sides become int32.
  """
  return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def irem(a, b) -> jax.Array:
  """`a % b` for non-negative index math, in int32 (see `idiv`)."""
  return lax.rem(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def dot(a, b, precision: Any = None):
  """`a b` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b, precision: Any = None):
  """`a b^T` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def dot_tn(a, b, precision: Any = None):
  """`a^T b` for 2-D blocks, float32 result."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def matmul_precision(dtype: Any) -> Any:
  """float32 inputs multiply in full float32 (not TF32); narrower ones as they are."""
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def triton_lowering_available() -> bool:
  """Whether this JAX still has Pallas' Triton lowering (deprecated since JAX 0.11)."""
  try:
    return importlib.util.find_spec("jax.experimental.pallas.triton") is not None
  except ImportError:
    return False


def triton_params(*, interpret: bool, num_warps: int, num_stages: int) -> dict:
  """`pallas_call` keyword arguments with the Triton launch settings (none in interpret mode)."""
  if interpret:
    return {}
  try:
    from jax.experimental.pallas import triton as pltriton
  except ImportError as e:
    raise ValueError(
        "this kernel runs through Pallas' Triton lowering, which this JAX no longer has: flash and causal "
        "linear attention also run through jax_triton (pip install 'efficient-attention[gpu]'; their "
        "backend=None picks it); the other Pallas kernels (gated linear / delta rule, block-sparse, FAVOR+ "
        "features) have no other GPU backend yet: use implementation='xla' for them") from e
  return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def check_tiling(sizes, *, pow2: tuple[str, ...], positive: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
  """Raises unless the fields `pow2` of `sizes` are powers of two >= 16 and `positive` positive ints
  (fields in `optional` may also be None)."""
  for name in pow2 + positive:
    value = getattr(sizes, name)
    if value is None and name in optional:
      continue
    ok = not isinstance(value, bool) and isinstance(value, int) and value > 0
    if name in pow2 and not (ok and value >= 16 and not value & (value - 1)):
      raise ValueError(f"{name}={value!r} must be a power of two >= 16")
    if not ok:
      raise ValueError(f"{name}={value!r} must be a positive int")
