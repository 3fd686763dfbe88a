"""Near-duplicate and repeated-substring removal (seed Part 1, section 1.2 "Deduplication methods").

MinHash (Broder 1997). Represent a document by its set S of word n-gram "shingles". For a random
hash function π, the probability that the minimum of π over two sets comes from the same shingle
is exactly their Jaccard similarity:

    P[min π(S_1) = min π(S_2)] = |S_1 ∩ S_2| / |S_1 ∪ S_2| = J(S_1, S_2).

With `num_perm` independent functions π_j(h) = (a_j·h + b_j) mod p, p = 2^61 − 1 (a Mersenne
prime), the fraction of equal signature entries estimates J with standard error √(J(1−J)/num_perm)
≤ 1/(2√num_perm). numpy has no 128-bit integers and a·h overflows uint64 when both are large:
shingle hashes h are kept below 2^32 and the 61-bit a is split into a 30-bit and a 31-bit half,
so each partial product fits and 2^61 ≡ 1 (mod p) turns the reductions into shifts and masks.

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


# Word hashes without a Python object per word. The plain way — words_of(text), then one hashlib
# call per word — spends ~0.4 µs per word in the interpreter, about as long as all the MinHash
# arithmetic after it. Instead the text becomes an array of code points, a lookup table marks the
# characters that \w matches, and the polynomial hashes of all words come out of one prefix sum.

CHAR_MULTIPLIER = 0xC2B2AE3D27D4EB4F  # odd, so it has an inverse mod 2^64
_char_powers = {}  # M^k and M^−k mod 2^64 for k < the longest text so far (8 bytes each per character)


@functools.cache
def _word_characters():
    """Boolean table over all 0x110000 code points: True where WORD's \\w matches (asked of the
    regex itself, so the two can never disagree)."""
    table = np.zeros(0x110000, dtype=bool)
    every_character = "".join(map(chr, range(0x110000)))
    table[[m.start() for m in re.finditer(r"\w", every_character)]] = True
    return table


def _powers(n):
    """(M^k, M^−k) mod 2^64 for k ≤ n: cumulative products, which wrap around like all uint64 maths."""
    if len(_char_powers.get(1, ())) <= n:
        size = max(n + 1, 2 * len(_char_powers.get(1, ())))
        for sign in (1, -1):
            factors = np.full(size, pow(CHAR_MULTIPLIER, sign, 1 << 64), dtype=np.uint64)
            factors[0] = 1
            _char_powers[sign] = np.cumprod(factors)
    return _char_powers[1][:n + 1], _char_powers[-1][:n + 1]


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _substring_hashes(code_points, starts, stops):
    """fmix64(Σ_k c_{s+k}·M^k mod 2^64) for each substring code_points[s:e] (a word).

    With prefix sums P_i = Σ_{k<i} c_k·M^k, a substring's sum is (P_e − P_s)·M^−s: the difference
    keeps its terms and M^−s moves them back to position 0, so a word gets the same hash wherever
    it stands. uint64 arithmetic wraps around, which is the mod 2^64, and an odd M has an inverse.
    fmix64 then makes every bit of the result depend on every character.
    """
    powers, inverse_powers = _powers(len(code_points))
    prefix = np.zeros(len(code_points) + 1, dtype=np.uint64)
    np.cumsum(code_points * powers[:-1], out=prefix[1:])
    return _fmix64((prefix[stops] - prefix[starts]) * inverse_powers[starts])


def word_hashes(words):
    """64-bit hash of each word: a uint64 array, the same in every process (unlike Python's salted
    hash())."""
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    stops = np.cumsum(lengths)
    return _substring_hashes(_code_points("".join(words)), stops - lengths, stops)


def text_word_hashes(text):
    """word_hashes(words_of(text)) without making the words: the runs of \\w characters are found
    with array operations on the lower-cased text's code points."""
    code_points = _code_points(text.lower())
    is_word = np.zeros(len(code_points) + 2, dtype=np.int8)  # padded with a non-word at each end
    np.take(_word_characters(), code_points, out=is_word[1:-1].view(bool))
    edges = is_word[1:] - is_word[:-1]  # +1 at a word's first character, −1 just after its last
    return _substring_hashes(code_points, np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))


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
    """Sorted distinct 32-bit hashes of the word n-grams of `text`: the document's shingle set.

    A text shorter than n words is one shingle (all its words); a text without words is hashed
    whole. Repeats would not change a minimum, but dropping them (one sort) saves ~12% of the
    permutation work on source code, whose lines repeat.
    """
    hashes = text_word_hashes(text)
    if not len(hashes):
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return np.array([int.from_bytes(digest, "little")], dtype=np.uint64)
    shingles = np.sort(_fmix64(ngram_hashes(hashes, min(n, len(hashes)))) >> np.uint64(32))
    distinct = np.ones(len(shingles), dtype=bool)
    np.not_equal(shingles[1:], shingles[:-1], out=distinct[1:])
    return shingles[distinct]


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


