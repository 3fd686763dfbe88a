"""Raw text → curated documents → BPE tokenizer → token shards (seed Part 1, sections 1.1-1.3).

    python -m data.prepare --out runs/default/data            # offline default: the stdlib corpus
    python -m data.prepare --out DIR --source web=pages/:0.7 --source code=src/:0.3:code

Stages, each counted in report.json's funnel:

    load         sources → documents (data/sources.py), malformed input reported as file:line
    normalise    UTF-8, NFC, whitespace runs and lengths capped        (curate.normalise_text)
    language     naive Bayes over byte n-grams, keep --languages       (langid.language_filter)
    quality      seed/Gopher/C4 rules for prose, Codex rules for code  (curate.quality_filter)
    perplexity   Witten-Bell byte 5-gram, keep a percentile band       (perplexity.perplexity_band_filter)
    classifier   fastText-style good-vs-random text classifier (--classifier-reference)  (quality.classifier_filter)
    exact dedup  64-bit hash of the case- and space-folded text        (curate.exact_dedup)
    near dedup   MinHash + LSH + union-find                            (dedup.near_dedup)
    substrings   suffix array, repeated spans ≥ 50 tokens (--substring-dedup)  (dedup.substring_dedup)
    decontam     13-gram overlap with evaluation texts                 (curate.decontaminate)
    mixture      sample each source to its weight                      (sources.mix)

then a train/validation split by document, BPE training on (the first --bpe-train-bytes of) the
training documents only (the validation text stays unseen, so bits per byte on it are honest),
parallel tokenisation, shards.

The run streams (data/stream.py): the corpus is cut into chunks, every stage is a pass over them in
--workers processes with the texts, signatures and tokens on disk under DIR/prepare_work, so memory
stays within --max-memory whatever the corpus size; an interrupted run resumes from its last
finished chunk; several machines share the work with

    torchrun --nnodes N --nproc-per-node P -m data.prepare --out SHARED_DIR --source web=pages/

`curate_documents` below is the same curation on documents held in memory: the readable
reference that tests/test_data_stream.py checks the streamed passes against.

Output (the contract with train_gpt.py):

    DIR/tokenizer/{tokenizer.tiktoken, tokenizer.json}
    DIR/train_000000.bin ...  DIR/val_000000.bin     every document preceded by <|endoftext|>
    DIR/meta.json     {vocab_size, eot_token, tokenizer, train_shards, val_shards,
                       train_tokens, val_tokens, val_bytes}
    DIR/report.json, DIR/report.png

`val_tokens` counts the <|endoftext|> separators too; `val_bytes` is the UTF-8 size of the
validation documents, so bits per byte = (mean nll in nats / ln 2) · val_tokens / val_bytes.

Python hook for later stages: `main(argv, extra_sources=[text_list_source("tasks", texts, 0.1)],
eval_texts=heldout_prompts)` adds a source to the mixture and evaluation texts to decontaminate.
"""

import argparse
import array
import collections
import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from data import curate, dedup, langid, perplexity, quality, sources, stream, tasks
from data.errors import DataError
from data.shards import token_dtype, write_shard
from data.tokenizer import DEFAULT_PATTERN, PRETRAINED, load_tokenizer, save_tokenizer, train_bpe
from data.stages import begin_stage, exit_torchrun_worker, finish_stage, finished_stage, stage_fingerprint
from settings import ConfigError, add_settings, check_ranges, runtime_flags, setting

# Defaults: `python -m data.prepare --out DIR` runs in about a minute on 2 CPU cores.
OUT = "runs/default/data"
MAX_BYTES = 6_000_000  # curated text in the final mixture (the stdlib has ~2.5 MB of curated prose: 40% of 6 MB)
OVERREAD = 3.0  # raw bytes read per curated byte wanted: curation removes a third, and a larger
#                pool lets the dedup stages meet both copies of a duplicate
VOCAB_SIZE = 4096
BPE_TRAIN_BYTES = 100_000_000  # BPE's memory grows with the distinct words it sees: a sample of 100 MB, not 40 GB
MAX_MEMORY = 2e9
VAL_FRACTION = 0.05
SHARD_TOKENS = 10_000_000
PPL_BAND = (2.0, 95.0)  # keep documents between these perplexity percentiles of their source
PPL_ORDER = 5
MINHASH_THRESHOLD = 0.8  # seed 1.2: remove documents ">80% similar" to another
NUM_PERM = 128
SHINGLE_WORDS = 5
SUBSTRING_MIN_TOKENS = 50  # Lee et al. 2022 remove repeated spans of ≥ 50 tokens
SEED = 0
LANGUAGES = "en"  # the default corpus is English; the language stage removes prose in other languages
CLASSIFIER_REFERENCE = "none"
CLASSIFIER_THRESHOLD = 0.5
TASK_WEIGHT = 0.05  # --task-worksheets: their share of the mixture (a "midtraining"-style sprinkle of the tasks)


