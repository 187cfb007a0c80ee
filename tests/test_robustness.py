"""Robustness of every family to the inputs real batches carry.

Runs on CPU (the Pallas kernels in interpret mode) and, unchanged, compiled on a GPU, where the
cuDNN path joins the cases:
`XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. pytest -n 0 tests/test_robustness.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention import layouts
from tests import util

# --------------------------------------------------------------------------- #
# masked garbage: NaN / inf (and any segment id) where the mask is False never
# reaches a live output or any gradient, in every family and implementation.
# --------------------------------------------------------------------------- #

B, T, N, K, H = 2, 9, 2, 1, 8  # T == S (self-attention), GQA with G = 2
GARBAGE = np.array([np.nan, np.inf, -np.inf], np.float32)
ON_GPU = jax.default_backend() == "gpu"
_E = util.normal((4, T), key=jax.random.key(1))
_F = util.normal((4, T), key=jax.random.key(2))
_FEATURES = ea.orthogonal_random_features(jax.random.key(3), 16, H)


def _family_fn(family: str, implementation: str, is_causal: bool):
  """`(q, k, v, mask, ids) -> out` for one family x implementation."""
  if family == "softmax":
    return functools.partial(ea.softmax_attention, implementation=implementation, is_causal=is_causal)
  if family == "block_sparse":
    # Pallas: blocks of 16 (one tile, the tail masked); XLA: three blocks of 3, two live per row.
    layout = (layouts.dense(T, block_size=16) if implementation == "pallas"
              else layouts.local(T, window=3, block_size=3))
    return lambda q, k, v, **kw: ea.block_sparse_attention(q, k, v, layout, implementation=implementation,
                                                           is_causal=is_causal, **kw)
  if family == "linear":
    return functools.partial(ea.linear_attention, implementation=implementation, is_causal=is_causal, chunk_size=4
                             if implementation == "xla" else 16)
  if family == "favor":
    return lambda q, k, v, **kw: ea.favor_attention(q, k, v, _FEATURES, implementation=implementation,
                                                    is_causal=is_causal, chunk_size=4 if implementation == "xla" else 16,
                                                    **kw)
  assert family == "linformer" and not is_causal
  return lambda q, k, v, **kw: ea.linformer_attention(q, k, v, _E, _F, implementation=implementation, **kw)


# (family, implementation, is_causal); "pallas" runs interpreted on CPU, compiled on a GPU.
CASES = [
    ("softmax", "xla", False), ("softmax", "xla", True), ("softmax", "pallas", False), ("softmax", "pallas", True),
    ("block_sparse", "xla", True), ("block_sparse", "pallas", False),
    ("linear", "xla", False), ("linear", "xla", True), ("linear", "pallas", True),
    ("favor", "xla", False), ("favor", "xla", True), ("favor", "pallas", True),
    ("linformer", "xla", False),
] + ([("softmax", "cudnn", False), ("softmax", "cudnn", True)] if ON_GPU else [])
# Families whose XLA path takes a mask with a T axis (query padding too) under every option here.
QUERY_AXIS = {("softmax", "xla"), ("block_sparse", "xla"), ("linear", "xla"), ("favor", "xla"),
              ("linformer", "xla")}


# One case per family x implementation (with segment ids) runs in CI; the rest of the grid is
# marked slow (`pytest -m ''` runs everything): each case compiles its own value-and-grad.
FAST = {("softmax", "xla", False), ("softmax", "pallas", True), ("block_sparse", "xla", True),
        ("block_sparse", "pallas", False), ("linear", "xla", True), ("linear", "pallas", True),
        ("favor", "xla", False), ("favor", "pallas", True), ("linformer", "xla", False),
        ("softmax", "cudnn", True)}


def _case_id(case):
  return "-".join(str(c) if not isinstance(c, bool) else ("causal" if c else "full") for c in case)


def _grid(cases, *, fast=lambda case, with_ids: with_ids):
  """pytest params (case, with_ids), slow unless the case is in FAST and `fast` says so."""
  return [pytest.param(case, with_ids, id=f"{_case_id(case)}-{'segment_ids' if with_ids else 'no_ids'}",
                       marks=() if case in FAST and fast(case, with_ids) else pytest.mark.slow)
          for case in cases for with_ids in (True, False)]


@functools.lru_cache(maxsize=None)
def _value_and_grads(family, implementation, is_causal, with_ids):
  """jit of `(q, k, v, mask, ids, weight) -> (out, (dq, dk, dv))` for a loss over the weighted rows."""
  fn = _family_fn(family, implementation, is_causal)

  def loss(q, k, v, mask, ids, weight):
    out = fn(q, k, v, mask=mask, segment_ids=ids if with_ids else None)
    # A where, not a product: rows the loss ignores may hold anything.
    return jnp.sum(jnp.where(weight != 0, out.astype(jnp.float32) * weight, 0.0)), out

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def run(q, k, v, mask, ids, weight):
    (_, out), grads = grad(q, k, v, mask, ids, weight)
    return out, grads

  return jax.jit(run)


def _inputs(live: np.ndarray, seed: int, *, query_axis: bool, with_ids: bool, dtype):
  """Clean and garbage versions of (q, k, v, mask, ids): random values everywhere in the clean one;
  NaN / inf in q, k, v and any int32 id at the positions `live` [B, T] marks False in the other."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  # Packed runs of ids; masked positions get arbitrary int32 ids in the garbage version.
  ids = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
  dead = ~live
  garbage = []
  for x in (q, k, v):
    g = x.copy()
    g[dead] = rng.choice(GARBAGE, size=g[dead].shape)
    garbage.append(g)
  g_ids = ids.copy()
  extremes = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max, 0, 1, 2], np.int32)
  g_ids[dead] = np.where(rng.random(dead.sum()) < 0.5, rng.choice(extremes, dead.sum()),
                         rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, dead.sum(), dtype=np.int32))
  if query_axis:
    # [B, 1, T, S]: padded positions are padding for queries too (their rows are dead).
    mask = live[:, None, :, None] & live[:, None, None, :]
  else:
    # [B, 1, 1, S]: key padding.
    mask = live[:, None, None, :]
  to = lambda *xs: tuple(jnp.asarray(x, dtype) for x in xs)  # noqa: E731
  return (*to(q, k, v), jnp.asarray(mask), jnp.asarray(ids)), (*to(*garbage), jnp.asarray(mask), jnp.asarray(g_ids))


