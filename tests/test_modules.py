"""The nnx attention modules: each equals its pure function on the projected q/k/v, decodes
like its parallel causal form, redraws FAVOR+ features on schedule, and works with nnx tools.

Each check runs inside one `nnx.jit` program: eager calls would compile every
primitive on its own, and one program per check compiles the shared parts once.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attention as ea
from tests import util

B, T, D, N, K, H, OUT = 2, 13, 11, 6, 3, 4, 7
T_MAX, P, M = 17, 5, 7
CAUSAL_FAMILIES = ("softmax", "favor", "linear", "local", "block_sparse", "lsh", "gla", "delta_rule")
# Families whose layers read x beyond q, k, v (gates, convolutions): test_modern_modules.py compares them
# with their functions.
RECURRENT = ("gla", "delta_rule")


def sparse_layout(seq_len):
  return (ea.layouts.local(seq_len, window=3, block_size=4)
          | ea.layouts.global_tokens(seq_len, num_global=2, block_size=4))


FAMILY_OPTIONS = {
    "softmax": dict(implementation="xla"),
    "favor": dict(num_features=M, chunk_size=4),
    "linear": dict(chunk_size=4),
    "linformer": dict(max_len=T_MAX, projected_len=P),
    "local": dict(window=3, block_size=2),
    "block_sparse": dict(layout=sparse_layout),
    "lsh": dict(num_buckets=4, num_hashes=2, chunk_size=3),
    "gla": dict(gate_rank=5, chunk_size=4),
    "delta_rule": dict(gated=True, chunk_size=4),
}


def make(name, **kwargs):
  """A module of family `name` with distinct sizes: D=11 -> N=6 heads of H=4 (K=3 kv heads) -> 7."""
  options = dict(qkv_features=N * H, out_features=OUT, num_kv_heads=K, is_causal=name in CAUSAL_FAMILIES,
                 rngs=nnx.Rngs(util.fresh_key()), **FAMILY_OPTIONS[name])
  return ea.ATTENTION_FAMILIES[name](N, D, **{**options, **kwargs})


def pure(module):
  """The family's function with the module's options, on q, k, v."""
  causal = dict(is_causal=module.is_causal)
  return {
      "softmax": lambda q, k, v, **kw: ea.softmax_attention(q, k, v, **causal, **kw),
      "favor": lambda q, k, v, **kw: ea.favor_attention(q, k, v, module.features[...], chunk_size=4, **causal, **kw),
      "linear": lambda q, k, v, **kw: ea.linear_attention(q, k, v, chunk_size=4, **causal, **kw),
      "linformer": lambda q, k, v, **kw: ea.linformer_attention(
          q, k, v, module.e_proj[...], module.f_proj[...], **kw),
      "local": lambda q, k, v, **kw: ea.block_sparse_attention(
          q, k, v, ea.layouts.local(q.shape[1], window=3, block_size=2), **causal, **kw),
      "block_sparse": lambda q, k, v, **kw: ea.block_sparse_attention(q, k, v, sparse_layout(q.shape[1]), **causal,
                                                                       **kw),
      "lsh": lambda q, k, v, **kw: ea.lsh_attention(q, v, module.rotations[...], chunk_size=3, **causal, **kw),
  }[module.family]


@functools.partial(nnx.jit, static_argnames="decode")
def call(module, x, mask=None, segment_ids=None, decode=False):
  return module(x, mask=mask, segment_ids=segment_ids, decode=decode)


@nnx.jit
def module_and_function(module, x, mask=None, segment_ids=None):
  """`module(x)` and the output projection of the pure function on the module's q, k, v."""
  q, k, v = module.project(x)
  want = module.out(pure(module)(q, k, v, mask=mask, segment_ids=segment_ids))
  return module(x, mask=mask, segment_ids=segment_ids), want


