"""experiments/alignment_claims.py — the seeds' claims about PPO and DPO, tested on our own pipeline.

Section 4.4 of the pipeline chapter (shared/seeds/000_…) compares PPO and DPO in a table, section 4.6
lists when DPO fails, and the blog post (shared/seeds/004_…) derives DPO from the RLHF objective. Each
claim becomes one experiment here, with the gold judge (data/tasks.py) as the arbiter:

    optimal      (4.2; blog) on a prompt set small enough to enumerate candidate answers, the exact
                 optimum π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β) over each prompt's candidates, and the
                 KL from it to what DPO and PPO learn                                    (optimal_policy)
    compute      (4.4: "PPO 3–4× more compute") wall time, FLOPs (our own 2N / 6N per token count) and
                 peak resident memory (resource.getrusage in a child process) of PPO and DPO
    noise        (4.6: "DPO is more sensitive to label noise") the same comparisons with a share of the
                 pairs flipped; DPO on them, and PPO on a reward model trained on them    (flip_labels)
    kl           (4.6: large KL budgets) gold against KL to π_SFT as β shrinks, DPO beside PPO
    sensitivity  (4.4: "PPO high, DPO low (mainly β)") a learning rate × β grid per method, the spread
    online       (4.6; blog: "training is offline") offline DPO on the SFT model's pairs against
                 iterative DPO that samples fresh pairs from its current policy each round, at the same
                 labelling budget (prompts × samples judged) and the same number of steps

Every training run is one call of a stage script's own `main` (ppo.py, dpo.py, reward.py; sft.py --eval
for the held-out table), so each is a cached stage: a rerun skips it (its stage.json), an interrupted
one resumes. The experiment's summary is recomputed from the runs in seconds. Results go to
<run>/<experiment>/results.json with a figure, and every finished experiment's rows to <run>/claims.md:
seed claim → our measurement → holds here? → the command.

Sizes. The defaults are cut so each experiment runs in about 8 minutes on 2 shared CPU cores (the main
job's PPO stage takes ~200 s, its DPO ~140 s): PPO 15 iterations × 64 rollouts (the main job: 60),
DPO 250 steps of 16 pairs (700), reward models trained on 8,000 of the main job's 51,901 pairs for 2
epochs, 3 grid points (0 / 20 / 40 % noise; 3 β per method; 2 × 2 learning rate × β), 500 held-out
prompts for gold (standard error ≈ 0.01). claims.md says so beside each number. At this scale gold
differences under ~0.02 are noise; where that leaves a claim untested, the table says so.

Usage:
    python -m experiments.alignment_claims --source-run runs/default --run runs/claims --experiment all
    python -m experiments.alignment_claims ... --experiment optimal       # one experiment (or a list: kl,noise)
    make claims RUN=default                                               # the same, from the Makefile
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

import numpy as np
import torch

import dpo
import ppo
import reward
import sft
from best_of_n import kl_divergence, optimal_policy
from data.errors import DataError
from data.hf_tokenizer import write_json
from data.stages import begin_stage, finish_stage, finished_stage, read_stage, stage_fingerprint
from data.tasks import generate_tasks, judge, read_jsonl
from data.tokenizer import load_tokenizer
from settings import build_parser_from, check_ranges, comma_list, setting
from train_gpt import ConfigError, count_params, pick_device

EXPERIMENTS = ("optimal", "compute", "noise", "kl", "sensitivity", "online")  # the order `all` runs them in
SOURCE_NOISE = reward.Hyperparameters.label_noise  # the main job's labeler flips 20 % of pairs


# =============================================================================
# 1. The equations (optimal_policy and kl_divergence are best_of_n.py's, section 2)
# =============================================================================

def restricted_policy(logprobs):
    """π restricted to a candidate set and renormalised: π(y|x, y ∈ Y) = π(y|x) / Σ_{y' ∈ Y} π(y'|x)."""
    logits = np.asarray(logprobs, dtype=np.float64)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def bradley_terry_labels(reward_a, reward_b, n_labels, rng):
    """n_labels draws of a Bradley–Terry labeler (seed 3.3): a wins with P = σ(r_a − r_b). Returns how
    many of them prefer a. DPO's population optimum on such labels is exactly optimal_policy's π*."""
    p_a = 1 / (1 + math.exp(-(reward_a - reward_b)))
    return sum(rng.random() < p_a for _ in range(n_labels))


def flip_labels(records, fraction, seed):
    """The same comparisons with `fraction` of them labelled the wrong way round (seed 4.6, label noise).

    Each record's truth is its clean_label (1: the gold judge prefers chosen, 0: rejected; reward.py
    writes it): the pair is first oriented truly better first, then each is flipped with probability
    `fraction` (a seeded draw per pair), and `flipped` records whether it was. Pairs the judge calls
    equal (clean_label 0.5) are dropped: they have no right way round."""
    rng = random.Random(seed)
    out = []
    for record in records:
        if record.get("clean_label") not in (0.0, 1.0):
            if "clean_label" not in record:
                raise ConfigError("flip_labels needs each pair's clean_label (reward.py writes it)")
            continue
        better, worse = ("chosen", "rejected") if record["clean_label"] == 1.0 else ("rejected", "chosen")
        flipped = rng.random() < fraction
        chosen, rejected = (worse, better) if flipped else (better, worse)
        out.append({**record, "chosen": record[chosen], "rejected": record[rejected],
                    "chosen_gold": record.get(f"{chosen}_gold"), "rejected_gold": record.get(f"{rejected}_gold"),
                    "chosen_tokens": record.get(f"{chosen}_tokens"), "rejected_tokens": record.get(f"{rejected}_tokens"),
                    "clean_label": 0.0 if flipped else 1.0, "flipped": flipped})
    return out


# FLOPs, our own count: 2N per token through a forward pass, 6N per token trained (forward + backward;
# train_gpt.training_flops = 6·N·D). Attention's extra 12·L·T·d per token and padding are left out: at
# these lengths (prompts + answers of ~20 tokens) both are small, and they are the same for both methods.

def ppo_flops(n_params, sequence_tokens, ppo_epochs, with_reward_model=True, with_critic=True):
    """FLOPs of PPO iterations whose rollouts hold `sequence_tokens` tokens in all (prompt + response):

        generate y ∼ π_θ (one forward per token, KV cache)      2N·S
        score: log π_old, log π_ref, r_φ, V                      2N·S each (r_φ, V only when present)
        update: ppo_epochs × (policy + critic), fwd + bwd        6N·S · epochs · (1 + critic)
    """
    forwards = 3 + with_reward_model + with_critic
    trained = ppo_epochs * (1 + with_critic)
    return 2 * n_params * sequence_tokens * forwards + 6 * n_params * sequence_tokens * trained


def dpo_flops(n_params, trained_tokens, cached_tokens):
    """FLOPs of DPO: π_ref's log-probs once per pair used (2N per token, cached), then π_θ on every
    pair of every step, chosen and rejected in one forward + backward (6N per token). Nothing else:
    no sampling, no reward model, no critic."""
    return 2 * n_params * cached_tokens + 6 * n_params * trained_tokens


# =============================================================================
# 2. Running the stages (each a cached stage of its own script)
# =============================================================================

class Context:
    """What every experiment shares: the source run's files, the output root, the sizes."""

    def __init__(self, args):
        self.args = args
        self.source = args.source_run
        self.sft = os.path.join(args.source_run, "sft", "model.pt")
        self.reward_model = os.path.join(args.source_run, "reward", "model.pt")
        self.train_pairs = os.path.join(args.source_run, "reward", "preferences_train.jsonl")
        self.val_pairs = os.path.join(args.source_run, "reward", "preferences_val.jsonl")
        self.root = args.run
        self.families = args.families
        for flag, path in (("--source-run", self.sft), ("--source-run", self.reward_model),
                           ("--source-run", self.train_pairs), ("--source-run", self.val_pairs)):
            if not os.path.isfile(path):
                raise ConfigError(f"{flag} {args.source_run}: {path} not found (run `make run` first)")

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def common(self):
        flags = ["--device", self.args.device]
        return flags + (["--families", self.families] if self.families else [])


