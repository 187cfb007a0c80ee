"""Checks and times the Mosaic GPU flash attention (forward, backward) against cuDNN and Triton (Hopper).

Run from the repository root on a Hopper GPU:

  PYTHONPATH=. python3 experiments/mgpu_check.py [--parts check,variants,bench,bwd] [--out DIR]

  check     correctness of `flash_attention(..., backend="mosaic_gpu")`: against the
            fp32 reference (T <= 4096) or the Triton backend (longer T), lse against the
            Triton forward, odd lengths, GQA, f16, padded head dims, segment ids (with a
            fully masked row: output 0, lse +inf), and a gradient through the mosaic_gpu
            backward. `--quick` skips the B/T/H/causal matrix.
  variants  forward time and error of named `KernelConfig`s (`variant_configs`) beside
            cuDNN and Triton, on `--variant-shapes`.
  bench     forward TFLOP/s of mosaic_gpu, cuDNN and Triton side by side (`--bench-shapes`).
  bwd_variants  forward+backward time of named `BackwardConfig`s (`bwd_variant_configs`)
            on `--bwd-variant-shapes`.
  bwd       backward: dq/dk/dv of the Mosaic GPU backward (and, for reference, of the
            Triton backward) against jax.grad of the fp32 reference (causal or not, odd T,
            GQA, segment ids with a query row that sees no key: zero dq), then forward+
            backward time (jax.vjp) of mosaic fwd + mosaic bwd, mosaic fwd + Triton bwd,
            cuDNN, and the mosaic forward alone, on `--bwd-shapes`; TFLOP/s of fwd+bwd =
            3.5 * 4 B N T^2 H (halved for causal). `--bwd-checks 0` skips the checks,
            `--bwd-checks 2` runs two of them.
  dump      one compile of `--dump variant:H:causal` (run with MOSAIC_GPU_DUMP_PTXAS=1 or
            MOSAIC_GPU_DUMP_PTX=1 to read the compiler's report).

Times are medians of `--samples` (20) samples, each the mean of >= `--inner` back-to-back
calls (more for short calls, so a sample lasts >= 10 ms) between two `block_until_ready`s,
after `--warmup` calls. TFLOP/s = 4 B N T S H / time, halved for causal. Writes
`mgpu_check.json` under `--out` (default $OUT or .). XLA_FLAGS=--xla_gpu_autotune_level=0
shortens the reference compiles of the check part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas import common
from pallas import softmax as fa
from pallas import softmax_mosaic_gpu as mg
from pallas.flash_tiles import FlashStatic

RESULTS: dict = {"checks": [], "variants": [], "bench": [], "bwd": [], "errors": []}
T0 = time.perf_counter()


def log(*args):
  print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def rel_err(x, ref) -> float:
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def rand_qkv(key, b, t, s, n, kh, h, dtype=jnp.bfloat16):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, kh, h), jnp.float32).astype(dtype)
  return q, k, v


def record_check(name, err, tol, **info):
  ok = bool(np.isfinite(err) and err <= tol)
  RESULTS["checks"].append({"name": name, "err": err, "tol": tol, "ok": ok, **info})
  log(f"{'PASS' if ok else 'FAIL'} {name}: err={err:.2e} (tol {tol:.0e})")
  return ok


def guarded(name, fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - keep going, report at the end
    msg = f"{name}: {type(e).__name__}: {e}"
    RESULTS["errors"].append(msg[:4000])
    log("ERROR", msg[:2000])
    traceback.print_exc(limit=4)


def mosaic(q, k, v, **kw):
  return fa.flash_attention(q, k, v, backend="mosaic_gpu", **kw)


def triton(q, k, v, **kw):
  return fa.flash_attention(q, k, v, backend="triton", **kw)


def reference(q, k, v, **kw):
  """The float32 reference, in q's dtype."""
  f32 = (x.astype(jnp.float32) for x in (q, k, v))
  return fa.softmax_attention_reference(*f32, **kw).astype(q.dtype)


