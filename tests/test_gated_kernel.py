"""The Pallas kernels of gated linear attention and the delta rule (`pallas.gated`), in interpret mode,
against the float64 recurrences of their equations: values and gradients (gates and beta included),
with gates per step and per feature (GLA)."""

import chex
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attention as ea
import pallas
from pallas.common import segment_starts
from tests import util
from tests.test_delta_rule import delta_rule_f64, draw_gates
from tests.test_delta_rule import inputs as delta_inputs
from tests.test_linear_gates import log_gates, long_padding, recurrence, strong_gates

B, N, KH, H, HV = 2, 6, 2, 5, 3
CHUNK = 16  # the smallest chunk the kernels take: T = 37 spans three chunks, T = 13 fewer than one


def masking(case, t):
  return {
      "plain": {},
      "segments_padded": dict(segment_ids=util.packed_segment_ids(B, t, 3), mask=long_padding(B, t)),
      # Key sets differ between the query heads of a GQA group: one state per query head.
      "per_head_padding": dict(mask=util.bernoulli(0.7, (B, N, 1, t))),
  }[case]


slow = pytest.mark.slow  # each case compiles its kernels' forward and backward (5-15 s on 2 cores)

# (gate kind, normalize, feature map, masking, T, strong decay, dtype)
GATED_CASES = [
    pytest.param("step", "none", "identity", "segments_padded", 37, True, jnp.float32, id="step_none_segments_strong"),
    pytest.param("head", "denominator", "elu+1", "per_head_padding", 13, False, jnp.float32,
                 id="head_denominator_per_head_short"),
    pytest.param("step", "denominator", "relu", "plain", 37, False, jnp.float32, id="step_denominator_relu",
                 marks=slow),
    pytest.param("step", "none", "elu+1", "segments_padded", 37, False, jnp.bfloat16, id="step_none_bf16", marks=slow),
]


@pytest.mark.parametrize("kind,normalize,feature_map,case,t,strong,dtype", GATED_CASES)
def test_gated_value_and_grad_vs_recurrence(kind, normalize, feature_map, case, t, strong, dtype):
  q, k, v = util.qkv(B, t, t, N, KH, H, hv=HV, dtype=dtype)
  shape = (KH,) if kind == "head" else (B, t, KH)
  gates = (strong_gates(kind, t) if strong else log_gates(shape)).astype(dtype)
  opts = dict(feature_map=feature_map, normalize=normalize, **masking(case, t))

  def fn(q, k, v, g):
    return ea.linear_attention(q, k, v, is_causal=True, gates=g, implementation="pallas", chunk_size=CHUNK, **opts)

  # Under strong decay (log gates down to -20) the per-step gates' gradient, a reverse sum over the
  # steps of row-minus-column pair sums that cancel, was within 3.2e-6 relative (median) of the float64
  # recurrence over 30 draws, 9.0e-6 on the 29th and 2.2e-5 on the worst (one in 30 above the float32
  # default of 1e-5: a failure of one suite run in ~30). The bound covers values and every gradient;
  # all stay held element-wise to the float32 tolerances as well.
  norm_tol = 5e-5 if strong and dtype == jnp.float32 else None
  out, grads = util.check_against_f64(fn, lambda q, k, v, g: recurrence(q, k, v, g, **opts), (q, k, v, gates),
                                      argnums=(0, 1, 2, 3), norm_tol=norm_tol, **util.TOL[dtype])
  chex.assert_shape(out, (B, t, N, HV))
  assert out.dtype == dtype
  # The gates' gradient is not trivially 0 (it comes from the q . dq - k . dk identity).
  assert float(jnp.abs(grads[3]).sum()) > 0


