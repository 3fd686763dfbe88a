"""MinHash, LSH and suffix-array deduplication (data/dedup.py, seed section 1.2)."""

import math
import random

import numpy as np
import pytest

from data.dedup import (LSH_WEIGHTS, jaccard, lcp_array, lsh_candidate_pairs, lsh_probability, minhash_signatures,
                        mod_mersenne61, mul_mod_mersenne61, near_dedup, near_duplicate_clusters, optimal_bands_rows,
                        permutation_parameters, permute, repeated_span_mask, shingle_hashes, substring_dedup,
                        sorted_band_candidates, suffix_array, text_word_hashes, word_hashes, words_of)
from data.sources import Document


def sets_with_jaccard(rng, size, j):
    """Two sets of 32-bit ints with |A ∩ B| = k, |A| = |B| = size, so J = k / (2·size − k)."""
    k = round(2 * size * j / (1 + j))
    pool = rng.sample(range(1, 2**32), 2 * size - k)
    shared, a_only, b_only = pool[:k], pool[k:size], pool[size:]
    return np.array(shared + a_only, dtype=np.uint64), np.array(shared + b_only, dtype=np.uint64)


def test_mersenne_reduction_matches_python_integers():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    p = (1 << 61) - 1
    assert [int(v) for v in mod_mersenne61(x)] == [int(v) % p for v in x]
    a = rng.integers(1, p, size=1000, dtype=np.uint64)
    h = rng.integers(0, 2**32, size=1000, dtype=np.uint64)
    assert [int(v) for v in mul_mod_mersenne61(a, h)] == [int(x) * int(y) % p for x, y in zip(a, h)]
    # the fast in-place permutation equals the reference, including the extreme values
    a, b = permutation_parameters(64, seed=1)
    a[:2], b[:2] = p - 1, p - 1
    h = np.concatenate([h, np.array([0, 1, 2**32 - 1], dtype=np.uint64)])
    fast = permute(h, a, b)  # (num_perm, len(h)): one row per permutation
    assert [[int(v) for v in row] for row in fast] == [[(int(x) * int(y) + int(z)) % p for y in h]
                                                       for x, z in zip(a, b)]


def test_minhash_estimate_is_within_three_sigma_of_exact_jaccard():
    rng = random.Random(0)
    num_perm = 256
    for target in (0.1, 0.3, 0.5, 0.8, 0.95):
        a, b = sets_with_jaccard(rng, 400, target)
        exact = jaccard(a, b)
        sig = minhash_signatures([a, b], num_perm, seed=1)
        estimate = np.mean(sig[0] == sig[1])
        sigma = math.sqrt(exact * (1 - exact) / num_perm)
        assert abs(estimate - exact) <= 3 * sigma + 1e-9, (target, exact, estimate)


def test_signatures_do_not_overflow_for_large_hashes():
    """The largest hashes times full-width a_j exceed 2^64 (a wrapped product would still be < p): compare
    with Python's exact integers."""
    h = np.array([2**32 - 1, 2**32 - 2], dtype=np.uint64)
    sig = minhash_signatures([h], 64, seed=3)
    a, b = permutation_parameters(64, seed=3)
    p = (1 << 61) - 1
    assert max(int(a_j) for a_j in a) * (2**32 - 1) >= 2**64  # the test needs products that overflow uint64
    assert sig.tolist() == [[min((int(a_j) * int(x) + int(b_j)) % p for x in h) for a_j, b_j in zip(a, b)]]
    with pytest.raises(ValueError):
        minhash_signatures([np.array([2**40], dtype=np.uint64)], 8)


def test_numpy_word_hashes_match_the_regex_words():
    """text_word_hashes finds words with a code-point table instead of the regex: it must give
    exactly word_hashes(words_of(text)) — including non-ASCII letters, digits of other scripts,
    underscores, combining marks, characters whose lower case is longer, and lone surrogates."""
    texts = ["", "  ...  ", "a", "!!a!!", "Hello, World! hello_world 42x",
             "Straße İstanbul ǅemal café ﬁne e\u0301 ⅷ ½ ١٢٣ 日本語 ÀÉ—dash \udcff tail",
             "def f(x):\n    return x**2  # ÷ × ∑"]
    for text in texts:
        assert text_word_hashes(text).tolist() == word_hashes(words_of(text)).tolist(), text
    rng = random.Random(8)
    vocabulary = sorted({"".join(rng.choice("abcdé_1") for _ in range(rng.randint(1, 8))) for _ in range(3000)})
    hashes = word_hashes(vocabulary)
    assert len(set(hashes.tolist())) == len(vocabulary)  # distinct words, distinct 64-bit hashes
    assert word_hashes(vocabulary[::-1]).tolist() == hashes.tolist()[::-1]  # position does not matter
    # the definition, with Python integers: fmix64(Σ_k ord(c_k)·M^k mod 2^64) — no per-process salt
    mask = 2**64 - 1

    def by_hand(word):
        x = sum(ord(c) * pow(0xC2B2AE3D27D4EB4F, k, 2**64) for k, c in enumerate(word)) & mask
        x ^= x >> 33
        x = x * 0xFF51AFD7ED558CCD & mask
        return x ^ (x >> 33)

    words = ["minhash", "é", "x" * 300, "日本語"]
    assert word_hashes(words).tolist() == [by_hand(w) for w in words]


