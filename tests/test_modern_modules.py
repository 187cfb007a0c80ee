"""The GLA and delta rule modules and their LM layers: shapes and GQA, the module is its function on
projected inputs, decoding equals the causal forward (short convolutions included), padding and
segment ids, gradients, option checks, a hybrid LM's generation, FLOPs.

Each check runs inside one `nnx.jit` program (see test_modules.py).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attention as ea
from efficient_attention import lm
from tests import util

B, T, D, N, K, H, OUT = 2, 13, 11, 6, 3, 4, 7

# id -> (family, options): the defaults (convolution, output norm and gate on) and stripped-down variants.
CASES = {
    "gla": ("gla", {}),
    "gla-step-noconv": ("gla", dict(gate="step", short_conv=0)),
    "delta": ("delta_rule", {}),
    "gated-delta-noconv": ("delta_rule", dict(gated=True, short_conv=0, output_norm=False, output_gate=False)),
}


def make(family, **options):
  """D=11 -> N=6 query heads of H=4 (K=3 key/value heads) -> 7; chunks of 4 steps (T=13: four chunks)."""
  return ea.ATTENTION_FAMILIES[family](N, D, N * H, out_features=OUT, num_kv_heads=K, chunk_size=4,
                                       rngs=nnx.Rngs(util.fresh_key()), **options)


@functools.partial(nnx.jit, static_argnames="decode")
def call(module, x, mask=None, segment_ids=None, decode=False):
  return module(x, mask=mask, segment_ids=segment_ids, decode=decode)


@functools.partial(nnx.jit, static_argnames="splits")
def parallel_and_decoded(module, x, splits):
  """`module(x)`, and x decoded from the (initialised) cache in calls of `splits` tokens each."""
  parallel = module(x)
  starts = np.cumsum((0,) + splits)
  decoded = [module(x[:, a:b], decode=True) for a, b in zip(starts[:-1], starts[1:])]
  return parallel, jnp.concatenate(decoded, axis=1)


@pytest.mark.parametrize("case", CASES)
def test_forward_shapes_gqa_and_step_inputs(case):
  family, options = CASES[case]
  module = make(family, **options)
  x = util.normal((B, T, D))
  out = call(module, x)
  chex.assert_shape(out, (B, T, OUT))
  chex.assert_tree_all_finite(out)
  inputs = module.step_inputs(x)
  if family == "gla":
    chex.assert_shape(inputs["gates"], (B, T, K, H) if module.gate == "feature" else (B, T, K))
  else:
    chex.assert_shape(inputs["beta"], (B, T, K))
    assert 0 <= float(inputs["beta"].min()) and float(inputs["beta"].max()) <= 1
    assert ("gates" in inputs) == module.gated
  assert all(float(g.max()) <= 0 for name, g in inputs.items() if name == "gates")


@nnx.jit
def module_and_function(module, x, mask, segment_ids):
  """`module(x)` and the output projection of the family's function on the module's q, k, v and step inputs."""
  q, k, v = module.project(x)
  inputs = module.step_inputs(x)
  options = dict(mask=mask, segment_ids=segment_ids, chunk_size=4)
  if module.family == "gla":
    heads = ea.linear_attention(q, k, v, feature_map="identity", normalize="none", gates=inputs["gates"],
                                is_causal=True, **options) * H**-0.5
  else:
    heads = ea.delta_rule_attention(q, k, v, inputs["beta"], gates=inputs.get("gates"), **options)
  return module(x, mask=mask, segment_ids=segment_ids), module.out(heads)


@pytest.mark.parametrize("family,options", [("gla", dict(gate="feature")), ("delta_rule", dict(gated=True))])
def test_without_convolution_and_output_gate_the_module_is_its_function(family, options):
  module = make(family, short_conv=0, output_norm=False, output_gate=False, **options)
  got, want = module_and_function(module, util.normal((B, T, D)), util.padding_mask(B, T),
                                  util.packed_segment_ids(B, T))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_decode_equals_the_causal_forward(case):
  """A prefill of 5 tokens, a chunk of 3, then one at a time: state and convolution caches carry over."""
  family, options = CASES[case]
  module = make(family, **options)
  module.init_cache((B, T, D))
  parallel, decoded = parallel_and_decoded(module, util.normal((B, T, D)), splits=(5, 3) + (1,) * (T - 8))
  chex.assert_trees_all_close(decoded, parallel, rtol=1e-5, atol=1e-5)
  assert int(module.cache_index[...]) == T
  if module.short_conv:
    chex.assert_shape(module.cached_conv[...], (B, 3, N + 2 * K, H))


@functools.partial(nnx.jit, static_argnames="start")
def padded_and_trimmed(module, x, mask, start):
  return module(x, mask=mask), module(x[:, start:])


@functools.partial(nnx.jit, static_argnames="split")
def packed_and_separate(module, x, split):
  ids = jnp.broadcast_to((jnp.arange(x.shape[1]) >= split).astype(jnp.int32), x.shape[:2])
  return module(x, segment_ids=ids), jnp.concatenate([module(x[:, :split]), module(x[:, split:])], axis=1)


@pytest.mark.parametrize("family", ["gla", "delta_rule"])
def test_padding_and_segments_reach_no_live_row_through_the_convolution(family):
  module = make(family, gated=True) if family == "delta_rule" else make(family)
  x = util.normal((B, T, D))
  # Three padded positions at the start: no query attends them; NaN there must not leak either.
  start = 3
  mask = jnp.broadcast_to(jnp.arange(T) >= start, (B, 1, 1, T))
  garbage = x.at[:, 0].set(jnp.nan).at[:, 1:start].multiply(100.0)
  padded, trimmed = padded_and_trimmed(module, garbage, mask, start)
  chex.assert_trees_all_close(padded[:, start:], trimmed, rtol=1e-5, atol=1e-5)
  packed, separate = packed_and_separate(module, x, split=6)
  chex.assert_trees_all_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gla", "delta_rule"])
def test_gradients_are_finite_and_reach_every_parameter(family):
  module = make(family, gated=True) if family == "delta_rule" else make(family)

  @nnx.jit
  def grads(module, x, mask):
    return nnx.grad(lambda m: jnp.sum(m(x, mask=mask) ** 2))(module)

  leaves = jax.tree.leaves(nnx.state(grads(module, util.normal((B, T, D)), util.padding_mask(B, T)), nnx.Param))
  chex.assert_tree_all_finite(leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_parameters_of_the_families_own_layers():
  gla = make("gla", gate_rank=5)
  sizes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(gla, nnx.Param))}
  assert sizes["q_conv.kernel"] == (4, N, H) and sizes["k_conv.kernel"] == sizes["v_conv.kernel"] == (4, K, H)
  assert sizes["forget_gate.down.kernel"] == (D, 5) and sizes["forget_gate.up.kernel"] == (5, K, H)
  assert sizes["output_gate.kernel"] == (D, N, H) and sizes["output_norm.scale"] == (H,)
  delta = make("delta_rule", gated=True, short_conv=0, output_norm=False)
  sizes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(delta, nnx.Param))}
  assert sizes["beta_proj.kernel"] == (D, K) and sizes["forget_gate.a_log"] == sizes["forget_gate.dt_bias"] == (K,)
  assert not any(name.startswith(("q_conv", "output_norm")) for name in sizes)


def test_options_are_checked_at_construction():
  with pytest.raises(ValueError, match="gla is a recurrence.*is_causal=False"):
    make("gla", is_causal=False)
  with pytest.raises(ValueError, match="unknown gate='head'; valid: 'feature', 'step'"):
    make("gla", gate="head")
  with pytest.raises(ValueError, match="gate_rank must be a positive int, got gate_rank=0"):
    make("gla", gate_rank=0)
  with pytest.raises(ValueError, match="short_conv must be an int >= 0.*short_conv=-1"):
    make("delta_rule", short_conv=-1)
  with pytest.raises(TypeError, match="output_gate must be a bool"):
    make("delta_rule", output_gate=1)
  with pytest.raises(TypeError, match="gated must be a bool"):
    make("delta_rule", gated="yes")
  with pytest.raises(ValueError, match="delta_rule has no implementation='cudnn'"):
    make("delta_rule", implementation="cudnn")
  with pytest.raises(TypeError, match=r"takes no option\(s\) \['gated'\]"):
    ea.MultiHeadAttention(N, D, attention="gla", gated=True, rngs=nnx.Rngs(0))


def config(attention, **kwargs):
  options = dict(attention=attention, num_layers=1, width=16, num_heads=2, mlp_ratio=2.0, max_len=23, window=4,
                 block_size=4, chunk_size=4)
  return lm.LMConfig(**{**options, **kwargs})


@pytest.mark.parametrize("field,value,error,match", [
    ("gate", "head", ValueError, "unknown gate='head'"),
    ("gate_rank", 0, ValueError, "gate_rank must be an int >= 1"),
    ("short_conv", -2, ValueError, "short_conv must be an int >= 0"),
    ("short_conv", 2.0, ValueError, "short_conv must be an int >= 0"),
    ("gated", 1, TypeError, "gated must be a bool"),
    ("output_norm", None, TypeError, "output_norm must be a bool"),
    ("output_gate", "no", TypeError, "output_gate must be a bool"),
])
def test_lm_config_checks_the_new_fields_whichever_family(field, value, error, match):
  with pytest.raises(error, match=match):
    config("softmax", **{field: value})


def test_lm_config_options_and_causality():
  cfg = config(("gla", "delta_rule"), num_layers=2, gate="step", gated=True, short_conv=2, output_gate=False)
  assert cfg.attention_options("gla") == dict(gate="step", gate_rank=16, short_conv=2, output_norm=True,
                                              output_gate=False, implementation=None)
  assert cfg.attention_options("delta_rule")["gated"] and cfg.attention_options("delta_rule")["chunk_size"] == 4
  assert not cfg.uses_rope and "rope_base" not in cfg.attention_options("gla")
  with pytest.raises(ValueError, match="delta_rule, gla attention is a recurrence.*is_causal=True"):
    config(("gla", "delta_rule"), num_layers=2, is_causal=False)


def test_hybrid_lm_generates_what_its_parallel_forward_predicts():
  """Greedy tokens from the caches (GLA, delta rule and local layers) are the argmax of the full forward."""
  cfg = config(("gla", "delta_rule", "local"), num_layers=3, gated=True)
  model = lm.LanguageModel(cfg, rngs=nnx.Rngs(util.fresh_key()))
  prompt = jax.random.randint(util.fresh_key(), (B, 5), 0, 256)
  out = lm.generate(model, prompt, max_new_tokens=6, temperature=0.0)
  chex.assert_shape(out, (B, 11))
  chex.assert_trees_all_equal(out[:, :5], prompt.astype(jnp.int32))
  logits = nnx.jit(lambda m, t: m(t))(model, out[:, :-1])
  chex.assert_trees_all_equal(jnp.argmax(logits[:, 4:], axis=-1).astype(jnp.int32), out[:, 5:])


def test_flops_entries():
  t = 13
  for family in ("gla", "delta_rule"):
    cfg = config(family)
    assert lm._attention_flops_per_token(cfg, family, t) > 0
    assert lm.training_flops_per_token(cfg, t) > 0
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
    no_gate = lm.training_flops_per_token(dataclasses.replace(cfg, output_gate=False), t)
    assert lm.training_flops_per_token(cfg, t) - no_gate == pytest.approx(3 * 2 * d * n * h)
    no_conv = lm.training_flops_per_token(dataclasses.replace(cfg, short_conv=0), t)
    assert lm.training_flops_per_token(cfg, t) - no_conv == pytest.approx(3 * 2 * 4 * 3 * n * h)
  gated, plain = config("delta_rule", gated=True), config("delta_rule")
  h, n = plain.head_dim, plain.num_heads
  assert (lm.training_flops_per_token(gated, t) - lm.training_flops_per_token(plain, t)
          == pytest.approx(3 * (h * h * n + 2 * plain.width * n)))
