"""Reports: the data report's picture (report.png) and the whole run's report.md.

1. The data report, drawn from data.prepare's report.json (matplotlib, Agg), its panels read
   left to right like the pipeline (eight panels):
    1. the funnel — megabytes left after each stage, split by source, with document counts;
    2. language identification — prose documents per predicted language;
    3. the quality rules — how many documents each rule removed (first failing rule);
    4. MinHash similarity — estimated Jaccard of random pairs and of LSH candidate pairs, the
       threshold, and the LSH S-curve P(candidate | s) = 1 − (1 − s^r)^b;
    5. perplexity — log10 perplexity per source with the percentile cut lines;
    6. the quality classifier — histogram of P(good) over the prose documents with the cut line,
       and its held-out precision, recall and AUC;
    7. the mixture — target share vs achieved token share of each source;
    8. the tokenizer — bytes per token on each source and on the validation text.

2. The run report, `python -m data.report --run runs/NAME`: the last step of `make run`. It only
   reads what the stages wrote (stage.json, eval.json, metrics.jsonl, their PNGs) — no model is
   loaded — and writes runs/NAME/report.md with a table per stage, the final comparison of the
   base, SFT, PPO and DPO models, the gold-score-vs-KL frontier and replies side by side. It lives
   here, beside the judge (data/tasks.py), because like the rest of data/ it sits below every
   training script in the import chain.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from data.tasks import read_jsonl


def plot_report(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(24, 10))
    _funnel(axes[0, 0], report)
    _language(axes[0, 1], report)
    _quality(axes[0, 2], report)
    _minhash(axes[0, 3], report)
    _perplexity(axes[1, 0], report)
    _classifier(axes[1, 1], report)
    _mixture(axes[1, 2], report)
    _tokenizer(axes[1, 3], report)
    fig.suptitle("Data pipeline report (seed Part 1, sections 1.1-1.3)", fontsize=14)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _funnel(ax, report):
    stages = report["funnel"]
    sources = sorted({s for stage in stages for s in stage["by_source"]})
    names = [stage["stage"] for stage in stages][::-1]
    left = np.zeros(len(names))
    for source in sources:
        mb = np.array([stage["by_source"].get(source, {}).get("bytes", 0) / 1e6 for stage in stages][::-1])
        ax.barh(names, mb, left=left, label=source)
        left += mb
    for y, stage in enumerate(stages[::-1]):
        ax.text(left[y], y, f" {stage['documents']:,} docs", va="center", fontsize=8)
    ax.set_xlabel("MB of text")
    ax.set_title("Funnel: text left after each stage")
    ax.set_xlim(0, max(left.max(), 1e-6) * 1.3)
    ax.legend(fontsize=8)


def _language(ax, report):
    info = report.get("language", {})
    if not info.get("by_language"):
        ax.text(0.5, 0.5, "language identification off (--languages any)", ha="center", transform=ax.transAxes)
    else:
        names = sorted(info["by_language"], key=info["by_language"].get)
        colours = ["tab:green" if n in info["languages"] else "tab:red" for n in names]
        ax.barh(names, [info["by_language"][n] for n in names], color=colours)
        ax.set_xscale("log")
        ax.set_xlabel("prose documents (log scale); red = removed")
    ax.set_title(f"Language identification: keep {','.join(info.get('languages', [])) or 'all'}"
                 + (f", {info['documents_per_second']:,.0f} docs/s" if "documents_per_second" in info else ""))


def _classifier(ax, report):
    info = report.get("classifier", {})
    if "scores" not in info:
        ax.text(0.5, 0.5, "quality classifier off (--classifier-reference none)", ha="center", transform=ax.transAxes)
        ax.set_title("Quality classifier")
        return
    ax.hist(info["scores"], bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.8)
    ax.axvline(info["threshold"], color="tab:red", linestyle="--",
               label=f"cut {info['threshold']:.3f}: {info['removed']} of {info['scored']} removed")
    ax.set_xlabel("P(good | document), fastText-style classifier")
    ax.set_ylabel("prose documents")
    ax.set_title(f"Quality classifier (held-out P {info['heldout_precision']:.2f} R {info['heldout_recall']:.2f} "
                 f"AUC {info['heldout_auc']:.3f})")
    ax.legend(fontsize=8)


def _quality(ax, report):
    removed = report["quality"]["removed_by_rule"]
    if not removed:
        ax.text(0.5, 0.5, "no document removed", ha="center", transform=ax.transAxes)
    else:
        rules = sorted(removed, key=removed.get)
        ax.barh(rules, [removed[r] for r in rules], color="tab:red")
    ax.set_xlabel("documents removed (first failing rule)")
    ax.set_title("Heuristic quality rules")
    ax.tick_params(axis="y", labelsize=8)


def _minhash(ax, report):
    near = report["near_dedup"]
    bins = np.linspace(0, 1, 51)
    if near.get("random_pair_similarities"):
        ax.hist(near["random_pair_similarities"], bins=bins, color="grey", alpha=0.6, label="random pairs")
    if near.get("candidate_similarities"):
        ax.hist(near["candidate_similarities"], bins=bins, color="tab:blue", alpha=0.8, label="LSH candidate pairs")
    ax.set_yscale("log")
    ax.set_xlabel("estimated Jaccard similarity (MinHash)")
    ax.set_ylabel("pairs")
    if "threshold" in near:
        ax.axvline(near["threshold"], color="tab:red", linestyle="--", label=f"threshold {near['threshold']}")
        s = np.linspace(0, 1, 200)
        twin = ax.twinx()
        twin.plot(s, 1 - (1 - s ** near["rows"]) ** near["bands"], color="tab:green",
                  label=f"P(candidate), b={near['bands']} r={near['rows']}")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("P(candidate | s)")
        twin.legend(loc="center left", fontsize=8)
    ax.set_title(f"Near-duplicates: {near.get('removed', 0)} removed in {near.get('clusters', 0)} clusters")
    ax.legend(loc="upper left", fontsize=8)


def _perplexity(ax, report):
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"])
    drew = False
    for source, info in report["perplexity"]["by_source"].items():
        if "log10_perplexity" not in info:
            continue
        colour = next(colours, "black")
        ax.hist(info["log10_perplexity"], bins=40, alpha=0.5, color=colour, label=source)
        for cut in (info["cut_low"], info["cut_high"]):
            ax.axvline(cut, color=colour, linestyle="--")
        drew = True
    if not drew:
        ax.text(0.5, 0.5, "too few documents for a perplexity band", ha="center", transform=ax.transAxes)
    band = report["perplexity"].get("band_percentiles")
    ax.set_xlabel("log10 perplexity per byte (Witten-Bell byte n-gram)")
    ax.set_ylabel("documents")
    ax.set_title(f"Perplexity filter: keep percentiles {band}")
    if drew:
        ax.legend(fontsize=8)


def _mixture(ax, report):
    mixture = report["mixture"]
    sources = list(mixture)
    x = np.arange(len(sources))
    ax.bar(x - 0.2, [mixture[s]["target_share"] for s in sources], 0.4, label="target (weight)")
    ax.bar(x + 0.2, [mixture[s].get("token_share", 0) for s in sources], 0.4, label="achieved (tokens)")
    ax.set_xticks(x, sources)
    ax.set_ylabel("share of the mixture")
    ax.set_title("Data mixture")
    ax.legend(fontsize=8)


def _tokenizer(ax, report):
    tok = report["tokenizer"]
    per_source = dict(tok.get("bytes_per_token_by_source", {}))
    per_source["validation"] = tok.get("bytes_per_token_val", 0)
    names = list(per_source)
    ax.bar(names, [per_source[n] for n in names], color="tab:purple")
    for i, n in enumerate(names):
        ax.text(i, per_source[n], f"{per_source[n]:.2f}", ha="center", va="bottom")
    ax.set_ylabel("UTF-8 bytes per token")
    ax.set_title(f"Tokenizer {tok.get('name', '')}: {tok.get('n_vocab', '?')} tokens")


# -----------------------------------------------------------------------------
# 2. The run report
# -----------------------------------------------------------------------------

STAGES = ("data", "pretrain", "sft", "reward", "ppo", "ppo_judge", "dpo", "eval", "bon")
OPTIONAL_STAGES = {"ppo_judge"}
SMOOTHING = 5  # iterations averaged per point of PPO's trajectory in the frontier plot


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _plus_minus(difference):
    return f"{difference['mean']:+.3f} ± {difference['stderr']:.3f}"


def final_table(evaluation):
    """Markdown rows: every model's held-out gold (greedy and sampled), KL to SFT, length."""
    reference = evaluation["reference"]
    rows = [f"| model | greedy gold | Δ vs {reference} | exact | sampled gold (T=1) | Δ vs {reference} | "
            f"KL to {reference} (nats) | length (tokens) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in evaluation["models"].items():
        rows.append(f"| {name} | {r['greedy_gold']:.3f} | {_plus_minus(r['greedy_vs_reference'])} | "
                    f"{r['exact_match']:.1%} | {r['sampled_gold']:.3f} | {_plus_minus(r['sampled_vs_reference'])} | "
                    f"{r['kl_to_reference']:.2f} | {r['response_length']:.1f} |")
    return rows


def best_of_n_rows(bon, reference, n=16):
    """Rows for the final table from reward.py --best-of-n: best-of-n (n = 16, or the largest n
    evaluated) chosen by r_φ and by the judge, and π* on r_φ at the β where it scores best.
    Their prompts are the first bon["prompts"] of the same held-out set; Δ is against the mean gold
    of SFT's own samples on those prompts, KL is KL_BoN = log n − (n − 1)/n."""
    rows, sizes = [], [c["n"] for c in bon["best_of_n"]["rm"]]
    n = n if n in sizes else max(sizes)
    for key, label in (("rm", "r_φ"), ("judge", "the judge")):
        point = next((c for c in bon["best_of_n"][key] if c["n"] == n), None)
        if point:
            rows.append(f"| best-of-{n}, chosen by {label} ({bon['prompts']} prompts) | — | — | — | "
                        f"{point['gold'][0]:.3f} | {_plus_minus(point['vs_sft'])} | {point['kl']:.2f} | — |")
    optimum = bon.get("optimum", {}).get("rm")  # files written before π* was charted have none
    if optimum:
        best = max(optimum, key=lambda c: c["gold"][0])
        rows.append(f"| π* on r_φ, its best β {best['beta']:g} (the optimum PPO and DPO aim at, over the same "
                    f"{bon['samples_per_prompt']} samples) | — | — | — | {best['gold'][0]:.3f} | "
                    f"{_plus_minus(best['vs_sft'])} | {best['kl']:.2f} | — |")
    return rows


def own_answers(evaluation):
    """The models whose greedy answers are their own: a sharpened reference (sft.py
    --eval-temperatures) answers greedily as the reference does, so it has no column of its own."""
    return {name: r for name, r in evaluation["models"].items() if "temperature" not in r}


def family_table(evaluation):
    """Greedy gold per task family and model."""
    models = own_answers(evaluation)
    families = sorted(next(iter(models.values()))["by_family"])
    rows = ["| family | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for family in families:
        rows.append(f"| {family} | " + " | ".join(f"{m['by_family'][family]['mean_score']:.3f}" for m in models.values())
                    + " |")
    return rows


def examples_table(evaluation):
    """Held-out prompts with every model's greedy reply, side by side."""
    names = list(own_answers(evaluation))
    cell = lambda text: (text.replace("|", "\\|").replace("\n", "⏎") or "∅")[:60]
    rows = ["| prompt | answer | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for e in evaluation["examples"]:
        rows.append(f"| {cell(e['prompt'])} | {cell(e['answer'])} | "
                    + " | ".join(cell(e["replies"][n]) for n in names) + " |")
    return rows


def stage_rows(run, stages):
    """One line per stage: its headline number against its own baseline, and its wall time."""
    rows = ["| stage | what it improves | result | baseline | seconds |", "|---|---|---|---|---|"]
    data = read_json(os.path.join(run, "data", "report.json"))
    if data:
        funnel = data["funnel"]
        rows.append(f"| data | documents kept, tokenizer | {funnel[-1]['documents']:,} of {funnel[0]['documents']:,} "
                    f"documents, {data['meta']['train_tokens']:,} train tokens, "
                    f"{data['tokenizer']['bytes_per_token_val']:.2f} bytes/token | 1 byte/token (raw bytes) | "
                    f"{_seconds(stages, 'data')} |")
    pretrain = (stages.get("pretrain") or {}).get("summary")
    if pretrain:
        rows.append(f"| pretrain | validation loss | {pretrain['val_loss']:.3f} nats/token ({pretrain['val_bpb']:.3f} "
                    f"bits/byte) | unigram {pretrain['unigram_loss']:.3f} | {_seconds(stages, 'pretrain')} |")
    evaluation = read_json(os.path.join(run, "eval", "eval.json"))
    models = evaluation["models"] if evaluation else {}
    if "sft" in models and "base" in models:
        rows.append(f"| SFT | held-out gold (greedy) | {models['sft']['greedy_gold']:.3f} | base "
                    f"{models['base']['greedy_gold']:.3f} | {_seconds(stages, 'sft')} |")
    reward = read_json(os.path.join(run, "reward", "eval.json"))
    if reward:
        rows.append(f"| reward model | pairwise accuracy on held-out comparisons | {reward['val_accuracy']:.3f} "
                    f"(labels with noise), {reward['val_clean_accuracy']:.3f} (noise-free) | chance 0.5 | "
                    f"{_seconds(stages, 'reward')} |")
    for name in ("ppo", "dpo"):
        if name in models and "sft" in models:
            r = models[name]
            rows.append(f"| {name.upper()} | held-out gold (sampled, T=1) | {r['sampled_gold']:.3f} "
                        f"({_plus_minus(r['sampled_vs_reference'])}), greedy {r['greedy_gold']:.3f} "
                        f"({_plus_minus(r['greedy_vs_reference'])}), KL {r['kl_to_reference']:.2f} | SFT "
                        f"{models['sft']['sampled_gold']:.3f}, greedy {models['sft']['greedy_gold']:.3f} | "
                        f"{_seconds(stages, name)} |")
    if "ppo_judge" in models and "sft" in models:
        r = models["ppo_judge"]
        rows.append(f"| PPO, judge reward (`JUDGE=1`) | held-out gold (sampled, T=1) | {r['sampled_gold']:.3f} "
                    f"({_plus_minus(r['sampled_vs_reference'])}), greedy {r['greedy_gold']:.3f} "
                    f"({_plus_minus(r['greedy_vs_reference'])}) | SFT | {_seconds(stages, 'ppo_judge')} |")
    if evaluation:
        rows.append(f"| evaluation | — | {evaluation['tasks']} held-out prompts × {len(models)} models | — | "
                    f"{_seconds(stages, 'eval')} |")
    bon = read_json(os.path.join(run, "bon", "bon.json"))
    if bon:
        best = max(bon["best_of_n"]["rm"], key=lambda c: c["gold"][0])
        rows.append(f"| best-of-n | gold of the sample r_φ picks | best at n = {best['n']}: {best['gold'][0]:.3f} "
                    f"({_plus_minus(best['vs_sft'])}) | SFT samples | {_seconds(stages, 'bon')} |")
    return rows


def _seconds(stages, name):
    seconds = (stages.get(name) or {}).get("seconds")
    return "—" if seconds is None else f"{seconds:.0f}"


def plot_frontier(run, evaluation, path):
    """Gold score against KL(π ‖ π_SFT): the held-out evaluation's points for every model and,
    as a line, PPO's rollouts iteration by iteration (train prompts). Higher and further left is
    better; where the RM-optimised policy gains KL without gaining gold, r_φ is being hacked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    metrics = os.path.join(run, "ppo", "metrics.jsonl")
    trajectory = [r for r in (read_jsonl(metrics) if os.path.exists(metrics) else [])
                  if "kl" in r and "gold_score" in r]
    if trajectory:
        # one iteration's 64 rollouts are a noisy estimate: a running mean over SMOOTHING iterations
        window = min(SMOOTHING, len(trajectory))
        kl, gold = (np.convolve([r[key] for r in trajectory], np.ones(window) / window, mode="valid")
                    for key in ("kl", "gold_score"))
        ax.plot(kl, gold, "-", color="tab:orange", alpha=0.6,
                label=f"PPO rollouts, running mean of {window} iterations (train prompts)")
    for name, r in evaluation["models"].items():
        if name == "base":
            continue  # far to the right: the base model was never near π_SFT
        ax.errorbar(r["kl_to_reference"], r["sampled_gold"], yerr=r["sampled_vs_reference"]["stderr"], fmt="o",
                    capsize=3, label=f"{name} (held-out)")
    ax.set(xlabel="KL(π ‖ π_SFT) per response (nats)", ylabel="gold score of samples (T=1)",
           title="Gold score vs KL to the SFT model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_final(evaluation, path):
    """Bars: greedy and sampled held-out gold per model, with paired standard errors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluation["models"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, key, label in ((-0.2, "greedy", "greedy"), (0.2, "sampled", "sampled (T=1)")):
        values = [evaluation["models"][n][f"{key}_gold"] for n in names]
        errors = [evaluation["models"][n][f"{key}_vs_reference"]["stderr"] for n in names]
        ax.bar(x + offset, values, 0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, names)
    ax.set(ylabel="mean gold score", title=f"Held-out gold score ({evaluation['tasks']} prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine_line():
    import torch
    device = (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else f"CPU only, {os.cpu_count()} cores")
    return f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, {device}"


def write_run_report(run, preset=None):
    """runs/NAME/report.md (and frontier.png, final.png beside it) from the stages' outputs."""
    stages = {name: read_json(os.path.join(run, name, "stage.json")) for name in STAGES}
    # ppo_judge runs only with `make run JUDGE=1`: absent, it is not part of this run, not unfinished
    missing = [name for name, s in stages.items() if not (s or {}).get("complete")
               and not (name in OPTIONAL_STAGES and s is None)]
    evaluation = read_json(os.path.join(run, "eval", "eval.json"))
    total = sum((s or {}).get("seconds") or 0 for s in stages.values())
    lines = [f"# Run report: {run}", "",
             f"Preset `{preset or '?'}`; written {time.strftime('%Y-%m-%d %H:%M')}; {machine_line()}.",
             f"Stage wall time, summed: {total / 60:.1f} min" + (f" (unfinished: {', '.join(missing)})" if missing else "")
             + ".", ""]
    if evaluation:
        plot_final(evaluation, os.path.join(run, "final.png"))
        plot_frontier(run, evaluation, os.path.join(run, "frontier.png"))
        lines += ["## Final comparison on held-out prompts", "",
                  f"{evaluation['tasks']} test-split task prompts, never trained on. Gold = data/tasks.judge (1 = exact "
                  "answer). Greedy: temperature 0. Sampled: one reply at temperature 1 per prompt, the distribution RLHF "
                  "optimises. Δ: paired difference to the reference on the same prompts ± its standard error. KL: "
                  "mean of log π(y|x) − log π_SFT(y|x) over the model's own samples.", "",
                  *final_table(evaluation)]
        bon = read_json(os.path.join(run, "bon", "bon.json"))
        if bon:
            lines += best_of_n_rows(bon, evaluation["reference"])
        lines += ["", "![final](final.png)", ""]
    lines += ["## Each stage and its number", "", *stage_rows(run, stages), ""]
    sections = [("Data", "data/report.png", "Funnel, quality rules, MinHash, perplexity, mixture, tokenizer."),
                ("Pretraining", "pretrain/pretrain.png", "Train/val loss against the unigram baseline, learning rate, "
                 "gradient norm; rollbacks in red."),
                ("SFT", "sft/sft.png", "Masked-loss training and validation curves."),
                ("Reward model", "reward/reward_training.png", "Bradley–Terry loss and pairwise accuracy."),
                ("Reward-model calibration", "reward/calibration.png", "Predicted P(y_w ≻ y_l) against observed."),
                ("PPO", "ppo/ppo.png", "Reward-model score, gold score, KL and length over the iterations."),
                ("DPO", "dpo/dpo.png", "Loss, implicit reward margins and preference accuracy."),
                ("Over-optimisation: best-of-n, PPO and DPO against KL", "bon/overoptimization.png",
                 "Gold score (left) and r_φ (right) against √KL to π_SFT: best-of-n chosen by r_φ and by the judge "
                 "(KL_BoN = log n − (n−1)/n), π* ∝ π_SFT·exp(r/β) over the same samples at each β (dotted), PPO's "
                 "snapshots along its run, DPO (Gao et al. 2022). Where the proxy keeps rising and gold does not, the reward model is being over-optimised.")]
    for title, image, caption in sections:
        if os.path.exists(os.path.join(run, image)):
            lines += [f"## {title}", "", caption, "", f"![{title}]({image})", ""]
    if evaluation:
        lines += ["## Gold score vs KL to SFT", "", "![frontier](frontier.png)", "",
                  "## Held-out gold per task family (greedy)", "", *family_table(evaluation), "",
                  "## Replies side by side (greedy)", "", *examples_table(evaluation), ""]
    path = os.path.join(run, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="write runs/NAME/report.md from the stages' outputs")
    p.add_argument("--run", required=True, help="the run directory (runs/NAME)")
    p.add_argument("--preset", default=None, help="the preset the run used, for the header")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run):
        print(f"error: --run {args.run}: no such run directory", file=sys.stderr)
        sys.exit(2)
    path = write_run_report(args.run, args.preset)
    print(f"[report] {path}")


if __name__ == "__main__":
    main()
