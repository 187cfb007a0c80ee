"""GPU kernels read back from a `jax.profiler` trace: what `profile_linear.py` and `bench_lm.py` tabulate.

    events = traced_kernels(lambda: jax.block_until_ready(fn(*args)))   # (name, start_ns, end_ns)
    summary = kernel_summary(events, calls=1)                           # per call: busy ms, launches, kernels
    summary = trace_step(step, args, calls=3)                           # the same, after warm-up calls

A CPU run's trace holds no device kernels: `traced_kernels` then returns [].
"""

from __future__ import annotations

import collections
import glob
import tempfile
from collections.abc import Callable

import jax


def traced_kernels(run: Callable[[], None]) -> list[tuple[str, int, int]]:
  """Calls `run()` under `jax.profiler.trace`; the GPU kernels it launched, as (name, start_ns, end_ns)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      run()
    files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    if len(files) != 1:
      raise RuntimeError(f"expected one trace file under {tmp}, found {files}")
    return kernel_events(files[0])


def kernel_events(xplane: str) -> list[tuple[str, int, int]]:
  """(name, start_ns, end_ns) of every kernel on the GPU planes' stream lines."""
  from jax.profiler import ProfileData

  events = []
  for plane in ProfileData.from_file(xplane).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      # "Stream #N(...)" lines hold the kernels; "XLA Modules" / "XLA Ops" are summaries.
      if not line.name.startswith("Stream"):
        continue
      events += [(e.name, int(e.start_ns), int(e.end_ns)) for e in line.events]
  return events


def busy_ns(events: list[tuple[str, int, int]]) -> int:
  """Length of the union of the kernels' intervals."""
  total, end = 0, None
  for _, s, e in sorted(events, key=lambda x: x[1]):
    if end is None or s >= end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def kernel_summary(events: list[tuple[str, int, int]], calls: int) -> dict:
  """Per call: GPU busy ms (union of intervals), launches, summed kernel ms, and the kernels by name, slowest first."""
  by_name: dict[str, list[int]] = collections.defaultdict(list)
  for name, s, e in events:
    by_name[name].append(e - s)
  kernels = sorted(({"name": n, "launches": len(d) / calls, "us": sum(d) / calls / 1e3} for n, d in by_name.items()),
                   key=lambda k: -k["us"])
  return {"busy_ms": busy_ns(events) / calls / 1e6, "launches": len(events) / calls,
          "kernel_ms": sum(k["us"] for k in kernels) / 1e3, "kernels": kernels}


# What the benchmark suites' `--trace` tables hold: calls traced per row, kernels listed per row.
TRACE_CALLS, TRACE_KERNELS = 3, 8


def trace_step(step: Callable, args: tuple, *, calls: int = TRACE_CALLS, warmup: int = 2) -> dict:
  """`kernel_summary` of `calls` calls of `step(*args)` (each waited for) after `warmup` untraced ones."""
  for _ in range(warmup):
    jax.block_until_ready(step(*args))
  return kernel_summary(traced_kernels(lambda: [jax.block_until_ready(step(*args)) for _ in range(calls)]),
                        calls=calls)


def trace_legend(call: str) -> str:
  """The sentence under a `--trace` table's title: what its busy time, launches and kernels are, per `call`."""
  return (f"GPU time per {call}, mean of {TRACE_CALLS} traced calls: busy = the union of the kernels' intervals; "
          f"then the {TRACE_KERNELS} longest kernels (us per call, launches per call).")


def kernels_cell(summary: dict, count: int = TRACE_KERNELS) -> str:
  """The `count` slowest kernels of a `kernel_summary` for a table cell: `name us (xlaunches); ...`, or –."""
  return "; ".join(f"{k['name'][:48]} {k['us']:.1f} (x{k['launches']:g})" for k in summary["kernels"][:count]) or "–"