def test_shingle_hashes_are_a_sorted_set_that_ignores_case_and_punctuation():
    text = " ".join(f"w{i % 40}" for i in range(200))  # repeated 5-grams
    shingles = shingle_hashes(text, 5)
    assert shingles.dtype == np.uint64 and shingles.max() < 2**32
    assert shingles.tolist() == sorted(set(shingles.tolist())) and len(shingles) == 40
    assert shingle_hashes(text.upper().replace(" ", ", "), 5).tolist() == shingles.tolist()
    assert len(shingle_hashes("only three words", 5)) == 1 and len(shingle_hashes("?!", 5)) == 1


def test_lsh_probability_matches_simulation():
    rng = random.Random(2)
    bands, rows = 16, 8
    for s in (0.5, 0.7, 0.8, 0.9):
        pairs = [sets_with_jaccard(rng, 100, s) for _ in range(150)]
        sig = minhash_signatures([x for pair in pairs for x in pair], bands * rows, seed=4)
        candidates = lsh_candidate_pairs(sig, bands, rows)
        simulated = np.mean([(2 * i, 2 * i + 1) in candidates for i in range(len(pairs))])
        exact_s = np.mean([jaccard(a, b) for a, b in pairs])
        predicted = float(lsh_probability(exact_s, bands, rows))
        assert abs(simulated - predicted) <= 3 * math.sqrt(predicted * (1 - predicted) / len(pairs)) + 0.02


def test_optimal_bands_rows():
    bands, rows = optimal_bands_rows(0.8, 128)
    assert bands * rows <= 128
    assert abs((1 / bands) ** (1 / rows) - 0.8) < 0.1  # the S-curve's steep part sits at the threshold
    grid = np.linspace(0, 1, 401)

    def cost(b, r, w=(0.5, 0.5)):  # the two areas, summed over a fine grid (a Riemann sum)
        p, ds = lsh_probability(grid, b, r), grid[1] - grid[0]
        return w[0] * np.sum(np.where(grid <= 0.8, p, 0)) * ds + w[1] * np.sum(np.where(grid >= 0.8, 1 - p, 0)) * ds

    for b, r in [(16, 8), (8, 16), (32, 4), (4, 32), (128, 1)]:
        assert cost(bands, rows) <= cost(b, r) + 1e-4
    b_recall, r_recall = optimal_bands_rows(0.8, 128, *LSH_WEIGHTS)
    assert lsh_probability(0.9, b_recall, r_recall) > lsh_probability(0.9, bands, rows)


def _mutate(words, rng, n_changes, vocabulary):
    words = list(words)
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = rng.choice(vocabulary)
    return words


def test_planted_near_duplicates_are_found_and_dissimilar_pairs_kept_apart():
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(5000)]
    texts, planted, dissimilar = [], [], []
    for _ in range(40):
        base = [rng.choice(vocabulary) for _ in range(300)]
        texts.append(" ".join(base))
        texts.append(" ".join(_mutate(base, rng, 2, vocabulary)))  # J ≥ 0.9
        planted.append((len(texts) - 2, len(texts) - 1))
        texts.append(" ".join(_mutate(base, rng, 60, vocabulary)))  # J well below 0.5
        dissimilar.append((len(texts) - 3, len(texts) - 1))
    shingles = [shingle_hashes(t, 5) for t in texts]
    assert all(jaccard(shingles[i], shingles[j]) >= 0.9 for i, j in planted)
    assert all(jaccard(shingles[i], shingles[j]) < 0.5 for i, j in dissimilar)
    clusters, _ = near_duplicate_clusters(minhash_signatures(shingles, 128, seed=0), threshold=0.8)
    cluster_of = {i: c for c, members in enumerate(clusters) for i in members}
    same = lambda i, j: i in cluster_of and cluster_of.get(i) == cluster_of.get(j)  # noqa: E731
    assert all(same(i, j) for i, j in planted)
    assert sum(same(i, j) for i, j in dissimilar) <= 0.01 * len(dissimilar)


def test_near_dedup_keeps_the_first_of_each_cluster():
    words = [f"word{i}" for i in range(200)]
    docs = [Document(" ".join(words), "s", "a"), Document(" ".join(words[::-1]), "s", "b"),
            Document(" ".join(words[:199]) + " extra", "s", "c")]
    kept, removed, info = near_dedup(docs)
    assert [d.origin for d in kept] == ["a", "b"] and [d.origin for d in removed] == ["c"]
    assert info["clusters"] == 1 and info["largest_clusters"] == [["a", "c"]]