# Hyperparameters: one line each — value, what it does, allowed range (settings.py makes the flags).
# Checks that involve two flags or a file (--vocab-size with --tokenizer train, --ppl-band's order,
# --languages, --rule) stay as explicit code in check_args.
@dataclass
class Hyperparameters:
    out: str = setting(OUT, "output directory for tokenizer, shards, meta.json and the report")
    source: list = setting([], "a corpus (file or directory of .txt/.md/.rst/.py, .jsonl, .html) with a mixture weight "
                           "and kind prose|code|curated; PATH 'stdlib-code' / 'stdlib-prose' are the built-in corpora; "
                           "repeat for a mixture; default: code=stdlib-code:0.6 prose=stdlib-prose:0.4",
                           action="append", metavar="NAME=PATH[:WEIGHT[:KIND]]")
    text_field: str = setting("text", "field holding the text in .jsonl files")
    max_bytes: int = setting(MAX_BYTES, "bytes of curated text in the final mixture", check="> 0")
    overread: float = setting(OVERREAD, "raw bytes read per curated byte wanted (curation removes some)")
    vocab_size: int = setting(VOCAB_SIZE, "BPE vocabulary: 256 bytes + merges (6 special tokens come on top)")
    tokenizer: str = setting("train", "'train' a BPE here, or use 'gpt2' / 'cl100k_base' (if tiktoken can load them) "
                             "or an existing tokenizer directory")
    bpe_train_bytes: int = setting(BPE_TRAIN_BYTES, "train BPE on the first this many bytes of the training text "
                                   "(0 = all of it; its memory grows with the distinct words seen)", check="≥ 0")
    val_fraction: float = setting(VAL_FRACTION, "fraction of the text held out for validation, in whole documents",
                                  check="(0, 1)")
    shard_tokens: int = setting(SHARD_TOKENS, "tokens per .bin shard", check="> 0")
    workers: int = setting(0, "processes for the filters, perplexity scoring, MinHash signatures and tokenisation "
                           "(0 = one per CPU core, at most 8)", runtime=True)
    max_memory: float = setting(MAX_MEMORY, "bytes of memory the run may use: sets the chunk size (data/stream.py); "
                                "only per-document numbers grow with the corpus", check="> 0", runtime=True)
    max_doc_chars: int = setting(curate.MAX_DOCUMENT_CHARS,
                                 "documents are cut at a line break before this many characters")
    max_whitespace_run: int = setting(curate.MAX_WHITESPACE_RUN, "longer whitespace runs are cut to this length")
    rule: list = setting([], "override a quality threshold, e.g. prose.min_words=50 or code.max_line_length=500",
                         action="append", metavar="KIND.NAME=VALUE")
    ppl_band: list = setting(list(PPL_BAND), "keep documents between these perplexity percentiles of their source "
                             "(0 100 disables)", type=float, nargs=2, metavar=("LOW", "HIGH"))
    ppl_order: int = setting(PPL_ORDER, "order n of the byte n-gram model (1-7)", check="[1, 7]")
    languages: str = setting(LANGUAGES, "comma-separated languages to keep (ISO 639-1; the identifier knows "
                             "de,en,es,fr,it,nl,pl,pt,ru,sv,tr); 'any' turns language identification off")
    classifier_reference: str = setting(CLASSIFIER_REFERENCE,
                                        "good text for the quality classifier's positives: 'stdlib-topics' (the "
                                        "bundled Language Reference) or a file/directory; its negatives are random "
                                        "prose of the pool; 'none' = off")
    classifier_threshold: float = setting(CLASSIFIER_THRESHOLD,
                                          "keep prose documents whose classifier score P(good) is at least this",
                                          check="[0, 1]")
    classifier_keep_fraction: float | None = setting(None, "instead of a threshold, keep this top fraction of the "
                                                     "prose documents by score", check="(0, 1]")
    classifier_char_ngrams: int = setting(quality.CHAR_NGRAMS, "also hash character n-grams of this length "
                                          "(0 = word uni- and bigrams only)", check="≥ 0")
    classifier_epochs: int = setting(quality.EPOCHS, "classifier training epochs", check="≥ 1")
    minhash_threshold: float = setting(MINHASH_THRESHOLD, "Jaccard similarity above which documents are "
                                       "near-duplicates", check="(0, 1]")
    num_perm: int = setting(NUM_PERM, "MinHash permutations", check="≥ 1")
    shingle_words: int = setting(SHINGLE_WORDS, "words per MinHash shingle", check="≥ 1")
    substring_dedup: bool = setting(False, "also cut later copies of repeated spans (Lee et al. 2022; slower)")
    substring_min_tokens: int = setting(SUBSTRING_MIN_TOKENS, "minimum length of a repeated span, in pre-tokeniser "
                                        "chunks", check="≥ 1")
    decontaminate: list = setting([], "evaluation texts to remove from training data: .jsonl ('prompt' or 'text' "
                                  "field) or plain text with one text per line; repeatable",
                                  action="append", metavar="FILE")
    decontaminate_ngram: int = setting(curate.DECONTAMINATION_NGRAM, "words per n-gram for decontamination",
                                       check="≥ 1")
    task_worksheets: int = setting(0, "add this many task worksheets (train-split questions with answers) to the "
                                   "mixture", check="≥ 0")
    task_weight: float = setting(TASK_WEIGHT, "mixture weight of the task worksheets", check="> 0")
    seed: int = setting(SEED, "random seed (file order, sampling, split, MinHash)")
    quiet: bool = setting(False, "print only the final summary", runtime=True)
    force: bool = setting(False, "prepare again even if --out holds the output of this configuration", runtime=True)