# --------------------------------------------------------------------------- #
# correctness
# --------------------------------------------------------------------------- #


def check_part(args):
  key = jax.random.key(args.seed)
  dims_probe = common.Dims(1, 4096, 4096, 8, 8, 128, 128)
  log("applies(bf16, H=128):", mg.applies(jnp.bfloat16, dims_probe, is_causal=True, has_segments=True),
      "default backend:", fa.default_backend(jnp.bfloat16, dims_probe))

  cases = []
  for t in () if args.quick else (1024, 4096, 8192, 16384):
    for h in (64, 128):
      for causal in (False, True):
        b, n = (2, 8) if t <= 4096 else (1, 16)
        cases.append((b, t, n, h, causal))
  for b, t, n, h, causal in cases:
    key, sub = jax.random.split(key)

    def one(b=b, t=t, n=n, h=h, causal=causal, sub=sub):
      log(f"running fwd B={b} T={t} N={n} H={h} causal={causal}")
      q, k, v = rand_qkv(sub, b, t, t, n, n, h)
      out = jax.jit(lambda q, k, v: mosaic(q, k, v, is_causal=causal))(q, k, v)
      if t <= 4096:
        ref = jax.jit(lambda q, k, v: reference(q, k, v, is_causal=causal))(q, k, v)
        against = "reference"
      else:
        ref = jax.jit(lambda q, k, v: triton(q, k, v, is_causal=causal))(q, k, v)
        against = "triton"
      record_check(f"fwd B={b} T={t} N={n} H={h} causal={causal} vs {against}", rel_err(out, ref), 1e-2)

    guarded(f"fwd {b} {t} {n} {h} {causal}", one)

  def lse_check():
    q, k, v = rand_qkv(jax.random.key(7), 1, 2048, 2048, 8, 8, 128)
    for causal in (False, True):
      outs = {}
      for backend in ("mosaic_gpu", "triton"):
        blocks = fa.BlockSizes.get_default(backend, 128).clamp(2048, 2048)
        static = FlashStatic(scale=128 ** -0.5, is_causal=causal, has_segments=False, q_len=2048,
                            kv_len=2048, group=1, blocks=blocks, backend=backend, interpret=False)
        outs[backend] = jax.jit(lambda q, k, v, s=static: fa.forward(q, k, v, None, None, s))(q, k, v)
      lse_m, lse_t = outs["mosaic_gpu"][1], outs["triton"][1]
      err = float(jnp.max(jnp.abs(lse_m - lse_t)))
      record_check(f"lse vs triton causal={causal} (max abs, base 2)", err, 1e-2)

  guarded("lse", lse_check)

  def odd_gqa_segments():
    # Odd lengths (padding), GQA, S != T.
    q, k, v = rand_qkv(jax.random.key(3), 2, 1000, 1000, 16, 4, 128)
    mosaic_j = jax.jit(mosaic, static_argnames=("is_causal",))
    ref_j = jax.jit(reference, static_argnames=("is_causal",))
    for causal in (False, True):
      out = mosaic_j(q, k, v, is_causal=causal)
      ref = ref_j(q, k, v, is_causal=causal)
      record_check(f"odd T=1000 GQA 16/4 causal={causal}", rel_err(out, ref), 1e-2)
    q, k, v = rand_qkv(jax.random.key(14), 1, 1000, 1000, 8, 8, 128, dtype=jnp.float16)
    out = mosaic_j(q, k, v, is_causal=True)
    ref = ref_j(q, k, v, is_causal=True)
    record_check("f16 T=1000 causal", rel_err(out, ref), 1e-2)
    q, k, v = rand_qkv(jax.random.key(4), 1, 777, 1531, 8, 2, 64)
    out = mosaic_j(q, k, v)
    ref = ref_j(q, k, v)
    record_check("T=777 S=1531 GQA 8/2 H=64", rel_err(out, ref), 1e-2)
    # Head dims the wrapper pads (80 -> 128, 40 -> 64) and a v head dim that differs.
    q, k, v = rand_qkv(jax.random.key(5), 1, 640, 640, 4, 4, 80)
    out = mosaic_j(q, k, v, is_causal=True)
    ref = ref_j(q, k, v, is_causal=True)
    record_check("H=80 causal", rel_err(out, ref), 1e-2)
    # Segment ids with a query whose segment has no keys (row must be 0).
    b, t = 2, 1536
    q, k, v = rand_qkv(jax.random.key(6), b, t, t, 8, 8, 128)
    ids = jnp.concatenate([jnp.zeros((b, 500), jnp.int32), jnp.ones((b, 700), jnp.int32),
                           2 * jnp.ones((b, t - 1200), jnp.int32)], axis=1)
    kv_ids = ids.at[:, 1200:].set(5)  # segment 2 has queries but no keys
    for causal in (False, True):
      out = mosaic_j(q, k, v, is_causal=causal, segment_ids=(ids, kv_ids))
      ref = ref_j(q, k, v, is_causal=causal, segment_ids=(ids, kv_ids))
      record_check(f"segments causal={causal}", rel_err(out[:, :1200], ref[:, :1200]), 1e-2)
      dead = float(jnp.max(jnp.abs(out[:, 1200:].astype(jnp.float32))))
      record_check(f"segments dead rows are 0 causal={causal}", dead, 0.0)
    # Dead rows' lse is +inf.
    blocks = fa.BlockSizes.get_default("mosaic_gpu", 128).clamp(t, t)
    static = FlashStatic(scale=128 ** -0.5, is_causal=False, has_segments=True, q_len=t, kv_len=t,
                        group=1, blocks=blocks, backend="mosaic_gpu", interpret=False)
    _, lse = jax.jit(lambda *a: fa.forward(*a, static))(q, k, v, ids, kv_ids)
    record_check("segments dead rows lse=+inf", float(jnp.sum(~jnp.isposinf(lse[:, :, 1200:]))), 0.0)
    record_check("segments live rows lse finite", float(jnp.sum(~jnp.isfinite(lse[:, :, :1200]))), 0.0)

  guarded("odd/gqa/segments", odd_gqa_segments)

  def grad_check():
    q, k, v = rand_qkv(jax.random.key(8), 1, 640, 640, 4, 2, 64)
    g = jax.random.normal(jax.random.key(9), q.shape, jnp.float32).astype(q.dtype)
    for causal in (False, True):
      def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
      got = jax.jit(jax.grad(lambda q, k, v: loss(lambda *a: mosaic(*a, is_causal=causal), q, k, v),
                             (0, 1, 2)))(q, k, v)
      ref = jax.jit(jax.grad(lambda q, k, v: loss(
          lambda *a: reference(*a, is_causal=causal), q, k, v), (0, 1, 2)))(
              q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
      for name, x, r in zip("qkv", got, ref):
        record_check(f"grad d{name} causal={causal}", rel_err(x, r), 2e-2)

  guarded("grad", grad_check)


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #


WARMUP = 10


def time_fn(fn, *args, samples=20, inner=5, warmup=None, min_sample_s=0.01):
  """Median seconds per call of `fn(*args)` and the relative spread of the samples.

  Each sample runs at least `inner` calls back to back, more for short calls so
  that a sample lasts about `min_sample_s`.
  """
  warmup = WARMUP if warmup is None else warmup
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(3):
    out = fn(*args)
  jax.block_until_ready(out)
  per_call = (time.perf_counter() - start) / 3
  inner = max(inner, min(100, int(min_sample_s / max(per_call, 1e-6)) + 1))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times), statistics.pstdev(times) / statistics.median(times)


