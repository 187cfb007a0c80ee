"""Hopper (sm_90) flash attention, forward and backward, through Pallas' Mosaic GPU lowering.

One CTA owns `64 * compute_wgs` query rows of one (batch, head) and walks the
key/value blocks in order. Its warpgroups split the work (FlashAttention-3):

  * a producer warpgroup (few registers) streams K and V blocks into a ring of
    `stages` shared-memory slots with TMA copies; each slot has a "full"
    barrier (TMA bytes landed) and a "free" barrier (every consumer is done);
  * `compute_wgs` consumer warpgroups each own 64 query rows: `S = Q K^T` and
    `O += P V` on wgmma (Q and K/V from shared memory, P from registers,
    float32 accumulators in registers) and the online softmax in base 2.

Step j issues `S_j = Q K_j^T` and `O += P_{j-1} V_{j-1}` back to back. Two
schedules hide the softmax behind the tensor cores (`KernelConfig`):

  * overlap: wait for `S_j` only and run the softmax of block j while the PV
    product is still in flight; O is rescaled once that product lands. Steps go
    in pairs so that the P being written and the P being read by the in-flight
    wgmma are different registers (otherwise ptxas serializes every wgmma);
  * pingpong: consumers issue their two matmuls in turns (one mbarrier per
    warpgroup passes the turn on), so one warpgroup's softmax runs while the
    other's matmuls occupy the tensor cores.

`default_config` picks pingpong for head dim 128 and overlap for head dim 64.

The backward (`mosaic_backward`, FlashAttention-2 alg. 2 on the same warpgroup
layout) is two kernels: dK/dV, where a consumer warpgroup owns 64 keys and the
producer streams Q, dO, lse and delta blocks (S^T = K Q^T, dP^T = V dO^T,
dV += P^T dO, dK += dS^T Q), and dQ, where it owns 64 query rows and the
producer streams K and V (S = Q K^T, dP = dO V^T, dQ += dS K). Causal kernels
skip the blocks above the diagonal; dK/dV come out per query head and are
summed over each GQA group.

Contract (see `pallas/softmax.py`): padded `[B, T, N, H]` inputs,
`lse` `[B, N, T]` float32 in base-2 units (`m2 + log2(l)` of the logits scaled
by `scale * log2(e)`), `+inf` and a zero output row where no key is live.
Causal CTAs skip key blocks above the diagonal and run their heaviest query
tiles first. Segment ids are compared inside each tile.

The kernel targets JAX 0.11 (`jax.experimental.pallas.mosaic_gpu`); importing
this module needs no GPU, and every Mosaic GPU call sits inside a function.

The family's reference, `softmax_attention_reference`, ends `softmax.py`, the module that
dispatches to this backend; `tests/test_softmax_kernel.py` checks this backend against it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas.flash_tiles import LOG2E, kv_ranges
from pallas.tiling import idiv, irem

RCP_LN2 = 1.0 / math.log(2.0)
# Running maxima start finite (base-2 units), so a row whose keys are all masked
# (logits -inf) keeps exp2(-inf - m) == 0 and never produces NaN.
_M_INIT = -0.5e30
ROWS_PER_WG = 64
# Shared memory per CTA on sm_90 (227 KiB), less room for barriers and alignment.
_SMEM_LIMIT = 227 * 1024 - 4096
_MIN_JAX = (0, 11)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch shape and schedule of the forward kernel (tuned values: `default_config`).

  compute_wgs: consumer warpgroups, 64 query rows each (CTA rows = 64 * compute_wgs).
  block_k: keys per pipeline step (multiple of 64).
  stages: K/V shared-memory slots in the ring (>= 2).
  overlap: softmax of block j runs while `P_{j-1} V_{j-1}` is in flight.
  overlap_masked: the same for the masked (diagonal / tail / segment) steps.
  softmax_fence: pins the softmax ahead of the wait for `P_{j-1} V_{j-1}` (else
    the compiler may sink it past the wait, which undoes the overlap).
  pingpong: consumer warpgroups take turns issuing their matmuls.
  compute_registers / producer_registers: per-thread register caps (setmaxnreg).
  """

  compute_wgs: int = 2
  block_k: int = 128
  stages: int = 2
  overlap: bool = True
  overlap_masked: bool = False
  softmax_fence: bool = True
  pingpong: bool = True
  compute_registers: int = 232
  producer_registers: int = 40

  def __post_init__(self):
    if self.compute_wgs < 1 or self.compute_wgs > 3:
      raise ValueError(f"compute_wgs={self.compute_wgs} must be 1, 2 or 3")
    if self.block_k < 64 or self.block_k % 64:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64")
    if self.stages < 2:
      raise ValueError(f"stages={self.stages} must be >= 2")

  @property
  def block_q(self) -> int:
    return ROWS_PER_WG * self.compute_wgs


