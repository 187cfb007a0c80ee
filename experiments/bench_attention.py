"""Benchmarks of the attention families: one suite per file, run from here.

    python experiments/bench_attention.py --run h100_flash       # exact-attention kernels (bench_softmax.py)
    python experiments/bench_attention.py --smoke                # tiny, any machine
    python experiments/bench_attention.py --tune --seq-lens 8192 # Triton block sizes of the flash kernel
    python experiments/bench_attention.py --suite families       # every family, T up to 128k (bench_families.py)
    python experiments/bench_attention.py --suite block_sparse   # block-sparse kernel vs density
    python experiments/bench_attention.py --suite favor          # causal FAVOR+ kernels (bench_favor.py)
    python experiments/bench_attention.py --suite gated          # gated linear / delta-rule kernels (bench_gated.py)
    python experiments/bench_attention.py --suite gated --tune --gated-seq-lens 16384  # their tilings
    python experiments/bench_attention.py --suite gated --trace --gated-seq-lens 4096  # per-kernel GPU time
    python experiments/bench_attention.py --suite block_sparse --trace                 # the same, per density

Each suite writes `results/<run>/<suite>.{json,md,png}`; the suite's module says what it times.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from experiments import bench_block_sparse, bench_families, bench_favor, bench_gated, bench_softmax
from experiments.bench_softmax import IMPLS
from experiments.bench_timing import environment

SUITES = {"softmax": bench_softmax, "families": bench_families, "block_sparse": bench_block_sparse,
          "favor": bench_favor, "gated": bench_gated}


@dataclasses.dataclass(frozen=True)
class Config:
  seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
  head_dims: tuple[int, ...] = (64, 128)
  tokens: int = 16384  # B·T
  width: int = 2048  # N·H
  impls: tuple[str, ...] = IMPLS
  memory_seq_lens: tuple[int, ...] = (32768, 65536, 131072)
  repeats: int = 20
  warmup: int = 3
  tune: bool = False
  trace: bool = False  # --suite gated / block_sparse: per-kernel GPU time (a profiler trace)
  suite: str = "softmax"  # one of SUITES
  family_seq_lens: tuple[int, ...] = tuple(512 * 2**i for i in range(9))  # 512 .. 128k
  families: tuple[str, ...] = ()  # --suite families: the families to time (empty: all of bench_families.FAMILIES)
  # --suite gated: T, and the rows to time (empty: all of bench_gated.ROWS)
  gated_seq_lens: tuple[int, ...] = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k
  gated_rows: tuple[str, ...] = ()
  # --suite block_sparse: B1, N, H, layout blocks, live fractions, Longformer window / global tokens
  sparse_seq_len: int = 16384
  sparse_heads: int = 16
  sparse_head_dim: int = 128
  sparse_block: int = 128
  densities: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
  longformer_window: int = 512
  longformer_global: int = 64
  # --suite favor: B1, N heads, (H, M) pairs, T; targets relative to T=favor_base_len and T=favor_xla_len
  favor_seq_lens: tuple[int, ...] = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k
  favor_shapes: tuple[tuple[int, int], ...] = ((64, 128), (128, 256))
  favor_heads: int = 8
  favor_base_len: int = 8192
  favor_xla_len: int = 16384
  smoke: bool = False
  seed: int = 0
  run: str = "bench"
  out_dir: str = "results"


def parse_args(argv=None) -> Config:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=Config.seq_lens)
  parser.add_argument("--head-dims", type=int, nargs="+", default=Config.head_dims)
  parser.add_argument("--tokens", type=int, default=Config.tokens)
  parser.add_argument("--width", type=int, default=Config.width)
  parser.add_argument("--impls", nargs="+", default=Config.impls, choices=IMPLS)
  parser.add_argument("--memory-seq-lens", type=int, nargs="*", default=Config.memory_seq_lens)
  parser.add_argument("--repeats", type=int, default=Config.repeats)
  parser.add_argument("--warmup", type=int, default=Config.warmup)
  parser.add_argument("--tune", action="store_true", help="--suite softmax / gated: sweep the kernels' tilings instead")
  parser.add_argument("--trace", action="store_true",
                      help="--suite gated / block_sparse: per-kernel GPU time of each row's passes (a profiler trace) "
                           "instead")
  parser.add_argument("--suite", choices=tuple(SUITES), default=Config.suite)
  parser.add_argument("--favor-seq-lens", type=int, nargs="+", default=Config.favor_seq_lens)
  parser.add_argument("--family-seq-lens", type=int, nargs="+", default=Config.family_seq_lens)
  parser.add_argument("--families", nargs="+", default=Config.families, choices=bench_families.FAMILIES,
                      help="--suite families: time these only (default: all)")
  parser.add_argument("--gated-seq-lens", type=int, nargs="+", default=Config.gated_seq_lens)
  parser.add_argument("--gated-rows", nargs="+", default=Config.gated_rows, choices=bench_gated.ROWS + bench_gated.KERNEL_ROWS,
                      help="--suite gated: time these only (default: all)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds on a CPU")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--run", default=Config.run)
  parser.add_argument("--out-dir", default=Config.out_dir)
  args = parser.parse_args(argv)
  for flag, suites in (("tune", ("softmax", "gated")), ("trace", ("gated", "block_sparse"))):
    if getattr(args, flag) and args.suite not in suites:
      parser.error(f"--{flag} applies to --suite {' / '.join(suites)}, not --suite {args.suite}")
  cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
  if cfg.smoke:
    cfg = dataclasses.replace(cfg, seq_lens=(64,), head_dims=(16,), tokens=128, width=32,
                              memory_seq_lens=(128,), family_seq_lens=(64, 128), repeats=2, warmup=1)
    if cfg.suite == "block_sparse":
      cfg = dataclasses.replace(cfg, sparse_seq_len=256, sparse_heads=2, sparse_head_dim=16, sparse_block=16,
                                longformer_window=32, longformer_global=16, repeats=1)
    if cfg.suite == "gated":
      cfg = dataclasses.replace(cfg, gated_seq_lens=(32,), repeats=1)
    if cfg.suite == "favor":
      cfg = dataclasses.replace(cfg, favor_seq_lens=(32, 64), favor_shapes=((16, 16),), favor_heads=2,
                                favor_base_len=32, favor_xla_len=64, repeats=1)
  return cfg


def main(argv=None) -> pathlib.Path:
  cfg = parse_args(argv)
  out = pathlib.Path(cfg.out_dir) / cfg.run
  out.mkdir(parents=True, exist_ok=True)
  SUITES[cfg.suite].run(cfg, out, environment())
  return out


if __name__ == "__main__":
  main()