# Per-feature gates, through linear_attention: (normalize, feature map, masking, T, strong decay, dtype,
# bound on the relative error of values and gradients). 32-step chunks hold two 16-step sub-chunks, so
# both kinds of pairs (across sub-chunks through the reference point, within one key by key) and the
# state between chunks are exercised.
FEATURE_CHUNK = 32
# In bf16 (features, scaled queries and keys, states and pair weights rounded to bf16 before each
# product, as the kernels run on a GPU) the per-feature gates' gradient, a sum of pair terms that
# largely cancel, was within 3.4e-3..1.4e-2 relative over 30 draws (median 5.5e-3; 1.8e-2 on one
# draw of the suite), values and the other gradients within 3.5e-3 (the XLA path, float32 inside:
# all ~2.5e-3). Summed over the features of gates equal across features it matches the per-step
# kernels' gate gradient (2e-3..5e-3 on the same draws for both): the per-feature gradient sums
# fewer terms. With log gates down to -20 per step it was within 1.7e-2..6.2e-2 (the per-step
# kernels' gate gradient: 7.8e-3..2.7e-1 on such draws), the rest still within 4e-3.
FEATURE_CASES = [
    # GQA, odd T over two chunks, segments and key padding, log gates down to -20 per step.
    pytest.param("none", "identity", "segments_padded", 37, True, jnp.float32, None, id="none_segments_strong"),
    # T below one chunk (and one sub-chunk), key sets differing within a GQA group, the denominator.
    pytest.param("denominator", "elu+1", "per_head_padding", 13, False, jnp.float32, None,
                 id="denominator_per_head_short"),
    pytest.param("none", "relu", "plain", 40, False, jnp.float32, None, id="none_relu_plain", marks=slow),
    pytest.param("none", "elu+1", "segments_padded", 37, False, jnp.bfloat16, 3e-2, id="none_bf16", marks=slow),
    pytest.param("none", "identity", "segments_padded", 37, True, jnp.bfloat16, 1e-1, id="none_bf16_strong",
                 marks=slow),
]


@pytest.mark.parametrize("normalize,feature_map,case,t,strong,dtype,norm_tol", FEATURE_CASES)
def test_feature_gates_value_and_grad_vs_recurrence(normalize, feature_map, case, t, strong, dtype, norm_tol):
  q, k, v = util.qkv(B, t, t, N, KH, H, hv=HV, dtype=dtype)
  gates = (strong_gates("feature", t) if strong else log_gates((B, t, KH, H))).astype(dtype)
  opts = dict(feature_map=feature_map, normalize=normalize, **masking(case, t))

  def fn(q, k, v, g):
    return ea.linear_attention(q, k, v, is_causal=True, gates=g, implementation="pallas", chunk_size=FEATURE_CHUNK,
                               **opts)

  out, grads = util.check_against_f64(fn, lambda q, k, v, g: recurrence(q, k, v, g, **opts), (q, k, v, gates),
                                      argnums=(0, 1, 2, 3), norm_tol=norm_tol, **util.TOL[dtype])
  chex.assert_shape(out, (B, t, N, HV))
  assert out.dtype == dtype
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


