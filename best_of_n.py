"""best_of_n.py — r_φ used at inference: best-of-n sampling and the over-optimisation chart (seed 3.5).

Read beside section 3.5 of the seed chapter and Gao et al. 2022, "Scaling laws for reward model
overoptimization". The simplest use of a reward model needs no training: sample n responses from π_SFT
and keep the one r_φ scores highest (Llama 2's rejection sampling). It is the baseline every RLHF
comparison is held against, and because its distance from π_SFT is known in closed form it charts how
much gold score a given KL buys. The file reads top to bottom:

    1. Best-of-n          KL_BoN = log n − (n − 1)/n, and E[best of n] from N ≥ n samples without bias
    2. The optimum        π* ∝ π_ref · exp(r/β) over the same samples: what PPO and DPO aim at (4.2)
    3. The command        N samples per held-out prompt, judged and scored; the curves, π*, and the
                          PPO snapshots and other policies sampled once each; bon.json
    4. The chart          gold and r_φ against √KL: the proxy keeps rising where the gold turns down

It runs as `reward.py --best-of-n …` and its flags are reward.py's (the "best-of-n" group of
`reward.Hyperparameters`): it reads a trained r_φ, so it builds on reward.py, not the other way round.
Its own file because it is evaluation against r_φ, not the reward model's story, and reward.py had grown
to 1,630 lines. experiments/alignment_claims.py imports `optimal_policy` and `kl_divergence` from here.

Usage:
    python reward.py --best-of-n 1,2,4,8,16,32 --sft runs/default/sft/model.pt \
        --reward-model runs/default/reward/model.pt --out runs/default/bon \
        --ppo-run runs/default/ppo --policy dpo=runs/default/dpo/model.pt
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from data.hf_tokenizer import write_json
from data.stages import begin_stage, finish_stage, finished_stage, stage_fingerprint
from data.tasks import generate_tasks, judge
from data.tokenizer import load_tokenizer
from reward import RUNTIME_FLAGS, load_reward_models, load_sft, reward_model_paths, score, task_messages
from sft import (HELDOUT_SEED, chat_tokens, decode_response, generate_responses, load_chat_model, mean_and_stderr,
                 paired_difference, render_prompt, sampled_evaluation)
from train_gpt import ConfigError, autocast_for, pick_device


# =============================================================================
# 1. Best-of-n (seed 3.5; Gao et al. 2022)
# =============================================================================

# classroom: begin best_of_n_kl
def best_of_n_kl(n):
    """KL(π_BoN ‖ π_SFT) of best-of-n sampling (Stiennon et al. 2020; Gao et al. 2022, eq. 1):

        KL_BoN = log n − (n − 1) / n

    0 for n = 1 (one sample is π_SFT itself); grows like log n. (It is exact for a continuous
    proxy and an upper bound otherwise — Beirami et al. 2024.)
    """
    return math.log(n) - (n - 1) / n
# classroom: end best_of_n_kl


# classroom: begin best_of_n_expectation
def best_of_n_expectation(proxy, values, n):
    """E[value of the proxy-best of n samples] from N ≥ n samples of one prompt, without bias:
    the average over all C(N, n) subsets of size n, in closed form (Gao et al. 2022, appendix).

    Sort the samples by proxy, ascending; the i-th (1-based) is the best of a random n-subset
    exactly when the subset holds it and n − 1 of the i − 1 below it:

        P(i is chosen) = C(i − 1, n − 1) / C(N, n),      E = Σ_i P(i is chosen) · value_(i)

    Samples whose proxy scores tie are interchangeable for the choice: each takes its tie group's
    mean value (a random tie-break, in expectation). proxy = values gives the oracle best-of-n.
    """
    N = len(proxy)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {N}")
    order = sorted(range(N), key=lambda i: proxy[i])
    sorted_values, start = [0.0] * N, 0
    while start < N:  # tie groups of equal proxy score share their mean value
        end = start
        while end + 1 < N and proxy[order[end + 1]] == proxy[order[start]]:
            end += 1
        group_mean = sum(values[order[j]] for j in range(start, end + 1)) / (end - start + 1)
        sorted_values[start:end + 1] = [group_mean] * (end - start + 1)
        start = end + 1
    total = math.comb(N, n)
    return sum(math.comb(i - 1, n - 1) / total * sorted_values[i - 1] for i in range(n, N + 1))
# classroom: end best_of_n_expectation


# =============================================================================
# 2. The optimum over the same samples (seed 4.2)
# =============================================================================

# The same samples also give the optimum PPO and DPO aim at (seed 4.2): the maximiser of
# E[r_φ] − β·KL over the N samples of a prompt, with π_SFT uniform over them (each was drawn from it).

# classroom: begin optimal_policy
def optimal_policy(ref_logprobs, rewards, beta):
    """The maximiser of E_y∼π[r(x, y)] − β·KL(π ‖ π_ref) over a fixed candidate set Y(x) (seed 4.2;
    blog, "Direct Preference Optimization", the Lagrangian step):

        π*(y|x) = π_ref(y|x) · exp(r(x, y) / β) / Z(x),    Z(x) = Σ_{y' ∈ Y(x)} π_ref(y'|x) · exp(r(x, y')/β)

    ref_logprobs: log π_ref(y|x) for each candidate y of one prompt (any constant offset cancels, so
    unnormalised sequence log-probs are fine); rewards: r(x, y) for the same candidates. Returns π* as
    a numpy array summing to 1, computed in log space (a softmax) so that large r/β cannot overflow.
    """
    logits = np.asarray(ref_logprobs, dtype=np.float64) + np.asarray(rewards, dtype=np.float64) / beta
    logits -= logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()
# classroom: end optimal_policy


def kl_divergence(p, q):
    """KL(p ‖ q) = Σ_y p(y) · log(p(y) / q(y)) in nats, over one candidate set (terms with p = 0 are 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    support = p > 0
    return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


def kl_regularized_optimum(proxy, values, beta):
    """The KL-regularised optimum restricted to N samples of one prompt drawn from π_SFT, where
    π_SFT is uniform over them (a sample of it): π* = optimal_policy(uniform, proxy, β), i.e.

        π*(y_i) = exp(proxy_i / β) / Σ_j exp(proxy_j / β),   returns (Σ_i π*(y_i)·value_i,  KL(π* ‖ uniform))

    — the value π* gets and the KL it spends (≤ log N), what PPO at this β could at best reach with
    this reward on this prompt. β → ∞ gives the mean of the samples, β → 0 best-of-N by proxy.
    """
    weights = optimal_policy(np.zeros(len(proxy)), proxy, beta)
    uniform = np.full(len(proxy), 1.0 / len(proxy))
    return float(weights @ np.asarray(values, dtype=np.float64)), kl_divergence(weights, uniform)


# =============================================================================
# 3. The command: `reward.py --best-of-n`
# =============================================================================

def validate_best_of_n_args(args):
    """One clear error per bad best-of-n flag, before any sampling."""
    if not args.best_of_n or any(n < 1 for n in args.best_of_n):
        raise ConfigError(f"--best-of-n needs one or more n ≥ 1, e.g. 1,4,16 (got {args.best_of_n})")
    if not args.reward_model:
        raise ConfigError("--best-of-n needs --reward-model (the r_φ that chooses)")
    if any(not math.isfinite(beta) or beta <= 0 for beta in args.optimum_betas):
        raise ConfigError(f"--optimum-betas must all be finite and > 0 (got {args.optimum_betas})")
    for name in ("eval_prompts", "temperature", "max_new_tokens", "gen_batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 with --best-of-n (got {getattr(args, name)})")
    try:
        generate_tasks(1, "test", families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--families/--levels: {e}") from None


def sampled_policy_point(policy, reference, reward_model, enc, tasks, args, device, autocast):
    """One model on the over-optimisation chart: a sample per prompt at T = 1, its gold score, its
    r_φ and its KL to π_SFT (log π_θ(y|x) − log π_SFT(y|x), averaged) — mean and standard error."""
    special = chat_tokens(enc)
    result = sampled_evaluation(policy, reference, enc, tasks, args.max_new_tokens, args.gen_batch_size, device,
                                autocast)
    prompts = [render_prompt(task_messages(t), enc) for t in tasks]
    with autocast:  # r_φ reads the last token: <|end|>, or the last one generated if the reply was cut off
        proxy = score(reward_model, prompts, result["responses"], args.gen_batch_size, special.pad).tolist()
    return {"gold": mean_and_stderr(result["gold"]), "proxy": mean_and_stderr(proxy),
            "kl": mean_and_stderr(result["kl"]), "gold_per_prompt": result["gold"]}


def best_of_n_command(args):
    """`--best-of-n 1,2,4,…`: N = max(n) SFT samples on --eval-prompts test-split tasks, each judged
    and scored by r_φ; best-of-n gold and proxy for every n, chosen by r_φ and by the judge; the
    --policy checkpoints (PPO snapshots, DPO) sampled once per prompt for the same chart, and π* —
    the optimum of E[r] − β·KL over the same samples — for each of --optimum-betas. Writes
    bon.json and overoptimization.png (gold and r_φ against √KL). A cached stage like the others."""
    started = time.time()
    policies = named_policy_paths(args)
    named = argparse.Namespace(**{**vars(args), "policy": sorted(policies)})  # names count; files by their contents
    fingerprint = stage_fingerprint(named, RUNTIME_FLAGS, [args.sft, *reward_model_paths(args.reward_model),
                                                          *policies.values()])
    if finished_stage(args.out, "bon", fingerprint, args.force):
        with open(os.path.join(args.out, "bon.json")) as f:
            return json.load(f)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    autocast = autocast_for(device)
    sft_model, checkpoint = load_sft(args.sft, device)
    enc = load_tokenizer(checkpoint.get("tokenizer") or "")
    reward_model = load_reward_models(args.reward_model, device, args.ensemble_reduce)
    begin_stage(args.out, "bon", fingerprint, args.force)
    try:
        tasks = generate_tasks(args.eval_prompts, "test", seed=HELDOUT_SEED, families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--eval-prompts {args.eval_prompts}: {e}") from None
    N = max(args.best_of_n)
    special = chat_tokens(enc)
    prompts = [render_prompt(task_messages(t), enc) for t in tasks for _ in range(N)]
    generator = torch.Generator(device=device).manual_seed(args.seed + 3)
    with autocast:
        responses = generate_responses(sft_model, prompts, args.max_new_tokens, special.end, special.pad,
                                       args.gen_batch_size, temperature=args.temperature, generator=generator,
                                       device=device)
        proxy = score(reward_model, prompts, responses, args.gen_batch_size, special.pad).view(len(tasks), N).tolist()
    gold = [[judge(t, decode_response(enc, responses[i * N + j])) for j in range(N)] for i, t in enumerate(tasks)]
    curves = {"rm": [], "judge": []}
    for n in args.best_of_n:
        by_rm = [best_of_n_expectation(p, g, n) for p, g in zip(proxy, gold)]
        rm_proxy = [best_of_n_expectation(p, p, n) for p in proxy]
        by_judge = [best_of_n_expectation(g, g, n) for g in gold]
        judge_proxy = [best_of_n_expectation(g, p, n) for p, g in zip(proxy, gold)]
        common = {"n": n, "kl": best_of_n_kl(n)}
        curves["rm"].append({**common, "gold": mean_and_stderr(by_rm), "proxy": mean_and_stderr(rm_proxy),
                             "vs_sft": paired_difference(by_rm, [sum(g) / N for g in gold])})
        curves["judge"].append({**common, "gold": mean_and_stderr(by_judge), "proxy": mean_and_stderr(judge_proxy),
                                "vs_sft": paired_difference(by_judge, [sum(g) / N for g in gold])})
        print(f"best-of-{n:<3d} KL {best_of_n_kl(n):.2f}: chosen by r_φ gold {curves['rm'][-1]['gold'][0]:.3f} "
              f"(r_φ {curves['rm'][-1]['proxy'][0]:+.3f}); by the judge gold {curves['judge'][-1]['gold'][0]:.3f}")
    optimum = {"rm": [], "judge": []}
    for beta in args.optimum_betas:
        for key, choose in (("rm", proxy), ("judge", gold)):
            gold_and_kl = [kl_regularized_optimum(c, g, beta) for c, g in zip(choose, gold)]
            proxies = [kl_regularized_optimum(c, p, beta)[0] for c, p in zip(choose, proxy)]
            optimum_gold = [v for v, _ in gold_and_kl]
            optimum[key].append({"beta": beta, "kl": float(np.mean([kl for _, kl in gold_and_kl])),
                                 "gold": mean_and_stderr(optimum_gold), "proxy": mean_and_stderr(proxies),
                                 "vs_sft": paired_difference(optimum_gold, [sum(g) / N for g in gold])})
        print(f"π* at β {beta:<5g}: on r_φ gold {optimum['rm'][-1]['gold'][0]:.3f} (r_φ {optimum['rm'][-1]['proxy'][0]:+.3f},"
              f" KL {optimum['rm'][-1]['kl']:.2f}); on the judge gold {optimum['judge'][-1]['gold'][0]:.3f} "
              f"(KL {optimum['judge'][-1]['kl']:.2f})")
    points = {}
    for name, path in policies.items():
        policy, _ = load_chat_model(path, None, device)
        point = sampled_policy_point(policy, sft_model, reward_model, enc, tasks, args, device, autocast)
        point["vs_sft"] = paired_difference(point.pop("gold_per_prompt"), [sum(g) / N for g in gold])
        points[name] = point
        print(f"{name}: gold {point['gold'][0]:.3f}, r_φ {point['proxy'][0]:+.3f}, KL {point['kl'][0]:.2f}")
    result = {"prompts": len(tasks), "samples_per_prompt": N, "reward_model": args.reward_model, "sft": args.sft,
              "best_of_n": curves, "optimum": optimum, "policies": points, "wall_seconds": round(time.time() - started, 1)}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "bon.json"), result)
    plot_overoptimization(result, os.path.join(args.out, "overoptimization.png"))
    finish_stage(args.out, "bon", fingerprint, started,
                 {f"bon{c['n']}_rm_gold": c["gold"][0] for c in curves["rm"]})
    print(f"saved {os.path.join(args.out, 'bon.json')} and overoptimization.png in {time.time() - started:.0f}s")
    return result


def named_policy_paths(args):
    """--policy NAME=CKPT … and, with --ppo-run DIR, DIR's snapshots/iteration_*.pt in order: {name: path}."""
    paths = {}
    if args.ppo_run:
        folder = os.path.join(args.ppo_run, "snapshots")
        if not os.path.isdir(folder):
            raise ConfigError(f"--ppo-run {args.ppo_run}: no snapshots/ folder (run ppo.py with --snapshot-every)")
        for name in sorted(os.listdir(folder)):
            if name.startswith("iteration_") and name.endswith(".pt"):
                paths[f"ppo@{int(name[len('iteration_'):-3])}"] = os.path.join(folder, name)
    for value in args.policy or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--policy {value!r}: expected NAME=CHECKPOINT")
        if not os.path.isfile(path):
            raise ConfigError(f"--policy {value!r}: no such file {path}")
        paths[name] = path
    return paths


# =============================================================================
# 4. The chart (Gao et al. 2022, figure 1)
# =============================================================================

def plot_overoptimization(result, png_path):
    """Gold score and r_φ against √KL to π_SFT: best-of-n by r_φ and by the judge (lines), π* at
    each β (dotted), the PPO snapshots (a trajectory) and the other policies (points) — Gao et
    al.'s picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for key, label, style in (("rm", "best-of-n, chosen by r_φ", "o-"), ("judge", "best-of-n, chosen by the judge",
                                                                          "s--")):
        curve = result["best_of_n"][key]
        x = [math.sqrt(c["kl"]) for c in curve]
        axes[0].plot(x, [c["gold"][0] for c in curve], style, label=label)
        axes[1].plot(x, [c["proxy"][0] for c in curve], style, label=label)
        for c, xi in zip(curve, x):
            axes[0].annotate(f"n={c['n']}", (xi, c["gold"][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for key, label, color in (("rm", "π* on r_φ (β labelled)", "tab:blue"), ("judge", "π* on the judge", "tab:orange")):
        curve = result.get("optimum", {}).get(key, [])  # files written before π* was charted have none
        x = [math.sqrt(max(c["kl"], 0.0)) for c in curve]
        axes[0].plot(x, [c["gold"][0] for c in curve], ":", marker=".", color=color, label=label)
        axes[1].plot(x, [c["proxy"][0] for c in curve], ":", marker=".", color=color, label=label)
        for c, xi in zip(curve, x):
            axes[0].annotate(f"β={c['beta']:g}", (xi, c["gold"][0]), fontsize=6, xytext=(3, -8),
                             textcoords="offset points", color=color)
    ppo = [(name, p) for name, p in result["policies"].items() if name.startswith("ppo@")]
    if ppo:
        x = [math.sqrt(max(p["kl"][0], 0.0)) for _, p in ppo]
        axes[0].plot(x, [p["gold"][0] for _, p in ppo], "^-", color="tab:red", label="PPO snapshots (r_φ)")
        axes[1].plot(x, [p["proxy"][0] for _, p in ppo], "^-", color="tab:red", label="PPO snapshots (r_φ)")
    for name, p in result["policies"].items():
        if not name.startswith("ppo@"):
            for ax, key in ((axes[0], "gold"), (axes[1], "proxy")):
                ax.errorbar(math.sqrt(max(p["kl"][0], 0.0)), p[key][0], yerr=p[key][1], fmt="D", label=name)
    axes[0].set(title="gold score (the truth)", xlabel="√KL(π ‖ π_SFT)  (√nats)", ylabel="held-out gold score")
    axes[1].set(title="reward-model score (the proxy)", xlabel="√KL(π ‖ π_SFT)  (√nats)", ylabel="r_φ (shifted)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Over-optimisation (Gao et al. 2022): what the proxy promises and what the gold score gets")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
