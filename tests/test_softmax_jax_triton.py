"""flash_attention(backend="jax_triton"): Triton-language kernels launched through jax_triton.

Off a CUDA GPU (CI has neither triton nor jax_triton) only the wrapper runs: what
`available()` says, the error that names what is missing, the launch settings
and the vmap rule. With jax_triton on a CUDA GPU, value and gradient are checked
against the float64 reference on the cases of `test_softmax_kernel.py`. (The
kernels themselves also run in Triton's interpreter on torch CPU tensors; that
check needs torch and lives outside the suite.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attention as ea
from pallas import BlockSizes, flash_attention, softmax_jax_triton, softmax_mosaic_gpu
from pallas import softmax as pallas_softmax
from pallas.flash_tiles import FlashStatic
from tests import util
from tests.test_softmax_kernel import (BF16_DEFAULT_TILE_CASES, F32_CASES, case_inputs, check_bf16_default_tiles,
                                       dead_row_case)

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
# Unequal tiles: the forward and the two backward kernels walk different grids.
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16)

needs_gpu = pytest.mark.skipif(not softmax_jax_triton.available(),
                               reason="needs jax_triton, triton and a CUDA GPU")


def _static(*, t=37, s=37, group=2, blocks=SMALL, is_causal=True, has_segments=False, scale=0.25):
  return FlashStatic(scale=scale, is_causal=is_causal, has_segments=has_segments, q_len=t, kv_len=s,
                     group=group, blocks=blocks, backend="jax_triton", interpret=False)


def _fn(is_causal=False, ids=None, blocks=None, **kwargs):
  return lambda q, k, v: flash_attention(q, k, v, is_causal=is_causal, segment_ids=ids, block_sizes=blocks,
                                         backend="jax_triton", **kwargs)


def _ref(is_causal=False, ids=None, **kwargs):
  return lambda q, k, v: ea.softmax_attention_reference(q, k, v, is_causal=is_causal, segment_ids=ids, **kwargs)


# --------------------------------------------------------------------------- #
# wrapper (any machine)
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the answer off a GPU")
def test_unavailable_off_gpu():
  assert not softmax_jax_triton.available()
  assert any("CUDA GPU" in item for item in softmax_jax_triton.missing())


@pytest.mark.skipif(softmax_jax_triton.available(), reason="checks the error where the backend cannot run")
def test_flash_attention_names_what_is_missing():
  q, k, v = util.qkv(1, 8, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="backend='jax_triton'.*missing: ") as info:
    flash_attention(q, k, v, backend="jax_triton")
  for item in softmax_jax_triton.missing():
    assert item in str(info.value)


def test_default_blocks_are_the_triton_ones():
  for head_dim in (64, 128):
    assert BlockSizes.get_default("jax_triton", head_dim) == BlockSizes.get_default("triton", head_dim)


def _dims(head_dim):
  q, k, v = (jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in
             ((1, 4096, 4, head_dim), (1, 4096, 2, head_dim), (1, 4096, 2, head_dim)))
  return pallas_softmax.common.check_qkv(q, k, v)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("hopper", [True, False])
@pytest.mark.parametrize("installed", [True, False])
def test_gpu_default_backend_follows_the_measured_table(monkeypatch, head_dim, hopper, installed):
  # What a compiled GPU call picks: Mosaic GPU on Hopper where it applies, except at head
  # dim 64 where jax_triton measured ahead; jax_triton wherever installed; else Triton.
  monkeypatch.setattr(softmax_jax_triton, "available", lambda: installed)
  monkeypatch.setattr(softmax_mosaic_gpu, "_on_hopper", lambda: hopper)
  picked = pallas_softmax.default_backend(jnp.bfloat16, _dims(head_dim), "gpu", is_causal=True)
  if hopper and (head_dim == 128 or not installed):
    assert picked == "mosaic_gpu"
  else:
    assert picked == ("jax_triton" if installed else "triton")
  # Interpreted calls and CPUs take the Pallas-Triton path whatever is installed; TPUs their own.
  assert pallas_softmax.default_backend(jnp.bfloat16, _dims(head_dim), "gpu", interpret=True) == "triton"
  assert pallas_softmax.default_backend(jnp.bfloat16, _dims(head_dim), "cpu") == "triton"
  assert pallas_softmax.default_backend(jnp.bfloat16, _dims(head_dim), "tpu") == "mosaic_tpu"


def test_gpu_default_without_the_triton_lowering_asks_for_jax_triton(monkeypatch):
  monkeypatch.setattr(softmax_jax_triton, "available", lambda: False)
  monkeypatch.setattr(softmax_jax_triton, "missing", lambda: ("jax_triton",))
  monkeypatch.setattr(softmax_mosaic_gpu, "_on_hopper", lambda: False)
  monkeypatch.setattr(pallas_softmax, "triton_lowering_available", lambda: False)
  with pytest.raises(ValueError, match=r"needs jax_triton.*missing for jax_triton: jax_triton"):
    pallas_softmax.default_backend(jnp.bfloat16, _dims(128), "gpu")
  # With jax_triton there, the library keeps working without the lowering.
  monkeypatch.setattr(softmax_jax_triton, "available", lambda: True)
  assert pallas_softmax.default_backend(jnp.bfloat16, _dims(128), "gpu") == "jax_triton"


def test_this_jax_has_the_triton_lowering():
  # JAX 0.10-0.11 still ship it; the day this fails, the GPU default is jax_triton or an error.
  assert pallas_softmax.triton_lowering_available()


def test_launch_grids_shapes_and_settings():
  # Padded shapes: T=37 and S=21 to 48 and 32 (MIXED blocks), N=6 on K=3, H=16, Hv=32.
  blocks = MIXED
  static = _static(t=37, s=21, group=2, blocks=blocks, scale=0.3)
  q_shape, k_shape, v_shape = (2, 64, 6, 16), (2, 32, 3, 16), (2, 32, 3, 32)
  fwd = softmax_jax_triton.forward_launch(q_shape, k_shape, v_shape, jnp.bfloat16, static)
  assert fwd.grid == (64 // blocks.block_q, 2 * 6)
  assert [(o.shape, o.dtype) for o in fwd.outputs] == [((2, 64, 6, 32), jnp.bfloat16), ((2, 6, 64), jnp.float32)]
  assert (fwd.num_warps, fwd.num_stages) == (blocks.num_warps, blocks.num_stages)
  assert (fwd.constants["BLOCK_Q"], fwd.constants["BLOCK_K"]) == (blocks.block_q, blocks.block_k)
  assert math.isclose(fwd.constants["LOGIT_SCALE"], 0.3 * math.log2(math.e))
  assert fwd.constants["PRECISION"] == "tf32"
  assert (fwd.constants["KV_LEN"], fwd.constants["T_PAD"], fwd.constants["S_PAD"]) == (21, 64, 32)

  dq = softmax_jax_triton.dq_launch(q_shape, k_shape, v_shape, jnp.float32, static)
  assert dq.grid == (64 // blocks.block_q_dq, 2 * 6)
  assert [(o.shape, o.dtype) for o in dq.outputs] == [(q_shape, jnp.float32)]
  assert dq.constants["PRECISION"] == "ieee"  # float32 multiplies in full float32, not TF32
  assert (dq.num_warps, dq.num_stages) == (blocks.num_warps_bwd, blocks.num_stages_bwd)

  dkdv = softmax_jax_triton.dkdv_launch(q_shape, k_shape, v_shape, jnp.float32, static, kv_dtype=jnp.float16)
  assert dkdv.grid == (32 // blocks.block_k_dkv, 2 * 3)  # per key/value head: summed over the group inside
  assert [(o.shape, o.dtype) for o in dkdv.outputs] == [(k_shape, jnp.float16), (v_shape, jnp.float16)]
  assert (dkdv.constants["BLOCK_Q"], dkdv.constants["BLOCK_K"]) == (blocks.block_q_dkv, blocks.block_k_dkv)


def test_launch_errors_name_the_values():
  static = _static(blocks=SMALL)
  with pytest.raises(ValueError, match="T=40 must be a multiple of its block 16"):
    softmax_jax_triton.forward_launch((1, 40, 2, 16), (1, 48, 1, 16), (1, 48, 1, 16), jnp.float32, static)
  with pytest.raises(ValueError, match=r"num_heads=3 != num_kv_heads=1 \* group=2"):
    softmax_jax_triton.forward_launch((1, 48, 3, 16), (1, 48, 1, 16), (1, 48, 1, 16), jnp.float32, static)
  with pytest.raises(ValueError, match="batch \\* heads = 65536"):
    softmax_jax_triton.dq_launch((16384, 16, 4, 16), (16384, 16, 2, 16), (16384, 16, 2, 16), jnp.float32, static)


def test_vmappable_folds_the_vmapped_axis_into_the_batch():
  calls = []

  def fn(x, y):  # x [B, T, H], y [B, H]; row-wise, like the kernels
    calls.append(x.shape)
    return x * 2.0 + y[:, None, :], jnp.sum(x, axis=(1, 2))

  x, y = util.normal((3, 2, 5, 7)), util.normal((2, 7))
  got = jax.vmap(softmax_jax_triton.vmappable(fn), in_axes=(0, None))(x, y)
  want = jax.vmap(fn, in_axes=(0, None))(x, y)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
  assert (6, 5, 7) in calls  # called on [V * B, ...]


# --------------------------------------------------------------------------- #
# kernels (CUDA GPU with jax_triton)
# --------------------------------------------------------------------------- #


@needs_gpu
@pytest.mark.parametrize("b, t, s, n, kh, h, hv, is_causal, segments, blocks",
                         [*F32_CASES, (2, 5, 5, 4, 2, 64, 64, True, False, None)])  # + T=5, default blocks
def test_value_and_grad_f32(b, t, s, n, kh, h, hv, is_causal, segments, blocks):
  q, k, v, ids = case_inputs(b, t, s, n, kh, h, hv, segments)
  util.check_against_f64(_fn(is_causal, ids, blocks), _ref(is_causal, ids), (q, k, v), **util.TOL[jnp.float32])


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
  q, k, v = util.qkv(2, 45, 45, 4, 2, 16, dtype=dtype)
  ids = util.packed_segment_ids(2, 45, 2)
  out, _ = util.check_against_f64(_fn(True, ids, SMALL), _ref(True, ids), (q, k, v), **util.TOL[dtype])
  assert out.dtype == dtype


@needs_gpu
@pytest.mark.parametrize("h, is_causal, segments", BF16_DEFAULT_TILE_CASES)
def test_default_blocks_bf16(h, is_causal, segments):
  check_bf16_default_tiles("jax_triton", h, is_causal, segments)


@needs_gpu
def test_rows_with_nothing_to_attend_are_zero_with_zero_grad():
  q, k, v, ids = dead_row_case()
  out, _ = util.check_dead_rows(_fn(ids=ids, blocks=SMALL), q, k, v, dead=(1, 3))
  np.testing.assert_allclose(out, ea.softmax_attention_reference(q, k, v, segment_ids=ids), atol=1e-5, rtol=1e-5)


@needs_gpu
def test_scale_vmap_and_jit():
  q, k, v = util.qkv(3, 19, 19, 2, 2, 8)
  fn = jax.jit(jax.vmap(lambda q, k, v: _fn(True, blocks=SMALL, scale=0.3)(q[None], k[None], v[None])[0]))
  want = ea.softmax_attention_reference(q, k, v, is_causal=True, scale=0.3)
  np.testing.assert_allclose(fn(q, k, v), want, atol=1e-5, rtol=1e-5)
  grad = jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2))(q)
  want_grad = jax.grad(lambda q: jnp.sum(ea.softmax_attention_reference(q, k, v, is_causal=True, scale=0.3) ** 2))(q)
  np.testing.assert_allclose(grad, want_grad, atol=1e-4, rtol=1e-4)


@needs_gpu
def test_interpret_is_refused():
  q, k, v = util.qkv(1, 8, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="no interpret mode"):
    flash_attention(q, k, v, backend="jax_triton", interpret=True)
