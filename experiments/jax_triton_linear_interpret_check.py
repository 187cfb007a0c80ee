"""The jax_triton linear-attention kernels (`pallas/linear_jax_triton.py`) in Triton's interpreter, on a CPU.

`causal_linear_attention(..., backend="jax_triton")` and its gradient run end to end: the custom_vjp,
the four passes and the span sums of `pallas/linear.py`, with each launch that would go to
`jax_triton.triton_call` run instead by Triton's interpreter on torch CPU tensors (through
`jax.pure_callback`; unwritten outputs start as NaN, so a read of one shows). Output and the
gradients of phi_q, phi_k and v are compared with the float64 reference (`kernel_attention_reference`
and its `jax.vjp`): odd T not a multiple of the chunk, T below one chunk, several spans, several
column blocks, GQA / MQA, segment ids (runs starting mid-chunk, a run crossing spans, an id that
recurs), rows whose denominator is exactly 0, default tiling, vmap, f32 / bf16 / f16. A last case
runs the FAVOR+ backward's passes (features' logarithms: `times`, a key floor, row sums) against the
Pallas kernels in Pallas' interpreter. Prints max abs / relative-norm error per result and fails on a
relative error above 1e-5 (f32), 1e-2 (bf16) or 2e-3 (f16), or a dead row that is not exactly 0.

    python experiments/jax_triton_linear_interpret_check.py pytest

runs the suite's GPU tests (`tests/test_linear_jax_triton.py`) with the kernels in the interpreter.

    python experiments/jax_triton_linear_interpret_check.py compile

compiles every launch of a few GPU-sized calls (default tiles) for sm_90 with Triton's compiler
(ptxas included, no GPU needed) and prints the shared memory each asks for and the registers and
stack (spilled registers) per thread of its machine code, beside the same figures for the Pallas
kernels of the same call (their Triton IR from JAX's Pallas lowering for CUDA, compiled the same way).

Needs torch (CPU) and triton 3.6 beside jax, outside the project's own environment, e.g.

    python3.11 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch triton==3.6.0 "numpy<2.4" jax==0.10.2 \\
        flax optax chex pytest  # the last four for `pytest` only
    TRITON_INTERPRET=1 PYTHONPATH=. JAX_PLATFORMS=cpu /tmp/tvenv/bin/python -W ignore \\
        experiments/jax_triton_linear_interpret_check.py [name filter | compile | pytest]

(Triton 3.6's interpreter wants numpy < 2.4 for tensor loop bounds, multiplies bf16 tiles as their
raw bits, truncates float32 to bf16 and casts bools to bf16 as raw bits: this script widens bf16
tiles to float32 in the interpreter's `create_dot` and casts to bf16 through float32 with rounding to
nearest even, as the GPU does.)
"""
import os, sys, time
COMPILE = sys.argv[1:] == ["compile"]
PYTEST = sys.argv[1:] == ["pytest"]
if COMPILE:
  os.environ.pop("TRITON_INTERPRET", None)  # compiles, runs nothing
else:
  os.environ["TRITON_INTERPRET"] = "1"
import ml_dtypes
import numpy as np
import torch
import triton
import triton.language as tl

if not COMPILE:
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

  # It also casts float32 to bf16 by truncation (the GPU rounds to nearest even) and
  # bools / ints to bf16 as raw bits: cast to bf16 through float32, rounding to nearest even.
  _orig_cast = interp.InterpreterBuilder.cast_impl
  def _cast(self, src, dst_type):
    if dst_type.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
      data = src.data.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
      return interp.TensorHandle(data, tl.bfloat16)
    return _orig_cast(self, src, dst_type)
  interp.InterpreterBuilder.cast_impl = _cast

import jax, jax.numpy as jnp
from pallas import common
from pallas import linear as la
from pallas import linear_jax_triton as ljt
from pallas.linear import LinearBlockSizes, causal_linear_attention, kernel_attention_reference
from pallas.tiling import pad_to

TORCH = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
         jnp.dtype(jnp.int32): torch.int32, jnp.dtype(jnp.float16): torch.float16}

def to_torch(x):
  x = np.asarray(x)
  if x.dtype == jnp.bfloat16:
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.array(x))

def interpreted(launch, *inputs):
  """`linear_jax_triton.call_launch` in Triton's interpreter: the launch on torch CPU tensors."""
  def host(*arrays):
    outs = [torch.full(o.shape, float("nan"), dtype=TORCH[jnp.dtype(o.dtype)]) for o in launch.outputs]
    launch.kernel[launch.grid](*[to_torch(x) for x in arrays], *outs, num_warps=launch.num_warps,
                               num_stages=launch.num_stages, **launch.constants)
    return tuple(np.asarray(o.float().numpy()).astype(jnp.dtype(s.dtype)) for o, s in zip(outs, launch.outputs))
  return jax.pure_callback(host, tuple(launch.outputs), *inputs)

