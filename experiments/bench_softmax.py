"""`--suite softmax`: exact-attention implementations side by side, speed (TFLOP/s) and peak memory.

On a GPU, one run times, on the same inputs (bf16, `[B, T, N, H]`, B·T = 16k tokens,
N·H = 2048), forward and forward+backward:

  pallas-triton    pallas.flash_attention(backend="triton")
  pallas-mgpu      pallas.flash_attention(backend="mosaic_gpu")  (Hopper, when it applies)
  jax-triton       pallas.flash_attention(backend="jax_triton")  (where jax_triton runs)
  cudnn            jax.nn.dot_product_attention(implementation="cudnn")
  xla              jax.nn.dot_product_attention(implementation="xla")
  jax-pallas-mha   jax.experimental.pallas.ops.gpu.attention.mha (JAX's bundled Pallas kernel)

TFLOP/s counts 4·B·N·T²·H (halved when causal; ×3.5 for forward+backward). Each
time is the median of `--repeats` runs after warm-up. Then the peak device memory
of forward+backward at long T (B1 N8 H128), from the compiled executable. `--tune`
sweeps the Triton block sizes instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

import pallas
from pallas import softmax_jax_triton, softmax_mosaic_gpu
from pallas.common import Dims
from pallas.softmax import BlockSizes
from experiments.bench_timing import compile_pass, inputs, median_time, peak_bytes

if TYPE_CHECKING:
  from experiments.bench_attention import Config

IMPLS = ("pallas-triton", "pallas-mgpu", "jax-triton", "cudnn", "xla", "jax-pallas-mha")


def contender(name: str, dtype, head_dim: int, *, blocks: BlockSizes | None = None) -> Callable | None:
  on_gpu = jax.default_backend() == "gpu"
  if name == "pallas-triton":
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="triton", block_sizes=blocks)
  if name == "pallas-mgpu":
    if not (on_gpu and softmax_mosaic_gpu.applies(dtype, _dims(head_dim), is_causal=False, has_segments=False)):
      return None
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="mosaic_gpu")
  if name == "jax-triton":
    if not softmax_jax_triton.available():
      return None
    return lambda q, k, v, c: pallas.flash_attention(q, k, v, is_causal=c, backend="jax_triton", block_sizes=blocks)
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
  return Dims(batch=1, q_len=4096, kv_len=4096, num_heads=8, num_kv_heads=8, head_dim=head_dim,
              v_head_dim=head_dim)

def flops(b: int, t: int, n: int, h: int, *, is_causal: bool, backward: bool) -> float:
  f = 4.0 * b * n * t * t * h
  f = f / 2 if is_causal else f
  return f * 3.5 if backward else f

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


def run(cfg: Config, out: pathlib.Path, env: dict) -> None:
  """Writes `softmax.{json,md,png}` under `out` (with `--tune`, `tune.json`)."""
  if cfg.tune:
    rows = tune(cfg)
    (out / "tune.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows), indent=1))
    return
  speed_rows = speed(cfg)
  memory_rows = memory(cfg) if cfg.memory_seq_lens else []
  header = f"# Exact attention kernels — {env['device']}, JAX {env['jax']}, bf16, B·T={cfg.tokens}, N·H={cfg.width}"
  table = markdown(speed_rows, memory_rows, header)
  (out / "softmax.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), speed=speed_rows,
                                                    memory=memory_rows), indent=1))
  (out / "softmax.md").write_text(table)
  plot(speed_rows, out / "softmax.png")
  print(table)
