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

Writes `results/<run>/flash.{json,md,png}`. `--suite families` times every family
(exact through XLA / cuDNN / Pallas, FAVOR+, linear, Linformer, block-sparse local),
causal where the family has a causal form (Linformer: non-causal), B1 N8 H64, T from 512 to
128k, forward and forward+backward, with the peak memory of forward+backward; a family that
runs out of memory is recorded as OOM and not run at longer T. It writes
`results/<run>/families.{json,md,png}`, the PNG showing time vs T (log-log): where each
approximate family overtakes exact attention.
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
from pallas.flash_attention import BlockSizes

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
  suite: str = "flash"  # or "families"
  family_seq_lens: tuple[int, ...] = tuple(512 * 2**i for i in range(9))  # 512 .. 128k
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
  parser.add_argument("--suite", choices=("flash", "families"), default=Config.suite)
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
  return cfg


# --------------------------------------------------------------------------- #
# contenders: name -> fn(q, k, v, is_causal) -> out, or None when unavailable
# --------------------------------------------------------------------------- #


def contender(name: str, dtype, head_dim: int, *, blocks: BlockSizes | None = None) -> Callable | None:
  on_gpu = jax.default_backend() == "gpu"
  if name == "pallas-triton":
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="triton", block_sizes=blocks)
  if name == "pallas-mgpu":
    from pallas import _flash_mosaic_gpu
    if not (on_gpu and _flash_mosaic_gpu.applies(dtype, _dims(head_dim), is_causal=False, has_segments=False)):
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
  from efficient_attention._checks import Dims
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

FAMILIES = ("softmax-xla", "softmax-cudnn", "softmax-pallas", "favor", "linear", "linformer", "local")


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
  if name == "favor":
    features = ea.orthogonal_random_features(jax.random.key(1), 256, h)
    return (lambda q, k, v: ea.favor_attention(q, k, v, features, is_causal=True)), True
  if name == "linear":
    return (lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True)), True
  if name == "linformer":
    proj = jax.random.normal(jax.random.key(2), (256, t), jnp.float32) / 16.0
    return (lambda q, k, v: ea.linformer_attention(q, k, v, proj.astype(q.dtype), proj.astype(q.dtype))), False
  if name == "local":
    layout = ea.layouts.local(t, window=256, block_size=128 if t >= 128 else 16)
    return (lambda q, k, v: ea.block_sparse_attention(q, k, v, layout, is_causal=True)), True
  raise ValueError(f"unknown family {name!r}; valid: {FAMILIES}")


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def families(cfg: Config) -> list[dict]:
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
  return "\n".join(lines)


def families_plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, (key, title) in zip(axes, (("fwd_bwd_ms", "forward+backward"), ("fwd_ms", "forward"),
                                     ("peak_bytes", "peak memory, forward+backward"))):
    for name in FAMILIES:
      pts = [(r["seq_len"], r[key] / (2**20 if key == "peak_bytes" else 1)) for r in rows
             if r["family"] == name and r["status"] == "ok" and r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
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
  if cfg.suite == "families":
    rows = families(cfg)
    r0 = rows[0]
    header = (f"# Every family — {env['device']}, JAX {env['jax']}, {r0['dtype']}, B1 N{r0['num_heads']} "
              f"H{r0['head_dim']}, causal (Linformer: non-causal), median of {cfg.repeats}")
    table = families_markdown(rows, header)
    (out / "families.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows), indent=1))
    (out / "families.md").write_text(table)
    families_plot(rows, out / "families.png")
    print(table)
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
