"""A fastText-style quality classifier (seed Part 1, section 1.2, "Quality classifiers": a classifier
trained on curated text against random web text; GPT-3's Wikipedia/WebText-vs-Common-Crawl filter,
Brown et al. 2020 App. A; FineWeb-Edu's educational-quality scorer; fastText, Joulin et al. 2017).

The model (fastText's, with two classes):

    features(x) = bucket ids of x's word unigrams and bigrams (and optionally character n-grams)
    h(x)        = (1/|features(x)|) Σ_{f ∈ features(x)} E[f]          an "embedding bag": E is [B, d]
    P(good | x) = σ(w · h(x) + b)

trained with the logistic loss −[y log p + (1−y) log(1−p)] by SGD. There is no vocabulary: the
*hashing trick* maps every n-gram straight to one of B rows of E with a fixed 64-bit hash mod B,
so unseen words need no "unknown" token, bigrams cost no dictionary, and two processes (or two
machines) map a word to the same row. Two n-grams that share a row share its vector; with
B = 2^18 rows and a few hundred thousand distinct n-grams, that costs little.

Positives are a reference set of good text; negatives are random documents of the pool being
filtered — the "curated vs random" recipe. For the offline default corpus the reference is the
Python Language Reference bundled with every CPython (pydoc_data.topics: edited, explanatory,
complete sentences — the closest thing to Wikipedia on this machine), and the negatives are the
other prose documents (docstrings and comments, the library's .txt/.rst files). Documents are cut
into paragraph chunks for training (the Language Reference has only 79 topics), split into train
and held-out *by document*, so the held-out precision, recall and AUC are honest.

The filter (classifier_filter) scores every prose document and keeps those above a threshold, or
the top fraction; code and curated documents pass.
"""

import math
import time

import numpy as np

from data.curate import ContaminationIndex, exact_hash, normalise_text
from data.dedup import _code_points, _fmix64, _substring_hashes, ngram_hashes, text_word_hashes
from data.errors import DataError

NUM_BUCKETS = 1 << 18
DIM = 16
WORD_NGRAMS = 2  # unigrams and bigrams, fastText's -wordNgrams 2
CHAR_NGRAMS = 0  # character n-grams of this length too (0 = none); fastText's -minn/-maxn, across words here
EPOCHS = 10
LR = 1.0  # per minibatch of summed gradients; 0.2 barely moves in 10 epochs, 3.0 oscillates at first
BATCH = 16
CHUNK_CHARS = 1000  # training examples: runs of paragraphs of about this many characters
HELDOUT_FRACTION = 0.2  # of the reference documents and of the negative documents
MAX_CHARS = 20_000  # a document is scored on its first 20,000 characters
SEED = 0


# -----------------------------------------------------------------------------
# Features: hashed n-grams
# -----------------------------------------------------------------------------

# classroom: begin hashed_ngram_features
def hashed_ngram_features(text, num_buckets=NUM_BUCKETS, word_ngrams=WORD_NGRAMS, char_ngrams=CHAR_NGRAMS):
    """The hashing trick: bucket id (0..B−1) of every word n-gram (n = 1..word_ngrams) and every
    character n-gram (n = char_ngrams, 0 for none) of `text`, as an int64 array.

    Words are data.dedup's lower-cased \\w runs with their deterministic 64-bit hashes h_i; the
    n-gram starting at word i hashes as H = Σ_j h_{i+j}·M^(n−1−j) mod 2^64 (data.dedup.ngram_hashes).
    Each order n is tagged by adding n·2^56 before MurmurHash3's finaliser (so a bigram cannot land
    on its own first word's row), and the bucket is fmix64(H + n·2^56) mod B. Character n-grams are
    the hashes of every n consecutive characters of the lower-cased text, tagged with 2^63 + n·2^56.
    """
    words = text_word_hashes(text)
    pieces = []
    for n in range(1, word_ngrams + 1):
        pieces.append(ngram_hashes(words, n) + np.uint64(n << 56))
    if char_ngrams:
        code_points = _code_points(" ".join(text.lower().split()))
        starts = np.arange(max(len(code_points) - char_ngrams + 1, 0))
        pieces.append(_substring_hashes(code_points, starts, starts + char_ngrams)
                      + np.uint64((1 << 63) + (char_ngrams << 56)))
    hashes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
    return (_fmix64(hashes) % np.uint64(num_buckets)).astype(np.int64)