def _check_masked_garbage(case, live, seed, *, query_axis, with_ids):
  family, implementation, is_causal = case
  dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
  clean, dirty = _inputs(live, seed, query_axis=query_axis, with_ids=with_ids, dtype=dtype)
  fn = _value_and_grads(family, implementation, is_causal, with_ids)
  dead_batch = ~live.any(axis=1)
  # The loss reads the live positions and every row of a fully masked batch row (their output
  # is 0 and their gradient must be 0 whatever the cotangent).
  weight_rows = live | dead_batch[:, None]
  weight = jnp.asarray(np.where(weight_rows[:, :, None, None], util.normal((B, T, N, H)), 0.0), jnp.float32)
  out_c, grads_c = fn(*clean, weight)
  out_d, grads_d = fn(*dirty, weight)
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out_d, np.float32)[live], np.asarray(out_c, np.float32)[live], **tol)
  assert np.all(np.isfinite(np.asarray(out_d, np.float32)[live]))
  # Fully masked batch rows: exactly 0, garbage or not.
  assert not np.any(np.asarray(out_d, np.float32)[dead_batch]), "a fully masked batch row is not 0"
  for name, g_c, g_d in zip("qkv", grads_c, grads_d):
    g_c, g_d = np.asarray(g_c, np.float32), np.asarray(g_d, np.float32)
    assert np.all(np.isfinite(g_d)), f"d{name} not finite: {g_d}"
    np.testing.assert_allclose(g_d[live], g_c[live], err_msg=f"d{name} on live positions", **tol)
    # Masked positions: exactly 0 (the loss ignores their rows, and masked keys have no effect).
    assert not np.any(g_d[~live]), f"d{name} is not exactly 0 at masked positions"
    assert not np.any(g_c[~live]), f"clean d{name} is not exactly 0 at masked positions"


