"""Chunked causal linear attention written in the Triton language and launched through jax_triton.

The "jax_triton" backend of `pallas.causal_linear_attention`: the two kernels of
`pallas/linear.py` as `@triton.jit` functions, called with
`jax_triton.triton_call` instead of Pallas' Triton lowering. Everything around
them is `linear.py`'s: the custom_vjp, the passes (`_Pass`: forward, dq, dk, dv),
the padding, the run labels and the span sums a later pass reads; `linear._run`
hands a pass here when its `backend` is "jax_triton", and `run` returns what
`linear._run` returns.

  * `_pass_kernel`: one program per (b * Ho + n, span, block of output columns).
    It adds up the span sums of the spans before it (after it, in reverse) whose
    run reaches it, then walks its span chunk by chunk: the masked quadratic form
    inside the chunk, the carried float32 state across chunks (see
    `linear._kernel` for the pass's sums and its options).
  * `_sums_kernel`: one program per (b * Hb + h, span, block of columns); the
    float32 sums of the keys a span hands on (`linear._span_sums`), written in
    the layout `linear.py` uses (S `[B, P', Hb, D, E]`, Z `[B, P', Hb, D, 16]`,
    W `[B, P', Hb, 16, E]`, vectors in column / row 0), so that the dq pass reads
    the forward's sums and the dv pass the dk pass's, transposed, as there.

As in the Pallas kernel, the vector states `z = sum b` and `w = sum beta c` sit
in column / row 0 of 16-wide blocks and their products run as `tl.dot`s; states
are multiplied in the input dtype and summed in float32, float32 inputs multiply
in IEEE float32 (not TF32). Options a pass lacks are `tl.constexpr` flags: an
input the pass does not read is a 1-element placeholder, an output it does not
write a 1-element array dropped after the call.

Contract: `linear._run`'s. Padded inputs (time to whole spans, feature and
value widths to powers of two >= 16), a `[B, T, Ha, D]`, b `[B, T, Hb, D]`,
c `[B, T, Hb, E]`, alpha `[B, Ha, T]`, beta `[B, Hb, T]` float32, labels int32
`[B, T]` (non-decreasing run labels), times `[B, T, Ho / f_group, E]`.

triton and jax_triton are optional (`pip install 'efficient-attention[gpu]'`):
this module imports without them and `available()` says whether the backend
runs here. The kernels are plain Triton, so they also run in Triton's
interpreter (`TRITON_INTERPRET=1`) on torch CPU tensors:
`experiments/jax_triton_linear_interpret_check.py` runs the whole forward and
backward that way, and compiles the kernels for sm_90.

The family's reference, `kernel_attention_reference`, ends `linear.py`;
`tests/test_linear_jax_triton.py` checks this backend against it.

Einsum alphabet as in `linear.py`: B batch, T time, Ha / Hb / Ho heads of a /
b / the output, D / E widths of b / c, P' span sums (spans rounded up to a
power of two), J blocks of output columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas import softmax_jax_triton as flash_jt
from pallas.tiling import pow2_at_least

try:
  import triton
  import triton.language as tl
except ImportError:  # CPU machines and CI: the wrapper imports, `available()` is False.
  triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)
# CUDA caps a grid's second and third axes at 2**16 - 1 programs.
_MAX_GRID_YZ = 65535

# The kernels' array arguments, in order (inputs, then outputs).
PASS_INPUTS = ("a", "b", "c", "alpha", "beta", "labels", "times", "s_sums", "z_sums", "w_sums", "runs")
PASS_OUTPUTS = ("o", "rows", "lo")
SUMS_INPUTS = ("b", "c", "beta", "labels")
SUMS_OUTPUTS = ("s_sums", "z_sums", "w_sums")
# A 1-element stand-in for an array a launch does not use.
_PLACEHOLDER = jax.ShapeDtypeStruct((1,), jnp.float32)
# Width of the blocks that hold vector states (column / row 0 of `[D, 16]` / `[16, E]`),
# as in `linear.py` (the smallest `tl.dot` operand width).
_VEC = 16


# --------------------------------------------------------------------------- #
# availability
# --------------------------------------------------------------------------- #


def missing() -> tuple[str, ...]:
  """What this machine lacks for the backend: "jax_triton", "triton", "a CUDA GPU ..." (empty: none)."""
  return flash_jt.missing()


@functools.cache
def available() -> bool:
  """jax_triton and triton import and JAX's default backend is a CUDA GPU."""
  return not missing()


