"""The small LM: it trains with every family, decodes like its parallel forward, generates,
and has the parameters its config says."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import efficient_attention as ea
from efficient_attention import lm
from tests import util

B, T, WIDTH, HEADS, MAX_LEN = 2, 13, 16, 2, 23


def sparse_layout(seq_len):
  return (ea.layouts.local(seq_len, window=4, block_size=4)
          | ea.layouts.global_tokens(seq_len, num_global=2, block_size=4))


def config(name, **kwargs):
  """One layer of width 16 (2 heads of 8), bytes; Linformer bidirectional, as it must be."""
  options = dict(attention=name, num_layers=1, width=WIDTH, num_heads=HEADS, mlp_ratio=2.0, max_len=MAX_LEN,
                 num_features=8, projected_len=5, window=5, block_size=4, is_causal=name != "linformer",
                 layout=sparse_layout if name == "block_sparse" else None, num_buckets=4,
                 chunk_size=4 if name == "lsh" else 64)
  return lm.LMConfig(**{**options, **kwargs})


def tokens(b, t):
  """Fresh random bytes `[B, T]`."""
  return jax.random.randint(util.fresh_key(), (b, t), 0, 256)


@nnx.jit
def forward(model, tokens):
  return model(tokens)


@functools.partial(nnx.jit, static_argnames="prefill")
def parallel_and_decoded(model, seq, prefill):
  """Logits of `seq`, and of `seq` decoded from the (initialised) cache: `prefill` tokens, then one at a time."""
  parallel = model(seq)
  decoded = [model(seq[:, :prefill], decode=True)]
  decoded += [model(seq[:, t:t + 1], decode=True) for t in range(prefill, seq.shape[1])]
  return parallel, jnp.concatenate(decoded, axis=1)


@functools.partial(nnx.jit, static_argnames="split")
def packed_and_separate(model, seq, split):
  """Logits of two sequences packed in one row with segment ids, and of each on its own."""
  ids = (jnp.arange(seq.shape[1]) >= split).astype(jnp.int32)[None]
  separate = jnp.concatenate([model(seq[:, :split]), model(seq[:, split:])], axis=1)
  return model(seq, segment_ids=ids), separate


@nnx.jit
def twice(model, seq):
  return model(seq), model(seq)


@nnx.jit
def train_step(model, optimizer, batch):
  def loss_fn(model):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize("name", ea.ATTENTION_FAMILIES)
def test_loss_decreases_with_adamw_under_nnx_jit(name):
  model = lm.LanguageModel(config(name, redraw_interval=2), rngs=nnx.Rngs(util.fresh_key()))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  batch = tokens(B, T + 1)
  losses = [float(train_step(model, optimizer, batch)) for _ in range(4)]
  assert all(np.isfinite(losses)), losses
  # FAVOR+ redraws its features every 2 steps, which may cost a little on the next step.
  assert losses[1] < losses[0] and losses[-1] < losses[0] - 0.5, losses
  if name in ("favor", "lsh"):
    # Redrawn after the 2nd and 4th training calls, inside the jitted gradient step.
    attention = model.blocks[0].attention.attention
    assert int(attention.training_calls[...]) == 4


def test_decode_equals_parallel_forward():
  """With learned positions; generate checks a RoPE model, test_modules.py each family's cache."""
  model = lm.LanguageModel(config("favor"), rngs=nnx.Rngs(util.fresh_key()))
  model.init_cache((B, T))
  parallel, decoded = parallel_and_decoded(model, tokens(B, T), prefill=10)
  chex.assert_shape(parallel, (B, T, 256))
  chex.assert_trees_all_close(decoded, parallel, rtol=1e-4, atol=1e-4)