def number(value):
    """1e-05 → 1e-5, 0.30 → 0.3: short, stable directory names."""
    return f"{value:g}".replace("e-0", "e-")


def dpo_argv(ctx, name, beta, lr=None, steps=None, data=None, val_data=None, sft_path=None, extra=()):
    """(out directory, dpo.py flags) of one DPO run in <run>/stages/<name>."""
    out = ctx.path("stages", name)
    argv = ["--sft", sft_path or ctx.sft, "--out", out, "--beta", str(beta), "--lr", str(lr or ctx.args.dpo_lr),
            "--max-steps", str(steps or ctx.args.dpo_steps), "--eval-tasks", "0", *ctx.common(), *extra]
    if data:
        argv += ["--data", data] + (["--val-data", val_data] if val_data else [])
    return out, argv


def run_dpo(ctx, name, beta, **flags):
    """One DPO run (dpo.py's main, a cached stage); its model path and eval.json."""
    out, argv = dpo_argv(ctx, name, beta, **flags)
    return os.path.join(out, "model.pt"), dpo.main(argv)


def ppo_argv(ctx, name, beta, lr=None, reward_model=None, iterations=None, extra=()):
    """(out directory, ppo.py flags) of one PPO run; reward_model None: the gold judge as the reward."""
    out = ctx.path("stages", name)
    argv = ["--sft", ctx.sft, "--out", out, "--beta", str(beta), "--lr", str(lr or ctx.args.ppo_lr),
            "--iterations", str(iterations or ctx.args.ppo_iterations), "--rollouts", str(ctx.args.ppo_rollouts),
            "--minibatch-size", str(ctx.args.ppo_minibatch), "--eval-tasks", "0", "--threads", str(ctx.args.threads),
            *ctx.common(), *extra]
    argv += ["--reward-model", reward_model] if reward_model else ["--reward-source", "judge"]
    return out, argv


def run_ppo(ctx, name, beta, **flags):
    """One PPO run (ppo.py's main, a cached stage); its model path and eval.json."""
    out, argv = ppo_argv(ctx, name, beta, **flags)
    return os.path.join(out, "model.pt"), ppo.main(argv)


def run_reward(ctx, name, data, val_data):
    """One reward model (reward.py) trained on a preference file; its model path and eval.json."""
    out = ctx.path("stages", name)
    summary = reward.main(["--sft", ctx.sft, "--out", out, "--data", data, "--val-data", val_data,
                           "--epochs", str(ctx.args.rm_epochs), "--eval-prompts", "0", *ctx.common()])
    return os.path.join(out, "model.pt"), summary


def evaluate(ctx, name, models):
    """sft.py --eval of SFT and `models` {name: checkpoint} on the same held-out prompts (cached):
    {name: {greedy_gold, sampled_gold, kl_to_reference, greedy_vs_reference, sampled_vs_reference, …}}."""
    argv = ["--eval", f"sft={ctx.sft}", *[f"{k}={v}" for k, v in models.items()], "--reference", "sft",
            "--eval-out", ctx.path(name, "eval"), "--eval-tasks", str(ctx.args.eval_tasks), *ctx.common()]
    return sft.main(argv)["models"]


def first_prompts(records, n_pairs):
    """The pairs of the file's first prompts, whole prompts only, up to about n_pairs pairs."""
    out, seen = [], set()
    for record in records:
        key = json.dumps(record["prompt"])
        if key not in seen:
            if len(out) >= n_pairs:
                break
            seen.add(key)
        out.append(record)
    return out


def subset_files(ctx):
    """The reward models' training subset (the first --rm-pairs pairs, whole prompts) and a clean
    held-out set (the first --val-pairs validation pairs, oriented by the gold judge): written once."""
    directory = ctx.path("data")
    os.makedirs(directory, exist_ok=True)
    train, val = os.path.join(directory, "train_subset.jsonl"), os.path.join(directory, "val_clean.jsonl")
    if not os.path.isfile(train):
        reward.write_preferences(train, first_prompts(read_jsonl(ctx.train_pairs), ctx.args.rm_pairs))
    if not os.path.isfile(val):
        reward.write_preferences(val, flip_labels(first_prompts(read_jsonl(ctx.val_pairs), ctx.args.val_pairs), 0.0, 0))
    return train, val


def gold_row(results, name):
    """'+0.012 ± 0.007' sampled, greedy and KL of one evaluated model."""
    r = results[name]
    s, g = r["sampled_vs_reference"], r["greedy_vs_reference"]
    return {"sampled": s["mean"], "sampled_se": s["stderr"], "greedy": g["mean"], "greedy_se": g["stderr"],
            "kl": r["kl_to_reference"], "sampled_gold": r["sampled_gold"], "greedy_gold": r["greedy_gold"]}


def fmt_gain(row, key="sampled"):
    return f"{row[key]:+.3f} ± {row[key + '_se']:.3f}"


def significant(row, key="sampled", sigmas=2.0):
    return abs(row[key]) > sigmas * row[key + "_se"]


# =============================================================================
# 3. The experiments
# =============================================================================

def sample_candidates(ctx, tasks, policy, enc, device):
    """Each prompt's candidate set Y(x): --optimal-k samples of π_SFT at T = 1 and the right answer,
    duplicates removed; each with its gold score and log π_SFT(y|x)."""
    per_task = reward.sample_responses(policy, enc, tasks, ctx.args.optimal_k, 1.0, 32, 64, ctx.args.seed, device)
    candidates = []
    for task, samples in zip(tasks, per_task):
        texts = list(dict.fromkeys([task.answer] + [s["response"] for s in samples]))
        candidates.append({"prompt": reward.task_messages(task), "task": task.prompt,
                           "responses": texts, "gold": [judge(task, t) for t in texts]})
    return candidates