def flops(b, t, n, h, causal):
  f = 4.0 * b * n * t * t * h
  return f / 2 if causal else f


def static_for(t, h, causal, group=1, blocks=None):
  blocks = (blocks or fa.BlockSizes.get_default("mosaic_gpu", h)).clamp(t, t)
  return FlashStatic(scale=h ** -0.5, is_causal=causal, has_segments=False, q_len=t, kv_len=t,
                    group=group, blocks=blocks, backend="mosaic_gpu", interpret=False)


def variants_part(args):
  shapes = [tuple(int(x) for x in spec.split(":")) for spec in args.variant_shapes.split(",")]
  wanted = args.variants.split(",") if args.variants else None
  for b, t, n, h, causal in shapes:
    q, k, v = rand_qkv(jax.random.key(11), b, t, t, n, n, h)
    causal = bool(causal)
    configs = {nm: c for nm, c in variant_configs(h).items() if wanted is None or nm in wanted}
    static = static_for(t, h, causal)
    ref = jax.jit(lambda q, k, v: triton(q, k, v, is_causal=causal))(q, k, v)
    for name, fn in (("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")), ("triton", lambda q, k, v: triton(
            q, k, v, is_causal=causal))):
      def base_time(name=name, fn=fn):
        sec, spread = time_fn(jax.jit(fn), q, k, v, samples=args.samples, inner=args.inner)
        tf = flops(b, t, n, h, causal) / sec / 1e12
        RESULTS["variants"].append({"shape": [b, t, n, h, causal], "variant": name, "ms": sec * 1e3,
                                    "tflops": tf, "spread": spread, "err_vs_triton": 0.0})
        log(f"baseline {name:13s} B={b} T={t} N={n} H={h} causal={causal}: {sec * 1e3:7.3f} ms {tf:6.1f} TFLOP/s")
      guarded(f"baseline {name}", base_time)
    for name, cfg in configs.items():
      if time.perf_counter() - T0 > args.budget:
        log("time budget reached; skipping remaining variants")
        return

      def one(name=name, cfg=cfg):
        fn = jax.jit(lambda q, k, v: mg.forward_with_config(q, k, v, None, None, static, cfg)[0])
        err = rel_err(fn(q, k, v), ref)
        if not err <= 1e-2:
          RESULTS["errors"].append(f"variant {name} {b} {t} {n} {h} {causal}: err vs triton {err}")
        sec, spread = time_fn(fn, q, k, v, samples=args.samples, inner=args.inner)
        tf = flops(b, t, n, h, causal) / sec / 1e12
        RESULTS["variants"].append({"shape": [b, t, n, h, causal], "variant": name, "ms": sec * 1e3,
                                    "tflops": tf, "spread": spread, "err_vs_triton": err,
                                    "config": dataclasses.asdict(cfg)})
        log(f"variant {name:14s} B={b} T={t} N={n} H={h} causal={causal}: {sec * 1e3:7.3f} ms "
            f"{tf:6.1f} TFLOP/s (spread {spread:.1%}, err vs triton {err:.1e})")

      guarded(f"variant {name} {t} {h} {causal}", one)