# Flags that change only speed or printing are left out of the stage fingerprint; `rules` is no flag but
# what check_args makes of --rule (which is in the fingerprint), `language_list` of --languages.
RUNTIME_FLAGS = runtime_flags(Hyperparameters) | {"rules", "language_list"}


def build_parser():
    return add_settings(argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0],
                                                formatter_class=argparse.ArgumentDefaultsHelpFormatter),
                        Hyperparameters)


# -----------------------------------------------------------------------------
# Small helpers
# -----------------------------------------------------------------------------

def peak_rss_bytes():
    """This process's peak resident set size (Linux and macOS report ru_maxrss in different units)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def nbytes(doc):
    return len(sources.utf8(doc.text))


class Log:
    """Timed progress lines, and the funnel of documents and bytes after each stage."""

    def __init__(self, quiet=False):
        self.quiet, self.start, self.last = quiet, time.time(), time.time()
        self.funnel, self.timing, self.peak_memory = [], {}, {}

    def _ended(self, name):
        """Time the stage that just ended, and this process's peak resident memory so far (a
        high-water mark: the stage where it first rises is the one that needed the memory)."""
        self.timing[name] = round(time.time() - self.last, 2)
        self.last = time.time()
        self.peak_memory[name] = round(peak_rss_bytes() / 1e9, 3)

    def say(self, message):
        if not self.quiet:
            print(f"[prepare {time.time() - self.start:6.1f}s] {message}", flush=True)

    def stage(self, name, documents):
        by_source = {}
        for doc in documents:
            entry = by_source.setdefault(doc.source, {"documents": 0, "bytes": 0})
            entry["documents"] += 1
            entry["bytes"] += nbytes(doc)
        total = sum(e["bytes"] for e in by_source.values())
        self.funnel.append({"stage": name, "documents": len(documents), "bytes": total, "by_source": by_source})
        self._ended(name)
        self.say(f"{name:<15} {len(documents):>7,} documents {total / 1e6:8.2f} MB   ({self.timing[name]:.1f}s)")

    def stage_counts(self, name, by_source):
        """stage() from per-source counts {source: {"documents", "bytes"}} (data/stream.py's passes)."""
        documents = sum(e["documents"] for e in by_source.values())
        total = sum(e["bytes"] for e in by_source.values())
        self.funnel.append({"stage": name, "documents": documents, "bytes": total, "by_source": by_source})
        self._ended(name)
        self.say(f"{name:<15} {documents:>7,} documents {total / 1e6:8.2f} MB   ({self.timing[name]:.1f}s)")

    def timed(self, name):
        self._ended(name)
        self.say(f"{name} done ({self.timing[name]:.1f}s)")


def apply_rule_overrides(overrides):
    """--rule prose.min_words=50 → ProseRules(min_words=50); unknown names are a DataError."""
    rules = {"prose": curate.ProseRules(), "code": curate.CodeRules()}
    for spec in overrides:
        key, sep, value = spec.partition("=")
        kind, _, name = key.partition(".")
        fields = {f.name: f for f in dataclasses.fields(rules[kind])} if kind in rules else {}
        if not sep or name not in fields or name == "generated_markers":
            names = {k: sorted(f.name for f in dataclasses.fields(r) if f.name != "generated_markers")
                     for k, r in rules.items()}
            raise DataError(f"--rule {spec}: expected prose.NAME=VALUE or code.NAME=VALUE with NAME in "
                            f"prose: {names['prose']} / code: {names['code']}")
        try:
            rules[kind] = dataclasses.replace(rules[kind], **{name: type(getattr(rules[kind], name))(value)})
        except ValueError:
            raise DataError(f"--rule {spec}: {value!r} is not a number") from None
    return rules["prose"], rules["code"]


def read_eval_texts(path, problems):
    """Evaluation texts for decontamination: .jsonl records ('prompt' or 'text'), else one per line."""
    if not os.path.isfile(path):
        raise DataError(f"--decontaminate {path}: no such file")
    texts = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                texts.append(line.strip())
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e.msg})")
                continue
            text = next((record[k] for k in ("prompt", "text") if isinstance(record, dict)
                         and isinstance(record.get(k), str)), None)
            if text is None:
                problems.append(f"{path}:{lineno}: no string field 'prompt' or 'text'")
            else:
                texts.append(text)
    return texts


