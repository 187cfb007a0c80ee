"""A small decoder-only language model whose attention family is one config field.

Pre-norm blocks (`x + attention(norm(x))`, `x + mlp(norm(x))`), tied input and
output embeddings, byte-level vocabulary by default. Positions: rotary (RoPE,
inside attention) for the families that attend to exact keys (softmax, local,
block_sparse); learned absolute embeddings for FAVOR+, linear, GLA, the delta rule and
Linformer, whose feature maps, recurrences or projections would not keep RoPE's relative form, and for
LSH, whose buckets would depend on the absolute position of a rotated qk. A
hybrid stack (`attention` a pattern of families) with any layer of the latter
kind adds learned positions at the input; its RoPE layers keep RoPE too.

    config = LMConfig(attention="favor", num_layers=2, width=64, num_heads=4)
    hybrid = LMConfig(attention=("gla", "gla", "local"), num_layers=6)  # a cycle over layers
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    logits = model(tokens)                                   # [B, T, vocab_size]
    out = generate(model, prompt, max_new_tokens=32, temperature=0.0)

Shapes: B batch, T time, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attention import _linear
from efficient_attention._checks import check_implementation
from efficient_attention._layouts import BlockLayout, layout_mask, local
from efficient_attention._masking import segment_starts
from efficient_attention._module_base import (
    check_cache_batch,
    check_capacity,
    check_dtype,
    check_rope_base,
    check_segment_ids,
    check_values,
    inputs_checked_ahead,
)
from efficient_attention._modules import ATTENTION_FAMILIES, MultiHeadAttention, default_num_features
from efficient_attention._recurrent_modules import GLA_GATES

ROPE_FAMILIES = ("softmax", "local", "block_sparse")
# Recurrences: causal by nature.
RECURRENT_FAMILIES = ("gla", "delta_rule")
NORMS = ("rms", "layer")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes and options of `LanguageModel`; every field is checked at construction (ValueError /
  TypeError naming it), whichever family uses it.

  Attributes:
    attention: the attention family, a name in `ATTENTION_FAMILIES`; or a
      tuple of names, a pattern cycled over the layers (layer i uses
      `attention[i % len(attention)]`, `layer_families` lists them), for
      hybrid stacks. Each family's options below apply to its layers.
    vocab_size: V (256: bytes).
    num_layers: decoder blocks.
    width: D, the model width.
    num_heads: N, query heads; head dim `width // num_heads`.
    num_kv_heads: K, key/value heads (GQA), default N.
    mlp_ratio: MLP hidden width / D.
    max_len: longest sequence (learned positions, Linformer's E and F, decoding).
    dropout: dropout rate on the embeddings and each residual branch.
    norm: "rms" (RMSNorm) or "layer" (LayerNorm).
    is_causal: causal self-attention. Linformer has no causal form and needs
      False: it then sees the whole sequence, a bidirectional encoder whose
      next-token loss is not a language-model loss (the target is in view).
      GLA and the delta rule are recurrences and need True.
    rope_base: RoPE base for the layers whose family is in `ROPE_FAMILIES`.
    num_features: FAVOR+ projection rows (None: the module's default).
    redraw_interval: FAVOR+ feature / LSH rotation redraw schedule in training
      calls (0 = never).
    num_buckets: LSH hash buckets (even); None: `2 * ceil(max_len / chunk_size)`,
      half a chunk per bucket on average at the longest sequence.
    num_hashes: LSH hash rounds.
    feature_map: linear attention's feature map.
    projected_len: Linformer's projected length (the paper's k).
    window, block_size: local attention's window and block size.
    layout: block_sparse's layout, a function `seq_len -> BlockLayout`.
    gate: GLA's forget gates, "feature" (one per key/value head and feature, low
      rank, as in GLA) or "step" (one per key/value head, Mamba-2 style).
    gate_rank: rank of GLA's "feature" gate projection.
    gated: the delta rule with Gated DeltaNet's forget gate.
    short_conv: GLA / delta rule: width of the causal depthwise convolution (then
      SiLU) on q, k and v; 0 for none.
    output_norm: GLA / delta rule: RMSNorm of each head's output.
    output_gate: GLA / delta rule: swish output gate `norm(o) * silu(W_g x)`.
    chunk_size: time steps per chunk of causal FAVOR+ / linear / delta rule
      attention (GLA uses `linear_attention`'s default: 64 steps, 16 with
      per-feature gates on XLA); sorted tokens per chunk of LSH attention.
    implementation: the attention functions' `implementation` (None = best
      available; e.g. "pallas" for the flash kernel).
    dtype: computation dtype (None: float32 from the parameters).
    param_dtype: parameter dtype.
  """

  attention: str | tuple[str, ...] = "softmax"
  vocab_size: int = 256
  num_layers: int = 2
  width: int = 128
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_ratio: float = 4.0
  max_len: int = 256
  dropout: float = 0.0
  norm: str = "rms"
  is_causal: bool = True
  rope_base: float = 10_000.0
  num_features: int | None = None
  redraw_interval: int = 0
  num_buckets: int | None = None
  num_hashes: int = 2
  feature_map: str = "elu+1"
  projected_len: int = 64
  window: int = 64
  block_size: int = 16
  layout: Callable[[int], BlockLayout] | None = None
  gate: str = "feature"
  gate_rank: int = 16
  gated: bool = False
  short_conv: int = 4
  output_norm: bool = True
  output_gate: bool = True
  chunk_size: int = 64
  implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if isinstance(self.attention, list):
      object.__setattr__(self, "attention", tuple(self.attention))
    pattern = self.attention if isinstance(self.attention, tuple) else (self.attention,)
    if not pattern:
      raise ValueError("attention must be a family name or a non-empty tuple of them, got attention=()")
    for family in pattern:
      if not isinstance(family, str) or family not in ATTENTION_FAMILIES:
        where = f"attention family {family!r} in attention=" if isinstance(self.attention, tuple) else "attention="
        raise ValueError(f"unknown {where}{self.attention!r}; valid: {', '.join(map(repr, ATTENTION_FAMILIES))}")
    for name in ("vocab_size", "num_layers", "width", "num_heads", "max_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if self.width % self.num_heads:
      raise ValueError(f"width must be a multiple of num_heads, got width={self.width}, num_heads={self.num_heads}")
    if self.norm not in NORMS:
      raise ValueError(f"unknown norm={self.norm!r}; valid: {', '.join(map(repr, NORMS))}")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be a number in [0, 1), got dropout={self.dropout!r}")
    if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, numbers.Real) or not (
        0 < self.mlp_ratio < math.inf):
      raise ValueError(f"mlp_ratio must be a finite positive number, got mlp_ratio={self.mlp_ratio!r}")
    if isinstance(self.attention, tuple) and len(pattern) > self.num_layers:
      raise ValueError(f"the attention pattern has {len(pattern)} families for num_layers={self.num_layers}: "
                       f"the last {len(pattern) - self.num_layers} would never be used; got attention={self.attention!r}")
    families = set(self.layer_families)
    if "linformer" in families and self.is_causal:
      raise ValueError("attention='linformer' has no causal form: set is_causal=False explicitly (the model then "
                       "sees the whole sequence, so it is an encoder, not a next-token language model)")
    recurrent = sorted(families & set(RECURRENT_FAMILIES))
    if recurrent and not self.is_causal:
      raise ValueError(f"{', '.join(recurrent)} attention is a recurrence, causal by nature: it needs is_causal=True, "
                       f"got attention={self.attention!r} with is_causal=False")
    if self.num_buckets is not None and (isinstance(self.num_buckets, bool) or not isinstance(self.num_buckets, int)
                                         or self.num_buckets < 2 or self.num_buckets % 2):
      raise ValueError(f"num_buckets must be None or an even int >= 2, got num_buckets={self.num_buckets!r}")
    if isinstance(self.num_hashes, bool) or not isinstance(self.num_hashes, int) or self.num_hashes < 1:
      raise ValueError(f"num_hashes must be a positive int, got num_hashes={self.num_hashes!r}")
    if (self.layout is None) == ("block_sparse" in families):
      raise ValueError(f"layout (a function seq_len -> BlockLayout) is required for attention='block_sparse' "
                       f"and only for it; got attention={self.attention!r}, layout={self.layout!r}")
    _check_options(self)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_width(self) -> int:
    return max(1, round(self.width * self.mlp_ratio))

  @property
  def layer_families(self) -> tuple[str, ...]:
    """The attention family of each layer: `attention` itself, or its pattern cycled over `num_layers`."""
    pattern = self.attention if isinstance(self.attention, tuple) else (self.attention,)
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def lsh_num_buckets(self) -> int:
    """LSH hash buckets: `num_buckets`, or `2 * ceil(max_len / chunk_size)` when None."""
    return self.num_buckets or 2 * math.ceil(self.max_len / self.chunk_size)

  @property
  def uses_rope(self) -> bool:
    """Positions by RoPE inside every layer's attention (True), or learned absolute
    position embeddings added to the input (False: some layer's family does not take RoPE;
    the layers whose family does still apply it)."""
    return all(family in ROPE_FAMILIES for family in self.layer_families)

  def attention_options(self, family: str | None = None) -> dict[str, Any]:
    """The options passed to `MultiHeadAttention` for `family` (default: `attention`, a single family)."""
    if family is None:
      if isinstance(self.attention, tuple):
        raise ValueError(f"attention={self.attention!r} is a pattern: name the family, attention_options(family)")
      family = self.attention
    options = {
        "favor": dict(num_features=self.num_features, redraw_interval=self.redraw_interval,
                      chunk_size=self.chunk_size),
        "linear": dict(feature_map=self.feature_map, chunk_size=self.chunk_size),
        "linformer": dict(max_len=self.max_len, projected_len=self.projected_len),
        "local": dict(window=self.window, block_size=self.block_size),
        "block_sparse": dict(layout=self.layout),
        "lsh": dict(num_buckets=self.lsh_num_buckets, num_hashes=self.num_hashes, chunk_size=self.chunk_size,
                    redraw_interval=self.redraw_interval),
        "gla": dict(gate=self.gate, gate_rank=self.gate_rank, **self._recurrent_options()),
        "delta_rule": dict(gated=self.gated, chunk_size=self.chunk_size, **self._recurrent_options()),
    }.get(family, {})
    options["implementation"] = self.implementation
    if family in ROPE_FAMILIES:
      options["rope_base"] = self.rope_base
    return options

  def _recurrent_options(self) -> dict[str, Any]:
    return dict(short_conv=self.short_conv, output_norm=self.output_norm, output_gate=self.output_gate)


