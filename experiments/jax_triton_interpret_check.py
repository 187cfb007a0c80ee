"""The jax_triton flash kernels (`pallas/softmax_jax_triton.py`) in Triton's interpreter, on a CPU.

Launches the three `@triton.jit` kernels with the arguments `forward_launch` / `dq_launch` /
`dkdv_launch` give `jax_triton.triton_call`, on torch CPU tensors, and compares output, lse, dQ,
dK and dV with a float64 numpy reference: odd lengths, T != S, causal, GQA / MQA, segment ids, a
query row that sees no key, head dims padded, f32 / bf16 / f16. Prints the max abs / relative-norm
error per case and fails on a relative error above 1e-5 (f32) or 2e-2 (16-bit), or a misplaced inf.

Needs torch (CPU) and triton 3.6 beside jax, outside the project's own environment, e.g.

    python3.11 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch triton==3.6.0 "numpy<2.4" jax==0.10.2
    TRITON_INTERPRET=1 PYTHONPATH=. JAX_PLATFORMS=cpu /tmp/tvenv/bin/python experiments/jax_triton_interpret_check.py [name filter]

(Triton 3.6's interpreter wants numpy < 2.4 for tensor loop bounds, and multiplies bf16 tiles as
their raw bits: this script widens them to float32 in the interpreter's `create_dot`.)
"""
import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as interp

# Triton 3.6's interpreter multiplies bf16 tiles as their uint16 bit patterns
# (create_dot calls np.matmul on the raw storage): widen bf16 operands to f32
# first, which is what a bf16 MMA with f32 accumulation computes.
_orig_dot = interp.InterpreterBuilder.create_dot
def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
  def widen(x):
    if x.dtype == tl.bfloat16:
      return interp.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
    return x
  return _orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)
interp.InterpreterBuilder.create_dot = _dot

import jax, jax.numpy as jnp
from pallas import common
from pallas.softmax import BlockSizes
from pallas.flash_tiles import FlashStatic, pad_inputs, output_delta
from pallas import softmax_jax_triton as jt
from pallas.tiling import matmul_precision

TORCH = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
         jnp.dtype(jnp.int32): torch.int32, jnp.dtype(jnp.float16): torch.float16}

