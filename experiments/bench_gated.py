"""`--suite gated`: the gated linear-attention and delta-rule kernels (`pallas.gated`) against the
ungated linear kernel, their XLA paths and cuDNN causal attention, B1 N8 H128 (bf16 on a GPU), T from
1k to 64k, forward and forward+backward, median of `repeats` calls of each.

Rows: `softmax-cudnn` (causal flash attention, GPU only), `linear-pallas` (the ungated chunked kernel,
elu+1 features), `gla-pallas` / `gla-xla` (identity features, no denominator, one log forget gate
per step and head, `log_sigmoid(x + 2)`), `delta-pallas` / `delta-xla` (Gated DeltaNet: beta =
`sigmoid(x)`, gates `-softplus(x)`). The markdown states the targets of the gated kernels: gated
within 1.3x the ungated kernel at T=16k, faster than cuDNN from T=4k, and T=64k / T=8k <= 8.5
(linear time). On a CPU (`--smoke`) the Pallas rows run in Pallas' interpreter: a check that the
suite runs, not a timing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

import efficient_attention as ea
from experiments.bench_timing import forward_backward, inputs, timed_passes
from experiments.device_trace import kernels_cell, trace_legend, trace_step

if TYPE_CHECKING:
  from experiments.bench_attention import Config

ROWS = ("softmax-cudnn", "linear-pallas", "gla-pallas", "gla-xla", "delta-pallas", "delta-xla")
# Not in the default set: the ungated kernel called directly through one backend each (elu+1 features
# made by XLA), to compare the Pallas-Triton lowering with the jax_triton kernels; the delta rule's
# kernels called directly (q and k normalised by XLA) with the default tiling and with each of its
# walks (`GatedBlockSizes.delta_walk`), side by side (GPU only).
KERNEL_ROWS = ("linear-triton", "linear-jax_triton", "delta-kernel", "delta-kernel_split")
# The targets (issue text): ratios of forward+backward times.
GATED_VS_UNGATED_LEN, GATED_VS_UNGATED_MAX = 16384, 1.3
CUDNN_FROM_LEN = 4096
SCALING_LENS, SCALING_MAX = (8192, 65536), 8.5


def row_fn(name: str, t: int, n: int, *, on_gpu: bool) -> tuple[Callable, tuple] | None:
  """(fn, aux) for a row at length t (n heads): fn(q, k, v, *aux) -> out, with the row's gates and beta in
  `aux` (arguments of the timed call, `timed_passes`); None where the row does not run."""
  if name == "softmax-cudnn":
    if not on_gpu:
      return None
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="cudnn")), ()
  base, _, impl = name.partition("-")
  logits = jax.random.normal(jax.random.key(4), (1, t, n, 2), jnp.float32)
  if name in KERNEL_ROWS:
    if not on_gpu:
      return None
    from pallas import gated, linear

    if base == "delta":
      walk = impl.partition("_")[2] or "direct"

      def delta(q, k, v, beta, gates):
        blocks = dataclasses.replace(gated.GatedBlockSizes.get_default(q.dtype), delta_walk=walk)
        q, k = (ea._delta.l2_normalize(x.astype(jnp.float32)).astype(x.dtype) for x in (q, k))
        q = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(k.dtype)
        return gated.delta_rule(q, k, v, beta, gates, block_sizes=blocks)

      return delta, (jax.nn.sigmoid(logits[..., 0]), -jax.nn.softplus(logits[..., 1]))

    def kernel(q, k, v):
      phi_q, phi_k = (jax.nn.elu(x.astype(jnp.float32)) + 1.0 for x in (q, k))
      return linear.causal_linear_attention(phi_q.astype(q.dtype), phi_k.astype(k.dtype), v, backend=impl)

    return kernel, ()
  if base == "linear":
    return (lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True, implementation=impl)), ()
  if base == "gla":
    gates = jax.nn.log_sigmoid(logits[..., 0] + 2.0)
    return (lambda q, k, v, gates: ea.linear_attention(q, k, v, feature_map="identity", normalize="none", gates=gates,
                                                      is_causal=True, implementation=impl)), (gates,)
  if base == "delta":
    beta, gates = jax.nn.sigmoid(logits[..., 0]), -jax.nn.softplus(logits[..., 1])
    return (lambda q, k, v, beta, gates: ea.delta_rule_attention(q, k, v, beta, gates=gates, implementation=impl),
            (beta, gates))
  raise ValueError(f"unknown row {name!r}; valid: {ROWS + KERNEL_ROWS}")


def setting(smoke: bool) -> tuple[bool, Any, int, int]:
  """(on_gpu, dtype, heads, head dim) of the suite: bf16 B1 N8 H128 on a GPU, float32 elsewhere,
  N2 H16 for a smoke run."""
  on_gpu = jax.default_backend() == "gpu"
  return on_gpu, jnp.bfloat16 if on_gpu else jnp.float32, *((8, 128) if not smoke else (2, 16))


def measure(cfg: Config, on_length_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Every row at every T; a row that runs out of memory is not run at longer T."""
  on_gpu, dtype, n, h = setting(cfg.smoke)
  rows, stopped = [], {}
  key = jax.random.key(cfg.seed + 5)
  for t in tqdm(cfg.gated_seq_lens, desc="gated"):
    q, k, v, do = inputs(key, 1, t, n, h, dtype)
    for name in cfg.gated_rows or ROWS:
      row = dict(row=name, seq_len=t, num_heads=n, head_dim=h, dtype=jnp.dtype(dtype).name)
      if name in stopped:
        rows.append(dict(row, status=stopped[name]))
        continue
      made = row_fn(name, t, n, on_gpu=on_gpu)
      if made is None:
        continue
      fn, aux = made
      row.update(timed_passes(fn, q, k, v, do, repeats=cfg.repeats, warmup=cfg.warmup, aux=aux, pipelined=True))
      if row["status"] != "ok":
        stopped[name] = row["status"] if row["status"] == "OOM" else "skipped after an error"
      rows.append(row)
      tqdm.write(json.dumps(row))
    if on_length_done is not None:
      on_length_done(rows)
  return rows