def test_generate_greedy_and_top_k_sampling():
  model = lm.LanguageModel(config("softmax"), rngs=nnx.Rngs(util.fresh_key()))
  prompt = tokens(B, 4)
  greedy = lm.generate(model, prompt, max_new_tokens=7, temperature=0.0)
  chex.assert_shape(greedy, (B, 11))
  np.testing.assert_array_equal(greedy[:, :4], prompt)
  # Teacher-forced logits of the generated sequence pick the same tokens.
  logits = forward(model, greedy[:, :-1])
  np.testing.assert_array_equal(jnp.argmax(logits[:, 3:], axis=-1), greedy[:, 4:])
  key = util.fresh_key()
  sampled = lm.generate(model, prompt, max_new_tokens=7, temperature=1.0, top_k=3, key=key)
  np.testing.assert_array_equal(sampled, lm.generate(model, prompt, max_new_tokens=7, temperature=1.0, top_k=3,
                                                     key=key))
  top3 = jax.lax.top_k(forward(model, sampled[:, :-1])[:, 3:], 3)[1]
  assert bool(jnp.all(jnp.any(top3 == sampled[:, 4:, None], axis=-1)))
  assert model.cache_index is None  # generate decodes on a view; the model keeps no cache


@pytest.mark.parametrize("name,norm", [("softmax", "rms"), ("linear", "layer"), ("linformer", "rms")])
def test_parameter_shapes_and_count(name, norm):
  cfg = config(name, norm=norm, num_layers=2, num_kv_heads=1)
  model = lm.LanguageModel(cfg, rngs=nnx.Rngs(util.fresh_key()))
  w, f, h, v = WIDTH, cfg.mlp_width, cfg.head_dim, cfg.vocab_size
  assert (f, h) == (32, 8)
  chex.assert_shape(model.embed.embedding[...], (v, w))
  block = model.blocks[1]
  chex.assert_shape((block.mlp.up.kernel[...], block.mlp.down.kernel[...].T), (w, f))
  attention = block.attention.attention
  chex.assert_shape(attention.query.kernel[...], (w, HEADS, h))
  chex.assert_shape(attention.key.kernel[...], (w, 1, h))
  norm_size = w if norm == "rms" else 2 * w
  per_layer = w * HEADS * h + 2 * w * 1 * h + HEADS * h * w + 2 * w * f + 2 * norm_size
  if name == "linformer":
    per_layer += 2 * 5 * MAX_LEN
  want = v * w + cfg.num_layers * per_layer + norm_size
  if not cfg.uses_rope:
    chex.assert_shape(model.position.embedding[...], (MAX_LEN, w))
    want += MAX_LEN * w
  assert (model.position is None) == (name == "softmax")
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == want


def test_split_merge_round_trip_and_param_filter():
  model = lm.LanguageModel(config("favor"), rngs=nnx.Rngs(util.fresh_key()))
  seq = tokens(B, 10)
  want = forward(model, seq)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not any("features" in path for path, _ in nnx.to_flat_state(params))
  assert any("features" in path for path, _ in nnx.to_flat_state(rest))
  chex.assert_trees_all_close(forward(nnx.merge(graphdef, params, rest), seq), want)


def test_packed_sequences_equal_separate_runs():
  """Learned positions restart with each run of segment ids."""
  model = lm.LanguageModel(config("linear"), rngs=nnx.Rngs(util.fresh_key()))
  packed, separate = packed_and_separate(model, tokens(1, T), split=5)
  chex.assert_trees_all_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dropout_only_in_training():
  model = lm.LanguageModel(config("softmax", dropout=0.5), rngs=nnx.Rngs(util.fresh_key()))
  seq = tokens(B, T)
  first, second = twice(model, seq)
  assert not np.allclose(first, second)
  model.eval()
  first, second = twice(model, seq)
  np.testing.assert_array_equal(first, second)


def test_bad_config_and_input_raise_clearly():
  with pytest.raises(ValueError, match="unknown attention='flash'; valid: 'softmax', 'favor', 'linear'"):
    config("flash")
  with pytest.raises(ValueError, match="linformer.*no causal form.*is_causal=False"):
    config("linformer", is_causal=True)
  with pytest.raises(ValueError, match="layout"):
    config("block_sparse", layout=None)
  with pytest.raises(ValueError, match="width must be a multiple of num_heads, got width=16, num_heads=3"):
    config("softmax", num_heads=3)
  model = lm.LanguageModel(config("softmax"), rngs=nnx.Rngs(util.fresh_key()))
  with pytest.raises(ValueError, match="tokens must be an int array"):
    model(jnp.ones((B, T)))
  with pytest.raises(ValueError, match=f"exceeds max_len={MAX_LEN}"):
    model(tokens(B, MAX_LEN + 1))
  model.init_cache((B, 4))
  model.cache_index[...] = jnp.array(3, jnp.int32)  # as after decoding 3 tokens
  with pytest.raises(ValueError, match="cache_index=3 overflows the cache of 4 positions"):
    model(tokens(B, 2), decode=True)


