"""LSH attention (Reformer) vs its dense float64 reference, vs exact shared-QK attention, and its module."""

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

B, T, N, K, H, HV = 2, 13, 6, 3, 5, 4
BUCKETS = 4


def inputs(t=T, dtype=jnp.float32):
  """Fresh qk `[B, T, N, H]` and v `[B, T, K, Hv]` (values shared by groups of 2 heads)."""
  return util.normal((B, t, N, H), dtype), util.normal((B, t, K, HV), dtype)


def rotations(num_hashes, num_buckets=BUCKETS, h=H):
  return ea.lsh_rotations(util.fresh_key(), h, num_buckets=num_buckets, num_hashes=num_hashes)


def exact_shared_qk(qk, v, *, is_causal=False, mask=None, segment_ids=None):
  """Exact attention of queries qk to keys qk / |qk| (self excluded unless nothing else is live), via the softmax family."""
  t = qk.shape[1]
  keys = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
  vals = jnp.repeat(v, N // v.shape[2], axis=2)
  live = ~jnp.eye(t, dtype=bool)[None, None]
  if is_causal:
    live &= jnp.tril(jnp.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    live &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  self_live = jnp.ones((1, 1, t), bool)
  if mask is not None:
    live &= mask
    self_live = jnp.diagonal(jnp.broadcast_to(mask, mask.shape[:2] + (t, t)), axis1=-2, axis2=-1)
  out = ea.softmax_attention(qk, keys, vals, mask=live, implementation="xla")
  # [B, T, N, 1]
  other = jnp.swapaxes(jnp.any(live, axis=-1), 1, 2)[..., None]
  own = jnp.where(jnp.swapaxes(self_live, 1, 2)[..., None], vals, 0.0)
  return jnp.where(other, out, own)


def case_options(case, t):
  if case == "masks":
    # A per-head key-padding mask, a per-query mask and packed segments.
    return dict(mask=util.padding_mask(B, t) & util.bernoulli(0.85, (B, N, t, t)),
                segment_ids=util.packed_segment_ids(B, t))
  if case == "causal_segments":
    return dict(is_causal=True, segment_ids=util.packed_segment_ids(B, t))
  return dict(is_causal=case == "causal")


# (case, T, chunk_size, rounds): T=13 is no multiple of 3, 4 or 5, so the sorted order is padded.
CASES = [
    pytest.param("plain", T, 4, 1, id="one_round-T13-c4", marks=pytest.mark.slow),
    pytest.param("plain", T, 4, 3, id="three_rounds-T13-c4", marks=pytest.mark.slow),  # causal-T13-c3: 3 rounds too
    pytest.param("causal", T, 3, 3, id="causal-T13-c3"),
    pytest.param("causal_segments", 11, 2, 2, id="causal_segments-T11-c2"),
    pytest.param("masks", T, 3, 2, id="masks_segments-T13-c3"),
    pytest.param("plain", 17, 5, 2, id="odd_t-T17-c5"),
]


@pytest.mark.parametrize("case,t,chunk,rounds", CASES)
def test_value_and_grad_vs_f64(case, t, chunk, rounds):
  qk, v = inputs(t)
  rot = rotations(rounds)
  opts = case_options(case, t)
  fn = lambda qk, v: ea.lsh_attention(qk, v, rot, chunk_size=chunk, **opts)
  ref = lambda qk, v: ea.lsh_attention_reference(qk, v, rot, chunk_size=chunk, **opts)
  out, _ = util.check_against_f64(fn, ref, (qk, v), argnums=(0, 1), **util.TOL[jnp.float32])
  chex.assert_shape(out, (B, t, N, HV))
  # The chunks hide keys: the result is visibly not exact attention.
  assert util.relative_error(out, exact_shared_qk(qk, v, **opts)) > 1e-2


def test_bf16_within_bf16_tolerance_and_keeps_dtype():
  qk, v = inputs(dtype=jnp.bfloat16)
  rot = rotations(2)
  opts = case_options("masks", T)
  fn = lambda qk, v: ea.lsh_attention(qk, v, rot, chunk_size=3, is_causal=True, **opts)
  ref = lambda qk, v: ea.lsh_attention_reference(qk, v, rot, chunk_size=3, is_causal=True, **opts)
  out, _ = util.check_against_f64(fn, ref, (qk, v), argnums=(0, 1), **util.TOL[jnp.bfloat16])
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("chunk", [7, 13, 40])
def test_every_key_in_every_round_is_exact_shared_qk_attention(chunk):
  # 7 gives two chunks (each window holds both), 13 and 40 one chunk: every round sees every key.
  qk, v = inputs()
  rot = rotations(3)
  for opts in (dict(), case_options("masks", T), case_options("causal_segments", T)):
    got = ea.lsh_attention(qk, v, rot, chunk_size=chunk, **opts)
    chex.assert_trees_all_close(got, exact_shared_qk(qk, v, **opts), rtol=1e-5, atol=1e-5)


def test_buckets_are_the_argmax_of_the_signed_rotations():
  qk, _ = inputs()
  rot = rotations(3, num_buckets=6)
  buckets = np.asarray(ea.lsh_buckets(qk, rot))
  chex.assert_shape(buckets, (B, T, N, 3))
  proj = np.einsum("btnh,rhk->btnrk", np.asarray(qk, np.float64), np.asarray(rot, np.float64))
  np.testing.assert_array_equal(buckets, np.argmax(np.concatenate([proj, -proj], axis=-1), axis=-1))
  assert set(np.unique(buckets)) == set(range(6))
  # Angular LSH: a positive rescaling keeps every bucket.
  np.testing.assert_array_equal(ea.lsh_buckets(qk * 2.0**20, rot), buckets)


def test_causal_earlier_outputs_ignore_later_tokens_that_keep_their_buckets():
  """Masking is by position; later tokens reach earlier outputs only through their buckets (see `_lsh.py`)."""
  qk, v = inputs()
  rot = rotations(3)
  split = 6
  fn = lambda qk, v, chunk: ea.lsh_attention(qk, v, rot, chunk_size=chunk, is_causal=True)
  # Later values anything, later qk rescaled by a power of two (exactly the same buckets and unit keys).
  factor = jnp.where(jnp.arange(T) >= split, 4.0, 1.0)[None, :, None, None]
  v_later = v.at[:, split:].set(util.normal((B, T - split, K, HV)))
  for chunk in (2, 3):
    want = fn(qk, v, chunk)
    np.testing.assert_array_equal(fn(qk * factor, v_later, chunk)[:, :split], want[:, :split])
    # No gradient from earlier outputs reaches later tokens.
    dqk, dv = jax.grad(lambda qk, v: fn(qk, v, chunk)[:, :split].sum(), argnums=(0, 1))(qk, v)
    np.testing.assert_array_equal(dqk[:, split:], 0.0)
    np.testing.assert_array_equal(dv[:, split:], 0.0)
    assert float(jnp.abs(dqk[:, :split]).sum()) > 0
  # With one chunk the sort hides nothing: any change to later tokens leaves earlier outputs as they are.
  qk_later = qk.at[:, split:].set(util.normal((B, T - split, N, H)))
  chex.assert_trees_all_close(fn(qk_later, v_later, T)[:, :split], fn(qk, v, T)[:, :split], rtol=1e-6, atol=1e-6)


def test_self_only_when_nothing_else_is_live():
  qk, v = inputs()
  rot = rotations(2)
  # Token 5 is a segment of its own; causally, token 0 sees only itself.
  ids = jnp.asarray([[0] * 5 + [1] + [2] * 7] * B, jnp.int32)
  for causal, rows in ((False, [5]), (True, [0, 5, 6])):
    fn = lambda qk, v: ea.lsh_attention(qk, v, rot, chunk_size=3, segment_ids=ids, is_causal=causal)
    out = fn(qk, v)
    vals = jnp.repeat(v, N // K, axis=2)
    for t in rows:
      np.testing.assert_array_equal(out[:, t], vals[:, t])
    dqk = jax.grad(lambda qk: (fn(qk, v) ** 2).sum())(qk)
    np.testing.assert_array_equal(dqk[:, 5], 0.0)  # a lone token's output does not depend on qk
  # Self masked out, others live: attends to the others; self and nothing else: its value.
  eye = jnp.eye(T, dtype=bool)[None, None]
  out = ea.lsh_attention(qk, v, rot, chunk_size=T, mask=~eye)
  chex.assert_trees_all_close(out, ea.lsh_attention(qk, v, rot, chunk_size=T), rtol=1e-6, atol=1e-6)
  out = ea.lsh_attention(qk, v, rot, chunk_size=3, mask=eye)
  chex.assert_trees_all_close(out, jnp.repeat(v, N // K, axis=2))


def test_fully_masked_rows_give_zero_and_zero_grad():
  qk, v = inputs()
  rot = rotations(2)
  # Batch 1: every key masked. Batch 0: token 3 of head 2 masked entirely as a query (itself included) and, since
  # its qk is also a key, as a key: its dqk is then 0.
  mask = jnp.ones((B, N, T, T), bool).at[1].set(False).at[0, 2, 3].set(False).at[0, 2, :, 3].set(False)
  fn = lambda qk, _, v: ea.lsh_attention(qk, v, rot, chunk_size=3, mask=mask)
  out, (dqk, _, _) = util.check_dead_rows(fn, qk, qk, v, dead=[1, (0, 3, 2)], padded_batch=1)
  assert float(jnp.abs(out[0, 4]).sum()) > 0 and float(jnp.abs(dqk[0]).sum()) > 0


def test_garbage_in_masked_positions_does_not_leak():
  qk, v = inputs()
  rot = rotations(3)
  live = util.padding_mask(B, T)[:, 0, 0]  # [B, T]
  mask = (live[:, None, :, None] & live[:, None, None, :])  # padded tokens neither attend nor are attended to
  # Padded tokens: huge qk in the same buckets (2**90 scales exactly), NaN / inf values.
  pad = ~live[:, :, None, None]
  bad_qk = jnp.where(pad, qk * 2.0**90, qk)
  bad_v = jnp.where(pad, jnp.where(jnp.arange(HV) % 2 == 0, jnp.nan, jnp.inf)[None, None, None], v)
  fn = lambda qk, v: ea.lsh_attention(qk, v, rot, chunk_size=3, is_causal=True, mask=mask)
  loss = lambda qk, v: jnp.sum(fn(qk, v) ** 2)
  out, grads = fn(bad_qk, bad_v), jax.grad(loss, argnums=(0, 1))(bad_qk, bad_v)
  chex.assert_tree_all_finite((out, grads))
  want, want_grads = fn(qk, v), jax.grad(loss, argnums=(0, 1))(qk, v)
  chex.assert_trees_all_close((out, grads), (want, want_grads), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(jnp.where(pad, out, 0.0), 0.0)


def test_memory_is_not_quadratic():
  # A [T, T] logits array would hold T**2 = 16.8M values; the chunked form's largest is R * T * 2c.
  t, h, chunk, rounds = 4096, 32, 64, 2
  qk = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
  rot = jax.ShapeDtypeStruct((rounds, h, 32), jnp.float32)
  fn = lambda qk, v, rot: ea.lsh_attention(qk, v, rot, chunk_size=chunk, is_causal=True)
  grad = jax.grad(lambda qk, v, rot: jnp.sum(fn(qk, v, rot)), argnums=(0, 1))
  for f in (fn, grad):
    assert util.largest_value(f, qk, qk, rot) <= rounds * t * 2 * chunk


def test_vmap_jit_grad():
  qk, v = (jnp.stack([x, 2 * x]) for x in inputs())
  rot = rotations(2)
  fn = lambda qk, v: ea.lsh_attention(qk, v, rot, chunk_size=3, is_causal=True)
  batched = jax.jit(jax.vmap(fn))(qk, v)
  chex.assert_trees_all_close(batched, jnp.stack([fn(qk[i], v[i]) for i in range(2)]), rtol=1e-6, atol=1e-6)


def test_errors_name_the_values():
  qk, v = inputs()
  rot = rotations(2)
  key = util.fresh_key()
  with pytest.raises(ValueError, match="num_buckets must be an even int >= 2.*num_buckets=3"):
    ea.lsh_rotations(key, H, num_buckets=3, num_hashes=2)
  with pytest.raises(ValueError, match="num_buckets=0"):
    ea.lsh_rotations(key, H, num_buckets=0, num_hashes=2)
  with pytest.raises(ValueError, match="num_hashes must be a positive int, got num_hashes=0"):
    ea.lsh_rotations(key, H, num_buckets=4, num_hashes=0)
  with pytest.raises(ValueError, match=r"H = 5 \(the qk head dim\).*rotations.shape=\(2, 4, 2\)"):
    ea.lsh_attention(qk, v, rotations(2, h=4), chunk_size=3)
  with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got chunk_size=0"):
    ea.lsh_attention(qk, v, rot, chunk_size=0)
  with pytest.raises(ValueError, match=r"qk and v must agree on \[B, T\].*qk.shape=\(2, 13, 6, 5\) and "
                                       r"v.shape=\(2, 12, 3, 4\)"):
    ea.lsh_attention(qk, v[:, :12], rot, chunk_size=3)
  with pytest.raises(ValueError, match=r"qk.shape=\(2, 13, 6, 5\) and v.shape=\(1, 13, 3, 4\)"):
    ea.lsh_attention(qk, v[:1], rot, chunk_size=3)
  with pytest.raises(ValueError, match=r"multiple of v heads: qk.shape\[2\]=6 % v.shape\[2\]=4"):
    ea.lsh_attention(qk, util.normal((B, T, 4, HV)), rot, chunk_size=3)
  with pytest.raises(ValueError, match="lsh_attention has no implementation='pallas'; it supports: None, 'xla'"):
    ea.lsh_attention(qk, v, rot, chunk_size=3, implementation="pallas")
  with pytest.raises(ValueError, match="cannot honour bias"):
    ea.lsh_attention(qk, v, rot, chunk_size=3, bias=jnp.ones((1, 1, T, T)))
  ids = jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match="one segment_ids array.*tuple of 2"):
    ea.lsh_attention(qk, v, rot, chunk_size=3, segment_ids=(ids, ids))
  with pytest.raises(ValueError, match=r"mask.shape=\(2, 1, 1, 12\) does not broadcast"):
    ea.lsh_attention(qk, v, rot, chunk_size=3, mask=jnp.ones((B, 1, 1, 12), bool))
  with pytest.raises(TypeError, match="share a dtype"):
    ea.lsh_attention(qk, v.astype(jnp.bfloat16), rot, chunk_size=3)
  with pytest.raises(TypeError, match="floating"):
    ea.lsh_attention(qk.astype(jnp.int32), v.astype(jnp.int32), rot, chunk_size=3)
  with pytest.raises(ValueError, match="positive.*scale=-1.0"):
    ea.lsh_attention(qk, v, rot, chunk_size=3, scale=-1.0)


# The module and the LM.


def module(**kwargs):
  options = dict(qkv_features=N * H, num_kv_heads=K, num_buckets=BUCKETS, num_hashes=2, chunk_size=3, is_causal=True,
                 rngs=nnx.Rngs(util.fresh_key()))
  return ea.LSHAttention(N, 11, **{**options, **kwargs})


def test_module_trains_under_nnx_jit_and_grad():
  attn = module(use_bias=True)
  chex.assert_shape(attn.rotations[...], (2, H, BUCKETS // 2))
  assert (attn.num_buckets, attn.num_hashes) == (BUCKETS, 2)
  x = util.normal((B, T, 11))

  @nnx.jit
  def loss_and_grads(attn, x):
    return nnx.value_and_grad(lambda attn: jnp.sum(attn(x) ** 2))(attn)

  loss, grads = loss_and_grads(attn, x)
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
  assert paths == {f"{p}.{w}" for p in ("query", "value", "out") for w in ("kernel", "bias")}
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  assert np.isfinite(float(loss))


def test_lm_generate_raises_naming_the_family():
  model = lm.LanguageModel(lm.LMConfig(attention="lsh", num_layers=1, width=16, num_heads=2, max_len=24,
                                       chunk_size=4), rngs=nnx.Rngs(util.fresh_key()))
  assert model.config.lsh_num_buckets == 12 and not model.config.uses_rope
  with pytest.raises(ValueError, match="lsh: cannot decode"):
    lm.generate(model, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, temperature=0.0)
  with pytest.raises(ValueError, match="num_buckets must be None or an even int >= 2, got num_buckets=5"):
    lm.LMConfig(attention="lsh", num_buckets=5)


def test_lm_trains_with_a_redraw_in_the_step():
  config = lm.LMConfig(attention="lsh", num_layers=1, width=16, num_heads=2, max_len=24, chunk_size=4,
                       num_hashes=2, redraw_interval=1)
  model = lm.LanguageModel(config, rngs=nnx.Rngs(util.fresh_key()))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  batch = jax.random.randint(util.fresh_key(), (B, 21), 0, 256)
  attn = model.blocks[0].attention.attention
  before = attn.rotations[...]

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, batch)) for _ in range(2)]
  assert np.isfinite(losses).all() and losses[1] < losses[0]
  assert not np.array_equal(before, attn.rotations[...]) and int(attn.training_calls[...]) == 2


def test_training_flops_count_the_windows_and_the_hashing():
  config = lm.LMConfig(attention="lsh", num_layers=1, width=16, num_heads=2, max_len=64, chunk_size=8, num_hashes=3)
  linear = lm.LMConfig(attention="linear", num_layers=1, width=16, num_heads=2, max_len=64)
  h, n, buckets = 8, 2, 16  # 2 * 64 / 8 buckets
  attention = 3 * 3 * n * (buckets * h + 4 * h * 16)  # forward + backward, rounds, heads: hash and 2c = 16 keys
  linear_attention = 3 * 2 * h * (h + 1) * (n + n)  # read and update, M = H features
  key_projection = 3 * 2 * 16 * n * h
  assert lm.training_flops_per_token(config, 64) == pytest.approx(
      lm.training_flops_per_token(linear, 64) - linear_attention - key_projection + attention)
  # One chunk (chunk_size >= T): every query's window is the T keys.
  short = lm.training_flops_per_token(config, 8) - lm.training_flops_per_token(config, 64)
  assert short == pytest.approx(3 * 3 * n * 4 * h * (8 - 16))