# classroom: end hashed_ngram_features


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+e^−z), without overflow for large |z|


class FastTextClassifier:
    """P(good | x) = σ(w · mean_{f ∈ features(x)} E[f] + b); fit(texts, labels) then predict_proba(texts)."""

    def __init__(self, num_buckets=NUM_BUCKETS, dim=DIM, word_ngrams=WORD_NGRAMS, char_ngrams=CHAR_NGRAMS,
                 seed=SEED):
        self.num_buckets, self.dim, self.word_ngrams, self.char_ngrams = num_buckets, dim, word_ngrams, char_ngrams
        rng = np.random.default_rng(seed)
        # fastText's initialisation: input vectors uniform in ±1/d, the output layer zero
        self.E = rng.uniform(-1 / dim, 1 / dim, size=(num_buckets, dim)).astype(np.float32)
        self.w = np.zeros(dim, dtype=np.float32)
        self.b = 0.0
        self.seed = seed

    def features(self, text):
        return hashed_ngram_features(text[:MAX_CHARS], self.num_buckets, self.word_ngrams, self.char_ngrams)

    def _hidden(self, feature_lists):
        """h = the mean of E's rows over each text's features ([N, d]; a text without features gets 0)."""
        lengths = np.array([len(f) for f in feature_lists])
        flat = np.concatenate(feature_lists) if len(feature_lists) else np.zeros(0, dtype=np.int64)
        sums = np.zeros((len(feature_lists), self.dim), dtype=np.float32)
        nonempty = lengths > 0
        if nonempty.any():  # the texts' features lie one after another in flat: one segmented sum
            starts = np.r_[0, np.cumsum(lengths)[:-1]]
            sums[nonempty] = np.add.reduceat(self.E[flat], starts[nonempty], axis=0)
        return sums / np.maximum(lengths, 1)[:, None], flat, lengths

    def fit(self, texts, labels, epochs=EPOCHS, lr=LR, batch=BATCH):
        """SGD on the logistic loss, minibatches of `batch` texts, the learning rate decaying linearly
        to 0 (as fastText's). Gradients, with g_i = p_i − y_i for text i:
            ∂L/∂w = Σ_i g_i h_i     ∂L/∂b = Σ_i g_i     ∂L/∂E[f] = Σ_i g_i w / |features(x_i)|  (f ∈ x_i)
        """
        features = [self.features(t) for t in texts]
        y = np.asarray(labels, dtype=np.float32)
        rng = np.random.default_rng(self.seed)
        steps, step = epochs * math.ceil(len(texts) / batch), 0
        self.losses = []
        for _ in range(epochs):
            order = rng.permutation(len(texts))
            epoch_loss = 0.0
            for i in range(0, len(order), batch):
                rows = order[i:i + batch]
                step_lr = lr * (1 - step / steps)
                step += 1
                h, flat, lengths = self._hidden([features[r] for r in rows])
                p = sigmoid(h @ self.w + self.b)
                epoch_loss += float(-np.sum(y[rows] * np.log(p + 1e-9) + (1 - y[rows]) * np.log(1 - p + 1e-9)))
                g = (p - y[rows]).astype(np.float32)
                grad_w, grad_b = g @ h, float(g.sum())
                # every feature of text i gets the same gradient (g_i / |features(x_i)|)·w, so the update
                # of row f is s_f·w with s_f the sum of g_i/|features(x_i)| over f's occurrences
                per_feature = np.repeat(g / np.maximum(lengths, 1), lengths)
                rows_hit, occurrence = np.unique(flat, return_inverse=True)
                s_f = np.bincount(occurrence, weights=per_feature).astype(np.float32)
                self.E[rows_hit] -= step_lr * s_f[:, None] * self.w[None, :]
                self.w -= step_lr * grad_w
                self.b -= step_lr * grad_b
            self.losses.append(epoch_loss / len(texts))
        return self

    def predict_proba(self, texts):
        """P(good | x) for each text."""
        if not len(texts):
            return np.zeros(0)
        h, *_ = self._hidden([self.features(t) for t in texts])
        return sigmoid(h @ self.w + self.b).astype(np.float64)


# -----------------------------------------------------------------------------
# Held-out metrics
# -----------------------------------------------------------------------------

