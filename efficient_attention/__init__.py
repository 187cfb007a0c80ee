"""efficient-attention: exact, FAVOR+, linear, delta rule, Linformer, block-sparse and LSH attention for JAX.

Every function takes `[B, T, N, H]` queries/keys/values (LSH: a shared `qk` and
values) and the same keyword options (`is_causal`, `mask`, `segment_ids`, `scale`,
`implementation`). The
Flax nnx modules project `[B, T, D]` inputs and call them; `efficient_attention.lm`
holds a small decoder-only language model built from them.
"""

from efficient_attention import _layouts as layouts
from efficient_attention._block_sparse import block_sparse_attention, block_sparse_attention_reference
from efficient_attention._delta import (
    DeltaRuleState,
    delta_rule_attention,
    delta_rule_step,
    init_delta_rule_state,
)
from efficient_attention._favor import (
    favor_attention,
    favor_attention_reference,
    favor_attention_step,
    orthogonal_random_features,
    redraw,
)
from efficient_attention._layouts import BlockLayout, layout_mask
from efficient_attention._linear import (
    LinearState,
    init_state,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)
from efficient_attention._linformer import linformer_attention, linformer_attention_reference
from efficient_attention._lsh import lsh_attention, lsh_attention_reference, lsh_buckets, lsh_rotations
from efficient_attention._module_base import AttentionModule
from efficient_attention._modules import (
    ATTENTION_FAMILIES,
    BlockSparseAttention,
    DeltaRuleAttention,
    FavorAttention,
    GatedLinearAttention,
    LinearAttention,
    LinformerAttention,
    LocalAttention,
    LSHAttention,
    MultiHeadAttention,
    RandomFeatures,
    SoftmaxAttention,
    attention_options,
)
from efficient_attention._rope import apply_rope
from efficient_attention._softmax import softmax_attention, softmax_attention_reference

__all__ = [
    "ATTENTION_FAMILIES",
    "AttentionModule",
    "BlockLayout",
    "BlockSparseAttention",
    "DeltaRuleAttention",
    "DeltaRuleState",
    "FavorAttention",
    "GatedLinearAttention",
    "LinearAttention",
    "LinearState",
    "LSHAttention",
    "LinformerAttention",
    "LocalAttention",
    "MultiHeadAttention",
    "RandomFeatures",
    "SoftmaxAttention",
    "apply_rope",
    "attention_options",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "delta_rule_attention",
    "delta_rule_step",
    "favor_attention",
    "favor_attention_reference",
    "favor_attention_step",
    "init_delta_rule_state",
    "init_state",
    "layout_mask",
    "layouts",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "linformer_attention",
    "linformer_attention_reference",
    "lsh_attention",
    "lsh_attention_reference",
    "lsh_buckets",
    "lsh_rotations",
    "orthogonal_random_features",
    "redraw",
    "softmax_attention",
    "softmax_attention_reference",
]
