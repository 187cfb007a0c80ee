"""Train one small LM per attention family under one budget and seed (or several), and compare them.

    python experiments/compare.py                       # CPU: a tiny model per family, about 10 minutes on 2 cores
    python experiments/compare.py --preset gpu --run h200/lm   # 6 layers, width 512, T=1024, 65.5M tokens each
    python experiments/compare.py --seeds 3                     # each family with seeds 0, 1, 2

Every family trains the same `efficient_attention.lm` model (only the attention
differs) with `train_lm.py`, one process per run, on the same data, seed,
tokens per step and number of steps. The parent process
never touches the accelerator. Families: exact softmax attention (and its
Pallas flash kernel where a GPU or TPU runs it), FAVOR+, linear attention,
Linformer and block-sparse local attention by default; `--families` adds the
other kernels, LSH (Reformer) attention, GLA, DeltaNet, Gated DeltaNet, a
hybrid of GLA and local layers (`gla+local`), and GLA (per-feature or per-step gates)
and Gated DeltaNet on the Pallas kernels (`gla-pallas`, `gla-step-pallas`,
`gated_delta_rule-pallas`, `-h256`: 2 heads of 256), and hybrids of them with local
or softmax layers on the kernels (`gla-step+local-pallas`, `gla-step+softmax-pallas`
(2 : 1), `gla-step+softmax-1to1-pallas`, `gated_delta_rule+softmax-pallas`). Linformer has no causal form: its
model sees the byte it predicts, so its loss is no language-model loss; it is
trained and tabled for speed and memory, marked, and left out of the curves.

Writes `results/<run>/`: `metrics.csv` (every train and eval record of every
run), `summary.json` (settings and each run's summary), `table.md` (final
train and eval bits per character, tokens/s, peak memory, parameters; held-out
bits per character in eighths of the context), `curves.png` (held-out bits per
character against step and against training time) and `by_position.png`
(held-out bits per character against position in the context, final
evaluation: where a family gains or loses against another), plus each run's
own directory `T<seq_len>/<family>/` from `train_lm.py`.

`--seeds N` trains every family with seeds `seed`, ..., `seed + N - 1` (a seed
sets both the initialisation and the order of the batches) and adds a table of
held-out bits per character across seeds: each seed's value, mean, standard
deviation, and the gap to softmax paired by seed, so a difference between
families can be set against the spread between seeds. The single-run tables and
`by_position.png` show the first seed; `curves.png` draws the others faintly;
the other seeds' runs live in `T<seq_len>/<family>-seed<seed>/`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

from experiments import cli  # the experiments' command lines
from experiments import train_lm  # the parent only parses flags with it: the accelerator is left to the runs

TRAIN_LM = pathlib.Path(train_lm.__file__)


@dataclasses.dataclass(frozen=True)
class Family:
  """One compared model: a label, its `train_lm.py` flags, and where it runs."""

  label: str
  args: tuple[str, ...]
  accelerator_only: bool = False  # Pallas kernels: compiled on GPU / TPU (interpreted on CPU, far too slow)
  causal: bool = True


FAMILIES = {
    "softmax": Family("softmax", ("--attention", "softmax")),
    "softmax-pallas": Family("softmax (Pallas flash)", ("--attention", "softmax", "--implementation", "pallas"),
                             accelerator_only=True),
    "favor": Family("FAVOR+", ("--attention", "favor")),
    "linear": Family("linear (elu+1)", ("--attention", "linear")),
    "local": Family("block-sparse local", ("--attention", "local")),
    "linformer": Family("Linformer (not causal)", ("--attention", "linformer"), causal=False),
    "favor-pallas": Family("FAVOR+ (Pallas chunked)", ("--attention", "favor", "--implementation", "pallas"),
                           accelerator_only=True),
    "local-pallas": Family("block-sparse local (Pallas)", ("--attention", "local", "--implementation", "pallas"),
                           accelerator_only=True),
    "lsh": Family("LSH (Reformer)", ("--attention", "lsh")),
    "gla": Family("GLA", ("--attention", "gla")),
    # GLA's per-feature gates on the Pallas kernels of pallas/gated.py (sub-chunked pairs).
    "gla-pallas": Family("GLA (Pallas)", ("--attention", "gla", "--implementation", "pallas", "--chunk-size", "64"),
                         accelerator_only=True),
    "delta_rule": Family("DeltaNet", ("--attention", "delta_rule")),
    "gated_delta_rule": Family("Gated DeltaNet", ("--attention", "delta_rule", "--gated")),
    # A hybrid stack: GLA and local attention layers alternate.
    "gla+local": Family("hybrid GLA + local", ("--attention", "gla,local")),
    # One forget gate per step and head (Mamba-2's form), through XLA or the Pallas kernels of pallas/gated.py.
    "gla-step": Family("GLA (per-step gates)", ("--attention", "gla", "--gate", "step")),
    "gla-step-pallas": Family("GLA (per-step gates, Pallas)", ("--attention", "gla", "--gate", "step",
                                                               "--implementation", "pallas", "--chunk-size", "64"),
                              accelerator_only=True),
    "gated_delta_rule-pallas": Family("Gated DeltaNet (Pallas)", ("--attention", "delta_rule", "--gated",
                                                                  "--implementation", "pallas", "--chunk-size", "64"),
                                      accelerator_only=True),
    # Fewer, larger heads (2 of 256 at the GPU preset's width 512, as the GLA and Gated DeltaNet papers'
    # 256-wide heads): the same projections, a recurrent state four times as large per layer.
    "gla-step-pallas-h256": Family("GLA (per-step gates, Pallas, 2 heads of 256)",
                                   ("--attention", "gla", "--gate", "step", "--implementation", "pallas",
                                    "--chunk-size", "64", "--num-heads", "2"), accelerator_only=True),
    "gated_delta_rule-pallas-h256": Family("Gated DeltaNet (Pallas, 2 heads of 256)",
                                           ("--attention", "delta_rule", "--gated", "--implementation", "pallas",
                                            "--chunk-size", "64", "--num-heads", "2"), accelerator_only=True),
    # Hybrids on the kernels: GLA with per-step gates alternating with local attention (block-sparse
    # Pallas), or with a global softmax layer (Pallas flash) after every two GLA layers.
    "gla-step+local-pallas": Family("hybrid GLA (per-step) + local, Pallas",
                                    ("--attention", "gla,local", "--gate", "step", "--implementation", "pallas",
                                     "--chunk-size", "64"), accelerator_only=True),
    "gla-step+softmax-pallas": Family("hybrid 2 GLA (per-step) : 1 softmax, Pallas",
                                      ("--attention", "gla,gla,softmax", "--gate", "step", "--implementation",
                                       "pallas", "--chunk-size", "64"), accelerator_only=True),
    # Half the layers softmax (GLA and softmax alternating), and Gated DeltaNet in the 2 : 1 stack.
    "gla-step+softmax-1to1-pallas": Family("hybrid GLA (per-step) : softmax 1:1, Pallas",
                                           ("--attention", "gla,softmax", "--gate", "step", "--implementation",
                                            "pallas", "--chunk-size", "64"), accelerator_only=True),
    "gated_delta_rule+softmax-pallas": Family("hybrid 2 Gated DeltaNet : 1 softmax, Pallas",
                                              ("--attention", "delta_rule,delta_rule,softmax", "--gated",
                                               "--implementation", "pallas", "--chunk-size", "64"),
                                              accelerator_only=True),
}
DEFAULT_FAMILIES = ("softmax", "softmax-pallas", "favor", "linear", "local", "linformer")


@dataclasses.dataclass(frozen=True)
class Config:
  families: tuple[str, ...] = DEFAULT_FAMILIES
  seq_lens: tuple[int, ...] = (256,)
  tokens_per_step: int = 2048  # batch size = tokens_per_step // seq_len, the same budget for every T
  steps: int = 500
  train_preset: str = "cpu"  # train_lm.py's --preset: the model size and family options
  data: str = "stdlib"
  seed: int = 0
  seeds: int = 1  # train every family with seeds seed, seed + 1, ..., seed + seeds - 1 (data order and init)
  eval_every: int = 50
  sample_tokens: int = 160  # text generated by each model at the end (0: none)
  reuse: bool = False  # keep finished runs of the same settings (their summary.json) and train only the rest
  run: str = "compare"
  out_dir: str = "results"


PRESETS = {
    "cpu": {},
    "smoke": dict(families=("softmax", "favor", "linformer"), seq_lens=(64,), tokens_per_step=256, steps=6,
                  train_preset="smoke", eval_every=3),
    # 6 layers, width 512 (train_lm.py --preset gpu), T=1024, 65,536 tokens a step: 65.5M tokens per family,
    # every default family in about 8 minutes on one H200.
    "gpu": dict(seq_lens=(1024,), tokens_per_step=65_536, steps=1000, train_preset="gpu", eval_every=100,
                sample_tokens=0),
}


def parse_args(argv: list[str] | None = None) -> Config:
  parser = cli.config_parser(Config, __doc__.split("\n\n")[0], presets=PRESETS)
  cfg = cli.parse_config(parser, Config, argv, presets=PRESETS)
  unknown = [f for f in cfg.families if f not in FAMILIES]
  if unknown:
    parser.error(f"unknown --families {unknown}; valid: {', '.join(FAMILIES)}")
  bad = [t for t in cfg.seq_lens if t < 1 or cfg.tokens_per_step % t]
  if bad:
    parser.error(f"--tokens-per-step {cfg.tokens_per_step} must be a multiple of every --seq-lens value; not of {bad}")
  if cfg.steps < 1:
    parser.error(f"--steps must be >= 1, got {cfg.steps}")
  if cfg.seeds < 1:
    parser.error(f"--seeds must be >= 1 (the number of seeds per family), got {cfg.seeds}")
  if cfg.seed < 0:
    parser.error(f"--seed must be >= 0, got {cfg.seed}")
  return cfg


def default_backend() -> str:
  """JAX's backend, asked of a child process: this one leaves the accelerator to the training runs."""
  probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], check=True,
                         capture_output=True, text=True)
  return probe.stdout.strip().splitlines()[-1]