def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counting ½ (the Mann–Whitney U statistic / (n₊·n₋)), computed from the ranks of the scores."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # rank of each score among all (1 = lowest), tied scores sharing the mean of their ranks
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    ranks = (last_rank - (counts - 1) / 2)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(scores, labels, threshold=0.5):
    """Precision TP/(TP+FP) and recall TP/(TP+FN) of "good" = score ≥ threshold."""
    predicted, labels = np.asarray(scores) >= threshold, np.asarray(labels, dtype=bool)
    tp = int((predicted & labels).sum())
    return tp / max(int(predicted.sum()), 1), tp / max(int(labels.sum()), 1)


# -----------------------------------------------------------------------------
# Training data and the filter
# -----------------------------------------------------------------------------

def paragraph_chunks(text, chunk_chars=CHUNK_CHARS):
    """The text cut at blank lines into runs of paragraphs of at least chunk_chars characters (the last
    run may be shorter; a text shorter than chunk_chars is one chunk)."""
    chunks, current = [], []
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            current.append(paragraph.strip())
        if sum(len(p) for p in current) >= chunk_chars:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def reference_texts(reference, seed=SEED, problems=None):
    """The positives: 'stdlib-topics' (the Language Reference, pydoc_data.topics) or a corpus path
    (a file or directory, read like --source), normalised like the pool's documents."""
    if reference == "stdlib-topics":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise DataError("--classifier-reference stdlib-topics: this Python has no pydoc_data.topics; "
                            "give a file or directory of good text") from None
        texts = [topics[name] for name in sorted(topics)]
    else:
        from data.sources import path_source
        texts = [d.text for d in path_source("reference", reference).load(math.inf, seed, problems or [])]
    texts = [normalise_text(t)[0] for t in texts]
    texts = [t for t in texts if t]
    if len(texts) < 2:
        raise DataError(f"--classifier-reference {reference}: {len(texts)} document(s); need at least 2")
    return texts


def _split(items, fraction, rng):
    order = rng.permutation(len(items))
    n_held = max(1, int(round(fraction * len(items))))
    return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]


def training_plan(positive_counts, negative_counts, seed=SEED):
    """Which paragraph chunks train and test the classifier, from how many chunks each document has:
    80 % of the positive and of the negative documents train, the other 20 % are held out (split by
    document, so no document is on both sides); negatives are sampled to as many chunks as the
    positives have (balanced classes). Needs only the counts, so the streamed pipeline (data/stream.py)
    plans from numbers and reads back just the chosen documents. Returns four (document indices,
    chunk numbers) pairs: good train, good held-out, random train, random held-out."""
    rng = np.random.default_rng(seed)
    pos_train, pos_held = _split(np.arange(len(positive_counts)), HELDOUT_FRACTION, rng)
    neg_train, neg_held = _split(np.arange(len(negative_counts)), HELDOUT_FRACTION, rng)

    def pick(documents, counts, limit=None):
        sizes = np.asarray(counts, dtype=np.int64)[np.asarray(documents, dtype=np.int64)]
        total, ends = int(sizes.sum()), np.cumsum(sizes)
        chosen = (np.sort(rng.choice(total, limit, replace=False)) if limit is not None and total > limit
                  else np.arange(total))  # the j-th chunk of the documents' chunks laid end to end
        which = np.searchsorted(ends, chosen, side="right")
        return np.asarray(documents, dtype=np.int64)[which], chosen - (ends - sizes)[which]

    good_train, good_held = pick(pos_train, positive_counts), pick(pos_held, positive_counts)
    return (good_train, good_held, pick(neg_train, negative_counts, len(good_train[0])),
            pick(neg_held, negative_counts, len(good_held[0])))


def training_chunks(positives, negatives, seed=SEED):
    """The classifier's examples: training_plan's chunks of the positive and negative documents.
    Returns (train texts, train labels, held-out texts, held-out labels), label 1 = good."""
    pos_chunks, neg_chunks = [paragraph_chunks(t) for t in positives], [paragraph_chunks(t) for t in negatives]
    return planned_examples(training_plan([len(c) for c in pos_chunks], [len(c) for c in neg_chunks], seed),
                            pos_chunks, neg_chunks)


def planned_examples(plan, pos_chunks, neg_chunks):
    """The texts and labels of a training_plan, given each planned document's paragraph chunks
    (pos_chunks[d], neg_chunks[d]: a list, or a dict holding just the planned documents)."""
    good_train, good_held, random_train, random_held = (
        [chunks[d][k] for d, k in zip(part[0].tolist(), part[1].tolist())]
        for chunks, part in zip((pos_chunks, pos_chunks, neg_chunks, neg_chunks), plan))
    return (good_train + random_train, [1] * len(good_train) + [0] * len(random_train),
            good_held + random_held, [1] * len(good_held) + [0] * len(random_held))


