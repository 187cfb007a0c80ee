"""Timing pieces every benchmark suite uses: inputs, compiled passes, median and pipelined
times, peak device memory, and the environment a run records."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def inputs(key, b, t, n, h, dtype=jnp.bfloat16):
  kq, kk, kv, kd = jax.random.split(key, 4)
  return tuple(jax.random.normal(kx, (b, t, n, h), jnp.float32).astype(dtype) for kx in (kq, kk, kv, kd))

def forward_backward(fn: Callable) -> Callable:
  """`(q, k, v, do, *aux) -> (out, (dq, dk, dv))` of `fn(q, k, v, *aux)`: a training step's work for
  one attention call. The output is returned too: where the backward does not read it (linear,
  gated and FAVOR+ kernels, XLA's softmax), XLA would otherwise drop the pass that makes it."""

  def fwd_bwd(q, k, v, do, *aux):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, *aux), q, k, v)
    return out, pull(do)

  return fwd_bwd


def compile_pass(fn: Callable, is_causal: bool, backward: bool):
  if not backward:
    return jax.jit(lambda q, k, v, do: fn(q, k, v, is_causal))
  return jax.jit(forward_backward(lambda q, k, v: fn(q, k, v, is_causal)))

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

def is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text

def environment() -> dict:
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)))


def timed_passes(fn: Callable, q, k, v, do, *, repeats: int, warmup: int, memory: bool = False,
                 aux: tuple = (), pipelined: bool = False) -> dict:
  """`fn(q, k, v, *aux)` compiled forward and forward+backward (`forward_backward`): `fwd_ms`,
  `fwd_bwd_ms` (medians), with `memory` the forward+backward's `peak_bytes`, and `status`: "ok", "OOM",
  or the error's first line (a failure is a result of the benchmark, not a crash of it). `aux` (gates,
  beta, ...) are arguments of the compiled calls, not constants in them: XLA would fold work on
  constants at compile time and leave it out of the timed call. With `pipelined`, also
  `fwd_bwd_pipelined_ms`: forward+backward calls dispatched back to back (`pipelined_time`), the
  device's time per call without the host's latency of waiting on each."""
  row = {}
  try:
    fwd = jax.jit(fn)
    fwd_bwd = jax.jit(forward_backward(fn))
    if memory:
      row["peak_bytes"] = peak_bytes(fwd_bwd, (q, k, v, do, *aux))
    row["fwd_ms"] = 1e3 * median_time(fwd, (q, k, v, *aux), repeats=repeats, warmup=warmup)
    row["fwd_bwd_ms"] = 1e3 * median_time(fwd_bwd, (q, k, v, do, *aux), repeats=repeats, warmup=warmup)
    if pipelined:
      row["fwd_bwd_pipelined_ms"] = 1e3 * pipelined_time(fwd_bwd, (q, k, v, do, *aux), repeats=repeats, warmup=1)
    row["status"] = "ok"
  except Exception as e:  # noqa: BLE001 - OOM (or another failure) is a result here
    row["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return row
