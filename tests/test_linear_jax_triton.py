"""causal_linear_attention(backend="jax_triton"): Triton-language kernels launched through jax_triton.

Off a CUDA GPU (CI has neither triton nor jax_triton) only the wrapper runs: the
backend's validation, what `available()` says, the error that names what is
missing, the launches each pass makes (traced with a stand-in for
`triton_call`: grids, shapes, settings, the span sums handed between passes)
and the vmap rule. With jax_triton on a CUDA GPU, value and gradient are checked
against the float64 reference. (The kernels themselves also run in Triton's
interpreter on torch CPU tensors, forward and backward end to end:
`experiments/jax_triton_linear_interpret_check.py`, outside the suite as it
needs torch.)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import LinearBlockSizes, causal_linear_attention, common, kernel_attention_reference, linear
from pallas import linear_jax_triton
from tests import util

C16 = LinearBlockSizes(chunk=16, span_chunks=1)
# Spans of two chunks and 16-column blocks: several spans and column blocks at small T and Hv.
C16S2 = LinearBlockSizes(chunk=16, block_c=16, span_chunks=2)

needs_gpu = pytest.mark.skipif(not linear_jax_triton.available(),
                               reason="needs jax_triton, triton and a CUDA GPU")


def _features(b, t, heads, m, dtype=jnp.float32):
  return jax.nn.softplus(util.normal((b, t, heads, m))).astype(dtype)


def _inputs(b, t, n, kh, m, hv, dtype=jnp.float32):
  return _features(b, t, n, m, dtype), _features(b, t, kh, m, dtype), util.normal((b, t, kh, hv), dtype)


def _fn(ids=None, blocks=None, **kwargs):
  return lambda q, k, v: causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=blocks, backend="jax_triton",
                                                 **kwargs)


def _ref(ids=None):
  return lambda q, k, v: kernel_attention_reference(q, k, v, is_causal=True, segment_ids=ids)


# --------------------------------------------------------------------------- #
# wrapper (any machine)
# --------------------------------------------------------------------------- #


def test_unknown_backend_names_the_valid_ones():
  q, k, v = _inputs(1, 8, 2, 2, 8, 8)
  with pytest.raises(ValueError, match=r"unknown backend='pallas'; valid: None, 'triton', 'jax_triton'"):
    causal_linear_attention(q, k, v, backend="pallas")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the answer off a GPU")
def test_unavailable_off_gpu():
  assert not linear_jax_triton.available()
  assert any("CUDA GPU" in item for item in linear_jax_triton.missing())


@pytest.mark.skipif(linear_jax_triton.available(), reason="checks the error where the backend cannot run")
def test_names_what_is_missing():
  q, k, v = _inputs(1, 8, 2, 2, 8, 8)
  with pytest.raises(ValueError, match="backend='jax_triton'.*missing: ") as info:
    causal_linear_attention(q, k, v, backend="jax_triton")
  for item in linear_jax_triton.missing():
    assert item in str(info.value)
  # Also for empty inputs: the option is wrong whatever the shape.
  with pytest.raises(ValueError, match="missing: "):
    causal_linear_attention(q[:, :0], k[:, :0], v[:, :0], backend="jax_triton")


def test_interpret_is_refused(monkeypatch):
  monkeypatch.setattr(linear_jax_triton, "missing", lambda: ())
  q, k, v = _inputs(1, 8, 2, 2, 8, 8)
  with pytest.raises(ValueError, match="no interpret mode"):
    causal_linear_attention(q, k, v, backend="jax_triton", interpret=True)


def test_default_backend_is_the_pallas_one():
  q, k, v = _inputs(1, 21, 2, 1, 8, 8)
  dims = common.check_qkv(q, k, v)
  assert linear.prepare(dims, 8, q.dtype, None, C16, True)[0].backend == "triton"
  got = {backend: causal_linear_attention(q, k, v, block_sizes=C16, backend=backend, interpret=True)
         for backend in (None, "triton")}
  np.testing.assert_array_equal(got[None], got["triton"])


def test_default_backend_by_platform_and_lowering(monkeypatch):
  assert linear.default_backend(interpret=True, platform="gpu") == "triton"
  assert linear.default_backend(platform="cpu") == "triton"
  # A compiled GPU call: the Pallas-Triton lowering while this JAX has it ...
  monkeypatch.setattr(linear, "triton_lowering_available", lambda: True)
  assert linear.default_backend(platform="gpu") == "triton"
  # ... else jax_triton, or an error naming what jax_triton lacks.
  monkeypatch.setattr(linear, "triton_lowering_available", lambda: False)
  monkeypatch.setattr(linear_jax_triton, "missing", lambda: ("jax_triton",))
  monkeypatch.setattr(linear_jax_triton, "available", lambda: False)
  with pytest.raises(ValueError, match=r"needs jax_triton.*no Pallas-Triton lowering.*missing for jax_triton: jax_triton"):
    linear.default_backend(platform="gpu")
  monkeypatch.setattr(linear_jax_triton, "available", lambda: True)
  assert linear.default_backend(platform="gpu") == "jax_triton"
  assert linear.default_backend(interpret=True, platform="gpu") == "triton"


def _traced(monkeypatch, fn, *args):
  """The launches (and their inputs' shapes) of `jax.grad` of `sum(fn(*args))`, traced with a
  stand-in for triton_call that returns zeros; and the output's shape and dtype."""
  launches = []

  def record(launch, *inputs):
    launches.append((launch, dict(zip(launch.inputs, (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)))))
    return tuple(jnp.zeros(o.shape, o.dtype) for o in launch.outputs)

  monkeypatch.setattr(linear_jax_triton, "call_launch", record)
  monkeypatch.setattr(linear_jax_triton, "missing", lambda: ())
  out = jax.eval_shape(fn, *args)
  jax.eval_shape(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2)), *args)
  return launches, out


