"""Benchmark our Triton flash-attention (kernels/flash_attention.py) against torch SDPA (flash backend) and
the naive T×T version: speed in TFLOP/s and peak memory, plus a bf16 correctness check. Not a test.

    python bench/attention.py                       # the full table on a GPU (bf16)
    python bench/attention.py --seq-lens 1024 4096  # a subset

FLOPs counted (the usual convention): the forward does two T×T×d matmuls per head, Q Kᵀ and P V, i.e.
4·B·H·T²·d FLOPs, halved when causal (only the lower triangle is needed); the backward does five such
matmuls (recomputing S, and dV, dP, dQ, dK), counted as 2.5 × the forward.

On a machine without a GPU it says so and runs a tiny correctness/timing smoke test in Triton's
interpreter instead (slow, so the shapes are tiny and the timings mean nothing for a GPU).
"""

import argparse
import contextlib
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels.flash_attention import flash_attention, flash_attention_forward, naive_attention  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths T to benchmark")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims d to benchmark")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="tokens per batch: batch = max(1, tokens // T), so every row does similar work")
    parser.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // d")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive T×T implementation")
    parser.add_argument("--doc-len", type=int, default=1024,
                        help="document length for the document-masking table (packed equal documents)")
    parser.add_argument("--budget-ms", type=float, default=300.0, help="time spent measuring each number")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------------------
# Measuring on a GPU
# ----------------------------------------------------------------------------------------------------------

def time_ms(fn, budget_ms=300.0, warmup=3):
    """Median wall time of fn() in ms: with CUDA events (one pair per call) on a GPU, perf_counter on the CPU.
    `warmup` calls first (they also trigger compilation and autotuning); the number of repetitions fills
    budget_ms (3 to 50)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        reps = int(min(50, max(3, budget_ms / max(1e3 * (time.perf_counter() - start), 1e-3))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(50, max(3, budget_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def forward_flops(B, H, T, D, causal):
    """4·B·H·T²·d: Q Kᵀ and P V, 2 FLOPs per multiply-add each; causal needs only half of the T² pairs."""
    flops = 4.0 * B * H * T * T * D
    return flops / 2 if causal else flops


def sdpa_flash(q, k, v, causal):
    """PyTorch's SDPA forced onto its flash backend (on a GPU; on the CPU, whichever it picks)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def ours(q, k, v, causal, doc_ids=None):
    return flash_attention(q, k, v, causal=causal, doc_ids=doc_ids)


def naive(q, k, v, causal, doc_ids=None):
    return naive_attention(q, k, v, causal=causal, doc_ids=doc_ids)


def naive_fits(B, H, T):
    """The naive version keeps several T×T tensors per head alive (scores, masked scores, fp32 softmax, its
    bf16 copy, and their gradients): about 20 bytes per score. Skip it where that would not fit (on the CPU:
    in 2 GiB)."""
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 2**31 / 0.8
    return 20.0 * B * H * T * T < 0.8 * memory


def measure(method, q, k, v, do, causal, budget_ms, doc_ids=None, warmup=3):
    """(forward ms, backward ms, peak extra MiB of forward + backward) for one attention implementation.
    The peak is measured on a GPU only (NaN on the CPU)."""
    args = (q, k, v, causal) if doc_ids is None else (q, k, v, causal, doc_ids)
    with torch.no_grad():
        fwd_ms = time_ms(lambda: method(*args), budget_ms, warmup)
    out = method(*args)
    bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), budget_ms, warmup)
    del out
    if not q.is_cuda:
        return fwd_ms, bwd_ms, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(method(*args), (q, k, v), do)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    del grads
    return fwd_ms, bwd_ms, peak_mib