ljt.call_launch = interpreted
ljt.missing = lambda: ()  # the interpreter stands in for jax_triton and the GPU

def features(shape, dtype, rng):
  return jnp.asarray(np.log1p(np.exp(rng.standard_normal(shape))), jnp.float32).astype(dtype)

def case(name, b, t, n, kh, m, hv, dtype, blocks=None, segments=None, dead=False, vmap=False, seed=0):
  rng = np.random.default_rng(seed)
  q, k = features((b, t, n, m), dtype, rng), features((b, t, kh, m), dtype, rng)
  v = jnp.asarray(rng.standard_normal((b, t, kh, hv)), dtype)
  g = jnp.asarray(rng.standard_normal((b, t, n, hv)), dtype)
  ids = None
  if segments == "packed":
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32))
  elif segments == "recurring":
    ids = np.zeros((b, t), np.int32)
    ids[0, 5:60], ids[0, 60:] = 1, 0  # 0 recurs after 1: a new run
    ids[-1, 17:18], ids[-1, 18:] = 2, 3
    ids = jnp.asarray(ids)
  dead_rows = []
  if dead:
    # Batch 0's first two keys are 0: rows 0 and 1 see nothing (den == 0); a zero query row too.
    k = k.at[0, :2].set(0)
    q = q.at[b - 1, t // 2, 0].set(0)
    dead_rows = [(0, 0, slice(None)), (0, 1, slice(None)), (b - 1, t // 2, 0)]
  fn = lambda q, k, v: causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=blocks, backend="jax_triton")
  if vmap:
    one = fn
    fn = lambda q, k, v: jax.vmap(lambda q, k, v: one(q[None], k[None], v[None])[0])(q, k, v)
  t0 = time.time()
  out, pull = jax.vjp(jax.jit(fn), q, k, v)
  grads = pull(g)
  secs = time.time() - t0
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64))
    ref = lambda q, k, v: kernel_attention_reference(q, k, v, is_causal=True, segment_ids=ids)
    want, pull64 = jax.vjp(ref, f64(q), f64(k), f64(v))
    want = [np.asarray(want)] + [np.asarray(x) for x in pull64(f64(g))]
  got = [np.asarray(x.astype(jnp.float32), np.float64) for x in (out, *grads)]
  # The same call on the Pallas kernels (Pallas' interpreter): the largest relative-norm difference.
  pallas = lambda q, k, v: causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=blocks, interpret=True)
  p_out, p_pull = jax.vjp(jax.jit(pallas), q, k, v)
  vs_pallas = max(np.linalg.norm(x - np.asarray(y.astype(jnp.float32), np.float64)) / max(np.linalg.norm(x), 1e-30)
                  for x, y in zip(got, (p_out, *p_pull(g))))
  bound = {jnp.dtype(f32): 1e-5, jnp.dtype(bf16): 1e-2, jnp.dtype(f16): 2e-3}[jnp.dtype(dtype)]
  errs = []
  for nm, x, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.shape == w.shape, (name, nm, x.shape, w.shape)
    assert np.all(np.isfinite(x)), (name, nm, "not finite")
    err = np.max(np.abs(x - w))
    rel = np.linalg.norm(x - w) / max(np.linalg.norm(w), 1e-30)
    errs.append(f"{nm} {err:.1e}/{rel:.0e}")
    assert rel <= bound, (name, nm, rel)
  extra = ""
  for row in dead_rows:
    assert np.all(got[0][row] == 0) and np.all(got[1][row] == 0), (name, "dead row", row)
  if dead_rows:
    extra = f" dead rows: out, dq exactly 0 ({len(dead_rows)})"
  static = la.prepare(common.check_qkv(q, k, v), m, dtype, ids, blocks or LinearBlockSizes(), False)[0]
  tiles = f"C{static.chunk} P{static.spans}"
  print(f"{name:34s} {tiles:8s} {' | '.join(errs)} | vs Pallas {vs_pallas:.0e} ({secs:.1f}s){extra}", flush=True)
  return max(float(e.split("/")[1]) for e in errs)

