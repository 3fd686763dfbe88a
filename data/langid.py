"""Language identification: naive Bayes over byte n-grams (seed Part 1, section 1.2, the first step of
the quality-filtering pipeline, "Language detection"; in the spirit of langid.py, Lui & Baldwin 2012,
and of Cavnar & Trenkle 1994's character n-gram profiles).

A language shows in its short byte sequences: "th", "the", " de", "ij", "ß", "ção", "ł". The model
counts, for every language c, how often each byte n-gram g (n = 1..4, UTF-8 bytes, the text padded with
a space at each end so that word starts and ends count) occurs in that language's training sentences,
and scores a new text x with its n-gram counts x_g by multinomial naive Bayes:

    score(c | x) = log P(c) + Σ_g x_g · log P(g | c)          language(x) = argmax_c score(c | x)

with P(g | c) estimated with add-α smoothing (naive_bayes_fit). n-grams are hashed into a fixed
number of buckets (a deterministic hash, the same in every process), so the model is one
(languages × buckets) array of log-probabilities and scoring a document is one gather and a sum.

Training text: the translated messages of gettext catalogs (vim, glib, gtk), shipped as a small
corpus in data/langid_corpus/ (README there: provenance and licences), rebuilt with

    python -m data.langid build-corpus --out data/langid_corpus

and the model is checked on its held-out sentences with `python -m data.langid evaluate`.
The filter (language_filter) labels each prose document and keeps those in the target languages.
"""

import argparse
import glob
import os
import re
import struct
import sys
import time
import zlib

import numpy as np

from data.dedup import _fmix64
from data.errors import DataError
from data.perplexity import ngram_keys
from data.sources import utf8

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "langid_corpus")
ORDERS = (1, 2, 3, 4)  # byte n-gram lengths, as langid.py's
NUM_BUCKETS = 1 << 18
ALPHA = 0.1  # add-α smoothing: small, since a bucket unseen in a language is evidence against it
MAX_BYTES = 2000  # a document is identified by its first 2,000 bytes (its language does not change later)
TEST_EVERY = 5  # build-corpus: one message in five (by a hash of its English original) is held out


# -----------------------------------------------------------------------------
# Features: hashed byte n-grams
# -----------------------------------------------------------------------------

def byte_ngram_buckets(text, orders=ORDERS, num_buckets=NUM_BUCKETS, max_bytes=MAX_BYTES):
    """Bucket id of every byte n-gram (n in orders) of " " + text + " ": an int64 array.

    The k-gram ending at byte i is packed into an integer (data.perplexity.ngram_keys: 8 bits per
    byte), tagged with k in bits 40+ so that orders differ, mixed with MurmurHash3's finaliser and
    reduced mod num_buckets: deterministic, unlike Python's salted hash().
    """
    data = np.frombuffer(b" " + utf8(text.lower())[:max_bytes] + b" ", dtype=np.uint8)
    pieces = []
    for k in orders:
        if len(data) >= k:
            keys = ngram_keys(data, k)[k - 1:].astype(np.uint64) | np.uint64(k << 40)
            pieces.append(_fmix64(keys) % np.uint64(num_buckets))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


# -----------------------------------------------------------------------------
# Multinomial naive Bayes
# -----------------------------------------------------------------------------

# classroom: begin naive_bayes_fit
def naive_bayes_fit(counts, documents_per_class, alpha=ALPHA):
    """Multinomial naive Bayes with add-α (Lidstone) smoothing, from counts n_cg of feature g in class c:

        log P(c)     = log( N_c / Σ_c' N_c' )                      N_c: training documents of class c
        log P(g | c) = log( (n_cg + α) / (Σ_g' n_cg' + α·G) )      G: number of features (buckets)

    so that Σ_g P(g | c) = 1 for every class. Returns (log_prior [C], log_likelihood [C, G]).
    """
    counts = np.asarray(counts, dtype=np.float64)
    documents_per_class = np.asarray(documents_per_class, dtype=np.float64)
    log_prior = np.log(documents_per_class / documents_per_class.sum())
    totals = counts.sum(axis=1, keepdims=True)
    log_likelihood = np.log(counts + alpha) - np.log(totals + alpha * counts.shape[1])
    return log_prior, log_likelihood
# classroom: end naive_bayes_fit


class LanguageIdentifier:
    """fit(texts, labels) → predict(texts): naive Bayes over hashed byte n-grams."""

    def __init__(self, orders=ORDERS, num_buckets=NUM_BUCKETS, alpha=ALPHA):
        self.orders, self.num_buckets, self.alpha = tuple(orders), num_buckets, alpha
        self.languages, self.log_prior, self.log_likelihood = [], None, None

    def features(self, text):
        return byte_ngram_buckets(text, self.orders, self.num_buckets)

    def fit(self, texts, labels):
        self.languages = sorted(set(labels))
        index = {language: i for i, language in enumerate(self.languages)}
        counts = np.zeros((len(self.languages), self.num_buckets))
        documents = np.zeros(len(self.languages))
        for text, label in zip(texts, labels):
            np.add.at(counts[index[label]], self.features(text), 1)
            documents[index[label]] += 1
        log_prior, log_likelihood = naive_bayes_fit(counts, documents, self.alpha)
        self.log_prior, self.log_likelihood = log_prior, log_likelihood.astype(np.float32)
        return self

    def scores(self, text):
        """score(c | x) = log P(c) + Σ_g x_g log P(g | c) for every language c (a [C] array)."""
        buckets, counts = np.unique(self.features(text), return_counts=True)
        return self.log_prior + self.log_likelihood[:, buckets] @ counts

    def predict(self, texts):
        return [self.languages[int(np.argmax(self.scores(t)))] for t in texts]


