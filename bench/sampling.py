"""Sampling speed: one categorical draw per row, and a whole PPO-sized rollout, by each sampler.

torch.multinomial draws one exponential per vocabulary entry; train_gpt.sample_categorical draws one
uniform per row and searches the CDF (inverse transform). Both sample the same distribution
(tests/test_train_gpt.py checks sample_categorical's frequencies); this prints what each costs.

    python bench/sampling.py                  # the cpu preset's shapes: 256 rows, vocabulary 4,096
    python bench/sampling.py --rows 64 --threads 1
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def multinomial(probs, generator=None):
    """The sampler before sample_categorical: torch's own, one exponential per entry."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rollout_seconds(model, prompts, new_tokens, sampler, repeats):
    """One `generate` of every prompt at T = 1 with `sampler` in place of sample_categorical."""
    original = tg.sample_categorical
    tg.sample_categorical = sampler
    try:
        generator = torch.Generator().manual_seed(0)
        return median_seconds(lambda: model.generate(prompts, new_tokens, 1.0, generator=generator), repeats)
    finally:
        tg.sample_categorical = original


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows sampled at once (PPO's rollouts per iteration)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (the cpu preset's tokenizer)")
    parser.add_argument("--prompt-tokens", type=int, default=28, help="prompt length of the rollout")
    parser.add_argument("--new-tokens", type=int, default=14, help="tokens generated per row (a judge batch's longest answer)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is printed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(args.rows, args.vocab_size), dim=-1)
    generator = torch.Generator().manual_seed(0)
    config = tg.GPTConfig(vocab_size=args.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=256)
    model = tg.GPT(config).eval()
    prompts = torch.randint(0, args.vocab_size, (args.rows, args.prompt_tokens), generator=generator)
    rows = []
    for name, sampler in (("torch.multinomial", multinomial), ("sample_categorical", tg.sample_categorical)):
        draw = median_seconds(lambda: sampler(probs, generator), 10 * args.repeats)
        with torch.no_grad():
            rollout = rollout_seconds(model, prompts, args.new_tokens, sampler, args.repeats)
        rows.append((name, draw, rollout))
    print(f"{args.rows} rows, vocabulary {args.vocab_size}, {args.threads} threads; rollout: L=4, d=128, "
          f"{args.prompt_tokens}-token prompts + {args.new_tokens} new tokens (KV cache)\n")
    print("| sampler | one draw per row | × | one rollout (generate) | × |")
    print("|---|---|---|---|---|")
    base_draw, base_rollout = rows[0][1], rows[0][2]
    for name, draw, rollout in rows:
        print(f"| {name} | {draw * 1e3:.2f} ms | {base_draw / draw:.1f} | {rollout:.3f} s | {base_rollout / rollout:.2f} |")


if __name__ == "__main__":
    main()
