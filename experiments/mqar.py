"""Multi-query associative recall (MQAR): which attention families can look a key up in context.

The synthetic task of Zoology (Arora et al. 2023, "Zoology: measuring and
improving recall in efficient language models"). Each sequence opens with
`num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`; keys are drawn without
replacement from the lower half of the vocabulary (token ids `[1, V/2)`),
values from the upper half (`[V/2, V)`). Every key is then queried once later
in the sequence: it re-appears, followed by its value. The query slots are the
pairs of positions after the context, drawn without replacement with Zoology's
power law (`p(gap) ∝ gap**(power_a - 1)`, `power_a = 0.01`, so most queries sit
close to the context and a few far away). Positions that are neither keys nor
values hold the filler token 0 (Zoology's `random_non_queries=False`). The
loss and the accuracy count only the query positions: the input there is a
re-appearing key and the target is its paired value; every other label is
-100 (ignored).

For every family with a causal form (LSH, GLA and the delta rule when named in `--families`) it trains the small LM of
`efficient_attention.lm` with optax AdamW (warmup-cosine, clipping) on batches
generated on the fly and measures accuracy at the query positions of held-out
sequences (a separate data stream), for every (model width, number of pairs,
seed). As in Zoology, one model per (family, width, seed) trains on batches
that mix every pair count in equal parts and is then evaluated on each count
(`--no-mix`: one model per pair count instead). Linformer is left out: it has no causal form, so its model would
see the value it has to predict. Writes `results/<run>/{mqar.json,mqar.md,mqar.png}`.

    python experiments/mqar.py                     # CPU-sized defaults, about 3 minutes on 2 cores
    python experiments/mqar.py --smoke             # tiny sizes, seconds
    python experiments/mqar.py --preset gpu --run mqar_gpu   # GPU sizes, about 6.5 minutes on an H100
    python experiments/mqar.py merge results/a results/b --run ab   # sweeps with other --seed, as one
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import efficient_attention as ea
from efficient_attention import lm

from experiments import cli  # the experiments' command lines
from experiments.lm_data import (  # the experiments' data module
  FILLER,
  IGNORE,
  MQAR_EVAL_SEED_OFFSET,
  check_mqar,
  mqar_batch,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

# Families with a causal form; block_sparse runs local | strided, so it differs from local. LSH (chunks of
# `chunk_size`, 2 hash rounds), GLA and the delta rule (the LM's defaults: per-feature gates, short
# convolutions, output gates; delta rule ungated) run when asked for (`--families ... gla delta_rule`).
CAUSAL_FAMILIES = ("softmax", "favor", "linear", "local", "block_sparse", "lsh", "gla", "delta_rule")
DEFAULT_FAMILIES = ("softmax", "favor", "linear", "local", "block_sparse")
SKIPPED = {"linformer": "no causal form: a bidirectional model would see the value it must predict"}
EVAL_SEED_OFFSET = MQAR_EVAL_SEED_OFFSET  # held-out sequences come from data seed `seed + EVAL_SEED_OFFSET`


@dataclasses.dataclass(frozen=True)
class Config:
  families: tuple[str, ...] = DEFAULT_FAMILIES
  widths: tuple[int, ...] = (16, 32, 64)
  num_kv_pairs: tuple[int, ...] = (2, 4, 8, 16)
  seq_len: int = 64  # T, model inputs; needs T + 1 >= 4 * max(num_kv_pairs)
  vocab_size: int = 128
  power_a: float = 0.01
  num_layers: int = 2
  num_heads: int = 2
  steps: int = 500
  batch: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  eval_batches: int = 4  # held-out batches of `batch` sequences
  window: int = 8  # local / block_sparse: tokens of context on either side of a query block
  block_size: int = 8  # local / block_sparse block size
  stride: int = 4  # block_sparse: the strided half of the layout, in blocks
  chunk_size: int = 32  # causal FAVOR+ / linear chunk; LSH's sorted chunk
  seeds: int = 1
  steps_per_call: int = 100  # training steps per jitted call (a loop on the device)
  mix: bool = True  # one model per (family, width, seed) on batches mixing every pair count; else one per count
  seed: int = 0  # shifts the data streams; model initialisation follows the seed index (0 .. seeds - 1)
  run: str = "mqar"
  out_dir: str = "results"


PRESETS = {
    "cpu": {},
    "smoke": dict(families=("softmax", "linear"), widths=(16,), num_kv_pairs=(2, 4), seq_len=32, vocab_size=64,
                  num_layers=1, steps=20, batch=8, warmup_steps=2, eval_batches=1, window=8, block_size=8, stride=2),
    # For one GPU, about 10 minutes on an H100. Zoology trains on vocab 8192 and T 64-512 for ~25k steps; in
    # 8000 steps at vocab 512, T=256 no family got past copying a random context value (H100, lr 3e-3), so
    # this preset trades the vocabulary for steps.
    "gpu": dict(widths=(64, 128), num_kv_pairs=(2, 4, 8, 16), seq_len=64, vocab_size=64, steps=16000,
                batch=256, learning_rate=1e-3, warmup_steps=500, eval_batches=4, window=16, block_size=16,
                stride=2, chunk_size=16, steps_per_call=500),
}


def parse_args(argv: list[str] | None = None) -> Config:
  parser = cli.config_parser(Config, __doc__.split("\n\n")[0], presets=PRESETS, smoke_flag=True)
  cfg = cli.parse_config(parser, Config, argv, presets=PRESETS)
  for name in cfg.families:
    if name in SKIPPED:
      parser.error(f"--families {name!r}: {SKIPPED[name]}")
    if name not in CAUSAL_FAMILIES:
      parser.error(f"unknown family {name!r} in --families {cfg.families}; valid: {CAUSAL_FAMILIES}")
  try:
    check_mqar(seq_len=cfg.seq_len, num_kv_pairs=max(cfg.num_kv_pairs), vocab_size=cfg.vocab_size)
  except ValueError as err:
    parser.error(str(err))
  if min(cfg.num_kv_pairs) < 1 or min(cfg.widths) < 1 or any(w % cfg.num_heads for w in cfg.widths):
    parser.error(f"--num-kv-pairs and --widths must be positive, widths multiples of {cfg.num_heads=}; "
                 f"got {cfg.num_kv_pairs=}, {cfg.widths=}")
  if cfg.mix and cfg.batch % len(cfg.num_kv_pairs):
    parser.error(f"--mix splits each batch evenly over the pair counts: --batch {cfg.batch} is not a multiple of "
                 f"{len(cfg.num_kv_pairs)} (the number of --num-kv-pairs)")
  if len(set(cfg.num_kv_pairs)) != len(cfg.num_kv_pairs):
    parser.error(f"--num-kv-pairs has repeats: {cfg.num_kv_pairs}")
  if cfg.steps_per_call < 1:
    parser.error(f"--steps-per-call must be >= 1, got {cfg.steps_per_call}")
  if cfg.steps < 1 or cfg.seeds < 1 or cfg.eval_batches < 1 or not 0 <= cfg.warmup_steps < cfg.steps:
    parser.error(f"need --steps, --seeds, --eval-batches >= 1 and 0 <= --warmup-steps < --steps; got "
                 f"{cfg.steps=}, {cfg.seeds=}, {cfg.eval_batches=}, {cfg.warmup_steps=}")
  return cfg


# The models.


def lm_config(cfg: Config, family: str, width: int) -> lm.LMConfig:
  layout = None
  if family == "block_sparse":
    layout = ea.layouts.local_strided(window=cfg.window, stride=cfg.stride, block_size=cfg.block_size)
  return lm.LMConfig(attention=family, vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, width=width,
                     num_heads=cfg.num_heads, max_len=cfg.seq_len, window=cfg.window, block_size=cfg.block_size,
                     layout=layout, chunk_size=cfg.chunk_size)


def masked_loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy over the positions whose label is not -100."""
  keep = labels != IGNORE
  safe = jnp.where(keep, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  count = jnp.maximum(keep.sum(), 1)
  correct = (jnp.argmax(logits, axis=-1) == safe) & keep
  return jnp.sum(ce * keep) / count, correct.sum() / count


def train_batch(cfg: Config, pair_counts: tuple[int, ...], data_seed, step):
  """Training batch `step`: `cfg.batch` sequences, an equal part per pair count (traceable in seed and step)."""
  # Each pair count draws from its own indices of the stream, so no two parts share a key.
  parts = [mqar_batch(data_seed, step * len(pair_counts) + i, batch=cfg.batch // len(pair_counts),
                      seq_len=cfg.seq_len, num_kv_pairs=n, vocab_size=cfg.vocab_size, power_a=cfg.power_a)
           for i, n in enumerate(pair_counts)]
  return tuple(jnp.concatenate(x) for x in zip(*parts))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pair_counts"), donate_argnames=("state",))
def train_steps(graphdef, state, data_seed, first_step, num_steps, *, cfg: Config, pair_counts: tuple[int, ...]):
  """`num_steps` (<= cfg.steps_per_call) training steps in one call: batches are made on the device.

  A loop inside one jitted call instead of a call per step: these models are small enough that
  dispatching a step costs more than computing it. Returns the new state and the losses
  (`[cfg.steps_per_call]`, entries past `num_steps` are 0).
  """

  def body(i, carry):
    state, losses = carry
    model, optimizer = nnx.merge(graphdef, state)
    inputs, labels = train_batch(cfg, pair_counts, data_seed, first_step + i)

    def loss_fn(model):
      return masked_loss_and_accuracy(model(inputs), labels)

    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), losses.at[i].set(loss)

  return jax.lax.fori_loop(0, num_steps, body, (state, jnp.zeros(cfg.steps_per_call, jnp.float32)))