# -----------------------------------------------------------------------------
# The shipped corpus
# -----------------------------------------------------------------------------

def read_corpus(directory=CORPUS_DIR, split="train"):
    """(sentences, languages) of one split of the corpus: files LANG.txt with lines "train|test<TAB>text"."""
    files = sorted(glob.glob(os.path.join(directory, "*.txt")))
    if not files:
        raise DataError(f"{directory}: no LANG.txt files (python -m data.langid build-corpus --out {directory})")
    texts, labels = [], []
    for path in files:
        language = os.path.basename(path)[:-len(".txt")]
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or "\t" not in line:
                    continue
                which, _, text = line.rstrip("\n").partition("\t")
                if which == split:
                    texts.append(text)
                    labels.append(language)
    return texts, labels


def known_languages(directory=CORPUS_DIR):
    """The languages of the corpus: the names of its LANG.txt files."""
    return sorted(os.path.basename(path)[:-len(".txt")] for path in glob.glob(os.path.join(directory, "*.txt")))


def default_identifier(directory=CORPUS_DIR):
    """A LanguageIdentifier fitted on the shipped corpus's training split (~0.5 s)."""
    texts, labels = read_corpus(directory, "train")
    return LanguageIdentifier().fit(texts, labels)


_FORMAT = re.compile(r"%[-+ #0-9.*]*[a-zA-Z]|%\d+|\{[^}]*\}|\$\w+|\\[nt]|E\d+:|[&_](?=\w)|<[^>]*>|\[[^\]]*\]")


_EMPTY_QUOTES = re.compile("[\"'«»“”„‘’「」]\\s*[\"'«»“”„‘’「」]")  # what is left of "%s" or « %s »


def clean_message(text):
    """A catalog message as a plain sentence: printf placeholders, Vim's error numbers "E123:", menu
    accelerators (&File, _File), markup, emptied quotes and line breaks removed; None if fewer than 4
    words remain."""
    text = _EMPTY_QUOTES.sub(" ", _FORMAT.sub(" ", text.replace("\n", " ")))
    text = " ".join(text.split()).strip(" :;,-")
    return text if len(text.split()) >= 4 and sum(c.isalpha() for c in text) >= 15 else None


def read_mo(path):
    """{original: translation} of a GNU gettext .mo file, decoded with the charset its header names.

    The format: a little- or big-endian header (magic 0x950412de, revision, N, offset of the
    originals' table, offset of the translations' table), each table N (length, offset) pairs.
    (The stdlib's gettext.GNUTranslations insists on UTF-8 headers; some catalogs are Latin-1.)
    """
    with open(path, "rb") as f:
        raw = f.read()
    order = "<" if raw[:4] == b"\xde\x12\x04\x95" else ">"
    n, originals, translations = struct.unpack(order + "3I", raw[8:20])

    def entry(table, i):
        length, offset = struct.unpack(order + "2I", raw[table + 8 * i:table + 8 * i + 8])
        return raw[offset:offset + length]

    pairs = [(entry(originals, i), entry(translations, i)) for i in range(n)]
    header = dict(pairs).get(b"", b"").decode("ascii", "replace")
    charset = (re.search(r"charset=([\w-]+)", header) or re.search("(utf-8)", "utf-8")).group(1)
    catalog = {}
    for original, translated in pairs:
        if original and b"\0" not in original:  # skip plural forms (NUL-separated)
            catalog[original.decode(charset, "replace")] = translated.decode(charset, "replace")
    return catalog


# language → catalog directory names to try, in order (vim's Brazilian Portuguese stands for Portuguese)
CATALOG_LANGUAGES = {"de": ["de"], "es": ["es"], "fr": ["fr"], "it": ["it"], "nl": ["nl"], "pl": ["pl"],
                     "pt": ["pt", "pt_BR"], "ru": ["ru"], "sv": ["sv"], "tr": ["tr"]}
CATALOGS = ["/usr/share/vim/vim90/lang/{lang}/LC_MESSAGES/vim.mo",
            "/usr/share/locale/{lang}/LC_MESSAGES/glib20.mo",
            "/usr/share/locale/{lang}/LC_MESSAGES/gtk20.mo"]


