"""Attention: the textbook version (the reference) and, beside it, our Triton flash-attention.

Shapes throughout: q is (batch, heads, time, head_dim); k and v are (batch, kv_heads, time, head_dim)
with kv_heads dividing heads (kv_heads < heads is grouped-query attention: query head h reads K/V head
h // (heads / kv_heads)). doc_ids, when given, is an integer (batch, time) tensor of document ids.

This implements seed section 1.7, "FlashAttention": work on tiles small enough for fast on-chip memory,
and never write the T×T attention matrix out to GPU memory. Here is how, in the notation used below (one
batch element and one head; T tokens; d = head_dim; s = sm_scale, 1/√d by default):

    S = s · Q Kᵀ          (T × T scores)
    P = softmax(S)        row-wise, after masking: S[i, j] = −∞ where query i may not see key j
    O = P V               (T × d)

The textbook version (`naive_attention`) writes S and P to GPU memory (HBM): O(T²) bytes per head, read and
written several times. Flash-attention never forms S or P in HBM:

  1. Tiles. The queries are cut into tiles of BLOCK_M rows and the keys/values into tiles of BLOCK_N rows.
     One Triton program owns one query tile: it loads Q_tile once into on-chip memory (registers/SRAM) and
     streams the K/V tiles past it. Each S tile (BLOCK_M × BLOCK_N) lives only on chip.
  2. Online softmax. A row's softmax needs the max and the sum over *all* its keys, but we see the keys one
     tile at a time. So we keep, per query row, a running max m, a running sum ℓ = Σ exp(S − m) and an
     unnormalised output acc = Σ exp(S − m) V. When a new tile raises the max from m to m', everything
     accumulated so far is rescaled by α = exp(m − m'). After the last tile O = acc / ℓ: the exact softmax.
  3. The log-sum-exp. The forward pass saves one number per row, L = m + log ℓ = log Σ_j exp(S_ij), so that
     the backward pass can rebuild any tile of P in one step: P_ij = exp(S_ij − L_i).
  4. Recomputation. The backward pass recomputes S and P tile by tile from Q, K and L (cheap: FLOPs are
     plentiful, memory traffic is not) instead of storing the T × T matrix P from the forward pass.

The backward pass, with dO = ∂loss/∂O given, is (derived in `flash_attention_backward`'s docstring):

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − Δ) with Δ_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O)_i,
    dQ = s · dS K,   dK = s · dSᵀ Q.

It runs as three kernels: a preprocess that computes Δ; a dK/dV pass (one program per key tile, streaming
query tiles: dK and dV of its tile are complete when it ends); a dQ pass (one program per query tile,
streaming key tiles). Each output element has exactly one writer, so no atomic adds are needed.

Masks skip work, not only zero it: a tile that is masked entirely is never loaded (causal: the loop over key
tiles stops at the diagonal; documents: the loop covers only the keys of the documents in the query tile),
and a tile that is fully visible is processed without computing a mask at all.

Public API:
    flash_attention(q, k, v, causal=True, doc_ids=None, sm_scale=None)             -> o  (autograd)
    flash_attention_forward(q, k, v, causal=True, doc_ids=None, sm_scale=None)     -> (o, lse)
    flash_attention_backward(do, q, k, v, o, lse, causal=True, doc_ids=None, sm_scale=None) -> (dq, dk, dv)
    naive_attention(q, k, v, causal=True, doc_ids=None, sm_scale=None, return_lse=False)
    attention(q, k, v, causal=True, doc_ids=None, sm_scale=None)  flash on CUDA tensors, naive elsewhere
The flash functions also take block_m= and block_n= (keyword only) to force a tile size.
"""

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether @triton.jit kernels run compiled or in its CPU interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Debug aid for tests: when True, every tensor the kernels are meant to fill starts as NaN, so an element
# that no program wrote (an off-by-one tile bound, a forgotten mask) shows up instead of hiding as zero.
POISON_OUTPUTS = False

# The kernels work with powers of two: exp(x) = 2^(x · log₂e), and exp2 is the cheaper instruction.
LOG2_E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN_2: tl.constexpr = tl.constexpr(0.6931471805599453)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # one tile holds a whole head; 16 … 128 are the sizes we test and benchmark


# ----------------------------------------------------------------------------------------------------------
# The reference: attention with the T×T matrix materialised
# ----------------------------------------------------------------------------------------------------------

def reference_attention_mask(T, causal=True, doc_ids=None, device=None):
    """Boolean mask, (1 or batch, 1, T, T): allowed[b, 0, i, j] is True when query i may attend to key j.

        causal:   j ≤ i                       (no peeking at later tokens)
        doc_ids:  doc[b, i] = doc[b, j]       (packed sequences: stay in your own document)
    """
    allowed = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return allowed


# classroom: begin naive_attention
def naive_attention(q, k, v, causal=True, doc_ids=None, sm_scale=None, return_lse=False):
    """Attention with the T×T score matrix materialised (seed 1.4, "causal masking").

        S = Q·Kᵀ · sm_scale            (sm_scale defaults to 1/√d)
        S[i, j] = −∞  where j > i       (causal: the upper triangle is masked)
        S[i, j] = −∞  where doc[i] ≠ doc[j]   (packed sequences: stay in your document)
        P = softmax(S) row-wise,  O = P·V

    Fewer K/V heads than query heads (grouped-query attention) are repeated to match: query head h uses
    K/V head h // (heads / kv_heads). The softmax runs in at least fp32 (fp64 inputs stay fp64, so this is
    an exact reference in tests). With return_lse=True also returns L = logsumexp_j S[i, j], (batch, heads,
    time), in that precision. Memory is O(T²) per head — exactly what flash-attention avoids.
    """
    T, D = q.shape[-2], q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * sm_scale
    scores = scores.masked_fill(~reference_attention_mask(T, causal, doc_ids, q.device), float("-inf"))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    out = torch.softmax(scores, dim=-1).to(q.dtype) @ v
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)
    return out
