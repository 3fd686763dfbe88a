"""GPU acceptance run: in one command on one H100/H200, everything a first GPU user would meet, in ≤ 8 minutes.

    python3 bench/gpu_acceptance.py                      # on the GPU machine; report in runs/gpu_acceptance/
    python3 bench/gpu_acceptance.py --parts a,b          # some of the parts only
    python bench/gpu_acceptance.py --dry-run             # without a GPU: the same code paths at toy sizes

Parts (each with its own time limit inside --budget-s; a part that fails or runs out of time is recorded,
with the reason, and the next one runs):

  (a) accuracy: our flash forward/backward in fp16 and bf16 against an fp64 reference, T ∈ {128, 1k, 4k, 8k},
      d ∈ {64, 128}, causal and document masks; SDPA's own error on the same inputs is the yardstick
  (b) speed: TFLOP/s of forward and backward against SDPA's flash backend and the naive version (bf16)
  (c) train_gpt.py on GPT-2 124M (T = 1024, bf16): tokens/s and MFU with sdpa and flash, with and without
      --compile
  (d) torchrun --nproc_per_node=1 with --parallel ddp and fsdp, a few steps each; FSDP's sharded checkpoint
      resumed, then gathered into one file that must equal the final weights
  (e) a short slice of the PRESET=gpu pipeline (the Makefile's flags, fewer steps): data, pretraining, SFT,
      reward model, one PPO iteration

It writes OUT/report.md and OUT/report.json, rewritten after every part, so a run cut short still leaves
what it measured. Nothing is installed or downloaded: it needs the GPU machine's own Python (torch, triton,
numpy, tiktoken). Targets (issue 16): forward ≥ 1.0× SDPA's flash backend at T ≥ 2k, backward ≥ 0.8×,
GPT-2 124M MFU ≥ 45 %. Before the parts, the Triton kernels of every (dtype, head dim, mask) the run
needs are compiled in parallel processes (Triton's disk cache), so the parts do not wait for one
compile after another.
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (bench/attention.py does too)

import attention as attention_bench  # noqa: E402  (bench/attention.py)
import train_throughput  # noqa: E402  (bench/train_throughput.py)

import train_gpt as tg  # noqa: E402
from kernels.flash_attention import flash_attention, reference_attention_mask  # noqa: E402

PARTS = {
    "a": "accuracy against fp64 (ours and SDPA)",
    "b": "attention speed (ours, SDPA flash, naive)",
    "c": "GPT-2 124M training throughput and MFU",
    "d": "torchrun: DDP, FSDP and a sharded checkpoint round-trip",
    "e": "PRESET=gpu pipeline slice: data, pretraining, SFT, reward model, one PPO iteration",
}
FORWARD_TARGET, BACKWARD_TARGET, MFU_TARGET = 1.0, 0.8, 0.45   # × SDPA flash at T ≥ 2k; GPT-2 124M MFU


@dataclass
class Sizes:
    """Every size the run uses: the GPU's, or the dry run's toy ones (same code paths)."""
    budgets: dict                       # part → seconds it may use (savings roll over to the next part)
    accuracy_lengths: tuple
    accuracy_head_dims: tuple
    accuracy_tokens: int                # batch = max(1, tokens // T), 2 heads
    speed_lengths: tuple
    speed_head_dims: tuple
    speed_tokens: int                   # batch = max(1, tokens // T) …
    speed_model_dim: int                # … heads = model_dim // d (bench/attention.py's convention)
    speed_budget_ms: float
    speed_warmup: int                   # calls before timing (compilation, autotuning)
    gpt: tg.GPTConfig                   # part (c)'s model
    gpt_batch: int
    gpt_steps: int
    gpt_runs: tuple                     # (attention, --compile) pairs of part (c)
    dist_args: list                     # part (d)'s model and batch flags
    dist_steps: int
    preset: str                         # part (e): the Makefile preset whose flags it runs
    preset_overrides: dict              # stage → flags appended (the last occurrence of a flag wins)
    device: str = "cuda"
    compile_backend: str = "inductor"   # train_gpt.py --compile-backend for part (c)'s --compile runs
    warm_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))


GPU_SIZES = Sizes(
    budgets={"warm-up": 45, "a": 75, "b": 60, "c": 170, "d": 45, "e": 85},
    accuracy_lengths=(128, 1024, 4096, 8192), accuracy_head_dims=(64, 128), accuracy_tokens=2048,
    speed_lengths=(1024, 2048, 4096, 8192), speed_head_dims=(64, 128), speed_tokens=16384, speed_model_dim=2048,
    speed_budget_ms=100.0, speed_warmup=3,
    gpt=tg.GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), gpt_batch=16,
    gpt_steps=24, gpt_runs=(("sdpa", False), ("flash", False), ("flash", True), ("sdpa", True)),
    dist_args=["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256",
               "--micro-batch-size", "16", "--global-batch-size", "16"],
    dist_steps=8,
    preset="gpu",
    preset_overrides={  # enough training that the reward model's samples are not all tied, in ~1.5 minutes
        "DATA": ["--max-bytes", "2000000"],
        "PRETRAIN": ["--max-steps", "300", "--warmup-steps", "30", "--eval-every", "150", "--checkpoint-every", "150",
                     "--eval-windows", "16"],
        "SFT": ["--num-conversations", "10000", "--epochs", "1", "--eval-tasks", "64"],
        "REWARD": ["--num-prompts", "400", "--eval-prompts", "64"],
        "PPO": ["--iterations", "1", "--rollouts", "128", "--minibatch-size", "64", "--eval-tasks", "0"],
    },
)


DRY_SIZES = Sizes(  # the smallest sizes that still take every branch (several tiles, masks, accumulation)
    budgets={"warm-up": 60, "a": 60, "b": 60, "c": 120, "d": 90, "e": 150},
    accuracy_lengths=(40,), accuracy_head_dims=(16,), accuracy_tokens=40,
    speed_lengths=(32,), speed_head_dims=(16,), speed_tokens=32, speed_model_dim=16, speed_budget_ms=1.0,
    speed_warmup=1,
    gpt=tg.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32), gpt_batch=2, gpt_steps=3,
    gpt_runs=(("flash", False), ("flash", True)),   # the two that run our kernels (sdpa: the same code path)
    dist_args=["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
               "--micro-batch-size", "4", "--global-batch-size", "4"],
    dist_steps=4,
    preset="tiny",
    preset_overrides={"PPO": ["--iterations", "1"]},   # the tiny preset as tests/test_pipeline.py runs it
    device="cpu", compile_backend="aot_eager", warm_workers=1,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_acceptance"),
                        help="report directory (report.md, report.json, and each part's work files)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run, of a,b,c,d,e")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for the whole run")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the same code paths at toy sizes on the CPU (kernels in the Triton interpreter)")
    parser.add_argument("--no-warm-up", action="store_true", help="skip compiling the kernels in parallel first")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose among {', '.join(PARTS)}")
    if not HAS_GPU and not args.dry_run:
        parser.error("no CUDA GPU here: run with --dry-run (toy sizes, CPU) or on a GPU machine")
    return args


# ----------------------------------------------------------------------------------------------------------
# Time limits and the report
# ----------------------------------------------------------------------------------------------------------

class PartTimeout(Exception):
    """A part ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM): a stuck compile or kernel cannot
    hold the other parts hostage. Subprocesses started inside are killed by `run_command`."""
    def on_alarm(signum, frame):
        raise PartTimeout(f"time limit of {seconds:.0f} s reached")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_command(cmd, log_path, timeout, env=None):
    """Run cmd (a list) with its output in log_path; returns (exit status, seconds, output).
    It runs in a session of its own so that on a timeout (or our own PartTimeout) the whole process tree
    dies with it; a timeout is raised as PartTimeout."""
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            raise PartTimeout(f"{os.path.basename(log_path)}: still running after {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log_path) as f:
        output = f.read()
    return proc.returncode, time.time() - started, output


def check_command(cmd, log_path, timeout, env=None):
    """run_command, raising RuntimeError (with the output's last lines) when the command fails; returns
    (seconds, output)."""
    status, seconds, output = run_command(cmd, log_path, timeout, env)
    if status != 0:
        raise RuntimeError(f"{' '.join(os.path.basename(c) for c in cmd[:4])} … exited {status}:\n{output[-3000:]}")
    return seconds, output


class Report:
    """The results so far, written as report.json and report.md after every part."""

    def __init__(self, out, args, sizes):
        self.out, self.started = out, time.time()
        self.data = {"environment": environment(), "dry_run": args.dry_run, "budget_s": args.budget_s,
                     "parts": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.sizes = sizes

    def add(self, key, title, result):
        self.data["parts"][key] = {"title": title, **result}
        self.data["seconds"] = time.time() - self.started
        self.write()

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        for name, text in (("report.json", json.dumps(self.data, indent=1, default=str)),
                           ("report.md", self.markdown())):
            tmp = os.path.join(self.out, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name))

    def markdown(self):
        env = self.data["environment"]
        dry = " (dry run: toy sizes, CPU, Triton interpreter)" if self.data["dry_run"] else ""
        lines = [f"# GPU acceptance run{dry}",
                 "", f"{env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
                 f"Python {env['python']}; started {self.data['started']}, "
                 f"{self.data.get('seconds', 0):.0f} s of a {self.data['budget_s']:.0f} s budget.", "",
                 "| part | what | status | seconds | verdict |", "|---|---|---|---|---|"]
        for key, part in self.data["parts"].items():
            lines.append(f"| {key} | {part['title']} | {part['status']} | {part.get('seconds', 0):.0f} | "
                         f"{part.get('verdict', '')} |")
        for key, part in self.data["parts"].items():
            lines += ["", f"## ({key}) {part['title']}", ""]
            if part.get("markdown"):
                lines += part["markdown"]
            if part.get("error"):
                lines += ["", "```", part["error"].rstrip(), "```"]
        return "\n".join(lines) + "\n"


def environment():
    import triton
    return {"device": torch.cuda.get_device_name() if HAS_GPU else f"CPU ({os.cpu_count()} cores), no GPU",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node()}


def table(header, rows):
    """Markdown table lines from a header list and rows of already formatted cells."""
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------------
# Warm-up: compile the kernels the parts need, in parallel
# ----------------------------------------------------------------------------------------------------------

def warm_combinations(sizes):
    """(dtype, head dim, documents) of every flash-attention call the parts make (all causal)."""
    head_dims = sorted(set(sizes.accuracy_head_dims) | set(sizes.speed_head_dims)
                       | {sizes.gpt.n_embd // sizes.gpt.n_head})
    return [(dtype, d, docs) for dtype in ("float16", "bfloat16") for d in head_dims for docs in (False, True)]


def warm_one(dtype, head_dim, with_docs, device):
    """One forward + backward through the autotuner: compiles (and caches on disk) every config of the
    three kernels for this (dtype, head dim, mask). Runs in a worker process."""
    T = 256 if device == "cuda" else 16
    q, k, v, do = attention_bench.random_qkv(1, 2, T, head_dim, getattr(torch, dtype), device=device)
    doc_ids = (torch.arange(T, device=device) // (T // 3)).expand(1, T).contiguous() if with_docs else None
    torch.autograd.grad(flash_attention(q, k, v, True, doc_ids), (q, k, v), do)
    return dtype, head_dim, with_docs


def part_warm_up(sizes, work):
    started = time.time()
    combos = warm_combinations(sizes)
    if sizes.device == "cpu":
        combos = combos[:1]              # the interpreter compiles nothing: one call shows the path works
    # A pool of fresh processes; leaving the `with` (a time limit included) terminates them.
    with multiprocessing.get_context("spawn").Pool(sizes.warm_workers) as pool:
        done = pool.starmap(warm_one, [(*combo, sizes.device) for combo in combos])
    rows = [(dtype, d, "causal+docs" if docs else "causal") for dtype, d, docs in done]
    return {"status": "ok", "verdict": f"{len(done)} combinations compiled in {time.time() - started:.0f} s",
            "markdown": table(["dtype", "d", "mask"], rows)}


# ----------------------------------------------------------------------------------------------------------
# (a) accuracy against fp64
# ----------------------------------------------------------------------------------------------------------

def document_ids(T, device):
    """Three documents of uneven lengths (≈ 3/8, 1/8, 1/2 of T) packed into one row of T tokens."""
    cuts = torch.tensor([3 * T // 8, T // 2], device=device)
    return torch.bucketize(torch.arange(T, device=device), cuts, right=True)[None]


def sdpa_on_same_inputs(doc_ids):
    """SDPA as the yardstick: its flash backend for the causal mask; for documents, which its flash backend
    does not take, a boolean mask (SDPA then runs its memory-efficient or math kernel)."""
    def sdpa(q, k, v):
        if doc_ids is None:
            return attention_bench.sdpa_flash(q, k, v, True)
        allowed = reference_attention_mask(q.shape[2], True, doc_ids, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return sdpa


def part_accuracy(sizes, work):
    rows, failures, results = [], 0, []
    for D in sizes.accuracy_head_dims:
        for T in sizes.accuracy_lengths:
            B = max(1, sizes.accuracy_tokens // T)
            for dtype in (torch.float16, torch.bfloat16):
                for mask in ("causal", "documents"):
                    q, k, v, do = attention_bench.random_qkv(B, 2, T, D, dtype, seed=T + D, device=sizes.device)
                    doc_ids = document_ids(T, sizes.device).expand(B, T).contiguous() if mask == "documents" else None
                    reference = attention_bench.reference_outputs(q, k, v, do, True, doc_ids, torch.float64)
                    ours = attention_bench.relative_errors(
                        q, k, v, do, lambda q, k, v: flash_attention(q, k, v, True, doc_ids), reference)
                    sdpa = attention_bench.relative_errors(q, k, v, do, sdpa_on_same_inputs(doc_ids), reference)
                    del reference
                    # Ours may be at most twice SDPA's error (plus a floor for errors near zero). Not judged:
                    # bf16 in the interpreter, whose fp32 → bf16 conversion truncates instead of rounding.
                    judged = sizes.device == "cuda" or dtype != torch.bfloat16
                    ok = all(o <= 2 * s + 1e-4 for o, s in zip(ours, sdpa))
                    failures += judged and not ok
                    name = str(dtype).removeprefix("torch.")
                    results.append({"d": D, "T": T, "batch": B, "dtype": name, "mask": mask, "ours": ours,
                                    "sdpa": sdpa, "ok": ok, "judged": judged})
                    cell = "ok" if ok else "**> 2× SDPA**" if judged else "> 2× SDPA (interpreter bf16: not judged)"
                    rows.append([D, T, name, mask] + [f"{o:.1e} / {s:.1e}" for o, s in zip(ours, sdpa)] + [cell])
    judged = sum(r["judged"] for r in results)
    verdict = f"{judged - failures}/{judged} judged cases within 2× SDPA's error"
    md = ["max |x − x_fp64| / max |x_fp64| for O, dQ, dK, dV; each cell: ours / SDPA on the same inputs "
          "(SDPA: flash backend when causal, a boolean mask for documents). Batch = "
          f"max(1, {sizes.accuracy_tokens} // T), 2 heads.", ""]
    md += table(["d", "T", "dtype", "mask", "O", "dQ", "dK", "dV", "verdict"], rows)
    return {"status": "ok" if failures == 0 else "failed", "verdict": verdict, "results": results, "markdown": md}


# ----------------------------------------------------------------------------------------------------------
# (b) attention speed
# ----------------------------------------------------------------------------------------------------------

def part_speed(sizes, work):
    methods = [("ours", attention_bench.ours), ("sdpa-flash", attention_bench.sdpa_flash),
               ("naive", attention_bench.naive)]
    results, rows, misses = [], [], []
    for D in sizes.speed_head_dims:
        for T in sizes.speed_lengths:
            B, H = max(1, sizes.speed_tokens // T), max(1, sizes.speed_model_dim // D)
            q, k, v, do = attention_bench.random_qkv(B, H, T, D, torch.bfloat16, device=sizes.device)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            flops = attention_bench.forward_flops(B, H, T, D, True)
            timing, first_row = {}, len(rows)
            for name, method in methods:
                if name == "naive" and not attention_bench.naive_fits(B, H, T):
                    continue
                try:
                    fwd_ms, bwd_ms, peak = attention_bench.measure(method, q, k, v, do, True, sizes.speed_budget_ms,
                                                                   warmup=sizes.speed_warmup)
                except torch.cuda.OutOfMemoryError:
                    rows.append([D, T, f"{B}×{H}", name, "out of memory"] + [""] * 6)
                    torch.cuda.empty_cache()
                    continue
                timing[name] = (fwd_ms, bwd_ms)
                results.append({"d": D, "T": T, "B": B, "H": H, "method": name, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
                                "fwd_tflops": flops / fwd_ms / 1e9, "bwd_tflops": 2.5 * flops / bwd_ms / 1e9,
                                "peak_mib": peak})
                rows.append([D, T, f"{B}×{H}", name, f"{fwd_ms:.3f}", f"{flops / fwd_ms / 1e9:.1f}", f"{bwd_ms:.3f}",
                             f"{2.5 * flops / bwd_ms / 1e9:.1f}", "—" if math.isnan(peak) else f"{peak:.0f}", "", ""])
            if "ours" in timing and "sdpa-flash" in timing:
                fwd_ratio = timing["sdpa-flash"][0] / timing["ours"][0]
                bwd_ratio = timing["sdpa-flash"][1] / timing["ours"][1]
                rows[first_row][-2:] = [f"{fwd_ratio:.2f}×", f"{bwd_ratio:.2f}×"]
                results.append({"d": D, "T": T, "fwd_vs_sdpa": fwd_ratio, "bwd_vs_sdpa": bwd_ratio})
                if T >= 2048 and (fwd_ratio < FORWARD_TARGET or bwd_ratio < BACKWARD_TARGET):
                    misses.append(f"d={D} T={T}: fwd {fwd_ratio:.2f}×, bwd {bwd_ratio:.2f}×")
            del q, k, v, do
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
    md = ["Causal, bf16. TFLOP/s: forward 4·B·H·T²·d / 2, backward 2.5× that. The last two columns: our "
          f"speed as a multiple of SDPA's flash backend (targets at T ≥ 2k: forward ≥ {FORWARD_TARGET}×, "
          f"backward ≥ {BACKWARD_TARGET}×).", ""]
    md += table(["d", "T", "B×H", "method", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "peak MiB",
                 "fwd vs SDPA", "bwd vs SDPA"], rows)
    verdict = "targets met" if not misses else "below target: " + "; ".join(misses)
    return {"status": "ok" if not misses else "below target", "verdict": verdict, "results": results,
            "markdown": md}


# ----------------------------------------------------------------------------------------------------------
# (c) GPT-2 124M throughput and MFU
# ----------------------------------------------------------------------------------------------------------

def part_gpt2(sizes, work, deadline):
    config, steps = sizes.gpt, sizes.gpt_steps
    data = os.path.join(work, "c_data")
    os.makedirs(data, exist_ok=True)
    train_throughput.make_data(data, config.vocab_size, max(200_000, 20 * sizes.gpt_batch * config.block_size))
    n_params = tg.count_params(tg.GPT(config))
    flops = tg.flops_per_token(n_params, config.n_layer, config.block_size, config.n_embd)
    peak = tg.device_peak_flops(torch.device(sizes.device))
    results, rows = [], []
    for attention, compile_model in sizes.gpt_runs:
        label = f"{attention}{' + compile' if compile_model else ''}"
        out = os.path.join(work, f"c_{attention}{'_compile' if compile_model else ''}")
        shutil.rmtree(out, ignore_errors=True)
        argv = train_throughput.train_argv(config, sizes.gpt_batch, steps, torch.device(sizes.device),
                                           compile_model, attention, data, out)
        if compile_model:
            argv += ["--compile-backend", sizes.compile_backend]
        try:
            seconds, _ = check_command([sys.executable, os.path.join(ROOT, "train_gpt.py"), *argv],
                                       out + ".log", deadline - time.time())
        except (RuntimeError, PartTimeout) as error:
            rows.append([label, "—", "—", "—", str(error).splitlines()[0][:120]])
            results.append({"run": label, "error": str(error)})
            if isinstance(error, PartTimeout):
                break
            continue
        rate = train_throughput.steady_tokens_per_sec(os.path.join(out, "metrics.jsonl"), steps)
        mfu = tg.mfu(rate, flops, peak) if peak else None
        results.append({"run": label, "tokens_per_sec": rate, "mfu": mfu, "wall_s": seconds})
        rows.append([label, f"{rate:,.0f}", f"{100 * mfu:.1f}%" if mfu is not None else "n/a", f"{seconds:.0f}", ""])
    best = max((r["mfu"] for r in results if r.get("mfu") is not None), default=None)
    md = [f"L={config.n_layer}, d={config.n_embd}, T={config.block_size}, V={config.vocab_size}, "
          f"N={n_params:,} non-embedding parameters, batch {sizes.gpt_batch}, {steps} steps (median tokens/s "
          f"after the first third), bf16 autocast; MFU = tokens/s · (6N + 12·L·T·d) / peak "
          f"({peak / 1e12:.0f} TFLOP/s)." if peak else "MFU: no peak FLOP/s known for this device.", ""]
    md += table(["run", "tokens/s", "MFU", "wall s", "note"], rows)
    errors = [r for r in results if "error" in r]
    verdict = (f"best MFU {100 * best:.1f}% (target {100 * MFU_TARGET:.0f}%)" if best is not None
               else f"{len(results) - len(errors)} of {len(sizes.gpt_runs)} runs finished")
    status = "failed" if errors else "below target" if best is not None and best < MFU_TARGET else "ok"
    return {"status": status, "verdict": verdict, "results": results, "markdown": md}


# ----------------------------------------------------------------------------------------------------------
# (d) torchrun: DDP, FSDP, sharded checkpoint round-trip
# ----------------------------------------------------------------------------------------------------------

def read_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def part_torchrun(sizes, work, deadline):
    data = os.path.join(work, "d_data")
    os.makedirs(data, exist_ok=True)
    train_throughput.make_data(data, 256, 200_000)
    steps, half = sizes.dist_steps, sizes.dist_steps // 2
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                os.path.join(ROOT, "train_gpt.py"), "train", "--data", data, "--device", sizes.device,
                "--warmup-steps", "1", "--eval-every", "1000", "--eval-windows", "2", "--log-every", "1000",
                *sizes.dist_args]
    rows, checks = [], []

    def launch(name, out, *extra):
        seconds, output = check_command([*torchrun, "--out", out, *extra], os.path.join(work, f"d_{name}.log"),
                                      deadline - time.time())
        losses = read_losses(out)
        rows.append([name, " ".join(extra), len(losses), f"{losses[min(losses)]:.4f} → {losses[max(losses)]:.4f}",
                     f"{seconds:.0f}"])
        return losses, output

    ddp_out, fsdp_out = os.path.join(work, "d_ddp"), os.path.join(work, "d_fsdp")
    for out in (ddp_out, fsdp_out):
        shutil.rmtree(out, ignore_errors=True)
    ddp, _ = launch("ddp", ddp_out, "--parallel", "ddp", "--max-steps", str(steps), "--checkpoint-every", str(steps))
    checks.append(("DDP: every step's loss is finite", all(math.isfinite(x) for x in ddp.values())))
    launch("fsdp (first half)", fsdp_out, "--parallel", "fsdp", "--max-steps", str(half),
           "--checkpoint-every", str(half))
    sharded = tg.checkpoint_paths(fsdp_out)[-1]
    checks.append((f"FSDP wrote a sharded checkpoint directory ({os.path.basename(sharded)})", os.path.isdir(sharded)))
    fsdp, output = launch("fsdp (resumed)", fsdp_out, "--parallel", "fsdp", "--max-steps", str(steps),
                        "--checkpoint-every", str(half), "--resume")
    checks.append((f"FSDP resumed from the sharded checkpoint at step {half}", f"at step {half}" in output))
    checks.append(("FSDP: steps 1 … N all logged, losses finite",
                   sorted(fsdp) == list(range(1, steps + 1)) and all(math.isfinite(x) for x in fsdp.values())))
    converted = os.path.join(work, "d_converted.pt")
    tg.main(["convert", tg.checkpoint_paths(fsdp_out)[-1], "--out", converted])
    gathered = torch.load(converted, weights_only=True)["model"]
    final = torch.load(os.path.join(fsdp_out, "model.pt"), weights_only=True)["model"]
    checks.append(("the gathered sharded checkpoint equals model.pt, tensor for tensor",
                   gathered.keys() == final.keys() and all(torch.equal(gathered[n], final[n]) for n in final)))
    gap = max(abs(fsdp[s] - ddp[s]) / abs(ddp[s]) for s in ddp)
    md = table(["run", "flags", "steps logged", "loss first → last", "wall s"], rows)
    md += ["", f"Largest relative difference of the per-step loss, FSDP vs DDP: {gap:.1e} (FSDP keeps bf16 "
           "parameters on CUDA, DDP fp32 under bf16 autocast: on a GPU they agree only roughly).", ""]
    md += [f"- {'✓' if ok else '✗'} {what}" for what, ok in checks]
    failed = [what for what, ok in checks if not ok]
    return {"status": "failed" if failed else "ok", "verdict": "all checks pass" if not failed else
            "failed: " + "; ".join(failed), "checks": [{"check": w, "ok": ok} for w, ok in checks],
            "fsdp_vs_ddp_loss_gap": gap, "markdown": md}


# ----------------------------------------------------------------------------------------------------------
# (e) a slice of the PRESET=gpu pipeline
# ----------------------------------------------------------------------------------------------------------

def makefile_flags(preset, stage, makefile=os.path.join(ROOT, "Makefile")):
    """The flags the Makefile gives one stage under one preset (`gpu_PRETRAIN := …`, continuation lines
    joined, $(VAR) filled in from the Makefile's own `VAR ?= …` defaults), as a list."""
    with open(makefile) as f:
        text = f.read().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(.*)$", text, re.MULTILINE))
    match = re.search(rf"^{preset}_{stage}\s*:=(.*)$", text, re.MULTILINE)
    if match is None:
        raise KeyError(f"Makefile: no {preset}_{stage} line")
    flags = re.sub(r"\$\((\w+)\)", lambda m: defaults[m.group(1)], match.group(1))
    return flags.split()


def last_metrics(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[-1] if records else {}


def part_preset(sizes, work, deadline):
    run = os.path.join(work, f"e_{sizes.preset}")
    shutil.rmtree(run, ignore_errors=True)
    python = [sys.executable]
    device = ["--device", sizes.device]

    def flags(stage):
        return makefile_flags(sizes.preset, stage) + sizes.preset_overrides.get(stage, [])

    stages = [
        ("data", python + ["-m", "data.prepare", "--out", f"{run}/data", *flags("DATA")]),
        ("pretrain", python + ["train_gpt.py", "train", "--data", f"{run}/data", "--out", f"{run}/pretrain",
                               *flags("PRETRAIN"), *device]),
        ("sft", python + ["sft.py", "--init", f"{run}/pretrain/model.pt", "--out", f"{run}/sft", *flags("SFT"),
                          *device]),
        ("reward", python + ["reward.py", "--sft", f"{run}/sft/model.pt", "--out", f"{run}/reward",
                             *flags("REWARD"), *device]),
        ("ppo", python + ["ppo.py", "--sft", f"{run}/sft/model.pt", "--reward-model", f"{run}/reward/model.pt",
                          "--out", f"{run}/ppo", *flags("PPO"), *device]),
    ]
    rows = []
    for name, cmd in stages:
        try:
            seconds, _ = check_command(cmd, os.path.join(work, f"e_{name}.log"), deadline - time.time())
        except (RuntimeError, PartTimeout) as error:
            rows.append([name, "failed", "—", str(error).splitlines()[0][:150]])
            md = [f"`{sizes.preset}` preset flags from the Makefile, with: " + "; ".join(
                f"{stage}: {' '.join(extra)}" for stage, extra in sizes.preset_overrides.items()), ""]
            return {"status": "failed", "verdict": f"{name} failed", "error": str(error),
                    "markdown": md + table(["stage", "status", "seconds", "numbers"], rows)}
        rows.append([name, "ok", f"{seconds:.0f}", stage_numbers(name, run)])
    md = [f"`{sizes.preset}` preset flags from the Makefile, with: " + "; ".join(
        f"{stage}: {' '.join(extra)}" for stage, extra in sizes.preset_overrides.items()), ""]
    return {"status": "ok", "verdict": "every stage ran", "markdown": md +
            table(["stage", "status", "seconds", "numbers"], rows)}


def stage_numbers(name, run):
    """A few numbers of one finished stage, read from what it wrote."""
    try:
        if name == "data":
            with open(f"{run}/data/meta.json") as f:
                meta = json.load(f)
            return f"{meta['train_tokens']:,} train tokens, vocabulary {meta['vocab_size']:,}"
        if name == "pretrain":
            with open(f"{run}/pretrain/metrics.jsonl") as f:
                records = [json.loads(line) for line in f]
            rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
            mfus = [r["mfu"] for r in records if r.get("mfu") is not None]
            val = [r["val_loss"] for r in records if "val_loss" in r]
            text = f"val loss {val[-1]:.3f}; {sorted(rates)[len(rates) // 2]:,.0f} tokens/s"
            return text + (f", MFU {100 * sorted(mfus)[len(mfus) // 2]:.1f}%" if mfus else "")
        metrics = last_metrics(f"{run}/{name}/metrics.jsonl")
        keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return ", ".join(f"{k} {v:.4g}" for k, v in list(keep.items())[:6])
    except (OSError, KeyError, ValueError, IndexError) as error:
        return f"(no numbers: {error})"


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    report = Report(out, args, sizes)
    deadline_all = time.time() + args.budget_s
    plan = ([] if args.no_warm_up else ["warm-up"]) + args.parts
    titles = {"warm-up": "compile the kernels in parallel (Triton's disk cache)", **PARTS}
    runners = {"warm-up": lambda d: part_warm_up(sizes, work), "a": lambda d: part_accuracy(sizes, work),
               "b": lambda d: part_speed(sizes, work), "c": lambda d: part_gpt2(sizes, work, d),
               "d": lambda d: part_torchrun(sizes, work, d), "e": lambda d: part_preset(sizes, work, d)}
    print(f"GPU acceptance run: {', '.join(plan)}; budget {args.budget_s:.0f} s; report in {out}", flush=True)
    for index, key in enumerate(plan):
        remaining = deadline_all - time.time()
        later = sum(sizes.budgets[k] for k in plan[index + 1:])
        limit = min(remaining, max(sizes.budgets[key], remaining - later))
        started = time.time()
        if limit < 10:
            result = {"status": "skipped", "verdict": f"skipped: {remaining:.0f} s of the budget left"}
        else:
            try:
                with time_limit(limit):
                    result = runners[key](started + limit)
            except Exception as error:  # noqa: BLE001  (PartTimeout included: record it, go on)
                result = {"status": "timed out" if isinstance(error, PartTimeout) else "failed",
                          "verdict": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:200],
                          "error": traceback.format_exc()[-4000:]}
        result["seconds"] = time.time() - started
        result["limit_s"] = limit
        report.add(key, titles[key], result)
        print(f"[{key}] {result['status']} in {result['seconds']:.0f} s: {result.get('verdict', '')}", flush=True)
    statuses = [part["status"] for part in report.data["parts"].values()]
    print(f"report: {os.path.join(out, 'report.md')} ({time.time() - report.started:.0f} s)")
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
