"""Flash kernel speed of whichever tree is on PYTHONPATH, as JSON lines on stdout.

Compares two versions of the kernels in one GPU lease (results/h200/architecture_check):

  git worktree add /tmp/before <commit>
  for tag in before after before after; do
    P=$([ $tag = before ] && echo /tmp/before || echo .)
    PYTHONPATH=$P python experiments/bench_flash_trees.py $tag >> times.jsonl
  done

Both trees must export `pallas.flash_attention(q, k, v, *, is_causal, backend)`. cuDNN is
timed in the runs tagged `after`.
"""
import json, sys, time, statistics
import jax, jax.numpy as jnp
import pallas
tag = sys.argv[1]
shapes = [(4, 16, 2048, 128), (1, 8, 16384, 128), (1, 16, 8192, 64)]
def pipelined(f, args, repeats=20):
  for _ in range(3): jax.block_until_ready(f(*args))
  best = []
  for _ in range(3):
    t0 = time.perf_counter(); out = None
    for _ in range(repeats): out = f(*args)
    jax.block_until_ready(out); best.append((time.perf_counter() - t0) / repeats)
  return statistics.median(best)
for (b, n, t, h) in shapes:
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.float32).astype(jnp.bfloat16) for kk in ks)
  for causal in (False, True):
    for backend in ("mosaic_gpu", "triton") + (("cudnn",) if tag in ("post", "after") else ()):
      if backend == "cudnn":
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
      else:
        fn = lambda q, k, v, be=backend: pallas.flash_attention(q, k, v, is_causal=causal, backend=be)
      for bwd in (False, True):
        if bwd:
          f = jax.jit(lambda q, k, v, do: (lambda o, pull: (o, pull(do)))(*jax.vjp(fn, q, k, v)))
        else:
          f = jax.jit(lambda q, k, v, do: fn(q, k, v))
        try:
          s = pipelined(f, (q, k, v, do))
        except Exception as e:
          s = None; print(repr(e)[:200], file=sys.stderr)
        print(json.dumps(dict(tag=tag, b=b, n=n, t=t, h=h, causal=causal, backend=backend, bwd=bwd, ms=None if s is None else s * 1e3)), flush=True)