# classroom: end naive_attention


# ----------------------------------------------------------------------------------------------------------
# Small device functions shared by the kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(base, rows, cols, row_stride, T, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Load the tile X[rows, cols] of a (T, HEAD_DIM) matrix. Rows past T and columns past HEAD_DIM (the
    tile is padded to a power of two) read as 0, so a ragged last tile is harmless. With UPCAST the tile is
    converted to fp32 (the CPU interpreter gets bf16 arithmetic wrong)."""
    mask = (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)
    tile = tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(base, tile, rows, cols, row_stride, T, HEAD_DIM: tl.constexpr):
    """Store a tile into X[rows, cols], skipping the padding rows and columns."""
    mask = (rows[:, None] < T) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * row_stride + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _is_allowed(q_rows, k_rows, doc_q, doc_k, T, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """May query q_rows[i] attend to key k_rows[j]? Both must be real tokens (< T); causal needs j ≤ i;
    document masking needs doc[i] = doc[j]. The arguments broadcast against each other: queries as a
    column (BLOCK_M, 1) and keys as a row (1, BLOCK_N) give the (BLOCK_M, BLOCK_N) tile of S; the other
    way round, its transpose (the dK/dV pass works on Sᵀ)."""
    allowed = (q_rows < T) & (k_rows < T)
    if CAUSAL:
        allowed = allowed & (k_rows <= q_rows)
    if HAS_DOCS:
        allowed = allowed & (doc_q == doc_k)
    return allowed


@triton.jit
def _split_tile_loop(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Tiles start at lo, lo + BLOCK, … and cover [lo, hi). The tile [t, t + BLOCK) needs no mask when it
    lies inside [full_lo, full_hi), the range every row on the other side sees in full. Returns
    (first_full, end_full): tiles in [first_full, end_full) run unmasked; those in [lo, first_full) and
    [end_full, hi) run masked. When no tile is fully visible, first_full = end_full = hi."""
    first_full = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK
    n_full = tl.maximum(full_hi - first_full, 0) // BLOCK
    end_full = tl.where(n_full > 0, first_full + n_full * BLOCK, hi)
    first_full = tl.where(n_full > 0, first_full, hi)
    return first_full, end_full