class GatedLinearKernelTest(chex.TestCase):

  def test_equals_xla_path_over_many_chunks(self):
    # T = 150 over 16-step chunks (ten chunks, the last partial), GQA, per-step gates, default feature map.
    q, k, v = util.qkv(B, 150, 150, 4, 2, 16, hv=16)
    gates = log_gates((B, 150, 2))
    ids = util.packed_segment_ids(B, 150, 4)
    run = lambda impl: ea.linear_attention(q, k, v, is_causal=True, gates=gates, normalize="none", segment_ids=ids,
                                           implementation=impl, chunk_size=CHUNK)
    chex.assert_trees_all_close(run("pallas"), run("xla"), rtol=1e-4, atol=1e-4)

  def test_kernel_matches_its_dense_reference(self):
    # The kernel alone (no feature map, no masking wrapper), GQA, segments, T = 37 over 16-step chunks.
    q, k, v = util.qkv(B, 37, 37, N, KH, H, hv=HV)
    gates, ids = log_gates((B, 37, KH)), util.packed_segment_ids(B, 37, 3)
    out = pallas.gated_linear_attention(q, k, v, gates, segment_ids=ids, block_sizes=pallas.GatedBlockSizes(chunk=16))
    want = util.in_f64(lambda *a: pallas.gated_linear_attention_reference(*a, segment_ids=ids), q, k, v, gates)
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, **util.TOL[jnp.float32])

  def test_feature_gates_match_the_dense_reference(self):
    # The kernel alone with per-feature gates, values and gradients (gates included): GQA, T = 40 over
    # 32-step chunks (two sub-chunks each, the last chunk partial), log gates down to -20 per step.
    t, m, hv = 40, 16, 8
    q, k, v = util.qkv(B, t, t, 4, 2, m, hv=hv)
    gates = log_gates((B, t, 2, m), low=-20.0).at[:, ::3].set(-20.0)
    blocks = pallas.GatedBlockSizes(chunk=32)
    fn = lambda *a: pallas.gated_linear_attention(*a, block_sizes=blocks)
    _, grads = util.check_against_f64(fn, pallas.gated_linear_attention_reference, (q, k, v, gates),
                                      argnums=(0, 1, 2, 3), **util.TOL[jnp.float32])
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)

  def test_spans_match_the_dense_reference_step_gates(self):
    self._check_spans(features=False, span_chunks=1)

  @slow
  def test_spans_match_the_dense_reference_feature_gates(self):
    self._check_spans(features=True, span_chunks=2)

  def _check_spans(self, *, features, span_chunks):
    # The walks split into spans (each from a zero state, joined in XLA by one contraction over the spans): T = 77
    # over 16-step chunks is five chunks, so spans of one chunk or of two (the last one partial);
    # recurring segment ids (a run crossing span boundaries), GQA, values and gradients, gates included.
    t, m, hv = 77, 16, 8
    q, k, v = util.qkv(1, t, t, 4, 2, m, hv=hv)
    gates = log_gates((1, t, 2, m) if features else (1, t, 2), low=-0.1)  # mild: states carry across spans
    # Runs of 10, 35 (steps 10-44: across the chunk starts 16 and 32), 20 and 12 steps; id 0 recurs.
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 1, 0, 2]]), [10, 20, 15, 20, 12], axis=1))
    blocks = pallas.GatedBlockSizes(chunk=16, span_chunks=span_chunks)
    fn = lambda *a: pallas.gated_linear_attention(*a, segment_ids=ids, block_sizes=blocks)
    ref = lambda *a: pallas.gated_linear_attention_reference(*a, segment_ids=ids)
    _, grads = util.check_against_f64(fn, ref, (q, k, v, gates), argnums=(0, 1, 2, 3), **util.TOL[jnp.float32])
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)
    # The same numbers as one walk, to float32 rounding.
    one = lambda *a: pallas.gated_linear_attention(*a, segment_ids=ids, block_sizes=pallas.GatedBlockSizes(chunk=16))
    chex.assert_trees_all_close(fn(q, k, v, gates), one(q, k, v, gates), rtol=1e-5, atol=1e-5)

  def test_spans_are_refused_for_the_delta_rule(self):
    q, k, v = util.qkv(1, 20, 20, 2, 2, 8)
    beta, gates = jnp.full((1, 20, 2), 0.5), jnp.full((1, 20, 2), -0.1)
    with self.assertRaisesRegex(ValueError, "span_chunks=2 applies to gated linear attention"):
      pallas.delta_rule_recurrence(q, k, k, v, gates, block_sizes=pallas.GatedBlockSizes(chunk=16, span_chunks=2))

  @slow
  def test_feature_gates_equal_xla_path_over_many_chunks(self):
    # T = 150 over 64-step chunks (four sub-chunks each), GQA, segments, the default feature map.
    q, k, v = util.qkv(B, 150, 150, 4, 2, 16, hv=16)
    gates, ids = log_gates((B, 150, 2, 16)), util.packed_segment_ids(B, 150, 4)
    run = lambda impl: ea.linear_attention(q, k, v, is_causal=True, gates=gates, normalize="none", segment_ids=ids,
                                           implementation=impl, chunk_size=64)
    chex.assert_trees_all_close(run("pallas"), run("xla"), rtol=1e-4, atol=1e-4)

  def test_errors(self):
    q, k, v = util.qkv(B, 13, 13, N, KH, H, hv=HV)
    with pytest.raises(ValueError, match=r"gates must have shape \[B, T, K\]=\(2, 13, 2\) or "
                                         r"\[B, T, K, M\]=\(2, 13, 2, 5\), got \(2, 13, 6\)"):
      pallas.gated_linear_attention(q, k, v, log_gates((B, 13, N)))
    with pytest.raises(ValueError, match=r"gates must have shape \[B, T, K\]=\(2, 13, 2\), got \(2, 13, 2, 5\)"):
      pallas.delta_rule_recurrence(q, k, k, v, log_gates((B, 13, KH, H)))
    with pytest.raises(ValueError, match="sub_chunk=8 must be a power of two >= 16"):
      pallas.GatedBlockSizes(sub_chunk=8)
    with pytest.raises(TypeError, match="gates must be a floating-point array"):
      pallas.gated_linear_attention(q, k, v, jnp.zeros((B, 13, KH), jnp.int32))
    with pytest.raises(ValueError, match="chunk=8 must be a power of two >= 16"):
      pallas.GatedBlockSizes(chunk=8)
    with pytest.raises(ValueError, match=r"beta must have the gates' shape \[B, T, K\]=\(2, 13, 2\), got \(2, 13\)"):
      pallas.delta_rule_factors(k, v, jnp.full((B, 13), 0.5), log_gates((B, 13, KH)))
    with pytest.raises(TypeError, match="beta must be a floating-point array"):
      pallas.delta_rule(q, k, v, jnp.ones((B, 13, KH), jnp.int32), log_gates((B, 13, KH)))
    with pytest.raises(ValueError, match="factor_warps=0 must be"):
      pallas.GatedBlockSizes(factor_warps=0)
    with pytest.raises(ValueError, match="power-of-two chunk_size >= 16, got chunk_size=8"):
      ea.linear_attention(q, k, v, is_causal=True, gates=log_gates((KH,)), implementation="pallas", chunk_size=8)


