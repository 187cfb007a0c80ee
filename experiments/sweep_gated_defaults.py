"""Whole calls of the gated suite's rows under other default tilings: which `GatedBlockSizes.get_default`
to ship. Where `bench_attention.py --suite gated --tune` times the kernels alone, this times what a
user runs (`linear_attention` / `delta_rule_attention` with `implementation="pallas"`, the XLA-side
work included), with `get_default` overridden field by field, beside `linear-pallas` and cuDNN in the
same process.

    python experiments/sweep_gated_defaults.py --seq-lens 4096 16384 --run h200/gated

Writes `results/<run>/sweep.{json,md}`. On a CPU (`--smoke`) the Pallas rows run in Pallas'
interpreter at tiny sizes: a check that the script runs, not a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from unittest import mock

import jax
from tqdm import tqdm

from experiments import bench_gated
from experiments.bench_timing import environment, inputs, timed_passes
from pallas import gated

# (row, overrides of get_default's fields); the first row of each kind is the shipped default.
VARIANTS = (
    ("linear-pallas", {}),
    ("gla-pallas", {}),
    ("gla-pallas", dict(block_v=64)),
    ("gla-pallas", dict(block_m=32)),
    ("gla-pallas", dict(span_chunks=16)),
    ("gla-pallas", dict(span_chunks=32)),
    ("gla-pallas", dict(span_chunks=64)),
    ("delta-pallas", {}),
    ("delta-pallas", dict(block_v=32)),
    ("delta-pallas", dict(factor_warps=4)),
    ("softmax-cudnn", {}),
)


def overridden(over: dict):
  """A context in which `GatedBlockSizes.get_default` returns its usual tiling with `over` replaced."""
  usual = gated.GatedBlockSizes.get_default

  def patched(dtype, chunk=None, **kwargs):
    return dataclasses.replace(usual(dtype, chunk, **kwargs), **over)

  return mock.patch.object(gated.GatedBlockSizes, "get_default", staticmethod(patched))


def run(seq_lens, *, repeats: int, warmup: int, smoke: bool) -> list[dict]:
  on_gpu, dtype, n, h = bench_gated.setting(smoke)
  rows = []
  for t in seq_lens:
    q, k, v, do = inputs(jax.random.key(5), 1, t, n, h, dtype)
    # Smoke: the ungated row, the gated default and spans (of one chunk: a smoke run has few).
    variants = VARIANTS if not smoke else (VARIANTS[0], VARIANTS[1], ("gla-pallas", dict(span_chunks=1)))
    for name, over in tqdm(variants, desc=f"T={t}"):
      made = bench_gated.row_fn(name, t, n, on_gpu=on_gpu)
      if made is None:
        continue
      fn, aux = made
      with overridden(over):
        row = timed_passes(fn, q, k, v, do, repeats=repeats, warmup=warmup, aux=aux)
      row.update(row=name, seq_len=t, override=over)
      rows.append(row)
      tqdm.write(json.dumps(row))
  return rows


def markdown(rows: list[dict], env: dict, repeats: int) -> str:
  base = {r["seq_len"]: r["fwd_bwd_ms"] for r in rows if r["row"] == "linear-pallas" and r["status"] == "ok"}
  lines = [f"# Default tilings of the gated kernels, whole calls — {env['device']}, JAX {env['jax']}, "
           f"B1 N8 H128, causal, median of {repeats}", "",
           "`python experiments/sweep_gated_defaults.py`: each row is the gated suite's row "
           "(`bench_gated.row_fn`) with `GatedBlockSizes.get_default` overridden as listed; the last column is "
           "the ratio to `linear-pallas` at the same T.", "",
           "| row | T | override | fwd (ms) | fwd+bwd (ms) | fwd+bwd / linear-pallas |", "|---|---:|---|---:|---:|---:|"]
  for r in rows:
    over = ", ".join(f"{k}={v}" for k, v in r["override"].items()) or "–"
    if r["status"] != "ok":
      lines.append(f"| {r['row']} | {r['seq_len']} | {over} | {r['status'][:40]} | | |")
      continue
    ratio = r["fwd_bwd_ms"] / base[r["seq_len"]] if r["seq_len"] in base else float("nan")
    lines.append(f"| {r['row']} | {r['seq_len']} | {over} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {ratio:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds on a CPU")
  parser.add_argument("--run", default="gated_sweep")
  parser.add_argument("--out-dir", default="results")
  args = parser.parse_args(argv)
  if args.smoke:
    args.seq_lens, args.repeats, args.warmup = [80], 1, 0
  rows = run(args.seq_lens, repeats=args.repeats, warmup=args.warmup, smoke=args.smoke)
  out = pathlib.Path(args.out_dir) / args.run
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  (out / "sweep.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
  (out / "sweep.md").write_text(markdown(rows, env, args.repeats))
  print((out / "sweep.md").read_text())
  return rows


if __name__ == "__main__":
  main()
