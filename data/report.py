"""The data report's picture: report.png, drawn from report.json's numbers (matplotlib, Agg).

Six panels, read left to right like the pipeline:
    1. the funnel — megabytes left after each stage, split by source, with document counts;
    2. the quality rules — how many documents each rule removed (first failing rule);
    3. MinHash similarity — estimated Jaccard of random pairs and of LSH candidate pairs, the
       threshold, and the LSH S-curve P(candidate | s) = 1 − (1 − s^r)^b;
    4. perplexity — log10 perplexity per source with the percentile cut lines;
    5. the mixture — target share vs achieved token share of each source;
    6. the tokenizer — bytes per token on each source and on the validation text.
"""

import numpy as np


def plot_report(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    _funnel(axes[0, 0], report)
    _quality(axes[0, 1], report)
    _minhash(axes[0, 2], report)
    _perplexity(axes[1, 0], report)
    _mixture(axes[1, 1], report)
    _tokenizer(axes[1, 2], report)
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
