"""`--suite families`: every family (exact through XLA / cuDNN / Pallas, FAVOR+, linear, Linformer,
block-sparse local, LSH, GLA with per-feature gates, Gated DeltaNet), causal where the family has a
causal form (Linformer: non-causal), B1 N8 H64, T from 512 to 128k, forward and forward+backward,
with the peak memory of forward+backward; a family that runs out of memory is recorded as OOM and
not run at longer T. The PNG shows time vs T (log-log): where each approximate family overtakes
exact attention.
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
from experiments.bench_timing import inputs, timed_passes

if TYPE_CHECKING:
  from experiments.bench_attention import Config

FAMILIES = ("softmax-xla", "softmax-cudnn", "softmax-pallas", "favor", "favor-pallas", "linear", "linear-pallas",
            "linformer", "local", "local-pallas", "lsh", "gla", "delta_rule")
# LSH: chunks of 128 tokens (T / 4 below T = 512), two hash rounds, 2T / chunk buckets (half a chunk per bucket).
LSH_CHUNK, LSH_HASHES = 128, 2


def family_fn(name: str, t: int, h: int, *, on_gpu: bool, n: int = 8) -> tuple[Callable, bool, tuple] | None:
  """(fn, is_causal, aux) for family `name` at length t (n heads of h), fn(q, k, v, *aux) -> out, or None
  when unavailable. `aux` holds the family's fixed parameters (features, projections, gates), passed to
  the timed call as arguments (`timed_passes`)."""
  if name == "softmax-xla":
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="xla")), True, ()
  if name == "softmax-cudnn":
    if not on_gpu:
      return None
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="cudnn")), True, ()
  if name == "softmax-pallas":
    return (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=True, implementation="pallas")), True, ()
  base, _, impl = name.partition("-")
  if impl == "pallas" and base != "softmax" and not on_gpu:
    return None  # the linear and block-sparse kernels are timed compiled only
  impl = impl or None
  if base == "favor":
    features = ea.orthogonal_random_features(jax.random.key(1), 256, h)
    return (lambda q, k, v, f: ea.favor_attention(q, k, v, f, is_causal=True, implementation=impl)), True, (features,)
  if base == "linear":
    return (lambda q, k, v: ea.linear_attention(q, k, v, is_causal=True, implementation=impl)), True, ()
  if name == "linformer":
    proj = jax.random.normal(jax.random.key(2), (256, t), jnp.float32) / 16.0
    return (lambda q, k, v, p: ea.linformer_attention(q, k, v, p.astype(q.dtype), p.astype(q.dtype))), False, (proj,)
  if base == "local":
    layout = ea.layouts.local(t, window=256, block_size=128 if t >= 128 else 16)
    return (lambda q, k, v: ea.block_sparse_attention(q, k, v, layout, is_causal=True, implementation=impl)), True, ()
  if name == "lsh":
    chunk = min(LSH_CHUNK, max(t // 4, 1))
    rotations = ea.lsh_rotations(jax.random.key(3), h, num_buckets=max(2, 2 * (t // chunk)), num_hashes=LSH_HASHES)
    # Shared QK: q serves as queries and keys; k is unused.
    return (lambda q, k, v, r: ea.lsh_attention(q, v, r.astype(q.dtype), chunk_size=chunk, is_causal=True)), True, (
        rotations,)
  if name in ("gla", "delta_rule"):
    # Fixed random gates (and write strengths) in the modules' parametrisations, [1, T, N(, H)].
    logits = jax.random.normal(jax.random.key(4), (1, t, n, h if name == "gla" else 2), jnp.float32)
    if name == "gla":
      gates = jax.nn.log_sigmoid(logits) / 16.0
      return (lambda q, k, v, g: ea.linear_attention(q, k, v, feature_map="identity", normalize="none", gates=g,
                                                     is_causal=True)), True, (gates,)
    beta, gates = jax.nn.sigmoid(logits[..., 0]), -jax.nn.softplus(logits[..., 1])
    return (lambda q, k, v, b, g: ea.delta_rule_attention(q, k, v, b, gates=g)), True, (beta, gates)
  raise ValueError(f"unknown family {name!r}; valid: {FAMILIES}")

def families(cfg: Config, on_length_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """Every family at every T; `on_length_done(rows)` after each T, so a run cut short keeps what it measured."""
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  n, h = (8, 64) if not cfg.smoke else (2, 16)
  rows, stopped = [], {}
  key = jax.random.key(cfg.seed + 2)
  for t in tqdm(cfg.family_seq_lens, desc="families"):
    q, k, v, do = inputs(key, 1, t, n, h, dtype)
    for name in cfg.families or FAMILIES:
      row = dict(family=name, seq_len=t, num_heads=n, head_dim=h, dtype=jnp.dtype(dtype).name)
      if name in stopped:
        rows.append(dict(row, status=stopped[name]))
        continue
      made = family_fn(name, t, h, on_gpu=on_gpu, n=n)
      if made is None:
        continue
      fn, is_causal, aux = made
      row["is_causal"] = is_causal
      row.update(timed_passes(fn, q, k, v, do, repeats=cfg.repeats, warmup=cfg.warmup, memory=True, aux=aux))
      if row["status"] != "ok":
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


def run(cfg: Config, out: pathlib.Path, env: dict) -> None:
  """Writes `families.{json,md,png}` under `out`, again after every sequence length."""

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