def check_args(args):
    """Every flag's range (Hyperparameters' `check`s), then the checks that involve two flags or a file;
    a DataError names the flag."""
    try:
        check_ranges(args, Hyperparameters)
    except ConfigError as e:
        raise DataError(str(e)) from None
    if args.vocab_size < 256 and args.tokenizer == "train":
        raise DataError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs at least 256")
    if args.vocab_size > 2**31 - 1:
        raise DataError(f"--vocab-size {args.vocab_size}: too large")
    low, high = args.ppl_band
    if not 0 <= low < high <= 100:
        raise DataError(f"--ppl-band {low} {high}: need 0 <= LOW < HIGH <= 100")
    args.language_list = [] if args.languages == "any" else [x.strip() for x in args.languages.split(",") if x.strip()]
    if args.languages != "any" and not args.language_list:
        raise DataError(f"--languages {args.languages!r}: give languages like en,de or 'any'")
    unknown = sorted(set(args.language_list) - set(langid.known_languages()))
    if unknown:
        raise DataError(f"--languages {args.languages}: {','.join(unknown)} unknown; the identifier knows "
                        f"{','.join(langid.known_languages())} (or 'any')")
    if args.classifier_reference not in ("none", "stdlib-topics") and not os.path.exists(args.classifier_reference):
        raise DataError(f"--classifier-reference {args.classifier_reference}: no such file or directory")
    if args.tokenizer != "train":
        if args.tokenizer not in PRETRAINED and not os.path.isdir(args.tokenizer):
            raise DataError(f"--tokenizer {args.tokenizer}: not 'train', {' / '.join(PRETRAINED)} or a directory")
        load_tokenizer(args.tokenizer)  # fail now (offline, broken files), not after the curation
    args.rules = apply_rule_overrides(args.rule)  # checked now, not after minutes of loading


# -----------------------------------------------------------------------------
# Curation
# -----------------------------------------------------------------------------

def load_sources(source_list, args, problems, log):
    """Read each source up to its share of max_bytes × overread raw bytes."""
    names = [s.name for s in source_list]
    if len(set(names)) != len(names):
        raise DataError(f"--source: source names must differ, got {names}")
    documents = []
    for source, budget in zip(source_list, sources.read_budgets(source_list, args.max_bytes, args.overread)):
        loaded = source.load(budget, args.seed, problems)
        documents.extend(loaded)
        log.say(f"source {source.name!r}: {len(loaded):,} documents ({source.description})")
    return documents