def bench_part(args):
  shapes = [tuple(int(x) for x in spec.split(":")) for spec in args.bench_shapes.split(",")]
  for b, t, n, h, causal in shapes:
    causal = bool(causal)
    if time.perf_counter() - T0 > args.budget:
      log("time budget reached; skipping remaining shapes")
      return
    q, k, v = rand_qkv(jax.random.key(12), b, t, t, n, n, h)
    row = {"shape": [b, t, n, h, causal], "tflop": flops(b, t, n, h, causal) / 1e12}
    impls = {
        "mosaic_gpu": lambda q, k, v: mosaic(q, k, v, is_causal=causal),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                              implementation="cudnn"),
        "triton": lambda q, k, v: triton(q, k, v, is_causal=causal),
    }
    for name, fn in impls.items():
      def one(name=name, fn=fn):
        sec, spread = time_fn(jax.jit(fn), q, k, v, samples=args.samples, inner=args.inner)
        row[name] = {"ms": sec * 1e3, "tflops": row["tflop"] / sec, "spread": spread}
      guarded(f"bench {name} {b} {t} {n} {h} {causal}", one)
    if "mosaic_gpu" in row and "cudnn" in row:
      row["ratio_cudnn"] = row["mosaic_gpu"]["tflops"] / row["cudnn"]["tflops"]
    if "mosaic_gpu" in row and "triton" in row:
      row["ratio_triton"] = row["mosaic_gpu"]["tflops"] / row["triton"]["tflops"]
    RESULTS["bench"].append(row)
    log("bench", json.dumps(row))


