"""Data-parallel parity: DDP, FSDP and the hand-written all-reduce against one process.

Runs the same 10 steps (same global batch, same seed, fp32) once in a single process and once per
strategy with torchrun on 2 CPU processes (gloo), and prints the largest relative difference of the
per-step loss and gradient norm. With --nproc 2 and a GPU machine it runs on NCCL instead.

    python bench/parity.py [--nproc 2] [--steps 10]
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


def write_data(directory, vocab_size=256, n_tokens=100_000):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_shard(os.path.join(directory, f"{split}_000000.bin"), rng.integers(0, vocab_size, n_tokens), vocab_size)
    meta = {"vocab_size": vocab_size, "eot_token": 0, "tokenizer": "tokenizer", "train_shards": ["train_000000.bin"],
            "val_shards": ["val_000000.bin"], "train_tokens": n_tokens, "val_tokens": n_tokens, "val_bytes": n_tokens}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def run(nproc, data, out, steps, micro, parallel):
    argv = ["train_gpt.py", "train", "--data", data, "--out", out, "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
            "--block-size", "64", "--global-batch-size", "16", "--micro-batch-size", str(micro), "--max-steps",
            str(steps), "--warmup-steps", "2", "--eval-every", "1000", "--eval-windows", "2", "--log-every", "1000",
            "--device", "cpu", "--parallel", parallel]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env=env, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    return np.array([r["loss"] for r in records]), np.array([r["grad_norm"] for r in records])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes per strategy")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_data(data)
        loss, grad_norm = run(1, data, os.path.join(tmp, "single"), args.steps, 16, "none")
        print(f"{args.steps} steps, global batch 16, fp32; {args.nproc} processes per strategy\n")
        print("| strategy | micro-batch | accumulation | max rel. diff loss | max rel. diff grad norm |")
        print("|---|---|---|---|---|")
        for parallel, micro in (("ddp", 4), ("manual", 4), ("fsdp", 8)):
            accum = 16 // (micro * args.nproc)
            l, g = run(args.nproc, data, os.path.join(tmp, parallel), args.steps, micro, parallel)
            print(f"| {parallel} | {micro} | {accum} | {np.max(np.abs(l - loss) / np.abs(loss)):.1e} "
                  f"| {np.max(np.abs(g - grad_norm) / np.abs(grad_norm)):.1e} |")


if __name__ == "__main__":
    main()