@triton.jit
def _key_tiles_for_query_tile(m0, T, DocStart, DocEnd, DocsSorted, batch,
                              CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which keys does the query tile [m0, m0 + BLOCK_M) need? Returns (lo, first_full, end_full, hi):
    keys outside [lo, hi) are masked for every row of the tile and are skipped; the tiles in
    [first_full, end_full) are visible to every row and need no mask."""
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1        # the last real query row of this tile
    lo = 0                                          # keys [lo, hi): seen by at least one row
    hi = T
    full_lo = 0                                     # keys [full_lo, full_hi): seen by every row
    full_hi = T
    if CAUSAL:
        hi = m_last + 1                             # nobody sees past the last query (the diagonal)
        full_hi = m0 + 1                            # everybody sees up to the first query
    if HAS_DOCS:
        # Documents are contiguous runs of tokens (ids non-decreasing along time), so the documents of
        # this tile span keys [start of doc(m0), end of doc(m_last)); only a key in the one document that
        # holds the whole tile is seen by every row. DocStart/DocEnd give each token's document bounds.
        row = DocStart + batch * T
        lo = tl.load(row + m0)
        full_lo = tl.load(row + m_last)
        row = DocEnd + batch * T
        hi = tl.minimum(hi, tl.load(row + m_last))
        full_hi = tl.minimum(full_hi, tl.load(row + m0))
        # Unsorted ids (not what packing produces): the host made [lo, hi) the whole sequence; here we
        # turn off the unmasked path, so every tile checks doc[i] = doc[j] and the result stays exact.
        full_hi = tl.where(tl.load(DocsSorted + batch) != 0, full_hi, full_lo)
    first_full, end_full = _split_tile_loop(lo, hi, full_lo, full_hi, BLOCK_N)
    return lo, first_full, end_full, hi


@triton.jit
def _query_tiles_for_key_tile(n0, T, DocStart, DocEnd, DocsSorted, batch,
                              CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The mirror image, for the dK/dV pass: which queries see the key tile [n0, n0 + BLOCK_N)?
    Returns (lo, first_full, end_full, hi) over query positions, as above."""
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1        # the last real key of this tile
    lo = 0                                          # queries [lo, hi): see at least one key of the tile
    hi = T
    full_lo = 0                                     # queries [full_lo, full_hi): see every key of it
    full_hi = T
    if CAUSAL:
        lo = n0                                     # queries before the tile see none of it
        full_lo = n0 + BLOCK_N - 1                  # queries at or after its last key see all of it
    if HAS_DOCS:
        row = DocStart + batch * T
        lo = tl.maximum(lo, tl.load(row + n0))
        full_lo = tl.maximum(full_lo, tl.load(row + n_last))
        row = DocEnd + batch * T
        hi = tl.load(row + n_last)
        full_hi = tl.minimum(full_hi, tl.load(row + n0))
        full_hi = tl.where(tl.load(DocsSorted + batch) != 0, full_hi, full_lo)
    # A key tile that hangs over the end of the sequence has padding keys: keep it on the masked path.
    full_hi = tl.where(n0 + BLOCK_N <= T, full_hi, full_lo)
    first_full, end_full = _split_tile_loop(lo, hi, full_lo, full_hi, BLOCK_M)
    return lo, first_full, end_full, hi


# ----------------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------------

# classroom: begin forward_over_key_tiles
@triton.jit
def _forward_over_key_tiles(acc, m_i, l_i, q, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt,
                            Doc_row, start, end, T, qk_scale,
                            CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, APPLY_MASK: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Stream the key/value tiles starting at start, start + BLOCK_N, … < end past the query tile q,
    updating the online-softmax state (acc, m_i, l_i); returns the new (acc, m_i, l_i).

    Scores are kept in base 2: qk_scale = sm_scale · log₂e, so S₂ = (q Kᵀ) · qk_scale = S · log₂e. Per tile
    n0 (rows k_rows = n0 + arange(BLOCK_N), loaded with `_load_rows`; doc ids of the keys from Doc_row):

        S₂ = q Kᵀ · qk_scale,  and −∞ where `_is_allowed` says no   (only when APPLY_MASK)
        m' = max(m, rowmax S₂),   α = 2^(m − m'),   P = 2^(S₂ − m')
        ℓ' = α ℓ + rowsum P,      acc' = α acc + P V                 (tl.dot with DOT_PRECISION)

    A row that has seen only masked keys so far has m' = −∞: subtract 0 instead of m' there, so that
    α = P = 0 rather than NaN = 2^(−∞ − (−∞))."""
    for n0 in range(start, end, BLOCK_N):
        k_rows = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, k_rows, cols, stride_kt, T, HEAD_DIM, UPCAST)      # (BLOCK_N, BLOCK_D)
        v = _load_rows(V_head, k_rows, cols, stride_vt, T, HEAD_DIM, UPCAST)      # (BLOCK_N, BLOCK_D)

        # S₂ = (Q Kᵀ) · sm_scale · log₂e for this tile only: (BLOCK_M, BLOCK_N), never written to HBM.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if APPLY_MASK:
            doc_k = k_rows
            if HAS_DOCS:
                doc_k = tl.load(Doc_row + k_rows, mask=k_rows < T, other=-1)
            allowed = _is_allowed(q_rows[:, None], k_rows[None, :], doc_q[:, None], doc_k[None, :], T, CAUSAL,
                                  HAS_DOCS)
            s = tl.where(allowed, s, float("-inf"))

        # Online softmax. New running max m' = max(m, rowmax S₂). Rescale the old state by α = 2^(m − m')
        # and add this tile: ℓ' = α ℓ + Σ_j 2^(S₂ − m'),  acc' = α acc + 2^(S₂ − m') V.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only masked keys so far has m' = −∞, and 2^(−∞ − (−∞)) would be NaN.
        # Subtracting 0 instead gives 2^(−∞) = 0 for both p and α: the row simply stays empty.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i
# classroom: end forward_over_key_tiles


# do_not_specialize: Triton compiles a variant of a kernel for each divisibility by 16 of each integer
# argument. For the sizes (head counts, T) that buys nothing — they only bound masks and offsets — and would
# compile every config twice for the ever-changing lengths of PPO or evaluation batches; strides keep it
# (it lets loads vectorise). So a compiled kernel depends on dtype, head dim, masks and tiles only.
@triton.jit(do_not_specialize=["n_heads", "kv_group_size", "T", "T_TUNE"])
def _flash_forward_kernel(
    Q, K, V, O, LSE, DocIds, DocStart, DocEnd, DocsSorted,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    n_heads, kv_group_size, T, T_TUNE, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one query tile of one (batch, head). Writes O[tile] and LSE[tile]."""
    m0 = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)    # 64-bit offsets: B·H·T·d can exceed 2³¹
    head = (batch_head % n_heads).to(tl.int64)
    kv_head = head // kv_group_size                 # grouped-query attention: heads share K/V

    q_rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    Doc_row = DocIds + batch * T

    # The query tile is loaded once and stays on chip for the whole loop over keys.
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, q_rows, cols, stride_qt, T, HEAD_DIM, UPCAST)
    doc_q = q_rows
    if HAS_DOCS:
        doc_q = tl.load(Doc_row + q_rows, mask=q_rows < T, other=-1)

    # Online-softmax state, one entry per query row, always in fp32.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)   # running max of S₂
    l_i = tl.zeros((BLOCK_M,), tl.float32)                  # running Σ 2^(S₂ − m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)          # running Σ 2^(S₂ − m) V

    lo, first_full, end_full, hi = _key_tiles_for_query_tile(
        m0, T, DocStart, DocEnd, DocsSorted, batch, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N)
    # Three stretches of key tiles: masked (document start), unmasked (the bulk), masked (the diagonal,
    # a document end, the ragged end of the sequence). Keys outside [lo, hi) are never loaded.
    acc, m_i, l_i = _forward_over_key_tiles(
        acc, m_i, l_i, q, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt, Doc_row,
        lo, first_full, T, qk_scale, CAUSAL, HAS_DOCS, True, BLOCK_N, HEAD_DIM, UPCAST, DOT_PRECISION)
    acc, m_i, l_i = _forward_over_key_tiles(
        acc, m_i, l_i, q, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt, Doc_row,
        first_full, end_full, T, qk_scale, CAUSAL, HAS_DOCS, False, BLOCK_N, HEAD_DIM, UPCAST, DOT_PRECISION)
    acc, m_i, l_i = _forward_over_key_tiles(
        acc, m_i, l_i, q, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt, Doc_row,
        end_full, hi, T, qk_scale, CAUSAL, HAS_DOCS, True, BLOCK_N, HEAD_DIM, UPCAST, DOT_PRECISION)

    # O = acc / ℓ. A row that saw no key at all (only padding rows past T can) has ℓ = 0: write 0, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    _store_rows(O + batch * stride_ob + head * stride_oh, o, q_rows, cols, stride_ot, T, HEAD_DIM)

    # L = log Σ_j exp(S_ij) = (m + log₂ ℓ) · ln 2, in natural-log units (−∞ for an empty row).
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN_2)
    tl.store(LSE + batch_head.to(tl.int64) * T + q_rows, lse, mask=q_rows < T)