def _check_options(config: LMConfig) -> None:
  """The fields `LMConfig.__post_init__` leaves to the modules' own checks, checked at construction.

  Every field is checked, whichever family uses it, so a config is valid or not on its own.
  """
  kv = config.num_kv_heads
  if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or config.num_heads % kv):
    raise ValueError(f"num_kv_heads must be None or a positive int dividing num_heads={config.num_heads}, "
                     f"got num_kv_heads={kv!r}")
  if not isinstance(config.is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got is_causal={config.is_causal!r}")
  if config.rope_base is None:
    raise ValueError("rope_base must be a finite positive number, got rope_base=None")
  check_rope_base(config.rope_base)
  nf = config.num_features
  if nf is not None and (isinstance(nf, bool) or not isinstance(nf, int) or nf <= 0):
    raise ValueError(f"num_features must be None or a positive int, got num_features={nf!r}")
  ri = config.redraw_interval
  if isinstance(ri, bool) or not isinstance(ri, int) or ri < 0:
    raise ValueError(f"redraw_interval must be an int >= 0 (0 = never), got redraw_interval={ri!r}")
  _linear.feature_map_fn(config.feature_map)
  pl = config.projected_len
  if isinstance(pl, bool) or not isinstance(pl, int) or pl <= 0:
    raise ValueError(f"projected_len must be a positive int, got projected_len={pl!r}")
  local(1, window=config.window, block_size=config.block_size)  # checks window >= 0 and block_size > 0
  if config.layout is not None and not callable(config.layout):
    raise TypeError(f"layout must be a function seq_len -> BlockLayout, got layout={config.layout!r}")
  _linear.check_chunk_size(config.chunk_size)
  if not isinstance(config.gate, str) or config.gate not in GLA_GATES:
    raise ValueError(f"unknown gate={config.gate!r}; valid: {', '.join(map(repr, GLA_GATES))}")
  for name in ("gate_rank", "short_conv"):
    value, low = getattr(config, name), 1 if name == "gate_rank" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
  for name in ("gated", "output_norm", "output_gate"):
    if not isinstance(getattr(config, name), bool):
      raise TypeError(f"{name} must be a bool, got {name}={getattr(config, name)!r}")
  for family in dict.fromkeys(config.layer_families):
    check_implementation(config.implementation, ATTENTION_FAMILIES[family].implementations, family=family)
  check_dtype(dtype=config.dtype)
  check_dtype(param_dtype=config.param_dtype, optional=False)


def training_flops_per_token(config: LMConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3 x forward) at sequence length `seq_len`.

  Counts what the model must compute, not what an implementation does (no
  recomputation, no padding, no masked-out blocks): every matrix product at
  2 FLOPs a multiply-add, i.e. 6 x the matrix parameters (projections, MLP,
  the tied output layer; not the embedding lookups or norms), plus each
  family's attention:

  - softmax: `4 H` per query head and attended key (QK^T and AV), over the
    T (T + 1) / 2 causal pairs (T^2 bidirectional), averaged per token;
  - local / block_sparse: the same over the pairs the layout (and causality) admits;
  - linear / FAVOR+ (M features): per query head `2 M (H + 1)` to read the
    state `[M, H]` and its normaliser `[M]` (phi(q) S and phi(q) . z), per
    key/value head `2 M (H + 1)` to update them;
    FAVOR+ adds `2 M H` per head for each of the q and k projections;
  - Linformer (projected length P): `2 P H` per key/value head for each of
    K and V, and `4 P H` per query head;
  - LSH (R rounds, chunk c, b buckets): per head and round `b H` to hash
    and `4 H` per key of the query's window (its chunk and the previous one:
    2c keys, or T with a single chunk), masked keys included (the window is
    data-dependent); the sort is not counted;
  - GLA (M = H features): per key/value head `3 M H` to decay the state and
    add `k v^T`, per query head `2 M H` to read it (no normaliser);
  - delta rule: per key/value head `4 H^2` to read `S^T k` and add the
    rank-one update (`5 H^2` gated: the decay), per query head `2 H^2` to read;
  - GLA and delta rule layers add `2 W` per channel of q, k and v for the
    short convolution (W = `short_conv`), and their own projections count as
    matrix parameters: the output gate `2 D N H`, GLA's forget gates
    `2 r (D + K M)` (rank r, "feature") or `2 D K` ("step"), the delta rule's
    beta `2 D K` and forget gate `2 D K` (gated).
  """
  d, n, h = config.width, config.num_heads, config.head_dim
  kv = config.num_kv_heads or n
  dense = 2 * d * (n * h + 2 * kv * h) + 2 * n * h * d + 4 * d * config.mlp_width
  layers = sum(dense + _projection_flops_per_token(config, family) + _attention_flops_per_token(config, family, seq_len)
               for family in config.layer_families)
  return 3 * (layers + 2 * d * config.vocab_size)


def _projection_flops_per_token(config: LMConfig, family: str) -> float:
  """One layer's matrix FLOPs per token beyond the q, k, v and output projections (forward)."""
  d, n, h = config.width, config.num_heads, config.head_dim
  kv = config.num_kv_heads or n
  if family == "lsh":
    return -2 * d * kv * h  # no key projection: shared QK
  if family not in RECURRENT_FAMILIES:
    return 0
  flops = 2 * d * n * h if config.output_gate else 0
  if family == "gla":
    flops += 2 * config.gate_rank * (d + kv * h) if config.gate == "feature" else 2 * d * kv
  else:
    flops += 2 * d * kv * (2 if config.gated else 1)
  return flops


