"""`--suite favor`: causal FAVOR+ (B1 N8; H=64 with M=128 features, H=128 with M=256) through the
Pallas kernels (`pallas.causal_favor_attention`: the feature kernels and the chunked causal
linear kernel) and the pure-JAX chunked form (`implementation="xla"`), and cuDNN exact causal
attention on the same q, k, v, T from 1k to 64k, forward and forward+backward, with the ratios
the kernels are held to (Pallas at 64k over 8k, the T from which it beats cuDNN, XLA over Pallas
at 16k), each from two timings: the median of calls each waited for, and calls dispatched back to
back with one wait at the end (`pipelined_time`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

import efficient_attention as ea
from experiments.bench_timing import compile_pass, inputs, is_oom, median_time, pipelined_time

if TYPE_CHECKING:
  from experiments.bench_attention import Config

FAVOR_IMPLS = ("pallas", "xla", "cudnn")


def favor_fn(name: str, features: jax.Array) -> Callable | None:
  """fn(q, k, v, is_causal) -> out: FAVOR+ through `implementation=name`, or cuDNN exact attention."""
  if name == "cudnn":
    if jax.default_backend() != "gpu":
      return None
    return lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")
  return lambda q, k, v, c: ea.favor_attention(q, k, v, features, is_causal=c, implementation=name)

def favor_suite(cfg: Config) -> list[dict]:
  """Causal forward and forward+backward times (ms) for every (H, M) shape, T and contender."""
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  rows, stopped = [], {}
  key = jax.random.key(cfg.seed + 3)
  cases = [(h, m, t, bwd) for h, m in cfg.favor_shapes for t in cfg.favor_seq_lens for bwd in (False, True)]
  for h, m, t, backward in tqdm(cases, desc="favor"):
    features = ea.orthogonal_random_features(jax.random.key(1), m, h)
    args = inputs(key, 1, t, cfg.favor_heads, h, dtype)
    row = {"head_dim": h, "num_features": m, "seq_len": t, "num_heads": cfg.favor_heads,
           "dtype": jnp.dtype(dtype).name, "pass_": "fwd+bwd" if backward else "fwd", "ms": {}, "ms_pipelined": {},
           "error": {}}
    for name in FAVOR_IMPLS:
      fn = favor_fn(name, features)
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
        row["error"][name] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        stopped[(h, m, backward, name)] = "skipped after " + row["error"][name][:40]
    rows.append(row)
  return rows

def favor_targets(rows: list[dict], cfg: Config) -> list[dict]:
  """Per (H, M) and pass: Pallas time at the longest T over its time at `favor_base_len`, the
  shortest T from which Pallas beats cuDNN at every longer T, and XLA / Pallas at `favor_xla_len`."""
  out = []
  for h, m in cfg.favor_shapes:
    for pass_ in ("fwd", "fwd+bwd"):
      target = {"head_dim": h, "num_features": m, "pass_": pass_, "base": cfg.favor_base_len}
      # Per timing: "" the synchronous median, "_pipelined" back-to-back calls.
      for key, suffix in (("ms", ""), ("ms_pipelined", "_pipelined")):
        rs = {r["seq_len"]: r.get(key, {}) for r in rows
              if (r["head_dim"], r["num_features"], r["pass_"]) == (h, m, pass_)}
        lens = sorted(rs)
        target["longest"] = lens[-1]
        pallas_ms = {t: ms["pallas"] for t, ms in rs.items() if "pallas" in ms}
        if lens[-1] in pallas_ms and cfg.favor_base_len in pallas_ms:
          target["longest_over_base" + suffix] = pallas_ms[lens[-1]] / pallas_ms[cfg.favor_base_len]
        beats = [t for t in lens
                 if all(rs[u].get("pallas", float("inf")) < rs[u].get("cudnn", 0.0) for u in lens if u >= t)]
        target["beats_cudnn_from" + suffix] = beats[0] if beats else None
        at = rs.get(cfg.favor_xla_len, {})
        if "pallas" in at and "xla" in at:
          target["xla_over_pallas" + suffix] = at["xla"] / at["pallas"]
      out.append(target)
  return out

def favor_markdown(rows: list[dict], targets: list[dict], cfg: Config, header: str) -> str:
  lines = [header, "",
           "Time (ms) per call; ratios > 1 mean the Pallas kernel is faster. `sync`: median of calls each waited",
           "for (host dispatch and wake-up latency included); `pipelined`: calls dispatched back to back, one",
           "wait at the end (the device's time per call, as in a training loop).", "",
           "| H | M | T | pass | pallas | xla | cudnn | xla / pallas | cudnn / pallas | pallas / pallas@base "
           "| pipelined: pallas | xla | cudnn | xla / pallas | cudnn / pallas |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  base = {(r["head_dim"], r["num_features"], r["pass_"]): r["ms"].get("pallas") for r in rows
          if r["seq_len"] == cfg.favor_base_len}

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
                 + " | ".join(cell(r, n, "ms_pipelined") for n in FAVOR_IMPLS)
                 + f" | {ratio(mp.get('xla'), mp.get('pallas'))} | {ratio(mp.get('cudnn'), mp.get('pallas'))} |")
  lines += ["", f"Targets (base T={cfg.favor_base_len}; XLA compared at T={cfg.favor_xla_len}), sync / pipelined", "",
            "| H | M | pass | pallas T_max / T_base | faster than cuDNN from T | xla / pallas |",
            "|---|---|---|---|---|---|"]

  def pair(t, key, fmt):
    return " / ".join("–" if t.get(key + s) is None else fmt(t[key + s]) for s in ("", "_pipelined"))

  for t in targets:
    scaling = pair(t, "longest_over_base", lambda x: f"{x:.2f}") + f" (T {t['longest']} / {t['base']})"
    lines.append(f"| {t['head_dim']} | {t['num_features']} | {t['pass_']} | {scaling} | "
                 f"{pair(t, 'beats_cudnn_from', str)} | {pair(t, 'xla_over_pallas', lambda x: f'{x:.2f}')} |")
  return "\n".join(lines) + "\n"

def favor_plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["head_dim"], r["num_features"], r["pass_"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, (h, m, p) in zip(axes.flat, panels):
    for name in FAVOR_IMPLS:
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


def run(cfg: Config, out: pathlib.Path, env: dict) -> None:
  """Writes `favor.{json,md,png}` under `out`."""
  rows = favor_suite(cfg)
  targets = favor_targets(rows, cfg)
  header = (f"# Causal FAVOR+ — {env['device']}, JAX {env['jax']}, {rows[0]['dtype']}, B1 "
            f"N{cfg.favor_heads}, FAVOR+ with M features (pallas, xla) vs exact causal (cudnn), "
            f"median of {cfg.repeats}")
  table = favor_markdown(rows, targets, cfg, header)
  (out / "favor.json").write_text(json.dumps({"env": env, "config": dataclasses.asdict(cfg), "rows": rows,
                                              "targets": targets}, indent=1))
  (out / "favor.md").write_text(table)
  favor_plot(rows, out / "favor.png")
  print(table)
