"""delta_rule_attention (chunked WY form) and delta_rule_step vs the recurrence run in float64."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import efficient_attention as ea
from tests import util

B, T, N, KH, H, HV = 2, 13, 6, 2, 5, 3
EPS = 1e-6  # qk_norm's epsilon, as documented


@functools.partial(jax.jit, static_argnames=("scale", "qk_norm"))
def delta_rule_f64(q, k, v, beta, gates=None, *, scale=None, qk_norm=True, mask=None, segment_ids=None):
  """The recurrence step by step, straight from the equation; returns (out, final states).

  Run it on float64 inputs under `jax.enable_x64` (tests.util.in_f64 / check_against_f64).

  `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale q_t S_t`,
  one state per query head (each a copy of its key/value head's when masks agree);
  S restarts from 0 where the segment id changes; a masked step keeps S.
  """
  b, t, n, h = q.shape
  g = n // k.shape[2]
  scale = h**-0.5 if scale is None else scale
  gates = jnp.zeros_like(beta) if gates is None else gates
  if qk_norm:
    q, k = (x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + EPS) for x in (q, k))
  k, v, beta, gates = (jnp.repeat(x, g, axis=2) for x in (k, v, beta, gates))
  live = jnp.ones((b, t, n), bool) if mask is None else jnp.broadcast_to(mask[:, :, 0, :], (b, n, t)).transpose(0, 2, 1)
  ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  eye = jnp.eye(h, dtype=q.dtype)[None, None]

  def step(s, x):
    q_t, k_t, v_t, b_t, g_t, live_t, start_t = x
    s = jnp.where(start_t[:, None, None, None], 0.0, s)
    b_t = jnp.where(live_t, b_t, 0.0)[..., None, None]
    g_t = jnp.where(live_t, g_t, 0.0)[..., None, None]
    outer = k_t[..., :, None] * k_t[..., None, :]  # [B, N, H, H]
    s = jnp.exp(g_t) * jnp.einsum("bnij,bnjv->bniv", eye - b_t * outer, s) + b_t * k_t[..., :, None] * v_t[..., None, :]
    return s, scale * jnp.einsum("bnh,bnhv->bnv", q_t, s)

  time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, gates, live, starts))
  s, out = jax.lax.scan(step, jnp.zeros((b, n, h, v.shape[-1]), q.dtype), time_major)
  return jnp.moveaxis(out, 0, 1), s


def draw_beta(shape):
  return jax.nn.sigmoid(util.normal(shape))  # in (0, 1)


def draw_gates(shape, low=-3.0):
  """Log gates uniform in [low, 0)."""
  return jnp.asarray(np.random.default_rng(int(jax.random.randint(util.fresh_key(), (), 0, 2**30))).uniform(
      low, 0.0, shape), jnp.float32)


def inputs(b=B, t=T, n=N, kh=KH, h=H, hv=HV, dtype=jnp.float32, k_scale=1.0):
  q, k, v = util.qkv(b, t, t, n, kh, h, hv=hv, dtype=dtype)
  k = (k.astype(jnp.float32) * k_scale).astype(dtype)
  return q, k, v, draw_beta((b, t, kh)), draw_gates((b, t, kh))


# name: (gates: None / "mild" / "strong", qk_norm, chunk_size, mask kind, segments). Each case is
# one compilation; test_step_by_step_equals_chunked reuses the "gated_segments_padding" one.
CASES = {
    "plain_gqa_chunk4": (None, True, 4, None, False),
    "gated_no_qk_norm_chunk5": ("mild", False, 5, None, False),
    "gated_segments_padding_chunk4": ("mild", True, 4, "padding", True),
    "gated_per_head_mask_default_chunk": ("mild", True, None, "per_head", False),
    # Log gates down to -20 per step: decays over a chunk reach exp(-160), below float32's range.
    "strong_decay_chunk8": ("strong", True, 8, None, False),
}


def make_mask(kind):
  if kind == "padding":
    return util.padding_mask(B, T)  # [B, 1, 1, T]
  if kind == "per_head":
    return util.bernoulli(0.7, (B, N, 1, T))  # differs within GQA groups
  return None


class DeltaRuleTest(chex.TestCase):

  @parameterized.named_parameters(*((name, *case) for name, case in CASES.items()))
  def test_value_and_grad_vs_f64(self, gates, qk_norm, chunk_size, mask_kind, segments):
    # Without qk_norm, keys of norm ~1 keep I - beta k k^T from amplifying the state.
    q, k, v, beta, log_gates = inputs(k_scale=1.0 if qk_norm else 0.4)
    if gates == "strong":
      log_gates = draw_gates((B, T, KH), low=-20.0).at[:, ::2].set(-20.0)
    opts = dict(qk_norm=qk_norm, mask=make_mask(mask_kind),
                segment_ids=util.packed_segment_ids(B, T, 3) if segments else None)
    args = (q, k, v, beta) + ((log_gates,) if gates else ())

    def fn(q, k, v, beta, gates=None):
      return ea.delta_rule_attention(q, k, v, beta, gates=gates, chunk_size=chunk_size, **opts)

    ref = lambda *a: delta_rule_f64(*a, **opts)[0]
    out, grads = util.check_against_f64(fn, ref, args, argnums=tuple(range(len(args))), **util.TOL[jnp.float32])
    chex.assert_shape(out, (B, T, N, HV))
    assert all(float(jnp.abs(gr).sum()) > 0 for gr in grads)

  def test_chunk_sizes_and_odd_lengths(self):
    # One step per chunk, chunks that do not divide T, one chunk longer than T.
    q, k, v, beta, gates = inputs()
    ids = util.packed_segment_ids(B, T, 3)
    ref = util.in_f64(lambda *a: delta_rule_f64(*a, segment_ids=ids)[0], q, k, v, beta, gates)
    for chunk_size in (1, 6, 16):
      out = ea.delta_rule_attention(q, k, v, beta, gates=gates, segment_ids=ids, chunk_size=chunk_size)
      chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])

  def test_step_by_step_equals_chunked(self):
    q, k, v, beta, gates = inputs()
    mask = util.padding_mask(B, T)
    ids = util.packed_segment_ids(B, T, 3)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    live = mask[:, 0, 0, :]  # [B, T]

    def step(state, x):
      q_t, k_t, v_t, beta_t, gates_t, live_t, start_t = x
      state = ea.DeltaRuleState(s=jnp.where(start_t[:, None, None, None], 0.0, state.s))  # new segment
      return ea.delta_rule_step(state, q_t, k_t, v_t, beta_t, gates_t=gates_t, mask_t=live_t)

    state = ea.init_delta_rule_state(B, KH, H, HV)
    state, outs = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, gates, live, starts)))
    chunked = ea.delta_rule_attention(q, k, v, beta, gates=gates, mask=mask, segment_ids=ids, chunk_size=4)
    chex.assert_trees_all_close(jnp.moveaxis(outs, 0, 1), chunked, rtol=1e-5, atol=1e-5)
    # The final state is the recurrence's (query heads of a group hold copies of it).
    _, ref_state = util.in_f64(lambda *a: delta_rule_f64(*a, mask=mask, segment_ids=ids), q, k, v, beta, gates)
    chex.assert_trees_all_close(np.asarray(state.s, np.float64), ref_state[:, ::N // KH], rtol=1e-5, atol=1e-5)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v, beta, gates = inputs(dtype=jnp.bfloat16)
    ids = util.packed_segment_ids(B, T, 3)
    fn = lambda *a: ea.delta_rule_attention(*a[:4], gates=a[4], segment_ids=ids, chunk_size=4)
    ref = lambda *a: delta_rule_f64(*a, segment_ids=ids)[0]
    out, _ = util.check_against_f64(fn, ref, (q, k, v, beta, gates), argnums=(0, 1, 2), **util.TOL[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16

  def test_masked_garbage_never_leaks_and_empty_rows_are_zero(self):
    q, k, v, beta, gates = inputs()
    # Batch 1: every step masked. Batch 0: steps 0-2 and 6 masked, so rows 0-2 read an empty state.
    mask = jnp.ones((B, 1, 1, T), bool).at[1].set(False).at[0, :, :, :3].set(False).at[0, :, :, 6].set(False)
    dead = ~mask[:, 0, 0, :]  # [B, T]
    poison = lambda x, bad: jnp.where(dead.reshape(dead.shape + (1,) * (x.ndim - 2)), bad, x)
    dirty = (poison(k, jnp.nan), poison(v, jnp.inf), poison(beta, jnp.nan), poison(gates, 5.0))
    w = util.normal((B, T, N, HV))

    def loss(q, k, v, beta, gates):
      out = ea.delta_rule_attention(q, k, v, beta, gates=gates, mask=mask, chunk_size=4)
      return jnp.sum(out**2 + out * w), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (_, clean_out), clean_grads = grad(q, k, v, beta, gates)
    (_, out), grads = grad(q, *dirty)
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_close((out, grads), (clean_out, clean_grads), rtol=1e-6, atol=1e-6)
    ref = util.in_f64(lambda *a: delta_rule_f64(*a, mask=mask)[0], q, k, v, beta, gates)
    chex.assert_trees_all_close(np.asarray(out, np.float64), ref, **util.TOL[jnp.float32])
    # Masked steps are never read: no gradient reaches their k, v, beta, gates.
    for g in grads[1:]:
      np.testing.assert_array_equal(np.asarray(poison(g, 0.0)), np.asarray(g))
      assert float(jnp.abs(g).sum()) > 0
    # Rows that read an empty state are 0, with 0 gradient for their queries; live rows are not.
    for rows in ((1, slice(None)), (0, slice(0, 3))):
      np.testing.assert_array_equal(np.asarray(out[rows]), 0.0)
      np.testing.assert_array_equal(np.asarray(grads[0][rows]), 0.0)
    assert float(jnp.abs(out[0, 3:]).min()) > 0 and float(jnp.abs(grads[0][0, 3:]).sum()) > 0

  def test_jit_vmap_match_eager_loop(self):
    q, k, v, beta, gates = inputs()
    fn = lambda q, k, v, beta, gates: ea.delta_rule_attention(
        q[None], k[None], v[None], beta[None], gates=gates[None], chunk_size=4)[0]
    batched = jax.jit(jax.vmap(fn))(q, k, v, beta, gates)
    for i in range(B):
      chex.assert_trees_all_close(batched[i], fn(q[i], k[i], v[i], beta[i], gates[i]), rtol=1e-6, atol=1e-6)


class DeltaRuleErrorsTest(chex.TestCase):

  def test_errors_name_the_values(self):
    q, k, v, beta, gates = inputs()
    f = ea.delta_rule_attention
    with pytest.raises(ValueError, match="no implementation='cudnn'; it supports: None, 'xla', 'pallas'"):
      f(q, k, v, beta, implementation="cudnn")
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\].*1 values outside \(e.g. 1.5"):
      f(q, k, v, beta.at[0, 3, 1].set(1.5))
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\].*e.g. nan"):
      f(q, k, v, beta.at[0, 3, 1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"gates are log forget gates and must be finite and <= 0.*e.g. 0.25"):
      f(q, k, v, beta, gates=gates.at[1, 0, 0].set(0.25))
    with pytest.raises(ValueError, match=r"gates.*e.g. -inf"):
      f(q, k, v, beta, gates=gates.at[1, 0, 0].set(-jnp.inf))
    with pytest.raises(ValueError, match=r"beta.shape=\(2, 13, 6\) must be \[B, T, K\]=\(2, 13, 2\)"):
      f(q, k, v, jnp.full((B, T, N), 0.5))
    with pytest.raises(ValueError, match=r"gates.shape=\(2, 13\) must be \[B, T, K\]"):
      f(q, k, v, beta, gates=gates[..., 0])
    with pytest.raises(TypeError, match="beta must be floating point, got beta.dtype=int32"):
      f(q, k, v, beta.astype(jnp.int32))
    with pytest.raises(ValueError, match="differ in head dim"):
      f(q[..., :4], k, v, beta)
    with pytest.raises(ValueError, match="share a length T.*q.shape=\\(2, 13, 6, 5\\) and k.shape=\\(2, 7, 2, 5\\)"):
      f(q, k[:, :7], v[:, :7], beta[:, :7])
    with pytest.raises(ValueError, match="scale must be finite, got scale=inf"):
      f(q, k, v, beta, scale=float("inf"))
    with pytest.raises(ValueError, match="scale must be finite, got scale=nan"):
      f(q, k, v, beta, scale=float("nan"))
    with pytest.raises(ValueError, match="causal by nature; got is_causal=False"):
      f(q, k, v, beta, is_causal=False)
    with pytest.raises(TypeError, match="is_causal must be a bool, got 1"):
      f(q, k, v, beta, is_causal=1)
    with pytest.raises(ValueError, match=r"mask must have rank 4.*mask.shape=\(2, 13\)"):
      f(q, k, v, beta, mask=jnp.ones((B, T), bool))  # key-padding masks are [B|1, N|1, 1, T]
    with pytest.raises(ValueError, match=r"key-padding masks.*mask.shape=\(2, 1, 13, 13\)"):
      f(q, k, v, beta, mask=jnp.ones((B, 1, T, T), bool))
    with pytest.raises(ValueError, match="chunk_size=0"):
      f(q, k, v, beta, chunk_size=0)
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
      f(q, k, v, beta, qk_norm=1)
    # Values at masked steps are not read, so not checked; under jit values are not checked.
    mask = jnp.ones((B, 1, 1, T), bool).at[0, :, :, 3].set(False)
    chex.assert_tree_all_finite(f(q, k, v, beta.at[0, 3, 1].set(1.5), gates=gates, mask=mask, chunk_size=4))
    jax.make_jaxpr(lambda b: f(q, k, v, b))(beta.at[0, 3, 1].set(1.5))

  def test_step_errors(self):
    q, k, v, beta, gates = (x[:, 0] for x in inputs())
    state = ea.init_delta_rule_state(B, KH, H, HV)
    with pytest.raises(ValueError, match=r"state.s is float32\[2, 2, 7, 3\], expected float32\[2, 2, 5, 3\]"):
      ea.delta_rule_step(ea.init_delta_rule_state(B, KH, 7, HV), q, k, v, beta)
    with pytest.raises(ValueError, match=r"beta_t.shape=\(2, 6\) must be \[B, K\]=\(2, 2\)"):
      ea.delta_rule_step(state, q, k, v, jnp.full((B, N), 0.5))
    with pytest.raises(ValueError, match="gates_t are log forget gates.*e.g. 1.0"):
      ea.delta_rule_step(state, q, k, v, beta, gates_t=gates.at[0, 0].set(1.0))
    with pytest.raises(ValueError, match=r"mask_t must be bool \[B\]"):
      ea.delta_rule_step(state, q, k, v, beta, mask_t=jnp.ones((B, 1), bool))
    with pytest.raises(ValueError, match="q_t must have rank 3"):
      ea.delta_rule_step(state, q[:, None], k, v, beta)
    with pytest.raises(ValueError, match="head_dim must be a positive int, got head_dim=0"):
      ea.init_delta_rule_state(B, KH, 0, HV)


@pytest.mark.parametrize("c", [64, 37, 16, 5, 1])
@pytest.mark.parametrize("spread", [1.0, 0.03])
def test_unit_lower_inverse_on_nearly_parallel_keys(c, spread):
  # The chunk's A = beta_t (k_t . k_s) below the diagonal with unit keys that point almost the same
  # way (spread 0.03): a power series in A cancels terms of ~1e17 there (it returned errors of 1e10);
  # the inverse itself stays within [-1, 1]. Value and gradient against float64.
  from efficient_attention._delta import unit_lower_inverse
  rng = np.random.default_rng(int(jax.random.randint(util.fresh_key(), (), 0, 2**30)))
  k = rng.standard_normal(64) + spread * rng.standard_normal((3, c, 64))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  a = np.tril(rng.uniform(0.5, 1.0, (3, c, 1)) * (k @ k.transpose(0, 2, 1)), -1)
  want = np.linalg.inv(np.eye(c) + a)
  got = np.asarray(unit_lower_inverse(jnp.asarray(a, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, atol=2e-6)
  dt = rng.standard_normal((3, c, c))
  grad = jax.grad(lambda a: jnp.sum(unit_lower_inverse(a) * dt))(jnp.asarray(a, jnp.float32))
  # d/dA of <(I + A)^-1, dT> = -T^T dT T^T, on the strictly lower part A is read from.
  want_grad = np.tril(-np.einsum("...ji,...jk,...lk->...il", want, dt, want), -1)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, atol=2e-5 * max(1.0, np.abs(want_grad).max()))


@pytest.mark.parametrize("implementation", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_nearly_parallel_keys_over_a_long_chunk(implementation):
  # Trained keys line up; with beta near 1 and 64-step chunks the WY factors must stay exact.
  b, t, n, h, hv = 1, 70, 2, 16, 8
  q, _, v = util.qkv(b, t, t, n, n, h, hv=hv)
  base = util.normal((1, 1, 1, h))
  k = base + 0.03 * util.normal((b, t, n, h))
  beta = 0.9 + 0.1 * draw_beta((b, t, n))
  gates = draw_gates((b, t, n), low=-0.05)
  fn = lambda q, k, v, beta, g: ea.delta_rule_attention(q, k, v, beta, gates=g, chunk_size=64,  # noqa: E731
                                                        implementation=implementation)
  ref = lambda *a: delta_rule_f64(*a)[0]  # noqa: E731
  # The gates' gradient here (norm ~0.8) is the difference of the WY factors' share and the recurrence's,
  # each several times larger, so float32 rounding of the shares reads large against it: 4.8e-6 relative on
  # the XLA path, 8.2e-6 with both parts in kernels (their absolute errors 3.9e-6 and 6.5e-6).
  norm_tol = 3e-5 if implementation == "pallas" else None
  util.check_against_f64(fn, ref, (q, k, v, beta, gates), argnums=(0, 1, 2, 3, 4), norm_tol=norm_tol,
                         **util.TOL[jnp.float32])