def favor_passes(dtype=jnp.float32, seed=1):
  """The FAVOR+ backward's passes (times, floor, times_sum, transposed sums) against Pallas' interpreter."""
  rng = np.random.default_rng(seed)
  b, t, n, kh, m, hv = 2, 45, 4, 2, 16, 16
  q, k = features((b, t, n, m), dtype, rng), features((b, t, kh, m), dtype, rng)
  k = k.at[:, ::3].multiply(1e-3)  # some keys at or below the floor
  v = jnp.asarray(rng.standard_normal((b, t, kh, hv)), dtype)
  g = jnp.asarray(rng.standard_normal((b, t, n, hv)), dtype)
  ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32))
  blocks = LinearBlockSizes(chunk=16, span_chunks=1)
  dims = common.check_qkv(q, k, v)
  results = []
  t0 = time.time()
  for backend, interpret in (("jax_triton", False), ("triton", True)):
    static, t_pad, labels = la.prepare(dims, m, dtype, ids, blocks, interpret, backend=backend)
    qp, kp, vp, gp = (pad_to(x, t_pad, x.shape[3]) for x in (q, k, v, g))
    out, rows, sums = la.forward(qp, kp, vp, labels, static)
    results.append(la.backward(static, qp, kp, vp, labels, sums, *la.num_den_cotangents(gp, out, *rows),
                               key_floor=0.05))
  errs = []
  for nm, x, w in zip(("dq*q", "dk*k", "dv", "k_sums"), *results):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    rel = np.linalg.norm(x - w) / max(np.linalg.norm(w), 1e-30)
    errs.append(f"{nm} {np.max(np.abs(x - w)):.1e}/{rel:.0e}")
    assert rel <= 1e-5, (nm, rel)
  print(f"{'favor passes vs Pallas, seg f32':34s} {'C16 P3':8s} {' | '.join(errs)} ({time.time() - t0:.1f}s)",
        flush=True)

f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
C16 = LinearBlockSizes(chunk=16, span_chunks=1)
C16S2 = LinearBlockSizes(chunk=16, block_c=16, span_chunks=2)
CASES = {
  # name: (b, t, n, kh, m, hv, dtype, blocks, options)
  "T37 GQA f32 M5 Hv7": (2, 37, 4, 2, 5, 7, f32, C16, {}),
  "T5<chunk GQA f32 default tiles": (2, 5, 4, 2, 16, 16, f32, None, {}),
  "T77 recurring ids MQA f32 J2": (2, 77, 2, 1, 16, 32, f32, C16S2, {"segments": "recurring"}),
  "T37 packed seg GQA f32 dead rows": (2, 37, 4, 2, 8, 8, f32, C16, {"segments": "packed", "dead": True}),
  "T48 one span f32 vmap": (3, 48, 2, 2, 16, 16, f32, LinearBlockSizes(chunk=16, span_chunks=8), {"vmap": True}),
  "T41 packed seg GQA bf16": (2, 41, 4, 2, 16, 16, bf16, C16S2, {"segments": "packed"}),
  "T45 packed seg MQA f16 dead rows": (2, 45, 4, 1, 16, 16, f16, C16, {"segments": "packed", "dead": True}),
  "T300 seg bf16 default tiles": (1, 300, 2, 1, 16, 16, bf16, None, {"segments": "packed"}),
  "T200 M64 Hv64 f32 default tiles": (1, 200, 2, 2, 64, 64, f32, None, {}),
}

# --------------------------------------------------------------------------- #
# sm_90 compile
# --------------------------------------------------------------------------- #

TRITON_TYPE = {jnp.dtype(jnp.float32): "fp32", jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "fp16",
               jnp.dtype(jnp.int32): "i32"}

def launches_of(b, t, n, kh, m, hv, dtype, blocks=None, segments=False):
  """Every launch (with its inputs' dtypes) of one forward + backward, traced, not run."""
  seen = []
  def record(launch, *inputs):
    seen.append((launch, tuple(jnp.dtype(x.dtype) for x in inputs)))
    return tuple(jnp.zeros(o.shape, o.dtype) for o in launch.outputs)
  ljt.call_launch = record
  ljt.missing = lambda: ()
  spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
  def loss(q, k, v, ids):
    return jnp.sum(causal_linear_attention(q, k, v, segment_ids=ids, block_sizes=blocks, backend="jax_triton",
                                           interpret=False).astype(jnp.float32))
  jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), spec(b, t, n, m), spec(b, t, kh, m), spec(b, t, kh, hv), ids)
  return seen

def _sm90(src, num_warps, num_stages):
  """Shared memory (bytes), registers and stack bytes per thread of `src` compiled for sm_90."""
  import subprocess, tempfile
  import triton.knobs as knobs
  from triton.backends.compiler import GPUTarget
  compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.cubin")
    open(path, "wb").write(compiled.asm["cubin"])
    usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], capture_output=True,
                           text=True, check=True).stdout
  fields = dict(item.split(":") for item in usage.split("Function", 1)[1].split("\n")[1].split())
  return compiled.metadata.shared, int(fields["REG"]), int(fields["STACK"])

