"""Near-duplicate and repeated-substring removal (seed Part 1, section 1.2 "Deduplication methods").

MinHash (Broder 1997). Represent a document by its set S of word n-gram "shingles". For a random
hash function π, the probability that the minimum of π over two sets comes from the same shingle
is exactly their Jaccard similarity:

    P[min π(S_1) = min π(S_2)] = |S_1 ∩ S_2| / |S_1 ∪ S_2| = J(S_1, S_2).

With `num_perm` independent functions π_j(h) = (a_j·h + b_j) mod p, p = 2^61 − 1 (a Mersenne
prime), the fraction of equal signature entries estimates J with standard error √(J(1−J)/num_perm)
≤ 1/(2√num_perm). numpy has no 128-bit integers and a·h overflows uint64 when both are large:
shingle hashes h are kept below 2^32 and the 61-bit a is split into 32-bit halves, each partial
product reduced mod p before the next step (2^61 ≡ 1 mod p turns each reduction into shifts).

LSH (banding). Cut the signature into b bands of r rows; documents that agree on all rows of at
least one band become candidates. For similarity s:

    P[candidate] = 1 − (1 − s^r)^b        an S-curve whose steep part sits near (1/b)^(1/r).

`optimal_bands_rows` picks (b, r) for a threshold t by minimising a weighted sum of the
false-positive area ∫_0^t P(s) ds and the false-negative area ∫_t^1 (1 − P(s)) ds. Candidates are checked against
the threshold with their signature estimate, joined into clusters by union-find, and one
document per cluster (the first) is kept.

Suffix arrays (Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"):
sort all suffixes of the concatenated corpus; any span of ≥ k tokens that occurs twice is the
common prefix of two suffixes that are *adjacent* in sorted order, so one pass over the
longest-common-prefix (LCP) array finds every repeat. Later copies are cut out of their documents.
"""

import dataclasses
import functools
import hashlib
import itertools
import re

import numpy as np

MERSENNE_61 = np.uint64((1 << 61) - 1)
WORD = re.compile(r"\w+")
# LSH only proposes candidates and every candidate is verified against the threshold, so a false
# positive costs one signature comparison while a false negative is a duplicate lost for good:
# (b, r) are chosen with false negatives weighted 9:1 (at t = 0.8, 128 perms: b=14, r=9, which
# catches 99.9% of pairs at s = 0.9, where the unweighted optimum b=9, r=13 catches 93%).
LSH_WEIGHTS = (0.1, 0.9)  # (false positive weight, false negative weight)
LARGE_BUCKET = 200  # a bucket with more documents than this contributes a star, not all pairs


# -----------------------------------------------------------------------------
# Shingles
# -----------------------------------------------------------------------------

def words_of(text):
    """Lower-cased runs of letters, digits and underscores: punctuation and spacing do not count."""
    return WORD.findall(text.lower())


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(word):
    # blake2b, not hash(): Python salts str hashes per process, and shards must be reproducible.
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def word_hashes(words):
    """64-bit hash of each word (uint64 array)."""
    return np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))


def ngram_hashes(hashes, n):
    """64-bit hash of every run of n consecutive words: H_i = Σ_j h_{i+j}·M^(n−1−j) mod 2^64.

    Vectorised Horner's rule; numpy's uint64 arithmetic wraps around, which is the mod 2^64.
    """
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    multiplier = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplication mod 2^64 is invertible
    out = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        out = out * multiplier + hashes[j:j + count]
    return out


def _fmix64(x):
    """MurmurHash3's finaliser: after it every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    return x ^ (x >> np.uint64(33))


def shingle_hashes(text, n=5):
    """32-bit hashes of the word n-grams of `text` (a multiset; duplicates do not change a minimum).

    A text shorter than n words is one shingle (all its words); a text without words is hashed whole.
    """
    words = words_of(text)
    if not words:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return np.array([int.from_bytes(digest, "little")], dtype=np.uint64)
    hashes = ngram_hashes(word_hashes(words), min(n, len(words)))
    return _fmix64(hashes) >> np.uint64(32)


def jaccard(a, b):
    """Exact Jaccard similarity |A ∩ B| / |A ∪ B| of two collections (as sets); 1.0 for two empty ones."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = len(a | b)
    return len(a & b) / union if union else 1.0