# --------------------------------------------------------------------------- #
# backward
# --------------------------------------------------------------------------- #


class mosaic_bwd:
  """Within the block, `backend="mosaic_gpu"` differentiates through the Mosaic GPU
  backward (`on=True`) or the Triton backward kernels (`on=False`); functions must be
  traced (first called) inside the block."""

  def __init__(self, on: bool, config=None):
    self.on, self.config = on, config

  def __enter__(self):
    self.saved = mg.backward
    if not self.on:
      mg.backward = None
    elif self.config is None:
      mg.backward = mg.mosaic_backward
    else:
      mg.backward = lambda *a: mg.backward_with_config(*a, self.config)  # noqa: E731

  def __exit__(self, *exc):
    mg.backward = self.saved


def bwd_check_part(args):
  key = jax.random.key(args.seed + 100)
  # (name, B, T, S, N, K, H, causal, segments)
  cases = []
  for causal in (False, True):
    cases += [("B=2 T=1024 N=8 H=128", 2, 1024, 1024, 8, 8, 128, causal, False),
              ("B=1 T=2048 N=8 H=64", 1, 2048, 2048, 8, 8, 64, causal, False),
              ("odd T=1000 GQA 16/4 H=128", 2, 1000, 1000, 16, 4, 128, causal, False),
              ("segments+dead row B=2 T=1536 N=4 H=128", 2, 1536, 1536, 4, 4, 128, causal, True)]
  cases.append(("T=777 S=1531 GQA 8/2 H=64", 1, 777, 1531, 8, 2, 64, False, False))
  if args.bwd_checks == 2:  # quick: tail + GQA + causal, and segments with a dead row
    cases = [c for c in cases if (c[0].startswith("odd") and c[7]) or (c[8] and not c[7])]
  for name, b, t, s, n, kh, h, causal, segs in cases:
    key, sub, gkey = jax.random.split(key, 3)

    def one(name=name, b=b, t=t, s=s, n=n, kh=kh, h=h, causal=causal, segs=segs, sub=sub, gkey=gkey):
      q, k, v = rand_qkv(sub, b, t, s, n, kh, h)
      g = jax.random.normal(gkey, (b, t, n, h), jnp.float32)
      kw = {"is_causal": causal}
      if segs:
        ids = jnp.concatenate([jnp.zeros((b, 500), jnp.int32), jnp.ones((b, 700), jnp.int32),
                               2 * jnp.ones((b, t - 1200), jnp.int32)], axis=1)
        kw["segment_ids"] = (ids, ids.at[:, 1200:].set(5))  # segment 2: queries, no keys

      def grads(fn, *xs):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * g)  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1, 2)))(*xs)

      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      ref = grads(reference, *f32)
      with mosaic_bwd(True):
        got = grads(mosaic, q, k, v)
      with mosaic_bwd(False):
        tri = grads(mosaic, q, k, v)
      for dname, x, r, xt in zip(("dq", "dk", "dv"), got, ref, tri):
        record_check(f"bwd {dname} {name} causal={causal}", rel_err(x, r), 1e-2,
                     triton_err=rel_err(xt, r))
      if segs:
        dead = float(jnp.max(jnp.abs(got[0][:, 1200:].astype(jnp.float32))))
        record_check(f"bwd dq of dead rows is 0 causal={causal}", dead, 0.0)

    guarded(f"bwd check {name} {causal}", one)