@functools.partial(nnx.jit, static_argnames="prefill")
def parallel_and_decoded(module, x, prefill):
  """`module(x)`, and x decoded from the (initialised) cache: `prefill` tokens in one call, then one at a time."""
  parallel = module(x)
  decoded = [module(x[:, :prefill], decode=True)]
  decoded += [module(x[:, t:t + 1], decode=True) for t in range(prefill, x.shape[1])]
  return parallel, jnp.concatenate(decoded, axis=1)


@pytest.mark.parametrize("name", [name for name in ea.ATTENTION_FAMILIES if name not in RECURRENT])
def test_module_equals_its_function_on_projected_qkv(name):
  module = make(name)
  x = util.normal((B, T, D))
  got, want = module_and_function(module, x, mask=util.padding_mask(B, T), segment_ids=util.packed_segment_ids(B, T))
  chex.assert_shape(got, (B, T, OUT))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  if name == "favor":
    # A training call, but redraw_interval=0: the features stay, uncounted.
    assert int(module.training_calls[...]) == 0


def test_projections_shapes_and_rope():
  module = make("softmax", rope_base=100.0)

  @nnx.jit
  def projections(module, x):
    rotate = functools.partial(ea.apply_rope, positions=jnp.arange(T), base=100.0)
    return module.project(x), (rotate(module.query(x)), rotate(module.key(x)), module.value(x))

  (q, k, v), want = projections(module, util.normal((B, T, D)))
  chex.assert_shape(q, (B, T, N, H))
  chex.assert_shape((k, v), (B, T, K, H))
  chex.assert_trees_all_close((q, k, v), want, rtol=1e-6, atol=1e-6)


def test_rope_depends_on_relative_position_only():
  q, k = util.normal((1, 1, 1, 8)), util.normal((1, 1, 1, 8))

  def score(t, s):
    return jnp.sum(ea.apply_rope(q, jnp.array([t])) * ea.apply_rope(k, jnp.array([s])))

  chex.assert_trees_all_close(score(7, 3), score(1007, 1003), rtol=1e-4)
  chex.assert_trees_all_close(jnp.linalg.norm(ea.apply_rope(q, jnp.array([5]))), jnp.linalg.norm(q), rtol=1e-6)
  assert abs(float(score(7, 3) - score(7, 4))) > 1e-4


@pytest.mark.parametrize("name,rope_base", [("softmax", None), ("local", 100.0), ("linear", None), ("favor", None)])
def test_decode_equals_parallel_causal_forward(name, rope_base):
  """A prefill of 10 tokens (more than the local ring buffer's 6), then one token at a time."""
  module = make(name, rope_base=rope_base)
  module.init_cache((B, T, D))
  parallel, decoded = parallel_and_decoded(module, util.normal((B, T, D)), prefill=10)
  chex.assert_trees_all_close(decoded, parallel, rtol=1e-5, atol=1e-5)
  assert int(module.cache_index[...]) == T


def test_local_cache_is_a_ring_buffer_of_the_window():
  module = make("local", window=5, block_size=2)
  module.init_cache((B, 1000, D))
  assert module.span == 2 * (3 + 1)
  chex.assert_shape((module.cached_key[...], module.cached_value[...]), (B, module.span, K, H))


def test_bf16_computation_keeps_dtype_in_outputs_and_cache():
  module = make("softmax", dtype=jnp.bfloat16)
  x = util.normal((B, T, D))
  assert nnx.eval_shape(lambda m, x: m(x), module, x).dtype == jnp.bfloat16
  module.init_cache((B, T, D))
  assert module.cached_key.dtype == jnp.bfloat16
  assert nnx.eval_shape(lambda m, x: m(x, decode=True), module, x[:, :1]).dtype == jnp.bfloat16