# (gates: None / "mild" / "strong", qk_norm, masking, T, dtype)
DELTA_CASES = [
    pytest.param("mild", True, "segments_padded", 13, jnp.float32, id="gated_segments_padded_short"),
    # Log gates down to -20 per step: decays over a chunk fall far below float32's range.
    pytest.param("strong", False, "plain", 37, jnp.float32, id="strong_decay_no_qk_norm"),
    pytest.param(None, True, "plain", 37, jnp.float32, id="plain_gqa", marks=slow),
    pytest.param("mild", True, "per_head_padding", 37, jnp.float32, id="gated_per_head_mask", marks=slow),
    pytest.param("mild", True, "segments_padded", 37, jnp.bfloat16, id="gated_segments_bf16", marks=slow),
]


@pytest.mark.parametrize("gates,qk_norm,case,t,dtype", DELTA_CASES)
def test_delta_value_and_grad_vs_f64(gates, qk_norm, case, t, dtype):
  q, k, v, beta, log_g = delta_inputs(t=t, dtype=dtype, k_scale=1.0 if qk_norm else 0.4)
  if gates == "strong":
    log_g = draw_gates((B, t, KH), low=-20.0).at[:, ::2].set(-20.0)
  opts = dict(qk_norm=qk_norm, **masking(case, t))
  args = (q, k, v, beta) + ((log_g,) if gates else ())

  def fn(q, k, v, beta, gates=None):
    return ea.delta_rule_attention(q, k, v, beta, gates=gates, chunk_size=CHUNK, implementation="pallas", **opts)

  # Under strong decay (log gates of -20) the gates' gradient on this path agrees to 5e-7..4e-6
  # relative over draws (the XLA path: ~1e-7; the kernels' decays read cumulative gates kept as
  # hi + lo pairs, but the gradient still sums pair terms of very different sizes); every other
  # gradient to ~1e-7. The bound leaves room above the worst draw seen.
  norm_tol = 2e-5 if gates == "strong" else None
  if dtype == jnp.bfloat16:
    # In bf16 (pseudo-values and states stored in bf16, as the kernels run on a GPU) the gates'
    # gradient, a sum of pair terms that largely cancel, was within 2.1e-2 relative over 8 draws
    # (4 of them above 1e-2, on this path before and after the hi / lo gate sums);
    # values and the other gradients stay within bf16's 1e-2.
    norm_tol = 3e-2
  out, grads = util.check_against_f64(fn, lambda *a: delta_rule_f64(*a, **opts)[0], args,
                                      argnums=tuple(range(len(args))), norm_tol=norm_tol, **util.TOL[dtype])
  chex.assert_shape(out, (B, t, N, HV))
  assert out.dtype == dtype
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


@pytest.mark.parametrize("walk", ["direct", "split"])
@pytest.mark.parametrize("gates,t,dtype", [
    pytest.param("weak", 37, jnp.float32, id="segments_odd_t"),
    pytest.param("strong", 37, jnp.float32, id="strong_decay"),
    # 16-bit operands (T, the states and the pseudo-values stored in bf16, as on a GPU).
    pytest.param("weak", 37, jnp.bfloat16, id="segments_bf16", marks=slow)])