def build_corpus(out_dir, max_bytes_per_language=24_000):
    """Write out_dir/LANG.txt from the gettext catalogs on this machine. English is the catalogs'
    msgids (the original messages), every other language their translations; a message goes to
    the test split when crc32(English original) % TEST_EVERY == 0, so the same message is held out
    in every language."""
    by_language = {"en": {}}
    used = {}
    for language, directories in CATALOG_LANGUAGES.items():
        by_language[language] = {}
        for pattern in CATALOGS:
            for directory in directories:
                path = pattern.format(lang=directory)
                if not os.path.exists(path):
                    continue
                catalog = read_mo(path)
                used.setdefault(language, []).append(path)
                for msgid, msgstr in catalog.items():
                    if not isinstance(msgid, str) or not msgid or not isinstance(msgstr, str):
                        continue
                    english, translated = clean_message(msgid), clean_message(msgstr)
                    if english and translated and translated != english:
                        by_language[language][english] = translated
                        by_language["en"][english] = english
                break
    if not used:
        raise DataError("build-corpus: no gettext catalogs found (looked for " + ", ".join(CATALOGS) + ")")
    os.makedirs(out_dir, exist_ok=True)
    for language, messages in by_language.items():
        if not messages:
            continue
        lines, size, written = [], 0, set()
        for english in sorted(messages, key=lambda m: zlib.crc32(m.encode())):  # a fixed shuffle
            if messages[english] in written:  # two originals with one translation: keep one
                continue
            written.add(messages[english])
            which = "test" if zlib.crc32(english.encode()) % TEST_EVERY == 0 else "train"
            lines.append(f"{which}\t{messages[english]}\n")
            size += len(lines[-1].encode())
            if size >= max_bytes_per_language:
                break
        sources = sorted({p for ps in used.values() for p in ps}) if language == "en" else used[language]
        header = ("# Derived from gettext message catalogs (.mo) of Debian packages: "
                  + ", ".join(sources) + ". Vim: Vim licence; glib, gtk: LGPL-2.1-or-later.\n")
        tmp = os.path.join(out_dir, f"{language}.txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(header + "".join(lines))
        os.replace(tmp, os.path.join(out_dir, f"{language}.txt"))
    return sorted(by_language)


# -----------------------------------------------------------------------------
# The filter
# -----------------------------------------------------------------------------

def language_filter(documents, languages, identifier=None):
    """Label each prose document's language; keep those in `languages` (code and curated documents
    pass: their "language" is a programming language, or they are clean by construction).
    Returns (kept, removed, report) with counts per predicted language and documents/s."""
    identifier = identifier or default_identifier()
    unknown = sorted(set(languages) - set(identifier.languages))
    if unknown:
        raise DataError(f"--languages {','.join(languages)}: {unknown} not among the identifier's languages "
                        f"{identifier.languages}")
    kept, removed, by_language, examples = [], [], {}, {}
    start, labelled = time.time(), 0
    for doc in documents:
        if doc.kind != "prose":
            kept.append(doc)
            continue
        language = identifier.predict([doc.text])[0]
        labelled += 1
        by_language[language] = by_language.get(language, 0) + 1
        if language in languages:
            kept.append(doc)
        else:
            removed.append(doc)
            examples.setdefault(language, []).append(doc.origin) if len(examples.get(language, [])) < 3 else None
    seconds = time.time() - start
    return kept, removed, {"languages": list(languages), "labelled": labelled, "by_language": by_language,
                           "removed": len(removed), "examples": examples,
                           "documents_per_second": round(labelled / max(seconds, 1e-9), 1)}


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def accuracy_by_language(predicted, labels):
    result = {}
    for language in sorted(set(labels)):
        pairs = [(p, l) for p, l in zip(predicted, labels) if l == language]
        result[language] = sum(p == l for p, l in pairs) / len(pairs)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.langid", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-corpus", help="write LANG.txt files from this machine's gettext catalogs")
    b.add_argument("--out", default=CORPUS_DIR, help="directory for the LANG.txt files")
    b.add_argument("--max-bytes", type=int, default=24_000, help="bytes per language (train + test)")
    e = sub.add_parser("evaluate", help="fit on the corpus's train split, report accuracy on its test split")
    e.add_argument("--corpus", default=CORPUS_DIR, help="directory of LANG.txt files")
    args = p.parse_args(argv)
    try:
        if args.command == "build-corpus":
            print(f"[langid] wrote {', '.join(build_corpus(args.out, args.max_bytes))} -> {args.out}")
            return
        start = time.time()
        identifier = LanguageIdentifier().fit(*read_corpus(args.corpus, "train"))
        fit_seconds = time.time() - start
        texts, labels = read_corpus(args.corpus, "test")
        start = time.time()
        predicted = identifier.predict(texts)
        per_second = len(texts) / (time.time() - start)
        accuracy = sum(p == l for p, l in zip(predicted, labels)) / len(labels)
        print(f"[langid] {len(identifier.languages)} languages, fit {fit_seconds:.2f}s; held-out accuracy "
              f"{accuracy:.3f} on {len(texts)} sentences ({per_second:,.0f} sentences/s)")
        for language, value in accuracy_by_language(predicted, labels).items():
            print(f"  {language}: {value:.3f}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