def _jax_version() -> tuple[int, ...]:
  parts = []
  for piece in jax.__version__.split(".")[:3]:
    digits = "".join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


@functools.cache
def _on_hopper() -> bool:
  """JAX >= 0.11 with a compute-capability 9.x CUDA device as the default backend."""
  if _jax_version() < _MIN_JAX:
    return False
  try:
    if jax.default_backend() != "gpu":
      return False
    device = jax.devices()[0]
  except RuntimeError:
    return False
  capability = str(getattr(device, "compute_capability", ""))
  return capability.startswith("9")


def _padded_head(d: int) -> int:
  """The wrapper's padding of a head dim: a power of two >= 16."""
  return max(16, 1 << max(0, d - 1).bit_length())



def _check_inputs(q, k, v, static) -> int:
  """Checks what the kernels take; returns the head dim they run at (>= 64)."""
  num_heads, head_dim = q.shape[2:]
  num_kv_heads, v_dim = k.shape[2], v.shape[3]
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise TypeError(f"mosaic_gpu flash attention takes bf16/f16, got q.dtype={q.dtype}")
  if num_heads != num_kv_heads * static.group:
    raise ValueError(f"{num_heads=} != {num_kv_heads=} * group={static.group}")
  dim = max(64, head_dim, v_dim)
  if dim > 128:
    raise ValueError(f"mosaic_gpu flash attention takes head dims <= 128, got {head_dim=}, {v_dim=}")
  return dim

def applies(dtype: Any, dims: Any, *, is_causal: bool, has_segments: bool) -> bool:
  """Whether this backend handles the call (else `flash_attention` uses Triton).

  bf16/f16, padded head dims 64 or 128 (q/k and v alike), causal or not, with
  or without segment ids, on a Hopper GPU under JAX >= 0.11; not for
  non-causal head-dim-128 calls with fewer than 4096 keys, where the Triton
  forward measured faster (T=1024: 372 vs 317 TFLOP/s on an H100). Compiles
  nothing.
  """
  del has_segments
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  head, v_head = _padded_head(dims.head_dim), _padded_head(dims.v_head_dim)
  if head not in (64, 128) or v_head != head:
    return False
  if head == 128 and not is_causal and dims.kv_len < 4096:
    return False
  return _on_hopper()


def default_config(head_dim: int) -> KernelConfig:
  """Schedule per (padded) head dim, measured on an H100 (pallas/NOTES_mosaic_gpu.md).

  Head dim 128: pingpong without in-warpgroup overlap (the overlapped loop needs a
  second P in registers and spills at 232 registers per thread). Head dim 64:
  in-warpgroup overlap without pingpong.
  """
  if head_dim <= 64:
    return KernelConfig(overlap=True, pingpong=False)
  return KernelConfig(overlap=False, pingpong=True)