def check_runnable(interpret: bool) -> None:
  """Raises a ValueError naming what is missing, or refusing interpret mode."""
  lacking = missing()
  if lacking:
    raise ValueError(f"causal_linear_attention(backend='jax_triton') needs jax_triton, triton and a CUDA GPU "
                     f"(pip install 'efficient-attention[gpu]'); missing: {', '.join(lacking)}")
  if interpret:
    raise ValueError("backend='jax_triton' has no interpret mode (interpret=True); "
                     "use backend='triton' to interpret")


# --------------------------------------------------------------------------- #
# launches
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class LinearLaunch(flash_jt.Launch):
  """A `softmax_jax_triton.Launch` whose kernel takes the arrays named `inputs`
  (a placeholder for those a call lacks) and writes `outputs`, of which those
  at `kept` are results (the others are 1-element arrays never written)."""

  inputs: tuple[str, ...]
  kept: tuple[int, ...]


def _precision(p) -> str:
  # float32 inputs multiply in IEEE float32, as `tiling.matmul_precision` asks.
  return "ieee" if p.precision == lax.Precision.HIGHEST else "tf32"


def _check_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
  if max(grid[1:]) > _MAX_GRID_YZ:
    raise ValueError(f"{grid=}: spans or column blocks exceed the {_MAX_GRID_YZ} programs of a grid axis "
                     "(take longer spans: LinearBlockSizes(span_chunks=...))")
  return grid


def _outputs(*outputs: jax.ShapeDtypeStruct | None) -> tuple[tuple[jax.ShapeDtypeStruct, ...], tuple[int, ...]]:
  """The outputs a kernel writes, placeholders for the None ones, and the indices of the others."""
  return (tuple(_PLACEHOLDER if o is None else o for o in outputs),
          tuple(i for i, o in enumerate(outputs) if o is not None))


