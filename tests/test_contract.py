"""The rules every family shares, checked family by family in one place."""

import chex
import jax
import jax.numpy as jnp
import pytest

import efficient_attention as ea
from tests import util

B, T, N, K, H = 2, 13, 6, 3, 8
T_MAX = 17


def _families():
  features = ea.orthogonal_random_features(util.fresh_key(), 16, H)
  e_proj, f_proj = util.normal((5, T_MAX)), util.normal((5, T_MAX))
  layout = ea.layouts.local(T, window=4, block_size=4) | ea.layouts.global_tokens(T, num_global=2, block_size=4)
  return {
      "softmax": ea.softmax_attention,
      "favor": lambda q, k, v, **kw: ea.favor_attention(q, k, v, features, chunk_size=4, **kw),
      "linear": lambda q, k, v, **kw: ea.linear_attention(q, k, v, chunk_size=4, **kw),
      "linformer": lambda q, k, v, **kw: ea.linformer_attention(q, k, v, e_proj, f_proj, **kw),
      "block_sparse": lambda q, k, v, **kw: ea.block_sparse_attention(q, k, v, layout, **kw),
  }


FAMILIES = _families()
CAUSAL = {"softmax": True, "favor": True, "linear": True, "linformer": False, "block_sparse": True}


@pytest.mark.parametrize("name", FAMILIES)
def test_vmap_jit_grad(name):
  fn = FAMILIES[name]
  causal = CAUSAL[name]
  q, k, v = (jnp.stack([x, 2 * x]) for x in util.qkv(B, T, T, N, K, H))  # [2, B, T, N, H]
  batched = jax.jit(jax.vmap(lambda q, k, v: fn(q, k, v, is_causal=causal)))(q, k, v)
  looped = jnp.stack([fn(q[i], k[i], v[i], is_causal=causal) for i in range(2)])
  chex.assert_trees_all_close(batched, looped, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, is_causal=causal) ** 2), argnums=(0, 1, 2)))(
      q[0], k[0], v[0])
  chex.assert_tree_all_finite(grads)
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", FAMILIES)
def test_low_precision_keeps_dtype_and_tracks_float32(name, dtype):
  fn = FAMILIES[name]
  q, k, v = util.qkv(B, T, T, N, K, H)
  want = fn(q, k, v)
  got = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype))
  assert got.dtype == dtype
  chex.assert_tree_all_finite(got)
  # Inputs rounded to `dtype` and float32 accumulation: error of the order of the rounding.
  assert util.relative_error(got, want) < 3e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_rows_with_nothing_to_attend_are_zero_with_zero_grad(name):
  fn = FAMILIES[name]
  q, k, v = util.qkv(B, T, T, N, K, H)
  # Batch 1: every key padded away. Batch 0: query row 3 of head 2 masked entirely.
  mask = jnp.ones((B, N, T, T), bool).at[1].set(False).at[0, 2, 3].set(False)
  f = lambda q, k, v: fn(q, k, v, mask=mask)
  out, (dq, _, _) = util.check_dead_rows(f, q, k, v, dead=[1, (0, 3, 2)], padded_batch=1)
  assert float(jnp.abs(out[0, 4]).sum()) > 0
  assert float(jnp.abs(dq[0]).sum()) > 0


@pytest.mark.parametrize("name", ["softmax", "favor", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences_equal_separate_runs(name, causal):
  """Two sequences packed into one row with segment ids == each run on its own."""
  fn = FAMILIES[name]
  split = 5
  q, k, v = util.qkv(1, T, T, N, K, H)
  ids = (jnp.arange(T) >= split).astype(jnp.int32)[None]
  packed = fn(q, k, v, segment_ids=ids, is_causal=causal)
  first = fn(q[:, :split], k[:, :split], v[:, :split], is_causal=causal)
  second = fn(q[:, split:], k[:, split:], v[:, split:], is_causal=causal)
  chex.assert_trees_all_close(packed, jnp.concatenate([first, second], axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_input_errors(name):
  fn = FAMILIES[name]
  q, k, v = util.qkv(B, T, T, N, K, H)
  with pytest.raises(ValueError, match="head dim"):
    fn(q, k[..., :5], v)
  with pytest.raises(ValueError, match="GQA"):
    fn(q[:, :, :4], k, v)
  with pytest.raises(TypeError, match="floating"):
    fn(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
  with pytest.raises(ValueError, match="implementation"):
    fn(q, k, v, implementation="tpu")
  if name != "softmax":
    with pytest.raises(ValueError, match="cudnn"):
      fn(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("name,option", [
    ("favor", "bias"), ("linear", "bias"), ("linformer", "bias"), ("linformer", "is_causal")])
def test_options_a_family_cannot_honour_raise(name, option):
  q, k, v = util.qkv(B, T, T, N, K, H)
  value = util.normal((1, N, T, T)) if option == "bias" else True
  with pytest.raises(ValueError, match=option):
    FAMILIES[name](q, k, v, **{option: value})