def to_torch(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(torch.bfloat16)
  return torch.from_numpy(np.array(x))

def to_np(t):
  return t.float().numpy().astype(np.float64) if t.dtype != torch.int32 else t.numpy()

def run(launch, *inputs):
  outs = [torch.empty(o.shape, dtype=TORCH[jnp.dtype(o.dtype)]) for o in launch.outputs]
  launch.kernel[launch.grid](*[to_torch(x) for x in inputs], *outs, num_warps=launch.num_warps,
                             num_stages=launch.num_stages, **launch.constants)
  return outs

def reference(q, k, v, do, is_causal, ids, scale):
  b, t, n, h = q.shape; s, kh = k.shape[1], k.shape[2]; g = n // kh
  kr, vr = np.repeat(k, g, 2), np.repeat(v, g, 2)
  logits = np.einsum("btnh,bsnh->bnts", q, kr) * scale
  live = np.ones((b, 1, t, s), bool)
  if is_causal:
    live &= (np.arange(s)[None, :] <= np.arange(t)[:, None])[None, None]
  if ids is not None:
    live &= (ids[0][:, None, :, None] == ids[1][:, None, None, :])
  logits = np.where(live, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True); m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(live, np.exp(logits - m), 0.0); l = p.sum(-1, keepdims=True)
  dead = l == 0
  P = p / np.where(dead, 1, l)
  out = np.einsum("bnts,bsnh->btnh", P, vr)
  lse = np.where(dead[..., 0], np.inf, (m + np.log(np.where(dead, 1, l)))[..., 0] / np.log(2))
  dP = np.einsum("btnh,bsnh->bnts", do, vr)
  dS = P * (dP - np.sum(dP * P, -1, keepdims=True))
  dq = np.einsum("bnts,bsnh->btnh", dS, kr) * scale
  dk = np.einsum("bnts,btnh->bsnh", dS, q).reshape(b, s, kh, g, h).sum(3) * scale
  dv = np.einsum("bnts,btnh->bsnh", P, do).reshape(b, s, kh, g, v.shape[3]).sum(3)
  return out, lse, dq, dk, dv

def case(name, b, t, s, n, kh, h, is_causal, segments, dtype, blocks, dead_row=False, hv=None, seed=0):
  hv = hv or h
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, hv)), dtype)
  do = jnp.asarray(rng.standard_normal((b, t, n, hv)), dtype)
  ids = None
  if segments:
    q_ids = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    kv_ids = np.sort(rng.integers(0, 3, (b, s)), axis=1).astype(np.int32)
    if dead_row:
      q_ids[0, min(3, t - 1)] = 99
    ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
  dims = common.check_qkv(q, k, v)
  scale = h ** -0.5
  blocks = blocks.clamp(t, s)
  static = FlashStatic(scale=scale, is_causal=is_causal, has_segments=ids is not None, q_len=t, kv_len=s,
                       group=n // kh, blocks=blocks, backend="jax_triton", interpret=False,
                       precision=matmul_precision(q.dtype))
  qp, kp, vp, q_ids_p, kv_ids_p = pad_inputs(q, k, v, ids, dims, blocks)
  qi, ki = jt.with_placeholder_ids((q_ids_p, kv_ids_p) if ids is not None else ())
  t0 = time.time()
  out, lse = run(jt.forward_launch(qp.shape, kp.shape, vp.shape, qp.dtype, static), qp, kp, vp, qi, ki)
  out_j = jnp.asarray(to_np(out), jnp.float32).astype(dtype)
  dop = jnp.zeros(out.shape, dtype).at[:, :t, :, :hv].set(do)
  delta = output_delta(out_j, dop)
  lse_j = jnp.asarray(lse.numpy())
  args = (qp, kp, vp, dop, lse_j, delta, qi, ki)
  (dq,) = run(jt.dq_launch(qp.shape, kp.shape, vp.shape, qp.dtype, static), *args)
  dk, dv = run(jt.dkdv_launch(qp.shape, kp.shape, vp.shape, qp.dtype, static, kv_dtype=kp.dtype), *args)
  secs = time.time() - t0
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  want = reference(f64(q), f64(k), f64(v), f64(do), is_causal, None if ids is None else tuple(map(np.asarray, ids)), scale)
  got = (to_np(out)[:, :t, :, :hv], to_np(lse)[:, :, :t], to_np(dq)[:, :t, :, :h], to_np(dk)[:, :s, :, :h],
         to_np(dv)[:, :s, :, :hv])
  errs = []
  for nm, g_, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert g_.shape == w.shape, (nm, g_.shape, w.shape)
    inf_ok = np.array_equal(np.isinf(g_), np.isinf(w))
    fin = np.isfinite(w)
    err = np.max(np.abs(np.where(fin, g_ - w, 0.0))) if fin.any() else 0.0
    rel = np.linalg.norm(np.where(fin, g_ - w, 0)) / max(np.linalg.norm(np.where(fin, w, 0)), 1e-30)
    errs.append(f"{nm} {err:.1e}/{rel:.0e}" + ("" if inf_ok else " INF-MISMATCH"))
    assert np.all(np.isfinite(g_) | np.isinf(w)), nm
    assert inf_ok, (name, nm, "inf where the reference has none, or the reverse")
    assert rel <= (1e-5 if dtype == jnp.float32 else 2e-2), (name, nm, rel)
  extra = ""
  if dead_row:
    r = min(3, t - 1)
    extra = f" dead-row out={np.abs(got[0][0, r]).max():.0e} dq={np.abs(got[2][0, r]).max():.0e} lse={got[1][0, :, r]}"
  print(f"{name:38s} {' | '.join(errs)} ({secs:.1f}s){extra}", flush=True)

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32, block_k_dkv=16)
B32 = BlockSizes(block_q=32, block_k=32, block_q_dq=32, block_k_dq=32, block_q_dkv=32, block_k_dkv=32)
f32, bf16 = jnp.float32, jnp.bfloat16
CASES = {
  "T37 causal GQA f32 H32 SMALL": (2, 37, 37, 4, 2, 32, True, False, f32, SMALL),
  "T37 noncausal GQA f32 H64 MIXED": (1, 37, 37, 4, 2, 64, False, False, f32, MIXED),
  "T5 causal f32 H32": (2, 5, 5, 4, 2, 32, True, False, f32, SMALL),
  "T5 S37 noncausal f32 H64": (1, 5, 37, 4, 2, 64, False, False, f32, B32),
  "T37 causal seg GQA f32 H32 MIXED": (2, 37, 37, 4, 2, 32, True, True, f32, MIXED),
  "T37 seg dead-row f32 H64": (2, 37, 37, 4, 2, 64, False, True, f32, SMALL),
  "T48 S21 causal f32 H32 MIXED": (1, 48, 21, 2, 2, 32, True, False, f32, MIXED),
  "T37 causal GQA bf16 H64": (2, 37, 37, 4, 2, 64, True, False, bf16, SMALL),
  "T37 seg causal bf16 H32 B32": (1, 37, 37, 4, 2, 32, True, True, bf16, B32),
  "T29 S45 H5->16 Hv7 f32": (1, 29, 45, 3, 3, 5, False, False, f32, SMALL),
  "T45 seg causal MQA f16 H64": (2, 45, 45, 4, 1, 64, True, True, jnp.float16, SMALL),
  "T33 seg MQA f32 H32 B32": (2, 33, 33, 2, 1, 32, False, True, f32, B32),
}
if __name__ == "__main__":
  only = sys.argv[1:]
  for name, args in CASES.items():
    if only and not any(o in name for o in only):
      continue
    kw = {}
    if "dead-row" in name: kw["dead_row"] = True
    if "Hv7" in name: kw["hv"] = 7
    case(name, *args, **kw)