def train_classifier(positives, negatives, seed=SEED, epochs=EPOCHS, lr=LR, **model_args):
    """Fit on training_chunks' training side, measure on its held-out side. Returns (classifier, report)."""
    return fit_classifier(training_chunks(positives, negatives, seed), seed, epochs, lr, **model_args)


def fit_classifier(examples, seed=SEED, epochs=EPOCHS, lr=LR, **model_args):
    """Fit on (train texts, train labels, held-out texts, held-out labels); report the held-out side."""
    train_texts, train_labels, held_texts, held_labels = examples
    start = time.time()
    classifier = FastTextClassifier(seed=seed, **model_args).fit(train_texts, train_labels, epochs, lr)
    train_seconds = time.time() - start
    scores = classifier.predict_proba(held_texts)
    labels = np.asarray(held_labels)
    precision, recall = precision_recall(scores, labels)
    report = {"train_chunks": {"good": int(sum(train_labels)), "random": len(train_labels) - int(sum(train_labels))},
              "heldout_chunks": {"good": int(labels.sum()), "random": int(len(labels) - labels.sum())},
              "heldout_precision": round(precision, 4), "heldout_recall": round(recall, 4),
              "heldout_accuracy": round(float(((scores >= 0.5) == labels).mean()), 4),
              "heldout_auc": round(roc_auc(scores, labels), 4),
              "train_seconds": round(train_seconds, 2), "epoch_losses": [round(x, 4) for x in classifier.losses]}
    return classifier, report


def score_cut(scores, threshold, keep_fraction):
    """The score a prose document needs to stay: the threshold, or with keep_fraction the score above
    which that fraction of them lies."""
    if keep_fraction is None:
        return threshold
    return float(np.quantile(scores, 1 - keep_fraction)) if len(scores) else 0.5


def filter_report(report, scores, cut, origins, seconds, **fields):
    """The filter's part of the report: the cut, how many it scored and removed, every score, and the
    origins of the three lowest and highest (origins(i) for prose document i)."""
    ranked = np.argsort(scores)
    report.update(fields)
    report.update({"threshold": round(cut, 4), "scored": len(scores), "removed": int((scores < cut).sum()),
                   "scores": np.round(scores, 4).tolist(),
                   "documents_per_second": round(len(scores) / max(seconds, 1e-9), 1),
                   "lowest": [origins(int(i)) for i in ranked[:3]],
                   "highest": [origins(int(i)) for i in ranked[::-1][:3]]})
    return report


def classifier_filter(documents, reference, threshold=0.5, keep_fraction=None, eval_texts=(), seed=SEED,
                      problems=None, **model_args):
    """Train the classifier (reference texts vs random prose documents of `documents`), score every
    prose document and keep those with P(good) ≥ threshold — or, with keep_fraction, the top fraction
    of them. Negatives exclude documents equal to a reference text and documents that overlap the
    evaluation texts (the classifier is trained on no evaluation data either).
    Returns (kept, removed, report)."""
    positives = reference_texts(reference, seed, problems)
    reference_hashes = {exact_hash(t) for t in positives}
    index = ContaminationIndex(eval_texts)
    prose = [d for d in documents if d.kind == "prose"]
    negatives = [d.text for d in prose if exact_hash(d.text) not in reference_hashes
                 and not index.contaminated(d.text)]
    check_negatives(len(negatives), reference)
    classifier, report = train_classifier(positives, negatives, seed, **model_args)
    start = time.time()
    scores = classifier.predict_proba([d.text for d in prose])
    seconds = time.time() - start
    cut = score_cut(scores, threshold, keep_fraction)
    score_of = {id(d): s for d, s in zip(prose, scores)}
    kept = [d for d in documents if d.kind != "prose" or score_of[id(d)] >= cut]
    removed = [d for d in prose if score_of[id(d)] < cut]
    filter_report(report, scores, cut, lambda i: prose[i].origin, seconds, reference=reference,
                  reference_documents=len(positives), negative_documents=len(negatives), keep_fraction=keep_fraction)
    return kept, removed, report


def check_negatives(n, reference):
    if n < 2:
        raise DataError(f"--classifier-reference {reference}: only {n} prose document(s) in the pool "
                        "to train against (the negatives); need at least 2 — or turn the classifier off")