LOW_BITS = 31  # a = a_hi·2^31 + a_lo with a_lo < 2^31 and a_hi < 2^30
LOW_MASK, HIGH_MASK = np.uint64((1 << LOW_BITS) - 1), np.uint64((1 << (61 - LOW_BITS)) - 1)
SHIFT_LOW, SHIFT_HIGH, SHIFT_61 = np.uint64(LOW_BITS), np.uint64(61 - LOW_BITS), np.uint64(61)


def mul_mod_mersenne61(a, h):
    """a·h mod p for a < p (61 bits) and h < 2^32, without ever exceeding 64 bits.

    Split a = a_hi·2^31 + a_lo. Then a_lo·h < 2^63 and a_hi·h < 2^62 both fit; to multiply the
    latter by 2^31, split it as q·2^30 + r: (q·2^30 + r)·2^31 = q·2^61 + r·2^31 ≡ q + r·2^31.
    The sum a_lo·h + q + r·2^31 < 2^63 + 2^32 + 2^61 still fits, and one reduction ends it.
    """
    low = (a & LOW_MASK) * h
    high = (a >> SHIFT_LOW) * h
    high = (high >> SHIFT_HIGH) + ((high & HIGH_MASK) << SHIFT_LOW)
    return mod_mersenne61(low + high)


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


class Permutations:
    """π_j(h_i) = (a_j·h_i + b_j) mod p for blocks of up to `width` shingles: calling it on h gives a
    (num_perm, len(h)) array — one row per permutation — that the next call overwrites.

    The maths of mul_mod_mersenne61 with b added, arranged for numpy's speed:
      * rows are permutations and columns shingles, and a_lo, a_hi and b are stored repeated
        along their rows, so every call below is an elementwise loop over contiguous arrays
        (numpy runs a[:, None] * h, which broadcasts a column, 2–3× slower);
      * intermediate values are reduced only as far as needed to stay below 2^64 (the bounds
        are in the comments): 14 passes over the block, in place in buffers allocated once,
        then one more for the minimum — 0.2–0.35 ns per entry each, ≈ 4 ns per entry for a
        whole 128 × 256 block in cache, numpy's call overheads included (one core, AVX-512);
      * at width 256 each array is 256 KiB: the three tiles and three buffers fit in L2;
      * the last line uses unsigned wrap-around: when y < p, y − p wraps to a huge number, so
        min(y, y − p) is y mod p without a branch.
    """

    def __init__(self, a, b, width):
        def tile(v):  # row j: v_j repeated `width` times
            return np.repeat(np.asarray(v, dtype=np.uint64), width).reshape(len(v), width)

        self.a_low, self.a_high, self.b = tile(a & LOW_MASK), tile(a >> SHIFT_LOW), tile(b)
        self.y, self.high, self.t = (np.empty((len(a), width), dtype=np.uint64) for _ in range(3))

    def __call__(self, h):
        n = len(h)
        y, high, t = self.y[:, :n], self.high[:, :n], self.t[:, :n]
        np.copyto(high, np.asarray(h, dtype=np.uint64))  # every row a copy of h
        np.multiply(high, self.a_low[:, :n], out=y)  # a_lo·h < 2^63
        high *= self.a_high[:, :n]  # a_hi·h < 2^62
        np.right_shift(high, SHIFT_HIGH, out=t)  # q < 2^32
        high &= HIGH_MASK
        high <<= SHIFT_LOW  # r·2^31 < 2^61
        y += high
        y += t
        y += self.b[:, :n]  # ≡ a·h + b, < 2^63 + 2^61 + 2^32 + 2^61 < 2^64
        np.right_shift(y, SHIFT_61, out=t)
        y &= MERSENNE_61
        y += t  # ≤ p + 6
        np.subtract(y, MERSENNE_61, out=t)
        np.minimum(y, t, out=y)
        return y


