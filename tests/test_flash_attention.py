"""Flash-attention (kernels/flash_attention.py) against the textbook reference computed in fp64.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which
is slow: shapes and tiles are kept small. Every output the kernels write starts as NaN (POISON_OUTPUTS), so an
element that no program wrote cannot pass as a plausible zero.
"""

import math

import pytest
import torch

import kernels.flash_attention as fa

TOLERANCES = {  # (atol, rtol) for outputs, log-sum-exp and gradients, per input dtype
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


def random_inputs(B, H, T, D, H_kv=None, dtype=torch.float32, seed=0):
    """q, k, v, dO drawn in fp64 and rounded to dtype (the reference then sees exactly the kernel's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    H_kv = H if H_kv is None else H_kv
    shapes = [(B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D), (B, H, T, D)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]


def reference(q, k, v, do, causal, doc_ids, sm_scale=None):
    """fp64 naive attention: (o, lse, dq, dk, dv)."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    o, lse = fa.naive_attention(q, k, v, causal, doc_ids, sm_scale, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    return o.detach(), lse.detach(), dq, dk, dv


def assert_matches(actual, expected, dtype, names=("o", "lse", "dq", "dk", "dv")):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def check_against_reference(B, H, T, D, causal, doc_ids=None, H_kv=None, dtype=torch.float32,
                            sm_scale=None, block_m=None, block_n=None):
    q, k, v, do = random_inputs(B, H, T, D, H_kv, dtype)
    tiles = dict(block_m=block_m, block_n=block_n)
    o, lse = fa.flash_attention_forward(q, k, v, causal, doc_ids, sm_scale, **tiles)
    dq, dk, dv = fa.flash_attention_backward(do, q, k, v, o, lse, causal, doc_ids, sm_scale, **tiles)
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and lse.dtype == torch.float32
    assert_matches((o, lse, dq, dk, dv), reference(q, k, v, do, causal, doc_ids, sm_scale), dtype)


def packed_doc_ids(*lengths_per_row):
    """doc_ids for packed rows, e.g. packed_doc_ids([3, 1, 5], [9]) -> [[0,0,0,1,2,2,2,2,2], [0]*9]."""
    rows = [torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            for lengths in lengths_per_row]
    return torch.stack(rows).to(DEVICE)


# --- plain causal / non-causal attention ------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, D", [
    (1, 1, 1, 16),     # a single token
    (2, 3, 17, 16),    # one token past a tile
    (1, 2, 33, 24),    # a head_dim that is not a power of two (padded to 32)
    (1, 1, 129, 32),   # many tiles, ragged end
])
def test_matches_reference_fp32(B, H, T, D, causal):
    check_against_reference(B, H, T, D, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
def test_unequal_tiles(block_m, block_n, causal):
    """Query and key tiles of different sizes move the diagonal inside tiles and the masked/unmasked split."""
    check_against_reference(1, 1, 77, 16, causal, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B, H, T, D", [(2, 2, 17, 16), (1, 1, 40, 64)])
def test_matches_reference_fp16(B, H, T, D, causal):
    check_against_reference(B, H, T, D, causal, dtype=torch.float16)


def test_bf16_runs_and_matches():
    """On CPU this checks the interpreter path (tiles upcast to fp32); the GPU check is in bench/attention.py."""
    check_against_reference(1, 2, 20, 16, True, dtype=torch.bfloat16)


def test_sm_scale():
    check_against_reference(1, 2, 19, 16, True, sm_scale=0.3)


# --- document masking -------------------------------------------------------------------------------------

DOCUMENT_LAYOUTS = {
    "length-1 docs at both ends": [[1, 20, 18, 1], [40]],
    "docs across tile edges": [[7, 9, 16, 8], [16, 16, 1, 7]],
    "many tiny docs": [[1] * 10 + [30], [2] * 20],
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", list(DOCUMENT_LAYOUTS))
def test_document_mask(layout, causal):
    doc_ids = packed_doc_ids(*DOCUMENT_LAYOUTS[layout])
    check_against_reference(2, 2, 40, 16, causal, doc_ids=doc_ids)


def test_document_mask_fp16_bigger_tiles():
    doc_ids = packed_doc_ids([30, 1, 50], [81])
    check_against_reference(2, 1, 81, 32, True, doc_ids=doc_ids, dtype=torch.float16, block_m=32, block_n=16)


@pytest.mark.parametrize("causal", [True, False])
def test_unsorted_doc_ids_are_still_exact(causal):
    """Ids that decrease along time break the tile-skipping assumption: no skipping, same answer."""
    gen = torch.Generator().manual_seed(1)
    doc_ids = torch.randint(0, 3, (2, 37), generator=gen).to(DEVICE)
    doc_ids[1] = packed_doc_ids([20, 17])[0]      # one sorted row next to an unsorted one
    check_against_reference(2, 1, 37, 16, causal, doc_ids=doc_ids)


@pytest.mark.filterwarnings("ignore:All-NaN slice")   # document 0's own rows are NaN, as they should be
@pytest.mark.parametrize("causal", [True, False])
def test_other_documents_are_never_read(causal):
    """Tiles of another document are skipped, not just masked: fill document 0 with NaN (NaN · 0 = NaN, so a
    masked-but-loaded tile would leak it) and document 1 must still come out exact."""
    T, split = 64, 32                                  # the document edge falls on a tile edge
    doc_ids = packed_doc_ids([split, T - split])
    q, k, v, do = random_inputs(1, 2, T, 16)
    for x in (q, k, v, do):
        x[:, :, :split] = float("nan")
    o, lse = fa.flash_attention_forward(q, k, v, causal, doc_ids)
    grads = fa.flash_attention_backward(do, q, k, v, o, lse, causal, doc_ids)
    # Document 1 on its own is ordinary attention over tokens split … T − 1.
    doc1 = [x[:, :, split:] for x in (q, k, v, do)]
    expected = reference(*doc1, causal, None)
    assert_matches([x[:, :, split:] for x in (o, lse, *grads)], expected, torch.float32)


def test_document_bounds():
    ids = torch.tensor([[0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5], [0, 1, 0, 1, 1, 1]])
    doc_ids, start, end, is_sorted = fa._document_bounds(ids, 6, "cpu")
    assert start.tolist() == [[0, 0, 2, 3, 3, 3], [0] * 6, [0] * 6]   # unsorted row: no skipping
    assert end.tolist() == [[2, 2, 3, 6, 6, 6], [6] * 6, [6] * 6]
    assert is_sorted.tolist() == [1, 1, 0]
    assert doc_ids.dtype == start.dtype == end.dtype == torch.int32


# --- grouped-query attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("H, H_kv, causal, with_docs", [
    (4, 2, True, False),
    (4, 1, False, False),
    (3, 1, True, True),
])
def test_grouped_query_attention(H, H_kv, causal, with_docs):
    doc_ids = packed_doc_ids([10, 1, 12], [23]) if with_docs else None
    check_against_reference(2, H, 23, 16, causal, doc_ids=doc_ids, H_kv=H_kv)


# --- the autograd function --------------------------------------------------------------------------------

def test_autograd_function_with_strided_inputs():
    """flash_attention through autograd, fed (batch, time, heads, d) tensors transposed to (b, h, t, d) —
    the layout a GPT produces — so the kernels see non-contiguous strides."""
    B, H, T, D = 2, 2, 21, 16
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_inputs(B, H, T, D))
    assert not q.is_contiguous()
    doc_ids = packed_doc_ids([5, 16], [21])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = fa.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
    o.backward(do)
    o_ref, _, dq, dk, dv = reference(q.detach(), k.detach(), v.detach(), do, True, doc_ids)
    assert_matches((o, q.grad, k.grad, v.grad), (o_ref, dq, dk, dv), torch.float32, ("o", "dq", "dk", "dv"))