def config_for(static: Any, head_dim: int) -> KernelConfig:
  """Kernel settings from the wrapper's `BlockSizes` (`block_q` = 64 * consumer warpgroups)."""
  blocks = static.blocks
  wgs = min(2, max(1, blocks.block_q // ROWS_PER_WG))
  return dataclasses.replace(default_config(head_dim), compute_wgs=wgs, block_k=max(64, blocks.block_k),
                             stages=max(2, blocks.num_stages))


def forward(q, k, v, q_ids, kv_ids, static):
  """Padded forward: q `[B, T, N, H]`, k/v `[B, S, K, H]` -> (out `[B, T, N, Hv]`, lse `[B, N, T]`)."""
  head_dim = max(q.shape[3], v.shape[3])
  return forward_with_config(q, k, v, q_ids, kv_ids, static, config_for(static, head_dim))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def forward_with_config(q, k, v, q_ids, kv_ids, static, config: KernelConfig):
  """`forward` with explicit kernel settings (shapes as in `forward`).

  Pads internally (query rows to the CTA's rows, keys to `block_k`, head dims
  to 64 when smaller) only when the wrapper's padding does not already fit.
  """
  t_pad, num_heads, head_dim = q.shape[1:]
  s_pad, v_dim = k.shape[1], v.shape[3]
  dim = _check_inputs(q, k, v, static)
  rows, block_k = config.block_q, config.block_k
  stages = config.stages
  smem = rows * dim * 2 + rows * 4  # Q/O tiles and lse rows
  while stages > 2 and smem + stages * block_k * 2 * dim * 2 > _SMEM_LIMIT:
    stages -= 1
  if smem + stages * block_k * 2 * dim * 2 > _SMEM_LIMIT:
    raise ValueError(f"block_k={block_k} with head dim {dim} and {stages=} needs more than "
                     f"{_SMEM_LIMIT} bytes of shared memory")
  config = dataclasses.replace(config, stages=stages)

  t_int, s_int = _round_up(t_pad, rows), _round_up(s_pad, block_k)
  qp = _pad_axis(_pad_axis(q, 1, t_int), 3, dim)
  kp = _pad_axis(_pad_axis(k, 1, s_int), 3, dim)
  vp = _pad_axis(_pad_axis(v, 1, s_int), 3, dim)
  args = [qp, kp, vp]
  if static.has_segments:
    args += [_pad_axis(q_ids, 1, t_int, value=jnp.iinfo(jnp.int32).min),
             _pad_axis(kv_ids, 1, s_int, value=jnp.iinfo(jnp.int32).max)]
  out, lse = _call(*args, static=static, config=config)
  if t_int != t_pad or dim != v_dim:
    out = out[:, :t_pad, :, :v_dim]
  if t_int != t_pad:
    lse = lse[:, :, :t_pad]
  return out, lse


def _load_vector(ref, layout):
  """`plgpu.load` of a 1-D ref in `layout` (JAX 0.10 needs an empty index, JAX 0.11 deprecates it)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)


def _produce_kv(refs, smem, barriers, *, bidx, kv_head, block_k: int, stages: int, num_kv_blocks: int, end):
  """The producer warpgroup of the forward and dQ kernels: copies K/V blocks `[0, end)` of
  (bidx, kv_head) into the `stages`-deep shared-memory ring, slot `j % stages`, each once the
  consumers have freed its slot.

  `refs` = (k, v) in global memory, `smem` = the (k, v) rings, `barriers` = (k_full, v_full,
  k_free, v_free), one per slot.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  k_ref, v_ref = refs
  k_smem, v_smem = smem
  k_full, v_full, k_free, v_free = barriers

  def fetch(j, slot):
    block = (bidx, pl.ds(j * block_k, block_k), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[block], k_smem.at[slot], k_full.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[block], v_smem.at[slot], v_full.at[slot])

  for i in range(min(stages, num_kv_blocks)):
    pl.when(i < end)(functools.partial(fetch, i, i))

  @pl.loop(stages, end)
  def _(j):
    slot = irem(j, stages)
    block = (bidx, pl.ds(j * block_k, block_k), kv_head)
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.copy_gmem_to_smem(k_ref.at[block], k_smem.at[slot], k_full.at[slot])
    plgpu.barrier_wait(v_free.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[block], v_smem.at[slot], v_full.at[slot])


def _call(*args, static, config: KernelConfig):
  """Builds and runs the kernel on internally padded inputs."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  q = args[0]
  batch, t_int, num_heads, dim = q.shape
  dtype = q.dtype
  wgs, block_k, stages = config.compute_wgs, config.block_k, config.stages
  rows = config.block_q
  bq = ROWS_PER_WG
  num_q_tiles = t_int // rows
  kv_len, group = static.kv_len, static.group
  num_kv_blocks = -(-kv_len // block_k)
  causal, segments = static.is_causal, static.has_segments
  pingpong = config.pingpong and wgs > 1
  logit_scale = static.scale * LOG2E

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if segments:
      (q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, out_ref, lse_ref, smem, barriers) = refs
    else:
      (q_ref, k_ref, v_ref, out_ref, lse_ref, smem, barriers) = refs
      q_ids_ref = kv_ids_ref = None
    qo_smem, k_smem, v_smem, lse_smem = smem
    k_full, v_full, q_full, k_free, v_free, turn = barriers

    tile = lax.axis_index("q")
    head = lax.axis_index("h")
    bidx = lax.axis_index("b")
    wg = lax.axis_index("wg")
    if causal:
      # Heaviest query tiles first: they have the most key blocks.
      tile = num_q_tiles - 1 - tile
    cta_row = tile * rows
    full, end = kv_ranges(tile, block_q=rows, block_k=block_k, static=static)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(config.compute_registers, action="increase")
      row0 = cta_row + wg * bq
      q_smem = qo_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bidx, pl.ds(row0, bq), head], q_smem, q_full.at[wg])
      q_ids = None
      if segments:
        q_ids = _load_vector(q_ids_ref.at[bidx, pl.ds(row0, bq)], row_layout)
      if pingpong:
        # The last warpgroup hands the first turn to warpgroup 0.
        @pl.when(wg == wgs - 1)
        def _():
          plgpu.barrier_arrive(turn.at[0])
      plgpu.barrier_wait(q_full.at[wg])

      def take_turn():
        if pingpong:
          plgpu.barrier_wait(turn.at[wg])

      def pass_turn():
        if pingpong:
          plgpu.barrier_arrive(turn.at[irem(wg + 1, wgs)])

      def softmax(s, m, l, j, masked):
        """Online-softmax update of block j: s `[bq, block_k]` raw logits."""
        if masked:
          cols = j * block_k + plgpu.broadcasted_iota(
              jnp.int32, (bq, block_k), 1, layout=plgpu.Layout.WGMMA)
          keep = cols < kv_len
          if causal:
            rws = row0 + plgpu.broadcasted_iota(jnp.int32, (bq, block_k), 0, layout=plgpu.Layout.WGMMA)
            keep = keep & (cols <= rws)
          if segments:
            kv_ids = _load_vector(kv_ids_ref.at[bidx, pl.ds(j * block_k, block_k)], col_layout)
            same = (lax.broadcast_in_dim(q_ids, (bq, block_k), [0])
                    == lax.broadcast_in_dim(kv_ids, (bq, block_k), [1]))
            keep = keep & same
          s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * logit_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * logit_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_new = l * alpha + p.sum(axis=1)
        return p.astype(dtype), m_new, l_new, alpha

      def with_accumulators(s_acc, o_acc):
        zeros_s = plgpu.layout_cast(jnp.zeros((bq, block_k), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((bq,), _M_INIT, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)

        # Block 0: S only (always masked: one step, and it covers every case).
        plgpu.barrier_wait(k_full.at[0])
        take_turn()
        plgpu.wgmma(s_acc, q_smem, k_smem.at[0].transpose((1, 0)))
        pass_turn()
        s = plgpu.wgmma_accumulator_load(s_acc, wait_n=0)
        plgpu.barrier_arrive(k_free.at[0])
        p, m, l, _ = softmax(s, m0, l0, 0, masked=True)

        def step(j, carry, *, masked, overlap):
          p_prev, m, l = carry
          slot = irem(j, stages)
          prev = irem(j - 1, stages)
          s_acc[...] = zeros_s
          plgpu.barrier_wait(k_full.at[slot])
          plgpu.barrier_wait(v_full.at[prev])
          take_turn()
          plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(o_acc, p_prev, v_smem.at[prev])
          pass_turn()
          if overlap:
            s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
            plgpu.barrier_arrive(k_free.at[slot])
            p, m_new, l_new, alpha = softmax(s, m, l, j, masked)
            if config.softmax_fence:
              # Keeps the softmax ahead of the wait below.
              p, m_new, l_new, alpha = lax.optimization_barrier((p, m_new, l_new, alpha))
            o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
            plgpu.barrier_arrive(v_free.at[prev])
          else:
            s = plgpu.wgmma_accumulator_load(s_acc, wait_n=0)
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[prev])
            p, m_new, l_new, alpha = softmax(s, m, l, j, masked)
            o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
          o_acc[...] = o * lax.broadcast_in_dim(alpha, o.shape, [0])
          return p, m_new, l_new

        def steps(lo, hi, carry, *, masked):
          """Steps [lo, hi). Overlapped steps go in pairs: P then alternates between
          two values, so the P being written never shares registers with the P that
          the in-flight PV product reads (which would serialize every wgmma); an odd
          last step runs without overlap."""
          overlap = config.overlap and (config.overlap_masked or not masked)
          if not overlap:
            return lax.fori_loop(lo, hi, functools.partial(step, masked=masked, overlap=False), carry)

          def pair(i, carry):
            j = lo + 2 * i
            carry = step(j, carry, masked=masked, overlap=True)
            return step(j + 1, carry, masked=masked, overlap=True)

          pairs = idiv(jnp.maximum(hi - lo, 0), 2)
          carry = lax.fori_loop(jnp.int32(0), pairs, pair, carry)
          return lax.fori_loop(lo + 2 * pairs, hi, functools.partial(step, masked=masked, overlap=False),
                               carry)

        carry = (p, m, l)
        start = jnp.int32(1)
        mid = jnp.maximum(full, start)
        carry = steps(start, mid, carry, masked=False)
        carry = steps(mid, end, carry, masked=True)
        p, m, l = carry

        # Last PV product.
        last = irem(end - 1, stages)
        plgpu.barrier_wait(v_full.at[last])
        take_turn()
        plgpu.wgmma(o_acc, p, v_smem.at[last])
        pass_turn()
        o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
        plgpu.barrier_arrive(v_free.at[last])

        dead = l == 0.0
        l_safe = jnp.where(dead, 1.0, l)
        # Dead rows have O == 0 already (every p was 0).
        o = o * lax.broadcast_in_dim(1.0 / l_safe, o.shape, [0])
        q_smem[...] = o.astype(dtype)
        lse_smem.at[wg][...] = jnp.where(dead, jnp.inf, m + jnp.log(l_safe) * RCP_LN2)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[bidx, pl.ds(row0, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bidx, head, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(with_accumulators, plgpu.ACC((bq, block_k), jnp.float32),
                    plgpu.ACC((bq, dim), jnp.float32))

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(config.producer_registers, action="decrease")
      _produce_kv((k_ref, v_ref), (k_smem, v_smem), (k_full, v_full, k_free, v_free), bidx=bidx,
                  kv_head=idiv(head, jnp.int32(group)), block_k=block_k, stages=stages,
                  num_kv_blocks=num_kv_blocks, end=end)

  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = (
      plgpu.SMEM((wgs, bq, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_k, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_k, dim), dtype, transforms=transforms),
      plgpu.SMEM((wgs, bq), jnp.float32),
  )
  barriers = (
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_barriers=wgs),
  )
  out_type = (
      jax.ShapeDtypeStruct((batch, t_int, num_heads, dim), dtype),
      jax.ShapeDtypeStruct((batch, num_heads, t_int), jnp.float32),
  )
  out, lse = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=(smem, barriers),
      grid=(num_q_tiles, num_heads, batch),
      grid_names=("q", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)
  return out, lse



# --------------------------------------------------------------------------- #
# backward: dK/dV by key tiles, dQ by query tiles (FlashAttention-2, alg. 2)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  """Launch shape of the two backward kernels (tuned values: `default_backward_config`).

  Both kernels give each consumer warpgroup 64 rows of the tile it owns (keys in
  the dK/dV kernel, queries in the dQ kernel) and stream the other side through
  a ring of `stages` shared-memory slots filled by a producer warpgroup.

  compute_wgs: consumer warpgroups per CTA.
  block_q_dkv: query rows per step of the dK/dV kernel (multiple of 64).
  block_k_dq: keys per step of the dQ kernel (multiple of 64).
  stages: ring depth of both kernels (>= 2; lowered per kernel to fit shared memory).
  compute_registers / producer_registers: per-thread register caps (setmaxnreg).
  """

  compute_wgs: int = 2
  block_q_dkv: int = 64
  block_k_dq: int = 128
  stages: int = 2
  compute_registers: int = 232
  producer_registers: int = 40

  def __post_init__(self):
    if self.compute_wgs < 1 or self.compute_wgs > 2:
      raise ValueError(f"compute_wgs={self.compute_wgs} must be 1 or 2")
    for name in ("block_q_dkv", "block_k_dq"):
      value = getattr(self, name)
      if value < 64 or value % 64:
        raise ValueError(f"{name}={value} must be a positive multiple of 64")
    if self.stages < 2:
      raise ValueError(f"stages={self.stages} must be >= 2")


def default_backward_config(head_dim: int) -> BackwardConfig:
  """Backward settings, measured on an H100 (pallas/NOTES_mosaic_gpu.md): 128-key dQ
  steps and a 2-deep ring at head dims 64 and 128 (64-key dQ steps and a 3-deep
  ring were within 1-4 %)."""
  del head_dim
  return BackwardConfig()
def mosaic_backward(q, k, v, q_ids, kv_ids, d_out, lse, delta, static):
  """Padded backward: q/d_out `[B, T, N, H]`, k/v `[B, S, K, H]`, lse/delta `[B, N, T]`
  float32 -> (dq `[B, T, N, H]`, dk `[B, S, K, H]`, dv `[B, S, K, Hv]`)."""
  head_dim = max(q.shape[3], v.shape[3])
  return backward_with_config(q, k, v, q_ids, kv_ids, d_out, lse, delta, static,
                              default_backward_config(head_dim))


def backward_with_config(q, k, v, q_ids, kv_ids, d_out, lse, delta, static, config: BackwardConfig):
  """`mosaic_backward` with explicit kernel settings (shapes as there).

  dK/dV come out per query head and are summed over each GQA group afterwards.
  """
  batch, t_pad, num_heads, head_dim = q.shape
  s_pad, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[3]
  dim = _check_inputs(q, k, v, static)
  rows = ROWS_PER_WG * config.compute_wgs
  t_int = _round_up(t_pad, max(rows, config.block_q_dkv))
  s_int = _round_up(s_pad, max(rows, config.block_k_dq))
  qp = _pad_axis(_pad_axis(q, 1, t_int), 3, dim)
  dop = _pad_axis(_pad_axis(d_out, 1, t_int), 3, dim)
  kp = _pad_axis(_pad_axis(k, 1, s_int), 3, dim)
  vp = _pad_axis(_pad_axis(v, 1, s_int), 3, dim)
  # Padded query rows: lse +inf gives p == 0.
  lse_p = _pad_axis(lse, 2, t_int, value=jnp.inf)
  delta_p = _pad_axis(delta, 2, t_int)
  args = [qp, kp, vp, dop, lse_p, delta_p]
  if static.has_segments:
    args += [_pad_axis(q_ids, 1, t_int, value=jnp.iinfo(jnp.int32).min),
             _pad_axis(kv_ids, 1, s_int, value=jnp.iinfo(jnp.int32).max)]
  # Shared memory: per-warpgroup tiles (2 of 64 rows each) plus the ring.
  own = 2 * config.compute_wgs * ROWS_PER_WG * dim * 2
  dq_stages = _fit_stages(config.stages, own, 2 * config.block_k_dq * dim * 2, "dQ")
  dkv_stages = _fit_stages(config.stages, own, config.block_q_dkv * (2 * dim * 2 + 2 * 4), "dK/dV")
  dq = _call_dq(*args, static=static, config=dataclasses.replace(config, stages=dq_stages))
  dk, dv = _call_dkv(*args, static=static, config=dataclasses.replace(config, stages=dkv_stages))
  dq = dq[:, :t_pad, :, :head_dim]
  dk = dk[:, :s_pad, :, :head_dim]
  dv = dv[:, :s_pad, :, :v_dim]
  if static.group > 1:
    # [B, S, K, G, H] -> [B, S, K, H]
    dk = dk.astype(jnp.float32).reshape(batch, s_pad, num_kv_heads, static.group, head_dim)
    dv = dv.astype(jnp.float32).reshape(batch, s_pad, num_kv_heads, static.group, v_dim)
    dk, dv = dk.sum(3).astype(k.dtype), dv.sum(3).astype(v.dtype)
  return dq, dk, dv


def _fit_stages(stages: int, fixed: int, per_stage: int, kernel: str) -> int:
  """The deepest ring <= `stages` whose bytes (`fixed + stages * per_stage`) fit in shared memory."""
  while stages > 2 and fixed + stages * per_stage > _SMEM_LIMIT:
    stages -= 1
  if fixed + stages * per_stage > _SMEM_LIMIT:
    raise ValueError(f"{kernel} kernel: {fixed} + {stages} * {per_stage} bytes of shared memory "
                     f"exceed {_SMEM_LIMIT}")
  return stages


def _bwd_smem_transforms():
  from jax.experimental.pallas import mosaic_gpu as plgpu

  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _call_dq(*args, static, config: BackwardConfig):
  """dQ `[B, T, N, H]`: a CTA owns 64 query rows per consumer warpgroup and walks the
  key blocks; per step S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  q = args[0]
  batch, t_int, num_heads, dim = q.shape
  dtype = q.dtype
  wgs, block_k, stages = config.compute_wgs, config.block_k_dq, config.stages
  bq = ROWS_PER_WG
  rows = bq * wgs
  num_q_tiles = t_int // rows
  kv_len, group = static.kv_len, static.group
  num_kv_blocks = -(-kv_len // block_k)
  causal, segments = static.is_causal, static.has_segments
  logit_scale = static.scale * LOG2E
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if segments:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref, smem,
       barriers) = refs
    else:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, barriers) = refs
      q_ids_ref = kv_ids_ref = None
    q_all, do_all, k_smem, v_smem = smem
    k_full, v_full, qdo_full, k_free, v_free = barriers

    tile = lax.axis_index("q")
    head = lax.axis_index("h")
    bidx = lax.axis_index("b")
    wg = lax.axis_index("wg")
    if causal:
      tile = num_q_tiles - 1 - tile
    cta_row = tile * rows
    full, end = kv_ranges(tile, block_q=rows, block_k=block_k, static=static)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(config.compute_registers, action="increase")
      row0 = cta_row + wg * bq
      q_smem, do_smem = q_all.at[wg], do_all.at[wg]
      rows_slice = (bidx, pl.ds(row0, bq), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows_slice], q_smem, qdo_full.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows_slice], do_smem, qdo_full.at[wgs + wg])
      lse = _load_vector(lse_ref.at[bidx, head, pl.ds(row0, bq)], row_layout)
      delta = _load_vector(delta_ref.at[bidx, head, pl.ds(row0, bq)], row_layout)
      q_ids = None
      if segments:
        q_ids = _load_vector(q_ids_ref.at[bidx, pl.ds(row0, bq)], row_layout)
      plgpu.barrier_wait(qdo_full.at[wg])
      plgpu.barrier_wait(qdo_full.at[wgs + wg])
      lse_b = lax.broadcast_in_dim(lse, (bq, block_k), [0])
      delta_b = lax.broadcast_in_dim(delta, (bq, block_k), [0])

      def with_accumulators(s_acc, dp_acc, dq_acc):
        zeros = plgpu.layout_cast(jnp.zeros((bq, block_k), jnp.float32), plgpu.Layout.WGMMA)

        def step(j, masked):
          slot = irem(j, stages)
          s_acc[...] = zeros
          dp_acc[...] = zeros
          plgpu.barrier_wait(k_full.at[slot])
          plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.barrier_wait(v_full.at[slot])
          plgpu.wgmma(dp_acc, do_smem, v_smem.at[slot].transpose((1, 0)))
          s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
          p = jnp.exp2(s * logit_scale - lse_b)
          if masked:
            cols = j * block_k + plgpu.broadcasted_iota(jnp.int32, (bq, block_k), 1,
                                                        layout=plgpu.Layout.WGMMA)
            keep = cols < kv_len
            if causal:
              rws = row0 + plgpu.broadcasted_iota(jnp.int32, (bq, block_k), 0,
                                                  layout=plgpu.Layout.WGMMA)
              keep = keep & (cols <= rws)
            if segments:
              kv_ids = _load_vector(kv_ids_ref.at[bidx, pl.ds(j * block_k, block_k)], col_layout)
              keep = keep & (lax.broadcast_in_dim(q_ids, (bq, block_k), [0])
                             == lax.broadcast_in_dim(kv_ids, (bq, block_k), [1]))
            p = jnp.where(keep, p, 0.0)
          dp = plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
          plgpu.barrier_arrive(v_free.at[slot])
          ds = p * (dp - delta_b)
          plgpu.wgmma(dq_acc, ds.astype(dtype), k_smem.at[slot])
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(k_free.at[slot])

        pl.loop(0, full)(functools.partial(step, masked=False))
        pl.loop(full, end)(functools.partial(step, masked=True))
        dq = plgpu.wgmma_accumulator_load(dq_acc, wait_n=0)
        q_smem[...] = (dq * static.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows_slice])
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(with_accumulators, plgpu.ACC((bq, block_k), jnp.float32),
                    plgpu.ACC((bq, block_k), jnp.float32), plgpu.ACC((bq, dim), jnp.float32))

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(config.producer_registers, action="decrease")
      _produce_kv((k_ref, v_ref), (k_smem, v_smem), (k_full, v_full, k_free, v_free), bidx=bidx,
                  kv_head=idiv(head, jnp.int32(group)), block_k=block_k, stages=stages,
                  num_kv_blocks=num_kv_blocks, end=end)

  transforms = _bwd_smem_transforms()
  smem = (
      plgpu.SMEM((wgs, bq, dim), dtype, transforms=transforms),
      plgpu.SMEM((wgs, bq, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_k, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_k, dim), dtype, transforms=transforms),
  )
  barriers = (
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=2 * wgs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  )
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=(smem, barriers),
      grid=(num_q_tiles, num_heads, batch),
      grid_names=("q", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)


