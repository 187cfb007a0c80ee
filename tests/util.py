"""Helpers shared by the tests: fresh random inputs, float64 references, tolerances.

Dimensions are distinct primes where they can be (B=2, T=7/13, N=6 with K=3 or 2,
H=5/8) so that an axis mix-up changes a shape or a value.
"""

from __future__ import annotations

import importlib
import itertools
import os
from typing import Callable

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

_counter = itertools.count()

# Element-wise tolerances against a float64 reference, by input dtype.
TOL = {
    jnp.float32: dict(rtol=2e-5, atol=2e-5),
    jnp.bfloat16: dict(rtol=5e-2, atol=5e-2),
    jnp.float16: dict(rtol=1e-2, atol=1e-2),
}
# Bound on ‖out − ref‖ / ‖ref‖ per output and gradient, by input dtype (checked as well).
NORM_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


# Inputs are fresh per call and reproducible per run; TEST_SEED=N draws another set.
_SEED = int(os.environ.get("TEST_SEED", "20261124"))
_rng = np.random.default_rng(_SEED)


def fresh_key() -> jax.Array:
  """A new PRNG key per call: tests never reuse inputs (and never use zeros)."""
  return jax.random.key(next(_counter) * 7919 + _SEED)


def normal(shape, dtype=jnp.float32, scale: float = 1.0, key=None) -> jax.Array:
  """Fresh standard-normal inputs times `scale`.

  Drawn by numpy (`jax.random` would compile a kernel per new shape), or from
  `key` with `jax.random` when a test needs a fixed draw.
  """
  if key is not None:
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return jnp.asarray(scale * _rng.standard_normal(shape), jnp.float32).astype(dtype)


def bernoulli(p: float, shape) -> jax.Array:
  """A fresh random bool array, True with probability `p`."""
  return jnp.asarray(_rng.random(shape) < p)


def qkv(b=2, t=7, s=None, n=6, kh=3, h=8, hv=None, dtype=jnp.float32, scale=1.0):
  """Random q `[B, T, N, H]`, k `[B, S, K, H]`, v `[B, S, K, Hv]`."""
  s = t if s is None else s
  hv = h if hv is None else hv
  return (normal((b, t, n, h), dtype, scale), normal((b, s, kh, h), dtype, scale),
          normal((b, s, kh, hv), dtype))


