"""Perplexity filtering with a byte n-gram language model (seed Part 1, section 1.2; CCNet,
Wenzek et al. 2020).

A small language model trained on reference text scores every document; documents it finds
very *surprising* (high perplexity: garbage, mis-decoded bytes, tables of numbers) or very
*predictable* (low perplexity: repeated boilerplate) are dropped. CCNet used a 5-gram KenLM on
Wikipedia; we use an interpolated Witten-Bell 5-gram over UTF-8 bytes, written with numpy.

Witten-Bell smoothing (Witten & Bell 1991; Chen & Goodman 1998). For a byte w after context h
(the previous n−1 bytes) and h' = h without its oldest byte:

    P(w | h) = ( c(h w) + T(h) · P(w | h') ) / ( c(h) + T(h) )

c(h w) counts the n-gram, c(h) = Σ_w c(h w) the context, and T(h) the number of *distinct* bytes
seen after h: a context followed by many different bytes is one where unseen bytes are likely,
so it lends more weight to the shorter context. The recursion ends at the uniform 1/256, so no
byte ever has probability zero; an unseen context (c(h) = 0) passes P(w | h') through unchanged.

Perplexity of a document of N bytes: PPL = exp(−(1/N) Σ_i ln P(x_i | x_{i−n+1..i−1})).
"""

import numpy as np

from data.sources import utf8

BOUNDARY = 0  # NUL pads each document's start; normalise_text removes NUL from the text itself
UNIFORM = 1.0 / 256
REFERENCE_BYTES = 1_000_000  # text each source's two cross-fitted models are trained on (half each)
MAX_BYTES_PER_TEXT = 10_000  # a document is scored (and used as reference) by its beginning
MIN_DOCUMENTS = 20  # fewer documents in a source: no percentile band


def _pack(texts, order, max_bytes):
    """Concatenate texts as bytes, each preceded by order−1 boundary bytes.
    Returns (data uint8, mask of real text positions, per-text start offsets into the masked array)."""
    pad = bytes([BOUNDARY]) * (order - 1)
    pieces, lengths = [], []
    for text in texts:
        raw = utf8(text)[:max_bytes] if max_bytes else utf8(text)
        pieces.append(pad + raw)
        lengths.append(len(raw))
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    mask = np.ones(len(data), dtype=bool)
    position = 0
    for length in lengths:
        mask[position:position + order - 1] = False
        position += order - 1 + length
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return data, mask, starts, np.array(lengths)


def ngram_keys(data, k):
    """Integer key of the k-gram ending at each position: the last byte in the low 8 bits, older
    bytes above it. key >> 8 is then the key of the (k−1)-byte context. k ≤ 7 fits in int64."""
    keys = np.zeros(len(data), dtype=np.int64)
    for j in range(k):
        shifted = np.zeros(len(data), dtype=np.int64)
        shifted[j:] = data[:len(data) - j]
        keys |= shifted << (8 * j)
    return keys


def _lookup(sorted_keys, values, queries, *more_values):
    """values[index of query in sorted_keys], or 0 where the query is absent (and the same for each
    array of more_values, from the one search)."""
    index = np.searchsorted(sorted_keys, queries)
    index = np.minimum(index, len(sorted_keys) - 1)
    found = sorted_keys[index] == queries
    if not more_values:
        return np.where(found, values[index], 0)
    return [np.where(found, v[index], 0) for v in (values, *more_values)]