def bwd_bench_part(args):
  shapes = [tuple(int(x) for x in spec.split(":")) for spec in args.bwd_shapes.split(",")]
  for b, t, n, h, causal in shapes:
    causal = bool(causal)
    if time.perf_counter() - T0 > args.budget:
      log("time budget reached; skipping remaining backward shapes")
      return
    q, k, v = rand_qkv(jax.random.key(15), b, t, t, n, n, h)
    g = jax.random.normal(jax.random.key(16), q.shape, jnp.float32).astype(q.dtype)
    tflop = 3.5 * flops(b, t, n, h, causal) / 1e12
    row = {"shape": [b, t, n, h, causal], "tflop": tflop}

    def fwd_bwd(attn):
      def f(q, k, v, g):
        out, pull = jax.vjp(attn, q, k, v)
        return out, pull(g)
      return jax.jit(f)

    mosaic_attn = lambda q, k, v: mosaic(q, k, v, is_causal=causal)  # noqa: E731
    cudnn_attn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=causal, implementation="cudnn")
    impls = {
        "mosaic+mosaic_bwd": (True, fwd_bwd(mosaic_attn), tflop),
        "mosaic+triton_bwd": (False, fwd_bwd(mosaic_attn), tflop),
        "cudnn": (None, fwd_bwd(cudnn_attn), tflop),
        "mosaic_fwd": (None, jax.jit(lambda q, k, v, g: mosaic_attn(q, k, v)), tflop / 3.5),
    }
    for name, (on, fn, work) in impls.items():
      def one(name=name, on=on, fn=fn, work=work):
        with mosaic_bwd(bool(on)):
          sec, spread = time_fn(fn, q, k, v, g, samples=args.samples, inner=1, warmup=3)
        row[name] = {"ms": sec * 1e3, "tflops": work / sec, "spread": spread}
      guarded(f"bwd bench {name} {b} {t} {n} {h} {causal}", one)
    if "mosaic_fwd" in row:
      # Backward alone, counted as 2.5 forward FLOPs.
      for name in ("mosaic+mosaic_bwd", "mosaic+triton_bwd"):
        if name in row:
          ms = row[name]["ms"] - row["mosaic_fwd"]["ms"]
          row[name]["bwd_tflops"] = tflop / 3.5 * 2.5 / (ms / 1e3) if ms > 0 else float("nan")
    if "cudnn" in row:
      for name in ("mosaic+mosaic_bwd", "mosaic+triton_bwd"):
        if name in row:
          row[name]["ratio_cudnn"] = row[name]["tflops"] / row["cudnn"]["tflops"]
    RESULTS["bwd"].append(row)
    log("bwd bench", json.dumps(row))


def bwd_variant_configs(h: int) -> dict:
  """Named backward settings; "default" is `default_backward_config(h)` (stages are lowered
  per kernel to fit shared memory)."""
  base = mg.default_backward_config(h)
  return {
      "default": base,
      "stages3": dataclasses.replace(base, stages=3),
      "dq_bk64": dataclasses.replace(base, block_k_dq=64),
  }


def bwd_variants_part(args):
  """Forward+backward TFLOP/s of named backward settings (mosaic forward throughout)."""
  shapes = [tuple(int(x) for x in spec.split(":")) for spec in args.bwd_variant_shapes.split(",")]
  wanted = args.bwd_variants.split(",") if args.bwd_variants else None
  for b, t, n, h, causal in shapes:
    causal = bool(causal)
    q, k, v = rand_qkv(jax.random.key(17), b, t, t, n, n, h)
    g = jax.random.normal(jax.random.key(18), q.shape, jnp.float32).astype(q.dtype)
    tflop = 3.5 * flops(b, t, n, h, causal) / 1e12
    for name, cfg in bwd_variant_configs(h).items():
      if (wanted is not None and name not in wanted) or time.perf_counter() - T0 > args.budget:
        continue

      def one(name=name, cfg=cfg):
        def f(q, k, v, g):
          out, pull = jax.vjp(lambda q, k, v: mosaic(q, k, v, is_causal=causal), q, k, v)
          return out, pull(g)
        with mosaic_bwd(True, cfg):
          sec, spread = time_fn(jax.jit(f), q, k, v, g, samples=args.samples, inner=1, warmup=3)
        RESULTS["variants"].append({"shape": [b, t, n, h, causal], "variant": "bwd:" + name,
                                    "ms": sec * 1e3, "tflops": tflop / sec, "spread": spread,
                                    "err_vs_triton": float("nan"), "config": dataclasses.asdict(cfg)})
        log(f"bwd variant {name:16s} B={b} T={t} N={n} H={h} causal={causal}: {sec * 1e3:7.3f} ms "
            f"{tflop / sec:6.1f} TFLOP/s (fwd+bwd, spread {spread:.1%})")

      guarded(f"bwd variant {name} {t} {h} {causal}", one)


