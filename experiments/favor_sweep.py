"""FAVOR+ approximation error against exact softmax attention, as the number of features grows.

Sweeps the number of random features M, orthogonal vs iid projections and
positive ("softmax") vs "trig" features over several logit scales and feature
seeds, and writes `results/<run>/{favor_sweep.json,favor_sweep.md,favor_sweep.png}`.

    python experiments/favor_sweep.py                  # CPU-sized defaults, under 2 minutes on 2 cores
    python experiments/favor_sweep.py --smoke          # tiny sizes, seconds
    python experiments/favor_sweep.py --seq-len 1024 --logit-stds 0.25 1 4 --run favor_t1024

Both errors come from one call of the real code path: `favor_attention` on the
values `[I_S | v]` returns `[A_hat | A_hat v]`, its implied (row-normalised)
attention matrix and its output. They are measured in float64 against
`softmax_attention_reference` run in float64 on the same inputs: MSE over all
entries and relative Frobenius error. Performer (Choromanski et al. 2021,
Lemma 2) predicts an MSE that falls as 1/M, a log-log slope of -1 (-1/2 for the
relative error), lower for orthogonal features (sec. 2.4), and far lower for
positive than for trig features where the kernel values are small. Both MSEs
grow like exp(|x ± y|^2) with x, y the scaled query and key, so the logit scale
decides how many features the 1/M regime needs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

import efficient_attention as ea

from experiments import cli  # the experiments' command lines

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

KERNELS = ("softmax", "trig")  # the library's names; "softmax" is the positive feature map
KERNEL_LABELS = {"softmax": "positive", "trig": "trig"}
FEATURES = ("orthogonal", "iid")
METRICS = ("attention_mse", "attention_rel", "output_mse", "output_rel")


@dataclasses.dataclass(frozen=True)
class Config:
  batch: int = 1
  seq_len: int = 512  # T = S
  num_heads: int = 4
  head_dim: int = 64
  num_features: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
  # Std of the logits q . k * H**-0.5: q and k entries have std logit_std**0.5.
  logit_stds: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
  seeds: int = 8  # feature draws; the inputs are one draw per logit scale
  report_m: int = 256  # M of the table's error columns and of the ratios
  seed: int = 0
  run: str = "favor_sweep"
  out_dir: str = "results"


PRESETS = {
    "full": {},
    "smoke": dict(seq_len=16, head_dim=8, num_features=(16, 32), logit_stds=(0.25, 2.0), seeds=2, report_m=32),
}


def parse_args(argv: list[str] | None = None) -> Config:
  parser = cli.config_parser(Config, __doc__.split("\n\n")[0], presets=PRESETS, smoke_flag=True)
  cfg = cli.parse_config(parser, Config, argv, presets=PRESETS)
  ms = cfg.num_features
  if len(ms) < 2 or list(ms) != sorted(set(ms)) or ms[0] <= 0:
    parser.error(f"--num-features needs at least two increasing positive values to fit a slope, got {ms}")
  if cfg.report_m not in ms:
    parser.error(f"--report-m must be one of --num-features {ms}, got {cfg.report_m=}")
  if cfg.seeds < 2 or min(cfg.logit_stds) <= 0:
    parser.error(f"need --seeds >= 2 and positive --logit-stds, got {cfg.seeds=}, {cfg.logit_stds=}")
  return cfg


@functools.partial(jax.jit, static_argnames=("num_features", "head_dim", "orthogonal"))
def draw_features(keys, *, num_features, head_dim, orthogonal):
  """`[seeds, M, H]`: one draw of projection rows per key in `keys [seeds]`."""
  draw = functools.partial(ea.orthogonal_random_features, num_features=num_features, head_dim=head_dim,
                           orthogonal=orthogonal)
  return jax.vmap(draw)(keys)


@functools.partial(jax.jit, static_argnames=("kernel",))
def favor_outputs(features, q, k, v_aug, *, kernel):
  """`[seeds, B, T, N, S + Hv]`: FAVOR+ on (q, k, v_aug) with each of `features [seeds, M, H]`."""
  return jax.vmap(lambda w: ea.favor_attention(q, k, v_aug, w, kernel=kernel))(features)


def exact64(q, k, v_aug) -> np.ndarray:
  """`[B, T, N, S + Hv]`: exact softmax attention on (q, k, v_aug) in float64."""
  with jax.enable_x64(True):
    cast = lambda x: jnp.asarray(np.asarray(x, np.float64))
    return np.asarray(ea.softmax_attention_reference(cast(q), cast(k), cast(v_aug)))


def errors(out, want: np.ndarray, s: int) -> dict[str, np.ndarray]:
  """Per-seed errors `[seeds]` of `out [seeds, B, T, N, S + Hv]` against `want [B, T, N, S + Hv]`."""
  out = np.asarray(out, np.float64)
  axes = tuple(range(1, out.ndim))
  res = {}
  for name, cols in (("attention", slice(None, s)), ("output", slice(s, None))):
    sq = (out[..., cols] - want[..., cols]) ** 2
    res[f"{name}_mse"] = sq.mean(axis=axes)
    res[f"{name}_rel"] = np.sqrt(sq.sum(axis=axes) / np.sum(want[..., cols] ** 2))
  return res


def inputs(cfg: Config, logit_std: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k `[B, T, N, H]` with logits of std `logit_std`, and `[I_S | v]` `[B, S, N, S + H]`.

  The same standard-normal draw at every scale, so scales differ only in magnitude.
  """
  key_q, key_k, key_v = jax.random.split(jax.random.key(cfg.seed), 3)
  shape = (cfg.batch, cfg.seq_len, cfg.num_heads, cfg.head_dim)
  q, k = (logit_std**0.5 * jax.random.normal(key, shape) for key in (key_q, key_k))
  # [B, S, N, S]
  eye = jnp.broadcast_to(jnp.eye(cfg.seq_len)[None, :, None, :], shape[:3] + (cfg.seq_len,))
  return q, k, jnp.concatenate([eye, jax.random.normal(key_v, shape)], axis=-1)


