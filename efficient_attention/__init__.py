"""efficient-attention: exact, FAVOR+, linear, Linformer and block-sparse attention for JAX.

Every function takes `[B, T, N, H]` queries/keys/values and the same keyword
options (`is_causal`, `mask`, `segment_ids`, `scale`, `implementation`).
"""

from efficient_attention._softmax import softmax_attention, softmax_attention_reference

__all__ = [
    "softmax_attention",
    "softmax_attention_reference",
]