def curate_documents(source_list, args, eval_texts, problems, log, report):
    """Stages 1-7 and the mixture; returns the documents of the final mixture."""
    documents = load_sources(source_list, args, problems, log)
    log.stage("loaded", documents)
    if problems:
        log.say(f"{len(problems)} malformed or skipped inputs (all in report.json), e.g. {problems[0]}")

    documents, report["normalise"] = curate.normalise_documents(documents, args.max_whitespace_run,
                                                                  args.max_doc_chars)
    log.stage("normalised", documents)

    if args.language_list:
        documents, _, report["language"] = langid.language_filter(documents, args.language_list)
        log.stage("language", documents)
    else:
        report["language"] = {"enabled": False}

    prose_rules, code_rules = args.rules
    documents, _, report["quality"] = curate.quality_filter(documents, prose_rules, code_rules)
    report["quality"]["rules"] = {"prose": dataclasses.asdict(prose_rules), "code": dataclasses.asdict(code_rules)}
    log.stage("quality", documents)

    if tuple(args.ppl_band) != (0.0, 100.0):
        documents, _, by_source = perplexity.perplexity_band_filter(
            documents, tuple(args.ppl_band), args.ppl_order, seed=args.seed)
    else:
        by_source = {}
    report["perplexity"] = {"band_percentiles": list(args.ppl_band), "order": args.ppl_order, "by_source": by_source}
    log.stage("perplexity", documents)

    if args.classifier_reference != "none":
        documents, _, report["classifier"] = quality.classifier_filter(
            documents, args.classifier_reference, args.classifier_threshold, args.classifier_keep_fraction,
            eval_texts, args.seed, problems, char_ngrams=args.classifier_char_ngrams, epochs=args.classifier_epochs)
        log.stage("classifier", documents)
        c = report["classifier"]
        log.say(f"classifier: held-out precision {c['heldout_precision']:.3f} recall {c['heldout_recall']:.3f} "
                f"AUC {c['heldout_auc']:.3f}; {c['documents_per_second']:,.0f} documents/s scored")
    else:
        report["classifier"] = {"enabled": False}

    documents, removed, examples = curate.exact_dedup(documents)
    report["exact_dedup"] = {"removed": len(removed), "examples": examples}
    log.stage("exact_dedup", documents)

    documents, _, report["near_dedup"] = dedup.near_dedup(
        documents, args.minhash_threshold, args.num_perm, args.shingle_words, args.seed)
    log.stage("near_dedup", documents)

    if args.substring_dedup:
        documents, _, report["substring_dedup"] = dedup.substring_dedup(documents, args.substring_min_tokens)
        log.stage("substring_dedup", documents)
    else:
        report["substring_dedup"] = {"enabled": False}

    documents, removed = curate.decontaminate(documents, eval_texts, args.decontaminate_ngram)
    report["decontamination"] = {"eval_texts": len(eval_texts), "ngram": args.decontaminate_ngram,
                                 "removed": len(removed), "examples": [d.origin for d in removed[:5]]}
    log.stage("decontaminated", documents)

    by_source = {s.name: [] for s in source_list}
    for doc in documents:
        by_source[doc.source].append(doc)
    documents, report["mixture"] = sources.mix(by_source, {s.name: s.weight for s in source_list},
                                               args.max_bytes, args.seed)
    log.stage("mixture", documents)
    shortfall = sources.mixture_shortfall(report["mixture"], args.max_bytes)
    if shortfall:
        log.say(shortfall)
    return documents


def split_order(sizes, val_fraction, seed):
    """Shuffle the documents (given by their byte sizes), then hold out whole documents until they
    hold val_fraction of the bytes (at least one document each side). Splitting by bytes, not by
    document count, keeps the validation set's size steady when a few documents are very long.
    Returns (train positions, val positions) as arrays, in the shuffled order."""
    order = array.array("q", range(len(sizes)))
    random.Random(seed).shuffle(order)
    wanted = val_fraction * sum(sizes)
    n_val, held_out = 0, 0
    while n_val < len(order) - 1 and (n_val == 0 or held_out < wanted):
        held_out += sizes[order[n_val]]
        n_val += 1
    return order[n_val:], order[:n_val]


def split_documents(documents, val_fraction, seed):
    """split_order on in-memory documents: (train documents, val documents)."""
    if len(documents) < 2:
        raise DataError(TOO_FEW_DOCUMENTS.format(len(documents)))
    train, val = split_order([nbytes(d) for d in documents], val_fraction, seed)
    return [documents[i] for i in train], [documents[i] for i in val]


TOO_FEW_DOCUMENTS = ("only {} document(s) survived curation; need at least 2 (one for validation) — add text "
                     "with --source or relax the filters (--rule, --ppl-band)")


# -----------------------------------------------------------------------------
# Tokenizer and shards
# -----------------------------------------------------------------------------

_worker_encoding = None


def _init_worker(tokenizer_ref):
    global _worker_encoding
    _worker_encoding = load_tokenizer(tokenizer_ref)