def _time(rows: list[dict], name: str, t: int, key: str = "fwd_bwd_ms") -> float | None:
  r = next((r for r in rows if r["row"] == name and r["seq_len"] == t and r.get("status") == "ok"), None)
  return None if r is None else r[key]


def targets(rows: list[dict]) -> list[dict]:
  """Each target with its measured value (None where a time is missing) and whether it is met."""
  out = []
  for gated in ("gla-pallas",):
    a, b = _time(rows, gated, GATED_VS_UNGATED_LEN), _time(rows, "linear-pallas", GATED_VS_UNGATED_LEN)
    value = None if a is None or b is None else a / b
    out.append(dict(target=f"{gated} / linear-pallas, fwd+bwd, T={GATED_VS_UNGATED_LEN}", limit=GATED_VS_UNGATED_MAX,
                    value=value, met=None if value is None else value <= GATED_VS_UNGATED_MAX))
  lens = sorted({r["seq_len"] for r in rows if r["seq_len"] >= CUDNN_FROM_LEN})
  for name in ("gla-pallas", "delta-pallas"):
    ratios = {t: (_time(rows, name, t), _time(rows, "softmax-cudnn", t)) for t in lens}
    ratios = {t: a / b for t, (a, b) in ratios.items() if a is not None and b is not None}
    worst = max(ratios.values()) if ratios else None
    out.append(dict(target=f"{name} / softmax-cudnn, fwd+bwd, every T >= {CUDNN_FROM_LEN}", limit=1.0, value=worst,
                    met=None if worst is None else worst < 1.0))
    lo, hi = (_time(rows, name, t) for t in SCALING_LENS)
    value = None if lo is None or hi is None else hi / lo
    out.append(dict(target=f"{name}, fwd+bwd time T={SCALING_LENS[1]} / T={SCALING_LENS[0]}", limit=SCALING_MAX,
                    value=value, met=None if value is None else value <= SCALING_MAX))
  return out


