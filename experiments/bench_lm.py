"""Training throughput of the comparison LM: tokens/s, step time, host overhead and MFU per family x dtype x shape.

    python experiments/bench_lm.py                                   # GPU: nanoGPT's and the gpu preset's shapes
    python experiments/bench_lm.py --shapes nanogpt --families softmax linear --dtypes bfloat16
    python experiments/bench_lm.py --profile                         # also per-kernel GPU time from a device trace
    python experiments/bench_lm.py --smoke                           # CPU: a tiny shape, seconds

Each case builds `train_lm.py`'s jitted, state-donating train step (the same
model, optimiser and sharding code a training run uses) and times it after
`--warmup` steps:

- `step_ms`: device-bound step time, the median over `--repeats` timings of
  `--steps` back-to-back steps on batches of the corpus already on the device;
- `loop_ms`: a step of the loop `train_lm.py` runs (a host batch cut from the
  corpus and placed on the device every step), timed the same way;
- `host_ms`: the host's own time per step in that loop (batch, transfer,
  dispatch), and `overhead_ms = loop_ms - step_ms`, what it costs the device;
- `tokens_per_s` (from `loop_ms`) and `mfu`: `lm.training_flops_per_token` x
  tokens/s over the device's peak dense bfloat16 rate (`--peak-tflops`, or the
  datasheet figure of a known device; none on a CPU, so no MFU there).

With `--profile` the steps are also traced with `jax.profiler` and the GPU
kernels read back: per step the busy time (union of kernel intervals), the
launches, the time by kernel class and the top kernels.

Writes `results/<run>/lm_speed.{json,md}`, rewritten after every case.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax

from efficient_attention import lm
from experiments import cli, train_lm  # the experiments' command lines; the training run being timed
from experiments.device_trace import kernel_summary, traced_kernels

# Model shapes (train_lm.py flags). nanogpt: nanoGPT's shakespeare_char model (6 x 384, 6 heads, T=256, batch 64);
# gpu: train_lm.py --preset gpu (6 x 512, 8 heads, T=1024, batch 64).
SHAPES = {
    "nanogpt": dict(preset="gpu", num_layers=6, width=384, num_heads=6, seq_len=256, batch_size=64, window=128,
                    block_size=64, chunk_size=64, num_features=128, projected_len=128),
    "gpu": dict(preset="gpu"),
    "smoke": dict(preset="smoke", batch_size=2),
}
FLAGS = ("num_layers", "width", "num_heads", "seq_len", "batch_size", "window", "block_size", "chunk_size",
         "num_features", "projected_len")


@dataclasses.dataclass(frozen=True)
class Config:
  shapes: tuple[str, ...] = ("nanogpt", "gpu")
  families: tuple[str, ...] = ("softmax", "linear", "favor", "local")
  dtypes: tuple[str, ...] = ("bfloat16", "float32")
  implementation: str = "auto"  # the attention functions' implementation
  steps: int = 20  # steps per timing
  repeats: int = 5  # timings per case (median)
  warmup: int = 3  # steps before timing (the first compiles)
  profile: bool = False  # trace --steps steps per case and tabulate GPU kernels
  top: int = 12  # kernels listed per profiled case
  peak_tflops: float = 0.0  # peak dense bf16 TFLOP/s for MFU (0: the device's datasheet figure, if known)
  data: str = "stdlib"
  run: str = "lm_speed"
  out_dir: str = "results"


PRESETS = {
    "gpu": {},
    "smoke": dict(shapes=("smoke",), families=("softmax", "linear"), dtypes=("float32",), steps=2, repeats=2,
                  warmup=1),
}

def train_config(cfg: Config, shape: str, family: str, dtype: str) -> train_lm.Config:
  preset = dict(SHAPES[shape])
  argv = ["--preset", preset.pop("preset"), "--attention", family, "--dtype", dtype, "--implementation",
          cfg.implementation, "--data", cfg.data, "--steps", "1000", "--no-progress"]
  for name, value in preset.items():
    argv += ["--" + name.replace("_", "-"), str(value)]
  return train_lm.parse_args(argv)


def time_steps(step, state, batches, steps: int, repeats: int):
  """Median seconds per step over `repeats` timings of `steps` steps; `batches(i)` gives step i's inputs."""
  times, host = [], []
  for _ in range(repeats):
    jax.block_until_ready(state)
    start = time.perf_counter()
    busy = 0.0
    for i in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, *batches(i))
      busy += time.perf_counter() - t0
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / steps)
    host.append(busy / steps)
  return state, statistics.median(times), statistics.median(host)