def bwd_part(args):
  if args.bwd_checks:
    bwd_check_part(args)
  bwd_bench_part(args)


def variant_configs(h: int) -> dict:
  """Named kernel settings; "default" is `default_config(h)`, the rest name the change."""
  base = mg.KernelConfig()  # overlap + pingpong
  three = dataclasses.replace(base, compute_wgs=3, compute_registers=160, producer_registers=32)
  configs = {
      "default": mg.default_config(h),
      "overlap_pingpong": base,
      "no_overlap": dataclasses.replace(base, overlap=False),
      "no_pingpong": dataclasses.replace(base, pingpong=False),
      "plain": dataclasses.replace(base, overlap=False, pingpong=False),
      "overlap_masked": dataclasses.replace(base, overlap_masked=True),
      "no_fence": dataclasses.replace(base, softmax_fence=False),
      "bk64": dataclasses.replace(base, block_k=64),
      "regs240_24": dataclasses.replace(base, compute_registers=240, producer_registers=24),
      "stages3": dataclasses.replace(mg.default_config(h), stages=3),
      "wgs3_plain": dataclasses.replace(three, overlap=False),
      "wgs3_no_overlap_no_pingpong": dataclasses.replace(three, overlap=False, pingpong=False),
      "wgs3_no_pingpong": dataclasses.replace(three, pingpong=False),
  }
  if h == 64:
    configs["bk256"] = dataclasses.replace(base, block_k=256)
  return configs


def dump_part(args):
  """One compile of variant `--dump` (name:H:causal) at T=4096 (for MOSAIC_GPU_DUMP_* output)."""
  name, h, causal = args.dump.split(":")
  h, causal = int(h), causal == "1"
  q, k, v = rand_qkv(jax.random.key(13), 1, 4096, 4096, 8, 8, h)
  cfg = variant_configs(h)[name]
  static = static_for(4096, h, causal)
  jax.block_until_ready(jax.jit(lambda q, k, v: mg.forward_with_config(q, k, v, None, None, static, cfg))(q, k, v))
  log(f"dump: compiled {args.dump}")