def candidate_logprobs(model, enc, candidates, device):
    """log π(y|x) of every candidate of every prompt (sums over the response tokens, <|end|> included)."""
    special = sft.chat_tokens(enc)
    prompts, responses = [], []
    for c in candidates:
        prompt_ids = sft.render_prompt(c["prompt"], enc)
        for text in c["responses"]:
            full = reward.pair_ids(c["prompt"], text, enc)
            prompts.append(prompt_ids)
            responses.append(full[len(prompt_ids):])
    with torch.no_grad():
        flat = sft.response_logprob_sums(model.eval(), prompts, responses, special.pad, 64, device)
    out, start = [], 0
    for c in candidates:
        out.append(flat[start:start + len(c["responses"])])
        start += len(c["responses"])
    return out


def optimal_experiment(ctx):
    """π* over enumerated candidates against DPO (trained on Bradley–Terry labels of those very
    candidates) and PPO (the judge as reward, β/scale so that its objective has the same optimum)."""
    a = ctx.args
    directory = ctx.path("optimal")
    os.makedirs(directory, exist_ok=True)
    device = pick_device(a.device)
    policy, enc = sft.load_chat_model(ctx.sft, None, device)
    beta, scale = a.optimal_beta, a.reward_scale
    data_path, val_path = os.path.join(directory, "pairs.jsonl"), os.path.join(directory, "pairs_sample.jsonl")
    candidates_path = os.path.join(directory, "candidates.json")
    identity = argparse.Namespace(prompts=a.optimal_prompts, k=a.optimal_k, labels=a.optimal_labels, scale=scale,
                                  families=a.families, seed=a.seed)
    fingerprint = stage_fingerprint(identity, (), [ctx.sft])
    if not finished_stage(directory, "optimal-data", fingerprint):
        started = time.time()
        begin_stage(directory, "optimal-data", fingerprint)
        tasks = generate_tasks(a.optimal_prompts, "train", seed=a.seed + 101,
                               families=a.families.split(",") if a.families else None, unique=True)
        candidates = sample_candidates(ctx, tasks, policy, enc, device)
        rng = random.Random(a.seed)
        pairs = []
        for c in candidates:  # every pair of distinct gold scores, labelled --optimal-labels times by BT on r
            for i in range(len(c["responses"])):
                for j in range(i + 1, len(c["responses"])):
                    if c["gold"][i] == c["gold"][j]:
                        continue
                    wins = bradley_terry_labels(scale * c["gold"][i], scale * c["gold"][j], a.optimal_labels, rng)
                    for w, (win, lose) in ((wins, (i, j)), (a.optimal_labels - wins, (j, i))):
                        pairs += [{"prompt": c["prompt"], "chosen": c["responses"][win],
                                   "rejected": c["responses"][lose]}] * w
        random.Random(a.seed).shuffle(pairs)
        reward.write_preferences(data_path, pairs)
        reward.write_preferences(val_path, pairs[:200])  # DPO's held-out check: a sample of the same pairs
        write_json(candidates_path, candidates)
        finish_stage(directory, "optimal-data", fingerprint, started, {"pairs": len(pairs)})
    with open(candidates_path) as f:
        candidates = json.load(f)
    n_pairs = len(read_jsonl(data_path))
    steps = a.optimal_dpo_steps
    dpo_path, _ = run_dpo(ctx, f"optimal_dpo_b{number(beta)}_s{steps}", beta, lr=a.optimal_dpo_lr, steps=steps,
                          data=data_path, val_data=val_path, extra=["--epochs", "20"])
    ppo_path, _ = run_ppo(ctx, f"optimal_ppo_judge_b{number(beta / scale)}", beta / scale, lr=a.optimal_ppo_lr,
                          iterations=a.optimal_ppo_iterations, extra=["--missing-end-penalty", "0"])
    models = {"sft": policy}
    for name, path in (("dpo", dpo_path), ("ppo", ppo_path)):
        models[name], _ = sft.load_chat_model(path, None, device)
    logprobs = {name: candidate_logprobs(model, enc, candidates, device) for name, model in models.items()}
    per_model = {name: {"kl_to_optimal": [], "kl_from_sft": [], "gold": []} for name in models}
    optimal_gold = []
    for i, c in enumerate(candidates):
        gold = np.asarray(c["gold"])
        target = optimal_policy(logprobs["sft"][i], scale * gold, beta)
        optimal_gold.append(float(target @ gold))
        sft_restricted = restricted_policy(logprobs["sft"][i])
        for name in models:
            q = restricted_policy(logprobs[name][i])
            per_model[name]["kl_to_optimal"].append(kl_divergence(target, q))
            per_model[name]["kl_from_sft"].append(kl_divergence(q, sft_restricted))
            per_model[name]["gold"].append(float(q @ gold))
    summary = {name: {k: float(np.mean(v)) for k, v in m.items()} for name, m in per_model.items()}
    for name, m in per_model.items():
        summary[name]["kl_to_optimal_se"] = float(np.std(m["kl_to_optimal"], ddof=1) / math.sqrt(len(candidates)))
    summary["optimal"] = {"gold": float(np.mean(optimal_gold)),
                          "kl_from_sft": float(np.mean([kl_divergence(optimal_policy(logprobs["sft"][i],
                                                                                     scale * np.asarray(c["gold"]), beta),
                                                                      restricted_policy(logprobs["sft"][i]))
                                                        for i, c in enumerate(candidates)]))}
    result = {"prompts": len(candidates), "candidates": float(np.mean([len(c["responses"]) for c in candidates])),
              "pairs": n_pairs, "beta": beta, "reward_scale": scale, "models": summary}
    plot_bars(summary, ["sft", "dpo", "ppo"], "kl_to_optimal", "KL(π* ‖ π) over the candidates (nats)",
              f"distance to the exact optimum π* ∝ π_ref·exp({scale:g}·gold/{beta:g}), {len(candidates)} prompts",
              os.path.join(directory, "optimal.png"))
    s = summary
    closer = [name for name in ("dpo", "ppo") if s[name]["kl_to_optimal"] < s["sft"]["kl_to_optimal"]]
    result["rows"] = [{
        "experiment": "optimal",
        "claim": "4.2 / blog: RLHF's objective has the closed-form optimum π* ∝ π_ref·exp(r/β); DPO fits it "
                 "directly from preferences, PPO by sampling",
        "measurement": f"{len(candidates)} train prompts × {result['candidates']:.1f} distinct candidates "
                       f"({a.optimal_k} SFT samples + the answer), r = {scale:g}·gold, β = {beta:g}: KL(π*‖π) on the candidates SFT "
                       f"{s['sft']['kl_to_optimal']:.3f}, DPO {s['dpo']['kl_to_optimal']:.3f} ± "
                       f"{s['dpo']['kl_to_optimal_se']:.3f} ({n_pairs} BT-labelled pairs, {steps} steps), PPO "
                       f"{s['ppo']['kl_to_optimal']:.3f} ± {s['ppo']['kl_to_optimal_se']:.3f} (judge reward, β "
                       f"{beta / scale:.3g}, {a.optimal_ppo_iterations} iterations); KL(π‖π_SFT) on the candidates: "
                       f"π* {s['optimal']['kl_from_sft']:.3f}, DPO {s['dpo']['kl_from_sft']:.3f}, PPO "
                       f"{s['ppo']['kl_from_sft']:.3f}; expected gold on the set: π* "
                       f"{s['optimal']['gold']:.3f}, SFT {s['sft']['gold']:.3f}, DPO {s['dpo']['gold']:.3f}, PPO "
                       f"{s['ppo']['gold']:.3f}",
        "holds": ("yes: both move towards π*" if len(closer) == 2 else
                  f"partly: only {', '.join(closer).upper()} moves towards π*" if closer else
                  "no: neither moves towards π* at this size"),
    }]
    return result