def _attention_flops_per_token(config: LMConfig, family: str, seq_len: int) -> float:
  """One layer's attention FLOPs per token (forward), as `training_flops_per_token` counts them."""
  n, h = config.num_heads, config.head_dim
  kv = config.num_kv_heads or n
  per_layer = 0.0
  if family in ("softmax", "local", "block_sparse"):
    if family == "softmax":
      pairs = seq_len * (seq_len + 1) / 2 if config.is_causal else seq_len**2
    else:
      layout = (local(seq_len, window=config.window, block_size=config.block_size) if family == "local"
                else config.layout(seq_len))
      allowed = np.asarray(layout_mask(layout, seq_len))
      pairs = float((np.tril(allowed) if config.is_causal else allowed).sum())
    per_layer += 4 * n * h * pairs / seq_len
  elif family in ("linear", "favor"):
    m = h if family == "linear" else (config.num_features or default_num_features(h))
    per_layer += 2 * m * (h + 1) * (n + kv)
    if family == "favor":
      per_layer += 2 * m * h * (n + kv)
  elif family == "linformer":
    per_layer += 4 * config.projected_len * h * (kv + n)
  elif family == "lsh":
    chunk = min(config.chunk_size, seq_len)
    window = chunk if chunk == seq_len else 2 * chunk
    per_layer += config.num_hashes * n * (config.lsh_num_buckets * h + 4 * h * window)
  elif family == "gla":
    per_layer += 2 * h * h * n + 3 * h * h * kv
  elif family == "delta_rule":
    per_layer += 2 * h * h * n + (5 if config.gated else 4) * h * h * kv
  if family in RECURRENT_FAMILIES:
    per_layer += 2 * config.short_conv * (n + 2 * kv) * h
  return per_layer