@nnx.jit
def eval_step(model, inputs, labels):
  return masked_loss_and_accuracy(model(inputs), labels)


@functools.lru_cache(maxsize=None)
def optimizer_for(cfg: Config) -> optax.GradientTransformation:
  """AdamW, warmup-cosine, global-norm clipping; one object per config, so `train_steps` compiles once per model shape."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps)
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_one(cfg: Config, family: str, width: int, pair_counts: tuple[int, ...], seed: int, bar=None) -> list[dict]:
  """Trains one model on fresh batches mixing `pair_counts` in equal parts; a record per count, held-out accuracy."""
  start = time.perf_counter()
  model = lm.LanguageModel(lm_config(cfg, family, width), rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optimizer_for(cfg), wrt=nnx.Param)

  graphdef, state = nnx.split((model, optimizer))
  label = f"{family} d={width} kv={','.join(map(str, pair_counts))} seed={seed}"
  losses, step, diverged_at = [], 0, None
  while step < cfg.steps:
    num = min(cfg.steps_per_call, cfg.steps - step)
    state, chunk = train_steps(graphdef, state, cfg.seed + seed, step, num, cfg=cfg, pair_counts=pair_counts)
    chunk = np.asarray(chunk[:num], np.float64)
    losses.extend(chunk)
    step += num
    if not np.isfinite(chunk).all():
      break
    if bar is not None:
      bar.set_postfix_str(f"{label} step {step} loss {chunk[-1]:.3f}")
  model, optimizer = nnx.merge(graphdef, state)
  losses = np.asarray(losses, np.float64)
  train_seconds = time.perf_counter() - start
  if not np.isfinite(losses).all():
    # Recorded, not raised: one diverging run should not end the sweep. Its accuracy is that of the
    # non-finite model (0 in practice).
    diverged_at = int(np.argmin(np.isfinite(losses)))
    tqdm.write(f"warning: non-finite training loss for {label} from step {diverged_at} "
               f"(loss {losses[diverged_at]}); training stopped there")
  model.eval()
  tail = max(1, cfg.steps // 10)
  shared = dict(family=family, width=width, seed=seed, init_seed=seed, data_seed=cfg.seed + seed,
                trained_on=list(pair_counts),
                final_train_loss=float(losses[-tail:].mean()), steps=len(losses), diverged_at_step=diverged_at,
                train_seconds=train_seconds,
                params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  records = []
  for n in pair_counts:
    held_out = [eval_step(model, *mqar_batch(cfg.seed + seed + EVAL_SEED_OFFSET, i, batch=cfg.batch,
                                             seq_len=cfg.seq_len, num_kv_pairs=n, vocab_size=cfg.vocab_size,
                                             power_a=cfg.power_a))
                for i in range(cfg.eval_batches)]
    eval_loss, accuracy = (float(np.mean([float(x[j]) for x in held_out])) for j in (0, 1))
    records.append(dict(shared, num_kv_pairs=n, accuracy=accuracy, eval_loss=eval_loss))
  for r in records:
    r["seconds"] = time.perf_counter() - start
  return records


def sweep(cfg: Config, on_model_done=None) -> list[dict]:
  """Every (family, width, seed) with every pair count (`mix`), or every (family, width, pair count, seed).

  `on_model_done(runs)` after each model, so a sweep cut short keeps what it measured.
  """
  counts = [tuple(cfg.num_kv_pairs)] if cfg.mix else [(n,) for n in cfg.num_kv_pairs]
  # Widths outermost: a sweep cut short still has every family at the first widths.
  settings = [(f, w, ns, seed) for w, f, ns, seed in itertools.product(cfg.widths, cfg.families, counts,
                                                                        range(cfg.seeds))]
  runs = []
  for family, width, ns, seed in (bar := tqdm(settings, desc="mqar", unit="model")):
    bar.set_postfix_str(f"{family} d={width} kv={','.join(map(str, ns))} seed={seed}")
    runs.extend(train_one(cfg, family, width, ns, seed, bar))
    if on_model_done is not None:
      on_model_done(runs)
  return runs


# The reports.


def accuracy_grid(cfg: Config, runs: list[dict]) -> np.ndarray:
  """Accuracies `[family, width, num_kv_pairs, seed]`."""
  grid = np.full((len(cfg.families), len(cfg.widths), len(cfg.num_kv_pairs), cfg.seeds), np.nan)
  for r in runs:
    grid[cfg.families.index(r["family"]), cfg.widths.index(r["width"]), cfg.num_kv_pairs.index(r["num_kv_pairs"]),
         r["seed"]] = r["accuracy"]
  return grid


def _cell(x: float, digits: int = 2) -> str:
  return "–" if np.isnan(x) else f"{x:.{digits}f}"


def headline(cfg: Config, grid: np.ndarray) -> list[str]:
  mean = grid.mean(axis=-1)
  lines = []
  for w, width in enumerate(cfg.widths):
    cells = ", ".join(f"{family} {_cell(mean[f, w, -1])}" for f, family in enumerate(cfg.families))
    lines.append(f"width {width}, {cfg.num_kv_pairs[-1]} pairs: {cells}")
  best = ", ".join(f"{family} {_cell(np.nanmax(mean[f]) if np.isfinite(mean[f]).any() else np.nan)}"
                   for f, family in enumerate(cfg.families))
  lines.append(f"best accuracy over widths and pair counts: {best}")
  lines.append("skipped: " + "; ".join(f"{name} ({why})" for name, why in SKIPPED.items()))
  return lines


def to_markdown(cfg: Config, grid: np.ndarray, runs: list[dict], seconds: float, where: str) -> str:
  mean = grid.mean(axis=-1)
  spread = grid.std(axis=-1, ddof=1) if cfg.seeds > 1 else None
  lo, hi = grid.min(axis=-1), grid.max(axis=-1)
  head = (f"MQAR (Zoology): T={cfg.seq_len}, vocab {cfg.vocab_size}, power-law query gaps (a={cfg.power_a}), "
          f"{cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.steps} AdamW steps of {cfg.batch} sequences "
          f"(lr {cfg.learning_rate}), "
          + ("one model per width and seed trained on batches mixing every pair count in equal parts"
             if cfg.mix else "one model per pair count")
          + f", accuracy at the query positions of {cfg.eval_batches * cfg.batch} held-out "
          f"sequences, mean{' (min–max)' if spread is not None else ''} over {cfg.seeds} seed(s). local: window "
          f"{cfg.window}, block {cfg.block_size}; block_sparse: local | strided (stride {cfg.stride} blocks). "
          f"On {where}, {seconds:.0f} s."
          + ("" if np.isfinite(grid).all() else
             f" Partial: {int(np.isfinite(grid).sum())} of {grid.size} cells measured (– : not run).")
          + "\n"
          "Skipped: " + "; ".join(f"{name} ({why})" for name, why in SKIPPED.items()) + ".\n")
  parts = [head]
  for w, width in enumerate(cfg.widths):
    lines = [f"\n### width {width}\n", "| family | " + " | ".join(f"{n} pairs" for n in cfg.num_kv_pairs) + " |",
             "|---|" + "---:|" * len(cfg.num_kv_pairs)]
    for f, family in enumerate(cfg.families):
      cells = [_cell(mean[f, w, i], 3) + (f" ({lo[f, w, i]:.2f}–{hi[f, w, i]:.2f})" if spread is not None
                                          and np.isfinite(spread[f, w, i]) else "")
               for i in range(len(cfg.num_kv_pairs))]
      lines.append(f"| {family} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
  secs = {}
  for r in runs:
    secs.setdefault(r["family"], []).append(r["seconds"])
  parts.append("\nSeconds per model (mean, compilation included): "
               + ", ".join(f"{k} {np.mean(v):.1f}" for k, v in secs.items()) + ".\n")
  parts.append("\n" + "\n".join(f"- {line}" for line in headline(cfg, grid)) + "\n")
  return "".join(parts)


def plot(cfg: Config, grid: np.ndarray, path: pathlib.Path) -> None:
  """Accuracy vs number of key-value pairs: a panel per width, a line per family."""
  ncol = len(cfg.widths)
  fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.8), sharey=True, squeeze=False)
  x = np.asarray(cfg.num_kv_pairs)
  for w, width in enumerate(cfg.widths):
    ax = axes[0, w]
    for f, family in enumerate(cfg.families):
      acc = grid[f, w]  # [num_kv_pairs, seed]
      (line,) = ax.plot(x, acc.mean(axis=-1), marker="o", markersize=4, label=family)
      if cfg.seeds > 1:  # outcomes are often all-or-nothing per seed: show the range, not a standard error
        ax.fill_between(x, acc.min(axis=-1), acc.max(axis=-1), color=line.get_color(), alpha=0.15)
    ax.set(xscale="log", title=f"width {width}", xlabel="key-value pairs", ylim=(-0.02, 1.02))
    ax.set_xticks(x, [str(n) for n in x])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
  axes[0, 0].set_ylabel("query accuracy (held out)")
  axes[0, -1].legend(fontsize=8)
  fig.suptitle(f"MQAR, T={cfg.seq_len}, vocab {cfg.vocab_size}, {cfg.steps} steps"
               + (f" (mean; band: min–max over {cfg.seeds} seeds)" if cfg.seeds > 1 else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(cfg: Config, runs: list[dict], seconds: float, out_dir: pathlib.Path, *, device: str,
                  jax_version: str) -> dict:
  """Writes `mqar.json`, `mqar.md` and `mqar.png` for `runs` (cells not run yet are null / –)."""
  grid = accuracy_grid(cfg, runs)
  result = dict(
      config=dataclasses.asdict(cfg),
      device=device,
      jax_version=jax_version,
      seconds=seconds,
      complete=bool(np.isfinite(grid).all()),
      skipped=SKIPPED,
      data=dict(keys="[1, vocab_size // 2)", values="[vocab_size // 2, vocab_size)", filler=FILLER,
                query_positions=f"power law p(gap) ∝ gap**(power_a - 1), power_a={cfg.power_a}",
                held_out=f"data seed + {EVAL_SEED_OFFSET}"),
      axes=dict(family=list(cfg.families), width=list(cfg.widths), num_kv_pairs=list(cfg.num_kv_pairs),
                seed=list(range(cfg.seeds))),
      # [family, width, num_kv_pairs, seed]; null where not (yet) run
      accuracy=np.where(np.isfinite(grid), grid, None).tolist(),
      runs=runs,
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "mqar.json").write_text(json.dumps(result, indent=1))
  (out_dir / "mqar.md").write_text(to_markdown(cfg, grid, runs, seconds, f"{device} (jax {jax_version})"))
  plot(cfg, grid, out_dir / "mqar.png")
  return result


MERGE_FREE = ("seed", "seeds", "run", "out_dir")  # config fields that may differ between merged sweeps


def merge(dirs: list[str], run: str, out_dir: str) -> dict:
  """One result from sweeps of the same settings with other seeds (`--seed`), e.g. run on separate machines."""
  results = []
  for d in dirs:
    path = pathlib.Path(d) / "mqar.json"
    if not path.is_file():
      raise SystemExit(f"merge: no {path}")
    results.append(json.loads(path.read_text()))
  base = {k: v for k, v in results[0]["config"].items() if k not in MERGE_FREE}
  for d, res in zip(dirs[1:], results[1:]):
    other = {k: v for k, v in res["config"].items() if k not in MERGE_FREE}
    if other != base:
      diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
      raise SystemExit(f"merge: {d} was run with other settings than {dirs[0]}: {diff}")
    if not res.get("complete", True):
      raise SystemExit(f"merge: {d} is a partial sweep")
  runs, offset = [], 0
  for res in results:
    for r in res["runs"]:
      init, data = r.get("init_seed", r["seed"]), r.get("data_seed", res["config"]["seed"] + r["seed"])
      runs.append(dict(r, seed=offset + r["seed"], init_seed=init, data_seed=data))
    offset += res["config"]["seeds"]
  pairs = {(r["family"], r["width"], r["num_kv_pairs"], r["init_seed"], r["data_seed"]) for r in runs}
  if len(pairs) != len(runs):
    raise SystemExit("merge: two sweeps trained the same model with the same seeds")
  fields = {f.name: tuple(v) if isinstance(v, list) else v
            for f in dataclasses.fields(Config) if (v := results[0]["config"].get(f.name)) is not None}
  cfg = Config(**{**fields, "seeds": offset, "run": run, "out_dir": out_dir})
  devices = sorted({res["device"] for res in results})
  versions = sorted({res["jax_version"] for res in results})
  result = write_outputs(cfg, runs, sum(res["seconds"] for res in results), pathlib.Path(out_dir) / run,
                         device=" + ".join(devices), jax_version=" + ".join(versions))
  print("\n".join(headline(cfg, accuracy_grid(cfg, runs))))
  print(f"merged {len(dirs)} sweeps ({offset} seeds) into {pathlib.Path(out_dir) / run}")
  return result


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["merge"]:
    import argparse

    parser = argparse.ArgumentParser(prog="mqar.py merge", description=merge.__doc__)
    parser.add_argument("dirs", nargs="+", help="result folders holding mqar.json, same settings, other --seed")
    parser.add_argument("--run", default="mqar_merged")
    parser.add_argument("--out-dir", default="results")
    args = parser.parse_args(argv[1:])
    return merge(args.dirs, args.run, args.out_dir)
  cfg = parse_args(argv)
  print("skipping " + "; ".join(f"{name}: {why}" for name, why in SKIPPED.items()))
  start = time.perf_counter()
  out_dir = pathlib.Path(cfg.out_dir) / cfg.run

  def write(runs: list[dict]) -> dict:
    return write_outputs(cfg, runs, time.perf_counter() - start, out_dir, device=jax.devices()[0].device_kind,
                         jax_version=jax.__version__)

  result = write(sweep(cfg, on_model_done=write))
  print("\n".join(headline(cfg, accuracy_grid(cfg, result["runs"]))))
  print(f"sweep took {result['seconds']:.0f} s; wrote {out_dir}/mqar.json, mqar.md and mqar.png")
  return result


if __name__ == "__main__":
  main()
