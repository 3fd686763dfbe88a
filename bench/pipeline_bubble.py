"""The GPipe bubble, computed and measured: (p − 1)/(m + p − 1) against each stage's idle time (seed 1.7).

Trains a few steps with `--parallel pp` on p CPU processes (gloo) for several micro-batch counts m and prints,
per m, the formula (parallel/pipeline.bubble_fraction) beside the fraction of each step every rank spent not
computing (waiting for a neighbour, sending, the loss broadcast), the median over the steps.
The first stage also embeds the tokens and the last computes the LM head and the loss, so the stages are not
quite equal; with one process per core and nothing else running the measurement is cleanest.

    python bench/pipeline_bubble.py [--stages 2] [--micro-batches 1,2,4,8] [--steps 6]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.parity import write_data  # noqa: E402
from parallel.pipeline import bubble_fraction  # noqa: E402


def measure(stages, micro_batches, steps, data, out):
    argv = ["train_gpt.py", "train", "--data", data, "--out", out, "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
            "--block-size", "128", "--global-batch-size", "32", "--micro-batches", str(micro_batches),
            "--max-steps", str(steps), "--warmup-steps", "1", "--eval-every", "1000", "--eval-windows", "2",
            "--log-every", "1000", "--checkpoint-every", "1000", "--device", "cpu", "--parallel", "pp"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stages}"]
    subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:  # the run's summary: every rank's median step
        return next(r for r in map(json.loads, f) if r.get("event") == "parallel")["idle_fraction"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages p = processes")
    parser.add_argument("--micro-batches", default="1,2,4,8", help="micro-batch counts m to measure")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_data(data)
        print(f"p = {args.stages} stages, L=4, d=128, T=128, 32 sequences per step, {args.steps} steps\n")
        ranks = " | ".join(f"idle, rank {r}" for r in range(args.stages))
        print(f"| micro-batches m | (p − 1)/(m + p − 1) | {ranks} |")
        print("|---|---|" + "---|" * args.stages)
        for m in map(int, args.micro_batches.split(",")):
            idle = measure(args.stages, m, args.steps, data, os.path.join(tmp, f"m{m}"))
            print(f"| {m} | {bubble_fraction(args.stages, m):.3f} | " + " | ".join(f"{f:.3f}" for f in idle) + " |")


if __name__ == "__main__":
    main()