def _encode_batch(texts):
    """One worker's job: the ids of each text, concatenated, plus the length of each."""
    ids = [_worker_encoding.encode_ordinary(t) for t in texts]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter((i for x in ids for i in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def tokenize_texts(texts, tokenizer_ref, workers):
    """Token ids of each text (a list of int64 arrays), encoded in `workers` processes.

    tiktoken is fast, so processes only pay off for a few MB of text; if a pool cannot be
    started (a sandbox without fork/semaphores) we fall back to this process. Returns
    (arrays, number of processes used).
    """
    total = sum(len(t) for t in texts)
    workers = max(1, min(workers, len(texts)))
    if total < 1_000_000:
        workers = 1
    batch = max(1, len(texts) // (workers * 8))
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    results = None
    # fork: the workers inherit the imported modules, and a caller needs no `if __name__ ==
    # "__main__"` guard (spawn would re-import the caller's script in every worker).
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        try:
            with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_ref,)) as pool:
                results = pool.map(_encode_batch, batches)
        except (OSError, RuntimeError, ImportError) as e:
            print(f"[prepare] multiprocessing unavailable ({type(e).__name__}: {e}); tokenising in one process",
                  file=sys.stderr)
            workers = 1
    if results is None:
        workers = 1
        _init_worker(tokenizer_ref)
        results = [_encode_batch(b) for b in batches]
    arrays = []
    for flat, lengths in results:
        arrays.extend(np.split(flat, np.cumsum(lengths)[:-1]))
    return arrays, workers


class ShardWriter:
    """Cuts a stream of tokens into shards of shard_tokens tokens, writing each as it fills. The
    tokens are copied into one shard-sized buffer, reused for every shard: no allocation per shard,
    so memory does not follow the corpus (a new array per shard fragments the heap, and grows it)."""

    def __init__(self, out_dir, prefix, vocab_size, shard_tokens):
        self.out_dir, self.prefix, self.vocab_size, self.shard_tokens = out_dir, prefix, vocab_size, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=token_dtype(vocab_size))  # pages are touched as they fill
        self.names, self.filled, self.total = [], 0, 0

    def _flush(self, tokens):
        name = f"{self.prefix}_{len(self.names):06d}.bin"
        write_shard(os.path.join(self.out_dir, name), tokens, self.vocab_size)
        self.names.append(name)
        self.total += len(tokens)

    def add(self, tokens):
        tokens = np.asarray(tokens)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled, tokens = self.filled + take, tokens[take:]
            if self.filled == self.shard_tokens:
                self._flush(self.buffer)
                self.filled = 0

    def close(self):
        """Write the last, partial shard (an empty split still gets one). Returns (shard names, total tokens)."""
        if self.filled or not self.names:
            self._flush(self.buffer[:self.filled])
        return self.names, self.total


def with_end_of_text(flat, lengths, eot):
    """Documents given as concatenated ids and their lengths → the stream <|endoftext|> doc <|endoftext|> doc …"""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
    return np.insert(np.asarray(flat, dtype=np.int64), starts, eot)


def write_shards(out_dir, prefix, token_arrays, eot, vocab_size, shard_tokens):
    """<|endoftext|> + document, for every document, cut into shards of shard_tokens tokens.
    Returns (shard file names, total tokens). An empty split still gets one (empty) shard."""
    writer = ShardWriter(out_dir, prefix, vocab_size, shard_tokens)
    for ids in token_arrays:
        writer.add(np.concatenate([[eot], ids]))
    return writer.close()


def get_tokenizer(args, train_texts, out_dir, log, report):
    """Train a BPE on the first --bpe-train-bytes of the training texts (an iterable, read lazily)
    or take a given tokenizer; save it under out_dir/tokenizer."""
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    if args.tokenizer == "train":
        sample = {"bytes": 0}

        def texts():
            for text in train_texts:
                if args.bpe_train_bytes and sample["bytes"] >= args.bpe_train_bytes:
                    return
                yield text
                sample["bytes"] += len(sources.utf8(text))

        start = time.time()
        ranks = train_bpe(texts(), args.vocab_size, DEFAULT_PATTERN)
        total = sample["bytes"]
        save_tokenizer(tokenizer_dir, ranks, DEFAULT_PATTERN, name=f"bpe{args.vocab_size}")
        report["tokenizer"] = {"trained_on_bytes": total, "train_seconds": round(time.time() - start, 2)}
        log.timed("bpe_training")
    else:  # copy the given tokenizer next to the shards, so the data directory is self-contained
        given = load_tokenizer(args.tokenizer)
        save_tokenizer(tokenizer_dir, given._mergeable_ranks, given._pat_str, given._special_tokens, name=given.name)
        report["tokenizer"] = {"pretrained": args.tokenizer}
    enc = load_tokenizer(tokenizer_dir)
    report["tokenizer"].update({"name": enc.name, "n_vocab": enc.n_vocab, "eot_token": enc.eot_token,
                                "pattern": enc._pat_str, "special_tokens": enc._special_tokens})
    return enc, tokenizer_dir