def test_delta_walks_vs_f64(walk, gates, t, dtype):
  # The walks of `GatedBlockSizes.delta_walk`: the default ("direct"), the backward walk with its state-independent terms
  # made in a parallel launch before it ("split"): the same values and gradients against the float64
  # recurrence, with GQA,
  # segment ids and an odd length over three chunks. Weak decay (log gates in [-0.1, 0]): the state
  # and its correction `W S` carry across chunks (with gates in [-3, 0] they fade within one).
  q, k, v, beta, log_g = delta_inputs(t=t)
  if gates == "weak":
    log_g = draw_gates((B, t, KH), low=-0.1)
  # Normalised in float32, then cast: the kernels take prepared inputs.
  if gates == "strong":
    log_g = draw_gates((B, t, KH), low=-20.0).at[:, ::2].set(-20.0)
  q, k = (ea._delta.l2_normalize(x).astype(dtype) for x in (q, k))
  v = v.astype(dtype)
  ids = util.packed_segment_ids(B, t, 3)
  blocks = pallas.GatedBlockSizes(chunk=CHUNK, delta_walk=walk)
  fn = lambda *a: pallas.delta_rule(*a, segment_ids=ids, block_sizes=blocks)
  ref = lambda *a: delta_rule_f64(*a, scale=1.0, qk_norm=False, segment_ids=ids)[0]
  # bf16: the gates' gradient, a sum of pair terms that largely cancel, as in test_delta_value_and_grad_vs_f64
  # (3e-2 there); here up to 1.07e-2 over eight draws of the walks.
  norm_tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5 if gates == "strong" else None
  out, grads = util.check_against_f64(fn, ref, (q, k, v, beta, log_g), argnums=(0, 1, 2, 3, 4),
                                      norm_tol=norm_tol, **util.TOL[dtype])
  chex.assert_shape(out, (B, t, N, HV))
  assert out.dtype == dtype
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


class DeltaRuleKernelTest(chex.TestCase):

  def test_errors(self):
    q, k, v, beta, gates = delta_inputs()
    with pytest.raises(ValueError, match="power-of-two chunk_size >= 16, got chunk_size=4"):
      ea.delta_rule_attention(q, k, v, beta, chunk_size=4, implementation="pallas")
    with pytest.raises(ValueError, match="delta_walk='fused' must be one of 'direct', 'split'"):
      pallas.GatedBlockSizes(delta_walk="fused")
    with pytest.raises(ValueError, match=r"w must have k's shape"):
      pallas.delta_rule_recurrence(q, k, k[..., :2], v, gates)
    with jax.enable_x64(True):
      q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
      with pytest.raises(TypeError, match="computes in float32 at most"):
        ea.delta_rule_attention(q64, k64, v64, beta, implementation="pallas")


@pytest.mark.parametrize("family,options", [("gla", dict(gate="step")), ("gla", dict(gate="feature")),
                                            pytest.param("delta_rule", dict(gated=True), marks=slow)])
def test_modules_match_the_xla_path(family, options):
  # The same parameters, called through the Pallas kernels and through XLA.
  d = 12
  module = ea.ATTENTION_FAMILIES[family](4, d, 16, num_kv_heads=2, chunk_size=CHUNK, rngs=nnx.Rngs(0), **options)
  x = util.normal((2, 29, d))
  ids = util.packed_segment_ids(2, 29, 2)
  want = module(x, segment_ids=ids)
  module.implementation = "pallas"
  chex.assert_trees_all_close(module(x, segment_ids=ids), want, rtol=1e-4, atol=1e-4)


def _chunk_factors_f64(k, v, beta, gates, segment_ids=None, chunk=CHUNK):
  """`W | U~` `[B, T, K, H + Hv]` from the XLA path's `chunk_terms`."""
  b, t, kh, _ = k.shape
  starts = None if segment_ids is None else segment_starts(segment_ids)
  *_, u, w = ea._delta.chunk_terms(k, v, beta, gates, starts, c=chunk)
  steps = lambda x: x.transpose(0, 1, 3, 2, 4).reshape(b, -1, kh, x.shape[-1])[:, :t]
  return jnp.concatenate([steps(w), steps(u)], -1)