# ----------------------------------------------------------------------------------------------------------
# Backward pass
# ----------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_heads", "T"])
def _backward_preprocess_kernel(O, dO, Delta, stride_ob, stride_oh, stride_ot,
                                stride_dob, stride_doh, stride_dot, n_heads, T,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Δ_i = Σ_d dO_id · O_id = rowsum(dO ∘ O), which equals Σ_j P_ij dP_ij (see the backward docstring)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    o = _load_rows(O + batch * stride_ob + head * stride_oh, rows, cols, stride_ot, T, HEAD_DIM, True)
    do = _load_rows(dO + batch * stride_dob + head * stride_doh, rows, cols, stride_dot, T, HEAD_DIM, True)
    tl.store(Delta + batch_head.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=rows < T)


@triton.jit
def _dkdv_over_query_tiles(dk, dv, k, v, doc_k, k_rows, cols, Q_group, dO_group, LSE_group, Delta_group,
                           stride_qh, stride_qt, stride_doh, stride_dot, kv_group_size, Doc_row, start, end, T,
                           qk_scale, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, APPLY_MASK: tl.constexpr,
                           BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Stream the query tiles start, start + BLOCK_M, … < end of every query head of the group (Q_group is
    the first one's) past one key tile (k, v), accumulating dV += Pᵀ dO and dK += dSᵀ Q (the factor
    sm_scale is applied once, at the end).

    One flat loop over (query head, query tile) rather than a loop over heads around a loop over tiles:
    with the loops nested, nearly every config spilled registers (kernels/aot.py: 255 registers and
    stack frames of up to several KB with Triton 3.6; d = 32 at 32×64 tiles went from 255 registers and a
    344-byte stack to 140 registers when flattened). It works on the transposed tile Sᵀ = K Qᵀ,
    (BLOCK_N, BLOCK_M), so that Pᵀ and dSᵀ come out of their dots already as the left operand of the next
    one: transposing a loaded tile (Qᵀ, dOᵀ) is free, transposing a computed one (P, dS) costs a layout
    change through shared memory."""
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    for step in range(0, n_tiles * kv_group_size):
        g = step // n_tiles                                  # which query head of the group …
        q_rows = start + (step - g * n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)   # … and which of its tiles
        g = g.to(tl.int64)
        q = _load_rows(Q_group + g * stride_qh, q_rows, cols, stride_qt, T, HEAD_DIM, UPCAST)      # (BLOCK_M, BLOCK_D)
        do = _load_rows(dO_group + g * stride_doh, q_rows, cols, stride_dot, T, HEAD_DIM, UPCAST)  # (BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE_group + g * T + q_rows, mask=q_rows < T, other=0.0) * LOG2_E          # L in base 2
        delta = tl.load(Delta_group + g * T + q_rows, mask=q_rows < T, other=0.0)

        # Recompute this tile of Pᵀ from the saved log-sum-exp: P = exp(S − L) = 2^(S₂ − L₂).
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale    # Sᵀ₂, (BLOCK_N, BLOCK_M)
        pt = tl.exp2(st - lse2[None, :])
        if APPLY_MASK:
            doc_q = q_rows
            if HAS_DOCS:
                doc_q = tl.load(Doc_row + q_rows, mask=q_rows < T, other=-1)
            allowed = _is_allowed(q_rows[None, :], k_rows[:, None], doc_q[None, :], doc_k[:, None], T, CAUSAL,
                                  HAS_DOCS)
            pt = tl.where(allowed, pt, 0.0)

        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)            # dV += Pᵀ dO
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                   # dPᵀ = V dOᵀ
        dst = pt * (dpt - delta[None, :])                                               # dSᵀ = Pᵀ∘(dPᵀ − Δ)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)             # dK += dSᵀ Q
    return dk, dv


@triton.jit(do_not_specialize=["n_heads", "n_kv_heads", "kv_group_size", "T", "T_TUNE"])
def _flash_backward_dkdv_kernel(
    Q, K, V, dO, LSE, Delta, dK, dV, DocIds, DocStart, DocEnd, DocsSorted,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    n_heads, n_kv_heads, kv_group_size, T, T_TUNE, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one key tile of one (batch, K/V head). It owns dK[tile] and dV[tile] outright: it sums
    over every query tile of every query head that reads this K/V head, then writes them once."""
    n0 = tl.program_id(0) * BLOCK_N
    batch_kv_head = tl.program_id(1)
    batch = (batch_kv_head // n_kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % n_kv_heads).to(tl.int64)

    k_rows = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    Doc_row = DocIds + batch * T
    # The key/value tile stays on chip; the query tiles stream past it.
    k = _load_rows(K + batch * stride_kb + kv_head * stride_kh, k_rows, cols, stride_kt, T, HEAD_DIM, UPCAST)
    v = _load_rows(V + batch * stride_vb + kv_head * stride_vh, k_rows, cols, stride_vt, T, HEAD_DIM, UPCAST)
    doc_k = k_rows
    if HAS_DOCS:
        doc_k = tl.load(Doc_row + k_rows, mask=k_rows < T, other=-2)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    lo, first_full, end_full, hi = _query_tiles_for_key_tile(
        n0, T, DocStart, DocEnd, DocsSorted, batch, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N)
    # The query heads that read this K/V head: kv_head · group … kv_head · group + group − 1.
    head = kv_head * kv_group_size
    Q_group = Q + batch * stride_qb + head * stride_qh
    dO_group = dO + batch * stride_dob + head * stride_doh
    LSE_group = LSE + (batch * n_heads + head) * T
    Delta_group = Delta + (batch * n_heads + head) * T
    dk, dv = _dkdv_over_query_tiles(
        dk, dv, k, v, doc_k, k_rows, cols, Q_group, dO_group, LSE_group, Delta_group, stride_qh, stride_qt,
        stride_doh, stride_dot, kv_group_size, Doc_row, lo, first_full, T, qk_scale, CAUSAL, HAS_DOCS, True,
        BLOCK_M, HEAD_DIM, UPCAST, DOT_PRECISION)
    dk, dv = _dkdv_over_query_tiles(
        dk, dv, k, v, doc_k, k_rows, cols, Q_group, dO_group, LSE_group, Delta_group, stride_qh, stride_qt,
        stride_doh, stride_dot, kv_group_size, Doc_row, first_full, end_full, T, qk_scale, CAUSAL, HAS_DOCS,
        False, BLOCK_M, HEAD_DIM, UPCAST, DOT_PRECISION)
    dk, dv = _dkdv_over_query_tiles(
        dk, dv, k, v, doc_k, k_rows, cols, Q_group, dO_group, LSE_group, Delta_group, stride_qh, stride_qt,
        stride_doh, stride_dot, kv_group_size, Doc_row, end_full, hi, T, qk_scale, CAUSAL, HAS_DOCS, True,
        BLOCK_M, HEAD_DIM, UPCAST, DOT_PRECISION)

    # S = sm_scale · Q Kᵀ, so ∂S/∂K brings one factor sm_scale: dK = sm_scale · dSᵀ Q.
    _store_rows(dK + batch * stride_dkb + kv_head * stride_dkh, dk * sm_scale, k_rows, cols, stride_dkt, T,
                HEAD_DIM)
    _store_rows(dV + batch * stride_dvb + kv_head * stride_dvh, dv, k_rows, cols, stride_dvt, T, HEAD_DIM)


@triton.jit
def _dq_over_key_tiles(dq, q, do, lse2, delta, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt,
                       Doc_row, start, end, T, qk_scale,
                       CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, APPLY_MASK: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Stream the key tiles start, start + BLOCK_N, … < end past one query tile, accumulating dQ += dS K."""
    for n0 in range(start, end, BLOCK_N):
        k_rows = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K_head, k_rows, cols, stride_kt, T, HEAD_DIM, UPCAST)
        v = _load_rows(V_head, k_rows, cols, stride_vt, T, HEAD_DIM, UPCAST)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # S₂, recomputed
        p = tl.exp2(s - lse2[:, None])                                            # P = 2^(S₂ − L₂)
        if APPLY_MASK:
            doc_k = k_rows
            if HAS_DOCS:
                doc_k = tl.load(Doc_row + k_rows, mask=k_rows < T, other=-2)
            allowed = _is_allowed(q_rows[:, None], k_rows[None, :], doc_q[:, None], doc_k[None, :], T, CAUSAL,
                                  HAS_DOCS)
            p = tl.where(allowed, p, 0.0)

        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)              # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])                                            # dS = P∘(dP − Δ)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)        # dQ += dS K
    return dq


@triton.jit(do_not_specialize=["n_heads", "kv_group_size", "T", "T_TUNE"])
def _flash_backward_dq_kernel(
    Q, K, V, dO, LSE, Delta, dQ, DocIds, DocStart, DocEnd, DocsSorted,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    n_heads, kv_group_size, T, T_TUNE, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = one query tile of one (batch, head); it owns dQ[tile]. Same key loop as the forward."""
    m0 = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    kv_head = head // kv_group_size

    q_rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    Doc_row = DocIds + batch * T

    q = _load_rows(Q + batch * stride_qb + head * stride_qh, q_rows, cols, stride_qt, T, HEAD_DIM, UPCAST)
    do = _load_rows(dO + batch * stride_dob + head * stride_doh, q_rows, cols, stride_dot, T, HEAD_DIM, UPCAST)
    lse2 = tl.load(LSE + batch_head.to(tl.int64) * T + q_rows, mask=q_rows < T, other=0.0) * LOG2_E
    delta = tl.load(Delta + batch_head.to(tl.int64) * T + q_rows, mask=q_rows < T, other=0.0)
    doc_q = q_rows
    if HAS_DOCS:
        doc_q = tl.load(Doc_row + q_rows, mask=q_rows < T, other=-1)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    lo, first_full, end_full, hi = _key_tiles_for_query_tile(
        m0, T, DocStart, DocEnd, DocsSorted, batch, CAUSAL, HAS_DOCS, BLOCK_M, BLOCK_N)
    dq = _dq_over_key_tiles(dq, q, do, lse2, delta, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt,
                            Doc_row, lo, first_full, T, qk_scale, CAUSAL, HAS_DOCS, True, BLOCK_N, HEAD_DIM,
                            UPCAST, DOT_PRECISION)
    dq = _dq_over_key_tiles(dq, q, do, lse2, delta, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt,
                            Doc_row, first_full, end_full, T, qk_scale, CAUSAL, HAS_DOCS, False, BLOCK_N,
                            HEAD_DIM, UPCAST, DOT_PRECISION)
    dq = _dq_over_key_tiles(dq, q, do, lse2, delta, doc_q, q_rows, cols, K_head, V_head, stride_kt, stride_vt,
                            Doc_row, end_full, hi, T, qk_scale, CAUSAL, HAS_DOCS, True, BLOCK_N, HEAD_DIM,
                            UPCAST, DOT_PRECISION)

    # dQ = sm_scale · dS K.
    _store_rows(dQ + batch * stride_dqb + head * stride_dqh, dq * sm_scale, q_rows, cols, stride_dqt, T,
                HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------
# Tile sizes: autotuned on a GPU, small and fixed on the CPU interpreter
# ----------------------------------------------------------------------------------------------------------

CPU_BLOCK_SIZE = 16        # the smallest tile tl.dot accepts; the interpreter is slow, so small is fast
# fp32 on a GPU: exact but slow (no tensor cores), and each config takes tens of seconds to compile, so it
# runs one fixed (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning.
GPU_FP32_CONFIG = (32, 32, 4, 2)
PREPROCESS_CONFIG = (64, 4, 1)   # the Δ kernel on a GPU: (BLOCK_M, num_warps, num_stages); it has no loop

# The configs the autotuner times on a GPU for fp16/bf16, (BLOCK_M, BLOCK_N, num_warps, num_stages), per
# kernel and per head dim: the list under the smallest bound ≥ head_dim (the last one beyond). A bigger head
# dim holds bigger tiles in registers, so a config that fits at d = 64 can spill at d = 128. Every config
# here compiles for sm_80 and sm_90 with no register spills and within shared memory (Triton 3.6 and 3.9):
# kernels/aot.py checks that without a GPU (tests/test_flash_compile.py, bench/kernel_resources.py).
AUTOTUNE_CONFIGS = {
    "forward": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
                128: [(128, 32, 8, 3), (64, 32, 4, 3)]},    # 128×64 with 8 warps spills here (16–40 bytes)
    # dK/dV holds four (BLOCK_N × d) tiles (K, V and the fp32 dK, dV) for the whole kernel, so it takes narrow
    # query tiles and, at d = 128, 8 warps. (Before its loop over a group's heads was flattened — see
    # _dkdv_over_query_tiles — nearly every build of every config spilled: 64×64 with 4 warps up to a
    # 2,456-byte stack frame at d = 128 with Triton 3.6.)
    "dkdv": {64: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2)],
             128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3)]},
    "dq": {64: [(128, 32, 8, 3), (64, 32, 4, 3)],            # 64×64 with 8 warps spills on sm_80 at d = 64
           128: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)]},
}