def flops_of_ppo_run(ctx, out_dir, iterations, rollouts, ppo_epochs, n_params, reward_model=True):
    """ppo_flops of a finished run: prompt tokens from the prompts it used, response tokens from its
    metrics.jsonl (mean length + <|end|>, × rollouts, per iteration)."""
    args = ppo.build_parser().parse_args(["--iterations", str(iterations), "--rollouts", str(rollouts),
                                          "--seed", str(ctx.args.seed)] + (["--families", ctx.families]
                                                                           if ctx.families else []))
    _, checkpoint = reward.load_sft(ctx.sft, torch.device("cpu"))
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    _, prompts = ppo.training_prompts(args, tokenizer)
    records = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    response_tokens = sum((r["response_length"] + r["ended"]) * rollouts for r in records)
    tokens = sum(map(len, prompts[:iterations * rollouts])) + response_tokens
    return ppo_flops(n_params, tokens, ppo_epochs, with_reward_model=reward_model), tokens


def flops_of_dpo_run(ctx, data_path, steps, n_params, batch_size=16, val_path=None):
    """dpo_flops of a run of `steps` steps on data_path: the pairs dpo.examples_used says it sees."""
    _, checkpoint = reward.load_sft(ctx.sft, torch.device("cpu"))
    enc = load_tokenizer(checkpoint["tokenizer"])
    pairs, _ = dpo.tokenize_pairs(reward.load_preferences(data_path), enc, 10 ** 9, data_path)
    args = dpo.build_parser().parse_args(["--max-steps", str(steps), "--batch-size", str(batch_size),
                                          "--seed", str(ctx.args.seed)])
    used = dpo.examples_used(len(pairs), args)
    trained = sum(len(pairs[i].chosen[0]) + len(pairs[i].rejected[0]) for i in used)
    val_tokens = 0
    if val_path:
        val, _ = dpo.tokenize_pairs(reward.load_preferences(val_path), enc, 10 ** 9, val_path)
        val_tokens = sum(len(p.chosen[0]) + len(p.rejected[0]) for p in val)
    return dpo_flops(n_params, trained, trained + val_tokens), trained