# -----------------------------------------------------------------------------
# The whole run
# -----------------------------------------------------------------------------

def prepare_fingerprint(args, flag_sources, extra_sources, eval_texts):
    """The stage fingerprint (data.stages.stage_fingerprint) of a data.prepare run: its flags, the
    contents of the corpora, evaluation files and tokenizer directory it reads, the Python version
    when the standard library is a corpus (its files change with it), and the texts and weights
    given through the Python hook (main's extra_sources and eval_texts)."""
    given = hashlib.sha256()
    for source in extra_sources:
        given.update(json.dumps([source.name, source.weight, source.kind]).encode())
        for doc in source.load(math.inf, args.seed, []):
            given.update(sources.utf8(doc.text) + b"\0")
    for text in eval_texts:
        given.update(b"eval\0" + sources.utf8(text) + b"\0")
    uses_stdlib = any(not source.path for source in flag_sources)
    identity = argparse.Namespace(**vars(args), python=sys.version if uses_stdlib else None,
                                  given_in_python=given.hexdigest())
    inputs = [source.path for source in flag_sources if source.path] + list(args.decontaminate)
    if args.classifier_reference not in ("none", "stdlib-topics"):
        inputs.append(args.classifier_reference)
    if os.path.isdir(args.tokenizer):
        inputs.append(args.tokenizer)
    return stage_fingerprint(identity, RUNTIME_FLAGS, inputs)


def prepare(args, extra_sources=(), eval_texts=()):
    """Run every stage; returns (meta, report), also written to args.out/meta.json and report.json.
    Skipped, returning the files already there, when args.out holds the output of this configuration."""
    check_args(args)
    log = Log(args.quiet)
    problems, report = [], {"config": {k: v for k, v in vars(args).items() if k not in ("rules", "language_list")}}
    if args.source:
        source_list = [sources.parse_source_flag(spec, args.text_field) for spec in args.source]
    else:
        source_list = sources.default_sources()
    # No resume point: the whole stage takes a minute, so an interrupted run is simply redone.
    extra_sources, eval_texts = list(extra_sources), list(eval_texts)  # read twice: fingerprint, then the run
    fingerprint = prepare_fingerprint(args, source_list, extra_sources, eval_texts)
    if finished_stage(args.out, "prepare", fingerprint, args.force):
        with open(os.path.join(args.out, "meta.json")) as f, open(os.path.join(args.out, "report.json")) as g:
            return json.load(f), json.load(g)
    source_list += list(extra_sources)
    if args.task_worksheets:
        # Worksheets of the train split's task problems (data/tasks.py), so the base model has seen
        # the questions SFT will teach it to answer; test-split problems never appear in them.
        worksheets = tasks.pretraining_texts(args.task_worksheets, seed=args.seed)
        source_list.append(sources.text_list_source("tasks", worksheets, args.task_weight))
    eval_texts = list(eval_texts)
    for path in args.decontaminate:
        eval_texts.extend(read_eval_texts(path, problems))

    ranks = stream.ranks_from_environment()
    log.quiet = args.quiet or ranks.rank != 0  # one rank's progress lines are everyone's
    workers = args.workers or min(os.cpu_count() or 1, 8)
    run = stream.StreamingRun(args, fingerprint, ranks, workers, log)
    store, documents = run.curate(source_list, eval_texts, problems, report)
    if not len(documents):
        raise DataError("no document survived curation (see the funnel above); add text with --source "
                        "or relax the filters (--rule, --ppl-band, --minhash-threshold)")
    if len(documents) < 2:
        raise DataError(TOO_FEW_DOCUMENTS.format(len(documents)))
    train_positions, val_positions = split_order(store.nbytes[documents], args.val_fraction, args.seed)
    train_docs = documents[np.asarray(train_positions, dtype=np.int64)]
    val_docs = documents[np.asarray(val_positions, dtype=np.int64)]
    report["split"] = {"train_documents": len(train_docs), "val_documents": len(val_docs)}

    out = args.out
    tokenizer_dir = os.path.join(out, "tokenizer")
    if ranks.rank == 0:
        begin_stage(out, "prepare", fingerprint, args.force)  # from here on the files in out change
        os.makedirs(out, exist_ok=True)
        for stale in glob.glob(os.path.join(out, "train_*.bin")) + glob.glob(os.path.join(out, "val_*.bin")):
            os.remove(stale)  # shards of an earlier, larger run would otherwise linger
        get_tokenizer(args, (store.text(i) for i in train_docs), out, log, report)
    ranks.barrier()
    enc = load_tokenizer(tokenizer_dir)

    chunks = {split: run.tokenize(store, ids, split, tokenizer_dir) for split, ids in (("train", train_docs),
                                                                                      ("val", val_docs))}
    log.timed(f"tokenise ({workers} process{'es' if workers > 1 else ''} x {ranks.world} rank"
              f"{'s' if ranks.world > 1 else ''})")
    if ranks.rank == 0:
        shards, tokens = {}, {}
        tokens_by_source = collections.Counter()
        for split, ids in (("train", train_docs), ("val", val_docs)):
            writer = ShardWriter(out, split, enc.n_vocab, args.shard_tokens)
            for document_ids, (flat, lengths) in zip(run.chunk_documents(store, ids), run.token_chunks(split, chunks[split])):
                writer.add(with_end_of_text(flat, lengths, enc.eot_token))
                for s, n in zip(store.source[document_ids].tolist(), lengths.tolist()):
                    tokens_by_source[s] += n
                if split == "val":
                    tokens["val_without_eot"] = tokens.get("val_without_eot", 0) + int(lengths.sum())
            shards[split], tokens[split] = writer.close()
        val_bytes = int(store.nbytes[val_docs].sum())
        meta = {"vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "tokenizer": "tokenizer",
                "train_shards": shards["train"], "val_shards": shards["val"], "train_tokens": int(tokens["train"]),
                "val_tokens": int(tokens["val"]), "val_bytes": val_bytes}
        log.timed("shards")
        every = np.concatenate([train_docs, val_docs])
        bytes_by_source = {store.source_names[s]: int(store.nbytes[every][store.source[every] == s].sum())
                           for s in np.unique(store.source[every])}
        _token_statistics(report, {store.source_names[s]: n for s, n in tokens_by_source.items()},
                          bytes_by_source, tokens.get("val_without_eot", 0), val_bytes)
        report["malformed"] = {"count": len(problems), "examples": problems[:100]}
        report["funnel"] = log.funnel
        report["timing_s"] = log.timing
        report["peak_memory_gb"] = log.peak_memory  # rank 0's main process after each stage (workers not included)
        report["throughput_mb_per_s"] = run.throughput
        report["meta"] = meta
        report["timing_s"]["total"] = round(time.time() - log.start, 2)
        _write_json(os.path.join(out, "report.json"), report)
        from data.report import plot_report

        plot_report(report, os.path.join(out, "report.png"))
        _write_json(os.path.join(out, "meta.json"), meta)
        finish_stage(out, "prepare", fingerprint, log.start,
                     {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "val_bytes")})
    ranks.barrier()  # every rank returns the files rank 0 wrote
    run.cleanup()
    with open(os.path.join(out, "meta.json")) as f, open(os.path.join(out, "report.json")) as g:
        return json.load(f), json.load(g)