# --- classroom graders (tests/classroom.py): each function against loops over queries ---------------------
# The tests above use naive_attention as the reference for the kernels. A student copy may strip either one,
# so these two graders compare each of them with `attention_by_loops` instead, never with each other.

def attention_by_loops(q, k, v, causal, doc_ids=None, sm_scale=None):
    """O and L = logsumexp of the scores from the definitions, one query at a time in fp64: list the keys
    query i may see (j ≤ i when causal, same document), score them, softmax by hand."""
    q, k, v = (x.detach().double().cpu() for x in (q, k, v))
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    o, lse = torch.zeros(B, H, T, D, dtype=torch.float64), torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // group                               # grouped-query attention: the shared K/V head
            for i in range(T):
                keys = [j for j in range(T) if (not causal or j <= i)
                        and (doc_ids is None or int(doc_ids[b, i]) == int(doc_ids[b, j]))]
                scores = k[b, kv, keys] @ q[b, h, i] * scale
                weights = torch.exp(scores - scores.max())
                o[b, h, i] = weights @ v[b, kv, keys] / weights.sum()
                lse[b, h, i] = scores.max() + torch.log(weights.sum())
    return o, lse


ATTENTION_CASES = {  # name: (B, H, H_kv, T, D, causal, doc lengths per row or None, sm_scale)
    "causal": (2, 2, 2, 19, 16, True, None, None),
    "non-causal-scaled": (1, 2, 2, 19, 24, False, None, 0.3),
    "documents": (2, 2, 2, 21, 16, True, ([5, 1, 15], [21]), None),
    "grouped-query": (1, 4, 2, 17, 16, True, None, None),
}