class MLP(nnx.Module):
  """`[B, T, D] -> [B, T, D]`: Linear, GELU, Linear."""

  def __init__(self, width: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up, self.down = linear(width, hidden), linear(hidden, width)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class DecoderBlock(nnx.Module):
  """Pre-norm block: `x + drop(attention(norm(x)))`, then `x + drop(mlp(norm(x)))`."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, family: str | None = None):
    family = config.attention if family is None else family
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.attention_norm = _norm(config, rngs)
    self.attention = MultiHeadAttention(
        config.num_heads, config.width, attention=family, num_kv_heads=config.num_kv_heads,
        is_causal=config.is_causal, use_bias=False, **common, **config.attention_options(family))
    self.mlp_norm = _norm(config, rngs)
    self.mlp = MLP(config.width, config.mlp_width, **common)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None, decode: bool = False) -> jax.Array:
    x = x + self.dropout(self.attention(self.attention_norm(x), segment_ids=segment_ids, decode=decode))
    return x + self.dropout(self.mlp(self.mlp_norm(x)))


class LanguageModel(nnx.Module):
  """Decoder-only LM: tokens `[B, T]` -> logits `[B, T, vocab_size]` (float32).

  Tokens must lie in `[0, vocab_size)`: out-of-range tokens raise a ValueError
  at once when the tokens are concrete, and fail the call at run time under
  `jax.jit` / `nnx.jit` (see `check_tokens`).

  Call with `segment_ids [B, T]` for packed sequences or padding (attention
  stays within equal ids; learned positions restart with each run of ids).
  For decoding, `init_cache((B, L))` then `model(tokens, decode=True)` with the
  next tokens; `generate` does both.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    embed_init = nnx.initializers.normal(stddev=config.width**-0.5)
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, embedding_init=embed_init, rngs=rngs)
    self.embed = nnx.Embed(config.vocab_size, config.width, **common)
    self.position = nnx.data(None) if config.uses_rope else nnx.Embed(config.max_len, config.width, **common)
    self.blocks = nnx.List([DecoderBlock(config, rngs=rngs, family=family) for family in config.layer_families])
    self.final_norm = _norm(config, rngs)
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
    self.cache_index: nnx.Cache | None = nnx.data(None)
    self.cache_length: int | None = None
    self.cache_batch: int | None = None

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """Logits `[B, T, V]` in float32 for int tokens `[B, T]`."""
    if not hasattr(tokens, "dtype") or tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {_describe(tokens)}")
    t = tokens.shape[1]
    if t > self.config.max_len:
      raise ValueError(f"sequence length T={t} exceeds max_len={self.config.max_len}")
    check_tokens(tokens, self.config.vocab_size, name="LanguageModel")
    check_segment_ids(segment_ids, tokens.shape, name="LanguageModel")
    if decode:
      check_cache_batch(tokens.shape[0], self.cache_batch, name="LanguageModel")
    positions = self._advance_cache(t) if decode else self._positions(t, segment_ids)
    x = _lookup(self.embed, tokens)
    if self.position is not None:
      x = x + _lookup(self.position, positions)
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x, segment_ids=segment_ids, decode=decode)
    # [B, T, V]: the output layer is the transposed input embedding.
    return self.embed.attend(self.final_norm(x)).astype(jnp.float32)

  def init_cache(self, input_shape: tuple[int, int], dtype: Any = None) -> None:
    """Empty decoding caches for token arrays of shape `input_shape = (B, L)`, L <= max_len."""
    if len(input_shape) != 2 or input_shape[1] > self.config.max_len:
      raise ValueError(f"input_shape must be (B, L) with L <= max_len={self.config.max_len}, got {input_shape=}")
    for block in self.blocks:
      block.attention.init_cache((*input_shape, self.config.width), dtype)
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))
    self.cache_length = input_shape[1]
    self.cache_batch = input_shape[0]

  def _advance_cache(self, t: int) -> jax.Array:
    """int `[1, T]` positions of the next t decoded tokens; counts them in `cache_index`."""
    if self.cache_index is None:
      raise ValueError("decode=True needs init_cache((B, L)) first")
    index = self.cache_index[...]
    check_capacity(index, t, self.cache_length, name="LanguageModel")
    self.cache_index[...] = index + t
    return (index + jnp.arange(t))[None]

  def _positions(self, t: int, segment_ids: jax.Array | None) -> jax.Array:
    """int `[1|B, T]`: positions 0..T-1, restarting with each run of equal segment ids."""
    positions = jnp.arange(t)[None]
    if segment_ids is None:
      return positions
    # Index of the current run's first token, carried forward.
    run_start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), positions, 0), axis=1)
    return positions - run_start