def _naive_suffix_array(tokens):
    return sorted(range(len(tokens)), key=lambda i: list(tokens[i:]))


def test_suffix_array_and_lcp_match_naive_definitions():
    rng = np.random.default_rng(5)
    for n in (1, 2, 10, 200):
        tokens = rng.integers(0, 3, size=n)
        sa = suffix_array(tokens)
        assert sa.tolist() == _naive_suffix_array(tokens.tolist())
        lcp = lcp_array(tokens, sa)
        for i in range(1, n):
            a, b = tokens[sa[i - 1]:].tolist(), tokens[sa[i]:].tolist()
            assert lcp[i] == next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_repeated_span_mask_marks_only_the_later_copy():
    rng = np.random.default_rng(6)
    span = rng.integers(1000, 2000, size=60)
    tokens = np.concatenate([rng.integers(0, 1000, 30), span, rng.integers(0, 1000, 40), span, [-1]])
    mask = repeated_span_mask(tokens, min_length=50)
    assert not mask[:130].any()  # the first copy and the text around it stay
    assert mask[130:190].all() and not mask[190:].any()


def test_substring_dedup_cuts_repeated_boilerplate():
    licence = " ".join(f"clause{i}" for i in range(40)) + "."
    intros, bodies = ["Apples grow.", "Bees hum.", "Comets fly."], ["Red fruit.", "Yellow wings.", "Icy tails."]
    docs = [Document(f"{intro} {licence} {body}", "s", str(k)) for k, (intro, body) in enumerate(zip(intros, bodies))]
    kept, removed_bytes, info = substring_dedup(docs, min_tokens=50)
    assert kept[0].text == docs[0].text
    for doc, intro, body in zip(kept[1:], intros[1:], bodies[1:]):
        # the repeated span is ". clause0 ... clause39. ": the shared full stop and spaces go with it
        assert "clause" not in doc.text and doc.text.startswith(intro[:-1]) and doc.text.endswith(body)
    assert removed_bytes > 0 and info["documents_changed"] == 2


# --- classroom graders (tests/classroom.py): exact checks that use no other marked function ---------------

def test_minhash_signatures_are_the_minimum_of_each_permutation():
    """sig[d, j] = min over the shingles h of d of (a_j·h + b_j) mod p, here with Python's exact integers;
    block=8 makes documents straddle block edges, and one document has a single shingle."""
    rng = np.random.default_rng(7)
    sets = [rng.integers(0, 2**32, size=n, dtype=np.uint64) for n in (1, 5, 13, 2, 40)]
    sets[2][0] = 2**32 - 1
    a, b = permutation_parameters(16, seed=5)
    p = (1 << 61) - 1
    expected = [[min((int(a_j) * int(h) + int(b_j)) % p for h in s) for a_j, b_j in zip(a, b)] for s in sets]
    signatures = minhash_signatures(sets, 16, seed=5, block=8)
    assert signatures.dtype == np.uint64 and signatures.shape == (5, 16)
    assert signatures.tolist() == expected


def test_lsh_probability_by_inclusion_exclusion():
    """P(at least one of b bands agrees on all its r rows) summed term by term,
    Σ_k (−1)^(k+1) C(b, k) s^(r·k), must equal the closed form — for numbers and for arrays of s."""
    def by_inclusion_exclusion(s, bands, rows):
        return sum((-1) ** (k + 1) * math.comb(bands, k) * s ** (rows * k) for k in range(1, bands + 1))

    for bands, rows in [(1, 1), (4, 3), (16, 8), (20, 5)]:
        for s in (0.0, 0.3, 0.8, 1.0):
            assert float(lsh_probability(s, bands, rows)) == pytest.approx(by_inclusion_exclusion(s, bands, rows),
                                                                          abs=1e-9)
    grid = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(lsh_probability(grid, 8, 4), [by_inclusion_exclusion(s, 8, 4) for s in grid],
                               atol=1e-12)


def test_sorted_band_candidates_by_brute_force():
    """Equal keys → every pair of the bucket (i < j, sorted by i then j); a bucket above large_bucket → the
    star from its first member. The expected pairs come from a double loop over the documents."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 40, size=120).astype(np.uint64)  # buckets of about 3
    keys[rng.choice(120, size=15, replace=False)] = 999  # one bucket of 15 > large_bucket=10
    found = [tuple(p) for p in sorted_band_candidates(keys, large_bucket=10).tolist()]
    star = sorted(np.flatnonzero(keys == 999).tolist())
    expected = [(i, j) for i in range(120) for j in range(i + 1, 120) if keys[i] == keys[j] and keys[i] != 999]
    expected += [(star[0], j) for j in star[1:]]
    assert sorted(found) == sorted(expected) and len(found) == len(set(found))
    assert all(i < j for i, j in found)
    assert sorted_band_candidates(np.zeros(0, dtype=np.uint64)).shape == (0, 2)