@pytest.mark.parametrize("t,segments,gates,dtype,chunk", [
    pytest.param(37, True, "mild", jnp.float32, CHUNK, id="segments_odd_t"),
    pytest.param(13, False, "strong", jnp.float32, CHUNK, id="strong_short"),
    # 64-step chunks under weak decay: four 16-row diagonal blocks, the blocks below them far from 0.
    pytest.param(77, False, "weak", jnp.float32, 64, id="weak_chunk64"),
    # 128-step chunks: three levels of merges of inverted blocks (16 -> 32 -> 64 -> 128).
    pytest.param(150, True, "weak", jnp.float32, 128, id="weak_chunk128_segments", marks=slow),
    pytest.param(37, True, "mild", jnp.bfloat16, CHUNK, id="segments_bf16", marks=slow),
])
def test_delta_factors_vs_f64(t, segments, gates, dtype, chunk):
  # The WY factors' kernel (the chunk's inverse by forward substitution in the kernel) against `chunk_terms`
  # in float64: values, and the gradients of keys, values, beta and gates. Strong decay: log gates down to -20.
  _, k, v, beta, log_g = delta_inputs(b=B, t=t, n=N, kh=KH, h=H, hv=HV, dtype=dtype)
  k = ea._delta.l2_normalize(k.astype(jnp.float32)).astype(dtype)
  if gates == "strong":
    log_g = draw_gates((B, t, KH), low=-20.0).at[:, ::2].set(-20.0)
  elif gates == "weak":
    log_g = draw_gates((B, t, KH), low=-0.05)
  ids = util.packed_segment_ids(B, t, 3) if segments else None
  blocks = pallas.GatedBlockSizes(chunk=chunk)
  fn = lambda k, v, beta, g: jnp.concatenate(
      pallas.delta_rule_factors(k, v, beta, g, segment_ids=ids, block_sizes=blocks), -1)
  ref = lambda k, v, beta, g: _chunk_factors_f64(k, v, beta, g, ids, chunk)
  out, grads = util.check_against_f64(fn, ref, (k, v, beta, log_g), argnums=(0, 1, 2, 3), **util.TOL[dtype])
  chex.assert_shape(out, (B, t, KH, H + HV))
  assert out.dtype == dtype
  assert all(float(jnp.abs(g).max()) > 0 for g in grads)