def attention_case(name):
    B, H, H_kv, T, D, causal, doc_lengths, sm_scale = ATTENTION_CASES[name]
    q, k, v, _ = random_inputs(B, H, T, D, H_kv, seed=3)
    doc_ids = packed_doc_ids(*doc_lengths) if doc_lengths else None
    return q, k, v, causal, doc_ids, sm_scale


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_naive_attention_matches_loops(case):
    q, k, v, causal, doc_ids, sm_scale = attention_case(case)
    o, lse = fa.naive_attention(q.double(), k.double(), v.double(), causal, doc_ids, sm_scale, return_lse=True)
    expected_o, expected_lse = attention_by_loops(q, k, v, causal, doc_ids, sm_scale)
    torch.testing.assert_close(o.cpu(), expected_o, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=1e-10, rtol=1e-10)
    assert fa.naive_attention(q, k, v, causal, doc_ids, sm_scale).dtype == q.dtype


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_dispatch_passes_every_argument_on(case):
    """`attention`, what the model calls (flash on CUDA, naive elsewhere), against the loops: causal, doc_ids
    and sm_scale must all reach the implementation it picks; causal is the default."""
    q, k, v, causal, doc_ids, sm_scale = attention_case(case)
    expected_o, _ = attention_by_loops(q, k, v, causal, doc_ids, sm_scale)
    o = fa.attention(q, k, v, causal, doc_ids, sm_scale)
    assert_matches((o,), (expected_o.to(o.device),), torch.float32, ("o",))
    if causal and doc_ids is None and sm_scale is None:
        assert_matches((fa.attention(q, k, v),), (expected_o.to(o.device),), torch.float32, ("o",))


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_forward_matches_loops(case):
    """The forward kernel (its tile loop is `_forward_over_key_tiles`) with 16-row tiles: several query and key
    tiles, a ragged end, and the masked / unmasked stretches of key tiles."""
    q, k, v, causal, doc_ids, sm_scale = attention_case(case)
    o, lse = fa.flash_attention_forward(q, k, v, causal, doc_ids, sm_scale, block_m=16, block_n=16)
    expected_o, expected_lse = attention_by_loops(q, k, v, causal, doc_ids, sm_scale)
    assert_matches((o, lse), (expected_o.to(o.device), expected_lse.to(o.device)), torch.float32, ("o", "lse"))