def _call_dkv(*args, static, config: BackwardConfig):
  """dK, dV per query head `[B, S, N, H]`: a CTA owns 64 keys per consumer warpgroup
  and walks the query blocks; per step S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
  dS^T = P^T (dP^T - delta), dK += dS^T Q."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  q, k = args[0], args[1]
  batch, _, num_heads, dim = q.shape
  s_int = k.shape[1]
  dtype = q.dtype
  wgs, block_q, stages = config.compute_wgs, config.block_q_dkv, config.stages
  bk = ROWS_PER_WG
  keys = bk * wgs
  num_k_tiles = s_int // keys
  # Query rows past q_len have dO == 0 and add nothing.
  num_q_blocks = -(-static.q_len // block_q)
  group = static.group
  causal, segments = static.is_causal, static.has_segments
  logit_scale = static.scale * LOG2E
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(*refs):
    if segments:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dk_ref, dv_ref,
       smem, barriers) = refs
    else:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, barriers) = refs
      q_ids_ref = kv_ids_ref = None
    k_all, v_all, q_ring, do_ring, lse_ring, delta_ring = smem
    kv_full, q_full, do_full, lse_full, delta_full, free = barriers

    tile = lax.axis_index("k")
    head = lax.axis_index("h")
    bidx = lax.axis_index("b")
    wg = lax.axis_index("wg")
    key_base = tile * keys
    hi = jnp.int32(num_q_blocks)
    if causal:
      # Blocks below `lo` see none of these keys; from `mid` on every query sees all of them.
      lo = jnp.minimum(idiv(key_base, block_q), hi)
      mid = jnp.minimum(idiv(key_base + keys - 1 + block_q - 1, block_q), hi)
    else:
      lo = mid = jnp.int32(0)
    if segments:
      mid = hi
    # Key rows past kv_len need no mask: their gradients are sliced off.

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(config.compute_registers, action="increase")
      key0 = key_base + wg * bk
      k_smem, v_smem = k_all.at[wg], v_all.at[wg]
      kv_head = idiv(head, jnp.int32(group))
      plgpu.copy_gmem_to_smem(k_ref.at[bidx, pl.ds(key0, bk), kv_head], k_smem, kv_full.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bidx, pl.ds(key0, bk), kv_head], v_smem, kv_full.at[wgs + wg])
      kv_ids = None
      if segments:
        kv_ids = _load_vector(kv_ids_ref.at[bidx, pl.ds(key0, bk)], row_layout)
      plgpu.barrier_wait(kv_full.at[wg])
      plgpu.barrier_wait(kv_full.at[wgs + wg])

      def with_accumulators(st_acc, dpt_acc, dk_acc, dv_acc):
        zeros = plgpu.layout_cast(jnp.zeros((bk, block_q), jnp.float32), plgpu.Layout.WGMMA)

        def step(i, masked):
          slot = irem(i - lo, stages)
          q_slot, do_slot = q_ring.at[slot], do_ring.at[slot]
          st_acc[...] = zeros
          dpt_acc[...] = zeros
          plgpu.barrier_wait(q_full.at[slot])
          plgpu.wgmma(st_acc, k_smem, q_slot.transpose((1, 0)))
          plgpu.barrier_wait(do_full.at[slot])
          plgpu.wgmma(dpt_acc, v_smem, do_slot.transpose((1, 0)))
          plgpu.barrier_wait(lse_full.at[slot])
          lse = _load_vector(lse_ring.at[slot], col_layout)
          st = plgpu.wgmma_accumulator_load(st_acc, wait_n=1)
          pt = jnp.exp2(st * logit_scale - lax.broadcast_in_dim(lse, (bk, block_q), [1]))
          if masked:
            keep = None
            if causal:
              krows = key0 + plgpu.broadcasted_iota(jnp.int32, (bk, block_q), 0,
                                                    layout=plgpu.Layout.WGMMA)
              qcols = i * block_q + plgpu.broadcasted_iota(jnp.int32, (bk, block_q), 1,
                                                           layout=plgpu.Layout.WGMMA)
              keep = qcols >= krows
            if segments:
              q_ids = _load_vector(q_ids_ref.at[bidx, pl.ds(i * block_q, block_q)], col_layout)
              same = (lax.broadcast_in_dim(kv_ids, (bk, block_q), [0])
                      == lax.broadcast_in_dim(q_ids, (bk, block_q), [1]))
              keep = same if keep is None else keep & same
            if keep is not None:
              pt = jnp.where(keep, pt, 0.0)
          plgpu.barrier_wait(delta_full.at[slot])
          delta = _load_vector(delta_ring.at[slot], col_layout)
          dpt = plgpu.wgmma_accumulator_load(dpt_acc, wait_n=0)
          dst = pt * (dpt - lax.broadcast_in_dim(delta, (bk, block_q), [1]))
          plgpu.wgmma(dv_acc, pt.astype(dtype), do_slot)
          plgpu.wgmma(dk_acc, dst.astype(dtype), q_slot)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])

        pl.loop(lo, mid)(functools.partial(step, masked=True))
        pl.loop(mid, hi)(functools.partial(step, masked=False))
        dk = plgpu.wgmma_accumulator_load(dk_acc, wait_n=0)
        dv = plgpu.wgmma_accumulator_load(dv_acc, wait_n=0)
        k_smem[...] = (dk * static.scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bidx, pl.ds(key0, bk), head], commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bidx, pl.ds(key0, bk), head], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(with_accumulators, plgpu.ACC((bk, block_q), jnp.float32),
                    plgpu.ACC((bk, block_q), jnp.float32), plgpu.ACC((bk, dim), jnp.float32),
                    plgpu.ACC((bk, dim), jnp.float32))

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(config.producer_registers, action="decrease")

      def fetch(i, slot):
        rows_slice = (bidx, pl.ds(i * block_q, block_q), head)
        vec_slice = (bidx, head, pl.ds(i * block_q, block_q))
        plgpu.copy_gmem_to_smem(q_ref.at[rows_slice], q_ring.at[slot], q_full.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows_slice], do_ring.at[slot], do_full.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[vec_slice], lse_ring.at[slot], lse_full.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[vec_slice], delta_ring.at[slot], delta_full.at[slot])

      for r in range(min(stages, num_q_blocks)):
        pl.when(lo + r < hi)(functools.partial(fetch, lo + r, r))

      @pl.loop(lo + stages, hi)
      def _(i):
        slot = irem(i - lo, stages)
        plgpu.barrier_wait(free.at[slot])
        fetch(i, slot)

  transforms = _bwd_smem_transforms()
  smem = (
      plgpu.SMEM((wgs, bk, dim), dtype, transforms=transforms),
      plgpu.SMEM((wgs, bk, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q), jnp.float32),
      plgpu.SMEM((stages, block_q), jnp.float32),
  )
  barriers = (
      plgpu.Barrier(num_barriers=2 * wgs),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  )
  out = jax.ShapeDtypeStruct((batch, s_int, num_heads, dim), dtype)
  return plgpu.kernel(
      kernel,
      out_type=(out, out),
      scratch_types=(smem, barriers),
      grid=(num_k_tiles, num_heads, batch),
      grid_names=("k", "h", "b"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*args)


# `flash_attention` differentiates through `backward` (None would select the Triton
# kernels): faster than them at every measured shape (pallas/NOTES_mosaic_gpu.md).
backward = mosaic_backward