def test_passes_launch_the_triton_kernels(monkeypatch):
  # T=37: three 16-step chunks in spans of two, so two spans and T' = 64.
  b, t, n, kh, m, hv = 2, 37, 4, 2, 5, 24
  q, k, v = _inputs(b, t, n, kh, m, hv, jnp.bfloat16)
  ids = util.packed_segment_ids(b, t, 3)
  launches, out = _traced(monkeypatch, _fn(ids, C16S2), q, k, v)
  assert (out.shape, out.dtype) == ((b, t, n, hv), jnp.bfloat16)
  by_name = {launch.name: (launch, shapes) for launch, shapes in launches}
  assert set(by_name) == {f"linear_attention_{x}_jax_triton" for x in
                          ("forward", "span_sums_forward", "dq", "dk", "span_sums_dk", "dv")}
  # Padded: T' = 64 (two spans of 32 steps), M 5 -> 16, Hv 24 -> 32 (two column blocks of 16).
  fwd, shapes = by_name["linear_attention_forward_jax_triton"]
  assert fwd.grid == (b * n, 2, 2)
  assert [(o.shape, o.dtype) for o in fwd.outputs] == [
      ((b, 64, n, 32), jnp.bfloat16), ((b, n, 2, 64), jnp.float32), ((b, 64, n, 32), jnp.bfloat16)]
  assert fwd.kept == (0, 1, 2)  # out, den, and out's rounding error (16-bit inputs)
  assert (shapes["a"].shape, shapes["b"].shape, shapes["c"].shape) == ((b, 64, n, 16), (b, 64, kh, 16), (b, 64, kh, 32))
  assert shapes["s_sums"].shape == (b, 2, kh, 16, 32) and shapes["z_sums"].shape == (b, 2, kh, 16, 16)
  assert shapes["runs"].shape == (b, 2) and shapes["labels"].shape == (b, 64)
  assert shapes["alpha"].shape == (1,)  # placeholders where the pass reads nothing
  c = fwd.constants
  assert (c["CHUNK"], c["SPAN"], c["SPANS"], c["BLOCK_C"], c["HO"], c["B_GROUP"]) == (16, 32, 2, 16, n, n // kh)
  assert c["ROWSUM"] and c["NORMALISE"] and c["SPLIT"] and c["SEGMENTS"] and not c["REVERSE"] and not c["BIAS"]
  assert c["PRECISION"] == "tf32"
  # The dq pass reads the forward's span sums, transposed; the dv pass the dk pass's.
  dq, dq_shapes = by_name["linear_attention_dq_jax_triton"]
  assert dq.constants["SUMS_T"] and dq.constants["BIAS"] and dq.constants["BETA_ONES"]
  assert dq_shapes["s_sums"].shape == (b, 2, kh, 16, 32) and dq_shapes["w_sums"].shape == (b, 2, kh, 16, 16)
  dk, dk_shapes = by_name["linear_attention_dk_jax_triton"]
  assert dk.constants["REVERSE"] and dk.constants["ALPHA_ONES"] and dk.grid == (b * n, 2, 1)
  assert dk.outputs[0] == jax.ShapeDtypeStruct((b, 64, n, 16), jnp.float32)  # summed over the group after
  sums_dk, _ = by_name["linear_attention_span_sums_dk_jax_triton"]
  dv, dv_shapes = by_name["linear_attention_dv_jax_triton"]
  assert dv.constants["SUMS_T"] and not dv.constants["BIAS"]
  assert dv_shapes["s_sums"].shape == sums_dk.outputs[0].shape == (b, 2, n, 32, 16)


def test_one_span_launches_no_span_sums(monkeypatch):
  q, k, v = _inputs(2, 5, 2, 1, 16, 16, jnp.float32)  # T below one chunk
  launches, out = _traced(monkeypatch, _fn(), q, k, v)
  assert out.shape == (2, 5, 2, 16)
  assert sorted({launch.name for launch, _ in launches}) == [
      f"linear_attention_{x}_jax_triton" for x in ("dk", "dq", "dv", "forward")]
  for launch, shapes in launches:
    assert launch.grid[1] == 1 and shapes["s_sums"].shape == (1,)
    assert launch.constants["PRECISION"] == "ieee"  # float32 multiplies in full float32, not TF32
  fwd = next(launch for launch, _ in launches if launch.name == "linear_attention_forward_jax_triton")
  assert fwd.kept == (0, 1)  # no rounding error output for float32


def test_launches_take_the_block_sizes(monkeypatch):
  q, k, v = _inputs(1, 300, 2, 1, 16, 16, jnp.bfloat16)
  launches, _ = _traced(monkeypatch, _fn(blocks=LinearBlockSizes(num_warps=2, num_stages=3)), q, k, v)
  for launch, _ in launches:
    assert (launch.num_warps, launch.num_stages, launch.constants["CHUNK"]) == (2, 3, 128)


def test_launch_errors_name_the_values():
  p = linear.LinearStatic(chunk=16, span=32, spans=2, block_c=None, group=2, segments=False, interpret=False,
                          num_warps=4, num_stages=2, backend="jax_triton").pass_(
                              "forward", reverse=False, bias=False, rowsum=True, a_group=1, b_group=2)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  with pytest.raises(ValueError, match="T=40 must be whole spans of 32"):
    linear_jax_triton.pass_launch({"a": f32(1, 40, 4, 16), "b": f32(1, 40, 2, 16), "c": f32(1, 40, 2, 16)}, p)
  with pytest.raises(ValueError, match=r"heads of a \(4\) and b \(1\)"):
    linear_jax_triton.pass_launch({"a": f32(1, 64, 4, 16), "b": f32(1, 64, 1, 16), "c": f32(1, 64, 1, 16)}, p)
  p = linear.LinearStatic(chunk=16, span=16, spans=70000, block_c=None, group=1, segments=False, interpret=False,
                          num_warps=4, num_stages=2).pass_("dv", reverse=True, bias=False, rowsum=False, a_group=1,
                                                           b_group=1)
  with pytest.raises(ValueError, match="exceed the 65535 programs"):
    linear_jax_triton.sums_launch({"b": f32(1, 16 * 70000, 1, 16), "c": f32(1, 16 * 70000, 1, 16)}, p)


def test_vmap_folds_into_the_batch(monkeypatch):
  q, k, v = _inputs(3, 19, 2, 2, 16, 16)
  fn = jax.vmap(lambda q, k, v: _fn(blocks=C16)(q[None], k[None], v[None])[0])
  launches, out = _traced(monkeypatch, fn, q, k, v)
  assert out.shape == (3, 19, 2, 16)
  # Every kernel runs on [V * 1, ...] (the unbatched function is traced too, for its shapes).
  names = {launch.name for launch, _ in launches}
  folded = {launch.name for launch, shapes in launches if shapes["b"].shape[0] == 3}
  assert len(names) == 6 and folded == names
  assert all(launch.grid[0] == 3 * 2 for launch, shapes in launches if shapes["b"].shape[0] == 3)


# --------------------------------------------------------------------------- #
# kernels (CUDA GPU with jax_triton)
# --------------------------------------------------------------------------- #


@needs_gpu
@pytest.mark.parametrize("b, t, n, kh, m, hv, segments, blocks", [
    (2, 37, 4, 2, 5, 7, False, C16),  # odd T and widths, GQA, several spans
    (2, 5, 4, 2, 16, 16, False, None),  # T below one chunk, default tiles
    (2, 41, 4, 1, 8, 24, True, C16S2),  # MQA, packed runs, two column blocks
    (1, 300, 2, 2, 64, 64, True, None),  # default tiles: 128-step chunks, several spans
    (2, 200, 4, 2, 128, 64, False, None),
])
def test_value_and_grad_f32(b, t, n, kh, m, hv, segments, blocks):
  q, k, v = _inputs(b, t, n, kh, m, hv)
  ids = util.packed_segment_ids(b, t, 3) if segments else None
  util.check_against_f64(_fn(ids, blocks), _ref(ids), (q, k, v), **util.TOL[jnp.float32])


@needs_gpu
def test_recurring_ids_across_spans():
  # Runs that start mid-chunk, a run longer than a span, and an id that recurs after another.
  b, t = 2, 77
  q, k, v = _inputs(b, t, 2, 1, 16, 8)
  ids = np.zeros((b, t), np.int32)
  ids[0, 5:60], ids[0, 60:] = 1, 0
  ids[1, 17:18], ids[1, 18:] = 2, 3
  ids = jnp.asarray(ids)
  util.check_against_f64(_fn(ids, C16S2), _ref(ids), (q, k, v), **util.TOL[jnp.float32])


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("blocks", [C16S2, None])
def test_half_precision(dtype, blocks):
  q, k, v = _inputs(2, 45, 4, 2, 16, 16, dtype)
  ids = util.packed_segment_ids(2, 45, 3)
  out, _ = util.check_against_f64(_fn(ids, blocks), _ref(ids), (q, k, v), **util.TOL[dtype])
  assert out.dtype == dtype


@needs_gpu
def test_rows_with_zero_denominator_are_zero_with_zero_grad():
  q, k, v = _inputs(2, 23, 2, 1, 8, 8)
  k = k.at[1, :3].set(0.0)  # batch 1's first three rows see only zero keys
  q = q.at[0, 7, 1].set(0.0)  # a zero query row
  out, _ = util.check_dead_rows(_fn(blocks=C16), q, k, v, dead=[(1, slice(0, 3)), (0, 7, 1)])
  np.testing.assert_allclose(out, kernel_attention_reference(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


@needs_gpu
def test_matches_the_pallas_backend():
  q, k, v = _inputs(2, 100, 4, 2, 32, 32, jnp.bfloat16)
  ids = util.packed_segment_ids(2, 100, 3)
  want = causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=C16S2)
  got = _fn(ids, C16S2)(q, k, v)
  assert util.relative_error(got, want) < 1e-2


@needs_gpu
def test_jit_and_vmap():
  q, k, v = _inputs(3, 19, 2, 2, 16, 16)
  fn = jax.jit(jax.vmap(lambda q, k, v: _fn(blocks=C16)(q[None], k[None], v[None])[0]))
  want = kernel_attention_reference(q, k, v, is_causal=True)
  chex.assert_trees_all_close(fn(q, k, v), want, atol=1e-5, rtol=1e-5)
  grad = jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2))(q)
  want_grad = jax.grad(lambda q: jnp.sum(kernel_attention_reference(q, k, v, is_causal=True) ** 2))(q)
  np.testing.assert_allclose(grad, want_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["linear", "favor"])
