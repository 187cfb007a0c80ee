"""`--suite block_sparse`: `pallas.block_sparse_attention` (T=16k, B1 N16 H128, layout blocks of 128)
forward and forward+backward at 100%, 50%, 25%, 12.5%, 6.25% and 3.1% live blocks (a local window | a
few global blocks; 100% = every block), relative to its own all-live time, then a Longformer
layout (window 512 each side + 64 global tokens) against dense cuDNN causal attention in the same
run, checking the outputs agree on the rows where the masks do. With `--trace`, instead: the GPU
time of each kernel of the forward and forward+backward at each density (`trace.{json,md}`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import efficient_attention as ea
import pallas
from experiments.bench_timing import forward_backward, inputs, timed_passes
from experiments.device_trace import kernels_cell, trace_legend, trace_step

if TYPE_CHECKING:
  from experiments.bench_attention import Config

# A target density this far (relative) from every two-sided window + global layout takes one-sided windows too.
_ONE_SIDED_BEYOND = 0.15


def density_layout(t: int, block: int, density: float):
  """A local window | a few global blocks with the density closest to `density` (1: every block live).

  Windows are two-sided (`layouts.local`); where none of those lands within 15% of the target (at
  T=16k in blocks of 128 they go 2.3%, 3.9%, 5.4%, 6.9%, ...: nothing near 3.1%), one-sided windows
  (each query block and the w key blocks before it) | global blocks are candidates as well.
  """
  if density >= 1.0:
    return ea.layouts.dense(t, block_size=block)
  nq = -(-t // block)
  globals_ = [ea.layouts.global_tokens(t, num_global=g * block, block_size=block) for g in range(1, 5)]
  candidates = [ea.layouts.local(t, window=w * block, block_size=block) | g for g in globals_ for w in range(nq)]
  best = min(candidates, key=lambda layout: abs(layout.density - density))
  if abs(best.density - density) <= _ONE_SIDED_BEYOND * density:
    return best
  rows, cols = np.arange(nq)[:, None], np.arange(nq)[None, :]
  bands = [ea.BlockLayout((rows - cols >= 0) & (rows - cols <= w), block, block) for w in range(nq)]
  return min([best, *(band | g for g in globals_ for band in bands)], key=lambda layout: abs(layout.density - density))

def _agreeing_rows(layout, t: int) -> list[int]:
  """Query rows whose causal row of `layout` is the whole causal row (every key block up to the diagonal live)."""
  b = layout.block_q
  return [r for i in range(layout.grid[0]) if layout.blocks[i, : i * b // layout.block_k + 1].all()
          for r in range(i * b, min((i + 1) * b, t))]

def _suite_inputs(cfg: Config) -> tuple[bool, jax.Array, jax.Array, jax.Array, jax.Array]:
  """(on a GPU, q, k, v, dO) of the suite: B1, T, N, H of `cfg`, bf16 on a GPU, else float32."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  return on_gpu, *inputs(jax.random.key(cfg.seed + 3), 1, cfg.sparse_seq_len, cfg.sparse_heads,
                         cfg.sparse_head_dim, dtype)


def block_sparse_suite(cfg: Config) -> dict:
  """Forward and forward+backward time of `pallas.block_sparse_attention` vs density, and Longformer vs dense."""
  on_gpu, q, k, v, do = _suite_inputs(cfg)
  t, n, h, block, dtype = cfg.sparse_seq_len, cfg.sparse_heads, cfg.sparse_head_dim, cfg.sparse_block, q.dtype
  dense_name = "cudnn" if on_gpu else "xla"

  def timed(fn) -> dict:
    row = timed_passes(fn, q, k, v, do, repeats=cfg.repeats, warmup=cfg.warmup)
    if row.pop("status") != "ok":
      raise RuntimeError(f"block-sparse suite: a timed call failed: {row}")
    return row

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
  # Time follows the live blocks down to the sparsest layouts (long rows split over programs).
  for goal in (0.0625, 0.03125):
    r = min(res["density"], key=lambda r: abs(r["target"] - goal))
    if "fwd_bwd_ratio" in r and r["target"] == goal:
      met = r["fwd_bwd_ratio"] <= 1.3 * r["density"]
      lines.append(f"{100 * r['density']:.2f}% live: forward+backward {r['fwd_bwd_ratio']:.3f}× the all-live time, "
                   f"{r['fwd_bwd_ratio'] / r['density']:.2f}× the density (target <= 1.3×: "
                   f"{'met' if met else 'missed'}).")
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


def trace(cfg: Config) -> list[dict]:
  """Per density of the suite and pass (forward; forward+backward with the output), the kernels' GPU time
  over `device_trace.TRACE_CALLS` calls after two warm-up calls: busy ms per call, launches, and the kernels by
  time. A CPU trace holds no device kernels: its rows are empty (busy 0)."""
  _, q, k, v, do = _suite_inputs(cfg)
  t, n, h, block = cfg.sparse_seq_len, cfg.sparse_heads, cfg.sparse_head_dim, cfg.sparse_block
  rows = []
  for target in tqdm(cfg.densities, desc="trace block-sparse density"):
    layout = density_layout(t, block, target)
    fn = lambda q, k, v, layout=layout: pallas.block_sparse_attention(q, k, v, layout)
    for name, step, args in (("fwd", jax.jit(fn), (q, k, v)), ("fwd+bwd", jax.jit(forward_backward(fn)), (q, k, v, do))):
      rows.append(dict(target=target, density=layout.density, live_blocks=int(layout.blocks.sum()), passes=name,
                       seq_len=t, num_heads=n, head_dim=h, block=block, dtype=jnp.dtype(q.dtype).name,
                       **trace_step(step, args)))
  return rows


def trace_markdown(rows: list[dict], header: str) -> str:
  lines = [header, "", trace_legend("call"), "",
           "| density | live blocks | pass | busy (ms) | launches | kernels |", "|---:|---:|---|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {100 * r['density']:.2f}% | {r['live_blocks']} | {r['passes']} | {r['busy_ms']:.3f} | "
                 f"{r['launches']:g} | {kernels_cell(r)} |")
  return "\n".join(lines + [""])


def run(cfg: Config, out: pathlib.Path, env: dict) -> None:
  """Writes `block_sparse.{json,md,png}` under `out` (`--trace`: `trace.{json,md}`, per-kernel GPU time)."""
  if cfg.trace:
    rows = trace(cfg)
    table = trace_markdown(rows, f"# Per-kernel GPU time of the block-sparse kernel — {env['device']}, JAX "
                                 f"{env['jax']}, T={cfg.sparse_seq_len}, B1 N{cfg.sparse_heads} H{cfg.sparse_head_dim}, "
                                 f"layout blocks {cfg.sparse_block}, non-causal")
    (out / "trace.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows), indent=1))
    (out / "trace.md").write_text(table)
    print(table)
    return
  res = block_sparse_suite(cfg)
  header = (f"# Block-sparse kernel — {env['device']}, JAX {env['jax']}, {res['dtype']}, T={res['seq_len']}, "
            f"B1 N{res['num_heads']} H{res['head_dim']}, layout blocks {res['block']}, median of {cfg.repeats}")
  table = block_sparse_markdown(res, header)
  (out / "block_sparse.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), **res), indent=1))
  (out / "block_sparse.md").write_text(table)
  block_sparse_plot(res, out / "block_sparse.png")
  print(table)
