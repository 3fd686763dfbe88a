"""The FineWeb lesson at our scale (seed Part 1, section 1.2: "careful filtering ... outperformed raw
scale"): pretrain the same model for the same number of tokens on

    (a) the heuristically filtered pool (data.prepare's default stages, no classifier), and
    (b) the same pool filtered further by the quality classifier (data/quality.py, top fraction kept),

and compare held-out bits per byte on the high-quality set (Language Reference topics that neither
the pools nor the classifier saw) and on a general held-out set (stdlib code and prose documents that
pass the heuristic rules, 60/40 by bytes like the mixture, drawn before either arm is prepared). Both
held-out sets go into both arms' --decontaminate, so neither arm trains on them — not arm (a)'s own
validation split, which arm (b)'s mixture, drawn from the same pool, could contain. Both arms share
arm a's tokenizer, so their token streams and the held-out texts are tokenised identically.

    python -m experiments.fineweb_lesson --run-dir runs/fineweb [--max-steps 200] [--keep-fraction 0.5]

Reuses the pipeline: data.prepare.main with flags (the held-out topics go in through --decontaminate,
which removes them from both pools, and the classifier's reference is the other topics), then
train_gpt's `train` command and its evaluate_loss / bits_per_byte. Writes RUN/results.json and
RUN/fineweb_lesson.png and prints a table.
"""

import argparse
import contextlib
import json
import os
import sys

import numpy as np

DEFAULTS = dict(max_steps=200, keep_fraction=0.5, heldout_fraction=0.2, seed=0)
MODEL = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "256"]  # the cpu preset's model


def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.fineweb_lesson", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/fineweb", help="directory for both arms' data, models and the results")
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"],
                   help="pretraining steps of each arm (16 sequences of 256 tokens per step, as the cpu preset)")
    p.add_argument("--keep-fraction", type=float, default=DEFAULTS["keep_fraction"],
                   help="arm b: the top fraction of prose documents by classifier score that is kept")
    p.add_argument("--heldout-fraction", type=float, default=DEFAULTS["heldout_fraction"],
                   help="fraction of the Language Reference topics held out as the high-quality evaluation set")
    p.add_argument("--prepare-args", default="", help="extra flags for both arms' data.prepare, e.g. '--max-bytes 3000000'")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="topic split and data seed")
    return p


