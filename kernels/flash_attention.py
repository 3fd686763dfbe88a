"""Attention: the textbook version (the reference) and, beside it, our Triton flash-attention.

Shapes throughout: q, k, v are (batch, heads, time, head_dim).
"""

import math

import torch


def naive_attention(q, k, v, causal=True, doc_ids=None, sm_scale=None):
    """Attention with the T×T score matrix materialised (seed 1.4, "causal masking").

        S = Q·Kᵀ · sm_scale            (sm_scale defaults to 1/√d)
        S[i, j] = −∞  where j > i       (causal: the upper triangle is masked)
        S[i, j] = −∞  where doc[i] ≠ doc[j]   (packed sequences: stay in your document)
        P = softmax(S) row-wise,  O = P·V

    Memory is O(T²) per head — exactly what flash-attention avoids.
    """
    T, D = q.shape[-2], q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * sm_scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(q.shape[0], 1, T, T)
    if doc_ids is not None:
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        allowed = allowed & same_doc
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