def generate(
    model: LanguageModel,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
  """Samples a continuation with the decoding caches: the prompt in one call, then token by token.

  Runs in eval mode (no dropout, no FAVOR+ redraws) on a view of `model`,
  whose own caches and mode are left as they were. One `jax.jit` compilation
  per prompt shape and `max_new_tokens` (temperature and top_k are traced);
  the token loop is a `jax.lax.scan`.

  Args:
    model: a `LanguageModel` with `is_causal=True`.
    prompt: int `[B, P]` tokens, P >= 1, `P + max_new_tokens <= max_len`.
    max_new_tokens: tokens to add.
    temperature: softmax temperature; 0 picks the most likely token (greedy).
    top_k: sample among the k most likely tokens only (None: all).
    key: PRNG key, required when temperature > 0.

  Returns:
    int32 `[B, P + max_new_tokens]`: the prompt and its continuation.
  """
  config = model.config
  if not config.is_causal:
    raise ValueError(f"generate needs a causal model, got attention={config.attention!r} with is_causal=False")
  if not hasattr(prompt, "dtype") or prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be an int array [B, P], got {_describe(prompt)}")
  if prompt.shape[1] < 1:
    raise ValueError(f"prompt must hold at least one token, got {prompt.shape=}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens=}")
  total = prompt.shape[1] + max_new_tokens
  if total > config.max_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + {max_new_tokens=} = {total} exceeds max_len={config.max_len}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature=}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or
                            not 1 <= top_k <= config.vocab_size):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={config.vocab_size}], got {top_k=}")
  if temperature > 0 and key is None:
    raise ValueError(f"sampling with {temperature=} needs a PRNG key (or temperature=0 for greedy decoding)")
  # Checked here once (a host callback if the prompt is traced); the decoding steps below skip the check.
  check_tokens(prompt, config.vocab_size, name="generate: prompt")
  if max_new_tokens == 0:
    return prompt.astype(jnp.int32)
  view = nnx.with_attributes(model, deterministic=True, raise_if_not_found=False)
  view.init_cache((prompt.shape[0], total))
  graphdef, state = nnx.split(view)
  key = jax.random.key(0) if key is None else key
  top_k = config.vocab_size if top_k is None else top_k
  with inputs_checked_ahead():  # total <= the cache length and the prompt's tokens, checked above
    return _generate(graphdef, state, prompt.astype(jnp.int32), key, jnp.float32(temperature), jnp.int32(top_k),
                     max_new_tokens=max_new_tokens)