def permute(h, a, b):
    """π_j(h_i) as a fresh (num_perm, len(h)) array (Permutations for a single block)."""
    return Permutations(a, b, max(len(h), 1))(h).copy()


# classroom: begin minhash_signatures
def minhash_signatures(shingle_sets, num_perm=128, seed=0, block=256):
    """Signature matrix (documents × num_perm, uint64): sig[d, j] = min over shingles h of d of π_j(h).

    All documents are processed together: their shingles are concatenated and cut into blocks
    of `block` shingles regardless of document boundaries. Permutations gives each block as a
    (num_perm × block) array; the per-document minimum is one `np.minimum.reduceat` along its
    rows at the document boundaries inside the block, merged into the signature columns of the
    documents the block touches. Every shingle must be < 2^32 (see mul_mod_mersenne61) and
    every set non-empty.
    """
    a, b = permutation_parameters(num_perm, seed)
    sizes = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    if sizes.size and sizes.min() == 0:
        raise ValueError("every document needs at least one shingle")
    flat = np.concatenate([np.asarray(s, dtype=np.uint64) for s in shingle_sets]) if len(sizes) else np.zeros(0)
    if flat.size and flat.max() >= (1 << 32):
        raise ValueError("shingle hashes must be below 2^32 (mul_mod_mersenne61 relies on it)")
    doc_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    by_permutation = np.full((num_perm, len(sizes)), MERSENNE_61, dtype=np.uint64)  # transposed signatures
    permutations = Permutations(a, b, block)
    for start in range(0, len(flat), block):
        stop = min(start + block, len(flat))
        first = np.searchsorted(doc_starts, start, side="right") - 1  # document holding position start
        last = np.searchsorted(doc_starts, stop - 1, side="right") - 1
        segment_starts = np.maximum(doc_starts[first:last + 1] - start, 0)
        block_minima = np.minimum.reduceat(permutations(flat[start:stop]), segment_starts, axis=1)
        np.minimum(by_permutation[:, first:last + 1], block_minima, out=by_permutation[:, first:last + 1])
    return np.ascontiguousarray(by_permutation.T)
# classroom: end minhash_signatures


def estimated_jaccard(signatures, i, j):
    """Fraction of equal signature entries: an unbiased estimate of J(i, j)."""
    return float(np.mean(signatures[i] == signatures[j]))


# -----------------------------------------------------------------------------
# LSH
# -----------------------------------------------------------------------------

# classroom: begin lsh_probability
def lsh_probability(s, bands, rows):
    """Probability that two documents of Jaccard similarity s share at least one band:
    1 − (1 − s^r)^b."""
    s = np.asarray(s, dtype=np.float64)
    return 1.0 - (1.0 - s ** rows) ** bands
# classroom: end lsh_probability


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


# The same candidates without one in-memory dict of buckets (data/stream.py, for corpora whose
# signatures live on disk): each band's rows become one 64-bit key per document, and sorting a
# band's keys puts the members of every bucket next to each other.

BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def band_keys(signatures, bands, rows):
    """(documents × bands) uint64: key[d, k] = fmix64(Σ_i sig[d, k·r + i]·M^(r−1−i) mod 2^64).

    Two documents that agree on every row of band k get the same key; two that differ collide
    with probability ≈ 2^−64, and a collision only adds a candidate that verification rejects."""
    signatures = np.asarray(signatures, dtype=np.uint64)
    keys = np.zeros((len(signatures), bands), dtype=np.uint64)
    for band in range(bands):
        for row in range(band * rows, (band + 1) * rows):
            keys[:, band] = keys[:, band] * BAND_MULTIPLIER + signatures[:, row]
    return _fmix64(keys)


# classroom: begin sorted_band_candidates
def sorted_band_candidates(keys, large_bucket=LARGE_BUCKET):
    """Pairs (i, j), i < j, of documents with equal keys in one band, as an (m, 2) int64 array.

    A stable argsort of the keys lists each bucket's members contiguously and in increasing
    order; a bucket of size L gives its L(L−1)/2 pairs, or above `large_bucket` members a star
    from its first member (union-find needs only connectivity), as lsh_candidate_pairs does."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(keys) else np.zeros(0, int)
    sizes = np.diff(np.concatenate([starts, [len(keys)]]))
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[start:start + size].astype(np.int64)
        if size > large_bucket:
            pairs.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
        else:
            i, j = np.triu_indices(size, 1)
            pairs.append(np.stack([members[i], members[j]], axis=1))
    return np.concatenate(pairs)
# classroom: end sorted_band_candidates


def unique_pairs(pair_arrays, n):
    """The distinct pairs of several (m, 2) arrays, sorted as sorted() sorts tuples (i, then j)."""
    codes = np.unique(np.concatenate([p[:, 0] * n + p[:, 1] for p in pair_arrays] + [np.zeros(0, np.int64)]))
    return np.stack([codes // n, codes % n], axis=1) if len(codes) else np.zeros((0, 2), dtype=np.int64)


def clusters_of_pairs(pairs):
    """Union-find over the pairs: the clusters (sorted lists of ≥ 2 indices), smallest member first,
    in the order of their smallest members. Only the documents in some pair get a union-find node,
    so the memory follows the number of pairs, not of documents."""
    nodes = np.unique(pairs)
    local = np.searchsorted(nodes, pairs)  # order-preserving, so a root is still the smallest member
    union_find = UnionFind(len(nodes))
    for i, j in local.tolist():
        union_find.union(i, j)
    members = {}
    for i in range(len(nodes)):
        members.setdefault(union_find.find(i), []).append(int(nodes[i]))
    return [m for m in members.values() if len(m) > 1]


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


# The same decision in bounded memory (data/stream.py): a position is in a later copy of a span of
# ≥ w tokens exactly when the w tokens starting there occurred before, at an earlier position. (In the
# suffix array those positions are one run with lcp ≥ w; all but its earliest are marked.) So hash every
# window of w consecutive tokens, keep the first occurrence of each hash, and mark [p, p + w) for the
# others — a sort of 8-byte keys, which can be cut by hash range, instead of one suffix array.

def span_window_hashes(token_hashes, w):
    """64-bit hash of each run of w consecutive tokens of one document (len − w + 1 of them, or none):
    equal windows, wherever they stand, get equal hashes; fmix64 spreads them over all 64 bits, so a
    hash range is a fair share of the windows."""
    return _fmix64(ngram_hashes(np.asarray(token_hashes, dtype=np.uint64), w))


def later_occurrences(keys):
    """True at each key equal to one earlier in the array: a stable sort puts equal keys next to each
    other in their original order, and all but the first of each group are later occurrences."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    later = np.zeros(len(keys), dtype=bool)
    later[order[1:][sorted_keys[1:] == sorted_keys[:-1]]] = True
    return later


def tokens_in_marked_windows(marked, n_tokens, w):
    """Token mask (n_tokens,): True inside [p, p + w) for every marked window start p (a +1/−1 fill)."""
    edges = np.zeros(n_tokens + 1, dtype=np.int64)
    starts = np.flatnonzero(marked)
    np.add.at(edges, starts, 1)
    np.add.at(edges, np.minimum(starts + w, n_tokens), -1)
    return np.cumsum(edges[:n_tokens]) > 0


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
