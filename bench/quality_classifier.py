"""Quality-classifier benchmark: our numpy fastText-style classifier (data/quality.py) against the `fasttext`
package on the same examples.

    python bench/quality_classifier.py [--epochs 10] [--dim 16] [--repeat 3]

Examples: data.quality.training_chunks on the default corpus — paragraph chunks of the Language Reference
(pydoc_data.topics, "good") against chunks of the other stdlib prose documents that pass the heuristic
rules ("random"), split by document into train and held out. Both models get the same settings: word
unigrams + bigrams, 2^18 hash buckets, d = 16, the same epochs and learning rate, binary loss (ours:
logistic; fasttext: softmax over 2 labels, one thread). fasttext splits on whitespace, so its input is
our words (lower-cased \\w runs) joined by spaces. Printed: held-out accuracy, precision, recall and AUC,
training time, and scoring speed (chunks/s; ours includes hashing the text, fasttext's includes its
tokenising) — each the best of --repeat runs.

`fasttext` is optional (pip install fasttext-wheel); without it only our row is printed.
"""

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import curate, quality, sources  # noqa: E402
from data.dedup import words_of  # noqa: E402


def examples(seed=0):
    documents = sources.stdlib_prose_source().load(10**9, seed, [])
    documents = [dataclasses.replace(d, text=curate.normalise_text(d.text)[0]) for d in documents]
    kept, _, _ = curate.quality_filter([d for d in documents if d.text])
    positives = quality.reference_texts("stdlib-topics")
    reference = {curate.exact_hash(t) for t in positives}
    negatives = [d.text for d in kept if curate.exact_hash(d.text) not in reference]
    return quality.training_chunks(positives, negatives, seed)


def metrics(scores, labels):
    precision, recall = quality.precision_recall(scores, labels)
    return {"accuracy": float(((np.asarray(scores) >= 0.5) == np.asarray(labels)).mean()), "precision": precision,
            "recall": recall, "auc": quality.roc_auc(scores, labels)}


def ours(train_x, train_y, held_x, held_y, args, seed):
    start = time.perf_counter()
    model = quality.FastTextClassifier(dim=args.dim, seed=seed).fit(train_x, train_y, args.epochs, args.lr)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = model.predict_proba(held_x)
    return metrics(scores, held_y), train_seconds, len(held_x) / (time.perf_counter() - start)


def peer(train_x, train_y, held_x, held_y, args, seed):
    import fasttext
    lines = [f"__label__{'good' if label else 'random'} {' '.join(words_of(text))}\n"
             for text, label in zip(train_x, train_y)]
    random.Random(seed).shuffle(lines)  # fasttext reads the file in order; ours shuffles every epoch
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(lines)
    start = time.perf_counter()
    model = fasttext.train_supervised(f.name, dim=args.dim, epoch=args.epochs, lr=args.lr,
                                      wordNgrams=2, bucket=quality.NUM_BUCKETS, minCount=1, thread=1, verbose=0)
    train_seconds = time.perf_counter() - start
    os.unlink(f.name)
    start = time.perf_counter()
    held_clean = [" ".join(words_of(t)) for t in held_x]
    labels, probs = model.predict(held_clean, k=1)
    seconds = time.perf_counter() - start
    # the top label's probability only: with numpy 2, fasttext-wheel 0.9.2 repeats the first probability
    # across all k entries of a k > 1 prediction
    scores = [p[0] if l[0] == "__label__good" else 1 - p[0] for l, p in zip(labels, probs)]
    return metrics(scores, held_y), train_seconds, len(held_x) / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=quality.EPOCHS, help="training epochs for both")
    p.add_argument("--dim", type=int, default=quality.DIM, help="embedding dimension for both")
    p.add_argument("--lr", type=float, default=quality.LR,
                   help="learning rate for both (ours sums the gradients of a minibatch of 16, so each example "
                        "moves the weights by lr × its gradient, as in fasttext's per-example SGD)")
    p.add_argument("--repeat", type=int, default=5,
                   help="runs per method with seeds 0..repeat−1 (initialisation and example order): metrics are "
                        "their mean ± standard deviation, times the best")
    args = p.parse_args()
    data = examples()
    print(f"examples: {len(data[0])} train chunks, {len(data[2])} held-out chunks (half good, half random)")
    rows = [("ours (numpy)", ours)]
    try:
        import fasttext  # noqa: F401
        rows.append(("fasttext 0.9 (C++)", peer))
    except ImportError:
        print("fasttext not installed (pip install fasttext-wheel): its row is left out")
    print("| classifier | held-out accuracy | precision | recall | AUC | train (s) | scoring (chunks/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in rows:
        results = [run(*data, args, seed) for seed in range(args.repeat)]
        cell = lambda key: (f"{np.mean([r[0][key] for r in results]):.3f} ± "  # noqa: E731
                            f"{np.std([r[0][key] for r in results]):.3f}")
        train_seconds = min(r[1] for r in results)
        speed = max(r[2] for r in results)
        print(f"| {name} | {cell('accuracy')} | {cell('precision')} | {cell('recall')} | {cell('auc')} | "
              f"{train_seconds:.2f} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