def runnable(cfg: Config) -> tuple[list[str], dict[str, str]]:
  """The families this machine runs, and the skipped ones with the reason."""
  cpu = default_backend() == "cpu"
  skipped = {f: "a Pallas kernel: compiled on GPU / TPU only (interpret mode on CPU is far too slow)"
             for f in cfg.families if FAMILIES[f].accelerator_only and cpu}
  return [f for f in cfg.families if f not in skipped], skipped


def seeds(cfg: Config) -> list[int]:
  return list(range(cfg.seed, cfg.seed + cfg.seeds))


def run_dir(out: pathlib.Path, cfg: Config, family: str, seq_len: int, seed: int) -> pathlib.Path:
  """`T<seq_len>/<family>` for the first seed (as with one seed), `T<seq_len>/<family>-seed<seed>` for the others."""
  return out / f"T{seq_len}" / (family if seed == cfg.seed else f"{family}-seed{seed}")


def train_args(cfg: Config, family: str, seq_len: int, out_dir: pathlib.Path, seed: int | None = None) -> list[str]:
  return [*FAMILIES[family].args, "--preset", cfg.train_preset, "--seq-len", str(seq_len),
          "--batch-size", str(cfg.tokens_per_step // seq_len), "--steps", str(cfg.steps),
          "--warmup-steps", str(max(1, cfg.steps // 10)), "--eval-every", str(cfg.eval_every),
          "--data", cfg.data, "--seed", str(cfg.seed if seed is None else seed), "--sample-tokens", str(cfg.sample_tokens),
          "--out-dir", str(out_dir), "--no-checkpoint"]


def finished(args: list[str], out_dir: pathlib.Path) -> bool:
  """Whether `out_dir` holds a finished run of exactly these train_lm.py settings."""
  if not (out_dir / "summary.json").is_file() or not (out_dir / "config.json").is_file():
    return False
  want = dataclasses.asdict(train_lm.parse_args(args))
  saved = json.loads((out_dir / "config.json").read_text())
  return all(saved.get(k) == v for k, v in want.items() if k not in train_lm.RESUMABLE)


def run_one(cfg: Config, family: str, seq_len: int, out_dir: pathlib.Path, seed: int | None = None) -> dict:
  """Trains one model in its own process (so peak memory is its own); returns its summary and records."""
  start = time.perf_counter()
  seed = cfg.seed if seed is None else seed
  args = train_args(cfg, family, seq_len, out_dir, seed)
  if cfg.reuse and finished(args, out_dir):
    print("  reused (finished earlier with the same settings)", flush=True)
    proc = subprocess.CompletedProcess(args, 0)
  else:
    proc = subprocess.run([sys.executable, str(TRAIN_LM), *args], check=False)
  records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] \
      if (out_dir / "metrics.jsonl").is_file() else []
  summary = json.loads((out_dir / "summary.json").read_text()) if proc.returncode == 0 else None
  error = None
  if proc.returncode:
    stop = [r for r in records if r["kind"] == "stop"]
    error = f"non-finite at step {stop[-1]['step']}" if stop else f"failed (exit code {proc.returncode})"
  seconds = time.perf_counter() - start
  if summary is not None:
    print(f"  {summary['steps']} steps: eval bpc {summary['eval']['bpc']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s, "
          f"training {summary['train_seconds']:.0f} s (compilation {summary['compile_seconds']:.0f} s), "
          f"process {seconds:.0f} s", flush=True)
  else:
    print(f"  {error}", flush=True)
  return dict(family=family, label=FAMILIES[family].label, causal=FAMILIES[family].causal, seq_len=seq_len,
              seed=seed, summary=summary, records=records, error=error, seconds=seconds)


def main(argv: list[str] | None = None) -> dict:
  cfg = parse_args(argv)
  families, skipped = runnable(cfg)
  out = pathlib.Path(cfg.out_dir) / cfg.run
  out.mkdir(parents=True, exist_ok=True)
  runs, total = [], cfg.seeds * len(cfg.seq_lens) * len(families)
  # Seed by seed: an interrupted comparison has whole comparisons of its first seeds.
  for seed in seeds(cfg):
    for t in cfg.seq_lens:
      for family in families:
        print(f"[{len(runs) + 1}/{total}] T={t} {FAMILIES[family].label}"
              + (f", seed {seed}" if cfg.seeds > 1 else ""), flush=True)
        runs.append(run_one(cfg, family, t, run_dir(out, cfg, family, t, seed), seed))
        result = write_outputs(cfg, runs, skipped, argv, out)  # after every run, so an interrupted comparison reports
  print((out / "table.md").read_text())
  print(f"wrote {out}/metrics.csv, summary.json, table.md, curves.png, by_position.png")
  return result


def write_outputs(cfg: Config, runs: list[dict], skipped: dict[str, str], argv: list[str] | None,
                  out: pathlib.Path) -> dict:
  result = dict(config=dataclasses.asdict(cfg), skipped=skipped, device_kind=device_kind(runs),
                jax_version=jax.__version__,
                runs=[{k: v for k, v in r.items() if k != "records"} for r in runs])
  write_csv(runs, out / "metrics.csv")
  (out / "summary.json").write_text(json.dumps(result, indent=1))
  (out / "table.md").write_text(to_markdown(cfg, runs, skipped, argv))
  plot(cfg, runs, out / "curves.png")
  plot_by_position(first_seed(cfg, runs), out / "by_position.png")
  return result


def device_kind(runs: list[dict]) -> str:
  return next((r["summary"]["device_kind"] for r in runs if r["summary"]), "unknown device")


CSV_FIELDS = ("family", "seq_len", "kind", "step", "tokens", "train_seconds", "loss", "bpc", "accuracy",
              "tokens_per_s", "mfu", "learning_rate", "grad_norm", "seed")


def write_csv(runs: list[dict], path: pathlib.Path) -> None:
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for run in runs:
      for record in run["records"]:
        if record["kind"] in ("train", "eval"):
          writer.writerow(dict(record, family=run["family"], seq_len=run["seq_len"], seed=run["seed"]))


def first_seed(cfg: Config, runs: list[dict]) -> list[dict]:
  return [r for r in runs if r["seed"] == cfg.seed]


def to_markdown(cfg: Config, runs: list[dict], skipped: dict[str, str], argv: list[str] | None) -> str:
  command = "python experiments/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
  kind = device_kind(runs)
  seed_text = f"seed {cfg.seed}" if cfg.seeds == 1 else (
      f"seeds {cfg.seed}–{cfg.seed + cfg.seeds - 1} (the tables of single runs: seed {cfg.seed})")
  lines = [f"`{command.strip()}` on {kind} (jax {jax.__version__}): {cfg.steps} steps of {cfg.tokens_per_step:,} "
           f"tokens per family (train_lm.py --preset {cfg.train_preset}), data {cfg.data}, {seed_text}.", ""]
  all_runs, runs = runs, first_seed(cfg, runs)
  for t in sorted({r["seq_len"] for r in runs}):
    lines += [f"T = {t}:", "",
              "| family | train bpc (last log) | eval bpc | tokens/s | MFU | peak memory | parameters | train time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in (r for r in runs if r["seq_len"] == t):
      s = run["summary"]
      if s is None:
        lines.append(f"| {run['label']} | {run['error']} | | | | | | |")
        continue
      memory = f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB" + (" (host RSS)" if s["peak_memory_kind"] != "device"
                                                                else "")
      mfu = "–" if s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"
      lines.append(f"| {run['label']} | {s['final_train_loss'] / math.log(2):.3f} | {s['eval']['bpc']:.3f} | "
                   f"{s['tokens_per_s']:,.0f} | {mfu} | {memory} | {s['params']:,} | {s['train_seconds']:.0f} s |")
    lines.append("")
  lines.append("bpc: bits per byte (= per character for ASCII text) of the next-byte loss; eval on held-out text. "
               "tokens/s: median over logging intervals, first (compiling) step excluded. MFU: model FLOPs "
               "(`lm.training_flops_per_token`) x tokens/s over the device's peak dense bf16 rate (– where unknown).")
  lines += [""] + by_position_markdown(runs)
  if cfg.seeds > 1:
    lines += across_seeds_markdown(cfg, all_runs)
  if any(not FAMILIES[f].causal for f in cfg.families):
    lines.append("Linformer has no causal form: it sees the byte it predicts, so its bpc is not comparable.")
  lines += [f"Skipped {f}: {why}." for f, why in skipped.items()]
  return "\n".join(lines) + "\n"


def _eval_bpc(run: dict) -> float | None:
  return None if run["summary"] is None else run["summary"]["eval"]["bpc"]


def across_seeds_markdown(cfg: Config, runs: list[dict]) -> list[str]:
  """Held-out bpc of every seed, mean and sample standard deviation, and the gap to softmax (or to the
  first family) paired by seed: both saw the same batches in the same order from the same seed."""
  lines = []
  for t in sorted({r["seq_len"] for r in runs}):
    mine = [r for r in runs if r["seq_len"] == t]
    families = list(dict.fromkeys(r["family"] for r in mine))
    ref = "softmax" if "softmax" in families else families[0]
    bpc = {f: {r["seed"]: _eval_bpc(r) for r in mine if r["family"] == f} for f in families}
    lines += [f"Held-out bpc across seeds, T = {t} (gap: minus {FAMILIES[ref].label} of the same seed):", "",
              "| family | " + " | ".join(f"seed {s}" for s in seeds(cfg)) +
              " | mean | std | gap mean | gap min–max |",
              "|---|" + "---:|" * (cfg.seeds + 4)]
    for f in families:
      values = [bpc[f].get(s) for s in seeds(cfg)]
      done = [v for v in values if v is not None]
      gaps = [bpc[f][s] - bpc[ref][s] for s in seeds(cfg)
              if bpc[f].get(s) is not None and bpc[ref].get(s) is not None]
      mean = f"{statistics.fmean(done):.3f}" if done else "–"
      std = f"{statistics.stdev(done):.3f}" if len(done) > 1 else "–"
      gap = ("–", "–") if f == ref or not gaps else (f"{statistics.fmean(gaps):+.3f}",
                                                     f"{min(gaps):+.3f} – {max(gaps):+.3f}")
      cells = ["–" if v is None else f"{v:.3f}" for v in values] + [mean, std, *gap]
      lines.append(f"| {FAMILIES[f].label} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def _by_position(run: dict) -> list | None:
  s = run["summary"]
  return None if s is None else s["eval"].get("bpc_by_position")


def by_position_markdown(runs: list[dict]) -> list[str]:
  """Held-out bpc by range of context positions, per T (runs reused from before the field existed: –)."""
  lines = []
  for t in sorted({r["seq_len"] for r in runs}):
    mine = [r for r in runs if r["seq_len"] == t and r["causal"]]
    if not any(_by_position(r) for r in mine):
      continue
    ranges = train_lm.position_ranges(t, train_lm.POSITION_BUCKETS)
    lines += [f"Held-out bpc by position in the context, T = {t} (final evaluation):", "",
              "| family | " + " | ".join(f"{lo}–{hi - 1}" for lo, hi in ranges) + " |",
              "|---|" + "---:|" * len(ranges)]
    for run in mine:
      values = _by_position(run) or [None] * len(ranges)
      lines.append(f"| {run['label']} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append("")
  return lines


def plot_by_position(runs: list[dict], path: pathlib.Path) -> None:
  """Held-out bpc against position in the context (final evaluation), one panel per T."""
  lens = sorted({r["seq_len"] for r in runs})
  fig, axes = plt.subplots(1, len(lens), figsize=(5.5 * len(lens), 4), squeeze=False)
  for ax, t in zip(axes[0], lens):
    ranges = train_lm.position_ranges(t, train_lm.POSITION_BUCKETS)
    centres = [(lo + hi - 1) / 2 for lo, hi in ranges]
    for run in (r for r in runs if r["seq_len"] == t and r["causal"]):
      values = _by_position(run)
      if values:
        pts = [(c, v) for c, v in zip(centres, values) if v is not None]
        ax.plot(*zip(*pts), marker="o", label=run["label"])
    ax.set(xlabel="position in the context (centre of an eighth)", ylabel="held-out bits per character",
           title=f"T = {t}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Held-out loss by position, final evaluation ({device_kind(runs)})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(cfg: Config, runs: list[dict], path: pathlib.Path) -> None:
  """Held-out bpc against step and training time; other seeds than the first as faint lines of the family's colour."""
  fig, axes = plt.subplots(len(cfg.seq_lens), 2, figsize=(11, 4 * len(cfg.seq_lens)), squeeze=False)
  for row, t in enumerate(cfg.seq_lens):
    colours = {}
    for run in sorted((r for r in runs if r["seq_len"] == t and r["causal"]), key=lambda r: r["seed"] != cfg.seed):
      evals = [r for r in run["records"] if r["kind"] == "eval"]
      if not evals:
        continue
      bpc = [r["bpc"] for r in evals]
      compile_s = run["summary"]["compile_seconds"] if run["summary"] else 0.0
      first = run["family"] not in colours
      style = dict(marker=".", label=run["label"]) if first else dict(alpha=0.35, linewidth=1)
      if not first:
        style["color"] = colours[run["family"]]
      line, = axes[row, 0].plot([r["step"] for r in evals], bpc, **style)
      colours.setdefault(run["family"], line.get_color())
      style["color"] = colours[run["family"]]
      axes[row, 1].plot([max(0.0, r["train_seconds"] - compile_s) for r in evals], bpc, **style)
    for col, xlabel in enumerate(("step", "training time (s, compilation excluded)")):
      ax = axes[row, col]
      ax.set(xlabel=xlabel, ylabel="held-out bits per character", title=f"T = {t}")
      ax.set_ylim(top=min(ax.get_ylim()[1], 8.5))
      ax.grid(alpha=0.3)
    axes[row, 0].legend(fontsize=8)
  others = seeds(cfg)[1:]
  several = "" if not others else f"; faint: seed {others[0]}" if len(others) == 1 else \
      f"; faint: seeds {others[0]}–{others[-1]}"
  fig.suptitle(f"LM per attention family: {cfg.steps} steps x {cfg.tokens_per_step:,} tokens "
               f"({device_kind(runs)}); Linformer left out (not causal){several}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
