"""Document-level curation: normalise, quality rules, exact dedup, decontamination (seed Part 1,
section 1.2 "Quality filtering pipeline"). Perplexity filtering is in data/perplexity.py and
near-duplicate / substring removal in data/dedup.py; data/prepare.py runs them in order.

Every filter returns (kept, removed, ...) so the report can show the funnel: how many documents
and bytes each stage removed, and why.
"""

import functools
import hashlib
import re
import unicodedata
import dataclasses
from dataclasses import dataclass

import numpy as np

from data.dedup import ngram_hashes, word_hashes, words_of

# -----------------------------------------------------------------------------
# 1. Normalise
# -----------------------------------------------------------------------------

# tiktoken's regex engine panics (a Rust panic, not an Exception) on ~1M consecutive spaces, and
# no real text needs more than a screenful of blank space: longer runs are cut to this length.
MAX_WHITESPACE_RUN = 100
# Longer documents are cut at a line break: a 10 MB log file should not be a tenth of the corpus.
MAX_DOCUMENT_CHARS = 100_000

_SURROGATE = re.compile("[\ud800-\udfff]")  # invalid UTF-8 bytes, kept by surrogateescape
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls except \t \n \r


@functools.lru_cache(maxsize=4)
def _long_whitespace(limit):
    return re.compile(r"\s{%d,}" % (limit + 1))


@dataclass
class NormaliseStats:
    invalid_bytes: int = 0
    control_characters: int = 0
    whitespace_runs_capped: int = 0
    truncated_documents: int = 0

    def add(self, other):
        for field in self.__dataclass_fields__:
            setattr(self, field, getattr(self, field) + getattr(other, field))