def test_families_reach_the_jax_triton_kernels_through_the_default(monkeypatch, family):
  # What linear_attention / favor_attention(implementation="pallas") run where the default backend is
  # jax_triton (a GPU whose JAX lacks the Pallas-Triton lowering): the jax_triton passes, and for
  # FAVOR+ features from XLA (the fused feature kernels exist only through the Pallas lowering).
  import efficient_attention as ea

  monkeypatch.setattr(linear, "default_backend", lambda **_: "jax_triton")
  b, t, n, kh, h = 1, 37, 4, 2, 16
  q, k, v = (util.normal((b, t, heads, h)) for heads in (n, kh, kh))
  if family == "linear":
    fn = lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True, implementation="pallas")
  else:
    features = ea.orthogonal_random_features(jax.random.key(0), 32, h)
    fn = lambda q, k, v: ea.favor_attention(q, k, v, features, is_causal=True, implementation="pallas")
  launches, out = _traced(monkeypatch, fn, q, k, v)
  assert out.shape == (b, t, n, h)
  assert {launch.name for launch, _ in launches} >= {
      f"linear_attention_{x}_jax_triton" for x in ("forward", "dq", "dk", "dv")}


def test_kernels_without_the_triton_lowering_say_what_runs_instead(monkeypatch):
  # A JAX without Pallas' Triton lowering: compiled launches of the Pallas kernels name the way out.
  import sys

  from pallas import tiling

  import jax.experimental.pallas as jax_pallas

  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # its import now fails
  monkeypatch.delattr(jax_pallas, "triton", raising=False)
  with pytest.raises(ValueError, match=r"no longer has.*jax_triton.*implementation='xla'"):
    tiling.triton_params(interpret=False, num_warps=4, num_stages=2)
  assert tiling.triton_params(interpret=True, num_warps=4, num_stages=2) == {}
