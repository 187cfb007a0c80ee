"""Gated linear attention (log forget gates, normalize="none") vs a float64 recurrence of its equations.

Per batch row and key/value head, with `phi` the feature map:
  S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t,  z_t = exp(g_t) z_{t-1} + phi(k_t),
  o_t = phi(q_t) S_t  (/ phi(q_t) . z_t for normalize="denominator");
a segment starts from S = 0, z = 0; a masked (padding) step changes nothing, and a position
no head attends never starts a segment (it takes the id of the attended position before it).
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

import efficient_attention as ea
from tests import util

B, T, N, KH, H, HV = 2, 13, 6, 2, 5, 3

_seeds = itertools.count(1)

FEATURE_MAPS = {"elu+1": lambda x: jax.nn.elu(x) + 1.0, "relu": jax.nn.relu, "identity": lambda x: x}


@functools.partial(jax.jit, static_argnames=("feature_map", "normalize"))
def recurrence(q, k, v, gates, *, feature_map="elu+1", normalize="denominator", mask=None, segment_ids=None):
  """`[B, T, N, Hv]` by scanning the equations over t (per query head; run it in float64)."""
  b, t, n, _ = q.shape
  group = n // k.shape[2]
  phi_q, phi_k = FEATURE_MAPS[feature_map](q), FEATURE_MAPS[feature_map](k)
  m = phi_k.shape[-1]
  # Gates of every query head: [B, T, N, M].
  g = {1: lambda: gates[None, None, :, None], 3: lambda: gates[..., None], 4: lambda: gates}[gates.ndim]()
  g = jnp.broadcast_to(jnp.repeat(g, group, axis=2), (b, t, n, m))
  phi_k, v = (jnp.repeat(x, group, axis=2) for x in (phi_k, v))
  # [B, T, N]: live steps; [B, T]: segment starts.
  live = jnp.ones((b, t, n), bool) if mask is None else jnp.broadcast_to(mask[:, :, 0, :].transpose(0, 2, 1), (b, t, n))
  ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  # A position no head attends holds any id: it takes the id of the last attended one before it
  # (position 0's before the first), so it never starts or ends a segment.
  attended = live.any(axis=2)
  last = jax.lax.cummax(jnp.where(attended, jnp.arange(t)[None, :], 0), axis=1)
  ids = jnp.take_along_axis(ids, last, axis=1)
  start = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)

  def step(carry, x):
    s, z = carry
    pq, pk, vt, gt, lt, rt = x
    s, z = jnp.where(rt[:, None, None, None], 0.0, s), jnp.where(rt[:, None, None], 0.0, z)
    decay = jnp.where(lt[..., None], jnp.exp(gt), 1.0)
    s = decay[..., None] * s + jnp.where(lt[..., None, None], pk[..., :, None] * vt[..., None, :], 0.0)
    z = decay * z + jnp.where(lt[..., None], pk, 0.0)
    num = jnp.einsum("bnm,bnmh->bnh", pq, s)
    if normalize == "none":
      return (s, z), num
    den = jnp.einsum("bnm,bnm->bn", pq, z)[..., None]
    return (s, z), jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))

  init = (jnp.zeros((b, n, m, v.shape[-1]), q.dtype), jnp.zeros((b, n, m), q.dtype))
  xs = tuple(jnp.swapaxes(x, 0, 1) for x in (phi_q, phi_k, v, g, live, start))
  _, out = jax.lax.scan(step, init, xs)
  return jnp.swapaxes(out, 0, 1)


def log_gates(shape, low=None, dtype=jnp.float32):
  """Fresh log forget gates: log-sigmoid of normals (mostly in [-3, 0]), or uniform in [low, 0]."""
  if low is not None:
    return jnp.asarray(np.random.default_rng(next(_seeds)).uniform(low, 0.0, shape), dtype)
  return jax.nn.log_sigmoid(util.normal(shape, scale=1.5) + 1.0).astype(dtype)


def gate_shape(kind, b=B, t=T, kh=KH, m=H):
  return {"head": (kh,), "step": (b, t, kh), "feature": (b, t, kh, m)}[kind]


def long_padding(b, s):
  """bool `[B, 1, 1, S]` keeping a random prefix of at least S / 2 keys."""
  lengths = np.random.default_rng(next(_seeds)).integers(s // 2, s + 1, (b,))
  return jnp.asarray(np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]


def options(case, t=T):
  """Masks and segment ids, drawn fresh."""
  return {
      "plain": {},
      "segments_padded": dict(segment_ids=util.packed_segment_ids(B, t, 3), mask=long_padding(B, t)),
      # Key sets differ between the query heads of a GQA group: the expanded-heads path.
      "per_head_padding": dict(mask=util.bernoulli(0.7, (B, N, 1, t))),
  }[case]


# (gate kind, normalize, feature map, masking case, strong): every gate shape with both
# normalize modes; identity features only without a denominator (phi(q) . z changes sign
# there). "strong" cases draw log gates down to -20 per step (T = 37, 16-step chunks):
# cumulative sums reach -320 within a chunk and -740 over the sequence, and no exp(+large)
# may appear in values or gradients.
CASES = [
    ("head", "denominator", "elu+1", "segments_padded", True),
    ("head", "none", "identity", "plain", False),
    ("step", "denominator", "elu+1", "per_head_padding", False),
    ("step", "none", "relu", "segments_padded", True),
    ("feature", "denominator", "elu+1", "segments_padded", True),
    ("feature", "none", "identity", "per_head_padding", False),
]


def strong_gates(kind, t):
  """Log gates uniform in [-20, 0] with exact -20s; per-head gates -20 and a moderate one.

  (With every head's gate near -20 the output is almost v_t whatever q is, and dq is
  a cancellation no float32 computation resolves.)
  """
  if kind == "head":
    return jnp.array([-20.0, float(log_gates((1,), low=-3.0)[0])])
  return log_gates(gate_shape(kind, t=t), low=-20.0).at[..., 0].set(-20.0)


def check_per_head_gate_grad(fn, ref, q, k, v, gates):
  """The gradient of a per-head gate `[K]` against float64, bounded by the terms it sums.

  It is the sum over B x T steps of each step's gate gradient, and those terms can cancel to a
  small fraction of their size (a random cotangent makes that common), so a bound relative to
  the result alone measures the cancellation, not the path: float32 is held to 3e-5 of the sum
  of the terms' magnitudes (60 draws measured up to 7.5e-6, where the error relative to the
  result reached 3.7e-4 on one draw of the suite), each step's term taken from the reference with per-step gates.
  """
  b, t = q.shape[:2]
  w = util.normal(jax.eval_shape(fn, q, k, v, gates).shape)
  got = np.asarray(jax.grad(lambda g: jnp.sum(fn(q, k, v, g) * w))(gates), np.float64)
  with jax.enable_x64(True):
    q64, k64, v64, w64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, w))
    steps = jnp.broadcast_to(jnp.asarray(np.asarray(gates), jnp.float64), (b, t, gates.shape[0]))
    terms = np.asarray(jax.grad(lambda g: jnp.sum(ref(q64, k64, v64, g) * w64))(steps))  # [B, T, K]
  want, size = terms.sum(axis=(0, 1)), np.abs(terms).sum(axis=(0, 1))
  assert np.all(np.abs(got - want) <= 3e-5 * size + 1e-12), (got, want, size)


class GatedLinearTest(chex.TestCase):

  @parameterized.parameters(*CASES)
  def test_value_and_grad_vs_recurrence(self, kind, normalize, feature_map, case, strong):
    t, chunk_size = (37, 16) if strong else (T, 4)
    q, k, v = util.qkv(B, t, t, N, KH, H, hv=HV)
    gates = strong_gates(kind, t) if strong else log_gates(gate_shape(kind))
    opts = dict(feature_map=feature_map, normalize=normalize, **options(case, t))
    fn = jax.jit(lambda q, k, v, g: ea.linear_attention(q, k, v, is_causal=True, gates=g, chunk_size=chunk_size,
                                                        **opts))
    ref = lambda q, k, v, g: recurrence(q, k, v, g, **opts)
    if kind != "head":
      # Strong per-step gates: their gradient (a reverse sum of pair terms that cancel) was within 3.0e-6
      # relative (median) over 30 draws, 1.1e-5 on the worst, above the float32 default of 1e-5 (per
      # feature: within 2.6e-6). The bound covers values and every gradient, all also held element-wise.
      norm_tol = 5e-5 if strong and kind == "step" else None
      out, _ = util.check_against_f64(fn, ref, (q, k, v, gates), argnums=(0, 1, 2, 3), norm_tol=norm_tol,
                                      **util.TOL[jnp.float32])
    else:
      out, _ = util.check_against_f64(fn, ref, (q, k, v, gates), argnums=(0, 1, 2), **util.TOL[jnp.float32])
      check_per_head_gate_grad(fn, ref, q, k, v, gates)
    chex.assert_shape(out, (B, t, N, HV))

  def test_dense_reference_equals_recurrence(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    opts = dict(segment_ids=util.packed_segment_ids(B, T, 3), mask=util.bernoulli(0.7, (B, N, 1, T)))
    for kind, normalize in (("head", "none"), ("step", "denominator"), ("feature", "none")):
      gates = log_gates(gate_shape(kind))
      dense = util.in_f64(jax.jit(lambda q, k, v, g: ea.linear_attention_reference(
          q, k, v, is_causal=True, gates=g, normalize=normalize, **opts)), q, k, v, gates)
      want = util.in_f64(lambda *a: recurrence(*a, normalize=normalize, **opts), q, k, v, gates)
      np.testing.assert_allclose(dense, want, rtol=1e-10, atol=1e-10, err_msg=kind)

  def test_dense_reference_carries_ids_over_a_segment_no_head_attends(self):
    # The last step starts its own segment and no head attends its key: it belongs to the run
    # before it (the library's convention), in the dense reference as in the recurrence.
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    ids = jnp.broadcast_to(jnp.where(jnp.arange(T) < T - 1, jnp.where(jnp.arange(T) < 5, 0, 1), 2), (B, T))
    mask = util.bernoulli(0.7, (B, N, 1, T)).at[..., T - 1].set(False).at[..., 0].set(True)
    opts = dict(segment_ids=ids, mask=mask)
    gates = log_gates(gate_shape("step"))
    dense = util.in_f64(jax.jit(lambda q, k, v, g: ea.linear_attention_reference(
        q, k, v, is_causal=True, gates=g, normalize="none", **opts)), q, k, v, gates)
    want = util.in_f64(lambda *a: recurrence(*a, normalize="none", **opts), q, k, v, gates)
    np.testing.assert_allclose(dense, want, rtol=1e-10, atol=1e-10)
    self.assertGreater(float(np.abs(want[:, T - 1]).min()), 0.0)

  def test_step_by_step_equals_chunked(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    for kind, normalize, feature_map in (("head", "denominator", "elu+1"), ("step", "none", "identity"),
                                         ("feature", "denominator", "relu")):
      gates = log_gates(gate_shape(kind))
      opts = dict(feature_map=feature_map, normalize=normalize)
      step = jax.jit(functools.partial(ea.linear_attention_step, **opts))
      state, outs = ea.init_state(B, KH, H, HV), []
      for t in range(T):
        state, out = step(state, q[:, t], k[:, t], v[:, t], gates=gates if kind == "head" else gates[:, t])
        outs.append(out)
      chunked = ea.linear_attention(q, k, v, is_causal=True, gates=gates, chunk_size=4, **opts)
      chex.assert_trees_all_close(jnp.stack(outs, axis=1), chunked, rtol=1e-5, atol=1e-5, custom_message=kind)

  def test_bf16_within_bf16_tolerance_and_keeps_dtype(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV, dtype=jnp.bfloat16)
    gates = log_gates(gate_shape("step"), dtype=jnp.bfloat16)
    opts = options("segments_padded")
    fn = jax.jit(lambda q, k, v, g: ea.linear_attention(q, k, v, is_causal=True, gates=g, chunk_size=4, **opts))
    ref = lambda q, k, v, g: recurrence(q, k, v, g, **opts)
    out, _ = util.check_against_f64(fn, ref, (q, k, v, gates), argnums=(0, 1, 2, 3), **util.TOL[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16

  def test_zero_gates_equal_ungated_and_jit_vmap(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    ungated = ea.linear_attention(q, k, v, is_causal=True, chunk_size=4)
    zero = ea.linear_attention(q, k, v, is_causal=True, chunk_size=4, gates=jnp.zeros((KH,)))
    chex.assert_trees_all_close(zero, ungated, rtol=1e-6, atol=1e-6)
    # Under jit (gates traced, values unchecked) and vmap over the batch, per-feature gates.
    gates = log_gates(gate_shape("feature"))
    fn = lambda q, k, v, g: ea.linear_attention(q[None], k[None], v[None], is_causal=True, gates=g[None],
                                                chunk_size=4, normalize="none")[0]
    out = jax.jit(jax.vmap(fn))(q, k, v, gates)
    for i in range(B):
      chex.assert_trees_all_close(out[i], fn(q[i], k[i], v[i], gates[i]), rtol=1e-6, atol=1e-6)

  def test_normalize_none_ungated_vs_reference(self):
    q, k, v = util.qkv(B, T, 11, N, KH, H, hv=HV)
    opts = dict(normalize="none", mask=util.bernoulli(0.7, (B, N, 1, 11)))
    fn = jax.jit(lambda q, k, v: ea.linear_attention(q, k, v, **opts))
    ref = jax.jit(lambda q, k, v: ea.linear_attention_reference(q, k, v, **opts))
    util.check_against_f64(fn, ref, (q, k, v), **util.TOL[jnp.float32])

  @settings(max_examples=4, deadline=None)
  @given(t=st.integers(1, 19), chunk_size=st.integers(1, 9), kind=st.sampled_from(["head", "step", "feature"]),
         segments=st.booleans(), normalize=st.sampled_from(["denominator", "none"]))
  def test_chunked_property(self, t, chunk_size, kind, segments, normalize):
    q, k, v = (x[:, :t] for x in util.qkv(2, 19, 19, 3, 1, 4))
    gates = log_gates(gate_shape(kind, b=2, t=t, kh=1, m=4))
    ids = util.packed_segment_ids(2, 19, 3)[:, :t] if segments else None
    opts = dict(normalize=normalize, segment_ids=ids)
    out = ea.linear_attention(q, k, v, is_causal=True, gates=gates, chunk_size=chunk_size, **opts)
    want = util.in_f64(lambda q, k, v, g: recurrence(q, k, v, g, **opts), q, k, v, gates)
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, **util.TOL[jnp.float32])


class GatedLinearErrorsTest(chex.TestCase):

  def test_errors_name_the_values(self):
    q, k, v = util.qkv(B, T, T, N, KH, H, hv=HV)
    gates = log_gates(gate_shape("step"))
    with pytest.raises(ValueError, match="gates decay a causal state and need is_causal=True, got is_causal=False"):
      ea.linear_attention(q, k, v, gates=gates)
    with pytest.raises(ValueError, match=r"gates must have shape \[K\]=\(2,\), \[B, T, K\]=\(2, 13, 2\), "
                                         r"\[B, T, K, M\]=\(2, 13, 2, 5\).*got gates.shape=\(2, 13, 6\)"):
      ea.linear_attention(q, k, v, is_causal=True, gates=log_gates((B, T, N)))
    with pytest.raises(ValueError, match=r"finite and <= 0, got max\(gates\)=0.5"):
      ea.linear_attention(q, k, v, is_causal=True, gates=gates.at[0, 3, 1].set(0.5))
    with pytest.raises(ValueError, match=r"max\(gates\)=nan \(1 non-finite\)"):
      ea.linear_attention(q, k, v, is_causal=True, gates=gates.at[0, 3, 1].set(jnp.nan))
    with pytest.raises(TypeError, match="gates must be a floating-point array.*int32"):
      ea.linear_attention(q, k, v, is_causal=True, gates=jnp.zeros((KH,), jnp.int32))
    with pytest.raises(ValueError, match="without gates computes normalize='denominator'; got normalize='none'"):
      ea.linear_attention(q, k, v, is_causal=True, normalize="none", implementation="pallas")
    with pytest.raises(ValueError, match=r"gates honour key-padding masks.*mask.shape=\(2, 1, 13, 13\)"):
      ea.linear_attention(q, k, v, is_causal=True, gates=gates, mask=util.bernoulli(0.7, (B, 1, T, T)))
    with pytest.raises(ValueError, match="unknown normalize='sum'; valid: 'denominator', 'none'"):
      ea.linear_attention(q, k, v, normalize="sum")
    state = ea.init_state(B, KH, H, HV)
    with pytest.raises(ValueError, match=r"gates must have shape \[K\]=\(2,\), \[B, K\]=\(2, 2\), "
                                         r"\[B, K, M\]=\(2, 2, 5\).*got gates.shape=\(2, 13, 2\)"):
      ea.linear_attention_step(state, q[:, 0], k[:, 0], v[:, 0], gates=gates)
    with pytest.raises(ValueError, match=r"linear_attention_step: gates are log forget gates.*max\(gates\)=1.0"):
      ea.linear_attention_step(state, q[:, 0], k[:, 0], v[:, 0], gates=jnp.ones((KH,)))