# Temperature and top_k are traced: changing them does not recompile.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, prompt, key, temperature, top_k, *, max_new_tokens):
  def decode(state, tokens, key):
    model = nnx.merge(graphdef, state)
    logits = model(tokens, decode=True)[:, -1]
    return nnx.state(model), _sample(logits, key, temperature, top_k)

  keys = jax.random.split(key, max_new_tokens)
  state, first = decode(state, prompt, keys[0])

  def step(carry, key):
    state, token = carry
    state, token = decode(state, token[:, None], key)
    return (state, token), token

  _, rest = jax.lax.scan(step, (state, first), keys[1:])
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def check_tokens(tokens: jax.Array, vocab_size: int, *, name: str) -> None:
  """Raises ValueError unless every token lies in `[0, vocab_size)`.

  An out-of-range token would index past the embedding table: NaN logits above
  it, a wrapped row below 0. Eagerly (concrete tokens) it raises at once; under
  `jax.jit` the minimum and maximum are taken on the device and checked on the
  host by `jax.debug.callback`, failing the call with a runtime error quoting the
  message (the mechanism of the decoding caches' length check).
  """
  if tokens.size == 0:
    return
  check = functools.partial(_raise_on_out_of_vocab, vocab_size=vocab_size, name=name)
  check_values(check, jnp.min(tokens), jnp.max(tokens))