MEASURE_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
started = time.time()
import {module}
{module}.main({argv!r})
json.dump({{"seconds": time.time() - started,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}, open({out!r}, "w"))
"""


def measured_stage(ctx, module, argv, out_dir):
    """Run `module.main(argv)` in a child process and read its wall time and peak resident memory
    (resource.getrusage(RUSAGE_SELF).ru_maxrss, the kernel's high-water mark of the whole process:
    Python, torch and the stage). Kept in out_dir/measured.json beside the cached stage."""
    record = os.path.join(out_dir, "measured.json")
    stage = read_stage(out_dir) or {}
    if stage.get("complete") and os.path.isfile(record):
        with open(record) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    code = MEASURE_CHILD.format(root=os.getcwd(), threads=max(1, ctx.args.threads), module=module,
                                argv=[*argv, "--force"], out=record + ".tmp")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise ConfigError(f"the measured {module}.py run in {out_dir} failed (exit {done.returncode})")
    os.replace(record + ".tmp", record)
    with open(record) as f:
        return json.load(f)


def baseline_rss(ctx):
    """Peak RSS of a child that only imports torch and loads π_SFT: what every stage pays before it starts."""
    code = (f"import resource, sys; sys.path.insert(0, {os.getcwd()!r}); import torch, sft; "
            f"sft.load_chat_model({ctx.sft!r}, None, torch.device('cpu')); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def compute_experiment(ctx):
    """PPO on r_φ and DPO on the same comparisons, each in a child process: seconds, FLOPs, peak memory,
    the analytic memory of the networks each holds, and the gold each bought; the main job's full-size
    stage times beside them."""
    a = ctx.args
    directory = ctx.path("compute")
    os.makedirs(directory, exist_ok=True)
    # The same runs as the kl experiment's largest β: measured here, then served from cache there.
    ppo_out, ppo_args = ppo_argv(ctx, f"ppo_b0.3_lr{number(a.ppo_lr)}", 0.3, reward_model=ctx.reward_model)
    _, val_clean = subset_files(ctx)
    dpo_out, dpo_args = dpo_argv(ctx, f"dpo_b0.5_lr{number(a.dpo_lr)}", 0.5, data=ctx.train_pairs, val_data=val_clean)
    measured = {"ppo": measured_stage(ctx, "ppo", ppo_args, ppo_out), "dpo": measured_stage(ctx, "dpo", dpo_args, dpo_out)}
    baseline_path = os.path.join(directory, "baseline_rss.json")  # measured once, beside the two stages
    if not os.path.isfile(baseline_path):
        write_json(baseline_path, {"peak_rss_mib": baseline_rss(ctx)})
    with open(baseline_path) as f:
        base = json.load(f)["peak_rss_mib"]
    policy, _ = sft.load_chat_model(ctx.sft, None, torch.device("cpu"))
    n_params = count_params(policy, non_embedding=False)
    rm = reward.load_reward_model(ctx.reward_model, torch.device("cpu"))
    ppo_memory = {"policy": ppo.model_memory(policy, True), "reference": ppo.model_memory(policy, False),
                  "reward model": ppo.model_memory(rm, False), "critic": ppo.model_memory(rm, True)}
    dpo_memory = {"policy": ppo.model_memory(policy, True), "reference": ppo.model_memory(policy, False)}
    total = {m: sum(v["weights"] + v["gradients"] + v["optimizer"] for v in mem.values()) / 2 ** 20
             for m, mem in (("ppo", ppo_memory), ("dpo", dpo_memory))}
    ppo_fl, ppo_tokens = flops_of_ppo_run(ctx, ppo_out, a.ppo_iterations, a.ppo_rollouts, 4, n_params)
    dpo_fl, dpo_tokens = flops_of_dpo_run(ctx, ctx.train_pairs, a.dpo_steps, n_params, val_path=val_clean)
    results = evaluate(ctx, "compute", {"ppo": os.path.join(ppo_out, "model.pt"), "dpo": os.path.join(dpo_out, "model.pt")})
    rows = {m: gold_row(results, m) for m in ("ppo", "dpo")}
    # The main job's full-size stages (their stage.json seconds, the same counting of FLOPs).
    main_job, main_flops = {}, {}
    for method in ("ppo", "dpo"):
        stage = read_stage(os.path.join(ctx.source, method)) or {}
        main_job[method] = stage.get("seconds")
    try:  # the main job's own runs, counted the same way (their eval.json and metrics.jsonl)
        with open(os.path.join(ctx.source, "ppo", "eval.json")) as f:
            main_ppo = json.load(f)
        with open(os.path.join(ctx.source, "dpo", "eval.json")) as f:
            main_dpo = json.load(f)
        main_flops["ppo"], _ = flops_of_ppo_run(ctx, os.path.join(ctx.source, "ppo"), main_ppo["iterations"],
                                                main_ppo["rollouts_per_iteration"], 4, n_params)
        main_flops["dpo"], _ = flops_of_dpo_run(ctx, ctx.train_pairs, main_dpo["steps"], n_params, val_path=ctx.val_pairs)
    except (OSError, KeyError, ValueError):
        main_flops = {}
    main_gold = {}
    try:  # the main job's final table (sft.py --eval on its held-out prompts)
        with open(os.path.join(ctx.source, "eval", "eval.json")) as f:
            main_models = json.load(f)["models"]
        main_gold = {m: gold_row(main_models, m) for m in ("ppo", "dpo")}
    except (OSError, KeyError, ValueError):
        pass
    result = {"n_params": n_params, "measured": measured, "baseline_rss_mib": base, "flops": {"ppo": ppo_fl, "dpo": dpo_fl},
              "tokens": {"ppo": ppo_tokens, "dpo": dpo_tokens}, "network_memory_mib": total,
              "networks": {"ppo": list(ppo_memory), "dpo": list(dpo_memory)}, "gold": rows, "main_job_seconds": main_job,
              "main_job_flops": main_flops, "main_job_gold": main_gold}
    time_ratio = measured["ppo"]["seconds"] / measured["dpo"]["seconds"]
    flop_ratio = ppo_fl / dpo_fl
    ratio_line = (f"main job: PPO stage {main_job['ppo']:.0f} s vs DPO {main_job['dpo']:.0f} s"
                  if main_job["ppo"] and main_job["dpo"] else "main job: no stage times found")
    if main_flops:
        ratio_line += (f", FLOPs {main_flops['ppo']:.2e} ({main_ppo['iterations']} × {main_ppo['rollouts_per_iteration']}) "
                       f"vs {main_flops['dpo']:.2e} ({main_dpo['steps']} steps): {main_flops['ppo'] / main_flops['dpo']:.1f}×")
    result["rows"] = [{
        "experiment": "compute",
        "claim": "4.4: PPO costs 3–4× the compute of DPO; it holds four models in memory, DPO two",
        "measurement": f"PPO {a.ppo_iterations} × {a.ppo_rollouts} rollouts vs DPO {a.dpo_steps} × 16 pairs, one "
                       f"child process each: wall {measured['ppo']['seconds']:.0f} s vs {measured['dpo']['seconds']:.0f} s "
                       f"({time_ratio:.1f}×), FLOPs {ppo_fl:.2e} vs {dpo_fl:.2e} ({flop_ratio:.1f}×, 2N/6N per token), "
                       f"peak RSS {measured['ppo']['peak_rss_mib']:.0f} vs {measured['dpo']['peak_rss_mib']:.0f} MiB "
                       f"(torch + π_SFT alone: {base or float('nan'):.0f}); networks + grads + AdamW "
                       f"{total['ppo']:.1f} vs {total['dpo']:.1f} MiB (4 vs 2 networks); sampled gold "
                       f"{fmt_gain(rows['ppo'])} vs {fmt_gain(rows['dpo'])}; {ratio_line}",
        "holds": compute_verdict(flop_ratio, time_ratio, rows, main_flops, main_job, main_gold),
    }]
    plot_bars({"PPO": {"x": measured["ppo"]["seconds"]}, "DPO": {"x": measured["dpo"]["seconds"]}}, ["PPO", "DPO"], "x",
              "seconds (2 shared CPU cores)", f"PPO {a.ppo_iterations} iterations vs DPO {a.dpo_steps} steps",
              os.path.join(directory, "compute.png"))
    return result


def compute_verdict(flop_ratio, time_ratio, rows, main_flops, main_seconds, main_gold):
    """The compute row's answer: the main job's full-size runs when they are there (the budgets the
    pipeline chose for each method), this experiment's short runs otherwise."""
    if main_flops and main_gold and main_seconds.get("ppo") and main_seconds.get("dpo"):
        ratio, seconds = main_flops["ppo"] / main_flops["dpo"], main_seconds["ppo"] / main_seconds["dpo"]
        verdict = "yes" if ratio >= 2.5 else "no"
        return (f"{verdict} at the main job's budgets: PPO/DPO = {ratio:.1f}× the FLOPs, {seconds:.1f}× the wall time, "
                f"for sampled gold {fmt_gain(main_gold['ppo'])} vs {fmt_gain(main_gold['dpo'])} (equal within "
                f"{abs(main_gold['ppo']['sampled'] - main_gold['dpo']['sampled']):.3f}); at equal budgets in steps here "
                f"{flop_ratio:.1f}× / {time_ratio:.1f}×. Memory: 4 networks vs 2, as the seed says")
    return (f"at this experiment's budgets PPO/DPO = {flop_ratio:.1f}× the FLOPs, {time_ratio:.1f}× the wall time; "
            "'at equal gold gain' is untestable here: "
            + ("neither gain exceeds 2 SE" if not (significant(rows['ppo']) or significant(rows['dpo']))
               else "the two gains differ"))


def noise_experiment(ctx):
    """The same comparisons with --noise-levels of the pairs flipped: DPO on them, a reward model on them
    and PPO on that reward model; gold of both policies and clean held-out accuracy of both learned rewards."""
    a = ctx.args
    directory = ctx.path("noise")
    os.makedirs(directory, exist_ok=True)
    train, val_clean = subset_files(ctx)
    records = read_jsonl(train)
    models, points = {}, []
    for level in a.noise_levels:
        data = os.path.join(ctx.path("data"), f"train_noise{number(level)}.jsonl")
        if not os.path.isfile(data):
            reward.write_preferences(data, flip_labels(records, level, a.seed + int(round(1000 * level))))
        tag = f"n{number(level)}"
        dpo_path, dpo_summary = run_dpo(ctx, f"noise_dpo_{tag}", 0.5, data=data, val_data=val_clean)
        rm_path, rm_summary = run_reward(ctx, f"noise_rm_{tag}", data, val_clean)
        ppo_path, _ = run_ppo(ctx, f"noise_ppo_{tag}", 0.3, reward_model=rm_path)
        models[f"dpo_{tag}"], models[f"ppo_{tag}"] = dpo_path, ppo_path
        points.append({"noise": level, "dpo_val_accuracy": dpo_summary["preferences"]["val_logratio_accuracy"],
                       "rm_val_accuracy": rm_summary.get("val_clean_accuracy", rm_summary.get("val_accuracy"))})
    results = evaluate(ctx, "noise", models)
    for p in points:
        tag = f"n{number(p['noise'])}"
        p["dpo"], p["ppo"] = gold_row(results, f"dpo_{tag}"), gold_row(results, f"ppo_{tag}")
    plot_noise(points, os.path.join(directory, "noise.png"))
    lo, hi = points[0], points[-1]
    drop = {m: lo[m]["sampled"] - hi[m]["sampled"] for m in ("dpo", "ppo")}
    acc_drop = {"dpo": lo["dpo_val_accuracy"] - hi["dpo_val_accuracy"], "rm": lo["rm_val_accuracy"] - hi["rm_val_accuracy"]}
    se = max(lo["dpo"]["sampled_se"], hi["dpo"]["sampled_se"], lo["ppo"]["sampled_se"], hi["ppo"]["sampled_se"])
    table = "; ".join(f"{100 * p['noise']:.0f} %: DPO {fmt_gain(p['dpo'])} (clean acc. {p['dpo_val_accuracy']:.3f}), "
                      f"PPO {fmt_gain(p['ppo'])} (r_φ clean acc. {p['rm_val_accuracy']:.3f})" for p in points)
    result = {"points": points}
    result["rows"] = [{
        "experiment": "noise",
        "claim": "4.6: DPO is more sensitive to noisy preference labels than PPO (whose reward model averages "
                 "the noise out)",
        "measurement": f"{len(records)} pairs ({a.rm_pairs} asked), flipped at each level; sampled gold Δ vs SFT "
                       f"and clean held-out pairwise accuracy of the learned reward — {table}",
        "holds": (f"gold: untestable at this size (drops from {100 * lo['noise']:.0f} to {100 * hi['noise']:.0f} % "
                  f"noise: DPO {drop['dpo']:+.3f}, PPO {drop['ppo']:+.3f}, SE ≈ {se:.3f}); "
                  if max(abs(drop["dpo"]), abs(drop["ppo"])) < 2 * math.sqrt(2) * se else
                  f"gold: DPO drops {drop['dpo']:+.3f}, PPO {drop['ppo']:+.3f}; ")
                 + f"the learned rewards' clean accuracy falls by {acc_drop['dpo']:.3f} (DPO's implicit) vs "
                   f"{acc_drop['rm']:.3f} (r_φ): " + ("DPO more sensitive" if acc_drop["dpo"] > acc_drop["rm"] + 0.01
                                                      else "r_φ more sensitive" if acc_drop["rm"] > acc_drop["dpo"] + 0.01
                                                      else "about equally sensitive"),
    }]
    return result


def kl_experiment(ctx):
    """Gold against KL to π_SFT as β shrinks, DPO (--kl-dpo-betas) beside PPO on r_φ (--kl-ppo-betas)."""
    a = ctx.args
    directory = ctx.path("kl")
    os.makedirs(directory, exist_ok=True)
    models = {}
    _, val_clean = subset_files(ctx)
    for beta in a.kl_dpo_betas:
        models[f"dpo_b{number(beta)}"], _ = run_dpo(ctx, f"dpo_b{number(beta)}_lr{number(a.dpo_lr)}", beta,
                                                    data=ctx.train_pairs, val_data=val_clean)
    for beta in a.kl_ppo_betas:
        models[f"ppo_b{number(beta)}"], _ = run_ppo(ctx, f"ppo_b{number(beta)}_lr{number(a.ppo_lr)}", beta,
                                                    reward_model=ctx.reward_model)
    results = evaluate(ctx, "kl", models)
    points = {"DPO": [], "PPO": []}
    for name in models:
        method, beta = name.split("_b")
        points[method.upper()].append({"beta": float(beta), **gold_row(results, name)})
    plot_gold_vs_kl(points, os.path.join(directory, "kl.png"))
    kl_span = {m: (min(p["kl"] for p in pts), max(p["kl"] for p in pts)) for m, pts in points.items()}
    best = {m: max(pts, key=lambda p: p["sampled"]) for m, pts in points.items()}
    desc = "; ".join(f"{m} " + ", ".join(f"β {p['beta']:g}: KL {p['kl']:.2f}, {fmt_gain(p)}" for p in pts)
                     for m, pts in points.items())
    dpo_reach, ppo_reach = kl_span["DPO"][1], kl_span["PPO"][1]
    result = {"points": points}
    result["rows"] = [{
        "experiment": "kl",
        "claim": "4.6: at large KL budgets (small β) DPO's implicit regularisation stops it short of what PPO reaches",
        "measurement": f"sampled gold Δ vs SFT at the KL each reaches ({a.dpo_steps} DPO steps, {a.ppo_iterations} PPO "
                       f"iterations): {desc}",
        "holds": (f"{'yes' if dpo_reach < ppo_reach else 'no'} for reach: the largest KL DPO reaches is "
                  f"{dpo_reach:.2f} nats vs PPO's {ppo_reach:.2f}; best gold DPO {fmt_gain(best['DPO'])}, PPO "
                  f"{fmt_gain(best['PPO'])}" + ("" if significant(best["DPO"]) or significant(best["PPO"])
                                                  else " (neither above 2 SE: gold untestable here)")),
    }]
    return result


def sensitivity_experiment(ctx):
    """A learning rate × β grid per method, the same budget per run; the spread of final gold."""
    a = ctx.args
    directory = ctx.path("sensitivity")
    os.makedirs(directory, exist_ok=True)
    models, grid = {}, {"DPO": [], "PPO": []}
    _, val_clean = subset_files(ctx)
    for lr in a.grid_dpo_lrs:
        for beta in a.grid_dpo_betas:
            name = f"dpo_b{number(beta)}_lr{number(lr)}"
            models[name], _ = run_dpo(ctx, name, beta, lr=lr, data=ctx.train_pairs, val_data=val_clean)
            grid["DPO"].append((name, lr, beta))
    for lr in a.grid_ppo_lrs:
        for beta in a.grid_ppo_betas:
            name = f"ppo_b{number(beta)}_lr{number(lr)}"
            models[name], _ = run_ppo(ctx, name, beta, lr=lr, reward_model=ctx.reward_model)
            grid["PPO"].append((name, lr, beta))
    results = evaluate(ctx, "sensitivity", models)
    cells = {m: [{"lr": lr, "beta": beta, **gold_row(results, name)} for name, lr, beta in g] for m, g in grid.items()}
    spread = {m: max(c["sampled"] for c in cs) - min(c["sampled"] for c in cs) for m, cs in cells.items()}
    kl_spread = {m: max(c["kl"] for c in cs) - min(c["kl"] for c in cs) for m, cs in cells.items()}
    se = max(c["sampled_se"] for cs in cells.values() for c in cs)
    plot_grid(cells, os.path.join(directory, "sensitivity.png"))
    desc = "; ".join(f"{m}: " + ", ".join(f"lr {c['lr']:g} β {c['beta']:g} → {fmt_gain(c)} (KL {c['kl']:.2f})"
                                          for c in cs) for m, cs in cells.items())
    result = {"cells": cells, "spread": spread, "kl_spread": kl_spread}
    resolvable = max(spread.values()) > 2 * math.sqrt(2) * se
    result["rows"] = [{
        "experiment": "sensitivity",
        "claim": "4.4: PPO's hyperparameter sensitivity is high, DPO's low (mainly β)",
        "measurement": f"{len(cells['DPO'])} DPO and {len(cells['PPO'])} PPO runs of the same budget; sampled gold Δ "
                       f"vs SFT — {desc}",
        "holds": (f"{'yes' if spread['PPO'] > spread['DPO'] else 'no'}: spread of gold PPO {spread['PPO']:.3f} vs DPO "
                  f"{spread['DPO']:.3f}" + ("" if resolvable else f" (within noise, SE ≈ {se:.3f})")
                  + f"; spread of KL PPO {kl_spread['PPO']:.2f} vs DPO {kl_spread['DPO']:.2f} nats"),
    }]
    return result


def online_experiment(ctx):
    """Offline DPO on pairs sampled from π_SFT against iterative DPO: --online-rounds rounds, each sampling
    its pairs from the current policy (round r's reference is round r−1's policy, as in Self-Rewarding LMs)
    and labelling them with the judge (20 % noise, as the main job's labeler); the same prompts × samples
    judged and the same number of steps in all."""
    a = ctx.args
    directory = ctx.path("online")
    os.makedirs(directory, exist_ok=True)
    rounds, prompts = a.online_rounds, a.online_prompts
    steps = a.dpo_steps
    build = ["--k", "4", "--label-noise", str(SOURCE_NOISE), "--epochs", "5"]
    offline, _ = run_dpo(ctx, f"online_offline_p{prompts * rounds}", 0.5, steps=steps, extra=[
        *build, "--num-prompts", str(prompts * rounds), "--reward-run", ctx.path("stages", "no-reward-run")])
    current = ctx.sft
    for r in range(1, rounds + 1):
        current, _ = run_dpo(ctx, f"online_round{r}_of{rounds}_p{prompts}", 0.5, steps=steps // rounds, sft_path=current,
                             extra=[*build, "--num-prompts", str(prompts), "--seed", str(a.seed + r),
                                    "--reward-run", ctx.path("stages", "no-reward-run")])
    results = evaluate(ctx, "online", {"offline": offline, "online": current})
    rows = {m: gold_row(results, m) for m in ("offline", "online")}
    diff = rows["online"]["sampled"] - rows["offline"]["sampled"]
    se = math.hypot(rows["online"]["sampled_se"], rows["offline"]["sampled_se"])
    plot_bars({m: {"x": rows[m]["sampled"]} for m in rows}, ["offline", "online"], "x", "sampled gold Δ vs SFT",
              f"offline vs {rounds}-round online DPO, {prompts * rounds} prompts × 4 samples judged each",
              os.path.join(directory, "online.png"))
    result = {"gold": rows}
    result["rows"] = [{
        "experiment": "online",
        "claim": "4.6 / blog: DPO trains offline on the SFT model's samples; as the policy moves away from them the "
                 "data goes stale, and on-policy (iterative) pairs do better",
        "measurement": f"{prompts * rounds} prompts × 4 samples judged (20 % label noise), {steps} steps of DPO, β 0.5: "
                       f"offline {fmt_gain(rows['offline'])} at KL {rows['offline']['kl']:.2f}; online, {rounds} rounds "
                       f"of {prompts} prompts each from the current policy: {fmt_gain(rows['online'])} at KL "
                       f"{rows['online']['kl']:.2f}",
        "holds": (f"{'yes' if diff > 0 else 'no'}: online − offline {diff:+.3f} ± {se:.3f}" if abs(diff) > 2 * se
                  else f"not resolved: online − offline {diff:+.3f} ± {se:.3f}, within noise at this size; online "
                       f"moved {rows['online']['kl'] / max(rows['offline']['kl'], 1e-9):.1f}× as far from SFT"),
    }]
    return result


RUNNERS = {"optimal": optimal_experiment, "compute": compute_experiment, "noise": noise_experiment,
           "kl": kl_experiment, "sensitivity": sensitivity_experiment, "online": online_experiment}


# =============================================================================
# 4. Figures and claims.md
# =============================================================================

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_bars(values, names, key, ylabel, title, png):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [values[n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_noise(points, png):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    noise = [100 * p["noise"] for p in points]
    for method, colour in (("dpo", "C0"), ("ppo", "C1")):
        axes[0].errorbar(noise, [p[method]["sampled"] for p in points], [p[method]["sampled_se"] for p in points],
                         marker="o", color=colour, capsize=3, label=method.upper())
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_xlabel("pairs flipped (%)")
    axes[0].set_ylabel("sampled gold Δ vs SFT")
    axes[0].legend()
    axes[1].plot(noise, [p["dpo_val_accuracy"] for p in points], "o-", color="C0", label="DPO implicit reward")
    axes[1].plot(noise, [p["rm_val_accuracy"] for p in points], "o-", color="C1", label="r_φ (PPO's reward)")
    axes[1].set_xlabel("pairs flipped (%)")
    axes[1].set_ylabel("accuracy on clean held-out pairs")
    axes[1].legend()
    fig.suptitle("Label noise: DPO against PPO on a reward model trained on the same flipped pairs")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_gold_vs_kl(points, png):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (method, pts), colour in zip(points.items(), ("C0", "C1")):
        pts = sorted(pts, key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in pts], [p["sampled"] for p in pts], [p["sampled_se"] for p in pts], marker="o",
                    color=colour, capsize=3, label=method)
        for p in pts:
            ax.annotate(f"β={p['beta']:g}", (p["kl"], p["sampled"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("KL(π_θ ‖ π_SFT) on the policy's samples (nats)")
    ax.set_ylabel("sampled gold Δ vs SFT")
    ax.set_title("Gold against KL as β shrinks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_grid(cells, png):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4))
    for ax, (method, cs) in zip(np.atleast_1d(axes), cells.items()):
        lrs, betas = sorted({c["lr"] for c in cs}), sorted({c["beta"] for c in cs})
        table = np.full((len(lrs), len(betas)), np.nan)
        for c in cs:
            table[lrs.index(c["lr"]), betas.index(c["beta"])] = c["sampled"]
        image = ax.imshow(table, cmap="RdYlGn", vmin=-0.05, vmax=0.05)
        for i in range(len(lrs)):
            for j in range(len(betas)):
                ax.text(j, i, f"{table[i, j]:+.3f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("β")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{method}: sampled gold Δ vs SFT")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def command_of(experiment, args):
    return (f"python -m experiments.alignment_claims --source-run {args.source_run} --run {args.run} "
            f"--experiment {experiment}")


def write_claims(args, outcomes):
    """claims.md: one row per experiment, finished ones from their results.json, the rest 'not run'."""
    lines = [f"# The seeds' claims about PPO and DPO, measured ({args.run})", "",
             f"Source run: `{args.source_run}` (its SFT model is π_ref, its reward model r_φ and its judge-ranked "
             f"comparisons). Default sizes are cut to ~8 CPU-minutes per experiment: PPO {args.ppo_iterations} "
             f"iterations × {args.ppo_rollouts} rollouts (the main job: 60), DPO {args.dpo_steps} steps × 16 pairs "
             f"(700), reward models on {args.rm_pairs} pairs, {args.eval_tasks} held-out prompts for gold. "
             f"Gold Δ: paired difference to SFT on the same prompts ± its standard error (sampled at T = 1).", "",
             "| seed claim | our measurement | holds here? | command |", "|---|---|---|---|"]
    for experiment in EXPERIMENTS:
        outcome = outcomes.get(experiment)
        if outcome is None:
            lines.append(f"| {experiment} | not run this session | — | `{command_of(experiment, args)}` |")
            continue
        for row in outcome["rows"]:
            lines.append(f"| {row['claim']} | {row['measurement']} | {row['holds']} | "
                         f"`{command_of(experiment, args)}` ({outcome['seconds']:.0f} s) |")
    lines += ["", "Figures: " + ", ".join(f"`{e}/{e}.png`" for e in EXPERIMENTS if e in outcomes)]
    path = os.path.join(args.run, "claims.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


# =============================================================================
# 5. Command line
# =============================================================================

FLOATS = comma_list(float)
POSITIVE = "> 0"


@dataclasses.dataclass
class Hyperparameters:
    source_run: str = setting("runs/default", "a finished `make run` directory: sft/model.pt, reward/model.pt and "
                              "reward/preferences_{train,val}.jsonl are read, never written")
    run: str = setting("runs/claims", "where the experiments' runs, figures and claims.md go")
    experiment: str = setting("all", f"all, or one or more of {','.join(EXPERIMENTS)}")
    families: str = setting("reverse,upper", "task families (the cpu preset's)")
    eval_tasks: int = setting(500, "held-out prompts judged for every policy", check=POSITIVE)
    ppo_iterations: int = setting(15, "PPO iterations per run (main job: 60)", check=POSITIVE)
    ppo_rollouts: int = setting(64, "PPO rollouts per iteration", check=POSITIVE)
    ppo_minibatch: int = setting(16, "PPO minibatch size", check=POSITIVE)
    ppo_lr: float = setting(3e-5, "PPO learning rate (ppo.py's default)", check=POSITIVE)
    dpo_steps: int = setting(250, "DPO steps of 16 pairs per run (main job: 700)", check=POSITIVE)
    dpo_lr: float = setting(3e-5, "DPO learning rate (dpo.py's default)", check=POSITIVE)
    rm_pairs: int = setting(8000, "pairs (whole prompts) the noise experiment's reward models and DPO runs train on",
                            check=POSITIVE)
    rm_epochs: int = setting(2, "epochs of those reward models", check=POSITIVE)
    val_pairs: int = setting(1000, "clean held-out pairs for the learned rewards' accuracy", check=POSITIVE)
    noise_levels: list = setting([0.0, 0.2, 0.4], "shares of pairs flipped", type=FLOATS)
    kl_dpo_betas: list = setting([0.5, 0.1, 0.02], "DPO's β, large to small", type=FLOATS)
    kl_ppo_betas: list = setting([0.3, 0.05, 0.01], "PPO's β, large to small", type=FLOATS)
    grid_dpo_lrs: list = setting([3e-5, 1e-4], "DPO learning rates of the grid", type=FLOATS)
    grid_dpo_betas: list = setting([0.5, 0.1], "DPO β of the grid", type=FLOATS)
    grid_ppo_lrs: list = setting([3e-5, 1e-4], "PPO learning rates of the grid", type=FLOATS)
    grid_ppo_betas: list = setting([0.3, 0.05], "PPO β of the grid", type=FLOATS)
    online_rounds: int = setting(2, "rounds of online DPO", check=POSITIVE)
    online_prompts: int = setting(400, "prompts sampled (k = 4) and judged per round", check=POSITIVE)
    optimal_prompts: int = setting(48, "prompts of the enumerated set", check=POSITIVE)
    optimal_k: int = setting(8, "SFT samples per prompt in its candidate set (+ the answer)", check=POSITIVE)
    optimal_beta: float = setting(1.0, "β of π* and of DPO", check=POSITIVE)
    reward_scale: float = setting(3.0, "r(x, y) = scale · gold (PPO: β / scale on gold)", check=POSITIVE)
    optimal_labels: int = setting(4, "Bradley–Terry labels drawn per candidate pair", check=POSITIVE)
    optimal_dpo_steps: int = setting(300, "DPO steps on the candidate pairs", check=POSITIVE)
    optimal_dpo_lr: float = setting(1e-4, "DPO learning rate on the candidate pairs", check=POSITIVE)
    optimal_ppo_iterations: int = setting(20, "PPO iterations (judge reward)", check=POSITIVE)
    optimal_ppo_lr: float = setting(1e-4, "PPO learning rate (judge reward)", check=POSITIVE)
    threads: int = setting(1, "torch CPU threads", check=POSITIVE)
    device: str = setting("auto", "cpu, cuda, … (auto: cuda if available)")
    seed: int = setting(1337, "seed of the data made here (flips, candidates, labels)")


def build_parser():
    parser = build_parser_from(Hyperparameters, __doc__.split("\n")[0])
    parser.prog = "python -m experiments.alignment_claims"
    return parser


def validate(args):
    names = EXPERIMENTS if args.experiment == "all" else [e.strip() for e in args.experiment.split(",") if e.strip()]
    unknown = [e for e in names if e not in EXPERIMENTS]
    if unknown or not names:
        raise ConfigError(f"--experiment {args.experiment!r}: use all or some of {','.join(EXPERIMENTS)}")
    check_ranges(args, Hyperparameters)
    if any(not 0 <= x < 0.5 for x in args.noise_levels) or len(args.noise_levels) < 2:
        raise ConfigError(f"--noise-levels: at least two shares in [0, 0.5) (got {args.noise_levels})")
    for flag in ("kl_dpo_betas", "kl_ppo_betas", "grid_dpo_betas", "grid_ppo_betas", "grid_dpo_lrs", "grid_ppo_lrs"):
        if not getattr(args, flag) or min(getattr(args, flag)) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: positive values, comma-separated")
    if args.online_prompts * args.online_rounds < 2 or args.dpo_steps < args.online_rounds:
        raise ConfigError("--online-rounds: each round needs at least one DPO step (--dpo-steps ≥ rounds)")
    return names


def run(args):
    names = validate(args)
    torch.set_num_threads(args.threads)
    ctx = Context(args)
    os.makedirs(args.run, exist_ok=True)
    outcomes = {}
    for experiment in EXPERIMENTS:  # the finished experiments' results, for claims.md
        path = ctx.path(experiment, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                outcomes[experiment] = json.load(f)
    for experiment in names:
        print(f"[claims] {experiment}")
        started = time.time()
        result = RUNNERS[experiment](ctx)
        previous = outcomes.get(experiment, {})
        # a rerun served from cached stages keeps the first run's seconds
        seconds = time.time() - started
        result["seconds"] = max(seconds, previous.get("seconds", 0)) if previous else seconds
        result["flags"] = {k: v for k, v in vars(args).items()}
        write_json(ctx.path(experiment, "results.json"), result)
        outcomes[experiment] = result
        for row in result["rows"]:
            print(f"[claims] {experiment}: {row['measurement']}\n[claims]   holds here? {row['holds']}")
    path = write_claims(args, outcomes)
    print(f"[claims] wrote {path}")
    return outcomes


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