class WittenBellLM:
    """Interpolated Witten-Bell byte n-gram model: fit(texts), then log_probs / perplexities."""

    def __init__(self, order=5):
        if not 1 <= order <= 7:
            raise ValueError("order must be between 1 and 7 (keys are packed into 64 bits)")
        self.order = order
        self.tables = []

    def fit(self, texts, max_bytes_per_text=None):
        """Count, for k = 1..order, every k-gram c(h w), and per context c(h) and T(h)."""
        data, mask, _, _ = _pack(texts, self.order, max_bytes_per_text)
        self.tables = []
        for k in range(1, self.order + 1):
            ngrams, counts = np.unique(ngram_keys(data, k)[mask], return_counts=True)
            contexts = ngrams >> 8  # sorted too, since the context is the high part of the key
            context_keys, first, distinct_followers = np.unique(contexts, return_index=True, return_counts=True)
            context_counts = np.add.reduceat(counts, first) if len(first) else np.zeros(0, dtype=np.int64)
            self.tables.append((ngrams, counts, context_keys, context_counts, distinct_followers))
        return self

    def _log_probs(self, data, mask):
        probs = np.full(int(mask.sum()), UNIFORM)
        all_keys = np.zeros(len(data), dtype=np.int64)  # ngram_keys(data, k), grown by one older byte per order
        for k, (ngrams, counts, context_keys, context_counts, distinct) in enumerate(self.tables, 1):
            all_keys[k - 1:] |= data[:len(data) - (k - 1)].astype(np.int64) << (8 * (k - 1))
            if len(ngrams) == 0:
                continue
            keys = all_keys[mask]
            c_hw = _lookup(ngrams, counts, keys)
            c_h, t_h = _lookup(context_keys, context_counts, keys >> 8, distinct)
            seen = c_h > 0
            probs = np.where(seen, (c_hw + t_h * probs) / np.maximum(c_h + t_h, 1), probs)
        return np.log(probs)

    def next_byte_distribution(self, context: bytes):
        """P(w | context) for all 256 bytes w — sums to 1 (tests check it)."""
        pad = bytes([BOUNDARY]) * (self.order - 1)
        data = np.frombuffer(b"".join(pad + context + bytes([w]) for w in range(256)), dtype=np.uint8)
        mask = np.zeros(len(data), dtype=bool)
        mask[len(pad) + len(context)::len(pad) + len(context) + 1] = True
        return np.exp(self._log_probs(data, mask))

    def log_probs(self, text):
        """ln P(x_i | context) for every byte of one text."""
        data, mask, _, _ = _pack([text], self.order, None)
        return self._log_probs(data, mask)

    def perplexities(self, texts, max_bytes_per_text=None):
        """Per-byte perplexity of each text (of its first max_bytes_per_text bytes if given)."""
        data, mask, starts, lengths = _pack(texts, self.order, max_bytes_per_text)
        log_p = self._log_probs(data, mask)
        result = np.full(len(lengths), np.inf)
        nonempty = lengths > 0
        if nonempty.any():
            sums = np.add.reduceat(log_p, starts[nonempty]) if len(log_p) else np.zeros(0)
            result[nonempty] = np.exp(-sums / lengths[nonempty])
        return result


def cross_fitted_perplexities(texts, order=5, reference_bytes=REFERENCE_BYTES, max_bytes_per_text=MAX_BYTES_PER_TEXT,
                              seed=0):
    """Perplexity of every text under a model that did *not* see it ("cross-fitting").

    A model scores its own training text too well, so the texts are split at random into two
    halves A and B; a model fitted on (up to reference_bytes of) A scores B and vice versa.
    """
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(texts)) % 2
    ppl = np.empty(len(texts))
    for fold in (0, 1):
        reference, total = [], 0
        for i in np.flatnonzero(half == fold):
            if total >= reference_bytes / 2:
                break
            reference.append(texts[i][:max_bytes_per_text])
            total += len(reference[-1])
        model = WittenBellLM(order).fit(reference)
        others = np.flatnonzero(half != fold)
        ppl[others] = model.perplexities([texts[i] for i in others], max_bytes_per_text)
    return ppl


def perplexity_band_filter(documents, band=(2.0, 95.0), order=5, reference_bytes=REFERENCE_BYTES,
                           max_bytes_per_text=MAX_BYTES_PER_TEXT, min_documents=MIN_DOCUMENTS, seed=0):
    """Drop documents whose perplexity lies outside the [band[0], band[1]] percentiles of their source.

    Each source gets its own model (code and prose are different "languages", as CCNet trains
    one model per language). A source with fewer than `min_documents` is left alone: percentiles
    of a handful of values mean nothing; so is a "curated" one (generated tasks).
    Returns (kept, removed, info per source).
    """
    by_source = {}
    for doc in documents:
        by_source.setdefault(doc.source, []).append(doc)
    kept, removed, info = [], [], {}
    for source, docs in by_source.items():
        if docs[0].kind == "curated":
            kept.extend(docs)
            info[source] = {"skipped": "curated source"}
            continue
        if len(docs) < min_documents:
            kept.extend(docs)
            info[source] = {"skipped": f"fewer than {min_documents} documents"}
            continue
        ppl = cross_fitted_perplexities([d.text for d in docs], order, reference_bytes, max_bytes_per_text, seed)
        log_ppl = np.log10(ppl)
        low, high = np.percentile(log_ppl, band)
        too_low, too_high = log_ppl < low, log_ppl > high
        for doc, lo, hi in zip(docs, too_low, too_high):
            (removed if lo or hi else kept).append(doc)
        info[source] = {
            "log10_perplexity": log_ppl.round(4).tolist(), "cut_low": float(low), "cut_high": float(high),
            "removed_low": int(too_low.sum()), "removed_high": int(too_high.sum()),
            "lowest": [docs[i].origin for i in np.argsort(log_ppl)[:3]],
            "highest": [docs[i].origin for i in np.argsort(log_ppl)[::-1][:3]],
        }
    return kept, removed, info