def test_generate_errors():
  model = lm.LanguageModel(config("softmax"), rngs=nnx.Rngs(util.fresh_key()))
  prompt = tokens(B, 4)
  with pytest.raises(ValueError, match=f"= 24 exceeds max_len={MAX_LEN}"):
    lm.generate(model, prompt, max_new_tokens=20, temperature=0.0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    lm.generate(model, prompt, max_new_tokens=3)
  with pytest.raises(ValueError, match="top_k"):
    lm.generate(model, prompt, max_new_tokens=3, top_k=0, key=util.fresh_key())
  linformer = lm.LanguageModel(config("linformer"), rngs=nnx.Rngs(util.fresh_key()))
  with pytest.raises(ValueError, match="needs a causal model, got attention='linformer'"):
    lm.generate(linformer, prompt, max_new_tokens=3, temperature=0.0)
  lsh = lm.LanguageModel(config("lsh"), rngs=nnx.Rngs(util.fresh_key()))
  with pytest.raises(ValueError, match="lsh: cannot decode"):
    lm.generate(lsh, prompt, max_new_tokens=3, temperature=0.0)


# Hybrid stacks: `attention` a pattern of families cycled over the layers.

def test_hybrid_pattern_cycles_over_layers_and_decodes_like_its_parallel_forward():
  assert config(("linear", "local"), num_layers=5).layer_families == ("linear", "local", "linear", "local", "linear")
  cfg = config(("linear", "local"), num_layers=2)
  assert not cfg.uses_rope  # linear layers need learned positions; local layers keep RoPE
  model = lm.LanguageModel(cfg, rngs=nnx.Rngs(util.fresh_key()))
  kinds = [type(block.attention.attention).__name__ for block in model.blocks]
  assert kinds == ["LinearAttention", "LocalAttention"], kinds
  assert model.blocks[1].attention.attention.rope_base == cfg.rope_base
  assert model.position is not None
  model.init_cache((B, T))
  parallel, decoded = parallel_and_decoded(model, tokens(B, T), prefill=6)
  chex.assert_trees_all_close(decoded, parallel, rtol=1e-4, atol=1e-4)


def test_hybrid_trains_and_its_flops_are_the_sum_of_its_layers():
  cfg = config(["softmax", "favor"], num_layers=2, redraw_interval=2)
  assert cfg.attention == ("softmax", "favor")  # a list is kept as a tuple (the config is hashable)
  model = lm.LanguageModel(cfg, rngs=nnx.Rngs(util.fresh_key()))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  batch = tokens(B, T + 1)
  losses = [float(train_step(model, optimizer, batch)) for _ in range(4)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
  one = {name: lm.training_flops_per_token(config(name, num_layers=1), T) for name in ("softmax", "favor")}
  output_layer = 3 * 2 * WIDTH * 256
  # Two layers: each single-layer model's layer, and the output layer once.
  assert lm.training_flops_per_token(cfg, T) == pytest.approx(one["softmax"] + one["favor"] - output_layer)


def test_hybrid_pattern_errors_name_the_values():
  with pytest.raises(ValueError, match="unknown attention family 'lsm'"):
    config(("linear", "lsm"), num_layers=2)
  with pytest.raises(ValueError, match=r"attention=\(\)"):
    config((), num_layers=2)
  with pytest.raises(ValueError, match="3 families for num_layers=2"):
    config(("linear", "local", "softmax"), num_layers=2)
  with pytest.raises(ValueError, match="linformer"):
    config(("linear", "linformer"), num_layers=2, is_causal=True)
  with pytest.raises(ValueError, match="layout"):
    config(("linear", "block_sparse"), num_layers=2)
  with pytest.raises(ValueError, match="is a pattern"):
    config(("linear", "local"), num_layers=2).attention_options()