def normalise_text(text, max_whitespace_run=MAX_WHITESPACE_RUN, max_chars=MAX_DOCUMENT_CHARS):
    """Clean one document; returns (text, NormaliseStats).

    1. invalid UTF-8 bytes (lone surrogates from `surrogateescape`) → U+FFFD, counted;
    2. line ends \\r\\n and \\r → \\n; other control characters removed;
    3. Unicode NFC, so that "é" is one code point whichever way it was typed;
    4. whitespace runs longer than max_whitespace_run cut to that length;
    5. documents longer than max_chars cut at the last line break before the limit.
    """
    stats = NormaliseStats()
    text, stats.invalid_bytes = _SURROGATE.subn("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, stats.control_characters = _CONTROL.subn("", text)
    text = unicodedata.normalize("NFC", text)
    text, stats.whitespace_runs_capped = _long_whitespace(max_whitespace_run).subn(
        lambda m: m.group()[:max_whitespace_run], text)
    text = text.strip()
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[:cut if cut > max_chars // 2 else max_chars].rstrip()
        stats.truncated_documents = 1
    return text, stats


def normalise_documents(documents, max_whitespace_run=MAX_WHITESPACE_RUN, max_chars=MAX_DOCUMENT_CHARS):
    """normalise_text on each document; returns (the non-empty ones, their NormaliseStats as a dict)."""
    stats, kept = NormaliseStats(), []
    for doc in documents:
        text, doc_stats = normalise_text(doc.text, max_whitespace_run, max_chars)
        stats.add(doc_stats)
        if text:
            kept.append(dataclasses.replace(doc, text=text))
    return kept, dataclasses.asdict(stats)


# -----------------------------------------------------------------------------
# 2. Heuristic quality rules
# -----------------------------------------------------------------------------

@dataclass
class ProseRules:
    """Thresholds for natural-language documents; the first three are the seed's (section 1.2)."""
    min_words: int = 100  # seed 1.2: "Remove documents with <100 words" (Gopher uses 50)
    max_non_letter_fraction: float = 0.5  # seed 1.2: ">50% digits or special characters"
    min_sentences: int = 3  # seed 1.2: "<3 sentences"; C4 (Raffel et al. 2020) uses the same
    min_mean_word_length: float = 3.0  # Gopher (Rae et al. 2021, App. A): mean word length 3..10
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # Gopher: '#' and '...' per word
    max_bullet_line_fraction: float = 0.9  # Gopher: >90% of lines start with a bullet
    max_ellipsis_line_fraction: float = 0.3  # Gopher: >30% of lines end with an ellipsis
    min_alphabetic_word_fraction: float = 0.8  # Gopher: 80% of words contain a letter
    max_duplicate_line_fraction: float = 0.3  # Gopher repetition: lines that repeat an earlier line
    max_duplicate_line_char_fraction: float = 0.2  # Gopher: characters in those repeated lines


@dataclass
class CodeRules:
    """Thresholds for source code (Codex, Chen et al. 2021, section 3.1; The Stack / StarCoder)."""
    min_lines: int = 5  # a file of a few lines teaches nothing about program structure
    max_line_length: int = 1000  # Codex: "maximum line length greater than 1000"
    max_mean_line_length: float = 100.0  # Codex: "average line length greater than 100"
    min_alphanumeric_fraction: float = 0.25  # Codex: "small percentage of alphanumeric characters"
    # Codex: "likely auto-generated"; these markers in the first lines give it away
    generated_markers: tuple = ("auto-generated", "autogenerated", "automatically generated",
                                "do not edit", "generated by")


BULLETS = ("-", "*", "•", "‣", "▪", "●", "–")
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def _duplicate_lines(lines):
    """(fraction of lines that repeat an earlier line, fraction of characters in them)."""
    seen, duplicate_lines, duplicate_chars = set(), 0, 0
    for line in lines:
        if line in seen:
            duplicate_lines += 1
            duplicate_chars += len(line)
        seen.add(line)
    total_chars = sum(len(line) for line in lines)
    return duplicate_lines / max(len(lines), 1), duplicate_chars / max(total_chars, 1)


def prose_rule_failures(text, rules=ProseRules()):
    """Names of the prose rules that `text` breaks, in the order they are checked."""
    words = text.split()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    non_space = len(text) - sum(map(str.isspace, text))
    letters = sum(map(str.isalpha, text))
    failures = []
    if len(words) < rules.min_words:
        failures.append("too_few_words")
    if non_space - letters > rules.max_non_letter_fraction * max(non_space, 1):
        failures.append("digits_or_special_characters")
    if len(SENTENCE_END.findall(text)) < rules.min_sentences:
        failures.append("too_few_sentences")
    mean_word_length = sum(len(w) for w in words) / max(len(words), 1)
    if not rules.min_mean_word_length <= mean_word_length <= rules.max_mean_word_length:
        failures.append("mean_word_length")
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols > rules.max_symbol_word_ratio * max(len(words), 1):
        failures.append("symbol_to_word_ratio")
    if lines and sum(line.startswith(BULLETS) for line in lines) > rules.max_bullet_line_fraction * len(lines):
        failures.append("bullet_lines")
    if lines and sum(line.endswith(("...", "…")) for line in lines) > rules.max_ellipsis_line_fraction * len(lines):
        failures.append("ellipsis_lines")
    # w.isalpha() first: most words are all letters, and the per-character loop is 60% of the rules' time
    if sum(w.isalpha() or any(map(str.isalpha, w)) for w in words) < rules.min_alphabetic_word_fraction * len(words):
        failures.append("alphabetic_words")
    duplicate_line_fraction, duplicate_char_fraction = _duplicate_lines(lines)
    if duplicate_line_fraction > rules.max_duplicate_line_fraction:
        failures.append("duplicate_lines")
    if duplicate_char_fraction > rules.max_duplicate_line_char_fraction:
        failures.append("duplicate_line_characters")
    if "lorem ipsum" in text.lower():  # C4: placeholder text
        failures.append("lorem_ipsum")
    return failures


def code_rule_failures(text, rules=CodeRules()):
    """Names of the code rules that `text` breaks, in the order they are checked."""
    lines = text.splitlines()
    non_blank = [line for line in lines if line.strip()]
    failures = []
    if len(non_blank) < rules.min_lines:
        failures.append("too_few_lines")
    if lines and max(len(line) for line in lines) > rules.max_line_length:
        failures.append("max_line_length")
    if lines and sum(len(line) for line in lines) / len(lines) > rules.max_mean_line_length:
        failures.append("mean_line_length")
    if sum(map(str.isalnum, text)) < rules.min_alphanumeric_fraction * max(len(text), 1):
        failures.append("alphanumeric_fraction")
    head = "\n".join(lines[:5]).lower()
    if any(marker in head for marker in rules.generated_markers):
        failures.append("auto_generated")
    return failures


def quality_filter(documents, prose_rules=ProseRules(), code_rules=CodeRules()):
    """Apply the rules of each document's kind ("curated" documents pass).

    Returns (kept, removed, report); the report counts each removed document under its *first*
    failing rule ("removed_by_rule", which sums to the removals) and under every rule it fails
    ("flagged_by_rule")."""
    kept, removed = [], []
    removed_by_rule, flagged_by_rule, examples = {}, {}, {}
    for doc in documents:
        if doc.kind == "curated":
            failures = []  # clean by construction (e.g. generated tasks)
        elif doc.kind == "code":
            failures = code_rule_failures(doc.text, code_rules)
        else:
            failures = prose_rule_failures(doc.text, prose_rules)
        if not failures:
            kept.append(doc)
            continue
        removed.append(doc)
        first = f"{doc.kind}:{failures[0]}"
        removed_by_rule[first] = removed_by_rule.get(first, 0) + 1
        examples.setdefault(first, doc.origin)
        for rule in failures:
            flagged_by_rule[f"{doc.kind}:{rule}"] = flagged_by_rule.get(f"{doc.kind}:{rule}", 0) + 1
    return kept, removed, {"removed_by_rule": removed_by_rule, "flagged_by_rule": flagged_by_rule,
                           "examples": examples}


# -----------------------------------------------------------------------------
# 4. Exact dedup
# -----------------------------------------------------------------------------

def exact_hash(text):
    """64-bit hash of the text after case folding and collapsing whitespace, so that copies that
    differ only in spacing or capitals count as the same (the seed's "hash the document")."""
    canonical = " ".join(text.casefold().split())
    digest = hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def exact_dedup(documents):
    """Keep the first document with each exact_hash. Returns (kept, removed, examples)."""
    first_with, kept, removed, examples = {}, [], [], []
    for doc in documents:
        key = exact_hash(doc.text)
        if key in first_with:
            removed.append(doc)
            if len(examples) < 5:
                examples.append([first_with[key].origin, doc.origin])
        else:
            first_with[key] = doc
            kept.append(doc)
    return kept, removed, examples


# -----------------------------------------------------------------------------
# 7. Decontamination
# -----------------------------------------------------------------------------

DECONTAMINATION_NGRAM = 13  # GPT-3 (Brown et al. 2020, App. C) looked for 13-gram overlaps


class ContaminationIndex:
    """The word n-grams of evaluation texts, for finding training documents that contain them.

    A document is contaminated if it shares any n-gram (n = 13 words) with an evaluation text. An
    evaluation text shorter than n words (a short question) counts when its *whole* word sequence
    appears in the document. Words are lower-cased \\w+ runs and n-grams are 64-bit hashes, so
    punctuation and spacing cannot hide a copy.
    """

    def __init__(self, eval_texts, n=DECONTAMINATION_NGRAM):
        self.n = n
        self.hashes_by_length = {}  # length m → set of hashes of m-word sequences to look for
        for text in eval_texts:
            words = words_of(text)
            if not words:
                continue
            m = min(n, len(words))
            self.hashes_by_length.setdefault(m, set()).update(ngram_hashes(word_hashes(words), m).tolist())
        self.lookup = {m: np.array(sorted(h), dtype=np.uint64) for m, h in self.hashes_by_length.items()}

    def __len__(self):
        return sum(len(h) for h in self.lookup.values())

    def contaminated(self, text):
        """True if the text contains any indexed n-gram (or a whole short evaluation text)."""
        if not self.lookup:
            return False
        hashes = word_hashes(words_of(text))
        return any(np.isin(ngram_hashes(hashes, m), wanted).any() for m, wanted in self.lookup.items())


def decontaminate(documents, eval_texts, n=DECONTAMINATION_NGRAM):
    """Drop training documents that overlap the evaluation texts. Returns (kept, removed)."""
    index = ContaminationIndex(eval_texts, n)
    kept, removed = [], []
    for doc in documents:
        (removed if index.contaminated(doc.text) else kept).append(doc)
    return kept, removed
