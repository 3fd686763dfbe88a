"""MinHash near-dedup benchmark: our numpy MinHash/LSH (data/dedup.py) against `datasketch`.

    python bench/minhash_dedup.py [--docs 2000] [--planted 400] [--num-perm 128] [--threshold 0.8]

Corpus: real documents (standard-library .py files, first 20,000 characters) plus planted copies
of some of them with a fraction of their words replaced, so that the pairs' Jaccard similarities
spread around the threshold. Both methods get the same word 5-gram shingles and the same (b, r).

Printed:
  * speed in documents per second (shingling + signatures + LSH + decisions);
  * precision and recall of "duplicate" decisions against the exact Jaccard similarity of the
    shingle sets (a pair is a true duplicate when J ≥ threshold);
  * agreement of the two methods' decisions on every pair that either flags or that was planted;
  * recall by similarity bucket of the planted pairs.

`datasketch` is optional (pip install datasketch); without it only our numbers are printed.
"""

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.curate import normalise_text  # noqa: E402
from data.dedup import (LSH_WEIGHTS, lsh_candidate_pairs, minhash_signatures, optimal_bands_rows,  # noqa: E402
                        shingle_hashes, words_of)
from data.sources import stdlib_files  # noqa: E402


def load_corpus(n_docs, n_planted, seed):
    rng = random.Random(seed)
    texts = []
    for path in stdlib_files((".py",), seed):
        with open(path, "rb") as f:
            text, _ = normalise_text(f.read().decode("utf-8", "surrogateescape"), max_chars=20_000)
        if len(words_of(text)) >= 50:
            texts.append(text)
        if len(texts) == n_docs - n_planted:
            break
    planted = []
    for k in range(n_planted):
        base = rng.randrange(len(texts))
        words = texts[base].split()
        rate = [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.15][k % 7]
        for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
            words[i] = rng.choice(words)
        texts.append(" ".join(words))
        planted.append((base, len(texts) - 1))
    return texts, planted


def string_shingles(text, n=5):
    words = words_of(text)
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def exact_jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 1.0


def run_ours(texts, num_perm, threshold, bands, rows, seed=0):
    start = time.perf_counter()
    signatures = minhash_signatures([shingle_hashes(t) for t in texts], num_perm, seed=seed)
    candidates = sorted(lsh_candidate_pairs(signatures, bands, rows))
    flagged = {(i, j) for i, j in candidates if np.mean(signatures[i] == signatures[j]) >= threshold}
    return flagged, set(candidates), time.perf_counter() - start