def autotune_configs(kernel, head_dim):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) list the autotuner times for this kernel and head dim."""
    by_bound = AUTOTUNE_CONFIGS[kernel]
    bound = next((b for b in sorted(by_bound) if head_dim <= b), max(by_bound))
    return by_bound[bound]


AUTOTUNE_MIN_LENGTH = 128


def autotune_length(T):
    """The sequence length the autotuner keys on: T rounded up to a power of two (at least 128).

    Keyed on T itself, every new length would be timed (and its configs launched) again — and PPO, DPO
    and evaluation batches bring a new length almost every batch. The best tiles change with the scale
    of T, not with T ± 1, so lengths in (2^(k−1), 2^k] share one tuning: at most ⌈log₂(T_max / 128)⌉ + 1
    tunings per (head dim, masks, dtype). The compiled kernels do not depend on T at all (it is not
    specialised: see do_not_specialize), so nothing recompiles either."""
    return max(AUTOTUNE_MIN_LENGTH, triton.next_power_of_2(T))


# The autotuner keys on these arguments (and adds the tensors' dtypes itself): T_TUNE is autotune_length(T),
# passed to the kernels only so that the autotuner can see it; the kernels never read it.
AUTOTUNE_KEY = ["T_TUNE", "HEAD_DIM", "CAUSAL", "HAS_DOCS"]


def autotuned(kernel_name, kernel, do_bench=None):
    """The kernel wrapped in triton.autotune over every config of AUTOTUNE_CONFIGS[kernel_name]; each call
    times only those listed for its head dim. do_bench replaces Triton's timer (the tests pass a fake one:
    Triton's needs a GPU)."""
    settings = sorted({c for configs in AUTOTUNE_CONFIGS[kernel_name].values() for c in configs})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in settings]

    def for_head_dim(configs, named_args, **meta):
        allowed = set(autotune_configs(kernel_name, meta["HEAD_DIM"]))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    return triton.autotune(configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": for_head_dim},
                           do_bench=do_bench)(kernel)