def sweep(cfg: Config) -> dict[str, np.ndarray]:
  """metric -> errors `[logit_std, kernel, features, M, seed]`."""
  shape = (len(cfg.logit_stds), len(KERNELS), len(FEATURES), len(cfg.num_features), cfg.seeds)
  res = {name: np.zeros(shape) for name in METRICS}
  # The first M rows of one draw of max(M) rows: whole orthogonal blocks, then the
  # first rows of the next, exactly as a fresh draw of M rows is built, so each M
  # sees its own distribution while each seed's curve adds features as M grows.
  # Positive and trig features, and every logit scale, share the draws (paired comparisons).
  keys = jax.random.split(jax.random.key(cfg.seed + 1), cfg.seeds)
  features = {feat: draw_features(keys, num_features=cfg.num_features[-1], head_dim=cfg.head_dim,
                                  orthogonal=feat == "orthogonal") for feat in FEATURES}
  settings = list(itertools.product(
      enumerate(cfg.logit_stds), enumerate(KERNELS), enumerate(FEATURES), enumerate(cfg.num_features)))
  data = {}
  for (i, logit_std), (a, kernel), (b, feat), (d, m) in (bar := tqdm(settings, desc="favor sweep", unit="setting")):
    bar.set_postfix_str(f"logit std {logit_std}, {KERNEL_LABELS[kernel]}, {feat}, M={m}")
    if i not in data:
      q, k, v_aug = inputs(cfg, logit_std)
      data[i] = (q, k, v_aug, exact64(q, k, v_aug))
    q, k, v_aug, want = data[i]
    out = favor_outputs(features[feat][:, :m], q, k, v_aug, kernel=kernel)
    for name, value in errors(out, want, cfg.seq_len).items():
      res[name][i, a, b, d] = value
  return res


def loglog_slope(m, y: np.ndarray) -> np.ndarray:
  """Least-squares slope of log y against log m along the last axis of y."""
  x = np.log(np.asarray(m, np.float64))
  x = x - x.mean()
  log_y = np.log(y)
  return np.sum(x * (log_y - log_y.mean(axis=-1, keepdims=True)), axis=-1) / np.sum(x * x)