def pass_launch(shapes: dict[str, jax.ShapeDtypeStruct], p) -> LinearLaunch:
  """One pass (a `linear._Pass`) of `linear._run` over the arrays (shapes and dtypes) named in `shapes`:
  those of `PASS_INPUTS` the pass reads. Outputs: o `[B, T, Ho, E]` in `p.out_dtype`,
  with `p.rowsum` / `p.times_sum` float32 row sums `[B, Ho, J, T]`, with `p.split` lo like o."""
  batch, t_pad, ha, d = shapes["a"].shape
  hb, e = shapes["b"].shape[2], shapes["c"].shape[3]
  heads = max(ha, hb)
  bc = p.columns(d, e)
  if t_pad % p.span or e % bc:
    raise ValueError(f"T={t_pad} must be whole spans of {p.span} and E={e} whole blocks of {bc}")
  if heads != ha * p.a_group or heads != hb * p.b_group:
    raise ValueError(f"heads of a ({ha}) and b ({hb}) times their groups ({p.a_group}, {p.b_group}) "
                     f"must both be {heads}")
  spans, blocks = t_pad // p.span, e // bc
  p_pad = shapes["s_sums"].shape[1] if "s_sums" in shapes else pow2_at_least(spans, 1)
  o_shape = jax.ShapeDtypeStruct((batch, t_pad, heads, e), p.out_dtype)
  rows = jax.ShapeDtypeStruct((batch, heads, blocks, t_pad), jnp.float32) if p.rowsum or p.times_sum else None
  outputs, kept = _outputs(o_shape, rows, o_shape if p.split else None)
  return LinearLaunch(
      kernel=_pass_kernel, name=f"linear_attention_{p.label}_jax_triton",
      grid=_check_grid((batch * heads, spans, blocks)), outputs=outputs, num_warps=p.num_warps,
      num_stages=p.num_stages, inputs=PASS_INPUTS, kept=kept,
      constants=dict(
          REVERSE=bool(p.reverse), BIAS=bool(p.bias), ROWSUM=bool(p.rowsum), SEGMENTS=bool(p.segments),
          TIMES=bool(p.times), HAS_FLOOR=p.floor is not None, FLOOR=float(p.floor or 0.0),
          TIMES_SUM=bool(p.times_sum), ALPHA_ONES=bool(p.alpha_ones), BETA_ONES=bool(p.beta_ones),
          SUMS_T=bool(p.sums_t), NORMALISE=bool(p.normalise), SPLIT=bool(p.split),
          CHUNK=int(p.chunk), SPAN=int(p.span), SPANS=int(spans), P_PAD=int(p_pad), T_PAD=int(t_pad),
          HA=int(ha), HB=int(hb), HO=int(heads), HF=int(heads // p.f_group), A_GROUP=int(p.a_group),
          B_GROUP=int(p.b_group), F_GROUP=int(p.f_group), D=int(d), E=int(e), BLOCK_C=int(bc),
          PRECISION=_precision(p), VEC=_VEC))


def sums_launch(shapes: dict[str, jax.ShapeDtypeStruct], p) -> LinearLaunch:
  """The span sums of a pass `p` (`linear._span_sums`) over the arrays named in `shapes` (b, c,
  and beta, labels where the pass reads them): float32 S `[B, P', Hb, D, E]`, with
  `p.rowsum` Z `[B, P', Hb, D, 16]`, with `p.bias` W `[B, P', Hb, 16, E]`."""
  batch, t_pad, hb, d = shapes["b"].shape
  e = shapes["c"].shape[3]
  bc = p.columns(d, e)
  spans = t_pad // p.span
  # The span axis is padded to a power of two, as in `linear._span_sums`; the padding is never read.
  p_pad = pow2_at_least(spans, 1)
  f32 = jnp.float32
  outputs, kept = _outputs(
      jax.ShapeDtypeStruct((batch, p_pad, hb, d, e), f32),
      jax.ShapeDtypeStruct((batch, p_pad, hb, d, _VEC), f32) if p.rowsum else None,
      jax.ShapeDtypeStruct((batch, p_pad, hb, _VEC, e), f32) if p.bias else None)
  return LinearLaunch(
      kernel=_sums_kernel, name=f"linear_attention_span_sums_{p.label}_jax_triton",
      grid=_check_grid((batch * hb, spans, e // bc)), outputs=outputs, num_warps=p.num_warps,
      num_stages=p.num_stages, inputs=SUMS_INPUTS, kept=kept,
      constants=dict(
          REVERSE=bool(p.reverse), BIAS=bool(p.bias), ROWSUM=bool(p.rowsum), SEGMENTS=bool(p.segments),
          BETA_ONES=bool(p.beta_ones), CHUNK=int(p.chunk), SPAN=int(p.span), P_PAD=int(p_pad),
          T_PAD=int(t_pad), HB=int(hb), D=int(d), E=int(e), BLOCK_C=int(bc), PRECISION=_precision(p),
          VEC=_VEC))


def call_launch(launch: LinearLaunch, *inputs) -> tuple[jax.Array, ...]:
  """Runs `launch` on JAX arrays through `jax_triton.triton_call`: every launch goes through
  this module attribute (so that a check can run the kernels elsewhere, e.g. in Triton's interpreter)."""
  import jax_triton

  return jax_triton.triton_call(
      *inputs, kernel=launch.kernel, out_shape=launch.outputs, grid=launch.grid, name=launch.name,
      num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.constants)


def _launch(make, arrays: dict[str, jax.Array], p) -> tuple[jax.Array, ...]:
  """The results of `make(shapes, p)` run on `arrays` (by name), vmappable."""
  names = tuple(arrays)

  def call(*xs):
    given = dict(zip(names, xs))
    launch = make({name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in given.items()}, p)
    placeholder = jnp.zeros(_PLACEHOLDER.shape, _PLACEHOLDER.dtype)
    outs = call_launch(launch, *(given.get(name, placeholder) for name in launch.inputs))
    return tuple(outs[i] for i in launch.kept)

  return flash_jt.vmappable(call)(*arrays.values())


def run(a, b, c, alpha, beta, labels, p, sums: list | None = None, times: jax.Array | None = None):
  """`linear._run` on the Triton kernels: the same arguments, the same results
  (the outputs, and the per-span sums the pass used, None with one span)."""
  check_runnable(p.interpret)
  batch, t_pad = a.shape[:2]
  spans = t_pad // p.span
  if spans > 1 and sums is None:
    sums = span_sums(b, c, beta, labels, p)
  arrays = {"a": a, "b": b, "c": c}
  if p.bias and not p.alpha_ones:
    arrays["alpha"] = alpha
  if p.bias and not p.beta_ones:
    arrays["beta"] = beta
  if p.segments:
    arrays["labels"] = labels
  if p.times:
    arrays["times"] = times
  if spans > 1:
    # The span sums the pass reads: S, then Z (rowsum), W (bias); transposed ones
    # (`p.sums_t`, another pass's) serve passes without a row sum.
    assert not (p.sums_t and p.rowsum), "transposed sums serve passes without a row sum"
    names = ("s_sums",) + (("z_sums",) if p.rowsum else ()) + (("w_sums",) if p.bias else ())
    assert len(names) == len(sums), "as many span sums as the pass reads"
    arrays.update(zip(names, sums))
    if p.segments:
      # The run each span hands on.
      runs = labels.reshape(batch, spans, p.span)[:, :, 0 if p.reverse else -1]
      arrays["runs"] = jnp.pad(runs, ((0, 0), (0, sums[0].shape[1] - spans)))
  return list(_launch(pass_launch, arrays, p)), (sums if spans > 1 else None)


def span_sums(b, c, beta, labels, p) -> list[jax.Array]:
  """`linear._span_sums` on the Triton kernel: `[S, Z (rowsum), W (bias)]`, float32."""
  arrays = {"b": b, "c": c}
  if p.bias and not p.beta_ones:
    arrays["beta"] = beta
  if p.segments:
    arrays["labels"] = labels
  return list(_launch(sums_launch, arrays, p))


# --------------------------------------------------------------------------- #
# Triton kernels (contiguous arrays; constexpr names as in `pass_launch` / `sums_launch`)
# --------------------------------------------------------------------------- #


@_jit
def _matrix(ptr, base, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, STRIDE: tl.constexpr):
  """Pointers `[ROWS, COLS]` to rows `[row, row + ROWS)`, columns `[col, col + COLS)` of the
  row-major matrix of `STRIDE` columns that starts at `ptr + base`."""
  return (ptr + base + (row + tl.arange(0, ROWS))[:, None] * STRIDE) + (col + tl.arange(0, COLS))[None, :]


@_jit
def _steps(ptr, bi, head, start, col, ROWS: tl.constexpr, COLS: tl.constexpr, LENGTH: tl.constexpr,
           HEADS: tl.constexpr, WIDTH: tl.constexpr):
  """Pointers `[ROWS, COLS]` to steps `[start, start + ROWS)`, columns `[col, col + COLS)` of
  `head` in batch `bi` of a contiguous `[B, LENGTH, HEADS, WIDTH]` array (64-bit offsets)."""
  base = ((bi.to(tl.int64) * LENGTH + start) * HEADS + head) * WIDTH
  return _matrix(ptr, base, 0, col, ROWS, COLS, HEADS * WIDTH)


@_jit
def _pass_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, beta_ptr, lab_ptr, times_ptr, s_sums_ptr, z_sums_ptr, w_sums_ptr,
                 runs_ptr, o_ptr, rows_ptr, lo_ptr,
                 REVERSE: tl.constexpr, BIAS: tl.constexpr, ROWSUM: tl.constexpr, SEGMENTS: tl.constexpr,
                 TIMES: tl.constexpr, HAS_FLOOR: tl.constexpr, FLOOR: tl.constexpr, TIMES_SUM: tl.constexpr,
                 ALPHA_ONES: tl.constexpr, BETA_ONES: tl.constexpr, SUMS_T: tl.constexpr,
                 NORMALISE: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr, SPAN: tl.constexpr,
                 SPANS: tl.constexpr, P_PAD: tl.constexpr, T_PAD: tl.constexpr, HA: tl.constexpr,
                 HB: tl.constexpr, HO: tl.constexpr, HF: tl.constexpr, A_GROUP: tl.constexpr,
                 B_GROUP: tl.constexpr, F_GROUP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr):
  """Program (b * Ho + n, span, column block j): o `[SPAN, BLOCK_C]` of head n (and its row sums).

  With more than one span the state entering the span is the sum of the span
  sums before it (after it, in reverse) whose handed-on run is the run of the
  span's first step (labels do not decrease, so those spans lie inside that run).
  Then each chunk: scores `a b^T (+ alpha beta^T)` masked to the pass's
  direction and run, out = scores c + (a S + alpha w) for the queries of the
  carried state's run, and the state carried on (restarted where a run begins
  inside the chunk: only the keys of the chunk's last run, in the pass's
  direction, are added).
  """
  bn = tl.program_id(0)
  sp = tl.program_id(1)
  j = tl.program_id(2)
  bi = bn // HO
  n = bn % HO
  ah = n // A_GROUP
  bh = n // B_GROUP
  col = j * BLOCK_C
  span0 = sp * SPAN
  NUM_CHUNKS: tl.constexpr = SPAN // CHUNK
  BLOCKS: tl.constexpr = E // BLOCK_C
  steps = tl.arange(0, CHUNK)
  # [C, C]: query row t sees key column s.
  if REVERSE:
    order = steps[None, :] >= steps[:, None]
  else:
    order = steps[None, :] <= steps[:, None]
  # [C, 16]: selects column 0.
  first = (tl.zeros([CHUNK, VEC], tl.int32) + tl.arange(0, VEC)[None, :]) == 0
  lab_ptr += bi.to(tl.int64) * T_PAD
  alpha_ptr += (bi.to(tl.int64) * HA + ah) * T_PAD
  beta_ptr += (bi.to(tl.int64) * HB + bh) * T_PAD
  rows_ptr += ((bi.to(tl.int64) * HO + n) * BLOCKS + j) * T_PAD

  s = tl.zeros([D, BLOCK_C], tl.float32)
  z = tl.zeros([D, VEC], tl.float32)
  w = tl.zeros([VEC, BLOCK_C], tl.float32)
  label = 0
  if SEGMENTS:
    # The run of the span's first step in the pass's direction.
    if REVERSE:
      label = tl.max(tl.load(lab_ptr + span0 + SPAN - CHUNK + steps), axis=0)
    else:
      label = tl.min(tl.load(lab_ptr + span0 + steps), axis=0)
  if SPANS > 1:
    lo = 0
    hi = sp
    if REVERSE:
      lo = sp + 1
      hi = SPANS
    for q in range(lo, hi):
      head = (bi.to(tl.int64) * P_PAD + q) * HB + bh
      if SEGMENTS:
        weight = (tl.load(runs_ptr + bi.to(tl.int64) * P_PAD + q) == label).to(tl.float32)
      else:
        weight = 1.0
      if SUMS_T:
        s += weight * tl.trans(tl.load(_matrix(s_sums_ptr, head * (E * D), col, 0, BLOCK_C, D, D)))
      else:
        s += weight * tl.load(_matrix(s_sums_ptr, head * (D * E), 0, col, D, BLOCK_C, E))
      if ROWSUM:
        z += weight * tl.load(_matrix(z_sums_ptr, head * (D * VEC), 0, 0, D, VEC, VEC))
      if BIAS:
        if SUMS_T:
          w += weight * tl.trans(tl.load(_matrix(w_sums_ptr, head * (E * VEC), col, 0, BLOCK_C, VEC, VEC)))
        else:
          w += weight * tl.load(_matrix(w_sums_ptr, head * (VEC * E), 0, col, VEC, BLOCK_C, E))

  for i in range(NUM_CHUNKS):
    if REVERSE:
      start = span0 + (NUM_CHUNKS - 1 - i) * CHUNK
    else:
      start = span0 + i * CHUNK
    a = tl.load(_steps(a_ptr, bi, ah, start, 0, CHUNK, D, T_PAD, HA, D))  # [C, D]
    b = tl.load(_steps(b_ptr, bi, bh, start, 0, CHUNK, D, T_PAD, HB, D))  # [C, D]
    c = tl.load(_steps(c_ptr, bi, bh, start, col, CHUNK, BLOCK_C, T_PAD, HB, E))  # [C, bc]
    # [C, C]
    scores = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    if BIAS:
      if ALPHA_ONES:
        alpha = tl.full([CHUNK], 1.0, tl.float32)
      else:
        alpha = tl.load(alpha_ptr + start + steps)
      if BETA_ONES:
        beta = tl.full([CHUNK], 1.0, tl.float32)
      else:
        beta = tl.load(beta_ptr + start + steps)
      scores += alpha[:, None] * beta[None, :]
    live = order
    if SEGMENTS:
      lab = tl.load(lab_ptr + start + steps)
      live = live & (lab[:, None] == lab[None, :])
      # [C]: queries of the run the carried state belongs to.
      sees = lab == label
      # The run carried on to the next chunk, and its keys here.
      if REVERSE:
        edge = tl.min(lab, axis=0)
      else:
        edge = tl.max(lab, axis=0)
      carried = lab == edge
    scores = tl.where(live, scores, 0.0)
    # [C, bc]
    inter = tl.dot(a, s.to(a.dtype), input_precision=PRECISION)
    if BIAS:
      inter += tl.dot(tl.where(first, alpha[:, None], 0.0).to(a.dtype), w.to(a.dtype), input_precision=PRECISION)
    if SEGMENTS:
      inter = tl.where(sees[:, None], inter, 0.0)
    out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION) + inter
    if ROWSUM:
      den_inter = tl.sum(tl.dot(a, z.to(a.dtype), input_precision=PRECISION), axis=1)
      if SEGMENTS:
        den_inter = tl.where(sees, den_inter, 0.0)
      den = tl.sum(scores, axis=1) + den_inter
      tl.store(rows_ptr + start + steps, den)
      if NORMALISE:
        empty = den == 0.0
        out = tl.where(empty[:, None], 0.0, out / tl.where(empty, 1.0, den)[:, None])
    if TIMES:
      factor = tl.load(_steps(times_ptr, bi, n // F_GROUP, start, col, CHUNK, BLOCK_C, T_PAD, HF, E))
      factor = factor.to(tl.float32)
      if HAS_FLOOR:
        factor = tl.where(factor > FLOOR, factor, 0.0)
      out = out * factor
      if TIMES_SUM:
        tl.store(rows_ptr + start + steps, tl.sum(out, axis=1))
    o = out.to(o_ptr.dtype.element_ty)
    tl.store(_steps(o_ptr, bi, n, start, col, CHUNK, BLOCK_C, T_PAD, HO, E), o)
    if SPLIT:
      tl.store(_steps(lo_ptr, bi, n, start, col, CHUNK, BLOCK_C, T_PAD, HO, E),
               (out - o.to(tl.float32)).to(lo_ptr.dtype.element_ty))
    # Carry the state on: restart it when a run begins inside the chunk.
    if SEGMENTS:
      keep = (edge == label).to(tl.float32)
      label = edge
      b = tl.where(carried[:, None], b, 0.0).to(b.dtype)
      s = keep * s
      z = keep * z
      w = keep * w
    s += tl.dot(tl.trans(b), c, input_precision=PRECISION)
    if ROWSUM:
      z += tl.dot(tl.trans(b), first.to(b.dtype), input_precision=PRECISION)
    if BIAS:
      if SEGMENTS:
        beta = tl.where(carried, beta, 0.0)
      w += tl.dot(tl.trans(tl.where(first, beta[:, None], 0.0).to(c.dtype)), c, input_precision=PRECISION)


@_jit
def _sums_kernel(b_ptr, c_ptr, beta_ptr, lab_ptr, s_ptr, z_ptr, w_ptr,
                 REVERSE: tl.constexpr, BIAS: tl.constexpr, ROWSUM: tl.constexpr, SEGMENTS: tl.constexpr,
                 BETA_ONES: tl.constexpr, CHUNK: tl.constexpr, SPAN: tl.constexpr, P_PAD: tl.constexpr,
                 T_PAD: tl.constexpr, HB: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr):
  """Program (b * Hb + h, span, column block j): the sums over the keys the span hands on,
  S `[D, BLOCK_C]`, Z `[D, 16]` (rowsum), W `[16, BLOCK_C]` (bias). With segments only
  the keys of the span's last run (first, in reverse) count: earlier runs end inside it."""
  bh = tl.program_id(0)
  sp = tl.program_id(1)
  j = tl.program_id(2)
  bi = bh // HB
  h = bh % HB
  col = j * BLOCK_C
  span0 = sp * SPAN
  NUM_CHUNKS: tl.constexpr = SPAN // CHUNK
  steps = tl.arange(0, CHUNK)
  first = (tl.zeros([CHUNK, VEC], tl.int32) + tl.arange(0, VEC)[None, :]) == 0
  lab_ptr += bi.to(tl.int64) * T_PAD
  beta_ptr += (bi.to(tl.int64) * HB + h) * T_PAD
  if SEGMENTS:
    # The run handed on: the span's last (first, in reverse) run.
    if REVERSE:
      edge = tl.min(tl.load(lab_ptr + span0 + steps), axis=0)
    else:
      edge = tl.max(tl.load(lab_ptr + span0 + SPAN - CHUNK + steps), axis=0)
  s = tl.zeros([D, BLOCK_C], tl.float32)
  z = tl.zeros([D, VEC], tl.float32)
  w = tl.zeros([VEC, BLOCK_C], tl.float32)
  for i in range(NUM_CHUNKS):
    start = span0 + i * CHUNK
    b = tl.load(_steps(b_ptr, bi, h, start, 0, CHUNK, D, T_PAD, HB, D))  # [C, D]
    c = tl.load(_steps(c_ptr, bi, h, start, col, CHUNK, BLOCK_C, T_PAD, HB, E))  # [C, bc]
    if SEGMENTS:
      carried = tl.load(lab_ptr + start + steps) == edge
      b = tl.where(carried[:, None], b, 0.0).to(b.dtype)
    s += tl.dot(tl.trans(b), c, input_precision=PRECISION)
    if ROWSUM:
      z += tl.dot(tl.trans(b), first.to(b.dtype), input_precision=PRECISION)
    if BIAS:
      if BETA_ONES:
        beta = tl.full([CHUNK], 1.0, tl.float32)
      else:
        beta = tl.load(beta_ptr + start + steps)
      if SEGMENTS:
        beta = tl.where(carried, beta, 0.0)
      w += tl.dot(tl.trans(tl.where(first, beta[:, None], 0.0).to(c.dtype)), c, input_precision=PRECISION)
  head = (bi.to(tl.int64) * P_PAD + sp) * HB + h
  tl.store(_matrix(s_ptr, head * (D * E), 0, col, D, BLOCK_C, E), s)
  if ROWSUM:
    tl.store(_matrix(z_ptr, head * (D * VEC), 0, 0, D, VEC, VEC), z)
  if BIAS:
    tl.store(_matrix(w_ptr, head * (VEC * E), 0, col, VEC, BLOCK_C, E), w)