def _launch_outputs(fn, *args) -> dict:
  """{launch name: output dtypes} of the pallas_calls in the jaxpr of `fn(*args)`, nested jaxprs included."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found[str(eqn.params["name"])] = [v.aval.dtype.name for v in eqn.outvars]
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("group", [1, 2])
def test_gradient_pass_writes_cotangents_in_the_inputs_dtype_without_gqa(group):
  # Without GQA nothing sums the gradient pass's cotangents after it: dq, dk, dv (gated linear) and dq, the
  # pseudo-values' cotangent (the delta rule) leave the kernels in bf16, with no float32 copy cast in XLA;
  # with GQA they stay float32 for the sum over each group. dL/dG, and the delta rule's dk and dW, stay float32.
  t, kh = 40, 2
  q = util.normal((1, t, kh * group, 16)).astype(jnp.bfloat16)
  k, v = (util.normal((1, t, kh, 16)).astype(jnp.bfloat16) for _ in range(2))
  gates = jnp.full((1, t, kh), -0.1, jnp.float32)
  loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  narrow = "bfloat16" if group == 1 else "float32"
  gla = _launch_outputs(loss(lambda q, k, v: pallas.gated_linear_attention(q, k, v, gates)), q, k, v)
  grads = next(dtypes for name, dtypes in gla.items() if name.endswith("grads"))
  assert grads == [narrow, narrow, "float32", narrow], gla  # dq, dk, dL/dG, dv
  delta = _launch_outputs(loss(lambda q, k, v: pallas.delta_rule_recurrence(q, k, k, v, gates)), q, k, v)
  dstates = next(dtypes for name, dtypes in delta.items() if name.endswith("dstates"))
  grads = next(dtypes for name, dtypes in delta.items() if name.endswith("grads"))
  assert dstates == ["bfloat16", narrow], delta  # dh, the pseudo-values' cotangent
  assert grads == [narrow, "float32", "float32", "float32"], delta  # dq, dk, dL/dG, dW


@pytest.mark.parametrize("kernel", ["gated_linear", "gated_linear_feature", "delta_rule", "delta_rule_factors",
                                    "gated_linear_spans", "gated_linear_feature_spans", "delta_rule_split"])
def test_kernels_lower_to_triton_for_a_gpu(kernel):
  # Cross-lowering on this CPU: Pallas' Triton lowering of every launch (forward, and the backward's
  # walk and gradient pass) for a CUDA target, at the benchmark's head width, GQA and segment ids.
  # What the Triton compiler does with the IR (shared memory, registers) is checked on a GPU only.
  t = 300
  q, k = jnp.ones((1, t, 4, 128), jnp.bfloat16), jnp.ones((1, t, 2, 128), jnp.bfloat16)
  gates, ids = jnp.full((1, t, 2), -0.1, jnp.float32), jnp.zeros((1, t), jnp.int32)
  if kernel.startswith("gated_linear_feature"):
    gates = jnp.full((1, t, 2, 128), -0.1, jnp.float32)
  # The spanned walks: 300 steps are five 64-step chunks, in spans of two.
  blocks = dict(block_sizes=pallas.GatedBlockSizes(span_chunks=2)) if kernel.endswith("spans") else {}
  if kernel == "delta_rule_split":
    blocks = dict(block_sizes=pallas.GatedBlockSizes(delta_walk="split"))
  if kernel.startswith("gated_linear"):
    f = lambda q, k, v, g: pallas.gated_linear_attention(q, k, v, g, segment_ids=ids, interpret=False, **blocks)
  elif kernel.startswith("delta_rule") and kernel != "delta_rule_factors":
    f = lambda q, k, v, g: pallas.delta_rule_recurrence(q, k, k, v, g, segment_ids=ids, interpret=False, **blocks)
  else:
    beta = jnp.full((1, t, 2), 0.5, jnp.float32)
    f = lambda q, k, v, g: jnp.concatenate(pallas.delta_rule_factors(k, v, beta, g, segment_ids=ids, interpret=False), -1)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  calls = []
  for fn in (f, grad):
    module = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(q, k, k, gates).mlir_module()
    calls.append(module.count("xla.gpu.triton"))
  if kernel == "delta_rule_factors":
    # Forward: the factors; gradient: the factors and their gradient pass.
    assert calls == [1, 2], calls
    return
  # Forward: states and outputs; gradient: states, the backward walk and the gradient pass
  # (the split walk: and the parallel launch of its state-independent terms before it).
  want = {"delta_rule_split": [2, 4]}.get(kernel, [2, 3])
  assert calls == want, calls


def test_default_tiling_follows_the_dtype():
  # 16-bit inputs get the 3-stage pipeline measured on an H200; float32 tiles keep 2 stages.
  bf16, f32 = pallas.GatedBlockSizes.get_default(jnp.bfloat16), pallas.GatedBlockSizes.get_default(jnp.float32)
  assert (bf16.num_stages, f32.num_stages) == (3, 2)
  assert pallas.GatedBlockSizes.get_default(jnp.float16, 32) == pallas.GatedBlockSizes(chunk=32, num_stages=3)
  assert bf16.chunk == f32.chunk == pallas.GatedBlockSizes().chunk
  # One gate per step with 16-bit inputs: value blocks of 32 in the walks (twice the programs).
  assert pallas.GatedBlockSizes.get_default(jnp.bfloat16, scalar_gates=True).block_v == 32
  assert pallas.GatedBlockSizes.get_default(jnp.float32, scalar_gates=True).block_v == bf16.block_v == 64


def test_delta_pallas_under_vmap_and_grad_matches_a_loop():
  # vmap over an outer axis (Pallas adds a grid axis) of the whole kernel path, factors included.
  q, k, v, beta, gates = delta_inputs(b=2, t=21, n=2, kh=1, h=8, hv=4)

  def fn(q, k, v, beta, gates):
    out = ea.delta_rule_attention(q[None], k[None], v[None], beta[None], gates=gates[None], chunk_size=CHUNK,
                                  implementation="pallas")[0]
    return jnp.sum(out * jnp.cos(out))

  batched = jax.jit(jax.vmap(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4))))(q, k, v, beta, gates)
  for i in range(2):
    one = jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4))(q[i], k[i], v[i], beta[i], gates[i])
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), one, rtol=1e-5, atol=1e-5)
