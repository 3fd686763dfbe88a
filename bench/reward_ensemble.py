"""Reward-model ensembles (seed 3.5, prevention 3): each member, the mean and the min of the first
2…M members, on the same held-out comparisons and the same held-out SFT samples. Prints a table of
clean pairwise accuracy (against the noise-free labels), accuracy against the noisy labels, and the
within-prompt Spearman correlation with the gold judge — the two numbers issue 15 asks of r_φ.

    python bench/reward_ensemble.py --sft runs/i15/sft/model.pt \\
        --val-data runs/i15/reward/preferences_val.jsonl \\
        --members runs/i15/reward/model.pt runs/ens/s1338/model.pt runs/ens/s1339/model.pt

Members come from `reward.py --data runs/i15/reward/preferences_train.jsonl --val-data … --seed S`
(the same comparisons, different head init and data order) or from `reward.py --seed S` with the main
job's flags (bagging: comparisons on other prompts, sampled and labelled afresh).
"""

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.tokenizer import load_tokenizer  # noqa: E402
from reward import (RewardEnsemble, correlations, evaluate_pairs, heldout_samples, load_preferences,  # noqa: E402
                    load_reward_model, load_sft, preference_batches, reward_vs_gold, tokenize_preferences)
from sft import chat_tokens, comma_list  # noqa: E402


def ensembles(members):
    """Each member alone, then the mean and the min of the first k members for k = 2…M."""
    models = {f"member {i + 1}": m for i, m in enumerate(members)}
    for k in range(2, len(members) + 1):
        models[f"mean of {k}"] = RewardEnsemble(members[:k], "mean")
        models[f"min of {k}"] = RewardEnsemble(members[:k], "min")
    return models


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", required=True, help="the SFT checkpoint that samples the held-out responses")
    p.add_argument("--val-data", required=True, help="held-out preference JSONL with clean labels (reward.py's)")
    p.add_argument("--members", nargs="+", required=True, help="reward-model checkpoints")
    p.add_argument("--eval-prompts", type=int, default=200, help="test-split prompts sampled --k times")
    p.add_argument("--k", type=int, default=8, help="samples per held-out prompt")
    p.add_argument("--families", type=comma_list(str), default=["reverse", "upper"], help="task families")
    p.add_argument("--seed", type=int, default=1337, help="seed of the held-out samples (reward.py's default)")
    args = p.parse_args()
    device, autocast = torch.device("cpu"), contextlib.nullcontext()
    policy, checkpoint = load_sft(args.sft, device)
    enc = load_tokenizer(checkpoint["tokenizer"])
    pairs = tokenize_preferences(load_preferences(args.val_data), enc, policy.config.block_size)[0]
    batches = preference_batches(pairs, 16, chat_tokens(enc).pad, "prompt")
    sampling = argparse.Namespace(eval_prompts=args.eval_prompts, families=args.families, levels=None, k=args.k,
                                  temperature=1.0, max_new_tokens=32, gen_batch_size=64, seed=args.seed)
    samples = heldout_samples(policy, enc, sampling, device, autocast)
    print(f"{len(pairs)} held-out pairs, {len(samples)} held-out samples ({args.eval_prompts} prompts × {args.k})\n")
    print("| r_φ | clean accuracy | noisy accuracy | within-prompt Spearman | within-prompt corr. with length |")
    print("|---|---|---|---|---|")
    for name, model in ensembles([load_reward_model(m) for m in args.members]).items():
        val = evaluate_pairs(model, batches, device)
        c = correlations(*reward_vs_gold(model, enc, samples))
        print(f"| {name} | {val['clean_accuracy']:.3f} | {val['accuracy']:.3f} | "
              f"{c['spearman_gold_within_prompt']:.3f} | {c['pearson_length_within_prompt']:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