# -----------------------------------------------------------------------------
# MinHash signatures
# -----------------------------------------------------------------------------

def mod_mersenne61(x):
    """x mod p for p = 2^61 − 1 and any uint64 x: write x = hi·2^61 + lo; since 2^61 ≡ 1 (mod p),
    x ≡ hi + lo, which is < 2p, so one conditional subtraction finishes the job."""
    y = (x & MERSENNE_61) + (x >> np.uint64(61))
    return np.where(y >= MERSENNE_61, y - MERSENNE_61, y)


def mul_mod_mersenne61(a, h):
    """a·h mod p for a < p (61 bits) and h < 2^32, without ever exceeding 64 bits.

    Split a = a_hi·2^32 + a_lo. Then a_lo·h < 2^64 fits, and a_hi·h < 2^61; to multiply the
    latter by 2^32, split it as q·2^29 + r: (q·2^29 + r)·2^32 = q·2^61 + r·2^32 ≡ q + r·2^32.
    """
    low = mod_mersenne61((a & np.uint64(0xFFFFFFFF)) * h)
    high = (a >> np.uint64(32)) * h
    high = (high >> np.uint64(29)) + ((high & np.uint64((1 << 29) - 1)) << np.uint64(32))
    return mod_mersenne61(low + mod_mersenne61(high))