def split_topics(heldout_fraction, seed):
    """(held-out topic texts, reference topic texts): a seeded split of pydoc_data.topics."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    order = np.random.default_rng(seed).permutation(len(names))
    n_held = max(1, int(round(heldout_fraction * len(names))))
    held = [topics[names[i]] for i in sorted(order[:n_held])]
    reference = [topics[names[i]] for i in sorted(order[n_held:])]
    return held, reference


def general_heldout(seed, target_bytes=300_000, code_share=0.6):
    """Documents of the default corpus that pass the heuristic rules (not Language Reference topics),
    shuffled with `seed`, taken until target_bytes, code_share of them code: the general held-out set."""
    import dataclasses
    import random
    from data import curate, sources
    by_kind = {}
    for source in sources.default_sources():
        for doc in source.load(10**9, seed, []):
            doc = dataclasses.replace(doc, text=curate.normalise_text(doc.text)[0])
            if doc.text and not doc.origin.startswith("pydoc_data.topics"):
                by_kind.setdefault(doc.kind, []).append(doc)
    chosen = []
    for kind, share in (("code", code_share), ("prose", 1 - code_share)):
        kept, _, _ = curate.quality_filter(by_kind[kind])
        random.Random(seed).shuffle(kept)
        taken = 0
        for doc in kept:
            if taken >= share * target_bytes:
                break
            chosen.append(doc.text)
            taken += len(doc.text.encode("utf-8", "surrogatepass"))
    return chosen


def write_jsonl(path, texts):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def eval_directory(out_dir, texts, tokenizer_dir):
    """A data directory (meta.json + one shard, train = val) holding `texts`, for train_gpt.TokenData."""
    from data.prepare import tokenize_texts, write_shards
    from data.sources import utf8
    from data.tokenizer import load_tokenizer
    enc = load_tokenizer(tokenizer_dir)
    os.makedirs(out_dir, exist_ok=True)
    ids, _ = tokenize_texts(texts, tokenizer_dir, 1)
    shards, tokens = write_shards(out_dir, "val", ids, enc.eot_token, enc.n_vocab, 10**9)
    meta = {"vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "tokenizer": os.path.abspath(tokenizer_dir),
            "train_shards": shards, "val_shards": shards, "train_tokens": tokens, "val_tokens": tokens,
            "val_bytes": sum(len(utf8(t)) for t in texts)}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def bits_per_byte_on(model_path, data_dir):
    """Mean NLL over every non-overlapping window of data_dir's validation shard, in bits per byte."""
    from train_gpt import TokenData, bits_per_byte, evaluate_loss, model_from_checkpoint
    model, _ = model_from_checkpoint(model_path)
    data = TokenData(data_dir, model.config.block_size, model.config.vocab_size)
    loss = evaluate_loss(model, data, 10**9, 16, "cpu", contextlib.nullcontext())
    meta = data.meta
    return bits_per_byte(loss, meta["val_tokens"], meta["val_bytes"]), loss


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = ["high_quality", "general"]
    arms = list(results["arms"])
    x = np.arange(len(sets))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(arms):
        values = [results["arms"][arm][f"bpb_{s}"] for s in sets]
        bars = ax.bar(x + (i - 0.5) * 0.4, values, 0.4, label=results["arms"][arm]["label"])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, ["held-out Language Reference", "general held-out (code + prose)"])
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"The FineWeb lesson at our scale: same model, {results['tokens_per_arm']:,} tokens per arm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_steps < 1 or not 0 < args.keep_fraction <= 1 or not 0 < args.heldout_fraction < 1:
        print("error: --max-steps must be >= 1, --keep-fraction in (0, 1], --heldout-fraction in (0, 1)", file=sys.stderr)
        sys.exit(2)
    import torch
    torch.set_num_threads(1)
    from data import prepare
    import train_gpt

    run = args.run_dir
    os.makedirs(run, exist_ok=True)
    held, reference = split_topics(args.heldout_fraction, args.seed)
    held_path, reference_path = os.path.join(run, "hq_heldout.jsonl"), os.path.join(run, "hq_reference.jsonl")
    general_texts = general_heldout(args.seed)
    general_path = os.path.join(run, "general_heldout.jsonl")
    write_jsonl(held_path, held)
    write_jsonl(reference_path, reference)
    write_jsonl(general_path, general_texts)
    common = ["--decontaminate", held_path, "--decontaminate", general_path, "--workers", "1",
              "--seed", str(args.seed), "--quiet",
              *args.prepare_args.split()]
    arms = {"a": {"label": "(a) heuristic filters", "prepare": ["--classifier-reference", "none"]},
            "b": {"label": f"(b) + classifier, top {args.keep_fraction:.0%} of prose",
                  "prepare": ["--classifier-reference", reference_path,
                              "--classifier-keep-fraction", str(args.keep_fraction),
                              "--tokenizer", os.path.join(run, "a", "data", "tokenizer")]}}
    for name, arm in arms.items():
        prepare.main(["--out", os.path.join(run, name, "data"), *common, *arm["prepare"]])
    general = os.path.join(run, "eval_general")
    eval_directory(general, general_texts, os.path.join(run, "a", "data", "tokenizer"))
    high_quality = os.path.join(run, "eval_high_quality")
    eval_directory(high_quality, held, os.path.join(run, "a", "data", "tokenizer"))

    results = {"max_steps": args.max_steps, "tokens_per_arm": args.max_steps * 16 * 256, "keep_fraction": args.keep_fraction,
               "heldout_topics": len(held), "reference_topics": len(reference),
               "general_documents": len(general_texts), "arms": {}}
    for name, arm in arms.items():
        out = os.path.join(run, name, "pretrain")
        train_gpt.main(["train", "--data", os.path.join(run, name, "data"), "--out", out, *MODEL,
                        "--max-steps", str(args.max_steps), "--eval-every", str(args.max_steps),
                        "--checkpoint-every", str(args.max_steps), "--warmup-steps", str(min(50, args.max_steps // 4)),
                        "--log-every", "50", "--device", "cpu"])
        with open(os.path.join(run, name, "data", "report.json")) as f:
            report = json.load(f)
        entry = {"label": arm["label"], "train_tokens": report["meta"]["train_tokens"],
                 "mixture_bytes": report["funnel"][-1]["bytes"],
                 "epochs": round(results["tokens_per_arm"] / report["meta"]["train_tokens"], 2)}
        for key, directory in (("high_quality", high_quality), ("general", general)):
            bpb, loss = bits_per_byte_on(os.path.join(out, "model.pt"), directory)
            entry[f"bpb_{key}"], entry[f"loss_{key}"] = round(bpb, 4), round(loss, 4)
        if "classifier" in report and "heldout_auc" in report["classifier"]:
            c = report["classifier"]
            entry["classifier"] = {k: c[k] for k in ("heldout_precision", "heldout_recall", "heldout_auc",
                                                     "threshold", "removed", "scored")}
        results["arms"][name] = entry
    path = os.path.join(run, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    plot(results, os.path.join(run, "fineweb_lesson.png"))
    print(f"\nThe FineWeb lesson: {args.max_steps} steps = {results['tokens_per_arm']:,} tokens per arm; "
          f"{len(held)} held-out Language Reference topics")
    print(f"| arm | unique train tokens | epochs | bpb, {len(held)} held-out Language Reference topics | "
          f"bpb, {len(general_texts)} general held-out documents |")
    print("|---|---|---|---|---|")
    for entry in results["arms"].values():
        print(f"| {entry['label']} | {entry['train_tokens']:,} | {entry['epochs']} | {entry['bpb_high_quality']:.4f} "
              f"| {entry['bpb_general']:.4f} |")
    return results


if __name__ == "__main__":
    main()
