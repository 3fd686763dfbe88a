"""Parallel parity: every strategy of train_gpt.py against one process, and what PowerSGD compression costs.

Runs the same steps (same global batch, same seed, fp32) once in a single process and once per strategy with
torchrun on CPU processes (gloo), and prints the largest relative difference of the per-step loss and gradient
norm: DDP, FSDP and the hand-written all-reduce on 2 processes; tensor (tp), pipeline (pp) and ZeRO-1 (zero1)
on 2; data × tensor (dp-tp) on 4. Then DDP with PowerSGD at two ranks, which is lossy: on a token stream a
model can learn, its validation loss after some steps beside plain DDP's, and the gradient values it
all-reduces per step. On a GPU machine the same runs use NCCL.

    python bench/parity.py [--steps 10] [--skip-4] [--powersgd-steps 100]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.shards import write_shard  # noqa: E402

GLOBAL_BATCH = 16
# name, processes, micro-batch, micro-batches per step and rank (gradient accumulation; pp: through the pipeline)
STRATEGIES = [
    ("ddp", 2, 4, 2, ["--parallel", "ddp"]),
    ("manual", 2, 4, 2, ["--parallel", "manual"]),
    ("fsdp", 2, 8, 1, ["--parallel", "fsdp"]),
    ("tp", 2, 8, 2, ["--parallel", "tp"]),                       # both ranks read the same rows
    ("pp", 2, 4, 4, ["--parallel", "pp", "--micro-batches", "4"]),  # every stage sees the whole batch
    ("zero1", 2, 4, 2, ["--parallel", "zero1"]),
    ("dp-tp", 4, 4, 2, ["--parallel", "dp-tp", "--tp", "2"]),    # two DP groups of two TP ranks
]


def write_data(directory, vocab_size=256, n_tokens=100_000, learnable=False):
    """Shards of uniform random tokens, or with learnable=True of a stream a model can learn: mostly
    t_{i+1} = (3·t_i + 1) mod V, a random token one time in ten."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        tokens = rng.integers(0, vocab_size, n_tokens)
        if learnable:
            for i in np.flatnonzero(rng.random(n_tokens) > 0.1):
                tokens[i] = (3 * tokens[i - 1] + 1) % vocab_size
        write_shard(os.path.join(directory, f"{split}_000000.bin"), tokens, vocab_size)
    meta = {"vocab_size": vocab_size, "eot_token": 0, "tokenizer": "tokenizer", "train_shards": ["train_000000.bin"],
            "val_shards": ["val_000000.bin"], "train_tokens": n_tokens, "val_tokens": n_tokens, "val_bytes": n_tokens}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def run(nproc, data, out, steps, flags):
    argv = ["train_gpt.py", "train", "--data", data, "--out", out, "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
            "--block-size", "64", "--global-batch-size", str(GLOBAL_BATCH), "--max-steps", str(steps),
            "--warmup-steps", "2", "--eval-every", "1000", "--eval-windows", "32", "--log-every", "1000",
            "--device", "cpu", *flags]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env=env, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    steps = [r for r in records if "loss" in r]
    events = [r for r in records if r.get("event") == "parallel"]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return np.array([r["loss"] for r in steps]), np.array([r["grad_norm"] for r in steps]), events, val[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--skip-4", action="store_true", help="leave out the 4-process dp-tp run")
    parser.add_argument("--powersgd-steps", type=int, default=100, help="optimizer steps of the PowerSGD comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_data(data)
        loss, grad_norm, _, _ = run(1, data, os.path.join(tmp, "single"), args.steps, ["--micro-batch-size", "16"])
        print(f"{args.steps} steps, global batch {GLOBAL_BATCH}, fp32, L=2, d=64, 4 heads, T=64\n")
        print("| strategy | processes | micro-batch | accumulation / micro-batches | max rel. diff loss | "
              "max rel. diff grad norm |")
        print("|---|---|---|---|---|---|")
        for name, nproc, micro, per_step, flags in STRATEGIES:
            if nproc == 4 and args.skip_4:
                continue
            l, g, _, _ = run(nproc, data, os.path.join(tmp, name), args.steps,
                             [*flags, "--micro-batch-size", str(micro)])
            print(f"| {name} | {nproc} | {micro} | {per_step} | {np.max(np.abs(l - loss) / np.abs(loss)):.1e} "
                  f"| {np.max(np.abs(g - grad_norm) / np.abs(grad_norm)):.1e} |")

        # PowerSGD: lossy, so compared on data a model can learn, over more steps, by validation loss.
        learnable = os.path.join(tmp, "learnable")
        os.makedirs(learnable)
        write_data(learnable, learnable=True)
        steps = args.powersgd_steps
        print(f"\nPowerSGD on DDP: 2 processes, micro-batch 8, {steps} steps on a learnable token stream (whole "
              f"gradients all-reduced for the first 10), validation loss at the end\n")
        print("| gradient exchange | train loss, last step | validation loss | gradient values all-reduced per step "
              "| bytes vs DDP |")
        print("|---|---|---|---|---|")
        flags = ["--parallel", "ddp", "--micro-batch-size", "8"]
        l, _, _, val = run(2, learnable, os.path.join(tmp, "ddp8"), steps, flags)
        print(f"| DDP (all-reduce) | {l[-1]:.4f} | {val:.4f} | all | 1 |")
        for rank in (1, 4):
            l, _, events, val = run(2, learnable, os.path.join(tmp, f"powersgd{rank}"), steps,
                                    [*flags, "--powersgd-rank", str(rank), "--powersgd-start-step", "10"])
            event = events[0]
            print(f"| PowerSGD rank {rank} | {l[-1]:.4f} | {val:.4f} | {event['compressed_values_per_step']:,.0f} of "
                  f"{event['values_per_step']:,.0f} | 1/{event['compression_rate']:.1f} |")


if __name__ == "__main__":
    main()