def profile_steps(step, state, batches, steps: int):
  """Per-step kernel summary of `steps` traced steps (None without GPU kernels, e.g. on a CPU)."""
  jax.block_until_ready(state)

  def run():
    nonlocal state
    for i in range(steps):
      state, metrics = step(state, *batches(i))
    jax.block_until_ready((state, metrics))

  events = traced_kernels(run)
  if not events:
    return state, None
  summary = kernel_summary(events, steps)
  classes = collections.Counter()
  for k in summary["kernels"]:
    classes[kernel_class(k["name"])] += k["us"] / 1e3
  return state, dict(summary, classes_ms=dict(classes.most_common()))


def kernel_class(name: str) -> str:
  """Coarse class of a GPU kernel name."""
  low = name.lower()
  if "scatter" in low:
    return "scatter"
  if any(s in low for s in ("cudnn", "fmha", "flash", "attention", "pallas", "mosaic", "linear_attention")):
    return "attention kernels"
  if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "dot", "matmul", "sm90_")):
    return "matmuls"
  if "reduce" in low or "reduction" in low:
    return "reductions"
  if "memcpy" in low or "memset" in low or "copy" in low:
    return "copies"
  return "other fusions"


def bench_case(cfg: Config, shape: str, family: str, dtype: str) -> dict:
  tcfg = train_config(cfg, shape, family, dtype)
  mesh = train_lm.make_mesh(tcfg)
  model = train_lm.Model(tcfg, mesh)
  state = model.init()
  data = train_lm.Batches(tcfg)
  # Real text, not uniform random bytes: how often each byte occurs decides how much the embedding gradient's
  # scatter-add contends (what made bfloat16 training slow).
  placed = [tuple(model.place(x) for x in data.train(10_000 + i)) for i in range(4)]
  on_device = lambda i: placed[i % len(placed)]
  from_host = lambda i: tuple(model.place(x) for x in data.train(i))
  start = time.perf_counter()
  for i in range(cfg.warmup):
    state, metrics = model.train_step(state, *on_device(i))
  jax.block_until_ready((state, metrics))
  warmup_s = time.perf_counter() - start
  state, step_s, dispatch_s = time_steps(model.train_step, state, on_device, cfg.steps, cfg.repeats)
  state, loop_s, host_s = time_steps(model.train_step, state, from_host, cfg.steps, cfg.repeats)
  tokens = tcfg.batch_size * tcfg.seq_len
  flops = lm.training_flops_per_token(model.config, tcfg.seq_len)
  peak = train_lm.peak_flops(jax.devices()[0].device_kind, cfg.peak_tflops)
  row = dict(shape=shape, family=family, dtype=dtype, implementation=cfg.implementation, seq_len=tcfg.seq_len,
             width=tcfg.width, num_layers=tcfg.num_layers, num_heads=tcfg.num_heads, batch_size=tcfg.batch_size,
             params=train_lm.count_params(state), tokens_per_step=tokens, step_ms=1e3 * step_s, loop_ms=1e3 * loop_s,
             dispatch_ms=1e3 * dispatch_s, host_ms=1e3 * host_s, overhead_ms=1e3 * (loop_s - step_s),
             tokens_per_s=tokens / loop_s, device_tokens_per_s=tokens / step_s, flops_per_token=flops,
             model_tflops=flops * tokens / loop_s / 1e12, mfu=None if peak is None else flops * tokens / loop_s / peak,
             warmup_s=warmup_s)
  if cfg.profile:
    state, row["profile"] = profile_steps(model.train_step, state, on_device, cfg.steps)
  return row