def summarise(cfg: Config, errs: dict[str, np.ndarray]) -> dict:
  """Slopes `[logit_std, kernel, features]` (of the seed-mean curve; std over per-seed fits) and error ratios."""
  slopes = {name: loglog_slope(cfg.num_features, e.mean(axis=-1)) for name, e in errs.items()}
  slope_std = {name: loglog_slope(cfg.num_features, np.swapaxes(e, -1, -2)).std(axis=-1, ddof=1)
               for name, e in errs.items()}
  at = cfg.num_features.index(cfg.report_m)
  # [logit_std, kernel, features] at M = report_m. Medians: trig errors are heavy-tailed
  # (a near-zero denominator), and one seed can carry a mean.
  median_at = {name: np.median(e[..., at, :], axis=-1) for name, e in errs.items()}
  ratios = {
      # [logit_std, kernel]
      "orthogonal_over_iid": {name: v[:, :, 0] / v[:, :, 1] for name, v in median_at.items()},
      # [logit_std, features]
      "positive_over_trig": {name: v[:, 0, :] / v[:, 1, :] for name, v in median_at.items()},
  }
  return dict(slopes=slopes, slope_std=slope_std, ratios=ratios)


def headline(cfg: Config, summary: dict, errs: dict[str, np.ndarray]) -> list[str]:
  at = cfg.num_features.index(cfg.report_m)
  lines = []
  for i, s in enumerate(cfg.logit_stds):
    slopes = ", ".join(f"{KERNEL_LABELS[k]}/{f} {summary['slopes']['attention_mse'][i, a, b]:+.2f}"
                       for a, k in enumerate(KERNELS) for b, f in enumerate(FEATURES))
    rel = np.median(errs["attention_rel"][i, 0, 0, at])
    orth = summary["ratios"]["orthogonal_over_iid"]["attention_mse"][i]
    pos = summary["ratios"]["positive_over_trig"]["attention_mse"][i]
    lines.append(
        f"logit std {s}: attention MSE slope vs M {slopes} (Performer: -1). At M={cfg.report_m} (seed medians): "
        f"relative error {rel:.2g} (positive, orthogonal); MSE orthogonal/iid {orth[0]:.2f} (positive), "
        f"{orth[1]:.2f} (trig); MSE positive/trig {pos[0]:.2g} (orthogonal), {pos[1]:.2g} (iid)")
  return lines


