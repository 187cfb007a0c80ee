"""Family-level speed with and without a key-padding mask, for whichever tree is on PYTHONPATH.

Prints JSON lines on stdout. Run it alternately from two trees in one GPU lease to see
what a change to the masking costs (results/h200/mask_check/times.md):

  git worktree add /tmp/before <commit>
  for tag in before after before after; do
    P=$([ $tag = before ] && echo /tmp/before || echo .)
    PYTHONPATH=$P python experiments/bench_mask_trees.py $tag >> times.jsonl
  done

Uses only calls both trees have: `softmax_attention` (Pallas flash, cuDNN, XLA),
`block_sparse_attention` (Pallas), `linear_attention` and `favor_attention` (Pallas, causal),
each with `mask=None`, a key-padding mask `[B, 1, 1, S]` and (softmax) segment ids.
Times are the median of 3 pipelined batches of 20 calls, bf16 inputs.
"""
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import efficient_attention as ea

B, N, T, H = 2, 16, 4096, 128


def pipelined(f, args, repeats=20):
  for _ in range(3):
    jax.block_until_ready(f(*args))
  runs = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = None
    for _ in range(repeats):
      out = f(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / repeats)
  return statistics.median(runs)


def main(tag):
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(jnp.bfloat16) for kk in keys[:4])
  lengths = jnp.array([T, 3 * T // 4])
  pad = (jnp.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
  ids = (jnp.arange(T)[None, :] // 1000).repeat(B, 0).astype(jnp.int32)
  features = ea.orthogonal_random_features(keys[4], 256, H)
  layout = ea.layouts.local(T, window=512, block_size=128)
  families = {
      "softmax_pallas": lambda *a, **kw: ea.softmax_attention(*a, implementation="pallas", **kw),
      "softmax_cudnn": lambda *a, **kw: ea.softmax_attention(*a, implementation="cudnn", **kw),
      "softmax_xla": lambda *a, **kw: ea.softmax_attention(*a, implementation="xla", **kw),
      "block_sparse_pallas": lambda *a, **kw: ea.block_sparse_attention(*a, layout, implementation="pallas", **kw),
      "linear_pallas": lambda *a, **kw: ea.linear_attention(*a, implementation="pallas", **kw),
      "favor_pallas": lambda *a, **kw: ea.favor_attention(*a, features, implementation="pallas", **kw),
  }
  options = {"none": {}, "padding": {"mask": pad}, "padding+ids": {"mask": pad, "segment_ids": ids}}
  for name, fam in families.items():
    for causal in (False, True):
      if name in ("linear_pallas", "favor_pallas") and not causal:
        continue
      for opt, kw in options.items():
        if opt == "padding+ids" and not name.startswith("softmax"):
          continue
        fn = lambda q, k, v, kw=kw, causal=causal, fam=fam: fam(q, k, v, is_causal=causal, **kw)
        for bwd in (False, True):
          if bwd:
            # The output is returned with the gradients: XLA would drop its pass where the backward does not read it.
            f = jax.jit(lambda q, k, v, do, fn=fn: (lambda o, pull: (o, pull(do)))(*jax.vjp(fn, q, k, v)))
          else:
            f = jax.jit(lambda q, k, v, do, fn=fn: fn(q, k, v))
          try:
            ms = pipelined(f, (q, k, v, do)) * 1e3
          except Exception as e:  # noqa: BLE001  (a path one tree lacks is recorded, not fatal)
            ms = None
            print(f"{name} {opt} causal={causal} bwd={bwd}: {e!r}"[:300], file=sys.stderr)
          print(json.dumps(dict(tag=tag, family=name, causal=causal, mask=opt, bwd=bwd, b=B, n=N, t=T, h=H, ms=ms)),
                flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