def print_tables():
  if RESULTS["variants"]:
    print("\nvariants (TFLOP/s)")
    for r in RESULTS["variants"]:
      b, t, n, h, c = r["shape"]
      print(f"  T={t:5d} H={h:3d} causal={int(c)} {r['variant']:14s} {r['tflops']:6.1f}  err {r['err_vs_triton']:.1e}")
  if RESULTS["bench"]:
    print("\nforward TFLOP/s (bf16)            mosaic   cudnn  triton  mosaic/cudnn  mosaic/triton")
    for r in RESULTS["bench"]:
      b, t, n, h, c = r["shape"]
      get = lambda k: r[k]["tflops"] if k in r else float("nan")  # noqa: E731
      print(f"  B={b} T={t:5d} N={n} H={h:3d} causal={int(c)}  {get('mosaic_gpu'):7.1f} {get('cudnn'):7.1f} "
            f"{get('triton'):7.1f}  {r.get('ratio_cudnn', float('nan')):11.2f}  {r.get('ratio_triton', float('nan')):12.2f}")
  if RESULTS["bwd"]:
    print("\nforward+backward TFLOP/s (bf16, 3.5x fwd FLOPs)   mosaic+mosaic  mosaic+triton  cudnn  "
          "m+m/cudnn  m+t/cudnn  | bwd alone (2.5x): m  t")
    for r in RESULTS["bwd"]:
      b, t, n, h, c = r["shape"]
      get = lambda k, f="tflops": r[k].get(f, float("nan")) if k in r else float("nan")  # noqa: E731
      print(f"  B={b} T={t:5d} N={n:2d} H={h:3d} causal={int(c)}  {get('mosaic+mosaic_bwd'):13.1f} "
            f"{get('mosaic+triton_bwd'):14.1f} {get('cudnn'):6.1f}  {get('mosaic+mosaic_bwd', 'ratio_cudnn'):9.2f}"
            f"  {get('mosaic+triton_bwd', 'ratio_cudnn'):9.2f}  | {get('mosaic+mosaic_bwd', 'bwd_tflops'):6.1f} "
            f"{get('mosaic+triton_bwd', 'bwd_tflops'):6.1f}")
  fails = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
  print(f"\nchecks: {len(RESULTS['checks']) - len(fails)}/{len(RESULTS['checks'])} passed")
  for f in fails:
    print("  FAIL", f)
  for e in RESULTS["errors"]:
    print("  ERROR", e[:600])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="check,variants,bench")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--samples", type=int, default=20)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="check: skip the B/T/H/causal forward matrix")
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--variants", default="", help="variants: comma-separated names (default all)")
  parser.add_argument("--variant-shapes", default="1:8192:16:128:0,1:8192:16:128:1,1:8192:16:64:0,1:8192:16:64:1",
                      help="variants: B:T:N:H:causal,...")
  parser.add_argument("--dump", default="default:128:1", help="dump: variant:H:causal")
  parser.add_argument("--bench-shapes", help="bench: B:T:N:H:causal,...", default=",".join(
      f"{b}:{t}:16:{h}:{c}" for t, b in ((16384, 1), (8192, 2), (4096, 4), (1024, 8))
      for h in (128, 64) for c in (0, 1)))
  parser.add_argument("--bwd-checks", type=int, default=1, help="bwd: gradient checks: 0 none, 1 all, 2 two (odd T + GQA causal, segments)")
  parser.add_argument("--bwd-shapes", help="bwd: B:T:N:H:causal,... (B T = 16k, N H = 2048)", default=",".join(
      f"{b}:{t}:{2048 // h}:{h}:{c}" for t, b in ((16384, 1), (8192, 2), (4096, 4))
      for h in (128, 64) for c in (0, 1)))
  parser.add_argument("--bwd-variants", default="", help="bwd_variants: comma-separated names (default all)")
  parser.add_argument("--bwd-variant-shapes", default="2:8192:16:128:0,2:8192:16:128:1",
                      help="bwd_variants: B:T:N:H:causal,...")
  parser.add_argument("--budget", type=float, default=200.0, help="seconds before skipping timing work")
  args = parser.parse_args()
  global WARMUP
  WARMUP = args.warmup
  RESULTS["env"] = {"jax": jax.__version__, "device": str(jax.devices()[0]),
                    "kind": getattr(jax.devices()[0], "device_kind", "?"), "argv": sys.argv}
  log("jax", jax.__version__, jax.devices()[0].device_kind)
  parts = args.parts.split(",")
  try:
    for part in parts:
      {"check": check_part, "variants": variants_part, "bench": bench_part, "bwd": bwd_part,
       "bwd_variants": bwd_variants_part,
       "dump": dump_part}[part](args)
  finally:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mgpu_check.json"), "w") as f:
      json.dump(RESULTS, f, indent=1, default=str)
    print_tables()


if __name__ == "__main__":
  main()
