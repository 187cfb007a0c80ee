"""Error and time of every attention family against exact softmax attention, on one random input.

Runs each family (jitted) on the same random q, k, v, measures its error against
exact attention computed in float64 and its median wall time, then prints a
table and writes `results/<run>/{families.json,families.md}`.

    python experiments/approx_error.py                 # CPU-sized defaults
    python experiments/approx_error.py --seq-len 4096 --causal --run gpu_t4096

Error is ‖out − exact‖ / ‖exact‖ against full exact attention; block-sparse
layouts restrict attention on purpose, so they are also measured against exact
attention under their own mask (which they must match to float tolerance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import efficient_attention as ea


@dataclasses.dataclass(frozen=True)
class Config:
  batch: int = 2
  seq_len: int = 1024
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  causal: bool = False
  qk_std: float = 1.0  # std of the entries of q and k: logit scale, where FAVOR+ variance grows fast
  num_features: int = 256
  linformer_k: int = 128
  block_size: int = 64
  window: int = 128
  repeats: int = 10
  seed: int = 0
  run: str = "families"
  out_dir: str = "results"


def parse_args() -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for field in dataclasses.fields(Config):
    flag = "--" + field.name.replace("_", "-")
    if field.type == "bool":
      parser.add_argument(flag, action="store_true", default=field.default)
    else:
      kind = {"int": int, "str": str, "float": float}[field.type]
      parser.add_argument(flag, type=kind, default=field.default)
  cfg = Config(**vars(parser.parse_args()))
  if not 0 < cfg.linformer_k <= cfg.seq_len:
    parser.error(f"--linformer-k must be in [1, --seq-len]: got {cfg.linformer_k=}, {cfg.seq_len=}")
  return cfg


def families(cfg: Config, key: jax.Array) -> dict[str, tuple[Callable, jax.Array | None]]:
  """name -> (attention fn of (q, k, v), dense mask it restricts to or None)."""
  t = cfg.seq_len
  k_feat, k_bb = jax.random.split(key)
  features = ea.orthogonal_random_features(k_feat, cfg.num_features, cfg.head_dim)
  # Untrained Linformer: E = F = average pooling of k contiguous spans (random
  # projections would not approximate softmax attention at all before training).
  pool = pooling_projection(cfg.linformer_k, t)
  local = ea.layouts.local(t, window=cfg.window, block_size=cfg.block_size)
  bigbird = ea.layouts.bigbird(k_bb, t, block_size=cfg.block_size)
  causal = cfg.causal
  out = {
      "softmax (xla)": (lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=causal, implementation="xla"), None),
      f"favor+ (m={cfg.num_features})": (
          lambda q, k, v: ea.favor_attention(q, k, v, features, is_causal=causal), None),
      "linear (elu+1)": (lambda q, k, v: ea.linear_attention(q, k, v, is_causal=causal), None),
      f"block-sparse local (w={cfg.window})": (
          lambda q, k, v: ea.block_sparse_attention(q, k, v, local, is_causal=causal), ea.layout_mask(local, t, t)),
      "block-sparse bigbird": (
          lambda q, k, v: ea.block_sparse_attention(q, k, v, bigbird, is_causal=causal), ea.layout_mask(bigbird, t, t)),
  }
  if not causal:  # Linformer has no causal form.
    out[f"linformer (k={cfg.linformer_k}, pooling)"] = (lambda q, k, v: ea.linformer_attention(q, k, v, pool, pool), None)
  if jax.default_backend() == "gpu":
    out["softmax (cudnn)"] = (
        lambda q, k, v: ea.softmax_attention(q, k, v, is_causal=causal, implementation="cudnn"), None)
  return out


def pooling_projection(k: int, t: int) -> jax.Array:
  """`[k, T]`: row i averages positions [i * T / k, (i + 1) * T / k)."""
  span = np.floor(np.arange(t) * k / t).astype(int)
  pool = (span[None, :] == np.arange(k)[:, None]).astype(np.float32)
  return jnp.asarray(pool / pool.sum(axis=1, keepdims=True))


def exact64(q, k, v, *, causal: bool, mask=None) -> np.ndarray:
  with jax.enable_x64(True):
    cast = lambda x: jnp.asarray(np.asarray(x, np.float64))
    return np.asarray(ea.softmax_attention_reference(cast(q), cast(k), cast(v), is_causal=causal, mask=mask))


def rel_error(out, want) -> float:
  out = np.asarray(out, np.float64)
  return float(np.linalg.norm(out - want) / np.linalg.norm(want))


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main(cfg: Config) -> list[dict]:
  key_q, key_k, key_v, key_fam = jax.random.split(jax.random.key(cfg.seed), 4)
  shape_q = (cfg.batch, cfg.seq_len, cfg.num_heads, cfg.head_dim)
  shape_kv = (cfg.batch, cfg.seq_len, cfg.num_kv_heads, cfg.head_dim)
  q = cfg.qk_std * jax.random.normal(key_q, shape_q)
  k = cfg.qk_std * jax.random.normal(key_k, shape_kv)
  v = jax.random.normal(key_v, shape_kv)
  exact = exact64(q, k, v, causal=cfg.causal)
  rows = []
  table = families(cfg, key_fam)
  for name, (fn, restrict) in tqdm(table.items(), desc="families", unit="family"):
    fn = jax.jit(fn)
    dtype = jnp.bfloat16 if "cudnn" in name else jnp.float32
    args = tuple(x.astype(dtype) for x in (q, k, v))
    out = fn(*args)
    row = dict(family=name, ms=median_ms(fn, *args, repeats=cfg.repeats), rel_err_vs_exact=rel_error(out, exact),
               dtype=jnp.dtype(dtype).name)
    if restrict is not None:
      row["rel_err_vs_exact_same_mask"] = rel_error(out, exact64(q, k, v, causal=cfg.causal, mask=restrict))
    rows.append(row)
  base = next(r["ms"] for r in rows if r["family"] == "softmax (xla)")
  for row in rows:
    row["speedup_vs_softmax_xla"] = base / row["ms"]
  return rows


def to_markdown(cfg: Config, rows: list[dict]) -> str:
  head = (f"B={cfg.batch} T={cfg.seq_len} N={cfg.num_heads} K={cfg.num_kv_heads} H={cfg.head_dim} "
          f"causal={cfg.causal} qk_std={cfg.qk_std} on {jax.devices()[0].device_kind} (jax {jax.__version__})\n\n")
  lines = ["| family | dtype | median ms | × softmax (xla) | rel. err vs exact | rel. err vs exact, same mask |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    same = r.get("rel_err_vs_exact_same_mask")
    lines.append(f"| {r['family']} | {r['dtype']} | {r['ms']:.2f} | {r['speedup_vs_softmax_xla']:.2f} | "
                 f"{r['rel_err_vs_exact']:.2e} | {'' if same is None else f'{same:.1e}'} |")
  return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
  config = parse_args()
  results = main(config)
  markdown = to_markdown(config, results)
  out_dir = pathlib.Path(config.out_dir) / config.run
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "families.json").write_text(json.dumps(dict(config=dataclasses.asdict(config), rows=results), indent=2))
  (out_dir / "families.md").write_text(markdown)
  print(markdown)
  print(f"wrote {out_dir}/families.json and families.md")