def run_datasketch(texts, num_perm, threshold, bands, rows, scheme, batch):
    """datasketch with the same shingles and (b, r); `scheme` picks its permutation family:
    "legacy" is (a·h + b) mod (2^61 − 1) like ours, "affine32" (its 2.0 default) is a·h + b
    mod 2^32 after a mixing step; `batch` uses update_batch instead of one update per shingle."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    minhashes = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=1, scheme=scheme)
        encoded = [s.encode("utf-8", "surrogateescape") for s in string_shingles(t)]
        if batch:
            m.update_batch(encoded)
        else:
            for shingle in encoded:
                m.update(shingle)
        minhashes.append(m)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    candidates = set()
    for i, m in enumerate(minhashes):
        candidates.update((min(i, j), max(i, j)) for j in lsh.query(m) if j != i)
    flagged = {(i, j) for i, j in candidates if minhashes[i].jaccard(minhashes[j]) >= threshold}
    return flagged, candidates, time.perf_counter() - start


DATASKETCH_VARIANTS = {  # name: (scheme, batch)
    "ds update": ("affine32", False),  # the classic loop: one m.update(shingle) per shingle
    "ds batch legacy": ("legacy", True),  # same hash family as ours
    "ds batch affine32": ("affine32", True),  # datasketch 2.0's default, no Mersenne modulus
}


def precision_recall(flagged, truth, universe):
    true_pairs = {p for p in universe if truth[p]}
    precision = sum(truth[p] for p in flagged) / len(flagged) if flagged else 1.0
    recall = len(flagged & true_pairs) / len(true_pairs) if true_pairs else 1.0
    return precision, recall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=2000, help="documents in the benchmark corpus")
    p.add_argument("--planted", type=int, default=400, help="how many of them are planted near-copies")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold for a duplicate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()

    texts, planted = load_corpus(args.docs, args.planted, args.seed)
    bands, rows = optimal_bands_rows(args.threshold, args.num_perm, *LSH_WEIGHTS)
    print(f"corpus: {len(texts)} documents ({sum(len(t) for t in texts) / 1e6:.1f} MB), {len(planted)} planted "
          f"near-copies; num_perm={args.num_perm}, threshold={args.threshold}, bands={bands}, rows={rows}\n")

    results = {"ours (numpy)": run_ours(texts, args.num_perm, args.threshold, bands, rows),
               # the same algorithm with other random permutations: the noise floor of "agreement"
               "ours, other seed": run_ours(texts, args.num_perm, args.threshold, bands, rows, seed=1)}
    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch not installed (pip install datasketch): comparing against exact Jaccard only\n")
    else:
        for name, (scheme, batch) in DATASKETCH_VARIANTS.items():
            results[name] = run_datasketch(texts, args.num_perm, args.threshold, bands, rows, scheme, batch)

    universe = set(planted)
    for flagged, candidates, _ in results.values():
        universe |= flagged | candidates
    shingles = {}
    truth = {}
    for i, j in universe:
        for k in (i, j):
            if k not in shingles:
                shingles[k] = string_shingles(texts[k])
        truth[(i, j)] = exact_jaccard(shingles[i], shingles[j]) >= args.threshold

    ours_flagged = results["ours (numpy)"][0]
    ours_seconds = results["ours (numpy)"][2]
    all_pairs = len(texts) * (len(texts) - 1) // 2
    print(f"{'method':<20}{'seconds':>9}{'docs/s':>9}{'ours x':>8}{'candidates':>12}{'flagged':>9}"
          f"{'precision':>11}{'recall':>8}{'agree (all)':>13}{'agree (hard)':>14}")
    for name, (flagged, candidates, seconds) in results.items():
        precision, recall = precision_recall(flagged, truth, universe)
        disagree = sum((p in flagged) != (p in ours_flagged) for p in universe)
        print(f"{name:<20}{seconds:>9.2f}{len(texts) / seconds:>9.0f}{seconds / ours_seconds:>8.1f}"
              f"{len(candidates):>12}{len(flagged):>9}{precision:>11.3f}{recall:>8.3f}"
              f"{1 - disagree / all_pairs:>13.5f}{1 - disagree / len(universe):>14.4f}")
    print(f"\n'ours x': how many times faster ours is. 'flagged': LSH candidates whose MinHash estimate is "
          f">= {args.threshold}.\nprecision/recall: against exact Jaccard >= {args.threshold}. Agreement of "
          f"duplicate decisions with ours over all {all_pairs:,} pairs,\nand over the {len(universe)} hard "
          f"pairs (planted, or a candidate of any method) where MinHash noise near the threshold decides.")

    print("\nrecall on planted pairs by exact similarity")
    print(f"{'Jaccard':<12}{'pairs':>7}" + "".join(f"{name:>20}" for name in results))
    edges = [0.0, 0.5, 0.7, 0.8, 0.9, 1.01]
    similarity = {pair: exact_jaccard(shingles[pair[0]], shingles[pair[1]]) for pair in planted}
    for low, high in zip(edges, edges[1:]):
        pairs = [pair for pair in planted if low <= similarity[pair] < high]
        if pairs:
            row = "".join(f"{np.mean([pair in r[0] for pair in pairs]):>20.3f}" for r in results.values())
            print(f"[{low:.1f}, {min(high, 1):.1f}){'':<2}{len(pairs):>7}{row}")


if __name__ == "__main__":
    main()
