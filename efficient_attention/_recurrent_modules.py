"""Modules of the gated recurrent families, GLA and the delta rule, whose layers read x beyond q, k, v.

Both follow the layers of their papers and of flash-linear-attention (GLA: Yang et
al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training",
sec. 4.4; DeltaNet: Yang et al. 2024, sec. 3.4; Gated DeltaNet: Yang, Kautz &
Hatamizadeh 2024, sec. 3.4):

  q, k, v = conv(W_q x), conv(W_k x), conv(W_v x)   short causal depthwise convolutions, then SiLU (`short_conv`)
  o       = the family's recurrence over q, k, v with per-step inputs from x (forget gates, write strengths)
  out     = W_o (rmsnorm(o) * silu(W_g x))           per-head RMSNorm (`output_norm`), swish gate (`output_gate`)

Decoding keeps the recurrent state and, per convolution, its last `short_conv - 1`
inputs, so `init_cache` and `module(x, decode=True)` reproduce the full causal forward.

The family's own projections (forget gates, beta, output gate) take no bias, as in
the papers, except the second factor of GLA's low-rank gate; their kernels are
LeCun normal, whatever the module's `kernel_init` / `use_bias`.

Shapes: B batch, T time, D in_features, N query heads, K key/value heads, H head dim,
M features (GLA: H with the identity feature map), W convolution width.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attention import _checks, _linear
from efficient_attention._delta import DeltaRuleState, delta_rule_attention, delta_rule_step, init_delta_rule_state
from efficient_attention._linear import LinearState, init_state, linear_attention, linear_attention_step
from efficient_attention._masking import attended_runs
from efficient_attention._module_base import AttentionModule

# GLA's forget gates are log_sigmoid(...) / GATE_NORMALIZER (GLA paper, sec. 4.4: 16).
GATE_NORMALIZER = 16.0
GLA_GATES = ("feature", "step")


class ShortConvolution(nnx.Module):
  """Causal depthwise convolution along time of `[B, T, heads, H]`, then SiLU (fla's `ShortConvolution`).

  `out[t] = silu(sum_j kernel[j] * x[t - W + 1 + j])`, W = `kernel_size`: each
  channel sees its own last W inputs. Taps before the sequence read 0.
  """

  def __init__(self, kernel_size: int, heads: int, head_dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    # PyTorch's Conv1d default for a depthwise kernel: uniform in +-1/sqrt(W).
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=(1, 2))
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, heads, head_dim), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, live: jax.Array | None = None, runs: jax.Array | None = None) -> jax.Array:
    """x `[B, T, heads, H]` -> the same shape.

    live: optional bool `[B|1, T]`, False where x must not be read (padding: read as 0).
    runs: optional int `[B, T]` labels; a tap reads only positions of its output's label
      (no tap crosses a segment start).
    """
    w, t = self.kernel.shape[0], x.shape[1]
    if live is not None:
      x = jnp.where(live[:, :, None, None], x, jnp.zeros((), x.dtype))
    # [B, W - 1 + T, heads, H]
    padded = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0), (0, 0)))
    taps = None
    if runs is not None:
      # Labels start at 1: the padding's -1 matches none.
      padded_runs = jnp.pad(runs, ((0, 0), (w - 1, 0)), constant_values=-1)
      taps = [(padded_runs[:, j:j + t] == runs)[:, :, None, None] for j in range(w)]
    return self._convolve(padded, taps)

  def step(self, x: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The next T inputs x `[B, T, heads, H]` after the last W - 1 in `cache` `[B, W - 1, heads, H]`.

    Returns the outputs and the new cache (the last W - 1 inputs).
    """
    padded = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return self._convolve(padded, None), padded[:, x.shape[1]:].astype(cache.dtype)

  def _convolve(self, padded: jax.Array, taps: list[jax.Array] | None) -> jax.Array:
    w = self.kernel.shape[0]
    t = padded.shape[1] - (w - 1)
    dtype = self.dtype or jnp.result_type(padded.dtype, self.kernel.dtype)
    kernel, padded = self.kernel[...].astype(dtype), padded.astype(dtype)
    out = jnp.zeros((padded.shape[0], t) + padded.shape[2:], dtype)
    for j in range(w):
      tap = padded[:, j:j + t]
      if taps is not None:
        tap = jnp.where(taps[j], tap, jnp.zeros((), dtype))
      out = out + kernel[None, None, j] * tap
    return jax.nn.silu(out)


class DecayGate(nnx.Module):
  """Log forget gate per step and key/value head, Mamba-2's parametrisation (Gated DeltaNet's too):

  `g = -exp(A_log) * softplus(W x + dt_bias) <= 0`, float32 `[B, T, K]`; A starts
  uniform in [1, 16], `softplus(dt_bias)` log-uniform in [0.001, 0.1] (Mamba-2, sec. 9).
  """

  def __init__(self, in_features: int, num_kv_heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.proj = nnx.LinearGeneral(in_features, num_kv_heads, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    a = jax.random.uniform(rngs.params(), (num_kv_heads,), jnp.float32, 1.0, 16.0)
    log_dt = jax.random.uniform(rngs.params(), (num_kv_heads,), jnp.float32, math.log(1e-3), math.log(1e-1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    self.a_log = nnx.Param(jnp.log(a).astype(param_dtype))
    # The inverse of softplus at dt.
    self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[B, T, D]` -> float32 `[B, T, K]`."""
    f32 = jnp.float32
    a = jnp.exp(self.a_log[...].astype(f32))
    dt = jax.nn.softplus(self.proj(x).astype(f32) + self.dt_bias[...].astype(f32)[None, None])
    return -a[None, None] * dt


class LowRankGate(nnx.Module):
  """GLA's per-feature log forget gates: `log_sigmoid(W_2 W_1 x + b) / 16`, float32 `[B, T, K, M]`.

  W_1 `[D, r]` (no bias), W_2 `[r, K, M]` with bias (GLA paper, sec. 4.4).
  """

  def __init__(self, in_features: int, rank: int, num_kv_heads: int, num_features: int, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    linear = functools.partial(nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = linear(in_features, rank, use_bias=False)
    self.up = linear(rank, (num_kv_heads, num_features), use_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.log_sigmoid(self.up(self.down(x)).astype(jnp.float32)) / GATE_NORMALIZER


class GatedRecurrentModule(AttentionModule):
  """Base of `GatedLinearAttention` and `DeltaRuleAttention`: short convolutions, output norm and gate.

  Subclasses say which per-step inputs they read from x (`step_inputs`), how they
  attend (`attend(q, k, v, *, mask, segment_ids, **step_inputs)`), and hold their
  recurrent state (`_init_state`, `_decode(q, k, v, index, **step_inputs)`).

  Args:
    short_conv: W, the width of the causal depthwise convolution (then SiLU) on
      each of q, k and v after projection; 0 for none (nor SiLU). Decoding keeps
      the last W - 1 projected inputs of each.
    output_norm: RMSNorm of each head's output (over H, one learned scale `[H]`).
    output_gate: multiply the (normed) output by `silu(W_g x)`, `W_g [D, N, H]`.
    is_causal: must be True (the default): a recurrence.
    **kwargs: the shared arguments of `AttentionModule`.
  """

  implementations = ("xla", "pallas")

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *, short_conv: int = 4,
               output_norm: bool = True, output_gate: bool = True, is_causal: bool = True, rngs: nnx.Rngs,
               **kwargs):
    if is_causal is not True:
      raise ValueError(f"{self.family} is a recurrence, causal by nature; got is_causal={is_causal!r}, "
                       f"leave it at True")
    super().__init__(num_heads, in_features, qkv_features, is_causal=True, rngs=rngs, **kwargs)
    if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
      raise ValueError(f"short_conv must be an int >= 0 (the convolution width; 0 = none), got {short_conv=!r}")
    for name, value in (("output_norm", output_norm), ("output_gate", output_gate)):
      if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
    self.short_conv = short_conv
    conv = functools.partial(ShortConvolution, short_conv, head_dim=h, **common)
    self.q_conv = conv(n) if short_conv else nnx.data(None)
    self.k_conv = conv(kh) if short_conv else nnx.data(None)
    self.v_conv = conv(kh) if short_conv else nnx.data(None)
    self.output_norm = nnx.RMSNorm(h, **common) if output_norm else nnx.data(None)
    self.output_gate = (nnx.LinearGeneral(in_features, (n, h), use_bias=False, **common) if output_gate
                        else nnx.data(None))
    self.cached_conv: nnx.Cache | None = nnx.data(None)

  @abc.abstractmethod
  def step_inputs(self, x: jax.Array) -> dict[str, jax.Array]:
    """The per-step inputs computed from x `[B, T, D]` (float32 `[B, T, K, ...]`), by their `attend` keyword."""

  @abc.abstractmethod
  def _init_state(self, batch: int) -> None:
    """Creates the recurrent state's cache variables."""

  def forward(self, x, *, mask=None, segment_ids=None, index=None):
    t = x.shape[1]
    q, k, v = self.project(x, None if index is None else index + jnp.arange(t))
    inputs = self.step_inputs(x)
    if index is None:
      q, k, v = self.convolve(q, k, v, mask=mask, segment_ids=segment_ids)
      out = self.attend(q, k, v, mask=mask, segment_ids=segment_ids, **inputs)
    else:
      q, k, v = self._convolve_cached(q, k, v)
      out = self._decode(q, k, v, index, **inputs)
    return self.out(self.gate_output(out, x))

  def _convolve_cached(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The short convolutions of the next tokens after those in `cached_conv`, which they update."""
    if not self.short_conv:
      return q, k, v
    # [B, W - 1, N + 2K, H]: the q, k and v caches side by side.
    split = (self.num_heads, self.num_heads + self.num_kv_heads)
    old_q, old_k, old_v = jnp.split(self.cached_conv[...], split, axis=2)
    (q, new_q), (k, new_k), (v, new_v) = (self.q_conv.step(q, old_q), self.k_conv.step(k, old_k),
                                          self.v_conv.step(v, old_v))
    self.cached_conv[...] = jnp.concatenate([new_q, new_k, new_v], axis=2)
    return q, k, v

  def convolve(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The short convolutions of a whole sequence (q, k, v themselves without `short_conv`).

    Positions no query attends (by `mask`) are read as 0 and taps stay within a
    run of equal `segment_ids` (positions no query attends take the id before them,
    as in `linear_attention`), so neither padding nor another segment leaks in.
    """
    if not self.short_conv:
      return q, k, v
    mask = _checks.check_mask(mask, _checks.check_qkv(q, k, v))
    # [B|1, T]: positions some query attends.
    live = None if mask is None else jnp.any(mask, axis=(1, 2))
    runs = attended_runs(segment_ids, mask)
    return tuple(conv(x, live=live, runs=runs) for conv, x in ((self.q_conv, q), (self.k_conv, k), (self.v_conv, v)))

  def gate_output(self, out: jax.Array, x: jax.Array) -> jax.Array:
    """`rmsnorm(out) * silu(W_g x)`, each part where enabled: `[B, T, N, H]`."""
    if self.output_norm is not None:
      out = self.output_norm(out)
    if self.output_gate is not None:
      out = out * jax.nn.silu(self.output_gate(x))
    return out

  def _init_cache(self, batch, length, dtype):
    if self.short_conv:
      shape = (batch, self.short_conv - 1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
      self.cached_conv = nnx.Cache(jnp.zeros(shape, dtype))
    self._init_state(batch)


class GatedLinearAttention(GatedRecurrentModule):
  """Gated linear attention (GLA): `linear_attention` with per-step forget gates read from x.

  `S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t`, `o_t = H**-0.5 phi(q_t) S_t` (no
  denominator: `normalize="none"`), with the short convolutions and output norm and
  gate of `GatedRecurrentModule`; decodes with the O(1) recurrent state.

  Args:
    gate: "feature" (GLA): one gate per key/value head and feature, `[B, T, K, M]`,
      `log_sigmoid(W_2 W_1 x + b) / 16` through rank `gate_rank`; "step" (Mamba-2
      style): one per key/value head, `[B, T, K]`, `-exp(A_log) softplus(W x + dt_bias)`.
    gate_rank: r, the rank of the "feature" gate's projection.
    feature_map: as in `linear_attention`; "identity" (GLA) by default.
    chunk_size: time steps per chunk (None: `linear_attention`'s default: 64, or
      16 with per-feature gates on implementation="xla").
    **kwargs: the arguments of `GatedRecurrentModule` (`short_conv`, `output_norm`,
      `output_gate`) and `AttentionModule`.
  """

  family = "gla"

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *, gate: str = "feature",
               gate_rank: int = 16, feature_map: str | Callable[[jax.Array], jax.Array] = "identity",
               chunk_size: int | None = None, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, rngs=rngs, **kwargs)
    if gate not in GLA_GATES:
      raise ValueError(f"unknown {gate=!r}; valid: {', '.join(map(repr, GLA_GATES))}")
    if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank <= 0:
      raise ValueError(f"gate_rank must be a positive int, got {gate_rank=!r}")
    fmap = _linear.feature_map_fn(feature_map)
    self.num_features = jax.eval_shape(fmap, jax.ShapeDtypeStruct((1, self.head_dim), jnp.float32)).shape[-1]
    self.gate, self.gate_rank, self.feature_map = gate, gate_rank, feature_map
    self.chunk_size = _linear.check_chunk_size(chunk_size)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    self.forget_gate = (LowRankGate(in_features, gate_rank, self.num_kv_heads, self.num_features, **common)
                        if gate == "feature" else DecayGate(in_features, self.num_kv_heads, **common))
    self.cached_kv: nnx.Cache | None = nnx.data(None)
    self.cached_z: nnx.Cache | None = nnx.data(None)
    self.cached_stabiliser: nnx.Cache | None = nnx.data(None)

  def step_inputs(self, x):
    """`gates`: float32 `[B, T, K, M]` ("feature") or `[B, T, K]` ("step"), <= 0."""
    return dict(gates=self.forget_gate(x))

  def attend(self, q, k, v, *, mask=None, segment_ids=None, gates=None):
    """`linear_attention(q, k, v, gates=gates, normalize="none", is_causal=True)`, times `H**-0.5`."""
    out = linear_attention(q, k, v, feature_map=self.feature_map, normalize="none", gates=gates, is_causal=True,
                           mask=mask, segment_ids=segment_ids, chunk_size=self.chunk_size,
                           implementation=self.implementation)
    return self._scale(out)

  def _scale(self, out: jax.Array) -> jax.Array:
    # GLA's query scale; the output is linear in phi(q), so it is applied after the feature map.
    return out * jnp.asarray(self.head_dim**-0.5, out.dtype)

  def _init_state(self, batch):
    state = init_state(batch, self.num_kv_heads, self.num_features, self.head_dim)
    self.cached_kv, self.cached_z, self.cached_stabiliser = (nnx.Cache(x) for x in state)

  def _decode(self, q, k, v, index, *, gates):
    step = functools.partial(_gla_step, feature_map=self.feature_map)
    state = LinearState(self.cached_kv[...], self.cached_z[...], self.cached_stabiliser[...])
    state, out = scan_steps(step, state, q, k, v, gates)
    self.cached_kv[...], self.cached_z[...], self.cached_stabiliser[...] = state
    return self._scale(out)


def _gla_step(state, q_t, k_t, v_t, gates_t, *, feature_map):
  return linear_attention_step(state, q_t, k_t, v_t, feature_map=feature_map, gates=gates_t, normalize="none")


class DeltaRuleAttention(GatedRecurrentModule):
  """The delta rule (DeltaNet; Gated DeltaNet with `gated`): `delta_rule_attention` with beta read from x.

  `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = H**-0.5 q_t S_t`,
  with `beta = sigmoid(W_beta x)` `[B, T, K]` and, when `gated`, log forget gates
  `g = -exp(A_log) softplus(W_a x + dt_bias)` `[B, T, K]` (else 0); q and k are
  L2-normalised (`qk_norm`). With the short convolutions and output norm and gate of
  `GatedRecurrentModule`; decodes with the recurrent state `[B, K, H, H]`.

  Args:
    gated: Gated DeltaNet's forget gate.
    qk_norm: L2-normalise q and k (as `delta_rule_attention`).
    chunk_size: time steps per chunk (None: `delta_rule_attention`'s 64).
    **kwargs: the arguments of `GatedRecurrentModule` (`short_conv`, `output_norm`,
      `output_gate`) and `AttentionModule`.
  """

  family = "delta_rule"

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None, *, gated: bool = False,
               qk_norm: bool = True, chunk_size: int | None = None, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, qkv_features, rngs=rngs, **kwargs)
    for name, value in (("gated", gated), ("qk_norm", qk_norm)):
      if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    self.gated, self.qk_norm, self.chunk_size = gated, qk_norm, _linear.check_chunk_size(chunk_size)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
    self.beta_proj = nnx.LinearGeneral(in_features, self.num_kv_heads, use_bias=False, **common)
    self.forget_gate = DecayGate(in_features, self.num_kv_heads, **common) if gated else nnx.data(None)
    self.cached_state: nnx.Cache | None = nnx.data(None)

  def step_inputs(self, x):
    """`beta`: float32 `[B, T, K]` in [0, 1]; `gates` (when `gated`): float32 `[B, T, K]`, <= 0."""
    inputs = dict(beta=jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32)))
    if self.forget_gate is not None:
      inputs["gates"] = self.forget_gate(x)
    return inputs

  def attend(self, q, k, v, *, mask=None, segment_ids=None, beta=None, gates=None):
    """`delta_rule_attention(q, k, v, beta, gates=gates)` with the module's options."""
    return delta_rule_attention(q, k, v, beta, gates=gates, qk_norm=self.qk_norm, mask=mask, segment_ids=segment_ids,
                                chunk_size=self.chunk_size, implementation=self.implementation)

  def _init_state(self, batch):
    self.cached_state = nnx.Cache(init_delta_rule_state(batch, self.num_kv_heads, self.head_dim, self.head_dim).s)

  def _decode(self, q, k, v, index, *, beta, gates=None):
    step = functools.partial(_delta_step, qk_norm=self.qk_norm)
    steps = (q, k, v, beta) if gates is None else (q, k, v, beta, gates)
    state, out = scan_steps(step, DeltaRuleState(self.cached_state[...]), *steps)
    self.cached_state[...] = state.s
    return out


def _delta_step(state, q_t, k_t, v_t, beta_t, gates_t=None, *, qk_norm):
  return delta_rule_step(state, q_t, k_t, v_t, beta_t, gates_t=gates_t, qk_norm=qk_norm)


def scan_steps(step: Callable, state: Any, *xs: jax.Array) -> tuple[Any, jax.Array]:
  """Runs `step(state, *x_t) -> (state, out_t)` over the T steps of `xs` (`[B, T, ...]` each).

  Returns the last state and the outputs `[B, T, ...]`.
  """
  if xs[0].shape[1] == 1:
    state, out = step(state, *(x[:, 0] for x in xs))
    return state, out[:, None]
  # [T, B, ...] each
  state, out = jax.lax.scan(lambda s, x_t: step(s, *x_t), state, tuple(jnp.swapaxes(x, 0, 1) for x in xs))
  return state, jnp.swapaxes(out, 0, 1)