def _token_statistics(report, tokens_by_source, bytes_by_source, val_tokens_without_eot, val_bytes):
    """Achieved token share of each source and the tokenizer's bytes per token."""
    total_tokens = max(sum(tokens_by_source.values()), 1)
    for name, entry in report["mixture"].items():
        entry["tokens"] = tokens_by_source.get(name, 0)
        entry["token_share"] = round(tokens_by_source.get(name, 0) / total_tokens, 4)
    report["tokenizer"]["bytes_per_token_by_source"] = {
        name: round(bytes_by_source[name] / max(tokens_by_source[name], 1), 3) for name in tokens_by_source}
    report["tokenizer"]["bytes_per_token_val"] = round(val_bytes / max(val_tokens_without_eot, 1), 3)


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _summary(meta, report):
    mixture = ", ".join(f"{name} {m['token_share']:.0%} (target {m['target_share']:.0%})"
                        for name, m in report["mixture"].items())
    return (f"wrote {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
            f"({len(meta['train_shards'])} + {len(meta['val_shards'])} shards), vocab {meta['vocab_size']}, "
            f"{report['tokenizer']['bytes_per_token_val']:.2f} bytes/token; mixture: {mixture}; "
            f"{report['malformed']['count']} malformed inputs; {report['timing_s']['total']:.0f}s")


def main(argv=None, extra_sources=(), eval_texts=()):
    args = build_parser().parse_args(argv)
    try:
        meta, report = prepare(args, extra_sources, eval_texts)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[prepare] {_summary(meta, report)} -> {args.out}")
    return meta


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        exit_torchrun_worker()  # a finished torchrun worker: skip the teardown that can abort (data/stages.py)