def permutation_parameters(num_perm, seed=0):
    """a_j ∈ [1, p) and b_j ∈ [0, p) for π_j(h) = (a_j·h + b_j) mod p.

    Why not the simpler a_j < 2^32, where a·h fits in 64 bits directly? Then a·h < p for every
    a < 2^29, so π_j(h) = a·h + b is *increasing* in h and all those "permutations" pick the same
    minimum (the smallest h): the estimates become correlated, and tests/test_data_dedup.py sees
    the error grow past 3σ. A full-width a needs the split multiplication above.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    return a, b


def permute(h, a, b):
    """π_j(h_i) = (a_j·h_i + b_j) mod p for a block of shingles: a (len(h), num_perm) uint64 array.

    The maths of mul_mod_mersenne61, made fast: reductions are done only as far as needed to
    stay below 2^64 (each bound in the comments) and in place, on a block small enough to stay
    in the CPU cache. The last line uses unsigned wrap-around: when y < p, y − p wraps to a huge
    number, so min(y, y − p) is y mod p without a branch.
    """
    h = h[:, None]
    y = h * (a & np.uint64(0xFFFFFFFF))  # a_lo·h < 2^64
    y_high = h * (a >> np.uint64(32))  # a_hi·h < 2^61
    t = y >> np.uint64(61)
    y &= MERSENNE_61
    y += t  # ≡ a_lo·h, < 2^61 + 8
    t = y_high >> np.uint64(29)
    y_high &= np.uint64((1 << 29) - 1)
    y_high <<= np.uint64(32)
    y_high += t  # ≡ a_hi·h·2^32, < 2^61 + 2^32
    y += y_high
    y += b  # ≡ a·h + b, < 2^63
    t = y >> np.uint64(61)
    y &= MERSENNE_61
    y += t  # < 2^61 + 4
    np.minimum(y, y - MERSENNE_61, out=y)
    return y


def minhash_signatures(shingle_sets, num_perm=128, seed=0, block=512):
    """Signature matrix (documents × num_perm, uint64): sig[d, j] = min over shingles h of d of π_j(h).

    All documents are processed together: their shingles are concatenated and cut into blocks
    of `block` shingles regardless of document boundaries; in each block the per-document
    minimum is one `np.minimum.reduceat` over the boundaries that fall inside it, merged into
    the signatures of the documents the block touches. Every shingle must be < 2^32 (see
    mul_mod_mersenne61) and every set non-empty.
    """
    a, b = permutation_parameters(num_perm, seed)
    sizes = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    if sizes.size and sizes.min() == 0:
        raise ValueError("every document needs at least one shingle")
    flat = np.concatenate([np.asarray(s, dtype=np.uint64) for s in shingle_sets]) if len(sizes) else np.zeros(0)
    if flat.size and flat.max() >= (1 << 32):
        raise ValueError("shingle hashes must be below 2^32 (mul_mod_mersenne61 relies on it)")
    doc_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    signatures = np.full((len(sizes), num_perm), MERSENNE_61, dtype=np.uint64)
    for start in range(0, len(flat), block):
        stop = min(start + block, len(flat))
        first = np.searchsorted(doc_starts, start, side="right") - 1  # document holding position start
        last = np.searchsorted(doc_starts, stop - 1, side="right") - 1
        segment_starts = np.maximum(doc_starts[first:last + 1] - start, 0)
        block_minima = np.minimum.reduceat(permute(flat[start:stop], a, b), segment_starts, axis=0)
        np.minimum(signatures[first:last + 1], block_minima, out=signatures[first:last + 1])
    return signatures


def estimated_jaccard(signatures, i, j):
    """Fraction of equal signature entries: an unbiased estimate of J(i, j)."""
    return float(np.mean(signatures[i] == signatures[j]))


# -----------------------------------------------------------------------------
# LSH
# -----------------------------------------------------------------------------

def lsh_probability(s, bands, rows):
    """Probability that two documents of Jaccard similarity s share at least one band:
    1 − (1 − s^r)^b."""
    s = np.asarray(s, dtype=np.float64)
    return 1.0 - (1.0 - s ** rows) ** bands


def _area(y, x):
    """∫ y dx by the trapezoid rule (np.trapezoid needs numpy ≥ 2)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def optimal_bands_rows(threshold, num_perm, false_positive_weight=0.5, false_negative_weight=0.5):
    """(bands, rows) with bands·rows ≤ num_perm minimising
    w_fp·∫_0^t P(s) ds + w_fn·∫_t^1 (1 − P(s)) ds  for P(s) = 1 − (1 − s^r)^b."""
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    best, best_cost = None, np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = _area(lsh_probability(below, bands, rows), below)
            false_negative = _area(1.0 - lsh_probability(above, bands, rows), above)
            cost = false_positive_weight * false_positive + false_negative_weight * false_negative
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def lsh_candidate_pairs(signatures, bands, rows):
    """Pairs (i, j), i < j, that agree on every row of at least one band."""
    pairs = set()
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
        _, bucket_of = np.unique(block, axis=0, return_inverse=True)
        order = np.argsort(bucket_of.ravel(), kind="stable")
        buckets = np.split(order, np.flatnonzero(np.diff(bucket_of.ravel()[order])) + 1)
        for members in buckets:
            if len(members) < 2:
                continue
            members = sorted(members.tolist())
            if len(members) > LARGE_BUCKET:  # union-find only needs connectivity: a star suffices
                pairs.update((members[0], m) for m in members[1:])
            else:
                pairs.update(itertools.combinations(members, 2))
    return pairs


class UnionFind:
    """Disjoint sets with path halving: find(x) returns the root of x's set."""

    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x, y):
        root_x, root_y = self.find(x), self.find(y)
        if root_x != root_y:  # the smaller index becomes the root: the first document is kept
            self.parent[max(root_x, root_y)] = min(root_x, root_y)