@pytest.mark.parametrize("name,variable,shape", [("favor", "features", (M, H)), ("lsh", "rotations", (2, H, 2))])
def test_random_features_are_redrawn_on_schedule_and_only_in_training(name, variable, shape):
  module = make(name, redraw_interval=3)
  x = util.normal((B, T, D))

  def changed_after(fn):
    before = getattr(module, variable)[...]
    fn()
    return not np.array_equal(before, getattr(module, variable)[...])

  assert not changed_after(lambda: (call(module, x), call(module, x)))
  assert changed_after(lambda: call(module, x))  # the 3rd training call, under nnx.jit
  assert int(module.training_calls[...]) == 3
  module.eval()
  assert not changed_after(lambda: [call(module, x) for _ in range(3)])
  assert int(module.training_calls[...]) == 3
  module.train()
  assert not changed_after(lambda: (call(module, x), call(module, x)))
  assert changed_after(lambda: module(x))  # the 6th, eagerly
  assert int(module.training_calls[...]) == 6
  chex.assert_shape(getattr(module, variable)[...], shape)
  chex.assert_tree_all_finite(getattr(module, variable)[...])
  if name == "lsh":
    return  # no decoding
  module.init_cache((B, T, D))
  assert not changed_after(lambda: [call(module, x[:, :1], decode=True) for _ in range(3)])
  assert int(module.training_calls[...]) == 6


@pytest.mark.parametrize("name", ea.ATTENTION_FAMILIES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_parameter_shapes_and_count(name, use_bias):
  module = make(name, use_bias=use_bias)
  params = nnx.state(module, nnx.Param)
  chex.assert_shape(module.query.kernel[...], (D, N, H))
  chex.assert_shape(module.value.kernel[...], (D, K, H))
  chex.assert_shape(module.out.kernel[...], (N, H, OUT))
  keys = 0 if name == "lsh" else 1  # LSH shares one projection for queries and keys
  if keys:
    chex.assert_shape(module.key.kernel[...], (D, K, H))
  else:
    assert module.key is None
  want = D * N * H + (1 + keys) * D * K * H + N * H * OUT + use_bias * (N * H + (1 + keys) * K * H + OUT)
  if name == "linformer":
    chex.assert_shape((module.e_proj[...], module.f_proj[...]), (P, T_MAX))
    want += 2 * P * T_MAX
  if name in RECURRENT:
    # Short convolutions (width 4) on q, k, v, the output norm's scale, the output gate; then
    # GLA's rank-5 forget gate (its second factor has a bias), or the delta rule's beta and forget gate.
    want += 4 * (N + 2 * K) * H + H + D * N * H
    want += D * 5 + 5 * K * H + K * H if name == "gla" else D * K + D * K + 2 * K
  assert sum(x.size for x in jax.tree.leaves(params)) == want
  if name == "favor":
    chex.assert_shape(module.features[...], (M, H))
    features = nnx.state(module, ea.RandomFeatures)
    assert {path[0] for path, _ in nnx.to_flat_state(features)} == {"features", "training_calls"}
  if name == "lsh":
    chex.assert_shape(module.rotations[...], (2, H, 2))
    features = nnx.state(module, ea.RandomFeatures)
    assert {path[0] for path, _ in nnx.to_flat_state(features)} == {"rotations", "training_calls"}


def test_per_head_linformer_projections():
  module = make("linformer", per_head_projections=True)
  chex.assert_shape((module.e_proj[...], module.f_proj[...]), (K, P, T_MAX))
  got, want = module_and_function(module, util.normal((B, T, D)))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_param_filter_leaves_out_features_and_caches():
  module = make("favor")
  module.init_cache((B, T, D))
  paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  assert paths == {f"{p}.{w}" for p in ("query", "key", "value", "out") for w in ("kernel", "bias")}
  caches = {path[0] for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Cache))}
  assert caches == {"cached_kv", "cached_z", "cached_stabiliser", "cache_index"}


def test_split_merge_round_trip():
  module = make("favor")
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  copy = nnx.merge(graphdef, params, rest)
  chex.assert_trees_all_equal(nnx.state(copy), nnx.state(module))
  copy.init_cache((B, T, D))
  parallel, decoded = parallel_and_decoded(copy, util.normal((B, T, D)), prefill=10)
  chex.assert_trees_all_close(decoded, parallel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ea.ATTENTION_FAMILIES)