# Autotuning is for real GPUs only: it times each config, which needs a GPU (Triton's timer fails without one).
if torch.cuda.is_available() and not INTERPRETER:
    _forward_tuned = autotuned("forward", _flash_forward_kernel)
    _dkdv_tuned = autotuned("dkdv", _flash_backward_dkdv_kernel)
    _dq_tuned = autotuned("dq", _flash_backward_dq_kernel)
else:
    _forward_tuned = _dkdv_tuned = _dq_tuned = None


def _launch(kernel, tuned_kernel, grid, args, meta, block_m, block_n):
    """Run a kernel: through its autotuner on a GPU (fp16/bf16, no tile size forced), otherwise with fixed
    tiles — the forced ones, or CPU_BLOCK_SIZE / GPU_FP32_CONFIG. grid(meta) gives the launch grid."""
    forced = block_m is not None or block_n is not None
    if tuned_kernel is not None and not forced and meta["DOT_PRECISION"] != "ieee":
        tuned_kernel[grid](*args, **meta)
        return
    default_m, default_n, num_warps, num_stages = ((CPU_BLOCK_SIZE, CPU_BLOCK_SIZE, 4, 2) if INTERPRETER
                                                   else GPU_FP32_CONFIG)
    meta = dict(meta, BLOCK_M=block_m or default_m, BLOCK_N=block_n or default_n)
    for name in ("BLOCK_M", "BLOCK_N"):
        size = meta[name]
        assert size >= 16 and size & (size - 1) == 0, f"{name} must be a power of two ≥ 16, got {size}"
    kernel[grid](*args, **meta, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------
# Host side: checks, document bounds, launches, autograd
# ----------------------------------------------------------------------------------------------------------

def _strides(x):
    """(batch, head, time) strides; the head_dim stride is 1 (see _with_unit_last_stride)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _with_unit_last_stride(x):
    """The kernels index a row as base + column, so the last dimension must be contiguous. Any other layout
    — e.g. (batch, time, heads, d).transpose(1, 2), the usual one in a GPT — is used as it is."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _new_output(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(q, k, v, doc_ids):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (batch, heads, time, head_dim)"
    B, H, T, D = q.shape
    assert k.shape == v.shape, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    assert k.shape[0] == B and k.shape[2] == T and k.shape[3] == D, \
        f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}"
    assert H % k.shape[1] == 0, f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})"
    assert q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES, \
        f"q, k, v must share one dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
    assert 1 <= D <= MAX_HEAD_DIM, f"head_dim must be at most {MAX_HEAD_DIM}, got {D}"
    if doc_ids is not None:
        assert doc_ids.shape == (B, T), f"doc_ids must be (batch, time) = {(B, T)}, got {tuple(doc_ids.shape)}"
        assert not doc_ids.is_floating_point(), "doc_ids must be an integer tensor"
    if not (q.is_cuda or INTERPRETER):
        raise RuntimeError("flash_attention runs Triton kernels: it needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before this module is imported (slow). On CPU use naive_attention/attention.")


