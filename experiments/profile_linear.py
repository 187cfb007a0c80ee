"""Where the time of causal FAVOR+ goes: per-kernel GPU time from a device trace.

For each (H, M, T) case and implementation (`pallas`, `xla`, and cuDNN exact causal
attention for scale) it compiles forward+backward (as `bench_attention.py --suite
favor` does: B1, N heads, bf16), warms up, traces `--calls` calls with
`jax.profiler`, and reads the GPU kernels back from the trace: per call, the wall
time on the host, the GPU busy time (union of kernel intervals), the number of
kernel launches, and the kernels grouped by name (the Pallas kernels by their
`pallas_call` name, XLA's by fusion name).

    python experiments/profile_linear.py --run h100/linear_profile
    python experiments/profile_linear.py --cases 64,128,16384 128,256,4096 --impls pallas
    python experiments/profile_linear.py --tune-features     # FAVOR+ feature kernels' tiling
    python experiments/profile_linear.py --tune-linear --cases 128,256,4096   # chunked kernel's tiling

Writes `results/<run>/profile.{json,md}`, rewritten after every case. With
`--tune-features` it instead traces `pallas.favor.positive_features`
(GPU time of its three forward kernels and of the q / k gradient kernels) for every `FeatureBlockSizes` of a grid and
writes `results/<run>/feature_tune.{json,md}`. With `--tune-linear` it traces causal
FAVOR+ forward+backward (`pallas.favor.causal_favor_attention`) for every
`LinearBlockSizes` of a grid (chunk, span, columns per program, warps) and writes
each pass's kernel time (`linear_attention_{forward,dq,dk,dv}` and their span sums)
to `results/<run>/linear_tune.{json,md}`, so that each pass's best tiling can be
read off for a given chunk and span. Needs a GPU (the trace of a CPU run
holds no device kernels).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.bench_favor import favor_fn
from experiments.bench_timing import compile_pass, inputs
from experiments.device_trace import kernel_summary, traced_kernels

IMPLS = ("pallas", "xla", "cudnn")


def parse_case(text: str) -> tuple[int, int, int]:
  try:
    h, m, t = (int(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a case is H,M,T (three ints), got {text!r}") from None
  if min(h, m, t) <= 0:
    raise argparse.ArgumentTypeError(f"H, M and T must be positive, got {text!r}")
  return h, m, t


def profile(fn, args, calls: int, warmup: int) -> dict:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  walls = []

  def run():
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      walls.append(time.perf_counter() - start)

  events = traced_kernels(run)
  if not events:
    raise RuntimeError("the trace holds no GPU kernels (is this a GPU run?)")
  return {"wall_ms": 1e3 * statistics.median(walls), **kernel_summary(events, calls)}


def profile_or_error(fn, args, calls: int, row: dict) -> dict | None:
  """`profile(fn, args, calls, 2)`, or None with the error in `row["error"]` (a tiling that does not
  compile, e.g. for want of shared memory, is a result of a sweep)."""
  try:
    return profile(fn, args, calls, 2)
  except Exception as e:  # noqa: BLE001
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def write_sweep(out: pathlib.Path, name: str, rows: list[dict], tiling: dict[str, str], results: list[str],
                cells, time_key: str) -> None:
  """`rows` as `<out>/<name>.json` and a table `<name>.md`: a line per tiling (`tiling`: header -> row
  key, None shown as auto), then `cells(row)` under the `results` headers (or the row's error),
  fastest (`time_key`) first per (H, M, T)."""
  (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
  header = ["H", "M", "T", *tiling, *results]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in sorted(rows, key=lambda r: (r["head_dim"], r["num_features"], r["seq_len"], r.get(time_key, 1e30))):
    values = [r["head_dim"], r["num_features"], r["seq_len"], *("auto" if r[k] is None else r[k] for k in tiling.values())]
    values += [r["error"], *[""] * (len(results) - 1)] if "error" in r else cells(r)
    lines.append("| " + " | ".join(str(v) for v in values) + " |")
  (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def group(name: str) -> str:
  """Coarse class of a kernel name for the summary table."""
  if name.startswith("linear_attention_span_sums"):
    return "span sums"
  if name.startswith("linear_attention"):
    return "main kernels"
  if "cudnn" in name.lower() or "sm90" in name or "flash" in name.lower():
    return "cuDNN"
  if "gemm" in name or "cutlass" in name or "dot" in name:
    return "matmuls"
  return "other XLA"


def markdown(rows: list[dict], header: str, top: int) -> str:
  out = [f"# {header}", "",
         "Per call of forward+backward; GPU time from the device trace. `busy` is the union of kernel intervals,",
         "`wall` the host time around one call (launch and dispatch included).", "",
         "| H | M | T | impl | wall ms | busy ms | launches | main kernels | span sums | matmuls | other XLA | cuDNN |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    g = collections.Counter()
    for k in r["kernels"]:
      g[group(k["name"])] += k["us"] / 1e3
    out.append(f"| {r['head_dim']} | {r['num_features']} | {r['seq_len']} | {r['impl']} | {r['wall_ms']:.3g} | "
               f"{r['busy_ms']:.3g} | {r['launches']:.0f} | " +
               " | ".join(f"{g[c]:.3g}" for c in ("main kernels", "span sums", "matmuls", "other XLA", "cuDNN")) + " |")
  for r in rows:
    out += ["", f"## H={r['head_dim']} M={r['num_features']} T={r['seq_len']} {r['impl']}: top {top} kernels", "",
            "| kernel | launches | µs |", "|---|---|---|"]
    out += [f"| `{k['name'][:90]}` | {k['launches']:g} | {k['us']:.1f} |" for k in r["kernels"][:top]]
  return "\n".join(out) + "\n"


FEATURE_KERNELS = ("favor_query_features", "favor_key_maxima", "favor_key_features", "favor_query_gradient",
                   "favor_key_gradient")


def tune_features(cases, num_heads: int, out: pathlib.Path, repeats: int) -> None:
  """GPU time of the feature kernels (forward, and the q / k gradient kernels of the backward) for every
  tiling of a small grid, fastest first per case."""
  import itertools

  import efficient_attention as ea
  from pallas.favor import FeatureBlockSizes, positive_features

  rows = []
  grid = list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2,)))
  for h, m, t in cases:
    w = ea.orthogonal_random_features(jax.random.key(1), m, h)
    q, k = inputs(jax.random.key(3), 1, t, num_heads, h, jnp.bfloat16)[:2]
    for bt, bm, warps, stages in tqdm(grid, desc=f"H={h} M={m} T={t}"):
      blocks = FeatureBlockSizes(block_t=bt, block_m=bm, num_warps=warps, num_stages=stages)

      def fwd_bwd(q, k, blocks=blocks, w=w, h=h):
        phi, pull = jax.vjp(lambda q, k: positive_features(q, k, w, scale=h**-0.5, block_sizes=blocks), q, k)
        return pull(phi)

      row = {"head_dim": h, "num_features": m, "seq_len": t, "block_t": bt, "block_m": bm, "num_warps": warps,
             "num_stages": stages}
      prof = profile_or_error(jax.jit(fwd_bwd), (q, k), repeats, row)
      if prof is not None:
        kernels = {k["name"]: k["us"] for k in prof["kernels"]}
        row["kernels"] = {name: kernels.get(name, 0.0) for name in FEATURE_KERNELS}
        row["us"] = sum(row["kernels"][name] for name in FEATURE_KERNELS[:3])
        row["grad_us"] = sum(row["kernels"][name] for name in FEATURE_KERNELS[3:])
      rows.append(row)
    write_sweep(out, "feature_tune", rows,
                {"block_t": "block_t", "block_m": "block_m", "warps": "num_warps", "stages": "num_stages"},
                ["features µs", "gradients µs"], lambda r: [f"{r['us']:.1f}", f"{r['grad_us']:.1f}"], "us")


PASSES = ("forward", "dq", "dk", "dv")


def pass_times(kernels: list[dict]) -> dict[str, float]:
  """µs per chunked-kernel pass (its span sums included) from a profile's kernels."""
  times = collections.Counter()
  for k in kernels:
    name = k["name"]
    if name.startswith("linear_attention_"):
      times[name.removeprefix("linear_attention_").removeprefix("span_sums_").split("__")[0]] += k["us"]
  return dict(times)


def tune_linear(cases, num_heads: int, out: pathlib.Path, repeats: int, budget_s: float) -> None:
  """GPU time per pass of causal FAVOR+ forward+backward for every tiling of a grid."""
  import itertools

  import efficient_attention as ea
  from pallas import LinearBlockSizes
  from pallas.favor import causal_favor_attention

  start = time.perf_counter()
  rows = []
  for h, m, t in cases:
    w = ea.orthogonal_random_features(jax.random.key(1), m, h)
    q, k, v, do = inputs(jax.random.key(3), 1, t, num_heads, h, jnp.bfloat16)
    spans = sorted({s for s in (t // 32, t // 16, t // 8, t // 4) if s >= 64})
    grid = [(c, s, bc, wp) for c, s, bc, wp in itertools.product((64, 32, 128), spans, (None, 32, 128), (4, 8))
            if s % c == 0 and s >= 2 * c]
    for chunk, span, block_c, warps in tqdm(grid, desc=f"H={h} M={m} T={t}"):
      if time.perf_counter() - start > budget_s:
        print(f"time budget of {budget_s:.0f} s spent; stopping the sweep")
        break
      blocks = LinearBlockSizes(chunk=chunk, block_c=block_c, span_chunks=span // chunk, num_warps=warps)

      def fwd_bwd(q, k, v, do, blocks=blocks, w=w, h=h):
        # The gradients only: XLA drops the output pass (the backward does not read it); the sweep ranks
        # tilings by the passes the gradients need, as its committed results were made.
        _, vjp = jax.vjp(lambda q, k, v: causal_favor_attention(q, k, v, w, scale=h**-0.5, block_sizes=blocks), q, k, v)
        return vjp(do)

      row = {"head_dim": h, "num_features": m, "seq_len": t, "chunk": chunk, "span": span, "block_c": block_c,
             "num_warps": warps}
      prof = profile_or_error(jax.jit(fwd_bwd), (q, k, v, do), repeats, row)
      if prof is not None:
        row.update(busy_us=1e3 * prof["busy_ms"], passes=pass_times(prof["kernels"]))
      rows.append(row)
      write_sweep(out, "linear_tune", rows,
                  {"chunk": "chunk", "span": "span", "block_c": "block_c", "warps": "num_warps"},
                  ["busy µs", *PASSES], lambda r: [f"{r['busy_us']:.1f}", *(f"{r['passes'].get(x, 0):.1f}" for x in PASSES)],
                  "busy_us")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=parse_case, nargs="+",
                      default=[(64, 128, 16384), (128, 256, 16384), (128, 256, 4096)], help="H,M,T triples")
  parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
  parser.add_argument("--num-heads", type=int, default=8)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--run", default="linear_profile")
  parser.add_argument("--tune-features", action="store_true", help="time the feature kernels' tilings instead")
  parser.add_argument("--tune-linear", action="store_true", help="time the chunked kernel's tilings instead")
  parser.add_argument("--repeats", type=int, default=5, help="calls traced per tiling (--tune-*)")
  parser.add_argument("--budget", type=float, default=540.0, help="seconds after which --tune-linear stops")
  args = parser.parse_args(argv)
  if jax.default_backend() != "gpu":
    parser.error("needs a GPU: a CPU trace holds no device kernels")
  import efficient_attention as ea

  out = pathlib.Path("results") / args.run
  out.mkdir(parents=True, exist_ok=True)
  if args.tune_features:
    tune_features(args.cases, args.num_heads, out, args.repeats)
    print((out / "feature_tune.md").read_text())
    return
  if args.tune_linear:
    tune_linear(args.cases, args.num_heads, out, args.repeats, args.budget)
    print((out / "linear_tune.md").read_text())
    return
  header = (f"Causal FAVOR+ forward+backward per kernel — {jax.devices()[0].device_kind}, JAX {jax.__version__}, "
            f"bfloat16, B1 N{args.num_heads}")
  rows = []
  for h, m, t in tqdm(args.cases, desc="cases"):
    features = ea.orthogonal_random_features(jax.random.key(1), m, h)
    qkvd = inputs(jax.random.key(3), 1, t, args.num_heads, h, jnp.bfloat16)
    for impl in args.impls:
      fn = compile_pass(favor_fn(impl, features), True, True)
      rows.append({"head_dim": h, "num_features": m, "seq_len": t, "impl": impl,
                   **profile(fn, qkvd, args.calls, args.warmup)})
      (out / "profile.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
      (out / "profile.md").write_text(markdown(rows, header, args.top))
  print((out / "profile.md").read_text())


if __name__ == "__main__":
  main()