def to_markdown(cfg: Config, rows: list[dict], command: str) -> str:
  kind = jax.devices()[0].device_kind
  peak = train_lm.peak_flops(kind, cfg.peak_tflops)
  lines = [f"`{command}` on {kind} (jax {jax.__version__}); median of {cfg.repeats} timings of {cfg.steps} steps "
           f"after {cfg.warmup} warm-up steps. MFU over "
           f"{'an unknown peak' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} (dense bf16) for every dtype.", "",
           "| shape | family | dtype | B x T | tokens/s | step ms | loop ms | host ms | overhead ms | MFU | "
           "model TFLOP/s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['shape']} | {r['family']} | {r['dtype']} | | {r['error']} | | | | | | |")
      continue
    mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(f"| {r['shape']} ({r['num_layers']} x {r['width']}) | {r['family']} | {r['dtype']} | "
                 f"{r['batch_size']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.2f} | "
                 f"{r['loop_ms']:.2f} | {r['host_ms']:.2f} | {r['overhead_ms']:.2f} | {mfu} | "
                 f"{r['model_tflops']:.1f} |")
  lines += ["", "tokens/s and MFU from `loop ms` (the training loop: host batches); `step ms` with batches already on "
            "the device; `host ms` the host's time per step in the loop; overhead = loop - step."]
  for r in rows:
    p = r.get("profile")
    if not p:
      continue
    lines += ["", f"## {r['shape']} {r['family']} {r['dtype']}: {p['busy_ms']:.2f} ms GPU busy per step, "
              f"{p['launches']:.0f} kernel launches", "",
              "| class | ms per step |", "|---|---:|"]
    lines += [f"| {c} | {ms:.3f} |" for c, ms in p["classes_ms"].items()]
    lines += ["", "| kernel | launches | µs per step |", "|---|---:|---:|"]
    lines += [f"| `{k['name'][:80]}` | {k['launches']:g} | {k['us']:.1f} |" for k in p["kernels"][:cfg.top]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
  parser = cli.config_parser(Config, __doc__.split("\n\n")[0], presets=PRESETS, smoke_flag=True)
  cfg = cli.parse_config(parser, Config, argv, presets=PRESETS)
  for name, valid in (("shapes", SHAPES), ("families", lm.ATTENTION_FAMILIES),
                      ("dtypes", ("bfloat16", "float32", "float16"))):
    unknown = [x for x in getattr(cfg, name) if x not in valid]
    if unknown:
      parser.error(f"unknown --{name} {unknown}; valid: {', '.join(valid)}")
  if min(cfg.steps, cfg.repeats) < 1 or cfg.warmup < 1:
    parser.error("--steps, --repeats and --warmup must be >= 1 (the first step compiles)")
  out = pathlib.Path(cfg.out_dir) / cfg.run
  out.mkdir(parents=True, exist_ok=True)
  command = "python experiments/bench_lm.py " + " ".join(sys.argv[1:] if argv is None else argv)
  rows = []
  cases = [(s, f, d) for s in cfg.shapes for f in cfg.families for d in cfg.dtypes]
  for i, (shape, family, dtype) in enumerate(cases):
    print(f"[{i + 1}/{len(cases)}] {shape} {family} {dtype}", flush=True)
    try:
      row = bench_case(cfg, shape, family, dtype)
    except Exception as err:  # an OOM or a failing kernel is a table cell, not the end of the benchmark
      error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
      row = dict(shape=shape, family=family, dtype=dtype, error=error)
    rows.append(row)
    if "error" not in row:
      print(f"  {row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.2f} ms, loop {row['loop_ms']:.2f} ms, "
            f"host {row['host_ms']:.2f} ms" + ("" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"),
            flush=True)
    else:
      print(f"  {row['error']}", flush=True)
    meta = dict(config=dataclasses.asdict(cfg), command=command, device_kind=jax.devices()[0].device_kind,
                jax_version=jax.__version__, rows=rows)
    (out / "lm_speed.json").write_text(json.dumps(meta, indent=1))
    (out / "lm_speed.md").write_text(to_markdown(cfg, rows, command.strip()))
  print((out / "lm_speed.md").read_text())
  return rows


if __name__ == "__main__":
  main()