def test_multi_head_attention_by_name_builds_the_family_module(name):
  options = dict(qkv_features=N * H, num_kv_heads=K, is_causal=name in CAUSAL_FAMILIES, **FAMILY_OPTIONS[name])
  key = util.fresh_key()
  by_name = ea.MultiHeadAttention(N, D, attention=name, rngs=nnx.Rngs(key), **options)
  direct = ea.ATTENTION_FAMILIES[name](N, D, rngs=nnx.Rngs(key), **options)
  assert by_name.family == name and type(by_name.attention) is type(direct)
  chex.assert_trees_all_equal(nnx.state(by_name.attention, nnx.Param), nnx.state(direct, nnx.Param))
  if name == "favor":
    chex.assert_trees_all_equal(by_name.attention.features[...], direct.features[...])
  if name == "lsh":
    chex.assert_trees_all_equal(by_name.attention.rotations[...], direct.rotations[...])


def test_families_are_listed():
  assert set(ea.ATTENTION_FAMILIES) == {"softmax", "favor", "linear", "linformer", "local", "block_sparse", "lsh",
                                        "gla", "delta_rule"}
  assert {"window", "block_size", "rngs", "num_kv_heads"} <= set(ea.attention_options("local"))


def test_bad_input_raises_clearly():
  x = util.normal((B, T, D))
  with pytest.raises(ValueError, match=r"in_features=11.*x.shape=\(2, 13, 10\)"):
    make("softmax")(x[..., :10])
  with pytest.raises(ValueError, match="exceeds max_len=17"):
    make("linformer")(util.normal((B, T_MAX + 2, D)))
  with pytest.raises(ValueError, match="unknown attention='performer'; valid: 'softmax', 'favor'"):
    ea.MultiHeadAttention(N, D, attention="performer", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"takes no option\(s\) \['window'\]; its options: .*'implementation'"):
    ea.MultiHeadAttention(N, D, attention="softmax", window=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    make("softmax", num_kv_heads=4)
  with pytest.raises(ValueError, match="no causal form"):
    make("linformer", is_causal=True)


def test_decoding_errors():
  x = util.normal((B, T, D))
  with pytest.raises(ValueError, match="linformer: cannot decode: Linformer has no causal form"):
    make("linformer").init_cache((B, T, D))
  with pytest.raises(ValueError, match="cannot decode"):
    make("linformer")(x, decode=True)
  with pytest.raises(ValueError, match="LocalAttention"):
    make("block_sparse").init_cache((B, T, D))
  with pytest.raises(ValueError, match="lsh: cannot decode: LSH attention sorts the whole sequence"):
    make("lsh").init_cache((B, T, D))
  with pytest.raises(ValueError, match="lsh: cannot decode"):
    make("lsh")(x, decode=True)
  with pytest.raises(ValueError, match="init_cache"):
    make("softmax")(x, decode=True)
  with pytest.raises(ValueError, match="is_causal=True"):
    make("softmax", is_causal=False).init_cache((B, T, D))
  module = make("softmax")
  module.init_cache((B, 4, D))
  with pytest.raises(ValueError, match="no mask or segment_ids"):
    module(x[:, :1], decode=True, segment_ids=jnp.zeros((B, 1), jnp.int32))
  module.cache_index[...] = jnp.array(3, jnp.int32)  # as after decoding 3 tokens
  with pytest.raises(ValueError, match="decoding 2 token.* at cache_index=3 overflows the cache of 4 positions"):
    module(x[:, :2], decode=True)


def test_decode_past_cache_raises_under_jit():
  module = make("softmax")
  module.init_cache((B, 2, D))
  x = util.normal((B, 1, D))
  call(module, x, decode=True)
  call(module, x, decode=True)
  with pytest.raises(Exception, match="cache_index=2 overflows the cache of 2 positions"):
    jax.block_until_ready(call(module, x, decode=True))