def near_duplicate_clusters(signatures, threshold=0.8, bands=None, rows=None, verify=True):
    """Clusters (sorted lists of ≥ 2 document indices) of near-duplicates, and the similarity
    estimates of all candidate pairs (for the report's histogram).

    Candidates come from LSH; with `verify` a pair joins only if its signature estimate is
    ≥ threshold (removing most LSH false positives); union-find makes clusters transitive.
    """
    if bands is None or rows is None:
        bands, rows = optimal_bands_rows(threshold, signatures.shape[1], *LSH_WEIGHTS)
    pairs = sorted(lsh_candidate_pairs(signatures, bands, rows))
    similarities = np.array([estimated_jaccard(signatures, i, j) for i, j in pairs])
    union_find = UnionFind(len(signatures))
    for (i, j), s in zip(pairs, similarities):
        if not verify or s >= threshold:
            union_find.union(i, j)
    clusters = {}
    for i in range(len(signatures)):
        clusters.setdefault(union_find.find(i), []).append(i)
    return [members for members in clusters.values() if len(members) > 1], similarities


def near_dedup(documents, threshold=0.8, num_perm=128, ngram=5, seed=0):
    """Keep one document per MinHash/LSH cluster. Returns (kept, removed, info for the report)."""
    if not documents:
        return [], [], {"removed": 0}
    shingles = [shingle_hashes(d.text, ngram) for d in documents]
    signatures = minhash_signatures(shingles, num_perm, seed)
    bands, rows = optimal_bands_rows(threshold, num_perm, *LSH_WEIGHTS)
    clusters, candidate_similarities = near_duplicate_clusters(signatures, threshold, bands, rows)
    drop = {i for members in clusters for i in members[1:]}
    kept = [d for i, d in enumerate(documents) if i not in drop]
    removed = [d for i, d in enumerate(documents) if i in drop]
    # Similarities of random pairs show where ordinary, unrelated documents sit.
    rng = np.random.default_rng(seed)
    n = len(documents)
    random_pairs = rng.integers(0, n, size=(min(2000, n * (n - 1) // 2), 2)) if n > 1 else np.zeros((0, 2), int)
    random_pairs = random_pairs[random_pairs[:, 0] != random_pairs[:, 1]]
    random_similarities = np.mean(signatures[random_pairs[:, 0]] == signatures[random_pairs[:, 1]], axis=1)
    clusters.sort(key=len, reverse=True)
    info = {
        "threshold": threshold, "num_perm": num_perm, "ngram": ngram, "bands": bands, "rows": rows,
        "candidate_pairs": len(candidate_similarities),
        "duplicate_pairs": int(np.sum(candidate_similarities >= threshold)),
        "clusters": len(clusters), "removed": len(removed),
        "largest_clusters": [[documents[i].origin for i in members[:5]] + ([f"... {len(members) - 5} more"]
                                                                          if len(members) > 5 else [])
                             for members in clusters[:5]],
        "candidate_similarities": candidate_similarities.round(4).tolist(),
        "random_pair_similarities": random_similarities.round(4).tolist(),
    }
    return kept, removed, info


# -----------------------------------------------------------------------------
# Exact substrings: suffix array + LCP
# -----------------------------------------------------------------------------

def suffix_array(tokens):
    """Start positions of all suffixes of `tokens` in sorted order, by prefix doubling
    (Manber & Myers 1993): after the round with step k, rank[i] orders suffixes by their first 2k
    tokens, computed by sorting the pairs (rank[i], rank[i+k]). O(n log² n) with numpy sorts;
    it stops as soon as all ranks differ, i.e. after ~log2(longest repeat) rounds."""
    tokens = np.asarray(tokens)
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(tokens, return_inverse=True)[1].ravel().astype(np.int64)
    order = np.argsort(rank, kind="stable")
    k = 1
    while rank.max() < n - 1 and k < n:
        second = np.full(n, -1, dtype=np.int64)  # -1: a suffix that ends sorts first
        second[:n - k] = rank[k:]
        order = np.lexsort((second, rank))
        first_sorted, second_sorted = rank[order], second[order]
        new_group = np.ones(n, dtype=np.int64)
        new_group[1:] = (first_sorted[1:] != first_sorted[:-1]) | (second_sorted[1:] != second_sorted[:-1])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.cumsum(new_group) - 1
        k *= 2
    return order


def lcp_array(tokens, sa):
    """lcp[i] = length of the common prefix of suffixes sa[i−1] and sa[i] (lcp[0] = 0), by
    Kasai et al. (2001): going through suffixes in text order, the LCP drops by at most one per
    step, so the total work is O(n)."""
    tokens = np.asarray(tokens).tolist()
    sa_list = sa.tolist()
    n = len(tokens)
    rank = [0] * n
    for i, start in enumerate(sa_list):
        rank[start] = i
    lcp = [0] * n
    h = 0
    for i in range(n):
        if rank[i] > 0:
            j = sa_list[rank[i] - 1]
            while i + h < n and j + h < n and tokens[i + h] == tokens[j + h]:
                h += 1
            lcp[rank[i]] = h
            if h:
                h -= 1
        else:
            h = 0
    return np.array(lcp, dtype=np.int64)


def repeated_span_mask(tokens, min_length=50):
    """Boolean mask of tokens inside a *later* copy of a span of ≥ min_length tokens.

    Suffixes sharing their first min_length tokens form runs in the suffix array where every
    lcp ≥ min_length; in each run the earliest position keeps its span and the other positions
    mark [p, p + min_length) for removal. Overlapping marks cover a whole repeated region.
    """
    n = len(tokens)
    mask = np.zeros(n, dtype=bool)
    if n < min_length * 2:
        return mask
    sa = suffix_array(tokens)
    lcp = lcp_array(tokens, sa)
    starts = np.zeros(n + 1, dtype=np.int64)  # +1/−1 markers for a cumulative-sum fill of spans
    run = [sa[0]]
    for i in range(1, n + 1):
        if i < n and lcp[i] >= min_length:
            run.append(sa[i])
            continue
        if len(run) > 1:
            for p in sorted(run)[1:]:
                starts[p] += 1
                starts[min(p + min_length, n)] -= 1
        if i < n:
            run = [sa[i]]
    return np.cumsum(starts[:n]) > 0


def substring_dedup(documents, min_tokens=50, pattern=None):
    """Cut later copies of every span of ≥ min_tokens tokens (Lee et al. 2022, seed 1.2).

    "Tokens" are the pre-tokeniser's chunks (the BPE split regex), so spans end on word
    boundaries and removing them keeps the rest of the text intact. Each document ends with its
    own separator id, so no repeat crosses a document boundary. Returns (documents with spans
    removed — empty ones dropped, number of removed bytes, info).
    """
    from data.sources import utf8
    from data.tokenizer import DEFAULT_PATTERN, pretokenize

    vocabulary, ids, chunks_of = {}, [], []
    for d, doc in enumerate(documents):
        chunks = pretokenize(doc.text, pattern or DEFAULT_PATTERN)
        chunks_of.append(chunks)
        ids.extend(vocabulary.setdefault(c, len(vocabulary)) for c in chunks)
        ids.append(-1 - d)  # unique separator
    tokens = np.array(ids, dtype=np.int64)
    mask = repeated_span_mask(tokens, min_tokens)
    kept, removed_bytes, changed, position = [], 0, [], 0
    for doc, chunks in zip(documents, chunks_of):
        doc_mask = mask[position:position + len(chunks)]
        position += len(chunks) + 1
        if doc_mask.any():
            text = "".join(c for c, m in zip(chunks, doc_mask) if not m)
            removed_bytes += len(utf8(doc.text)) - len(utf8(text))
            changed.append(doc.origin)
            doc = dataclasses.replace(doc, text=text)
        if doc.text.strip():
            kept.append(doc)
    info = {"min_tokens": min_tokens, "tokens": int(len(tokens) - len(documents)),
            "removed_tokens": int(mask.sum()), "removed_bytes": removed_bytes,
            "documents_changed": len(changed), "examples": changed[:5]}
    return kept, removed_bytes, info