def markdown(rows: list[dict], header: str) -> str:
  names = [f for f in ROWS + KERNEL_ROWS if any(r["row"] == f for r in rows)]
  lens = sorted({r["seq_len"] for r in rows})
  lines = [header, ""]
  for key, title in (("fwd_bwd_ms", "forward+backward (ms)"), ("fwd_ms", "forward (ms)"),
                     ("fwd_bwd_pipelined_ms", "forward+backward, calls dispatched back to back, one wait at the end "
                                              "(ms per call: the device's queue without the host's wait on each call)")):
    if not any(key in r for r in rows):
      continue
    lines += [title, "", "| T | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in lens:
      cells = []
      for name in names:
        r = next((r for r in rows if r["row"] == name and r["seq_len"] == t), None)
        cells.append("–" if r is None or (r["status"] == "ok" and key not in r) else (f"{r[key]:.3g}" if r["status"] == "ok" else
                                           ("OOM" if r["status"] == "OOM" else "error")))
      lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
  if "softmax-cudnn" in names:
    lines += ["Ratio of forward+backward times to cuDNN causal attention (< 1: faster)", "",
              "| T | " + " | ".join(n for n in names if n != "softmax-cudnn") + " |",
              "|---|" + "---|" * (len(names) - 1)]
    for t in lens:
      base = _time(rows, "softmax-cudnn", t)
      cells = []
      for name in names:
        if name == "softmax-cudnn":
          continue
        mine = _time(rows, name, t)
        cells.append("–" if mine is None or base is None else f"{mine / base:.2f}")
      lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["Targets", "", "| target | limit | measured | met |", "|---|---:|---:|---|"]
  for tg in targets(rows):
    value = "–" if tg["value"] is None else f"{tg['value']:.2f}"
    met = "not measured" if tg["met"] is None else ("yes" if tg["met"] else "**no**")
    lines.append(f"| {tg['target']} | {tg['limit']} | {value} | {met} |")
  lines.append("")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for ax, (key, title) in zip(axes, (("fwd_bwd_ms", "forward+backward"), ("fwd_ms", "forward"))):
    for name in ROWS + KERNEL_ROWS:
      pts = [(r["seq_len"], r[key]) for r in rows if r["row"] == name and r["status"] == "ok"]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name.endswith("xla") or
                name.startswith("softmax") else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# The tiling sweep of `--tune`: (chunk, block_m, block_v, block_v_out, num_warps, num_stages).
TUNE_GRID = ((64, 64, 64, 128, 4, 2), (64, 64, 64, 64, 4, 2), (64, 64, 64, 128, 8, 2), (64, 64, 64, 128, 4, 3),
             (64, 32, 64, 128, 4, 2), (64, 64, 32, 128, 4, 2), (64, 64, 128, 128, 8, 2), (128, 64, 64, 128, 8, 2),
             (64, 128, 64, 128, 8, 2), (32, 64, 64, 64, 4, 2), (128, 64, 64, 64, 8, 2), (64, 64, 64, 128, 4, 1),
             (64, 64, 32, 128, 4, 3), (64, 32, 64, 128, 4, 3))


def tune(cfg: Config) -> list[dict]:
  """Forward and forward+backward time of the two kernels themselves (`pallas.gated`, no feature
  map or WY factors around them) for every tiling in `TUNE_GRID` at each `gated_seq_lens`."""
  import pallas
  from pallas.gated import GatedBlockSizes

  on_gpu, dtype, n, h = setting(cfg.smoke)
  grid = TUNE_GRID if not cfg.smoke else TUNE_GRID[:2]
  rows = []
  for t in cfg.gated_seq_lens:
    q, k, v, do = inputs(jax.random.key(cfg.seed + 6), 1, t, n, h, dtype)
    q, k = q * h**-0.5, k * h**-0.5
    w = (0.1 * v).astype(dtype)
    gates = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(cfg.seed + 7), (1, t, n), jnp.float32) + 2.0)
    for kind in ("gla", "delta"):
      for chunk, bm, bv, bvo, warps, stages in tqdm(grid, desc=f"tune {kind} T={t}"):
        blocks = GatedBlockSizes(chunk=chunk, block_m=bm, block_v=bv, block_v_out=bvo, num_warps=warps,
                                 num_stages=stages)
        if kind == "gla":
          fn = lambda q, k, v, w, gates, b=blocks: pallas.gated_linear_attention(q, k, v, gates, block_sizes=b)
        else:
          fn = lambda q, k, v, w, gates, b=blocks: pallas.delta_rule_recurrence(q, k, w, v, gates, block_sizes=b)
        row = dict(kind=kind, seq_len=t, num_heads=n, head_dim=h, dtype=jnp.dtype(dtype).name,
                   **dataclasses.asdict(blocks))
        row.update(timed_passes(fn, q, k, v, do, repeats=cfg.repeats, warmup=cfg.warmup, aux=(w, gates)))
        rows.append(row)
        tqdm.write(json.dumps(row))
  return rows