def packed_segment_ids(b: int, t: int, num_segments: int = 3) -> jax.Array:
  """int32 `[B, T]` of contiguous runs (packed sequences) with random boundaries."""
  cuts = jax.random.randint(fresh_key(), (b, num_segments - 1), 1, max(t, 2))
  pos = jnp.arange(t)
  return jnp.sum(pos[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def padding_mask(b: int, s: int, *, fully_masked_batch: int | None = None) -> jax.Array:
  """bool `[B, 1, 1, S]` key-padding mask: each row keeps a random prefix of length >= 2.

  (With one live key the output is that key's value whatever q is, so dq would be 0.)
  """
  lengths = jax.random.randint(fresh_key(), (b,), min(2, s), s + 1)
  if fully_masked_batch is not None:
    lengths = lengths.at[fully_masked_batch].set(0)
  return (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]


def f64(tree):
  """Casts floating leaves to float64 numpy arrays (call inside `jax.enable_x64`)."""
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(np.asarray(x, np.float64))
    return x
  return jax.tree.map(cast, tree)


def in_f64(fn: Callable, *args, **kwargs):
  """Runs `fn` on float64 copies of its floating array arguments; returns numpy float64."""
  with jax.enable_x64(True):
    out = fn(*f64(args), **f64(kwargs))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def check_against_f64(fn: Callable, ref: Callable, args: tuple, *, rtol, atol, argnums=(0, 1, 2),
                      norm_tol: float | None = None, jit: bool = True):
  """Value and gradient of `fn` (input dtype) against `ref` run in float64 on the same inputs.

  `norm_tol` replaces the bound on ‖got − ref‖ / ‖ref‖ (NORM_TOL of the dtype) for a
  path whose precision is known to be lower; its caller says why. Both run under
  `jax.jit` unless `jit=False` (op-by-op dispatch costs many times the compile on
  these small shapes; the eager paths have tests of their own).
  """
  if jit:
    fn, ref = jax.jit(fn), jax.jit(ref)
  out = fn(*args)
  chex.assert_tree_all_finite(out)
  w = normal(out.shape, jnp.float32)

  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=argnums)(*args)
  with jax.enable_x64(True):
    a64 = f64(args)
    w64 = jnp.asarray(np.asarray(w, np.float64))
    ref_out = np.asarray(ref(*a64))
    ref_grads = jax.grad(lambda *a: jnp.sum(ref(*a) * w64), argnums=argnums)(*a64)
    ref_grads = jax.tree.map(lambda x: np.asarray(x, np.float64), ref_grads)
  grads = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
  chex.assert_tree_all_finite(grads)
  pairs = [("out", np.asarray(out, np.float64), ref_out)] + [
      (f"grad {i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
  for name, got, want in pairs:
    # Element-wise, atol in units of the array's scale: a gradient summed over many
    # rows is as large as their count, and rounds to its own magnitude.
    scaled_atol = atol * max(1.0, float(np.abs(want).max(initial=0.0)))
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=scaled_atol, custom_message=name)
  dtype = jnp.dtype(args[0].dtype).type
  # A caller that loosens the element-wise rtol for a hard case loosens this bound with it.
  bound = max(NORM_TOL[dtype], rtol) if rtol > TOL[dtype]["rtol"] else NORM_TOL[dtype]
  if norm_tol is not None:
    bound = norm_tol
  for name, got, want in pairs:
    err = relative_error(got, want)
    assert err <= bound, f"{name}: ‖got − ref‖/‖ref‖ = {err:.2e} > {bound:.0e}"
  return out, grads


def relative_error(got, want) -> float:
  """‖got − want‖ / ‖want‖ in float64 (0 when both are 0)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  denom = np.linalg.norm(want)
  return float(np.linalg.norm(got - want) / denom) if denom > 0 else float(np.linalg.norm(got))


def _equations(jaxpr):
  """Every equation of `jaxpr`, those of nested jaxprs (jit, scan, custom_vjp, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def matmul_flops(fn: Callable, *args) -> int:
  """FLOPs of every `dot_general` in `fn`'s jaxpr: 2 * output size * contracted size each.

  Backend-independent (compiled cost analyses differ by platform, and GPU
  lowerings report none).
  """
  total = 0
  for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))
  return total


def largest_value(fn: Callable, *args) -> int:
  """Most elements of any value `fn` computes (its jaxpr, nested jaxprs included).

  A structural memory check that holds on every backend: compiled temp sizes
  also count library workspaces (e.g. cuBLAS's on a GPU).
  """
  return max(int(np.prod(v.aval.shape)) for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr)
             for v in eqn.outvars)


def check_dead_rows(fn: Callable, q, k, v, *, dead, padded_batch: int | None = None):
  """Rows `out[dead]` (rows with nothing to attend to; `dead` an index or a list) are 0, as is their dq.

  With `padded_batch` (a batch whose keys are all masked), that batch's dk and dv
  are 0 too. Everything stays finite. Returns the output and (dq, dk, dv) of a
  loss that is not linear in the output, for the caller's checks of live rows.
  """
  out = fn(q, k, v)
  chex.assert_tree_all_finite(out)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2 + fn(*a)), argnums=(0, 1, 2))(q, k, v)
  chex.assert_tree_all_finite(grads)
  for index in dead if isinstance(dead, list) else [dead]:
    np.testing.assert_array_equal(np.asarray(out[index]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][index]), 0.0)
  if padded_batch is not None:
    for g in grads[1:]:
      np.testing.assert_array_equal(np.asarray(g[padded_batch]), 0.0)
  return out, grads


def load_experiment(name: str):
  """The module `experiments.<name>` (each experiment script is also a module of the package)."""
  return importlib.import_module(f"experiments.{name}")


def pallas_call_names(fn: Callable, *args) -> list[str]:
  """Names of the `pallas_call`s in `fn`'s jaxpr (nested jaxprs included)."""
  names = []
  for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "pallas_call":
      # "name" (a str) in some JAX versions, "name_and_src_info" (with a .name) in others.
      name = eqn.params.get("name", eqn.params.get("name_and_src_info"))
      names.append(str(getattr(name, "name", name)))
  return names
