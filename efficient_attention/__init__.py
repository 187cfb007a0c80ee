"""efficient-attention: exact, FAVOR+, linear, Linformer and block-sparse attention for JAX.

Every function takes `[B, T, N, H]` queries/keys/values and the same keyword
options (`is_causal`, `mask`, `segment_ids`, `scale`, `implementation`).
"""

from efficient_attention import _layouts as layouts
from efficient_attention._block_sparse import block_sparse_attention, block_sparse_attention_reference
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
from efficient_attention._softmax import softmax_attention, softmax_attention_reference

__all__ = [
    "BlockLayout",
    "LinearState",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "favor_attention",
    "favor_attention_reference",
    "favor_attention_step",
    "init_state",
    "layout_mask",
    "layouts",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "linformer_attention",
    "linformer_attention_reference",
    "orthogonal_random_features",
    "redraw",
    "softmax_attention",
    "softmax_attention_reference",
]