# --- torch.compile: the kernels as a PyTorch operator -------------------------------------------------------

@pytest.mark.parametrize("causal, with_docs, H_kv, dtype, sm_scale", [
    (True, True, 1, torch.float32, 0.3),      # documents, grouped-query heads, a given scale
    (False, False, 2, torch.float16, None),
])
def test_custom_operator_passes_opcheck(causal, with_docs, H_kv, dtype, sm_scale):
    """torch.library.opcheck runs the operator for real and against its fake (meta) version, checks that its
    schema matches what it does (no mutation, no aliasing), that its autograd is registered, and that
    AOTAutograd — what torch.compile uses — traces the forward and the backward through it."""
    q, k, v, _ = random_inputs(1, 2, 20, 16, H_kv, dtype)
    doc_ids = packed_doc_ids([7, 13]) if with_docs else None
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, doc_ids, sm_scale, None, None)
    torch.library.opcheck(torch.ops.llm_pipeline.flash_attention.default, args)


def test_lse_is_not_differentiable():
    """The operator's second output, the log-sum-exp, is a by-product kept for the backward pass."""
    q, k, v, _ = random_inputs(1, 1, 9, 16)
    o, lse = torch.ops.llm_pipeline.flash_attention(q.requires_grad_(), k, v, True, None, None, None, None)
    assert o.requires_grad and not lse.requires_grad


# --- autotuning: a bounded number of tunings for variable lengths ------------------------------------------

def tuning_counts(monkeypatch, lengths, bucket):
    """Run the forward through a real Triton autotuner whose timer is a fake (Triton's needs a GPU); return
    (how many configs were timed, how many distinct keys were tuned)."""
    timed = []

    def fake_timer(kernel_call, quantiles=None, **kwargs):
        timed.append(kernel_call)
        return [float(len(timed))] * 3          # the first config timed wins: a deterministic choice

    monkeypatch.setattr(fa, "autotune_length", bucket)
    tuned = fa.autotuned("forward", fa._flash_forward_kernel, do_bench=fake_timer)
    monkeypatch.setattr(fa, "_forward_tuned", tuned)
    for T in lengths:
        q, k, v, _ = random_inputs(1, 1, T, 16, dtype=torch.float16, seed=T)
        o, _ = fa.flash_attention_forward(q, k, v, causal=True)
        expected = fa.naive_attention(q.double(), k.double(), v.double(), causal=True)
        torch.testing.assert_close(o.double(), expected, atol=1e-3, rtol=1e-3)   # the chosen config ran
    return len(timed), len(tuned.cache)


def test_autotuning_is_keyed_on_power_of_two_lengths(monkeypatch):
    """PPO, DPO and evaluation batches bring a new length almost every batch. Keyed on T itself, each would
    time every config again; keyed on autotune_length(T), lengths share one tuning per power of two."""
    lengths = [17, 64, 100, 128, 129, 200, 256, 300]
    n_configs = len(fa.autotune_configs("forward", 16))
    timed, tunings = tuning_counts(monkeypatch, lengths, fa.autotune_length)
    assert tunings == 3 and timed == 3 * n_configs                      # buckets 128, 256, 512
    assert [fa.autotune_length(T) for T in (1, 128, 129, 1000, 1024, 1025)] == [128, 128, 256, 1024, 1024, 2048]
    timed, tunings = tuning_counts(monkeypatch, lengths, lambda T: T)  # what keying on T would cost
    assert tunings == len(lengths) and timed == len(lengths) * n_configs


@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
def test_autotuner_times_only_the_configs_of_the_head_dim(kernel):
    """The autotuner holds every head dim's configs and prunes to those of the call's HEAD_DIM."""
    tuned = fa.autotuned(kernel, fa._flash_forward_kernel)
    for head_dim in (16, 32, 64, 100, 128, 256):
        kept = tuned.early_config_prune(tuned.configs, {}, HEAD_DIM=head_dim)
        assert sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept) \
            == sorted(fa.autotune_configs(kernel, head_dim))