def _document_bounds(doc_ids, T, device):
    """Per-token document bounds for tile skipping, computed without a host sync.

    Packing concatenates documents, so along time each document is one contiguous run and the ids never
    decrease — we assume that, and check it: a row whose ids do decrease somewhere gets start = 0 and end = T
    for every token (no skipping) and DocsSorted = 0 (every tile masked), so the answer stays exact either
    way, only slower. Returns int32 (doc_ids, doc_start, doc_end, docs_sorted) where token t's document is
    [doc_start[t], doc_end[t]) when sorted.
    """
    ids = doc_ids.to(device=device, dtype=torch.int32).contiguous()
    is_sorted = (ids[:, 1:] >= ids[:, :-1]).all(dim=1)                         # (batch,), stays on device
    start = torch.searchsorted(ids, ids, side="left")                         # first token with this id
    end = torch.searchsorted(ids, ids, side="right")                          # one past the last one
    start = torch.where(is_sorted[:, None], start, 0).to(torch.int32).contiguous()
    end = torch.where(is_sorted[:, None], end, T).to(torch.int32).contiguous()
    return ids, start, end, is_sorted.to(torch.int32)


DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def launch_constexprs(dtype, head_dim, causal, has_docs, on_gpu=not INTERPRETER):
    """The compile-time constants of a launch (every kernel's specialisation, tiles aside). dtype is q's
    torch dtype or its name ("fp16", "bf16", "fp32"); kernels/aot.py compiles with exactly these."""
    dtype = DTYPE_NAMES.get(dtype, dtype)
    return dict(
        HEAD_DIM=head_dim, CAUSAL=bool(causal), HAS_DOCS=bool(has_docs),
        # The interpreter computes bf16 wrongly: compute in fp32 there (the GPU keeps bf16 tiles).
        UPCAST=not on_gpu and dtype == torch.bfloat16,
        # On a GPU an fp32 tl.dot silently runs in TF32 (10-bit mantissa); fp32 inputs ask for exact fp32.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )


def _kernel_setup(q, k, causal, doc_ids, sm_scale):
    """What every launch shares: the document tensors (or placeholders), scalars, and constexpr flags."""
    B, H, T, D = q.shape
    if doc_ids is None:
        placeholder = torch.zeros(1, dtype=torch.int32, device=q.device)  # never read: HAS_DOCS is False
        docs = (placeholder,) * 4
    else:
        docs = _document_bounds(doc_ids, T, q.device)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    return docs, sm_scale, launch_constexprs(q.dtype, D, causal, doc_ids is not None)


@torch.no_grad()
def flash_attention_forward(q, k, v, causal=True, doc_ids=None, sm_scale=None, *, block_m=None, block_n=None):
    """Flash-attention forward pass. Returns (o, lse):

        o    (batch, heads, time, head_dim), q's dtype:  softmax(sm_scale · Q Kᵀ + mask) V
        lse  (batch, heads, time), fp32:  L_i = log Σ_j exp(S_ij) over the keys row i may see
             (natural log; −∞ for a row that sees none — impossible with causal/document masks, as every
             token sees itself)

    Accumulation is fp32 for every input dtype. block_m/block_n force the tile sizes (powers of two ≥ 16);
    by default the GPU autotunes them (fp16/bf16) and the CPU interpreter uses CPU_BLOCK_SIZE.
    """
    _check_inputs(q, k, v, doc_ids)
    q, k, v = (_with_unit_last_stride(x) for x in (q, k, v))
    B, H, T, D = q.shape
    docs, sm_scale, meta = _kernel_setup(q, k, causal, doc_ids, sm_scale)
    o = _new_output((B, H, T, D), q.dtype, q.device)
    lse = _new_output((B, H, T), torch.float32, q.device)
    args = (q, k, v, o, lse, *docs, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, H // k.shape[1], T, autotune_length(T), sm_scale * math.log2(math.e))
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_flash_forward_kernel, _forward_tuned, grid, args, meta, block_m, block_n)
    return o, lse


@torch.no_grad()
def flash_attention_backward(do, q, k, v, o, lse, causal=True, doc_ids=None, sm_scale=None, *,
                             block_m=None, block_n=None):
    """Flash-attention backward pass: given dO = ∂loss/∂O, returns (dq, dk, dv) in the inputs' dtype.

    With P = softmax(S) row-wise and O = P V:
        dV = Pᵀ dO                         (O is linear in V)
        dP = dO Vᵀ
        dS_ij = P_ij (dP_ij − Δ_i)         (softmax Jacobian: ∂P_ij/∂S_ik = P_ij(δ_jk − P_ik))
        Δ_i = Σ_j P_ij dP_ij = Σ_j P_ij (dO_i · V_j) = dO_i · O_i     ← a row sum, no T×T matrix needed
        dQ = sm_scale · dS K,  dK = sm_scale · dSᵀ Q
    P is rebuilt tile by tile from the forward's log-sum-exp: P_ij = exp(sm_scale · q_i·k_j − L_i).
    With grouped-query attention dK and dV sum over the query heads that share a K/V head.
    """
    _check_inputs(q, k, v, doc_ids)
    q, k, v, o, do = (_with_unit_last_stride(x) for x in (q, k, v, o, do))
    lse = lse.contiguous()
    B, H, T, D = q.shape
    n_kv_heads = k.shape[1]
    docs, sm_scale, meta = _kernel_setup(q, k, causal, doc_ids, sm_scale)
    scales = (sm_scale * math.log2(math.e), sm_scale)

    # 1. Δ = rowsum(dO ∘ O), fp32, (batch, heads, time).
    delta = _new_output((B, H, T), torch.float32, q.device)
    block_rows, num_warps, num_stages = (CPU_BLOCK_SIZE, 4, 1) if INTERPRETER else PREPROCESS_CONFIG
    _backward_preprocess_kernel[(triton.cdiv(T, block_rows), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T,
        HEAD_DIM=D, BLOCK_M=block_rows, BLOCK_D=meta["BLOCK_D"], num_warps=num_warps, num_stages=num_stages)

    # 2. dK, dV: one program per (key tile, batch, K/V head).
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    args = (q, k, v, do, lse, delta, dk, dv, *docs, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv), H, n_kv_heads, H // n_kv_heads, T, autotune_length(T), *scales)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * n_kv_heads)  # noqa: E731
    _launch(_flash_backward_dkdv_kernel, _dkdv_tuned, grid, args, meta, block_m, block_n)

    # 3. dQ: one program per (query tile, batch, head).
    dq = _new_output(q.shape, q.dtype, q.device)
    args = (q, k, v, do, lse, delta, dq, *docs, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), H, H // n_kv_heads, T, autotune_length(T), *scales)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_flash_backward_dq_kernel, _dq_tuned, grid, args, meta, block_m, block_n)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Autograd and torch.compile: the kernels as one PyTorch operator
# ----------------------------------------------------------------------------------------------------------
# torch.compile cannot look inside a Triton launcher with host-side autotuning, and would break the graph
# there. Registered as custom operators — each with a "fake" version that only says what shape, dtype and
# strides its outputs have — the forward and backward are opaque single nodes of the compiled graph: no graph
# break, and the model around them is fused as usual. The forward keeps only O and the log-sum-exp L for the
# backward (O(T) per head, not O(T²)). Public entry point: flash_attention().

@torch.library.custom_op("llm_pipeline::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        doc_ids: Optional[torch.Tensor], sm_scale: Optional[float], block_m: Optional[int],
                        block_n: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_forward(q, k, v, causal, doc_ids, sm_scale, block_m=block_m, block_n=block_n)


@_flash_attention_op.register_fake
def _(q, k, v, causal, doc_ids, sm_scale, block_m, block_n):
    _check_inputs(q, k, v, doc_ids)
    B, H, T, D = q.shape   # O like q (contiguous), L in fp32: what flash_attention_forward allocates
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("llm_pipeline::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, causal: bool, doc_ids: Optional[torch.Tensor],
                                 sm_scale: Optional[float], block_m: Optional[int],
                                 block_n: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_backward(do, q, k, v, o, lse, causal, doc_ids, sm_scale, block_m=block_m,
                                    block_n=block_n)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, causal, doc_ids, sm_scale, block_m, block_n):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, causal, doc_ids, sm_scale, block_m, block_n = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_ids)
    ctx.settings = (causal, sm_scale, block_m, block_n)
    ctx.mark_non_differentiable(lse)   # L is a by-product for the backward, not an output to differentiate


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_ids = ctx.saved_tensors
    causal, sm_scale, block_m, block_n = ctx.settings
    dq, dk, dv = _flash_attention_backward_op(do, q, k, v, o, lse, causal, doc_ids, sm_scale, block_m, block_n)
    return dq, dk, dv, None, None, None, None, None


_flash_attention_op.register_autograd(_backward, setup_context=_save_for_backward)


def flash_attention(q, k, v, causal=True, doc_ids=None, sm_scale=None, *, block_m=None, block_n=None):
    """softmax(sm_scale · Q Kᵀ + mask) V with flash-attention, differentiable in q, k and v.

    q: (batch, heads, time, head_dim); k, v: (batch, kv_heads, time, head_dim) with heads % kv_heads = 0.
    causal: token i sees tokens j ≤ i. doc_ids: optional int (batch, time); token i sees only tokens of its
    own document (ids should be non-decreasing along time, as packing produces — then the tiles of other
    documents are skipped; other ids are still handled exactly, without the skipping).
    sm_scale defaults to 1/√head_dim. fp32, fp16 and bf16 inputs; fp32 accumulation.
    The operator torch.ops.llm_pipeline.flash_attention, so torch.compile traces through it.
    """
    sm_scale = None if sm_scale is None else float(sm_scale)
    return _flash_attention_op(q, k, v, bool(causal), doc_ids, sm_scale, block_m, block_n)[0]


def attention(q, k, v, causal=True, doc_ids=None, sm_scale=None):
    """The one to call from a model: flash-attention for CUDA tensors, the naive reference elsewhere
    (the Triton interpreter would be far too slow for training on a CPU)."""
    if q.is_cuda:
        return flash_attention(q, k, v, causal, doc_ids, sm_scale)
    return naive_attention(q, k, v, causal, doc_ids, sm_scale)