def _raise_on_out_of_vocab(low, high, *, vocab_size: int, name: str) -> None:
  low, high = int(low), int(high)
  if low < 0 or high >= vocab_size:
    raise ValueError(f"{name}: tokens must lie in [0, vocab_size={vocab_size}), got tokens from {low} to {high}")


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
  """int32 `[B]` from logits `[B, V]`: the argmax when temperature is 0, else a draw among the top_k."""
  # [B, 1]: the top_k-th largest logit.
  kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), logits.shape[-1] - top_k, axis=-1)
  kept = jnp.where(logits < kth, -jnp.inf, logits)
  drawn = jax.random.categorical(key, kept / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _lookup(embed: nnx.Embed, indices: jax.Array) -> jax.Array:
  """`embed(indices)`, gathered from the table in its parameter dtype and then cast to the compute dtype.

  `nnx.Embed` casts the whole table first, so with bfloat16 compute its gradient is
  a bfloat16 scatter-add: many tokens hitting few rows (a byte vocabulary) made
  that one op several times slower than the rest of a training step on a GPU.
  Gathering first keeps the scatter-add in float32, as in float32 training.
  """
  rows = jnp.take(embed.embedding[...], indices, axis=0)
  return rows if embed.dtype is None else rows.astype(embed.dtype)


def _norm(config: LMConfig, rngs: nnx.Rngs) -> nnx.Module:
  cls = nnx.RMSNorm if config.norm == "rms" else nnx.LayerNorm
  return cls(config.width, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


def _describe(x: Any) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"shape={tuple(x.shape)} dtype={x.dtype}"
  return type(x).__name__
