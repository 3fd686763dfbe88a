"""Memory and communication per GPU of every parallel strategy, for three model sizes (seed 1.7).

Model state per GPU is parallel/costs.py's memory_per_gpu (16 bytes per parameter a GPU holds: bf16 weights and
gradients, fp32 master weights and Adam moments; activations come on top); bytes sent per GPU and optimizer
step are parallel/costs.py's communication_per_step (ring collectives, 2-byte values). What a tensor-parallel rank or
a pipeline stage holds is counted on the real module layout (parallel/tensor.py, parallel/pipeline.py), built on
PyTorch's meta device, which allocates nothing. Formulas only: nothing runs.

    python bench/parallel_costs.py [--gpus 4]
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402
from parallel.costs import communication_per_step, memory_per_gpu  # noqa: E402
from parallel.pipeline import PipelineStage  # noqa: E402
from parallel.tensor import params_per_rank  # noqa: E402

# name, config, sequences per step (GPT-2 was trained on 512 sequences of 1,024 tokens)
MODELS = [
    ("CPU default (L=4, d=128)", tg.GPTConfig(vocab_size=4102, block_size=256, n_layer=4, n_head=4, n_embd=128), 16),
    ("GPT-2 124M (L=12, d=768)",
     tg.GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 512),
    ("GPT-2 XL (L=48, d=1600)",
     tg.GPTConfig(vocab_size=50304, block_size=1024, n_layer=48, n_head=25, n_embd=1600), 512),
]


def size(n_bytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def costs(config, sequences, n):
    """{strategy: (model state bytes per GPU, bytes sent per GPU and step)} on n GPUs (TP×DP: 2 × n/2)."""
    with torch.device("meta"):
        model = tg.GPT(config)
    psi = tg.count_params(model, non_embedding=False)
    tokens = sequences * config.block_size
    dims = dict(n_layer=config.n_layer, n_embd=config.n_embd, vocab_size=config.vocab_size)
    stage = max(sum(p.numel() for p in PipelineStage(model, s, n).parameters()) for s in range(n))
    tp_shard, dp_tp_shard = params_per_rank(model, n), params_per_rank(model, 2)
    return psi, {
        "DDP": (memory_per_gpu(psi, n, "ddp"), communication_per_step("ddp", psi, n)),
        "ZeRO-1": (memory_per_gpu(psi, n, "zero1"), communication_per_step("zero1", psi, n)),
        "FSDP / ZeRO-3": (memory_per_gpu(psi, n, "fsdp"), communication_per_step("fsdp", psi, n)),
        f"TP {n}": (memory_per_gpu(tp_shard, 1, "ddp"),
                    communication_per_step("tp", tp_shard, n, tp=n, tokens=tokens, **dims)),
        f"PP {n}": (memory_per_gpu(stage, 1, "ddp"),
                    communication_per_step("pp", stage, n, tokens=tokens, **dims)),
        f"TP 2 × DP {n // 2}": (memory_per_gpu(dp_tp_shard, 1, "ddp"),
                                communication_per_step("dp-tp", dp_tp_shard, n, tp=2, tokens=tokens // (n // 2),
                                                          **dims)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=4, help="GPUs N (TP N, PP N, and TP 2 × DP N/2)")
    args = parser.parse_args()
    rows = [(name, sequences, config, *costs(config, sequences, args.gpus)) for name, config, sequences in MODELS]
    strategies = list(rows[0][4])
    for title, which in (("model state per GPU", 0), ("bytes sent per GPU and step", 1)):
        print(f"\n{title}, {args.gpus} GPUs\n")
        print("| model | parameters | tokens/step | " + " | ".join(strategies) + " |")
        print("|---|---|---|" + "---|" * len(strategies))
        for name, sequences, config, psi, table in rows:
            cells = " | ".join(size(table[s][which]) for s in strategies)
            print(f"| {name} | {psi / 1e6:,.1f}M | {sequences * config.block_size:,} | {cells} |")


if __name__ == "__main__":
    main()