_live = st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B).map(np.array)
_seed = st.integers(0, 2**31 - 1)
_settings = settings(max_examples=4, deadline=None, derandomize=True)
# Padding at the end of one batch row, the other fully masked (dead_row=True masks row 1).
_PADDED = np.ones((B, T), bool)
_PADDED[0, 6:] = False


@pytest.mark.parametrize("case, with_ids", _grid(CASES))
@_settings
@given(live=_live, seed=_seed, dead_row=st.booleans())
@example(live=_PADDED, seed=7, dead_row=True)
def test_masked_garbage_key_padding(case, with_ids, live, seed, dead_row):
  """Key-padding mask `[B, 1, 1, S]`; garbage in q, k, v and ids wherever it is False; a fully
  masked batch row gives 0 with 0 gradient."""
  live = live.copy()
  if dead_row:
    live[1] = False
  _check_masked_garbage(case, live, seed, query_axis=False, with_ids=with_ids)


@pytest.mark.parametrize("case, with_ids", _grid([c for c in CASES if c[:2] in QUERY_AXIS],
                                                  fast=lambda case, with_ids: False))
@_settings
@given(live=_live, seed=_seed, dead_row=st.booleans())
def test_masked_garbage_query_and_key_padding(case, with_ids, live, seed, dead_row):
  """Mask `[B, 1, T, S]` = padding on both axes: padded query rows are dead (0, 0 gradient)."""
  live = live.copy()
  if dead_row:
    live[1] = False
  _check_masked_garbage(case, live, seed, query_axis=True, with_ids=with_ids)


@pytest.mark.slow
def test_padding_ids_need_no_spare_value():
  """Key padding on the Pallas path folds into segment ids: it needs an id no query has, even when
  the queries' ids span the whole int32 range."""
  info = np.iinfo(np.int32)
  q, k, v = util.qkv(B, T, T, N, K, H)
  ids = np.zeros((B, T), np.int32)
  ids[:, 0], ids[:, 1] = info.min, info.max
  ids = jnp.asarray(ids)
  mask = jnp.ones((B, 1, 1, T), bool).at[:, :, :, 5:].set(False)
  got = ea.softmax_attention(q, k, v, mask=mask, segment_ids=ids, implementation="pallas")
  want = ea.softmax_attention(q, k, v, mask=mask, segment_ids=ids, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["softmax"] + [
    pytest.param(f, marks=pytest.mark.slow) for f in ("linear", "favor", "linformer", "block_sparse")])
def test_module_padding_garbage(family):
  """MultiHeadAttention with a key-padding mask: NaN / inf in x at padded positions leave the live
  rows' outputs and every parameter gradient as with clean padding."""
  options = dict(max_len=T) if family == "linformer" else {}
  if family == "block_sparse":
    options = dict(layout=layouts.local(T, window=3, block_size=3))
  d = 16
  module = ea.MultiHeadAttention(N, d, attention=family, rngs=nnx.Rngs(0), **options)
  live = np.ones((B, T), bool)
  live[0, 5:] = False
  live[1, ::3] = False
  mask = jnp.asarray(live[:, None, None, :])
  x = util.normal((B, T, d))
  garbage = np.asarray(x).copy()
  garbage[~live] = np.resize(GARBAGE, garbage[~live].shape)
  weight = jnp.where(jnp.asarray(live)[..., None], util.normal((B, T, d)), 0.0)

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def value_and_grad(params, x):
    def loss(params):
      out = nnx.merge(graphdef, params, rest)(x, mask=mask)
      return jnp.sum(jnp.where(weight != 0, out * weight, 0.0)), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  out_c, grads_c = value_and_grad(params, x)
  out_d, grads_d = value_and_grad(params, jnp.asarray(garbage))
  np.testing.assert_allclose(np.asarray(out_d)[live], np.asarray(out_c)[live], rtol=1e-5, atol=1e-6)
  for g_c, g_d in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_d)):
    assert np.all(np.isfinite(g_d))
    np.testing.assert_allclose(g_d, g_c, rtol=1e-4, atol=1e-6)