def random_qkv(B, H, T, D, dtype=torch.bfloat16, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def speed_table(args):
    methods = [("ours", ours), ("sdpa-flash", sdpa_flash)] + ([] if args.no_naive else [("naive", naive)])
    print("\n## Speed and memory (bf16; TFLOP/s: fwd 4·B·H·T²·d, halved if causal; bwd 2.5× fwd)\n")
    print(f"| {'d':>3} | {'causal':>6} | {'T':>6} | {'B×H':>7} | {'method':<10} | {'fwd ms':>8} | "
          f"{'fwd TF/s':>8} | {'bwd ms':>8} | {'bwd TF/s':>8} | {'peak MiB':>9} |")
    print("|" + "|".join("-" * w for w in (5, 8, 8, 9, 12, 10, 10, 10, 10, 11)) + "|")
    for D in args.head_dims:
        for causal in (True, False):
            for T in args.seq_lens:
                B, H = max(1, args.tokens // T), max(1, args.model_dim // D)
                q, k, v, do = random_qkv(B, H, T, D)
                flops = forward_flops(B, H, T, D, causal)
                for name, method in methods:
                    row = f"| {D:>3} | {str(causal):>6} | {T:>6} | {f'{B}×{H}':>7} | {name:<10} |"
                    if name == "naive" and not naive_fits(B, H, T):
                        print(row + " (skipped: the T×T matrices would not fit in memory)")
                        continue
                    try:
                        fwd_ms, bwd_ms, peak = measure(method, q, k, v, do, causal, args.budget_ms)
                    except torch.cuda.OutOfMemoryError:
                        print(row + " out of memory")
                        torch.cuda.empty_cache()
                        continue
                    print(row + f" {fwd_ms:>8.3f} | {flops / fwd_ms / 1e9:>8.1f} | {bwd_ms:>8.3f} | "
                                f"{2.5 * flops / bwd_ms / 1e9:>8.1f} | {peak:>9.1f} |", flush=True)
                del q, k, v, do
                torch.cuda.empty_cache()


def document_table(args):
    """Packed documents: the kernel skips tiles of other documents, so cost follows Σ (doc length)²."""
    T, D = max(args.seq_lens), 128
    B, H = max(1, args.tokens // T), args.model_dim // D
    doc_ids = (torch.arange(T, device="cuda") // args.doc_len).expand(B, T).contiguous()
    q, k, v, do = random_qkv(B, H, T, D)
    print(f"\n## Document masking: T={T}, d={D}, B×H={B}×{H}, packed documents of {args.doc_len} tokens\n")
    print(f"| {'causal':>6} | {'mask':<14} | {'fwd ms':>8} | {'bwd ms':>8} |")
    print("|--------|----------------|----------|----------|")
    for causal in (True, False):
        for label, docs in (("none", None), ("documents", doc_ids)):
            fwd_ms, bwd_ms, _ = measure(ours, q, k, v, do, causal, args.budget_ms, doc_ids=docs)
            print(f"| {str(causal):>6} | {label:<14} | {fwd_ms:>8.3f} | {bwd_ms:>8.3f} |", flush=True)


def relative_errors(q, k, v, do, fn, reference):
    """max|fn − reference| / max|reference| for o, dq, dk, dv (the reference outputs already computed)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            for a, b in zip((out, *grads), reference)]


def reference_outputs(q, k, v, do, causal, doc_ids, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = naive_attention(q, k, v, causal, doc_ids)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(dtype)))


def correctness_check():
    """bf16 flash-attention against an fp32 reference fed the same bf16 inputs; SDPA's bf16 error against
    the same reference is the yardstick. Also our fp32 path (full-precision dots) against fp64."""
    B, H, T = 2, 4, 1000  # T not a multiple of any tile size
    print(f"\n## Correctness (max |error| / max |reference|; B={B}, H={H}, T={T})\n")
    print(f"| {'d':>3} | {'causal':>6} | {'docs':>5} | {'what':<22} | "
          + " | ".join(f"{name:>8}" for name in ("o", "dq", "dk", "dv")) + " |")
    print("|-----|--------|-------|------------------------|----------|----------|----------|----------|")
    all_ok = True
    for D in (64, 128):
        for causal, with_docs in ((True, False), (False, False), (True, True)):
            q, k, v, do = random_qkv(B, H, T, D)
            doc_ids = None
            if with_docs:
                doc_ids = torch.repeat_interleave(torch.arange(4, device="cuda"),
                                                  torch.tensor([300, 1, 450, 249], device="cuda")).expand(B, T)
            def our_attention(q, k, v):
                return ours(q, k, v, causal, doc_ids)

            def sdpa_attention(q, k, v):
                return sdpa_flash(q, k, v, causal)

            ref32 = reference_outputs(q, k, v, do, causal, doc_ids, torch.float32)
            rows = [("ours bf16 vs fp32 ref", relative_errors(q, k, v, do, our_attention, ref32))]
            if not with_docs:  # SDPA has no document masks
                rows.append(("sdpa bf16 vs fp32 ref", relative_errors(q, k, v, do, sdpa_attention, ref32)))
            else:  # fp32 compiles slowly (no tensor cores): check it once per d, on the hardest mask
                ref64 = reference_outputs(q, k, v, do, causal, doc_ids, torch.float64)
                q32, k32, v32 = (x.detach().float() for x in (q, k, v))
                rows.append(("ours fp32 vs fp64 ref", relative_errors(q32, k32, v32, do.float(), our_attention,
                                                                      ref64)))
            for what, errs in rows:
                limit = 1e-5 if "fp32" in what.split()[1] else 2e-2
                ok = max(errs) < limit
                all_ok &= ok or what.startswith("sdpa")
                print(f"| {D:>3} | {str(causal):>6} | {str(with_docs):>5} | {what:<22} | "
                      + " | ".join(f"{e:8.1e}" for e in errs) + f" |{'' if ok else '  <-- large'}")
    print("\ncorrectness:", "OK" if all_ok else "CHECK the rows marked large")
    return all_ok


# ----------------------------------------------------------------------------------------------------------
# No GPU: a smoke test in the interpreter
# ----------------------------------------------------------------------------------------------------------

def cpu_smoke():
    print("No CUDA GPU found: the speed/memory table needs one. Running a tiny correctness and timing smoke "
          "test in Triton's CPU interpreter instead (timings say nothing about GPU speed).\n")
    print(f"| {'dtype':<9} | {'causal':>6} | {'docs':>5} | {'fwd+bwd s':>9} | {'max |o err|':>11} | "
          f"{'max |grad err|':>14} |")
    print("|-----------|--------|-------|-----------|-------------|----------------|")
    B, H, T, D = 1, 2, 50, 32
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(4)]
    doc_ids = torch.tensor([[0] * 20 + [1] + [2] * 29])
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for causal, docs in ((True, None), (False, None), (True, doc_ids)):
            q, k, v, do = (x.to(dtype) for x in base)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            start = time.perf_counter()
            out = flash_attention(q, k, v, causal, docs)
            grads = torch.autograd.grad(out, (q, k, v), do)
            seconds = time.perf_counter() - start
            ref = reference_outputs_cpu(q, k, v, do, causal, docs)
            o_err = (out.double() - ref[0]).abs().max().item()
            g_err = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref[1:]))
            ok &= max(o_err, g_err) < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
            print(f"| {str(dtype)[6:]:<9} | {str(causal):>6} | {str(docs is not None):>5} | {seconds:>9.2f} | "
                  f"{o_err:>11.1e} | {g_err:>14.1e} |")
    _, lse = flash_attention_forward(*(x.float() for x in base[:3]))
    print(f"\nlog-sum-exp finite: {bool(torch.isfinite(lse).all())};  smoke test:", "OK" if ok else "FAILED")
    return ok


def reference_outputs_cpu(q, k, v, do, causal, doc_ids):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = naive_attention(q, k, v, causal, doc_ids)
    return (out, *torch.autograd.grad(out, (q, k, v), do.double()))


def main():
    args = parse_args()
    if not HAS_GPU:
        sys.exit(0 if cpu_smoke() else 1)
    import triton
    print(f"# Attention benchmark on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"triton {triton.__version__})")
    ok = correctness_check()
    speed_table(args)
    document_table(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
