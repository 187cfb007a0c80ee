"""Benchmark exact-attention kernels side by side: speed (TFLOP/s) and peak memory.

On a GPU, one run times, on the same inputs (bf16, `[B, T, N, H]`, B·T = 16k tokens,
N·H = 2048), forward and forward+backward:

  pallas-triton    pallas.flash_attention(backend="triton")
  pallas-mgpu      pallas.flash_attention(backend="mosaic_gpu")  (Hopper, when it applies)
  cudnn            jax.nn.dot_product_attention(implementation="cudnn")
  xla              jax.nn.dot_product_attention(implementation="xla")
  jax-pallas-mha   jax.experimental.pallas.ops.gpu.attention.mha (JAX's bundled Pallas kernel)

TFLOP/s counts 4·B·N·T²·H (halved when causal; ×3.5 for forward+backward). Each
time is the median of `--repeats` runs after warm-up. Then the peak device memory
of forward+backward at long T (B1 N8 H128), from the compiled executable.

    python experiments/bench_attention.py --run h100_flash           # full GPU run
    python experiments/bench_attention.py --smoke                    # tiny, any machine
    python experiments/bench_attention.py --tune --seq-lens 8192     # Triton block sizes
    python experiments/bench_attention.py --suite families           # every family, T up to 128k
    python experiments/bench_attention.py --suite block_sparse       # block-sparse kernel vs density
    python experiments/bench_attention.py --suite linear             # chunked causal linear kernel

Writes `results/<run>/flash.{json,md,png}`. `--suite families` times every family
(exact through XLA / cuDNN / Pallas, FAVOR+, linear, Linformer, block-sparse local),
causal where the family has a causal form (Linformer: non-causal), B1 N8 H64, T from 512 to
128k, forward and forward+backward, with the peak memory of forward+backward; a family that
runs out of memory is recorded as OOM and not run at longer T. It writes
`results/<run>/families.{json,md,png}`, the PNG showing time vs T (log-log): where each
approximate family overtakes exact attention.

`--suite block_sparse` times `pallas.block_sparse_attention` (T=16k, B1 N16 H128, layout blocks
of 128) forward and forward+backward at 100%, 50%, 25%, 12.5% and 6.25% live blocks (a local
window | a few global blocks; 100% = every block), relative to its own all-live time, then a
Longformer layout (window 512 each side + 64 global tokens) against dense cuDNN causal attention
in the same run, checking the outputs agree on the rows where the masks do. It writes
`results/<run>/block_sparse.{json,md,png}`.

`--suite linear` times causal FAVOR+ (B1 N8; H=64 with M=128 features, H=128 with M=256) through
the Pallas chunked kernel and the pure-JAX chunked form (`implementation="xla"`), and cuDNN exact
causal attention on the same q, k, v, T from 1k to 64k, forward and forward+backward, with the
ratios the kernel is held to (Pallas at 64k over 8k, the T from which it beats cuDNN, XLA over
Pallas at 16k), each from two timings: the median of calls each waited for, and calls dispatched
back to back with one wait at the end (`pipelined_time`). It writes `results/<run>/linear.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

import pallas
from pallas.softmax import BlockSizes

IMPLS = ("pallas-triton", "pallas-mgpu", "cudnn", "xla", "jax-pallas-mha")


@dataclasses.dataclass(frozen=True)
class Config:
  seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
  head_dims: tuple[int, ...] = (64, 128)
  tokens: int = 16384  # B·T
  width: int = 2048  # N·H
  impls: tuple[str, ...] = IMPLS
  memory_seq_lens: tuple[int, ...] = (32768, 65536, 131072)
  repeats: int = 20
  warmup: int = 3
  tune: bool = False
  suite: str = "flash"  # or "families", "block_sparse"
  family_seq_lens: tuple[int, ...] = tuple(512 * 2**i for i in range(9))  # 512 .. 128k
  # --suite block_sparse: B1, N, H, layout blocks, live fractions, Longformer window / global tokens
  sparse_seq_len: int = 16384
  sparse_heads: int = 16
  sparse_head_dim: int = 128
  sparse_block: int = 128
  densities: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)
  longformer_window: int = 512
  longformer_global: int = 64
  # --suite linear: B1, N heads, (H, M) pairs, T; targets relative to T=linear_base_len and T=linear_xla_len
  linear_seq_lens: tuple[int, ...] = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k
  linear_shapes: tuple[tuple[int, int], ...] = ((64, 128), (128, 256))
  linear_heads: int = 8
  linear_base_len: int = 8192
  linear_xla_len: int = 16384
  smoke: bool = False
  seed: int = 0
  run: str = "bench"
  out_dir: str = "results"


def parse_args(argv=None) -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=Config.seq_lens)
  parser.add_argument("--head-dims", type=int, nargs="+", default=Config.head_dims)
  parser.add_argument("--tokens", type=int, default=Config.tokens)
  parser.add_argument("--width", type=int, default=Config.width)
  parser.add_argument("--impls", nargs="+", default=Config.impls, choices=IMPLS)
  parser.add_argument("--memory-seq-lens", type=int, nargs="*", default=Config.memory_seq_lens)
  parser.add_argument("--repeats", type=int, default=Config.repeats)
  parser.add_argument("--warmup", type=int, default=Config.warmup)
  parser.add_argument("--tune", action="store_true", help="sweep Triton block sizes instead")
  parser.add_argument("--suite", choices=("flash", "families", "block_sparse", "linear"), default=Config.suite)
  parser.add_argument("--linear-seq-lens", type=int, nargs="+", default=Config.linear_seq_lens)
  parser.add_argument("--family-seq-lens", type=int, nargs="+", default=Config.family_seq_lens)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds on a CPU")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--run", default=Config.run)
  parser.add_argument("--out-dir", default=Config.out_dir)
  args = parser.parse_args(argv)
  cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
  if cfg.smoke:
    cfg = dataclasses.replace(cfg, seq_lens=(64,), head_dims=(16,), tokens=128, width=32,
                              memory_seq_lens=(128,), family_seq_lens=(64, 128), repeats=2, warmup=1)
    if cfg.suite == "block_sparse":
      cfg = dataclasses.replace(cfg, sparse_seq_len=256, sparse_heads=2, sparse_head_dim=16, sparse_block=16,
                                longformer_window=32, longformer_global=16, repeats=1)
    if cfg.suite == "linear":
      cfg = dataclasses.replace(cfg, linear_seq_lens=(32, 64), linear_shapes=((16, 16),), linear_heads=2,
                                linear_base_len=32, linear_xla_len=64, repeats=1)
  return cfg


# --------------------------------------------------------------------------- #
# contenders: name -> fn(q, k, v, is_causal) -> out, or None when unavailable
# --------------------------------------------------------------------------- #


def contender(name: str, dtype, head_dim: int, *, blocks: BlockSizes | None = None) -> Callable | None:
  on_gpu = jax.default_backend() == "gpu"
  if name == "pallas-triton":
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="triton", block_sizes=blocks)
  if name == "pallas-mgpu":
    from pallas import softmax_mosaic_gpu
    if not (on_gpu and softmax_mosaic_gpu.applies(dtype, _dims(head_dim), is_causal=False, has_segments=False)):
      return None
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="mosaic_gpu")
  if name == "cudnn":
    if not on_gpu:
      return None
    return lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")
  if name == "xla":
    return lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla")
  if name == "jax-pallas-mha":
    if not on_gpu:
      return None
    from jax.experimental.pallas.ops.gpu import attention as bundled
    return lambda q, k, v, c: bundled.mha(q, k, v, None, sm_scale=head_dim**-0.5, causal=c)
  raise ValueError(f"unknown contender {name!r}; valid: {IMPLS}")


def _dims(head_dim: int):
  from pallas.common import Dims
  return Dims(batch=1, q_len=4096, kv_len=4096, num_heads=8, num_kv_heads=8, head_dim=head_dim,
              v_head_dim=head_dim)


def flops(b: int, t: int, n: int, h: int, *, is_causal: bool, backward: bool) -> float:
  f = 4.0 * b * n * t * t * h
  f = f / 2 if is_causal else f
  return f * 3.5 if backward else f


def inputs(key, b, t, n, h, dtype=jnp.bfloat16):
  kq, kk, kv, kd = jax.random.split(key, 4)
  return tuple(jax.random.normal(kx, (b, t, n, h), jnp.float32).astype(dtype) for kx in (kq, kk, kv, kd))


def compile_pass(fn: Callable, is_causal: bool, backward: bool):
  if not backward:
    return jax.jit(lambda q, k, v, do: fn(q, k, v, is_causal))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, is_causal), q, k, v)
    return vjp(do)

  return jax.jit(fwd_bwd)


def median_time(f: Callable, args, *, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def pipelined_time(f: Callable, args, *, repeats: int, warmup: int) -> float:
  """Seconds per call with `repeats` calls dispatched back to back and one wait at the end.

  `median_time` waits for every call, so it also counts the host's dispatch and
  wake-up latency of each call; here the host runs ahead of the device as it does
  in a training loop, and the time is that of the device's queue of work (calls on
  one device run in order, so the last call's end is the queue's end).
  """
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  start = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def peak_bytes(f: Callable, args) -> int | None:
  """Peak device bytes of one call: arguments + outputs + temporaries of the executable."""
  stats = f.lower(*args).compile().memory_analysis()
  if stats is None:
    return None
  alias = getattr(stats, "alias_size_in_bytes", 0)
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - alias)


# --------------------------------------------------------------------------- #
# runs
# --------------------------------------------------------------------------- #


def speed(cfg: Config) -> list[dict]:
  rows = []
  key = jax.random.key(cfg.seed)
  cases = [(h, t, c, bwd) for h in cfg.head_dims for t in cfg.seq_lens for c in (False, True) for bwd in (False, True)]
  for h, t, is_causal, backward in tqdm(cases, desc="speed"):
    b, n = max(1, cfg.tokens // t), max(1, cfg.width // h)
    args = inputs(key, b, t, n, h)
    row = dict(batch=b, seq_len=t, num_heads=n, head_dim=h, is_causal=is_causal,
               pass_="fwd+bwd" if backward else "fwd", tflops={}, ms={}, error={})
    for name in cfg.impls:
      fn = contender(name, jnp.bfloat16, h)
      if fn is None:
        continue
      try:
        f = compile_pass(fn, is_causal, backward)
        sec = median_time(f, args, repeats=cfg.repeats, warmup=cfg.warmup)
      except Exception as e:  # noqa: BLE001 - a failing peer is recorded, not fatal
        row["error"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        continue
      row["ms"][name] = sec * 1e3
      row["tflops"][name] = flops(b, t, n, h, is_causal=is_causal, backward=backward) / sec / 1e12
    if "cudnn" in row["tflops"]:
      row["ratio_to_cudnn"] = {k: v / row["tflops"]["cudnn"] for k, v in row["tflops"].items()}
    rows.append(row)
  return rows


def memory(cfg: Config) -> list[dict]:
  rows = []
  key = jax.random.key(cfg.seed + 1)
  n, h = (8, 128) if not cfg.smoke else (2, 16)
  for t in tqdm(cfg.memory_seq_lens, desc="memory"):
    args = inputs(key, 1, t, n, h)
    tensor = args[0].size * args[0].dtype.itemsize
    row = dict(seq_len=t, num_heads=n, head_dim=h, tensor_bytes=tensor, peak_bytes={}, ratio={})
    for name in cfg.impls:
      if name == "xla" and t > 16384:
        continue  # materialises [N, T, T]
      fn = contender(name, jnp.bfloat16, h)
      if fn is None:
        continue
      try:
        peak = peak_bytes(compile_pass(fn, True, True), args)
      except Exception as e:  # noqa: BLE001
        row["peak_bytes"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        continue
      row["peak_bytes"][name] = peak
      # q, k, v, o and their gradients: 8 tensors of [1, T, N, H].
      row["ratio"][name] = None if peak is None else peak / (8 * tensor)
    rows.append(row)
  return rows


TUNE_BLOCKS = {
    "fwd": [
        dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
        for bq, bk, w, s in [(64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2),
                             (128, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 3)]
    ],
    "bwd": [
        dict(block_q_dq=a, block_k_dq=b, block_q_dkv=c, block_k_dkv=d, num_warps_bwd=w, num_stages_bwd=s)
        for a, b, c, d, w, s in [(64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 2),
                                 (64, 32, 32, 64, 4, 2), (128, 64, 64, 128, 4, 2), (64, 64, 32, 64, 4, 2),
                                 (64, 64, 64, 32, 4, 2), (128, 32, 32, 128, 4, 2), (128, 32, 32, 128, 4, 3),
                                 (32, 32, 32, 32, 4, 2)]
    ],
}


def tune(cfg: Config) -> list[dict]:
  """Times Triton block sizes: forward settings alone, backward settings on fwd+bwd."""
  rows = []
  key = jax.random.key(cfg.seed)
  for h in cfg.head_dims:
    for t in cfg.seq_lens:
      b, n = max(1, cfg.tokens // t), max(1, cfg.width // h)
      args = inputs(key, b, t, n, h)
      base = BlockSizes.get_default("triton", h)
      for is_causal in (False, True):
        for pass_, settings in TUNE_BLOCKS.items():
          for s in tqdm(settings, desc=f"tune H={h} T={t} causal={is_causal} {pass_}"):
            blocks = dataclasses.replace(base, **s)
            fn = contender("pallas-triton", jnp.bfloat16, h, blocks=blocks)
            try:
              sec = median_time(compile_pass(fn, is_causal, pass_ == "bwd"), args, repeats=cfg.repeats,
                                warmup=cfg.warmup)
              tf = flops(b, t, n, h, is_causal=is_causal, backward=pass_ == "bwd") / sec / 1e12
            except Exception as e:  # noqa: BLE001 - a block size that does not compile is recorded
              tf = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(dict(head_dim=h, seq_len=t, is_causal=is_causal, pass_=pass_, blocks=s, tflops=tf))
            print(json.dumps(rows[-1]), flush=True)
  return rows


# --------------------------------------------------------------------------- #
# every family
# --------------------------------------------------------------------------- #

FAMILIES = ("softmax-xla", "softmax-cudnn", "softmax-pallas", "favor", "favor-pallas", "linear", "linear-pallas",
            "linformer", "local", "local-pallas")


def family_fn(name: str, t: int, h: int, *, on_gpu: bool) -> tuple[Callable, bool] | None:
  """(fn(q, k, v) -> out, is_causal) for family `name` at length t, or None when unavailable."""
  import efficient_attention as ea

  if name == "softmax-xla":
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="xla")), True
  if name == "softmax-cudnn":
    if not on_gpu:
      return None
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="cudnn")), True
  if name == "softmax-pallas":
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="pallas")), True
  base, _, impl = name.partition("-")
  if impl == "pallas" and base != "softmax" and not on_gpu:
    return None  # the linear and block-sparse kernels are timed compiled only
  impl = impl or None
  if base == "favor":
    features = ea.orthogonal_random_features(jax.random.key(1), 256, h)
    return (lambda q, k, v: ea.favor_attention(q, k, v, features, is_causal=True, implementation=impl)), True
  if base == "linear":
    return (lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True, implementation=impl)), True
  if name == "linformer":
    proj = jax.random.normal(jax.random.key(2), (256, t), jnp.float32) / 16.0
    return (lambda q, k, v: ea.linformer_attention(q, k, v, proj.astype(q.dtype), proj.astype(q.dtype))), False
  if base == "local":
    layout = ea.layouts.local(t, window=256, block_size=128 if t >= 128 else 16)
    return (lambda q, k, v: ea.block_sparse_attention(q, k, v, layout, is_causal=True, implementation=impl)), True
  raise ValueError(f"unknown family {name!r}; valid: {FAMILIES}")


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def families(cfg: Config, on_length_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Every family at every T; `on_length_done(rows)` after each T, so a run cut short keeps what it measured."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  n, h = (8, 64) if not cfg.smoke else (2, 16)
  rows, stopped = [], {}
  key = jax.random.key(cfg.seed + 2)
  for t in tqdm(cfg.family_seq_lens, desc="families"):
    q, k, v, do = inputs(key, 1, t, n, h, dtype)
    for name in FAMILIES:
      row = dict(family=name, seq_len=t, num_heads=n, head_dim=h, dtype=jnp.dtype(dtype).name)
      if name in stopped:
        rows.append(dict(row, status=stopped[name]))
        continue
      made = family_fn(name, t, h, on_gpu=on_gpu)
      if made is None:
        continue
      fn, is_causal = made
      row["is_causal"] = is_causal
      try:
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
        row["peak_bytes"] = peak_bytes(fwd_bwd, (q, k, v, do))
        row["fwd_ms"] = 1e3 * median_time(fwd, (q, k, v), repeats=cfg.repeats, warmup=cfg.warmup)
        row["fwd_bwd_ms"] = 1e3 * median_time(fwd_bwd, (q, k, v, do), repeats=cfg.repeats, warmup=cfg.warmup)
        row["status"] = "ok"
      except Exception as e:  # noqa: BLE001 - OOM (or another failure) is a result here
        row["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        stopped[name] = row["status"] if row["status"] == "OOM" else "skipped after an error"
      rows.append(row)
      tqdm.write(json.dumps(row))
    if on_length_done is not None:
      on_length_done(rows)
  return rows


def families_markdown(rows: list[dict], header: str) -> str:
  names = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
  lens = sorted({r["seq_len"] for r in rows})
  lines = [header, ""]
  for key, title in (("fwd_bwd_ms", "forward+backward (ms)"), ("fwd_ms", "forward (ms)"),
                     ("peak_bytes", "peak memory of forward+backward (MiB)")):
    lines += [f"{title}", "", "| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in lens:
      cells = []
      for name in names:
        r = next((r for r in rows if r["family"] == name and r["seq_len"] == t), None)
        if r is None:
          cells.append("–")
        elif r["status"] != "ok":
          cells.append("OOM" if r["status"] == "OOM" else "–")
        elif key == "peak_bytes":
          cells.append("–" if r[key] is None else f"{r[key] / 2**20:.0f}")
        else:
          cells.append(f"{r[key]:.3g}")
      lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["Crossover: the shortest T from which a family's forward+backward is faster than the fastest exact "
            "(softmax) implementation at every longer T measured (exact out of memory counts as slower)", ""]
  for name, t in crossovers(rows).items():
    lines.append(f"- {name}: " + ("never, in the lengths measured" if t is None else f"T = {t}"))
  lines.append("")
  return "\n".join(lines)


def crossovers(rows: list[dict], key: str = "fwd_bwd_ms") -> dict[str, int | None]:
  """For each approximate family, the shortest T from which it beats the best exact implementation at every T."""
  lens = sorted({r["seq_len"] for r in rows})

  def time(name, t):
    r = next((r for r in rows if r["family"] == name and r["seq_len"] == t), None)
    if r is None:
      return None
    return r[key] if r["status"] == "ok" else float("inf")

  out = {}
  for name in FAMILIES:
    if name.startswith("softmax") or not any(r["family"] == name for r in rows):
      continue
    since = None
    for t in lens:
      exact = [x for x in (time(f, t) for f in FAMILIES if f.startswith("softmax")) if x is not None]
      mine = time(name, t)
      if mine is None or not exact:
        continue
      faster = mine < min(exact)
      since = (since or t) if faster else None
    out[name] = since
  return out


def families_plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cross = crossovers(rows)
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  for ax, (key, title) in zip(axes, (("fwd_bwd_ms", "forward+backward (exact: dashed)"), ("fwd_ms", "forward"),
                                     ("peak_bytes", "peak memory, forward+backward"))):
    for name in FAMILIES:
      pts = [(r["seq_len"], r[key] / (2**20 if key == "peak_bytes" else 1)) for r in rows
             if r["family"] == name and r["status"] == "ok" and r.get(key) is not None]
      if pts:
        label = name
        if key == "fwd_bwd_ms" and name in cross:
          label += f" (< exact from T={cross[name]})" if cross[name] else " (never < exact)"
        ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if name.startswith("softmax") else "-")
      oom = [r["seq_len"] for r in rows if r["family"] == name and r["status"] == "OOM"]
      if oom and pts:
        ax.annotate("OOM", (oom[0], pts[-1][1]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("MiB" if key == "peak_bytes" else "ms")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------- #
# block-sparse kernel: time vs live blocks, and Longformer vs dense causal
# --------------------------------------------------------------------------- #


def density_layout(t: int, block: int, density: float):
  """A local window | a few global blocks with the density closest to `density` (1: every block live)."""
  import efficient_attention as ea

  if density >= 1.0:
    return ea.layouts.dense(t, block_size=block)
  nq = -(-t // block)
  candidates = [ea.layouts.local(t, window=w * block, block_size=block)
                | ea.layouts.global_tokens(t, num_global=g * block, block_size=block)
                for g in range(1, 5) for w in range(nq)]
  return min(candidates, key=lambda layout: abs(layout.density - density))


def _agreeing_rows(layout, t: int) -> list[int]:
  """Query rows whose causal row of `layout` is the whole causal row (every key block up to the diagonal live)."""
  b = layout.block_q
  return [r for i in range(layout.grid[0]) if layout.blocks[i, : i * b // layout.block_k + 1].all()
          for r in range(i * b, min((i + 1) * b, t))]


def block_sparse_suite(cfg: Config) -> dict:
  """Forward and forward+backward time of `pallas.block_sparse_attention` vs density, and Longformer vs dense."""
  import numpy as np

  import efficient_attention as ea

  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  t, n, h, block = cfg.sparse_seq_len, cfg.sparse_heads, cfg.sparse_head_dim, cfg.sparse_block
  q, k, v, do = inputs(jax.random.key(cfg.seed + 3), 1, t, n, h, dtype)
  dense_name = "cudnn" if on_gpu else "xla"

  def timed(fn) -> dict:
    fwd = jax.jit(fn)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
    return dict(fwd_ms=1e3 * median_time(fwd, (q, k, v), repeats=cfg.repeats, warmup=cfg.warmup),
                fwd_bwd_ms=1e3 * median_time(fwd_bwd, (q, k, v, do), repeats=cfg.repeats, warmup=cfg.warmup))

  def sparse(layout, is_causal=False):
    return lambda q, k, v: pallas.block_sparse_attention(q, k, v, layout, is_causal=is_causal)

  def dense(is_causal):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=dense_name)

  rows = []
  for target in tqdm(cfg.densities, desc="block-sparse density"):
    layout = density_layout(t, block, target)
    rows.append(dict(layout="all live" if target >= 1 else "window + global", target=target,
                     density=layout.density, live_blocks=int(layout.blocks.sum()), **timed(sparse(layout))))
  base = next(r for r in rows if r["target"] >= 1)
  for r in rows:
    r["fwd_ratio"], r["fwd_bwd_ratio"] = r["fwd_ms"] / base["fwd_ms"], r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
  rows.append(dict(layout=f"{dense_name} dense", target=1.0, density=1.0, **timed(dense(False))))

  longformer = ea.layouts.longformer(t, window=cfg.longformer_window, num_global=cfg.longformer_global,
                                     block_size=block)
  contenders = [("block-sparse longformer causal", sparse(longformer, True), True),
                ("block-sparse longformer", sparse(longformer), False),
                (f"{dense_name} dense causal", dense(True), True)]
  compare = []
  for name, fn, is_causal in tqdm(contenders, desc="longformer"):
    compare.append(dict(name=name, is_causal=is_causal, density=longformer.density if "longformer" in name else 1.0,
                        **timed(fn)))
  ref = compare[-1]
  for r in compare:
    r["speedup_fwd"], r["speedup_fwd_bwd"] = ref["fwd_ms"] / r["fwd_ms"], ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
  # Same output where the masks agree: rows whose causal Longformer row is the whole causal row.
  agree = np.asarray(_agreeing_rows(longformer, t))
  got = np.asarray(jax.jit(sparse(longformer, True))(q, k, v)[:, agree], np.float32)
  want = np.asarray(jax.jit(dense(True))(q, k, v)[:, agree], np.float32)
  agreement = dict(rows=len(agree), max_abs_diff=float(np.abs(got - want).max()),
                   max_abs_value=float(np.abs(want).max()))
  return dict(seq_len=t, num_heads=n, head_dim=h, block=block, dtype=jnp.dtype(dtype).name, dense=dense_name,
              density=rows, longformer=compare, longformer_window=cfg.longformer_window,
              longformer_global=cfg.longformer_global, agreement=agreement)


def block_sparse_markdown(res: dict, header: str) -> str:
  lines = [header, "", "Time vs live blocks (non-causal; ratio to this kernel's all-live time in the same run)", "",
           "| layout | density | live blocks | fwd (ms) | fwd+bwd (ms) | fwd / all-live | fwd+bwd / all-live |",
           "|---|---|---|---|---|---|---|"]
  for r in res["density"]:
    ratios = (f"{r['fwd_ratio']:.3f} | {r['fwd_bwd_ratio']:.3f}" if "fwd_ratio" in r else "– | –")
    lines.append(f"| {r['layout']} | {100 * r['density']:.2f}% | {r.get('live_blocks', '–')} | {r['fwd_ms']:.3g} | "
                 f"{r['fwd_bwd_ms']:.3g} | {ratios} |")
  title = (f"Longformer (window {res['longformer_window']} each side + {res['longformer_global']} global tokens) "
           f"vs dense {res['dense']} causal, same inputs")
  lines += ["", title, "",
            "| contender | density | fwd (ms) | fwd+bwd (ms) | speed-up fwd | speed-up fwd+bwd |",
            "|---|---|---|---|---|---|"]
  for r in res["longformer"]:
    lines.append(f"| {r['name']} | {100 * r['density']:.2f}% | {r['fwd_ms']:.3g} | {r['fwd_bwd_ms']:.3g} | "
                 f"{r['speedup_fwd']:.2f}× | {r['speedup_fwd_bwd']:.2f}× |")
  a = res["agreement"]
  lines += ["", (f"Causal Longformer vs dense causal on the {a['rows']} rows whose masks agree: max |difference| "
                 f"{a['max_abs_diff']:.3g} (max |output| {a['max_abs_value']:.3g}).")]
  target = min(res["density"], key=lambda r: abs(r["target"] - 0.125))
  speedup = res["longformer"][0]["speedup_fwd_bwd"]
  lines.append(f"{100 * target['density']:.2f}% live: forward+backward {target['fwd_bwd_ratio']:.3f}× the all-live "
               f"time (target <= 0.16); causal Longformer forward+backward {speedup:.2f}× faster than dense "
               f"{res['dense']} causal (target >= 4).")
  return "\n".join(lines) + "\n"


def block_sparse_plot(res: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  rows = [r for r in res["density"] if "fwd_ratio" in r]
  for key, label in (("fwd_ratio", "forward"), ("fwd_bwd_ratio", "forward+backward")):
    axes[0].plot([r["density"] for r in rows], [r[key] for r in rows], marker="o", label=label)
  axes[0].plot([r["density"] for r in rows], [r["density"] for r in rows], "k--", lw=1, label="ideal (= density)")
  axes[0].set_xscale("log", base=2)
  axes[0].set_yscale("log", base=2)
  axes[0].set_xlabel("live blocks (fraction)")
  axes[0].set_ylabel("time / all-live time")
  axes[0].set_title(f"block-sparse kernel, T={res['seq_len']}, H={res['head_dim']}")
  axes[0].legend(fontsize=7)
  axes[0].grid(alpha=0.3, which="both")
  names = [r["name"] for r in res["longformer"]]
  x = range(len(names))
  axes[1].bar([i - 0.2 for i in x], [r["fwd_ms"] for r in res["longformer"]], width=0.4, label="forward")
  axes[1].bar([i + 0.2 for i in x], [r["fwd_bwd_ms"] for r in res["longformer"]], width=0.4, label="forward+backward")
  axes[1].set_xticks(list(x), names, fontsize=7, rotation=10)
  axes[1].set_ylabel("ms")
  axes[1].set_title("Longformer vs dense causal")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------- #
# chunked causal linear attention: Pallas kernel vs XLA chunked form vs cuDNN causal
# --------------------------------------------------------------------------- #

LINEAR_IMPLS = ("pallas", "xla", "cudnn")


def linear_fn(name: str, features: jax.Array) -> Callable | None:
  """fn(q, k, v, is_causal) -> out: FAVOR+ through `implementation=name`, or cuDNN exact attention."""
  import efficient_attention as ea

  if name == "cudnn":
    if jax.default_backend() != "gpu":
      return None
    return lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")
  return lambda q, k, v, c: ea.favor_attention(q, k, v, features, is_causal=c, implementation=name)


def linear_suite(cfg: Config) -> list[dict]:
  """Causal forward and forward+backward times (ms) for every (H, M) shape, T and contender."""
  import efficient_attention as ea

  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  rows, stopped = [], {}
  key = jax.random.key(cfg.seed + 3)
  cases = [(h, m, t, bwd) for h, m in cfg.linear_shapes for t in cfg.linear_seq_lens for bwd in (False, True)]
  for h, m, t, backward in tqdm(cases, desc="linear"):
    features = ea.orthogonal_random_features(jax.random.key(1), m, h)
    args = inputs(key, 1, t, cfg.linear_heads, h, dtype)
    row = {"head_dim": h, "num_features": m, "seq_len": t, "num_heads": cfg.linear_heads,
           "dtype": jnp.dtype(dtype).name, "pass_": "fwd+bwd" if backward else "fwd", "ms": {}, "ms_pipelined": {},
           "error": {}}
    for name in LINEAR_IMPLS:
      fn = linear_fn(name, features)
      if fn is None:
        continue
      if (h, m, backward, name) in stopped:
        row["error"][name] = stopped[(h, m, backward, name)]
        continue
      try:
        compiled = compile_pass(fn, True, backward)
        row["ms"][name] = 1e3 * median_time(compiled, args, repeats=cfg.repeats, warmup=cfg.warmup)
        row["ms_pipelined"][name] = 1e3 * pipelined_time(compiled, args, repeats=cfg.repeats, warmup=1)
      except Exception as e:  # noqa: BLE001 - OOM (or another failure) is a result; longer T are skipped
        row["error"][name] = "OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        stopped[(h, m, backward, name)] = "skipped after " + row["error"][name][:40]
    rows.append(row)
  return rows


def linear_targets(rows: list[dict], cfg: Config) -> list[dict]:
  """Per (H, M) and pass: Pallas time at the longest T over its time at `linear_base_len`, the
  shortest T from which Pallas beats cuDNN at every longer T, and XLA / Pallas at `linear_xla_len`."""
  out = []
  for h, m in cfg.linear_shapes:
    for pass_ in ("fwd", "fwd+bwd"):
      target = {"head_dim": h, "num_features": m, "pass_": pass_, "base": cfg.linear_base_len}
      # Per timing: "" the synchronous median, "_pipelined" back-to-back calls.
      for key, suffix in (("ms", ""), ("ms_pipelined", "_pipelined")):
        rs = {r["seq_len"]: r.get(key, {}) for r in rows
              if (r["head_dim"], r["num_features"], r["pass_"]) == (h, m, pass_)}
        lens = sorted(rs)
        target["longest"] = lens[-1]
        pallas_ms = {t: ms["pallas"] for t, ms in rs.items() if "pallas" in ms}
        if lens[-1] in pallas_ms and cfg.linear_base_len in pallas_ms:
          target["longest_over_base" + suffix] = pallas_ms[lens[-1]] / pallas_ms[cfg.linear_base_len]
        beats = [t for t in lens
                 if all(rs[u].get("pallas", float("inf")) < rs[u].get("cudnn", 0.0) for u in lens if u >= t)]
        target["beats_cudnn_from" + suffix] = beats[0] if beats else None
        at = rs.get(cfg.linear_xla_len, {})
        if "pallas" in at and "xla" in at:
          target["xla_over_pallas" + suffix] = at["xla"] / at["pallas"]
      out.append(target)
  return out


def linear_markdown(rows: list[dict], targets: list[dict], cfg: Config, header: str) -> str:
  lines = [header, "",
           "Time (ms) per call; ratios > 1 mean the Pallas kernel is faster. `sync`: median of calls each waited",
           "for (host dispatch and wake-up latency included); `pipelined`: calls dispatched back to back, one",
           "wait at the end (the device's time per call, as in a training loop).", "",
           "| H | M | T | pass | pallas | xla | cudnn | xla / pallas | cudnn / pallas | pallas / pallas@base "
           "| pipelined: pallas | xla | cudnn | xla / pallas | cudnn / pallas |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  base = {(r["head_dim"], r["num_features"], r["pass_"]): r["ms"].get("pallas") for r in rows
          if r["seq_len"] == cfg.linear_base_len}

  def cell(r, name, key="ms"):
    ms = r.get(key, {})
    return f"{ms[name]:.3g}" if name in ms else ("OOM" if r["error"].get(name) == "OOM" else "–")

  def ratio(num, den):
    return f"{num / den:.2f}" if num and den else "–"

  for r in rows:
    ms = r["ms"]
    scaling = ratio(ms.get("pallas"), base.get((r["head_dim"], r["num_features"], r["pass_"])))
    mp = r.get("ms_pipelined", {})
    lines.append(f"| {r['head_dim']} | {r['num_features']} | {r['seq_len']} | {r['pass_']} | {cell(r, 'pallas')} | "
                 f"{cell(r, 'xla')} | {cell(r, 'cudnn')} | {ratio(ms.get('xla'), ms.get('pallas'))} | "
                 f"{ratio(ms.get('cudnn'), ms.get('pallas'))} | {scaling} | "
                 + " | ".join(cell(r, n, "ms_pipelined") for n in LINEAR_IMPLS)
                 + f" | {ratio(mp.get('xla'), mp.get('pallas'))} | {ratio(mp.get('cudnn'), mp.get('pallas'))} |")
  lines += ["", f"Targets (base T={cfg.linear_base_len}; XLA compared at T={cfg.linear_xla_len}), sync / pipelined", "",
            "| H | M | pass | pallas T_max / T_base | faster than cuDNN from T | xla / pallas |",
            "|---|---|---|---|---|---|"]

  def pair(t, key, fmt):
    return " / ".join("–" if t.get(key + s) is None else fmt(t[key + s]) for s in ("", "_pipelined"))

  for t in targets:
    scaling = pair(t, "longest_over_base", lambda x: f"{x:.2f}") + f" (T {t['longest']} / {t['base']})"
    lines.append(f"| {t['head_dim']} | {t['num_features']} | {t['pass_']} | {scaling} | "
                 f"{pair(t, 'beats_cudnn_from', str)} | {pair(t, 'xla_over_pallas', lambda x: f'{x:.2f}')} |")
  return "\n".join(lines) + "\n"


def linear_plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["head_dim"], r["num_features"], r["pass_"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, (h, m, p) in zip(axes.flat, panels):
    for name in LINEAR_IMPLS:
      pts = [(r["seq_len"], r["ms"][name]) for r in rows
             if (r["head_dim"], r["num_features"], r["pass_"]) == (h, m, p) and name in r["ms"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label="cudnn (exact causal)" if name == "cudnn" else f"{name} (FAVOR+)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("ms")
    ax.set_title(f"H={h} M={m} causal {p}")
    ax.grid(alpha=0.3, which="both")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


def markdown(speed_rows: list[dict], memory_rows: list[dict], header: str) -> str:
  names = [n for n in IMPLS if any(n in r["tflops"] for r in speed_rows)]
  lines = [header, "", "TFLOP/s (ratio to cuDNN in the same run)", "",
           "| H | T | B×N | causal | pass | " + " | ".join(names) + " |",
           "|---|---|---|---|---|" + "---|" * len(names)]
  for r in speed_rows:
    cells = []
    for name in names:
      if name in r["tflops"]:
        ratio = r.get("ratio_to_cudnn", {}).get(name)
        cells.append(f"{r['tflops'][name]:.3g}" + (f" ({ratio:.2f}×)" if ratio is not None and name != "cudnn" else ""))
      else:
        cells.append("error" if name in r["error"] else "–")
    lines.append(f"| {r['head_dim']} | {r['seq_len']} | {r['batch']}×{r['num_heads']} | "
                 f"{'yes' if r['is_causal'] else 'no'} | {r['pass_']} | " + " | ".join(cells) + " |")
  if memory_rows:
    mem_names = [n for n in IMPLS if any(n in r["peak_bytes"] for r in memory_rows)]
    lines += ["", "Peak device memory of causal forward+backward, B1 N8 H128 bf16 (GiB; ratio to the "
              "8 tensors q, k, v, o, dq, dk, dv, do)", "",
              "| T | q bytes (GiB) | " + " | ".join(mem_names) + " |", "|---|---|" + "---|" * len(mem_names)]
    for r in memory_rows:
      cells = []
      for name in mem_names:
        peak = r["peak_bytes"].get(name)
        if isinstance(peak, int):
          cells.append(f"{peak / 2**30:.2f} ({r['ratio'][name]:.2f}×)")
        else:
          cells.append("OOM/error" if peak else "–")
      lines.append(f"| {r['seq_len']} | {r['tensor_bytes'] / 2**30:.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(speed_rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["head_dim"], r["is_causal"], r["pass_"]) for r in speed_rows})
  cols = 4
  fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(panels) // cols)),
                           squeeze=False)
  for ax, (h, c, p) in zip(axes.flat, panels):
    rows = [r for r in speed_rows if (r["head_dim"], r["is_causal"], r["pass_"]) == (h, c, p)]
    for name in IMPLS:
      pts = [(r["seq_len"], r["tflops"][name]) for r in rows if name in r["tflops"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_title(f"H={h} {'causal' if c else 'full'} {p}")
    ax.set_xlabel("T")
    ax.set_ylabel("TFLOP/s")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def environment() -> dict:
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)))


def main(argv=None) -> pathlib.Path:
  cfg = parse_args(argv)
  out = pathlib.Path(cfg.out_dir) / cfg.run
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  if cfg.tune:
    rows = tune(cfg)
    (out / "tune.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows), indent=1))
    return out
  if cfg.suite == "block_sparse":
    res = block_sparse_suite(cfg)
    header = (f"# Block-sparse kernel — {env['device']}, JAX {env['jax']}, {res['dtype']}, T={res['seq_len']}, "
              f"B1 N{res['num_heads']} H{res['head_dim']}, layout blocks {res['block']}, median of {cfg.repeats}")
    table = block_sparse_markdown(res, header)
    (out / "block_sparse.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), **res), indent=1))
    (out / "block_sparse.md").write_text(table)
    block_sparse_plot(res, out / "block_sparse.png")
    print(table)
    return out
  if cfg.suite == "linear":
    rows = linear_suite(cfg)
    targets = linear_targets(rows, cfg)
    header = (f"# Chunked causal linear attention — {env['device']}, JAX {env['jax']}, {rows[0]['dtype']}, B1 "
              f"N{cfg.linear_heads}, FAVOR+ with M features (pallas, xla) vs exact causal (cudnn), "
              f"median of {cfg.repeats}")
    table = linear_markdown(rows, targets, cfg, header)
    (out / "linear.json").write_text(json.dumps({"env": env, "config": dataclasses.asdict(cfg), "rows": rows,
                                                 "targets": targets}, indent=1))
    (out / "linear.md").write_text(table)
    linear_plot(rows, out / "linear.png")
    print(table)
    return out
  if cfg.suite == "families":

    def write(rows: list[dict]) -> str:
      r0 = rows[0]
      header = (f"# Every family — {env['device']}, JAX {env['jax']}, {r0['dtype']}, B1 N{r0['num_heads']} "
                f"H{r0['head_dim']}, causal (Linformer: non-causal), median of {cfg.repeats}")
      table = families_markdown(rows, header)
      (out / "families.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows),
                                                    indent=1))
      (out / "families.md").write_text(table)
      families_plot(rows, out / "families.png")
      return table

    print(write(families(cfg, on_length_done=write)))
    return out
  speed_rows = speed(cfg)
  memory_rows = memory(cfg) if cfg.memory_seq_lens else []
  header = f"# Exact attention kernels — {env['device']}, JAX {env['jax']}, bf16, B·T={cfg.tokens}, N·H={cfg.width}"
  table = markdown(speed_rows, memory_rows, header)
  (out / "flash.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), speed=speed_rows,
                                                  memory=memory_rows), indent=1))
  (out / "flash.md").write_text(table)
  plot(speed_rows, out / "flash.png")
  print(table)
  return out


if __name__ == "__main__":
  main()
