"""Training throughput: tokens/s and MFU of train_gpt.py's loop against a bare nanoGPT-style loop.

Both run the same model, batch and maths (AdamW, clipping, fp32 on CPU / bf16 autocast on GPU);
the bare loop has none of our bookkeeping (NaN checks, spike detection, metrics, checkpoints),
so the ratio shows what that bookkeeping costs.

    python bench/train_throughput.py                 # small config; CPU, or GPU if present
    python bench/train_throughput.py --gpt2          # GPT-2 124M at T=1024 (GPU)
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402
from data.shards import write_shard  # noqa: E402


def make_data(directory, vocab_size, n_tokens):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", n_tokens // 10)):
        write_shard(os.path.join(directory, f"{split}_000000.bin"), rng.integers(0, vocab_size, n), vocab_size)
    meta = {"vocab_size": vocab_size, "eot_token": 0, "tokenizer": "tokenizer", "train_shards": ["train_000000.bin"],
            "val_shards": ["val_000000.bin"], "train_tokens": n_tokens, "val_tokens": n_tokens // 10,
            "val_bytes": 4 * n_tokens // 10}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def bare_loop(config, batch_size, steps, device, compile_model):
    """The plainest loop: random windows, forward, backward, clip, AdamW step."""
    torch.manual_seed(0)
    model = tg.GPT(config).to(device)
    optimizer = model.configure_optimizer(3e-4, 0.1, device_type=device.type)
    if compile_model:
        model = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    data = torch.randint(0, config.vocab_size, (batch_size * 64, config.block_size + 1))
    times = []
    for step in range(steps):
        t0 = time.time()
        rows = torch.randint(0, len(data), (batch_size,))
        x, y = data[rows, :-1].to(device), data[rows, 1:].to(device)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # synchronise, as our loop does when it logs
        times.append(time.time() - t0)
    return batch_size * config.block_size / statistics.median(times[steps // 3:])


def train_argv(config, batch_size, steps, device, compile_model, attention, data, out):
    """`train_gpt.py train` flags for a throughput run: one optimizer step per micro-batch, no evaluation or
    checkpoint before the last step, one validation window then."""
    argv = ["train", "--data", data, "--out", out, "--n-layer", str(config.n_layer),
            "--n-head", str(config.n_head), "--n-embd", str(config.n_embd), "--block-size", str(config.block_size),
            "--micro-batch-size", str(batch_size), "--global-batch-size", str(batch_size),
            "--max-steps", str(steps), "--warmup-steps", "1", "--eval-every", str(10 * steps),
            "--checkpoint-every", str(10 * steps), "--log-every", str(10 * steps), "--eval-windows", "1",
            "--device", device.type, "--attention", attention]
    return argv + (["--compile"] if compile_model else [])


def steady_tokens_per_sec(metrics_path, steps):
    """Median tokens/s of a run's steps after the first third (warm-up, compilation, autotuning)."""
    with open(metrics_path) as f:
        rates = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r]
    return statistics.median(rates[steps // 3:])


def our_loop(config, batch_size, steps, device, compile_model, attention):
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        make_data(data, config.vocab_size, max(200_000, 20 * batch_size * config.block_size))
        out = os.path.join(tmp, "run")
        tg.main(train_argv(config, batch_size, steps, device, compile_model, attention, data, out))
        return steady_tokens_per_sec(os.path.join(out, "metrics.jsonl"), steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpt2", action="store_true", help="GPT-2 124M at T=1024 (for a GPU)")
    parser.add_argument("--steps", type=int, default=30, help="steps per measurement (first third is warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpt2:
        config = tg.GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
        batch_size = args.batch_size or 16
    else:
        config = tg.GPTConfig(vocab_size=4102, block_size=256, n_layer=4, n_head=4, n_embd=128)
        batch_size = args.batch_size or 16
    attention = "flash" if device.type == "cuda" else "sdpa"
    n_params = tg.count_params(tg.GPT(config))
    flops = tg.flops_per_token(n_params, config.n_layer, config.block_size, config.n_embd)
    peak = tg.device_peak_flops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: L={config.n_layer} d={config.n_embd} T={config.block_size}, "
          f"N={n_params:,}; batch {batch_size}; compile={args.compile}")
    bare = bare_loop(config, batch_size, args.steps, device, args.compile)
    ours = our_loop(config, batch_size, args.steps, device, args.compile, attention)
    print(f"\n| loop | attention | tokens/s | MFU |\n|---|---|---|---|")
    for label, rate, attn in (("bare nanoGPT-style", bare, "sdpa"), ("train_gpt.py", ours, attention)):
        mfu = f"{100 * tg.mfu(rate, flops, peak):.1f}%" if peak else "n/a"
        print(f"| {label} | {attn} | {rate:,.0f} | {mfu} |")
    print(f"\ntrain_gpt.py / bare = {ours / bare:.2f}")


if __name__ == "__main__":
    main()