def compile_launch(launch, dtypes):
  from triton.compiler import ASTSource
  arrays = launch.kernel.arg_names[: len(launch.inputs) + len(launch.outputs)]
  signature = {name: "*" + TRITON_TYPE[jnp.dtype(d)] for name, d in
               zip(arrays, dtypes + tuple(jnp.dtype(o.dtype) for o in launch.outputs))}
  signature.update({name: "constexpr" for name in launch.constants})
  # jax_triton specializes every array argument as 16-byte aligned (XLA's buffers are).
  aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(arrays))}
  src = ASTSource(fn=launch.kernel, signature=signature, constexprs=dict(launch.constants), attrs=aligned)
  return _sm90(src, launch.num_warps, launch.num_stages)

def pallas_kernels(b, t, n, kh, m, hv, dtype, segments=False):
  """{name: (Triton IR, num_warps, num_stages)} of the Pallas kernels of one forward + backward,
  lowered for CUDA on the CPU (through JAX's internal Pallas-Triton lowering, for comparison)."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  kernels, modules = {}, []
  lower, custom_call = reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call
  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result
  def named(*args, backend_config=None, **kwargs):
    if backend_config and "num_warps" in backend_config:
      value = lambda key: str(backend_config[key]).split(":")[0].strip().strip('"')
      kernels[value("name")] = (modules[-1], int(value("num_warps")), int(value("num_stages")))
    return custom_call(*args, backend_config=backend_config, **kwargs)
  reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call = capture, named
  try:
    spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
    loss = lambda q, k, v, ids: jnp.sum(causal_linear_attention(q, k, v, segment_ids=ids, interpret=False)
                                        .astype(jnp.float32))
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec(b, t, n, m), spec(b, t, kh, m), spec(b, t, kh, hv),
                                                      ids).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module, reg.mlir.custom_call = lower, custom_call
  return kernels

def compile_ttir(text, num_warps, num_stages):
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.ttir")
    open(path, "w").write(text)
    return _sm90(path, num_warps, num_stages)

COMPILE_CASES = {
  # name: (b, t, n, kh, m, hv, dtype, segments): default tiles
  "B1 N8 T4096 M128 Hv64 bf16": (1, 4096, 8, 8, 128, 64, bf16, False),
  "B1 N8 T4096 M256 Hv128 bf16 seg": (1, 4096, 8, 8, 256, 128, bf16, True),
  "B2 N8 K2 T1000 M64 Hv64 f32 seg": (2, 1000, 8, 2, 64, 64, f32, True),
}

def compile_all():
  print(f"{'call':32s} {'kernel (tiles)':36s} warps stages | jax_triton: smem KB  regs  stack B | "
        f"Pallas-Triton: smem KB  regs  stack B", flush=True)
  for name, args in COMPILE_CASES.items():
    try:
      pallas = pallas_kernels(*args)
    except Exception as e:  # JAX internals moved: compile ours alone
      print(f"(no Pallas lowering to compare: {type(e).__name__}: {e})")
      pallas = {}
    for launch, dtypes in launches_of(*args[:7], segments=args[7]):
      shared, regs, stack = compile_launch(launch, dtypes)
      assert shared <= 227 * 1024, (name, launch.name, shared)
      kernel = launch.name.removesuffix("_jax_triton")
      ref = "-"
      if kernel in pallas:
        try:
          p_shared, p_regs, p_stack = compile_ttir(*pallas[kernel])
          ref = f"{p_shared / 1024:8.1f} {p_regs:5d} {p_stack:8d}"
        except Exception as e:
          ref = f"failed: {str(e).splitlines()[0][:60]}"
      c = launch.constants
      tiles = f"{kernel.removeprefix('linear_attention_')} (C{c['CHUNK']} D{c['D']} bc{c['BLOCK_C']})"
      print(f"{name:32s} {tiles:36s} {launch.num_warps:5d} {launch.num_stages:6d} | "
            f"{shared / 1024:19.1f} {regs:5d} {stack:8d} | {ref:>37s}", flush=True)

if __name__ == "__main__":
  if COMPILE:
    compile_all()
    sys.exit()
  if PYTEST:
    import pytest
    ljt.available = lambda: True  # the GPU tests run (the interpreter stands in)
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs", "-k", "not unavailable_off_gpu",
                          "tests/test_linear_jax_triton.py"]))
  only = sys.argv[1:]
  print(f"{'case':34s} {'tiles':8s} max abs / relative-norm error vs float64 (out, dq, dk, dv); "
        "largest relative-norm difference from the Pallas kernels", flush=True)
  for name, (b, t, n, kh, m, hv, dtype, blocks, opts) in CASES.items():
    if only and not any(o in name for o in only):
      continue
    case(name, b, t, n, kh, m, hv, dtype, blocks, **opts)
  if not only or any(o in "favor" for o in only):
    favor_passes()
