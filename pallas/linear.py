"""Chunked causal linear attention (and FAVOR+) in Pallas, forward and backward.

`causal_linear_attention(phi_q, phi_k, v)` takes feature-mapped queries
`phi_q [B, T, N, M]` and keys `phi_k [B, T, K, M]` (N % K == 0, GQA) and values
`v [B, T, K, Hv]` and returns

  out_t = sum_{s <= t} (phi_q_t . phi_k_s) v_s / sum_{s <= t} phi_q_t . phi_k_s

with 0 (and 0 gradient) where the denominator is exactly 0, as
`efficient_attention.linear_attention` normalises. With `segment_ids` the sums
restart where a run of equal ids begins (packed sequences).

Chunkwise-parallel form (Yang et al. 2024, GLA, sec. 2.2): inside a chunk of
`chunk` steps a masked quadratic form on the matrix units; across chunks a state
`S = sum_s phi_k_s^T v_s [M, Hv]` and `z = sum_s phi_k_s [M]`, carried in float32.
Time is cut into spans of whole chunks so that short or few-headed inputs still
fill the GPU: one program per (batch, head, span, block of value columns) walks
its span chunk by chunk. The state entering each span is the sum, made in the
kernel, of the per-span sums (a first, lighter kernel) of the spans before it.

One kernel serves the forward and the three backward passes:

  o_t = sum_{s <= t, same run} (a_t . b_s + alpha_t beta_s) c_s   (forward in time)
  o_t = sum_{s >= t, same run} (a_t . b_s + alpha_t beta_s) c_s   (reverse)

With num = A v, den = A 1 and A_ts = phi_q_t . phi_k_s (s <= t, same run), the
forward writes out = num / den (0 where den is 0) in the input dtype and den in
float32; from out's cotangent g the backward takes dnum = g / den and
dden = -(g . out) / den (0 where den is 0):

  forward  a=phi_q b=phi_k c=v                      (+ den_t = sum_s A_ts; writes num / den)
  dphi_q   a=dnum  b=v     c=phi_k  alpha=dden beta=1   forward in time
  dphi_k   a=v     b=dnum  c=phi_q  alpha=1 beta=dden   reverse
  dv       a=phi_k b=phi_q c=dnum                   reverse

Every pass rebuilds its states chunk by chunk from the inputs (never by
subtracting from a final state, which drifts in low precision).

Backends (`backend=`): "triton" (the default), the kernels below through
Pallas' Triton lowering (or its interpreter); "jax_triton", the same two
kernels written in the Triton language and launched with `jax_triton`
(`pallas/linear_jax_triton.py`), under the same custom_vjp and passes: `_run`
hands a pass to it.

Einsum alphabet: B batch, T time, N query heads, K key/value heads, G = N / K,
M features, P spans, L steps per span, D / E feature widths of a pass's b / c.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import common
from pallas.tiling import (check_tiling, dot, dot_nt, dot_tn, matmul_precision, pad_to, pow2_at_least, triton_lowering_available,
                           triton_params)

# Width of the blocks that hold vector states (the smallest `dot` operand width).
_VEC = 16
# `causal_linear_attention(backend=...)`: Pallas' Triton lowering, or Triton-language kernels through jax_triton.
BACKENDS = ("triton", "jax_triton")


@dataclasses.dataclass(frozen=True)
class LinearBlockSizes:
  """Tiling and launch settings of the chunked kernel.

  `chunk`: time steps per chunk (the intra-chunk quadratic form is chunk x chunk);
  None: 128 where the padded feature and value widths multiply to at most
  128 * 64 (H100, B1 N8, H=64 M=128: 7-10% faster than 64 at T=4k and 16k), else
  64 (at H=128 M=256 a 128-step chunk exceeds the shared memory).
  `block_c`: output columns per program (a pass's c width is split into blocks);
  None: each pass takes max(64, 8192 // D) of its columns for a D-wide b, which
  keeps the float32 state `[D, block_c]` at 8192 values from D = 128 down and
  spares narrow passes (the H=64 gradient passes) recomputing the chunk scores
  for a second block of columns.
  `span_chunks`: chunks per program; None picks the fewest that give at least
  `min_programs` programs in the forward pass (H100, B1 N8 at T=4k and 16k: 128
  programs beat 256 by 10-25%, the span states' sums being fewer to gather; see
  pallas/NOTES.md). `num_warps` / `num_stages`: Triton launch settings; num_warps
  None: 8 with 128-step chunks, else 4 (H100, B1 N8, T=16k: with 64-step chunks 4
  warps and 2 stages are the fastest forward+backward at M=256, H=128 and within
  2% of it at M=128, H=64; see pallas/NOTES.md).
  """

  chunk: int | None = None
  block_c: int | None = None
  span_chunks: int | None = None
  min_programs: int = 128
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    if self.span_chunks is not None and (not isinstance(self.span_chunks, int) or self.span_chunks <= 0):
      raise ValueError(f"span_chunks={self.span_chunks!r} must be None or a positive int")
    check_tiling(self, pow2=("chunk", "block_c"), positive=("min_programs", "num_warps", "num_stages"),
                 optional=("chunk", "block_c", "num_warps"))


@dataclasses.dataclass(frozen=True)
class _Pass:
  """Static settings of one kernel launch (hashable)."""

  reverse: bool  # o_t sums over s >= t instead of s <= t
  bias: bool  # the rank-one term alpha_t beta_s
  rowsum: bool  # also write den_t = sum_s a_t . b_s
  segments: bool  # run labels restrict sums to one run
  chunk: int
  span: int  # time steps per program, a multiple of chunk
  spans: int  # programs along time (the padded length over span)
  block_c: int | None
  a_group: int  # grid heads per head of a (and alpha)
  b_group: int  # grid heads per head of b, c (and beta)
  interpret: bool
  num_warps: int
  num_stages: int
  precision: Any = None
  out_dtype: Any = jnp.float32  # of o (a gradient summed over no GQA group is written in the input dtype)
  times: bool = False  # o is multiplied by a tile of `times` (see `backward`)
  f_group: int = 1  # grid heads per head of `times`
  floor: float | None = None  # entries of `times` at or below it multiply by 0
  times_sum: bool = False  # (with times) also write o's row sums, float32 [B, Ho, J, T]
  alpha_ones: bool = False  # alpha is 1 (no alpha input)
  beta_ones: bool = False  # beta is 1 (no beta input)
  sums_t: bool = False  # given span sums are transposed: S as [E, D], W as Z-shaped [E, 16]
  normalise: bool = False  # (with rowsum) o is written divided by den (0 where den is 0)
  # (with normalise, 16-bit o) also write o's rounding error in o's dtype: o + lo holds o to ~16 bits.
  split: bool = False
  label: str = "forward"  # names the kernels: linear_attention_{label}, linear_attention_span_sums_{label}
  backend: str = "triton"  # one of BACKENDS: which kernels run the pass

  def columns(self, d: int, e: int) -> int:
    """Output columns per program of this pass with a D-wide b and an E-wide c."""
    return _block_c(self.block_c, d, e)


@dataclasses.dataclass(frozen=True)
class LinearStatic:
  """Static settings shared by the forward and backward of one call."""

  chunk: int
  span: int
  spans: int
  block_c: int | None
  group: int
  segments: bool
  interpret: bool
  num_warps: int
  num_stages: int
  precision: Any = None
  backend: str = "triton"

  def pass_(self, label: str, *, reverse: bool, bias: bool, rowsum: bool, a_group: int, b_group: int,
            out_dtype: Any = jnp.float32) -> _Pass:
    return _Pass(label=label, reverse=reverse, bias=bias, rowsum=rowsum, segments=self.segments, chunk=self.chunk,
                 span=self.span, spans=self.spans, block_c=self.block_c, a_group=a_group, b_group=b_group,
                 interpret=self.interpret, num_warps=self.num_warps, num_stages=self.num_stages,
                 precision=self.precision, out_dtype=jnp.dtype(out_dtype), backend=self.backend)


def causal_linear_attention(
    phi_q: jax.Array,
    phi_k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    block_sizes: LinearBlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
  """Causal linear attention from features, chunk by chunk.

  Args:
    phi_q: `[B, T, N, M]` query features.
    phi_k: `[B, T, K, M]` key features, `N % K == 0` (zero a key's features to
      remove it, e.g. for key padding).
    v: `[B, T, K, Hv]` values.
    segment_ids: optional int `[B, T]`; sums restart where a run of equal ids
      begins (an id recurring after another id starts a new run).
    block_sizes: tiling; default `LinearBlockSizes()`.
    interpret: run in Pallas' interpreter; default True off GPU (backend="triton").
    backend: "triton" (the kernels through Pallas' Triton lowering) or
      "jax_triton" (Triton-language kernels launched with jax_triton; needs
      jax_triton and a CUDA GPU, no interpret mode). None: `default_backend`.

  Returns:
    `[B, T, N, Hv]` in the input dtype; rows whose denominator is exactly 0 are 0.
  """
  family = "causal_linear_attention"
  if backend is None:
    backend = default_backend(interpret=bool(interpret))
  if backend not in BACKENDS:
    raise ValueError(f"unknown {backend=}; valid: None, {', '.join(map(repr, BACKENDS))}")
  dims = common.check_qkv(phi_q, phi_k, v)
  common.check_causal(True, dims, family=family, need_square=True)
  if phi_q.dtype == jnp.float64:
    raise TypeError(f"{family} computes in float32 at most, got {phi_q.dtype=}; use the xla implementation")
  ids = common.check_shared_segment_ids(segment_ids, dims, family=family)
  if block_sizes is None:
    block_sizes = LinearBlockSizes()
  if not isinstance(block_sizes, LinearBlockSizes):
    raise TypeError(f"block_sizes must be a LinearBlockSizes, got {type(block_sizes).__name__}")
  if interpret is None:
    # jax_triton has no interpreter: its kernels run compiled, or not at all.
    interpret = backend == "triton" and jax.default_backend() != "gpu"
  if backend == "jax_triton":
    from pallas import linear_jax_triton

    linear_jax_triton.check_runnable(interpret)
  b, t, n, m = phi_q.shape
  if t == 0:
    return jnp.zeros((b, 0, n, dims.v_head_dim), phi_q.dtype)
  static, t_pad, labels = prepare(dims, m, phi_q.dtype, ids, block_sizes, interpret, backend=backend)
  m_pad, hv_pad = pow2_at_least(m), pow2_at_least(dims.v_head_dim)
  out = _core(pad_to(phi_q, t_pad, m_pad), pad_to(phi_k, t_pad, m_pad), pad_to(v, t_pad, hv_pad), labels, static)
  return finish(out, dims)


def default_backend(*, interpret: bool = False, platform: str | None = None) -> str:
  """The backend `causal_linear_attention` picks when none is named.

  A GPU, compiled: "triton" (Pallas' Triton lowering) while this JAX has it, else
  "jax_triton" where jax_triton runs, else an error naming what is missing.
  Interpreted calls and other platforms: "triton".
  """
  platform = platform or jax.default_backend()
  if platform == "gpu" and not interpret and not triton_lowering_available():
    from pallas import linear_jax_triton

    if not linear_jax_triton.available():
      raise ValueError("causal_linear_attention on this GPU needs jax_triton (pip install "
                       "'efficient-attention[gpu]'): this JAX has no Pallas-Triton lowering "
                       f"(missing for jax_triton: {', '.join(linear_jax_triton.missing())})")
    return "jax_triton"
  return "triton"


def prepare(dims: common.Dims, m: int, dtype, ids, block_sizes: LinearBlockSizes, interpret: bool, *,
            backend: str = "triton"):
  """Static settings, the padded length and the run labels `[B, T']` (None without segments)."""
  b, t, n = dims.batch, dims.q_len, dims.num_heads
  hv_pad = pow2_at_least(dims.v_head_dim)
  m_pad = pow2_at_least(m)
  chunk = block_sizes.chunk
  if chunk is None:
    chunk = 128 if m_pad * hv_pad <= 128 * 64 else 64
  num_warps = block_sizes.num_warps
  if num_warps is None:
    num_warps = 8 if chunk >= 128 else 4
  chunk = min(chunk, pow2_at_least(t))
  block_c = _block_c(block_sizes.block_c, m_pad, hv_pad)
  num_chunks = -(-t // chunk)
  span_chunks = block_sizes.span_chunks
  if span_chunks is None:
    wanted_spans = -(-block_sizes.min_programs // (b * n * (hv_pad // block_c)))
    span_chunks = -(-num_chunks // min(wanted_spans, num_chunks))
  span = min(span_chunks, num_chunks) * chunk
  t_pad = -(-t // span) * span
  static = LinearStatic(chunk=chunk, span=span, spans=t_pad // span, block_c=block_sizes.block_c, group=dims.group,
                   segments=ids is not None, interpret=bool(interpret), num_warps=num_warps,
                   num_stages=block_sizes.num_stages,
                   precision=matmul_precision(dtype), backend=backend)
  labels = None
  if ids is not None:
    # Run labels: non-decreasing, a new label per run; padded steps continue the last run.
    labels = common.run_labels(ids)
    labels = jnp.pad(labels, ((0, 0), (0, t_pad - t)), mode="edge")
  return static, t_pad, labels


def _block_c(cap: int | None, d: int, e: int) -> int:
  """Output columns per program of a pass with a D-wide b and E-wide c (see LinearBlockSizes)."""
  return min(e, max(64, 8192 // d) if cap is None else cap)


def finish(out: jax.Array, dims: common.Dims) -> jax.Array:
  """The real steps and value columns of the padded output."""
  return out[:, : dims.q_len, :, : dims.v_head_dim]


# --------------------------------------------------------------------------- #
# custom_vjp over padded inputs
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q, k, v, labels, static: LinearStatic):
  """`num / den` `[B, T, N, Hv]` in q's dtype (0 where den is 0)."""
  return forward(q, k, v, labels, static)[0]


def forward(q, k, v, labels, static: LinearStatic):
  """(out, (den, lo)), and the per-span sums the forward used (None with one span).

  out `[B, T, N, Hv]` in q's dtype; den float32 `[B, N, J, T]` (J copies); lo,
  for 16-bit inputs, out's rounding error in q's dtype (the backward's
  `g . out` then sees out to ~16 bits, as a float32 out would give it), else None.
  """
  split = jnp.dtype(q.dtype).itemsize == 2
  p = static.pass_("forward", reverse=False, bias=False, rowsum=True, a_group=1, b_group=static.group,
                   out_dtype=q.dtype)
  outs, sums = _run(q, k, v, None, None, labels, dataclasses.replace(p, normalise=True, split=split))
  return outs[0], (outs[1], outs[2] if split else None), sums


def _core_fwd(q, k, v, labels, static: LinearStatic):
  out, rows, sums = forward(q, k, v, labels, static)
  return out, (q, k, v, labels, sums, out, rows)


def _core_bwd(static: LinearStatic, residuals, g):
  q, k, v, labels, sums, out, rows = residuals
  return (*backward(static, q, k, v, labels, sums, *num_den_cotangents(g, out, *rows))[:3], None)


def num_den_cotangents(g: jax.Array, out: jax.Array, den: jax.Array, lo: jax.Array | None):
  """Cotangents of (num, den) from out's `g [B, T, N, E]`, out = num / den (+ lo): g / den
  `[B, T, N, E]` and -(g . out) / den `[B, N, T]` (float32), both 0 where den is 0."""
  # [B, T, N, 1]
  den = den[:, :, 0].transpose(0, 2, 1)[..., None]
  inv = jnp.where(den == 0, 0.0, 1.0 / jnp.where(den == 0, 1.0, den))
  g = g.astype(jnp.float32)
  out = out.astype(jnp.float32) if lo is None else out.astype(jnp.float32) + lo.astype(jnp.float32)
  d_den = -jnp.sum(g * out, axis=-1, keepdims=True) * inv
  return g * inv, d_den[..., 0].transpose(0, 2, 1)


def backward(static: LinearStatic, q, k, v, labels, sums, d_num, d_den, key_floor: float | None = None):
  """dq, dk, dv of num and den from their cotangents (`[B, T, N, E]`, `[B, N, T]`) and the forward's span sums.

  With `key_floor`, the cotangents of the features' logarithms instead: dq times
  q and dk times k (0 where k <= key_floor: floored features are constants), as
  the passes write them (no separate product over `[T, M]`); then a fourth
  result, dk's float32 row sums `[B, T, K]` (None without `key_floor`).
  """
  kh, g = k.shape[2], static.group
  logs = key_floor is not None
  d_num = d_num.astype(q.dtype)
  # The dq pass's span sums are the forward's, read transposed (sum_s v_s^T k_s and sum_s k_s);
  # the dv pass's are the dk pass's, read transposed (sum_s q_s^T d_num_s).
  fwd = static.pass_("dq", reverse=False, bias=True, rowsum=False, a_group=1, b_group=g, out_dtype=q.dtype)
  fwd = dataclasses.replace(fwd, beta_ones=True, sums_t=sums is not None, times=logs, f_group=1)
  dq = _run(d_num, v, k, d_den, None, labels, fwd, sums=sums, times=q if logs else None)[0][0]
  # dk, dv sum over each GQA group in float32 (with groups of one, written in the input dtype).
  rev = static.pass_("dk", reverse=True, bias=True, rowsum=False, a_group=g, b_group=1,
                     out_dtype=k.dtype if g == 1 else jnp.float32)
  rev_k = dataclasses.replace(rev, alpha_ones=True, times=logs, f_group=g, floor=key_floor, times_sum=logs)
  (dk, *k_sums), sums = _run(v, d_num, q, None, d_den, labels, rev_k, times=k if logs else None)
  dk = _sum_group(dk, kh)
  if logs:
    # [B, N, J, T] -> [B, T, K]
    k_sums = _sum_group(jnp.sum(k_sums[0], axis=2).transpose(0, 2, 1)[..., None], kh)[..., 0]
  rev_v = dataclasses.replace(rev, label="dv", bias=False, sums_t=sums is not None,
                              out_dtype=jnp.dtype(v.dtype if g == 1 else jnp.float32))
  dv = _sum_group(_run(k, q, d_num, None, None, labels, rev_v, sums=None if sums is None else sums[:1])[0][0], kh)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), (k_sums if logs else None)


_core.defvjp(_core_fwd, _core_bwd)


def _sum_group(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[B, T, N, D]` per query head -> `[B, T, K, D]` summed over each GQA group."""
  b, t, n, d = x.shape
  return x.reshape(b, t, num_kv_heads, n // num_kv_heads, d).sum(3)


# --------------------------------------------------------------------------- #
# one pass: states entering each span (XLA), then the kernel
# --------------------------------------------------------------------------- #


def _run(a, b, c, alpha, beta, labels, p: _Pass, sums: list | None = None, times: jax.Array | None = None):
  """One pass over `a [B, T, Ha, D]`, `b [B, T, Hb, D]`, `c [B, T, Hb, E]`.

  `alpha [B, Ha, T]`, `beta [B, Hb, T]` (with `p.bias`), `labels [B, T]` (with
  `p.segments`). Returns `o [B, T, Ho, E]` in `p.out_dtype`, Ho = max(Ha, Hb)
  (divided by the row sums with `p.normalise`), and, with `p.rowsum`, float32
  `den [B, Ho, J, T]` (one copy per column block), with `p.times_sum` o's
  float32 row sums per column block `[B, Ho, J, T]`, with `p.split` o's
  rounding error (like o); and
  the per-span sums it used (None with one span): given as `sums`, or computed
  by `_span_sums`. With `p.times`, `o` is multiplied element-wise by `times
  [B, T, Ho / p.f_group, E]` (zeroed where `times <= p.floor`).
  """
  if p.backend == "jax_triton":
    from pallas import linear_jax_triton

    return linear_jax_triton.run(a, b, c, alpha, beta, labels, p, sums=sums, times=times)
  batch, t_pad, ha, d = a.shape
  hb, e = b.shape[2], c.shape[3]
  heads = max(ha, hb)
  bc = _block_c(p.block_c, d, e)
  spans, blocks = t_pad // p.span, e // bc
  params = triton_params(interpret=p.interpret, num_warps=p.num_warps, num_stages=p.num_stages)
  a_head = lambda n: n // p.a_group
  b_head = lambda n: n // p.b_group
  # The pass's inputs, by the names the kernel reads them under: (array, block spec).
  inputs = {
      "a": (a, pl.BlockSpec((None, p.span, None, d), lambda i, n, s, j: (i, s, a_head(n), 0))),
      "b": (b, pl.BlockSpec((None, p.span, None, d), lambda i, n, s, j: (i, s, b_head(n), 0))),
      "c": (c, pl.BlockSpec((None, p.span, None, bc), lambda i, n, s, j: (i, s, b_head(n), j))),
  }
  if p.bias and not p.alpha_ones:
    inputs["alpha"] = (alpha, pl.BlockSpec((None, None, p.span), lambda i, n, s, j: (i, a_head(n), s)))
  if p.bias and not p.beta_ones:
    inputs["beta"] = (beta, pl.BlockSpec((None, None, p.span), lambda i, n, s, j: (i, b_head(n), s)))
  if p.segments:
    inputs["labels"] = (labels, pl.BlockSpec((None, p.span), lambda i, n, s, j: (i, s)))
  if p.times:
    inputs["times"] = (times, pl.BlockSpec((None, p.span, None, bc), lambda i, n, s, j: (i, s, n // p.f_group, j)))
  if spans > 1:
    # Every span's sums (S, then Z with rowsum, W with bias) and, with segments,
    # the run each span hands on; the kernel adds up those that reach its span.
    if sums is None:
      sums = _span_sums(b, c, beta, labels, p, params)
    p_pad = sums[0].shape[1]
    named = iter(sums)
    if p.sums_t:
      # Another pass's sums, read transposed (the kernel transposes each block back).
      assert not p.rowsum, "transposed sums serve passes without a row sum"
      inputs["s_sums"] = (next(named), pl.BlockSpec((None, p_pad, None, bc, d),
                                                    lambda i, n, s, j: (i, 0, b_head(n), j, 0)))
      if p.bias:
        inputs["w_sums"] = (next(named), pl.BlockSpec((None, p_pad, None, bc, _VEC),
                                                      lambda i, n, s, j: (i, 0, b_head(n), j, 0)))
    else:
      inputs["s_sums"] = (next(named), pl.BlockSpec((None, p_pad, None, d, bc),
                                                    lambda i, n, s, j: (i, 0, b_head(n), 0, j)))
      if p.rowsum:
        inputs["z_sums"] = (next(named), pl.BlockSpec((None, p_pad, None, d, _VEC),
                                                      lambda i, n, s, j: (i, 0, b_head(n), 0, 0)))
      if p.bias:
        inputs["w_sums"] = (next(named), pl.BlockSpec((None, p_pad, None, _VEC, bc),
                                                      lambda i, n, s, j: (i, 0, b_head(n), 0, j)))
    assert next(named, None) is None, "as many span sums as the pass reads"
    if p.segments:
      runs = labels.reshape(batch, spans, p.span)[:, :, 0 if p.reverse else -1]
      inputs["runs"] = (jnp.pad(runs, ((0, 0), (0, p_pad - spans))),
                        pl.BlockSpec((None, p_pad), lambda i, n, s, j: (i, 0)))
  # Its outputs, likewise: (shape, block spec).
  o_spec = pl.BlockSpec((None, p.span, None, bc), lambda i, n, s, j: (i, s, n, j))
  o_shape = jax.ShapeDtypeStruct((batch, t_pad, heads, e), p.out_dtype)
  outputs = {"o": (o_shape, o_spec)}
  assert not (p.rowsum and p.times_sum), "one row-sum output per pass"
  if p.rowsum or p.times_sum:
    outputs["den" if p.rowsum else "row_sums"] = (
        jax.ShapeDtypeStruct((batch, heads, blocks, t_pad), jnp.float32),
        pl.BlockSpec((None, None, None, p.span), lambda i, n, s, j: (i, n, j, s)))
  if p.split:
    outputs["lo"] = (o_shape, o_spec)
  outs = pl.pallas_call(
      functools.partial(_named_refs, _kernel, tuple(inputs) + tuple(outputs), p=p),
      grid=(batch, heads, spans, blocks),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=[spec for _, spec in outputs.values()],
      out_shape=[shape for shape, _ in outputs.values()],
      interpret=p.interpret,
      name=f"linear_attention_{p.label}",
      **params,
  )(*(x for x, _ in inputs.values()))
  return outs, (sums if spans > 1 else None)


def _named_refs(kernel, names: tuple[str, ...], *refs, p: _Pass):
  """Calls `kernel(refs, p=p)` with the refs of a `pallas_call` in a dict by name."""
  assert len(names) == len(refs), (names, len(refs))
  return kernel(dict(zip(names, refs)), p=p)


def _span_sums(b, c, beta, labels, p: _Pass, params: dict):
  """Per-span sums of the keys that a span hands on, in the pass's direction of time.

  Returns float32 `[S [B, P', Hb, D, E]]`, then `Z [B, P', Hb, D, 16]` (with
  `p.rowsum`) and `W [B, P', Hb, 16, E]` (with `p.bias`), the vectors in column /
  row 0 (see `_kernel`); P' is the number of spans rounded up to a power of two. With segments only the keys of the span's last run
  (first, in reverse) count: earlier runs end inside the span.
  """
  batch, t_pad, hb, d = b.shape
  e = c.shape[3]
  bc = _block_c(p.block_c, d, e)
  spans = t_pad // p.span
  inputs = {
      "b": (b, pl.BlockSpec((None, p.span, None, d), lambda i, h, s, j: (i, s, h, 0))),
      "c": (c, pl.BlockSpec((None, p.span, None, bc), lambda i, h, s, j: (i, s, h, j))),
  }
  if p.bias and not p.beta_ones:
    inputs["beta"] = (beta, pl.BlockSpec((None, None, p.span), lambda i, h, s, j: (i, h, s)))
  if p.segments:
    inputs["labels"] = (labels, pl.BlockSpec((None, p.span), lambda i, h, s, j: (i, s)))
  # The span axis is padded to a power of two; the padding is never read.
  p_pad = pow2_at_least(spans, 1)
  outputs = {"s_sums": (jax.ShapeDtypeStruct((batch, p_pad, hb, d, e), jnp.float32),
                        pl.BlockSpec((None, None, None, d, bc), lambda i, h, s, j: (i, s, h, 0, j)))}
  if p.rowsum:
    outputs["z_sums"] = (jax.ShapeDtypeStruct((batch, p_pad, hb, d, _VEC), jnp.float32),
                         pl.BlockSpec((None, None, None, d, _VEC), lambda i, h, s, j: (i, s, h, 0, 0)))
  if p.bias:
    outputs["w_sums"] = (jax.ShapeDtypeStruct((batch, p_pad, hb, _VEC, e), jnp.float32),
                         pl.BlockSpec((None, None, None, _VEC, bc), lambda i, h, s, j: (i, s, h, 0, j)))
  return pl.pallas_call(
      functools.partial(_named_refs, _sums_kernel, tuple(inputs) + tuple(outputs), p=p),
      grid=(batch, hb, spans, e // bc),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=[spec for _, spec in outputs.values()],
      out_shape=[shape for shape, _ in outputs.values()],
      interpret=p.interpret,
      name=f"linear_attention_span_sums_{p.label}",
      **params,
  )(*(x for x, _ in inputs.values()))


# --------------------------------------------------------------------------- #
# the kernel
# --------------------------------------------------------------------------- #


def _kernel(refs: dict, p: _Pass):
  """One program: a span of `p.span` steps, a block of `bc` output columns.

  Refs by name (those the pass has, see `_run`): a `[L, D]`, b `[L, D]`, c `[L, bc]`,
  alpha `[L]`, beta `[L]` (bias, unless 1), labels `[L]` (segments), times, a factor
  `[L, bc]` of the output; with more than one span, every span's sums s_sums
  `[P', D, bc]`, z_sums `[P', D, 16]` (rowsum), w_sums `[P', 16, bc]` (bias) and runs,
  the run each span hands on `[P']` (segments); outputs o `[L, bc]`, den `[L]`
  (rowsum) or row_sums, o's row sums `[L]` (times_sum), lo, o's rounding error `[L, bc]` (split).

  The state entering the span is the sum of the spans before it (after it, in
  reverse) whose handed-on run is the run of the span's first step: labels do
  not decrease, so those spans lie inside that run (the span sums only hold
  keys of the run they hand on).

  The vector states `z = sum_s b_s` and `w = sum_s beta_s c_s` live in column /
  row 0 of `[D, 16]` / `[16, bc]` blocks (the rest is 0), so that their updates
  and their products with `a` and `alpha` run on the matrix units as `dot`s of
  the smallest width they take, instead of float32 element-wise work on whole
  `[C, D]` tiles.
  """
  a_ref, b_ref, c_ref = refs["a"], refs["b"], refs["c"]
  alpha_ref, beta_ref, lab_ref, times_ref = refs.get("alpha"), refs.get("beta"), refs.get("labels"), refs.get("times")
  states = p.spans > 1
  s_sums, z_sums, w_sums, runs_ref = refs.get("s_sums"), refs.get("z_sums"), refs.get("w_sums"), refs.get("runs")
  o_ref, den_ref, sum_ref, lo_ref = refs["o"], refs.get("den"), refs.get("row_sums"), refs.get("lo")
  f32 = jnp.float32
  size = p.chunk
  num_chunks = p.span // size
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  # [C, C]: query row t sees key column s.
  order = cols >= rows if p.reverse else cols <= rows
  # [C, 16]: selects column 0.
  first = lax.broadcasted_iota(jnp.int32, (size, _VEC), 1) == 0

  def start_of(i):
    return pl.multiple_of((num_chunks - 1 - i if p.reverse else i) * size, size)

  def body(i, carry):
    s, z, w, label = carry
    at = pl.ds(start_of(i), size)
    a, b, c = a_ref[at, :], b_ref[at, :], c_ref[at, :]
    # [C, C]
    scores = dot_nt(a, b, p.precision)
    if p.bias:
      ones = jnp.ones((size,), f32)
      alpha = ones if p.alpha_ones else alpha_ref[at]
      beta = ones if p.beta_ones else beta_ref[at]
      scores = scores + alpha[:, None] * beta[None, :]
    live = order
    if p.segments:
      lab = lab_ref[at]
      live = live & (lab[:, None] == lab[None, :])
      # [C]: queries of the run the carried state belongs to.
      sees = lab == label
      # The run carried on to the next chunk, and its keys here.
      edge = jnp.min(lab) if p.reverse else jnp.max(lab)
      carried = lab == edge
    scores = jnp.where(live, scores, 0.0)
    # [C, bc]
    inter = dot(a, s.astype(a.dtype), p.precision)
    if p.bias:
      inter = inter + dot(jnp.where(first, alpha[:, None], 0.0).astype(a.dtype), w.astype(a.dtype), p.precision)
    if p.segments:
      inter = jnp.where(sees[:, None], inter, 0.0)
    out = dot(scores.astype(c.dtype), c, p.precision) + inter
    if p.rowsum:
      den_inter = jnp.sum(dot(a, z.astype(a.dtype), p.precision), axis=1)
      if p.segments:
        den_inter = jnp.where(sees, den_inter, 0.0)
      den = jnp.sum(scores, axis=1) + den_inter
      den_ref[at] = den
      if p.normalise:
        empty = den == 0
        out = jnp.where(empty[:, None], 0.0, out / jnp.where(empty, 1.0, den)[:, None])
    if p.times:
      factor = times_ref[at, :].astype(f32)
      if p.floor is not None:
        factor = jnp.where(factor > p.floor, factor, 0.0)
      out = out * factor
      if p.times_sum:
        sum_ref[at] = jnp.sum(out, axis=1)
    o_ref[at, :] = out.astype(o_ref.dtype)
    if p.split:
      lo_ref[at, :] = (out - out.astype(o_ref.dtype).astype(f32)).astype(lo_ref.dtype)
    # Carry the state on: restart it when a run begins inside the chunk.
    keep = 1.0
    if p.segments:
      keep = (edge == label).astype(f32)
      label = edge
      b = jnp.where(carried[:, None], b, jnp.zeros_like(b))
    s = keep * s + dot_tn(b, c, p.precision)
    if p.rowsum:
      z = keep * z + dot_tn(b, first.astype(b.dtype), p.precision)
    if p.bias:
      beta = jnp.where(carried, beta, 0.0) if p.segments else beta
      w = keep * w + dot_tn(jnp.where(first, beta[:, None], 0.0).astype(c.dtype), c, p.precision)
    return s, z, w, label

  d, bc = a_ref.shape[1], c_ref.shape[1]
  s = jnp.zeros((d, bc), f32)
  z = jnp.zeros((d, _VEC), f32) if p.rowsum else f32(0.0)
  w = jnp.zeros((_VEC, bc), f32) if p.bias else f32(0.0)
  label = jnp.int32(0)
  if p.segments:
    # The run of the span's first step in the pass's direction.
    label = jnp.max(lab_ref[pl.ds(p.span - size, size)]) if p.reverse else jnp.min(lab_ref[pl.ds(0, size)])
  if states:
    me = pl.program_id(2)

    def gather(q, carry):
      s, z, w = carry
      weight = (runs_ref[q] == label).astype(f32) if p.segments else f32(1.0)
      s = s + weight * (s_sums[q].T if p.sums_t else s_sums[q])
      if p.rowsum:
        z = z + weight * z_sums[q]
      if p.bias:
        w = w + weight * (w_sums[q].T if p.sums_t else w_sums[q])
      return s, z, w

    s, z, w = lax.fori_loop(me + 1, p.spans, gather, (s, z, w)) if p.reverse else lax.fori_loop(0, me, gather, (s, z, w))
  lax.fori_loop(0, num_chunks, body, (s, z, w, label))


def _sums_kernel(refs: dict, p: _Pass):
  """One program: the sums over a span's carried keys (see `_span_sums`).

  Refs by name: b `[L, D]`, c `[L, bc]`, beta `[L]` (bias, unless 1), labels `[L]`
  (segments); outputs s_sums `[D, bc]`, z_sums `[D, 16]` (rowsum), w_sums `[16, bc]` (bias).
  """
  b_ref, c_ref, beta_ref, lab_ref = refs["b"], refs["c"], refs.get("beta"), refs.get("labels")
  s_ref, z_ref, w_ref = refs["s_sums"], refs.get("z_sums"), refs.get("w_sums")
  size = p.chunk
  first = lax.broadcasted_iota(jnp.int32, (size, _VEC), 1) == 0
  if p.segments:
    # The run handed on: the span's last (first, in reverse) run.
    edge = jnp.min(lab_ref[pl.ds(0, size)]) if p.reverse else jnp.max(lab_ref[pl.ds(p.span - size, size)])

  def body(i, carry):
    s, z, w = carry
    at = pl.ds(pl.multiple_of(i * size, size), size)
    b, c = b_ref[at, :], c_ref[at, :]
    if p.segments:
      carried = lab_ref[at] == edge
      b = jnp.where(carried[:, None], b, jnp.zeros_like(b))
    s = s + dot_tn(b, c, p.precision)
    if p.rowsum:
      z = z + dot_tn(b, first.astype(b.dtype), p.precision)
    if p.bias:
      beta = jnp.ones((size,), jnp.float32) if p.beta_ones else beta_ref[at]
      beta = jnp.where(carried, beta, 0.0) if p.segments else beta
      w = w + dot_tn(jnp.where(first, beta[:, None], 0.0).astype(c.dtype), c, p.precision)
    return s, z, w

  d, bc = s_ref.shape
  s = jnp.zeros((d, bc), jnp.float32)
  z = jnp.zeros((d, _VEC), jnp.float32) if p.rowsum else jnp.float32(0.0)
  w = jnp.zeros((_VEC, bc), jnp.float32) if p.bias else jnp.float32(0.0)
  s, z, w = lax.fori_loop(0, p.span // size, body, (s, z, w))
  s_ref[...] = s
  if p.rowsum:
    z_ref[...] = z
  if p.bias:
    w_ref[...] = w


# --------------------------------------------------------------------------- #
# reference
# --------------------------------------------------------------------------- #


def kernel_attention_reference(phi_q, phi_k, v, *, is_causal=False, mask=None, segment_ids=None) -> jax.Array:
  """Dense `[B, T, N, Hv]` from features `phi_q [B, T, N, M]`, `phi_k [B, S, K, M]`, v `[B, S, K, Hv]`.

  The one reference of kernelised attention: `causal_linear_attention` is it with
  `is_causal=True`, and `efficient_attention.linear_attention_reference` and
  `favor_attention_reference` are it after their feature maps. Options as in
  `efficient_attention.linear_attention`; computes in the inputs' precision
  (use float64 inputs under `jax.enable_x64`), building the whole `[B, N, T, S]`
  matrix `phi_q phi_k^T`; heads are repeated for GQA.
  """
  n, kh = phi_q.shape[2], phi_k.shape[2]
  phi_k = jnp.repeat(phi_k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  runs = common.attended_runs(segment_ids, mask)
  live = common.dense_mask(
      phi_q.shape[1], phi_k.shape[1], is_causal=is_causal, mask=mask,
      segment_ids=None if runs is None else (runs, runs),
  )
  scores = jnp.einsum("btnm,bsnm->bnts", phi_q, phi_k)
  if live is not None:
    scores = jnp.where(live, scores, 0.0)
  num = jnp.einsum("bnts,bsnh->btnh", scores, v)
  den = jnp.sum(scores, axis=-1).transpose(0, 2, 1)[..., None]
  return common.safe_divide(num, den)