def tune_markdown(rows: list[dict], header: str) -> str:
  lines = [header, "", "Forward+backward / forward (ms) of the kernels alone; the fastest forward+backward per "
           "kernel and length in bold.", "",
           "| kernel | T | chunk | block_m | block_v | block_v_out | warps | stages | fwd+bwd | fwd |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ok = [x["fwd_bwd_ms"] for x in rows if x["kind"] == r["kind"] and x["seq_len"] == r["seq_len"]
          and x["status"] == "ok"]
    if r["status"] == "ok":
      best = r["fwd_bwd_ms"] == min(ok)
      fb = f"**{r['fwd_bwd_ms']:.3g}**" if best else f"{r['fwd_bwd_ms']:.3g}"
      f = f"{r['fwd_ms']:.3g}"
    else:
      fb, f = r["status"][:40], "–"
    lines.append(f"| {r['kind']} | {r['seq_len']} | {r['chunk']} | {r['block_m']} | {r['block_v']} | "
                 f"{r['block_v_out']} | {r['num_warps']} | {r['num_stages']} | {fb} | {f} |")
  return "\n".join(lines + [""])


def trace(cfg: Config) -> list[dict]:
  """Each row's forward+backward (`forward_backward`: the output and the gradients) under the profiler,
  `device_trace.TRACE_CALLS` calls after two warm-up calls: GPU busy ms per call, launches, and the kernels by time.
  A CPU trace holds no device kernels: its rows are empty (busy 0)."""
  on_gpu, dtype, n, h = setting(cfg.smoke)
  rows = []
  for t in cfg.gated_seq_lens:
    q, k, v, do = inputs(jax.random.key(cfg.seed + 5), 1, t, n, h, dtype)
    for name in tqdm(cfg.gated_rows or ROWS, desc=f"trace T={t}"):
      made = row_fn(name, t, n, on_gpu=on_gpu)
      if made is None:
        continue
      fn, aux = made
      summary = trace_step(jax.jit(forward_backward(fn)), (q, k, v, do, *aux))
      rows.append(dict(row=name, seq_len=t, num_heads=n, head_dim=h, dtype=jnp.dtype(dtype).name, **summary))
  return rows


def trace_markdown(rows: list[dict], header: str) -> str:
  lines = [header, "", trace_legend("forward+backward call (output and gradients)"), "",
           "| row | T | busy (ms) | launches | kernels |", "|---|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['row']} | {r['seq_len']} | {r['busy_ms']:.3f} | {r['launches']:g} | "
                 f"{kernels_cell(r)} |")
  return "\n".join(lines + [""])


def _write(out: pathlib.Path, stem: str, table: str, env: dict, cfg: Config, rows: list[dict], **extra) -> None:
  """`<stem>.json` (environment, config, rows and `extra`) and `<stem>.md` (`table`) under `out`."""
  (out / f"{stem}.json").write_text(json.dumps(dict(env=env, config=dataclasses.asdict(cfg), rows=rows, **extra),
                                               indent=1))
  (out / f"{stem}.md").write_text(table)


def run(cfg: Config, out: pathlib.Path, env: dict) -> None:
  """Writes `gated.{json,md,png}` under `out`, again after every sequence length (`--tune`:
  `tune.{json,md}`, the tiling sweep; `--trace`: `trace.{json,md}`, per-kernel GPU time)."""
  _, dtype, n, h = setting(cfg.smoke)
  shape = f"{jnp.dtype(dtype).name}, B1 N{n} H{h}"
  if cfg.trace or cfg.tune:
    if cfg.trace:
      stem, rows = "trace", trace(cfg)
      table = trace_markdown(rows, f"# Per-kernel GPU time of the gated suite's rows — {env['device']}, "
                                   f"JAX {env['jax']}, {shape}, causal")
    else:
      stem, rows = "tune", tune(cfg)
      table = tune_markdown(rows, f"# Tiling of the gated kernels — {env['device']}, JAX {env['jax']}, {shape}, "
                                  f"median of {cfg.repeats}")
    _write(out, stem, table, env, cfg, rows)
    print(table)
    return

  def write(rows: list[dict]) -> str:
    if not rows:
      return ""
    table = markdown(rows, f"# Gated linear attention and the delta rule — {env['device']}, JAX {env['jax']}, "
                           f"{shape}, causal, median of {cfg.repeats}")
    _write(out, "gated", table, env, cfg, rows, targets=targets(rows))
    plot(rows, out / "gated.png")
    return table

  print(write(measure(cfg, on_length_done=write)))