def to_markdown(cfg: Config, errs: dict[str, np.ndarray], summary: dict, seconds: float) -> str:
  head = (f"B={cfg.batch} T=S={cfg.seq_len} N={cfg.num_heads} H={cfg.head_dim}, M in {list(cfg.num_features)}, "
          f"{cfg.seeds} feature seeds, on {jax.devices()[0].device_kind} (jax {jax.__version__}), {seconds:.0f} s. "
          f"Logit std: of q . k * H**-0.5 (isotropic Gaussian q, k). Slopes: least-squares log-log fit of the "
          f"seed-mean error vs M (± std of per-seed fits); errors at M={cfg.report_m}: mean ± std over seeds; "
          f"ratios below: of seed medians.\n\n")
  at = cfg.num_features.index(cfg.report_m)
  lines = [("| logit std | features | slope attn MSE | slope attn rel | slope out rel | "
            f"attn MSE @ M={cfg.report_m} | attn rel @ M={cfg.report_m} | out rel @ M={cfg.report_m} |"),
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
  for i, a, b in itertools.product(range(len(cfg.logit_stds)), range(len(KERNELS)), range(len(FEATURES))):
    slopes = [f"{summary['slopes'][name][i, a, b]:+.2f} ± {summary['slope_std'][name][i, a, b]:.2f}"
              for name in ("attention_mse", "attention_rel", "output_rel")]
    errors_at = [f"{errs[name][i, a, b, at].mean():.2e} ± {errs[name][i, a, b, at].std(ddof=1):.1e}"
                 for name in ("attention_mse", "attention_rel", "output_rel")]
    cells = [str(cfg.logit_stds[i]), f"{KERNEL_LABELS[KERNELS[a]]}, {FEATURES[b]}"] + slopes + errors_at
    lines.append("| " + " | ".join(cells) + " |")
  return head + "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in headline(cfg, summary, errs)) + "\n"


def plot(cfg: Config, errs: dict[str, np.ndarray], path: pathlib.Path) -> None:
  """Error vs M, log-log: a column per logit scale; attention-matrix MSE above, output relative error below."""
  rows = (("attention_mse", "attention-matrix MSE"), ("output_rel", "output relative error"))
  ncol = len(cfg.logit_stds)
  fig, axes = plt.subplots(len(rows), ncol, figsize=(4.2 * ncol, 7), sharex=True, sharey="row", squeeze=False)
  m = np.asarray(cfg.num_features, np.float64)
  for r, (name, label) in enumerate(rows):
    for i, s in enumerate(cfg.logit_stds):
      ax = axes[r, i]
      for a, k in enumerate(KERNELS):
        for b, f in enumerate(FEATURES):
          e = errs[name][i, a, b]  # [M, seeds]
          ax.errorbar(m, e.mean(axis=-1), yerr=e.std(axis=-1, ddof=1) / np.sqrt(cfg.seeds), capsize=2,
                      color=f"C{a}", linestyle="-" if f == "orthogonal" else "--", marker="o", markersize=3,
                      label=f"{KERNEL_LABELS[k]}, {f}")
      # Performer's rate through the first positive-orthogonal point.
      power = -1.0 if name.endswith("mse") else -0.5
      start = errs[name][i, 0, 0, 0].mean()
      ax.plot(m, start * (m / m[0]) ** power, color="gray", linestyle=":", label=f"∝ $M^{{{power:g}}}$")
      ax.set(xscale="log", yscale="log")
      ax.grid(True, which="both", alpha=0.3)
      if r == 0:
        ax.set_title(f"logit std {s}")
      if r == len(rows) - 1:
        ax.set_xlabel("num_features M")
      if i == 0:
        ax.set_ylabel(label)
  for ax in axes[:, 0]:
    ax.legend(fontsize=8)
  fig.suptitle(f"FAVOR+ error vs exact softmax attention (T={cfg.seq_len}, H={cfg.head_dim}; "
               f"mean ± s.e. over {cfg.seeds} feature seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  cfg = parse_args(argv)
  start = time.perf_counter()
  errs = sweep(cfg)
  seconds = time.perf_counter() - start
  summary = summarise(cfg, errs)
  out_dir = pathlib.Path(cfg.out_dir) / cfg.run
  out_dir.mkdir(parents=True, exist_ok=True)
  tolist = lambda tree: jax.tree.map(lambda x: np.asarray(x).tolist(), tree)
  result = dict(
      config=dataclasses.asdict(cfg),
      device=jax.devices()[0].device_kind,
      jax_version=jax.__version__,
      seconds=seconds,
      axes=dict(logit_std=list(cfg.logit_stds), kernel=list(KERNELS), features=list(FEATURES),
                num_features=list(cfg.num_features), seed=list(range(cfg.seeds))),
      errors=tolist(errs),  # metric -> [logit_std, kernel, features, num_features, seed]
      slopes=tolist(summary["slopes"]),  # metric -> [logit_std, kernel, features]
      slope_std=tolist(summary["slope_std"]),
      # Of seed medians at report_m: orthogonal_over_iid [logit_std, kernel], positive_over_trig [logit_std, features].
      ratios=tolist(summary["ratios"]),
  )
  (out_dir / "favor_sweep.json").write_text(json.dumps(result, indent=1))
  (out_dir / "favor_sweep.md").write_text(to_markdown(cfg, errs, summary, seconds))
  plot(cfg, errs, out_dir / "favor_sweep.png")
  print("\n".join(headline(cfg, summary, errs)))
  print(f"sweep took {seconds:.0f} s; wrote {out_dir}/favor_sweep.json, favor_sweep.md and favor_sweep.png")
  return result


if __name__ == "__main__":
  main()
