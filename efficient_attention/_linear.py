"""Linear attention, its recurrent decoding step, and the chunked core shared with FAVOR+.

Kernelised attention replaces `softmax(q k^T)` by `phi(q) phi(k)^T` for a feature
map `phi: [..., H] -> [..., M]` (Katharopoulos et al. 2020, sec. 3.2):

  out_t = sum_s w_ts (phi(q_t) . phi(k_s)) v_s / sum_s w_ts (phi(q_t) . phi(k_s))

with `w_ts` in {0, 1} saying whether query t may attend key s (`is_causal`, `mask`,
`segment_ids`). Associativity, `(phi(q) phi(k)^T) v = phi(q) (phi(k)^T v)`, makes
the cost linear in the sequence length. How each option is honoured:

- No option: `KV = sum_s phi(k_s) v_s^T` `[B, K, M, Hv]`, `z = sum_s phi(k_s)`.
- Key-padding mask (T axis of size 1, `[B|1, N|1, 1, S|1]`): masked keys' features
  are zeroed, i.e. removed from the sums; still linear. When the mask differs
  between the query heads of one GQA group, the key features are expanded to the N
  query heads.
- General mask (T axis of size T): the masked quadratic form
  `(phi(q) phi(k)^T * mask) v`, combined with `is_causal` and `segment_ids`. This
  costs O(T * S) memory.
- `is_causal` (T == S): the chunkwise parallel form (Yang et al. 2024, GLA,
  sec. 2.2): a masked quadratic form inside each chunk of `chunk_size` steps plus a
  state `[B, K, M, Hv]` carried across chunks by a prefix scan over the per-chunk
  sums. Memory is O(T * (M + chunk_size) + (T / chunk_size) * M * Hv) per head;
  no `[T, M, Hv]` prefix sum is built.
- `gates` (log forget gates, causal only): the state decays by `exp(g_t)` before
  each step adds its key, `S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t` (RetNet,
  Mamba-2, GLA). Chunked in log space: within a chunk the cumulative gate sums
  `G_c` give the decay `exp(G_c - G_d)` of key d seen from query c, always the
  exponential of a non-positive number; chunks pass the state on with their total
  decay. Per-feature gates use a `[C, D, M]` decay tensor per chunk (hence a
  smaller default chunk); the Pallas kernels make their pairs through sub-chunks
  instead (`pallas.gated`).
- `segment_ids` (one int `[B, T]`, T == S): a segment is a maximal run of equal
  ids, so an id that recurs after a different id starts a new segment (packed
  sequences). Causal: the prefix sums restart at each run start. Non-causal: the
  causal (inclusive) sums plus the same sums over the time-reversed sequence,
  excluding the diagonal; still linear.

`normalize="none"` drops the denominator: the output is the numerator alone.
A query row whose denominator is exactly 0 (nothing to attend to, or features
that vanish, as `relu` can) returns 0 with 0 gradient. Sums are float32 for
narrower inputs (float64 inputs stay float64); the decoding state is float32.

Einsum alphabet: B batch, T query time, S key time, N query heads, K key/value
heads, G = N / K query heads per key/value head, M features, H head dim (of the
values too), U chunks, C query position in a chunk, D key position in a chunk.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attention import _checks
from efficient_attention._masking import attended_runs, carry_ids_over_masked, drop_masked, split_heads
from pallas import gated, linear
from pallas.common import dense_mask, run_labels, safe_divide, segment_starts


def elu_plus_one(x: jax.Array) -> jax.Array:
  """`elu(x) + 1`, positive (Katharopoulos et al. 2020, sec. 3.2.1)."""
  return jax.nn.elu(x) + 1.0


def identity(x: jax.Array) -> jax.Array:
  """`x` itself: plain dot products, as in gated linear attention and Mamba-2 / RetNet."""
  return x


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu+1": elu_plus_one,
    "relu": jax.nn.relu,
    "identity": identity,
}

# What divides the output: `phi(q_t) . z_t` ("denominator") or nothing ("none").
NORMALIZE = ("denominator", "none")


class LinearState(NamedTuple):
  """Recurrent state of linear attention and FAVOR+ for decoding.

  The sums are stored divided by `exp(stabiliser)` (FAVOR+ keys); linear
  attention leaves the stabiliser at its initial value.
  """

  kv: jax.Array  # float32 [B, K, M, Hv]: sum_s phi(k_s) v_s^T
  z: jax.Array  # float32 [B, K, M]: sum_s phi(k_s)
  stabiliser: jax.Array  # float32 [B, K]: running key stabiliser; -inf before the first key


def init_state(batch: int, num_kv_heads: int, num_features: int, v_head_dim: int) -> LinearState:
  """Empty recurrent state: zero sums `kv [B, K, M, Hv]`, `z [B, K, M]`, stabiliser `[B, K]`.

  `num_features` is the width M of `phi(k)`: the head dim for the "elu+1" and
  "relu" feature maps, M for FAVOR+ "softmax" and "relu" kernels, 2 * M for "trig".
  """
  sizes = dict(batch=batch, num_kv_heads=num_kv_heads, num_features=num_features, v_head_dim=v_head_dim)
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"init_state: {name} must be a positive int, got {name}={size!r}")
  return LinearState(
      kv=jnp.zeros((batch, num_kv_heads, num_features, v_head_dim), jnp.float32),
      z=jnp.zeros((batch, num_kv_heads, num_features), jnp.float32),
      stabiliser=jnp.full((batch, num_kv_heads), -jnp.inf, jnp.float32),
  )


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    feature_map: str | Callable[[jax.Array], jax.Array] = "elu+1",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
    bias: jax.Array | None = None,
    implementation: str | None = None,
    gates: jax.Array | None = None,
    normalize: str = "denominator",
) -> jax.Array:
  """Linear attention `phi(q) (phi(k)^T v)`, normalised by `phi(q) sum_s phi(k_s)`.

  With `gates` (causal only), per batch row and key/value head the state decays:
  `S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t`, `z_t = exp(g_t) z_{t-1} + phi(k_t)`,
  `out_t = phi(q_t) S_t / (phi(q_t) . z_t)` (no division for `normalize="none"`).

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, K, H]` keys, `N % K == 0` (GQA when K < N).
    v: `[B, S, K, Hv]` values.
    feature_map: "elu+1", "relu", "identity" (M = H), or a callable
      `[..., H] -> [..., M]` applied to queries and keys in float32 (float64 inputs
      stay float64); it must be hashable, as it is a static option.
    is_causal: query t attends keys s <= t; needs T == S. Chunked, linear memory.
    mask: optional bool `[B|1, N|1, T|1, S|1]`, True = attend. A T axis of size 1
      is a key-padding mask (linear memory); a T axis of size T is honoured exactly
      through an O(T * S) masked quadratic form.
    segment_ids: optional int `[B, T]` (T == S), shared by queries and keys;
      attend within maximal runs of equal ids (an id recurring after another id
      starts a new segment).
    chunk_size: time steps per chunk of the causal / segmented form (static);
      any T works (padded internally). "pallas": a power of two >= 16. None:
      64 for "xla" (16 with per-feature gates), the kernel's choice for "pallas"
      (`pallas.LinearBlockSizes`, `pallas.GatedBlockSizes` with gates: 64).
    scale: not meaningful for linear attention (the feature map fixes the
      kernel); must be None.
    bias: not supported; must be None.
    implementation: None or "xla" (the default), or "pallas": the chunked
      causal kernels (is_causal=True; honour segment_ids and key-padding masks,
      not masks with a T axis): `pallas.causal_linear_attention` without gates
      (normalize="denominator" only; its backend is
      `pallas.linear.default_backend`), `pallas.gated_linear_attention` with
      gates of any of the three shapes.
    gates: optional log forget gates (float, finite, <= 0), indexed by the
      key/value heads: `[K]` (one per head, RetNet), `[B, T, K]` (one per step
      and head, Mamba-2 / simple GLA) or `[B, T, K, M]` (one per feature, GLA;
      `exp(g_t)` scales row m of the state). Needs `is_causal=True`; honours
      segment_ids (a segment starts from a zero state) and key-padding masks (a
      masked step is the identity: it adds no key and its gate counts as 0), not
      masks with a T axis. Values are checked (finite, <= 0) for concrete arrays
      only; under `jax.jit` a positive gate makes the state grow, possibly to inf.
      Computed in float32 (float64 for float64 inputs), cumulative sums of the
      gates per chunk.
    normalize: "denominator" (the default): divide by `phi(q_t) . z_t`; "none":
      return the numerator `phi(q_t) S_t` alone (the usual choice with "identity"
      features, whose denominator can be near 0 or negative).

  Returns:
    `[B, T, N, Hv]` in the input dtype; with normalize="denominator", rows whose
    denominator is exactly 0 are 0 (with 0 gradient).
  """
  family = "linear_attention"
  dims = _checks.check_qkv(q, k, v)
  _checks.check_implementation(implementation, ("xla", "pallas"), family=family)
  _checks.reject(family, bias=bias)
  if scale is not None:
    raise ValueError(
        f"{family} has no logit scale (the feature map defines the kernel), got {scale=}; leave it unset"
    )
  fmap = feature_map_fn(feature_map)
  mask = _checks.check_mask(mask, dims)
  ids = _checks.check_shared_segment_ids(segment_ids, dims, family=family)
  _checks.check_causal(is_causal, dims, family=family, need_square=True)
  chunk_size = check_chunk_size(chunk_size)
  check_normalize(normalize, family=family)
  pallas = implementation == "pallas"
  if gates is not None:
    num_features = feature_width(fmap, k)
    gates = check_gates(gates, dims, num_features, is_causal=is_causal, mask=mask, family=family)
    if chunk_size is None and gates.ndim == 4 and not pallas:
      chunk_size = XLA_FEATURE_GATES_CHUNK_SIZE
  if pallas:
    if gates is None and normalize != "denominator":
      raise ValueError(f"{family}: implementation='pallas' without gates computes normalize='denominator'; "
                       f"got {normalize=} (pass gates, even zeros, or use implementation='xla')")
    check_pallas_options(q.dtype, mask, is_causal, chunk_size, family=family)
  empty = _checks.empty_output(q, dims)
  if empty is not None:
    return empty
  return _linear_attention(
      q, k, v, mask, ids, gates, fmap=fmap, is_causal=is_causal, chunk_size=chunk_size, dims=dims, pallas=pallas,
      normalize=normalize,
  )


# Options are static and checked by the caller; eager calls compile once per shape.
@functools.partial(jax.jit, static_argnames=("fmap", "is_causal", "chunk_size", "dims", "pallas", "normalize"))
def _linear_attention(q, k, v, mask, ids, gates, *, fmap, is_causal, chunk_size, dims, pallas, normalize):
  acc = jnp.promote_types(q.dtype, jnp.float32)
  # Garbage under the mask (NaN, inf) must not reach live rows or any gradient.
  q, k, v = drop_masked(q, k, v, mask, dims)
  phi_q = apply_feature_map(fmap, q.astype(acc), "q")
  phi_k = apply_feature_map(fmap, k.astype(acc), "k")
  if phi_q.shape[-1] != phi_k.shape[-1]:
    raise ValueError(f"feature_map gave {phi_q.shape=} and {phi_k.shape=}, which differ in features")
  if phi_q.shape[-1] == 0:
    raise ValueError(f"feature_map gave no features ({phi_q.shape=}); it must map [..., H] to [..., M], M >= 1")
  plan = plan_masks(mask, ids, is_causal, dims)
  if gates is not None:
    gates = gates_per_step(gates, dims).astype(acc)
  if pallas and gates is not None:
    return attend_gated_pallas(phi_q, phi_k, v, gates, plan, chunk_size=chunk_size, dims=dims, dtype=q.dtype,
                               normalize=normalize)
  if pallas:
    return attend_pallas(phi_q, phi_k, v, plan, chunk_size=chunk_size, dims=dims, dtype=q.dtype)
  out = attend(phi_q, phi_k, v, plan, is_causal=is_causal, chunk_size=chunk_size or XLA_CHUNK_SIZE, dims=dims,
               gates=gates, normalize=normalize)
  return out.astype(q.dtype)


def linear_attention_step(
    state: LinearState,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    *,
    feature_map: str | Callable[[jax.Array], jax.Array] = "elu+1",
    gates: jax.Array | None = None,
    normalize: str = "denominator",
) -> tuple[LinearState, jax.Array]:
  """One causal decoding step in O(1) memory (Katharopoulos et al. 2020, sec. 3.4).

  Decays the state by `exp(gates)` (when given), adds key `k_t` and value `v_t`
  to it, then attends query `q_t` to every key so far; stepping through a
  sequence equals `linear_attention(..., is_causal=True)` with the same gates.

  Args:
    state: from `init_state(B, K, M, Hv)` or a previous step.
    q_t: `[B, N, H]` query of this step.
    k_t: `[B, K, H]` key of this step.
    v_t: `[B, K, Hv]` value of this step.
    feature_map: as in `linear_attention`.
    gates: optional log forget gates of this step (float, <= 0): `[K]`, `[B, K]`
      or `[B, K, M]`, as `linear_attention`'s gates at one time step.
    normalize: as in `linear_attention`.

  Returns:
    The new state and the output `[B, N, Hv]` in the input dtype.
  """
  family = "linear_attention_step"
  dims = check_step_inputs(q_t, k_t, v_t, family=family)
  fmap = feature_map_fn(feature_map)
  check_normalize(normalize, family=family)
  if gates is not None:
    gates = check_gates(gates, dims, feature_width(fmap, k_t), is_causal=True, mask=None, family=family, step=True)
  return _linear_attention_step(state, q_t, k_t, v_t, gates, fmap=fmap, dims=dims, normalize=normalize)


@functools.partial(jax.jit, static_argnames=("fmap", "dims", "normalize"))
def _linear_attention_step(state, q_t, k_t, v_t, gates, *, fmap, dims, normalize):
  phi_q = apply_feature_map(fmap, q_t.astype(jnp.float32), "q_t")
  phi_k = apply_feature_map(fmap, k_t.astype(jnp.float32), "k_t")
  check_state(state, dims, phi_k.shape[-1], family="linear_attention_step")
  if gates is not None:
    # One step of gates_per_step: [B, K, 1 | M]
    gates = gates_per_step(gates if gates.ndim == 1 else gates[:, None], dims)[:, 0].astype(jnp.float32)
  state, out = recurrent_update(state, phi_q, phi_k, v_t, state.stabiliser, gates=gates,
                                normalize=normalize == "denominator")
  return state, out.astype(q_t.dtype)


def linear_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    feature_map: str | Callable[[jax.Array], jax.Array] = "elu+1",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    gates: jax.Array | None = None,
    normalize: str = "denominator",
) -> jax.Array:
  """Dense reference in the inputs' precision (use float64 inputs under `jax.enable_x64`).

  Builds the whole `[B, N, T, S]` matrix `phi(q) phi(k)^T`; heads are repeated for GQA.
  With gates, each entry (t, s <= t) is weighted by `exp(G_t - G_s)` (per feature
  for `[B, T, K, M]` gates, `[B, N, T, S, M]` then), `G` the cumulative sum of the
  gates over time, masked steps' gates counting as 0.
  """
  fmap = feature_map_fn(feature_map)
  if gates is None and normalize == "denominator":
    return linear.kernel_attention_reference(
        fmap(q), fmap(k), v, is_causal=is_causal, mask=mask, segment_ids=segment_ids
    )
  family = "linear_attention_reference"
  check_normalize(normalize, family=family)
  dims = _checks.check_qkv(q, k, v)
  if gates is not None:
    gates = check_gates(gates, dims, feature_width(fmap, k), is_causal=is_causal, mask=mask, family=family)
    gates = gates_per_step(gates, dims).astype(q.dtype)
  return _gated_reference(fmap(q), fmap(k), v, gates, is_causal=is_causal, mask=mask, segment_ids=segment_ids,
                          normalize=normalize == "denominator")


# Pieces shared with FAVOR+ (efficient_attention/_favor.py).


def feature_map_fn(feature_map: Any) -> Callable[[jax.Array], jax.Array]:
  if isinstance(feature_map, str):
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"unknown {feature_map=}; valid: {', '.join(map(repr, FEATURE_MAPS))} or a callable")
    return FEATURE_MAPS[feature_map]
  if not callable(feature_map):
    raise TypeError(f"feature_map must be a name or a callable, got {feature_map!r}")
  return feature_map


def apply_feature_map(fmap: Callable[[jax.Array], jax.Array], x: jax.Array, name: str) -> jax.Array:
  """`[..., H] -> [..., M]` in the dtype of x, checked to keep the leading axes."""
  phi = fmap(x)
  if not hasattr(phi, "shape") or phi.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f"feature_map must map [..., H] -> [..., M]; {name}.shape={x.shape} gave {getattr(phi, 'shape', phi)}"
    )
  if not jnp.issubdtype(phi.dtype, jnp.floating):
    raise TypeError(f"feature_map must return floating point, got {phi.dtype} for {name}")
  return phi.astype(x.dtype)


# Steps per chunk of the XLA chunked form when chunk_size is None.
XLA_CHUNK_SIZE = 64
# The same with per-feature gates, whose decay within a chunk is a [C, C, M] tensor.
XLA_FEATURE_GATES_CHUNK_SIZE = 16


def feature_width(fmap: Callable[[jax.Array], jax.Array], k: jax.Array) -> int:
  """M, the width of `fmap(k)` (traced abstractly, nothing computed)."""
  x = jax.ShapeDtypeStruct(k.shape, jnp.promote_types(k.dtype, jnp.float32))
  return jax.eval_shape(lambda x: apply_feature_map(fmap, x, "k"), x).shape[-1]


def check_normalize(normalize: Any, *, family: str) -> None:
  if not isinstance(normalize, str) or normalize not in NORMALIZE:
    raise ValueError(f"{family}: unknown {normalize=}; valid: {', '.join(map(repr, NORMALIZE))}")


def check_gates(gates: Any, dims: _checks.Dims, num_features: int, *, is_causal: bool, mask: jax.Array | None,
                family: str, step: bool = False) -> jax.Array:
  """Checks log forget gates (dtype, options, shape and, when concrete, values); returns them as an array.

  Shapes: `[K]`, `[B, T, K]` or `[B, T, K, M]`; for one decoding step (`step`),
  `[K]`, `[B, K]` or `[B, K, M]`.
  """
  if not hasattr(gates, "dtype") or not jnp.issubdtype(gates.dtype, jnp.floating):
    raise TypeError(f"{family}: gates must be a floating-point array (log forget gates), "
                    f"got dtype={getattr(gates, 'dtype', type(gates).__name__)}")
  if not is_causal:
    raise ValueError(f"{family}: gates decay a causal state and need is_causal=True, got {is_causal=}")
  if mask is not None and mask.shape[2] != 1:
    raise ValueError(f"{family}: gates honour key-padding masks [B|1, N|1, 1, S] (and segment_ids), got "
                     f"{mask.shape=}")
  b, kh, m = dims.batch, dims.num_kv_heads, num_features
  if step:
    shapes = {"[K]": (kh,), "[B, K]": (b, kh), "[B, K, M]": (b, kh, m)}
  else:
    t = dims.kv_len
    shapes = {"[K]": (kh,), "[B, T, K]": (b, t, kh), "[B, T, K, M]": (b, t, kh, m)}
  if tuple(gates.shape) not in shapes.values():
    valid = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
    raise ValueError(f"{family}: gates must have shape {valid} (indexed by the key/value heads, M = the "
                     f"feature map's width), got gates.shape={tuple(gates.shape)}")
  if not isinstance(gates, jax.core.Tracer) and gates.size:
    values = np.asarray(gates, np.float64)
    finite = np.isfinite(values)
    if not finite.all() or values.max() > 0:
      raise ValueError(f"{family}: gates are log forget gates and must be finite and <= 0, got "
                       f"max(gates)={values.max()} ({int(np.sum(~finite))} non-finite)")
  return jnp.asarray(gates)


def gates_per_step(gates: jax.Array, dims: _checks.Dims) -> jax.Array:
  """Checked gates `[K]`, `[B, T, K]` or `[B, T, K, M]` -> `[B, T, K, 1 | M]`."""
  if gates.ndim == 1:
    return jnp.broadcast_to(gates[None, None, :, None], (dims.batch, dims.q_len, dims.num_kv_heads, 1))
  return gates[..., None] if gates.ndim == 3 else gates


def check_chunk_size(chunk_size: Any) -> int | None:
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be None or a positive int (it is static), got {chunk_size=}")
  return chunk_size


def check_step_inputs(q_t: Any, k_t: Any, v_t: Any, *, family: str) -> _checks.Dims:
  """Checks q_t `[B, N, H]`, k_t `[B, K, H]`, v_t `[B, K, Hv]` of one decoding step."""
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if hasattr(x, "ndim") and x.ndim != 3:
      raise ValueError(f"{family}: {name} must have rank 3 [B, heads, dim] (one step), got {name}.shape={x.shape}")
  return _checks.check_qkv(*(x if not hasattr(x, "ndim") else x[:, None] for x in (q_t, k_t, v_t)))


def check_state(state: Any, dims: _checks.Dims, num_features: int, *, family: str) -> None:
  want = LinearState(
      kv=(dims.batch, dims.num_kv_heads, num_features, dims.v_head_dim),
      z=(dims.batch, dims.num_kv_heads, num_features),
      stabiliser=(dims.batch, dims.num_kv_heads),
  )
  if not isinstance(state, LinearState):
    raise TypeError(f"{family}: state must be a LinearState from init_state, got {type(state).__name__}")
  for name, shape in want._asdict().items():
    got = getattr(state, name)
    if got.shape != shape or got.dtype != jnp.float32:
      raise ValueError(
          f"{family}: state.{name} is {got.dtype}{list(got.shape)}, expected float32{list(shape)} "
          f"for [B, K, M, Hv]=({dims.batch}, {dims.num_kv_heads}, {num_features}, {dims.v_head_dim})"
      )


class MaskPlan(NamedTuple):
  """How `mask` / `segment_ids` / `is_causal` reach the linear core."""

  keys: jax.Array | None  # bool [B|1, N|1, S]: key-padding mask, removed from the feature sums
  dense: jax.Array | None  # bool [B|1, N|1, T, S]: every rule combined, for the quadratic form
  ids: jax.Array | None  # int [B, T]: segment ids, for the chunked form


def plan_masks(mask: jax.Array | None, ids: jax.Array | None, is_causal: bool, dims: _checks.Dims) -> MaskPlan:
  """Splits the options into a key-padding mask (linear cost) or a dense mask (quadratic).

  Positions no query attends never start or end a run of segment ids (their ids may be anything).
  """
  if ids is not None:
    ids = carry_ids_over_masked(ids, mask)
  if mask is not None and mask.shape[2] != 1:
    runs = None if ids is None else run_labels(ids)
    dense = dense_mask(
        dims.q_len, dims.kv_len, is_causal=is_causal, mask=mask,
        segment_ids=None if runs is None else (runs, runs),
    )
    return MaskPlan(keys=None, dense=dense, ids=None)
  keys = None if mask is None else jnp.broadcast_to(mask[:, :, 0, :], mask.shape[:2] + (dims.kv_len,))
  return MaskPlan(keys=keys, dense=None, ids=ids)


def live_keys(plan: MaskPlan, dims: _checks.Dims) -> jax.Array | None:
  """bool `[B|1, S, K|1]`: keys some query head of the group attends (None: all of them)."""
  # [B|1, N|1, S]
  live = plan.keys if plan.dense is None else jnp.any(plan.dense, axis=2)
  if live is None:
    return None
  if live.shape[1] != 1:
    live = jnp.any(live.reshape(live.shape[0], dims.num_kv_heads, dims.group, dims.kv_len), axis=2)
  return live.transpose(0, 2, 1)


def attend(
    phi_q: jax.Array,
    phi_k: jax.Array,
    v: jax.Array,
    plan: MaskPlan,
    *,
    is_causal: bool,
    chunk_size: int,
    dims: _checks.Dims,
    gates: jax.Array | None = None,
    normalize: str = "denominator",
) -> jax.Array:
  """The shared core: `[B, T, N, Hv]` from `phi_q [B, T, N, M]`, `phi_k [B, S, K, M]`, v `[B, S, K, Hv]`.

  Computes in the features' dtype (float32 or float64). `gates`: log forget
  gates `[B, T, K, 1 | M]` (causal, no dense mask), in that dtype.
  """
  b, t, n, m = phi_q.shape
  kh, g = dims.num_kv_heads, dims.group
  v = v.astype(phi_q.dtype)
  finish = _normalise if normalize == "denominator" else (lambda out: out)
  v1 = v
  if normalize == "denominator":
    # [B, S, K, Hv + 1]: a column of ones carries the denominator sum_s phi(k_s) along the numerator.
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), v.dtype)], axis=-1)
  if plan.dense is not None:
    live = split_heads(plan.dense, dims.num_kv_heads, dims.group)
    out = _quadratic(phi_q.reshape(b, t, kh, g, m), phi_k, v1, live)
    return finish(out).reshape(b, t, n, dims.v_head_dim)
  if plan.keys is not None and plan.keys.shape[1] != 1 and g > 1:
    # Key sets differ within a GQA group: give each query head its own key features (and gates).
    expand = [phi_k, v1] + ([] if gates is None else [gates])
    expand = (jnp.broadcast_to(x[:, :, :, None], x.shape[:3] + (g,) + x.shape[3:]) for x in expand)
    phi_k, v1, *rest = (x.reshape(x.shape[:2] + (n,) + x.shape[4:]) for x in expand)
    gates = rest[0] if rest else None
    kh, g = n, 1
  phi_q = phi_q.reshape(b, t, kh, g, m)
  if plan.keys is not None:
    # [B|1, S, K|1, 1]
    live_keys = plan.keys.transpose(0, 2, 1)[..., None]
    phi_k = jnp.where(live_keys, phi_k, 0.0)
    if gates is not None:
      # A masked step is the identity: it adds no key and does not decay the state.
      gates = jnp.where(live_keys, gates, 0.0)
  if gates is not None:
    starts = segment_starts(jnp.zeros((1, t), jnp.int32) if plan.ids is None else plan.ids)
    out = _chunked(phi_q, phi_k, v1, starts, chunk_size=chunk_size, diagonal=True, gates=gates)
  elif plan.ids is not None:
    out = _chunked(phi_q, phi_k, v1, segment_starts(plan.ids), chunk_size=chunk_size, diagonal=True)
    if not is_causal:
      # All keys of the run = keys up to t (inclusive) + keys after t: the same
      # causal form over the reversed sequence, without the diagonal.
      flip = functools.partial(jnp.flip, axis=1)
      after = _chunked(
          flip(phi_q), flip(phi_k), flip(v1), segment_starts(flip(plan.ids)), chunk_size=chunk_size, diagonal=False
      )
      out = out + flip(after)
  elif is_causal:
    starts = segment_starts(jnp.zeros((1, t), jnp.int32))
    out = _chunked(phi_q, phi_k, v1, starts, chunk_size=chunk_size, diagonal=True)
  else:
    # [B, K, M, Hv + 1]
    kv = jnp.einsum("bskm,bskh->bkmh", phi_k, v1)
    # [B, T, K, G, Hv + 1]
    out = jnp.einsum("btkgm,bkmh->btkgh", phi_q, kv)
  return finish(out).reshape(b, t, n, dims.v_head_dim)


def check_pallas_options(dtype: Any, mask: jax.Array | None, is_causal: bool, chunk_size: int | None, *,
                         family: str) -> None:
  """Raises for options `implementation="pallas"` (the chunked causal kernel) cannot honour."""
  if not is_causal:
    raise ValueError(
        f"{family}: implementation='pallas' is the chunked causal kernel, got {is_causal=}; "
        "use implementation='xla' for non-causal attention"
    )
  if mask is not None and mask.shape[2] != 1:
    raise ValueError(
        f"{family}: implementation='pallas' honours key-padding masks [B|1, N|1, 1, S] (and is_causal, "
        f"segment_ids), got {mask.shape=}; use implementation='xla' for masks with a T axis"
    )
  if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
    raise ValueError(f"{family}: implementation='pallas' needs a power-of-two chunk_size >= 16, got {chunk_size=}")
  if dtype == jnp.float64:
    raise TypeError(f"{family}: implementation='pallas' computes in float32 at most, got {dtype=}")


def attend_pallas(
    phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, plan: MaskPlan, *, chunk_size: int | None, dims: _checks.Dims,
    dtype: Any
) -> jax.Array:
  """The causal core through the Pallas kernel: `[B, T, N, Hv]` in `dtype`.

  Features are cast to `dtype` (the kernel multiplies in the input dtype and sums
  in float32); key-padding masks zero the masked keys' features.
  """
  if plan.keys is not None:
    if plan.keys.shape[1] != 1 and dims.group > 1:
      # Key sets differ within a GQA group: give each query head its own keys.
      phi_k, v = (jnp.repeat(x, dims.group, axis=2) for x in (phi_k, v))
    # [B|1, S, K|1, 1]
    phi_k = jnp.where(plan.keys.transpose(0, 2, 1)[..., None], phi_k, 0.0)
  blocks = linear.LinearBlockSizes(chunk=chunk_size)
  return linear.causal_linear_attention(
      phi_q.astype(dtype), phi_k.astype(dtype), v.astype(dtype), segment_ids=plan.ids, block_sizes=blocks
  )


def attend_gated_pallas(
    phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, gates: jax.Array, plan: MaskPlan, *, chunk_size: int | None,
    dims: _checks.Dims, dtype: Any, normalize: str
) -> jax.Array:
  """The gated causal core through the Pallas kernels (`pallas.gated`): `[B, T, N, Hv]` in `dtype`.

  `gates`: log gates `[B, T, K, 1 | M]`, one per step and head (the kernels' scalar
  gates) or per step, head and feature. Key-padding masks zero the masked keys'
  features and gates (a masked step is the identity on the state). With
  normalize="denominator" a column of ones rides along the values and carries
  the denominator (the value width is padded to the next power of two); with
  per-feature gates its row m decays with feature m, as the denominator's sum does.
  """
  if gates.shape[-1] == 1:
    gates = gates[..., 0]
  if plan.keys is not None:
    if plan.keys.shape[1] != 1 and dims.group > 1:
      # Key sets differ within a GQA group: give each query head its own keys (and state).
      phi_k, v, gates = (jnp.repeat(x, dims.group, axis=2) for x in (phi_k, v, gates))
    # [B|1, S, K|1, 1]
    live = plan.keys.transpose(0, 2, 1)[..., None]
    phi_k = jnp.where(live, phi_k, 0.0)
    gates = jnp.where(live if gates.ndim == 4 else live[..., 0], gates, 0.0)
  if normalize == "denominator":
    v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), v.dtype)], axis=-1)
  compute = jnp.float32 if normalize == "denominator" else dtype
  blocks = gated.GatedBlockSizes.get_default(compute, chunk_size, scalar_gates=gates.ndim < 4)
  out = gated.gated_linear_attention(phi_q.astype(compute), phi_k.astype(compute), v.astype(compute), gates,
                                     segment_ids=plan.ids, block_sizes=blocks)
  if normalize == "denominator":
    out = out.astype(jnp.float32)
    out = safe_divide(out[..., :-1], out[..., -1:])
  return out.astype(dtype)


def recurrent_update(
    state: LinearState, phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, stabiliser: jax.Array, *,
    gates: jax.Array | None = None, normalize: bool = True,
) -> tuple[LinearState, jax.Array]:
  """Adds one key to the state and attends one query: float32 output `[B, N, Hv]`.

  `phi_q [B, N, M]`; `phi_k [B, K, M]` are the key features divided by
  `exp(stabiliser [B, K])`, with `stabiliser >= state.stabiliser`. `gates`:
  log forget gates `[B, K, 1 | M]` decaying the carried sums first.
  `normalize=False` returns the numerator alone.
  """
  # Bring the carried sums to the new stabiliser, as online softmax rescales its
  # running sum (Milakov & Gimelshein 2018, sec. 3); an equal stabiliser (also
  # -inf == -inf before the first key) leaves them unchanged.
  same = stabiliser == state.stabiliser
  decay = jnp.exp(jnp.where(same, 0.0, state.stabiliser - stabiliser))
  if gates is None:
    decay_kv, decay_z = decay[..., None, None], decay[..., None]
  else:
    # [B, K, 1 | M]: row m of the state decays by exp(gates[..., m]).
    decay_z = decay[..., None] * jnp.exp(gates)
    decay_kv = decay_z[..., None]
  # [B, K, M, Hv]
  kv = state.kv * decay_kv + jnp.einsum("bkm,bkh->bkmh", phi_k, v.astype(state.kv.dtype))
  z = state.z * decay_z + phi_k
  b, n, m = phi_q.shape
  kh = kv.shape[1]
  # [B, K, G, M]
  qg = phi_q.reshape(b, kh, n // kh, m)
  num = jnp.einsum("bkgm,bkmh->bkgh", qg, kv)
  if normalize:
    den = jnp.einsum("bkgm,bkm->bkg", qg, z)[..., None]
    num = safe_divide(num, den)
  out = num.reshape(b, n, kv.shape[-1])
  return LinearState(kv=kv, z=z, stabiliser=stabiliser), out


def _normalise(out: jax.Array) -> jax.Array:
  """`[..., Hv + 1]` numerator and denominator -> `[..., Hv]`."""
  return safe_divide(out[..., :-1], out[..., -1:])


def _quadratic(phi_q: jax.Array, phi_k: jax.Array, v1: jax.Array, live: jax.Array) -> jax.Array:
  """Masked quadratic form: `[B, T, K, G, Hv + 1]` from `live [B|1, K|1, G|1, T, S]`."""
  # [B, K, G, T, S]
  scores = jnp.einsum("btkgm,bskm->bkgts", phi_q, phi_k)
  scores = jnp.where(live, scores, 0.0)
  # [B, T, K, G, Hv + 1]
  return jnp.einsum("bkgts,bskh->btkgh", scores, v1)


def _chunked(
    phi_q: jax.Array, phi_k: jax.Array, v1: jax.Array, starts: jax.Array, *, chunk_size: int, diagonal: bool,
    gates: jax.Array | None = None,
) -> jax.Array:
  """Causal sums within runs, chunk by chunk: `[B, T, K, G, Hv + 1]`.

  With `gates` (log forget gates `[B, T, K, 1 | M]`, masked steps already 0) the
  sums decay (GLA, Yang et al. 2024, sec. 4): `G` = cumulative gates from the
  chunk start, inclusive; key d reaches query c >= d of its chunk with weight
  `exp(G_c - G_d)`, the state entering the chunk reaches query c with `exp(G_c)`,
  key d reaches the chunk's end with `exp(G_C - G_d)` and the state passes a whole
  chunk with `exp(G_C)`. Every exponent is a sum of gates, so <= 0: nothing
  overflows however strong the decay (underflow to 0 is the true value rounded).

  Args:
    phi_q: `[B, T, K, G, M]` query features.
    phi_k: `[B, T, K, M]` key features (masked keys already zeroed).
    v1: `[B, T, K, Hv + 1]` values with the column of ones.
    starts: bool `[B|1, T]`, True where a run of equal segment ids begins
      (always at t = 0); sums restart there.
    chunk_size: steps per chunk; T is zero-padded to a multiple.
    diagonal: whether query t attends key t.
    gates: optional log forget gates `[B, T, K, 1 | M]`.
  """
  b, t, kh, g, m = phi_q.shape
  if t == 0:
    return jnp.zeros((b, 0, kh, g, v1.shape[-1]), v1.dtype)
  c = min(chunk_size, t)
  u = -(-t // c)

  def chunks(x):
    """`[B, T, ...]` -> `[B, U, C, ...]`, zero-padded at the end."""
    x = jnp.pad(x, [(0, 0), (0, u * c - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], u, c, *x.shape[2:])

  qc, kc, vc = chunks(phi_q), chunks(phi_k), chunks(v1)
  # [B|1, U, C]: run starts so far within the chunk; equal counts = same run.
  local = jnp.cumsum(chunks(starts).astype(jnp.int32), axis=2)

  pos = jnp.arange(c)
  order = pos[:, None] >= pos[None, :] if diagonal else pos[:, None] > pos[None, :]
  # [B|1, U, C, D]
  intra = jnp.logical_and(local[..., :, None] == local[..., None, :], order[None, None])
  if gates is None:
    # [B, U, K, G, C, D]
    scores = jnp.einsum("buckgm,budkm->bukgcd", qc, kc)
  else:
    # [B, U, C, K, 1 | M]: cumulative log decay from the chunk start, inclusive.
    cum = jnp.cumsum(chunks(gates), axis=2)
    # [B, U, C, D, K, 1 | M]: G_c - G_d <= 0 where d <= c; the rest (> 0) is replaced before exp.
    below = (pos[:, None] >= pos[None, :])[None, None, :, :, None, None]
    decay = jnp.exp(jnp.where(below, cum[:, :, :, None] - cum[:, :, None, :], 0.0))
    if gates.shape[-1] == 1:
      # [B, U, K, G, C, D]
      scores = jnp.einsum("buckgm,budkm->bukgcd", qc, kc) * decay[..., 0].transpose(0, 1, 4, 2, 3)[:, :, :, None]
    else:
      # [B, U, K, G, C, D]: per-feature decay inside the feature sum.
      scores = jnp.einsum("buckgm,budkm,bucdkm->bukgcd", qc, kc, decay)
  scores = jnp.where(intra[:, :, None, None], scores, 0.0)
  # [B, U, C, K, G, Hv + 1]
  out = jnp.einsum("bukgcd,budkh->buckgh", scores, vc)

  # [B|1, U, 1]: run starts in the whole chunk.
  last = local[:, :, -1:]
  if gates is not None:
    # [B, U, 1, K, 1 | M]: the chunk's total log decay.
    total = cum[:, :, -1:]
    # Keys decay from their step to the chunk's end; queries see the entering state decayed up to them.
    kc = kc * jnp.exp(total - cum)
    qc = qc * jnp.exp(cum)[:, :, :, :, None]
  # Keys after the chunk's last run start are carried to later chunks.
  # [B, U, K, M, Hv + 1]
  chunk_kv = jnp.einsum("buckm,buckh->bukmh", jnp.where((local == last)[..., None, None], kc, 0.0), vc)
  # A chunk containing a run start drops the state carried into it.
  keep = jnp.broadcast_to((last == 0).astype(chunk_kv.dtype)[..., None, None], (b, u, 1, 1, 1))
  if gates is not None:
    # [B, U, K, 1 | M, 1]: and the state passes a whole chunk decayed by its total.
    keep = keep * jnp.exp(total[:, :, 0])[..., None]
  # Linear recurrence state_u = keep_u * state_{u-1} + chunk_kv_u as an associative
  # scan over (keep, chunk_kv) pairs (Blelloch 1990, "Prefix sums and their applications").
  _, state = jax.lax.associative_scan(
      lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), (keep, chunk_kv), axis=1
  )
  # State entering chunk u: [B, U, K, M, Hv + 1]
  state = jnp.concatenate([jnp.zeros_like(state[:, :1]), state[:, :-1]], axis=1)
  # Queries before the first run start in their chunk see the carried state.
  sees = (local == 0)[..., None, None, None]
  # [B, U, C, K, G, Hv + 1]
  out = out + jnp.einsum("buckgm,bukmh->buckgh", jnp.where(sees, qc, 0.0), state)
  return out.reshape(b, u * c, kh, g, -1)[:, :t]


def _gated_reference(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, gates: jax.Array | None, *, is_causal: bool,
                     mask: jax.Array | None, segment_ids: jax.Array | None, normalize: bool) -> jax.Array:
  """Dense `[B, T, N, Hv]` with decay `exp(G_t - G_s)` (gates `[B, T, K, 1 | M]` or None), per query head."""
  n, kh = phi_q.shape[2], phi_k.shape[2]
  phi_k, v = (jnp.repeat(x, n // kh, axis=2) for x in (phi_k, v))
  t, s = phi_q.shape[1], phi_k.shape[1]
  runs = attended_runs(segment_ids, mask)
  live = dense_mask(t, s, is_causal=is_causal, mask=mask, segment_ids=None if runs is None else (runs, runs))
  if gates is None:
    scores = jnp.einsum("btnm,bsnm->bnts", phi_q, phi_k)
  else:
    gates = jnp.repeat(gates, n // kh, axis=2)
    if mask is not None:
      # A masked step is the identity: its gate counts as 0. [B|1, S, N|1, 1]
      gates = jnp.where(mask[:, :, 0, :].transpose(0, 2, 1)[..., None], gates, 0.0)
    # [B, T, N, 1 | M]
    cum = jnp.cumsum(gates, axis=1)
    below = jnp.tril(jnp.ones((t, s), bool))[None, :, :, None, None]
    # [B, T, S, N, 1 | M]
    decay = jnp.exp(jnp.where(below, cum[:, :, None] - cum[:, None, :], 0.0))
    scores = jnp.einsum("btnm,bsnm,btsnm->bnts", phi_q, phi_k, jnp.broadcast_to(decay, decay.shape[:4] + (
        phi_q.shape[-1],)))
  if live is not None:
    scores = jnp.where(live, scores, 0.0)
  num = jnp.einsum("bnts,bsnh->btnh", scores, v)
  if not normalize:
    return num
  den = jnp.sum(scores, axis=-1).transpose(0, 2, 1)[..., None]
  return safe_divide(num, den)
