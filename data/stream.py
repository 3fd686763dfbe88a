"""Streaming curation for data.prepare: the same stages over a stream of documents, in bounded
memory, on every core, on several ranks, resumable (seed Part 1, section 1.3: tokenisation at
scale is "a parallel preprocessing job" writing memory-mapped shards).

data/prepare.py's `curate_documents` holds every document in memory at once; it stays as the
reference that tests/test_data_stream.py compares this module against. Here the corpus is cut into
chunks of about `chunk_bytes` and every stage is a pass over the chunks:

    pass 0  index the user's files, each file — or each 32 MB piece of a larger JSONL file —
            read by one process of one rank: per document its size and where its record starts
            (file, byte, line); each source's pieces are taken until their sizes cover its budget
            (a corpus much larger than the run needs is not read whole)          (work/index/)
    pass 1  the sources' documents, in order, cut into chunks from the index alone; per chunk
            read its documents back from their offsets, normalise, language, quality rules and
            the exact-dedup hash; the surviving texts go to disk                (work/curated/)
    pass 2  perplexity: two cross-fitted models per source, fitted on a reference sample of
            1 MB, then every chunk scored; the percentile band needs one float a document
    pass 3  exact dedup: the first document of each 64-bit hash (8 bytes a document)
    pass 4  MinHash signatures and LSH band keys per chunk, on disk             (work/minhash/)
            per band, a stable argsort of all documents' keys puts every bucket's members next
            to each other (dedup.sorted_band_candidates): no dictionary of buckets; only the
            candidates' signature rows are read back for verification
    pass 4b (--substring-dedup) per chunk the hashes of every window of w pre-tokens; their first
            occurrences found one hash range at a time; per chunk the later copies cut out, and the
            texts written again                                                 (work/substring/)
    pass 5  decontamination per chunk
    then    the mixture and the split, computed from document sizes alone (sources.mix_positions,
            prepare.split_order); BPE on a --bpe-train-bytes sample; tokenisation per chunk of
            the final order (work/tokens_*), written to shards as they fill.

What stays in memory grows with the number of documents, not with their text: numbers per
document (the file index's sizes and offsets, 40 bytes; source, hash, perplexity, masks, positions:
~50) plus, one band at a time, 16 bytes a document for the sort. Text, signatures and tokens
are only ever held a chunk at a time. The quality classifier (off by default) is streamed too: its
training plan needs only each document's number of paragraph chunks, so just the few thousand
chunks it trains on are read back. So is the substring stage (off by default): in place of one suffix
array over the whole corpus, the hash of every window of w pre-tokens goes to disk, 8 bytes a token,
and the first occurrence of each is found one hash range at a time (pass 4b, `repeated_spans`).

Every pass writes one result file per chunk (atomically, its .json last), so:
  * resumable: a run interrupted in any pass skips the chunks already written (work/manifest.json
    records the fingerprint and chunk size it was started with);
  * processes: `--workers N` computes chunks in N forked processes;
  * ranks: under torchrun (WORLD_SIZE > 1, a gloo group) rank r computes the chunks c with
    c mod world = r into the shared --out directory; after each pass (a barrier) every rank reads
    all chunks' results, so near-duplicates are found across ranks from everyone's band keys and
    every rank takes the same decisions; rank 0 alone writes the tokenizer, shards and reports.
    Every rank cuts the same chunks from the shared index (and reads the small built-in sources
    itself), and curates only its own.
"""

import collections
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from data import curate, dedup, langid, perplexity, quality, sources
from data.errors import DataError
from data.hf_tokenizer import write_json
from data.report import read_json
from data.sources import KINDS, Document, decode, utf8
from data.tokenizer import pretokenize

WORK = "prepare_work"  # under --out; removed when the run finishes
# Peak working memory per byte of chunk text, measured on a 2 MB chunk of bench/prepare_scale.py's corpus
# (getrusage before/after one pass's chunk function): perplexity scoring 88 bytes (int64 n-gram keys
# and lookups per byte), MinHash 50, the filters 34. Chunks in flight = 2 per worker + 1 being read.
MEMORY_PER_CHUNK_BYTE = 100
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 10_000, 64_000_000
# Pass 0 reads a JSONL file larger than this in pieces of this size, one task each: a corpus of one
# 40 GB file is 1,250 tasks for the ranks' processes to share, each reading (at ~2 MB/s) for seconds.
PIECE_BYTES = 32_000_000
# Per-document numbers the main process keeps, measured (README, "At scale", session 15: its peak grew 137 bytes
# a document from 1 to 3 GB): the curated store's source, kind, hash, size and text/origin offsets (35 bytes),
# masks, and the exact-dedup, near-dedup and mixture stages' sorts of them. They must fit in the half of
# --max-memory that the chunks in flight leave.
BYTES_PER_DOCUMENT = 150
REPORT_SAMPLE = 100_000  # per-document lists in report.json (histograms) keep at most this many values


def chunk_bytes_for(max_memory, workers):
    """Text per chunk so that the chunks in flight use about half of --max-memory (the other
    half is for the per-document arrays, the perplexity models and the interpreter)."""
    in_flight = 2 * workers + 1
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, max_memory / 2 / (MEMORY_PER_CHUNK_BYTE * in_flight))))


# -----------------------------------------------------------------------------
# Ranks
# -----------------------------------------------------------------------------

@dataclasses.dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def ranks_from_environment():
    """Under torchrun (WORLD_SIZE > 1) join, or reuse, a gloo group; otherwise a single rank.
    torch is imported only then: a one-process run stays numpy-only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


# -----------------------------------------------------------------------------
# Chunk files: one per chunk and pass, written atomically, the .json last
# -----------------------------------------------------------------------------

def chunk_path(work, name, c):
    return os.path.join(work, name, f"{c:06d}")


def chunk_done(work, name, c):
    return os.path.exists(chunk_path(work, name, c) + ".json")


def save_chunk(work, name, c, arrays, info, blobs=None):
    """arrays → .npz, each blob (bytes) → .<key>, then info → .json, which marks the chunk done."""
    path = chunk_path(work, name, c)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for key, blob in (blobs or {}).items():
        with open(f"{path}.{key}.tmp{os.getpid()}", "wb") as f:
            f.write(blob)
        os.replace(f"{path}.{key}.tmp{os.getpid()}", f"{path}.{key}")
    np.savez(f"{path}.tmp{os.getpid()}.npz", **arrays)
    os.replace(f"{path}.tmp{os.getpid()}.npz", f"{path}.npz")
    write_json(f"{path}.json", info)


def load_info(work, name, c):
    with open(chunk_path(work, name, c) + ".json") as f:
        return json.load(f)


def load_arrays(work, name, c, keys=None):
    """The arrays of a chunk file (only those named in `keys`: an .npz member is read when asked for)."""
    with np.load(chunk_path(work, name, c) + ".npz") as arrays:
        return {key: arrays[key] for key in (keys or arrays.files)}


# -----------------------------------------------------------------------------
# Map a function over chunks: skip the finished ones, this rank's share, in worker processes
# -----------------------------------------------------------------------------

_STATE = {}  # what a pass's chunk function reads; forked workers inherit it


def _compute(task, state=None):
    """One chunk: function(state, payload), saved. A forked worker is given no state: it reads the
    _STATE it inherited."""
    function, work, name, c, payload = task
    arrays, info, blobs = function(_STATE if state is None else state, payload)
    save_chunk(work, name, c, arrays, info, blobs)
    return info["bytes"]


def map_chunks(run, name, function, tasks, state):
    """For every (c, payload) of `tasks` that is this rank's (c mod world = rank) and not yet done,
    function(state, payload) → (arrays, info with "bytes", blobs) saved as chunk c of pass `name`.
    At most two chunks per worker are in flight, so reading never runs ahead of the memory bound.
    Returns the pass's throughput in MB/s over the chunks computed here (None if none were)."""
    global _STATE
    start, computed = time.time(), 0
    mine = ((c, payload) for c, payload in tasks
            if c % run.ranks.world == run.ranks.rank and not chunk_done(run.work, name, c))
    pool = None
    if run.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        try:  # fork: workers inherit _STATE (models, masks) without pickling it
            _STATE = state  # before the fork; the serial path below passes `state` itself
            pool = multiprocessing.get_context("fork").Pool(run.workers)
        except (OSError, RuntimeError, ImportError) as e:
            print(f"[prepare] multiprocessing unavailable ({type(e).__name__}: {e}); one process", file=sys.stderr)
    if pool is None:
        for c, payload in mine:
            computed += _compute((function, run.work, name, c, payload), state)
    else:
        with pool:
            pending = collections.deque()
            for c, payload in mine:
                pending.append(pool.apply_async(_compute, ((function, run.work, name, c, payload),)))
                while len(pending) >= 2 * run.workers:
                    computed += pending.popleft().get()
            while pending:
                computed += pending.popleft().get()
        _STATE = {}
    run.ranks.barrier()
    seconds = time.time() - start
    return round(computed / 1e6 / seconds, 2) if computed else None


# -----------------------------------------------------------------------------
# Pass 0: an index of the user's files, each file read by one rank
# -----------------------------------------------------------------------------

def input_files(source_list):
    """The pieces of the user corpora's files (sources with a path), in reading order, as (source
    index, path, start, end) byte ranges, and per source the problems of listing them (unsupported
    extensions). A JSONL file larger than PIECE_BYTES is cut into pieces of that size — each holds
    the records that start inside it — so that one large file is still read by every process of
    every rank; any other file is one piece (it is one document). The built-in and in-memory
    sources have no files: they are small, and every rank reads them in pass 1's plan."""
    pieces, listing = [], [[] for _ in source_list]
    for s, source in enumerate(source_list):
        for path in sources.corpus_files(source.path, listing[s]) if source.path else []:
            try:
                size = os.path.getsize(path)
            except OSError:  # unreadable: indexing it reports the problem
                size = 0
            if size > PIECE_BYTES and path.lower().endswith(sources.JSONL_EXTENSIONS):
                pieces += [(s, path, a, min(a + PIECE_BYTES, size)) for a in range(0, size, PIECE_BYTES)]
            else:
                pieces.append((s, path, 0, size))
    return pieces, listing


def count_lines(state, piece):
    """How many lines start in a piece: with those of the pieces before it, the line number its first
    record has (pass 0 counts them first, so every piece's reports say file:line)."""
    _, path, start, end = piece
    return {}, {"bytes": end - start, "lines": sources.lines_starting_in(path, start, end)}, None


def index_file(state, payload):
    """Pass 0 on one piece of a file (usually the whole file): per document its size in characters
    (chunks are cut by these) and in UTF-8 bytes (a source's budget counts these), where its record
    starts (byte offset, line), and how many of the piece's problems came before it."""
    (s, path, start, end), first_line = payload
    source = state["sources"][s]
    problems, columns = [], {"chars": [], "bytes": [], "offset": [], "line": [], "problems_before": []}
    offset = sources.first_record_at(path, start)
    located = (sources.located_documents(path, source.text_field, source.name, source.kind, problems, offset,
                                         first_line, end) if offset is not None else ())
    for doc, offset, line in located:
        for key, value in (("chars", len(doc.text)), ("bytes", len(utf8(doc.text))), ("offset", offset),
                           ("line", line), ("problems_before", len(problems))):
            columns[key].append(value)
    arrays = {key: np.array(v, dtype=np.int64) for key, v in columns.items()}
    return arrays, {"problems": problems, "bytes": end - start}, None


class FileIndex:
    """Pass 0's results: which pieces are indexed, and what each holds. `documents` replays how
    sources.take_until reads a user corpus up to its budget, from the index alone."""

    def __init__(self, work, pieces, listing):
        self.work, self.pieces, self.listing = work, pieces, listing
        self.indexed, self.problems, self.lines = set(), {}, {}  # a piece's arrays stay on disk until read
        self.ordinals = [[c for c, piece in enumerate(pieces) if piece[0] == s] for s in range(len(listing))]
        # Per source, over its pieces indexed so far (they are indexed in order): the documents'
        # UTF-8 bytes, and the size of the last document.
        self.text_bytes, self.last_size = [0] * len(listing), [0] * len(listing)
        self.records = 0  # documents indexed, over all sources

    def first_line(self, c):
        """The line number of piece c's first record: 1 + the lines of the file's pieces before it."""
        path, lines = self.pieces[c][1], 1
        while c > 0 and self.pieces[c - 1][1] == path:
            c -= 1
            lines += self.lines[c]
        return lines

    def load(self, c):
        part = load_arrays(self.work, "index", c, ["bytes"])
        self.indexed.add(c)
        self.records += len(part["bytes"])
        self.problems[c] = load_info(self.work, "index", c)["problems"]
        s = self.pieces[c][0]
        self.text_bytes[s] += int(part["bytes"].sum())
        if len(part["bytes"]):
            self.last_size[s] = int(part["bytes"][-1])

    def reaches(self, s, budget):
        """Whether the indexed pieces of source s hold the document at which its reading stops: one
        whose preceding documents' bytes reach the budget (take_until reads it, then stops)."""
        return self.text_bytes[s] > 0 and self.text_bytes[s] - self.last_size[s] >= budget

    def documents(self, s, budget, problems):
        """(piece ordinal, k, characters, offset, line) of each document that reading source s up to
        `budget` bytes yields, in order; what the reader meets on the way goes to `problems`, in order."""
        problems.extend(self.listing[s])
        total = 0
        for c in self.ordinals[s]:
            part, reported = load_arrays(self.work, "index", c), 0
            for k in range(len(part["bytes"])):
                problems.extend(self.problems[c][reported:part["problems_before"][k]])
                reported = part["problems_before"][k]
                if total >= budget:
                    return
                yield c, k, int(part["chars"][k]), int(part["offset"][k]), int(part["line"][k])
                total += int(part["bytes"][k])
            problems.extend(self.problems[c][reported:])


def next_round(index, s, cursor, budget, width):
    """The pieces of source s that the next round of pass 0 indexes: from `cursor` on, enough that
    their sizes on disk cover what the budget still needs (a file's text is rarely larger than
    the file), and at least `width`, one per process."""
    ordinals, need, taken = index.ordinals[s], budget - index.text_bytes[s], []
    for c in ordinals[cursor:]:
        if len(taken) >= width and need < 0:
            break
        taken.append(c)
        _, _, start, end = index.pieces[c]
        need -= end - start
    return taken


def check_document_memory(documents, max_memory):
    """One clear error after pass 0, before hours of work, when the per-document numbers of this
    many documents would not fit in half of --max-memory, rather than running out of memory later."""
    need = documents * BYTES_PER_DOCUMENT
    if need > max_memory / 2:
        raise DataError(f"--max-memory {max_memory:g}: the {documents:,} documents indexed keep ~{need / 1e9:.2f} GB "
                        f"of per-document numbers in memory ({BYTES_PER_DOCUMENT} bytes each), more than half the "
                        f"bound; pass --max-memory {2 * need:.2g} or more")


def index_input_files(run, source_list):
    """Pass 0, in rounds: each round indexes, for every source whose reading does not yet stop inside
    its indexed pieces, its next pieces — as many as its budget still needs by their size on disk
    (piece c on rank c mod world). Usually one round; a corpus far larger than the run needs is not
    read whole. The pieces of a file cut in several first count their lines, so that each knows the
    number of its first line."""
    pieces, listing = input_files(source_list)
    index = FileIndex(run.work, pieces, listing)
    cut = {path for _, path, start, _ in pieces if start > 0}
    budgets = sources.read_budgets(source_list, run.args.max_bytes, run.args.overread)
    width, cursor = run.ranks.world * run.workers, [0] * len(source_list)
    start, mine = time.time(), 0
    while True:
        batch = []
        for s in range(len(source_list)):
            if cursor[s] < len(index.ordinals[s]) and not (cursor[s] and index.reaches(s, budgets[s])):
                taken = next_round(index, s, cursor[s], budgets[s], width)
                batch += taken
                cursor[s] += len(taken)
        if not batch:
            break
        counted = [c for c in batch if pieces[c][1] in cut]
        map_chunks(run, "lines", count_lines, ((c, pieces[c]) for c in counted), {})
        index.lines.update((c, load_info(run.work, "lines", c)["lines"]) for c in counted)
        map_chunks(run, "index", index_file, ((c, (pieces[c], index.first_line(c))) for c in batch),
                   {"sources": source_list})
        for c in batch:
            index.load(c)
            mine += pieces[c][3] - pieces[c][2] if c % run.ranks.world == run.ranks.rank else 0
    seconds = time.time() - start
    run.throughput["index"] = round(mine / 1e6 / seconds, 2) if pieces and seconds > 0 else None
    return index


# -----------------------------------------------------------------------------
# Pass 1: read, normalise, language, quality; the survivors go to disk
# -----------------------------------------------------------------------------

def document_chunks(source_list, args, problems, chunk_bytes, counter, index):
    """(c, items) chunks of the sources' stream, each source read up to its share of max_bytes ×
    overread (as prepare.load_sources), cut every chunk_bytes characters. An item is a Document
    (built-in and in-memory sources, read here) or a segment (file ordinal, first, end, offset,
    line) of a user file's documents first…end−1 from the index, read by whoever curates the
    chunk (`chunk_documents`). counter["chunks"] ends as the number of chunks."""
    chunk, size, counter["chunks"] = [], 0, 0
    budgets = sources.read_budgets(source_list, args.max_bytes, args.overread)
    for s, (source, budget) in enumerate(zip(source_list, budgets)):
        if source.path:
            entries = index.documents(s, budget, problems)
        else:
            entries = ((doc, len(doc.text)) for doc in source.documents(budget, args.seed, problems))
        for entry in entries:
            if source.path:
                c, k, chars, offset, line = entry
                if chunk and isinstance(chunk[-1], list) and chunk[-1][0] == c and chunk[-1][2] == k:
                    chunk[-1][2] = k + 1  # the next document of the same file: the segment grows
                else:
                    chunk.append([c, k, k + 1, offset, line])
            else:
                doc, chars = entry
                chunk.append(doc)
            size += chars
            if size >= chunk_bytes:
                yield counter["chunks"], chunk
                counter["chunks"] += 1
                chunk, size = [], 0
    if chunk:
        yield counter["chunks"], chunk
        counter["chunks"] += 1


def chunk_documents(state, items):
    """The Documents of a pass-1 chunk: its segments read from their files, from the recorded offsets
    (their problems were recorded by pass 0)."""
    documents = []
    for item in items:
        if isinstance(item, Document):
            documents.append(item)
            continue
        c, first, end, offset, line = item
        s, path = state["pieces"][c][:2]
        source = state["sources"][s]
        located = sources.located_documents(path, source.text_field, source.name, source.kind, [], offset, line)
        documents += [doc for doc, _, _ in itertools.islice(located, end - first)]
    return documents


def _counts(documents):
    by_source = {}
    for doc in documents:
        entry = by_source.setdefault(doc.source, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(utf8(doc.text))
    return by_source


def curate_chunk(state, items):
    """Pass 1 on one chunk: the per-document filters of prepare.curate_documents, in its order."""
    args, names = state["args"], state["source_names"]
    documents = chunk_documents(state, items)
    funnel = {"loaded": _counts(documents)}
    kept, normalise_stats = curate.normalise_documents(documents, args.max_whitespace_run, args.max_doc_chars)
    funnel["normalised"] = _counts(kept)
    info = {"normalise": normalise_stats}
    if args.language_list:
        kept, _, info["language"] = langid.language_filter(kept, args.language_list, state["identifier"])
        funnel["language"] = _counts(kept)
    kept, _, info["quality"] = curate.quality_filter(kept, *args.rules)
    funnel["quality"] = _counts(kept)
    texts = [utf8(d.text) for d in kept]
    origins = [utf8(d.origin) for d in kept]
    arrays = {"offsets": np.cumsum([0] + [len(t) for t in texts]).astype(np.int64),
              "origin_offsets": np.cumsum([0] + [len(o) for o in origins]).astype(np.int64),
              "source": np.array([names.index(d.source) for d in kept], dtype=np.int16),
              "kind": np.array([KINDS.index(d.kind) for d in kept], dtype=np.int8),
              "hash": np.array([curate.exact_hash(d.text) for d in kept], dtype=np.uint64)}
    info.update(funnel=funnel, bytes=sum(e["bytes"] for e in funnel["loaded"].values()))
    return arrays, info, {"text": b"".join(texts), "origins": b"".join(origins)}


class CuratedStore:
    """The documents that survived pass 1, on disk: chunk c's texts in curated/<c>.text, read back
    with os.pread. In memory only per-document numbers: source, kind, hash, UTF-8 size."""

    def __init__(self, work, n_chunks, source_names):
        self.work, self.n_chunks, self.source_names = work, n_chunks, source_names
        parts = [load_arrays(work, "curated", c) for c in range(n_chunks)]
        self.offsets = [p["offsets"] for p in parts]
        self.origin_offsets = [p["origin_offsets"] for p in parts]
        counts = [len(p["source"]) for p in parts]
        self.chunk_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.source = np.concatenate([p["source"] for p in parts] + [np.zeros(0, np.int16)])
        self.kind = np.concatenate([p["kind"] for p in parts] + [np.zeros(0, np.int8)])
        self.hash = np.concatenate([p["hash"] for p in parts] + [np.zeros(0, np.uint64)])
        self.nbytes = np.concatenate([np.diff(o) for o in self.offsets] + [np.zeros(0, np.int64)])
        self.text_pass = "curated"  # the pass whose chunk files hold the current texts

    def use_texts_of(self, name):
        """Read the texts from pass `name`'s chunk files from now on (the substring stage rewrites
        each chunk's texts, cut): their offsets and UTF-8 sizes replace the curated ones."""
        self.offsets = [load_arrays(self.work, name, c, ["offsets"])["offsets"] for c in range(self.n_chunks)]
        self.nbytes = np.concatenate([np.diff(o) for o in self.offsets] + [np.zeros(0, np.int64)])
        self.text_pass = name

    def __len__(self):
        return len(self.source)

    def chunk_of(self, i):
        return int(np.searchsorted(self.chunk_start, i, side="right") - 1)

    def chunk_texts(self, c):
        """All texts of chunk c (a list), in one read."""
        with open(chunk_path(self.work, self.text_pass, c) + ".text", "rb") as f:
            blob = f.read()
        offsets = self.offsets[c]
        return [decode(blob[offsets[k]:offsets[k + 1]]) for k in range(len(offsets) - 1)]

    def _read(self, i, kind, offsets):
        c = self.chunk_of(i)
        k = i - self.chunk_start[c]
        name = self.text_pass if kind == "text" else "curated"
        fd = os.open(chunk_path(self.work, name, c) + f".{kind}", os.O_RDONLY)
        try:
            return decode(os.pread(fd, int(offsets[c][k + 1] - offsets[c][k]), int(offsets[c][k])))
        finally:
            os.close(fd)

    def text(self, i):
        return self._read(int(i), "text", self.offsets)

    def origin(self, i):
        return self._read(int(i), "origins", self.origin_offsets)

    def document(self, i):
        return Document(self.text(i), self.source_names[self.source[i]], self.origin(i), KINDS[self.kind[i]])


def _merge_counts(total, part):
    for source, entry in part.items():
        into = total.setdefault(source, {"documents": 0, "bytes": 0})
        into["documents"] += entry["documents"]
        into["bytes"] += entry["bytes"]


def merge_pass1_reports(infos):
    """The report sections of pass 1, summed over chunks in chunk order (so "first example" stays first)."""
    funnel, normalise = {}, curate.NormaliseStats()
    language = {"labelled": 0, "by_language": {}, "removed": 0, "examples": {}, "seconds": 0.0}
    quality_report = {"removed_by_rule": {}, "flagged_by_rule": {}, "examples": {}}
    for info in infos:
        for stage, counts in info["funnel"].items():
            _merge_counts(funnel.setdefault(stage, {}), counts)
        normalise.add(curate.NormaliseStats(**info["normalise"]))
        if "language" in info:
            part = info["language"]
            language["languages"] = part["languages"]
            language["labelled"] += part["labelled"]
            language["removed"] += part["removed"]
            language["seconds"] += part["labelled"] / max(part["documents_per_second"], 1e-9)
            for lang, n in part["by_language"].items():
                language["by_language"][lang] = language["by_language"].get(lang, 0) + n
            for lang, origins in part["examples"].items():
                language["examples"][lang] = (language["examples"].get(lang, []) + origins)[:3]
        for key in ("removed_by_rule", "flagged_by_rule"):
            for rule, n in info["quality"][key].items():
                quality_report[key][rule] = quality_report[key].get(rule, 0) + n
        for rule, origin in info["quality"]["examples"].items():
            quality_report["examples"].setdefault(rule, origin)
    language["documents_per_second"] = round(language["labelled"] / max(language.pop("seconds"), 1e-9), 1)
    language = {k: language[k] for k in ("languages", "labelled", "by_language", "removed", "examples",
                                         "documents_per_second") if k in language}
    return funnel, dataclasses.asdict(normalise), language, quality_report


# -----------------------------------------------------------------------------
# Pass 2: perplexity
# -----------------------------------------------------------------------------

def fit_perplexity_models(store, order, seed):
    """perplexity.cross_fitted_perplexities' two models per source, fitted on the same reference
    documents: source s's documents are split by a seeded permutation into folds 0 and 1 and a
    model is fitted on the first REFERENCE_BYTES/2 characters of each fold. Returns (fold of every
    document, −1 where unscored; {source id: (model of fold 0, model of fold 1)}; skipped sources)."""
    fold = np.full(len(store), -1, dtype=np.int8)
    models, skipped = {}, {}
    for s, name in enumerate(store.source_names):
        members = np.flatnonzero(store.source == s)
        if not len(members):
            continue
        if KINDS[store.kind[members[0]]] == "curated":
            skipped[name] = {"skipped": "curated source"}
            continue
        if len(members) < perplexity.MIN_DOCUMENTS:
            skipped[name] = {"skipped": f"fewer than {perplexity.MIN_DOCUMENTS} documents"}
            continue
        half = np.random.default_rng(seed).permutation(len(members)) % 2
        fold[members] = half
        pair = []
        for f in (0, 1):
            reference, total = [], 0
            for i in np.flatnonzero(half == f):
                if total >= perplexity.REFERENCE_BYTES / 2:
                    break
                reference.append(store.text(members[i])[:perplexity.MAX_BYTES_PER_TEXT])
                total += len(reference[-1])
            pair.append(perplexity.WittenBellLM(order).fit(reference))
        models[s] = tuple(pair)
    return fold, models, skipped


def score_chunk(state, c):
    """Perplexity of chunk c's scored documents, each under the model of the *other* fold."""
    store, fold, models = state["store"], state["fold"], state["models"]
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    texts = store.chunk_texts(c)
    ppl = np.full(len(texts), np.nan)
    for s, (model_0, model_1) in models.items():
        for f, model in ((0, model_1), (1, model_0)):
            local = np.flatnonzero((store.source[first:last] == s) & (fold[first:last] == f))
            if len(local):
                ppl[local] = model.perplexities([texts[i] for i in local], perplexity.MAX_BYTES_PER_TEXT)
    return {"ppl": ppl}, {"bytes": int(store.nbytes[first:last].sum())}, None


def _sample(values, limit=REPORT_SAMPLE):
    values = np.asarray(values)
    if len(values) > limit:
        values = values[np.linspace(0, len(values) - 1, limit).astype(np.int64)]
    return values.round(4).tolist()


def perplexity_band(store, ppl, models, band):
    """perplexity.perplexity_band_filter's decision from the scores: keep mask and report per source."""
    keep, info = np.ones(len(store), dtype=bool), {}
    for s in models:
        members = np.flatnonzero(store.source == s)
        log_ppl = np.log10(ppl[members])
        low, high = np.percentile(log_ppl, band)
        too_low, too_high = log_ppl < low, log_ppl > high
        keep[members[too_low | too_high]] = False
        ranked = np.argsort(log_ppl)
        info[store.source_names[s]] = {
            "log10_perplexity": _sample(log_ppl), "cut_low": float(low), "cut_high": float(high),
            "removed_low": int(too_low.sum()), "removed_high": int(too_high.sum()),
            "lowest": [store.origin(members[i]) for i in ranked[:3]],
            "highest": [store.origin(members[i]) for i in ranked[::-1][:3]]}
    return keep, info


# -----------------------------------------------------------------------------
# Pass 4: MinHash signatures and band keys
# -----------------------------------------------------------------------------

def classifier_chunk(state, c):
    """The quality classifier's two passes over chunk c's alive prose documents. Before training: for
    each, whether it may be a negative (it overlaps no evaluation text) and its number of paragraph
    chunks. After (state["classifier"] set): its score P(good)."""
    store, prose = state["store"], state["prose"]
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    local = np.flatnonzero(prose[first:last])
    texts = store.chunk_texts(c)
    texts = [texts[k] for k in local]
    size = {"bytes": int(store.nbytes[first:last][local].sum())}
    if "classifier" in state:
        return {"score": state["classifier"].predict_proba(texts)}, size, None
    index = state["index"]
    return ({"clean": np.array([not index.contaminated(t) for t in texts], dtype=bool),
             "chunks": np.array([len(quality.paragraph_chunks(t)) for t in texts], dtype=np.int64)}, size, None)


def streamed_classifier(run, store, alive, n_chunks, eval_texts, problems):
    """quality.classifier_filter's decision from the chunk files: the training plan from per-document
    counts (quality.training_plan), the chosen training chunks read back from their documents alone,
    then every prose document scored chunk by chunk. Returns (keep mask, report)."""
    args = run.args
    positives = quality.reference_texts(args.classifier_reference, args.seed, problems)
    prose = alive & (store.kind == KINDS.index("prose"))
    members = np.flatnonzero(prose)
    state = {"store": store, "prose": prose, "index": curate.ContaminationIndex(eval_texts)}
    map_chunks(run, "classifier_plan", classifier_chunk, ((c, c) for c in range(n_chunks)), state)
    plan = [load_arrays(run.work, "classifier_plan", c) for c in range(n_chunks)]
    clean = np.concatenate([p["clean"] for p in plan] + [np.zeros(0, bool)])
    chunk_counts = np.concatenate([p["chunks"] for p in plan] + [np.zeros(0, np.int64)])
    reference_hashes = np.array(sorted({curate.exact_hash(t) for t in positives}), dtype=np.uint64)
    negative = clean & ~np.isin(store.hash[members], reference_hashes)
    negatives = members[negative]
    quality.check_negatives(len(negatives), args.classifier_reference)
    pos_chunks = [quality.paragraph_chunks(t) for t in positives]
    parts = quality.training_plan([len(c) for c in pos_chunks], chunk_counts[negative], args.seed)
    neg_chunks = {d: quality.paragraph_chunks(store.text(int(negatives[d])))  # only the planned documents
                  for d in np.unique(np.concatenate([parts[2][0], parts[3][0]])).tolist()}
    classifier, report = quality.fit_classifier(quality.planned_examples(parts, pos_chunks, neg_chunks), args.seed,
                                                args.classifier_epochs, char_ngrams=args.classifier_char_ngrams)
    start = time.time()
    run.throughput["classifier"] = map_chunks(run, "classifier_score", classifier_chunk,
                                              ((c, c) for c in range(n_chunks)), {**state, "classifier": classifier})
    scores = np.concatenate([load_arrays(run.work, "classifier_score", c)["score"] for c in range(n_chunks)]
                            + [np.zeros(0)])
    cut = quality.score_cut(scores, args.classifier_threshold, args.classifier_keep_fraction)
    quality.filter_report(report, scores, cut, lambda i: store.origin(int(members[i])), time.time() - start,
                          reference=args.classifier_reference, reference_documents=len(positives),
                          negative_documents=len(negatives), keep_fraction=args.classifier_keep_fraction)
    report["scores"] = _sample(scores)
    keep = np.ones(len(store), dtype=bool)
    keep[members[scores < cut]] = False
    return keep, report


def sign_chunk(state, c):
    """Signatures (rows: chunk c's alive documents, a raw .signatures file read by memory map) and
    their LSH band keys (.npz)."""
    store, alive, args = state["store"], state["alive"], state["args"]
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    texts = store.chunk_texts(c)
    local = np.flatnonzero(alive[first:last])
    shingles = [dedup.shingle_hashes(texts[i], args.shingle_words) for i in local]
    signatures = (dedup.minhash_signatures(shingles, args.num_perm, args.seed) if shingles
                  else np.zeros((0, args.num_perm), dtype=np.uint64))
    keys = dedup.band_keys(signatures, state["bands"], state["rows"])
    return ({"keys": keys}, {"bytes": int(store.nbytes[first:last][local].sum())},
            {"signatures": np.ascontiguousarray(signatures, dtype=np.uint64).tobytes()})


# Near-dedup's memory does not follow the number of documents: one band's keys are sorted one key
# range at a time, and candidate pairs are verified a block at a time, each row read from its chunk's
# signature file by memory map (one chunk mapped at once, so only the rows asked for are read).
BAND_SORT_BYTES_PER_KEY = 40  # key, position, the argsort's order, the sorted copy, the run mask
PAIR_BLOCK = 8192  # candidate pairs verified at once: 2 × num_perm × 8 bytes each (16 MB at 128)


def band_partitions(n, max_memory):
    """P, a power of two: the key ranges one band's n keys are sorted in, each within 1/8 of --max-memory."""
    share, partitions = max(max_memory / 8, 1), 1
    while n * BAND_SORT_BYTES_PER_KEY / partitions > share:
        partitions *= 2
    return partitions


def alive_chunk_starts(store, alive):
    """first[c]: the near-dedup position of chunk c's first alive document (positions count alive documents)."""
    per_chunk = [int(alive[store.chunk_start[c]:store.chunk_start[c + 1]].sum()) for c in range(store.n_chunks)]
    return np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64)


def band_candidates(run, first, band, partitions):
    """dedup.sorted_band_candidates over every alive document's key in one band, as positions,
    sorting the keys whose top log2(P) bits are p for each p in turn (equal keys share a range).
    With P > 1 each chunk's keys are read P times a band: disk reads traded for a bounded sort."""
    shift = np.uint64(64 - int(math.log2(partitions))) if partitions > 1 else None
    found = [np.zeros((0, 2), dtype=np.int64)]
    for p in range(partitions):
        keys, positions = [], []
        for c in range(len(first) - 1):
            column = load_arrays(run.work, "minhash", c, ["keys"])["keys"][:, band]
            local = np.arange(len(column)) if shift is None else np.flatnonzero((column >> shift) == p)
            keys.append(column[local])
            positions.append(first[c] + local)
        keys = np.concatenate(keys + [np.zeros(0, np.uint64)])
        positions = np.concatenate(positions + [np.zeros(0, np.int64)])
        found.append(positions[dedup.sorted_band_candidates(keys)])  # positions rise, so i < j stays
    return np.concatenate(found)


def signature_rows(run, first, positions):
    """Signature rows of the given near-dedup positions, in their order, one chunk's file mapped at
    a time: only these rows are read and kept."""
    positions = np.asarray(positions, dtype=np.int64)
    rows = np.zeros((len(positions), run.args.num_perm), dtype=np.uint64)
    owner = np.searchsorted(first, positions, side="right") - 1
    for c in np.unique(owner).tolist():
        mapped = np.memmap(chunk_path(run.work, "minhash", c) + ".signatures", dtype=np.uint64, mode="r",
                           shape=(int(first[c + 1] - first[c]), run.args.num_perm))
        these = np.flatnonzero(owner == c)
        rows[these] = mapped[positions[these] - first[c]]
        del mapped  # unmapped: the pages read leave this process's resident memory
    return rows


def pair_similarities(run, first, pairs):
    """The fraction of equal signature rows of each pair (the MinHash estimate of its Jaccard), PAIR_BLOCK pairs at a time."""
    similarities = np.zeros(len(pairs))
    for start in range(0, len(pairs), PAIR_BLOCK):
        rows = signature_rows(run, first, pairs[start:start + PAIR_BLOCK].ravel())
        similarities[start:start + PAIR_BLOCK] = np.mean(rows[0::2] == rows[1::2], axis=1)
    return similarities


def near_duplicates(run, store, alive):
    """dedup.near_dedup's decision from the chunk files: drop mask (over all documents) and report."""
    args = run.args
    index = np.flatnonzero(alive)  # near-dedup position p is document index[p]
    n = len(index)
    first = alive_chunk_starts(store, alive)
    bands, rows = dedup.optimal_bands_rows(args.minhash_threshold, args.num_perm, *dedup.LSH_WEIGHTS)
    partitions = band_partitions(n, args.max_memory)
    pairs = dedup.unique_pairs([], max(n, 1))
    for band in range(bands):  # merged band by band: memory follows the distinct pairs, not 14 bands' copies
        pairs = dedup.unique_pairs([pairs, band_candidates(run, first, band, partitions)], max(n, 1))
    rng = np.random.default_rng(args.seed)
    random_pairs = rng.integers(0, n, size=(min(2000, n * (n - 1) // 2), 2)) if n > 1 else np.zeros((0, 2), int)
    random_pairs = random_pairs[random_pairs[:, 0] != random_pairs[:, 1]]
    similarities = pair_similarities(run, first, pairs)
    random_similarities = pair_similarities(run, first, random_pairs)
    clusters = dedup.clusters_of_pairs(pairs[similarities >= args.minhash_threshold])
    drop = np.zeros(len(store), dtype=bool)
    for members in clusters:
        drop[index[members[1:]]] = True
    clusters.sort(key=len, reverse=True)
    info = {"threshold": args.minhash_threshold, "num_perm": args.num_perm, "ngram": args.shingle_words,
            "bands": bands, "rows": rows, "band_sort_partitions": partitions, "candidate_pairs": len(similarities),
            "duplicate_pairs": int(np.sum(similarities >= args.minhash_threshold)),
            "clusters": len(clusters), "removed": int(drop.sum()),
            "largest_clusters": [[store.origin(index[i]) for i in members[:5]]
                                 + ([f"... {len(members) - 5} more"] if len(members) > 5 else [])
                                 for members in clusters[:5]],
            "candidate_similarities": _sample(similarities),
            "random_pair_similarities": random_similarities.round(4).tolist()}
    return drop, info


# -----------------------------------------------------------------------------
# Pass 4b (--substring-dedup): repeated spans by window hashes, in bounded memory
# -----------------------------------------------------------------------------
# dedup.substring_dedup builds one suffix array over the whole corpus. Here the same decision comes
# from hashes (dedup.span_window_hashes): each chunk writes the hash of every window of w pre-tokens
# of its documents; the first occurrence of each hash is found one hash range at a time (the windows
# are 8 bytes each on disk, and a range holds a 1/P share of them); each chunk then cuts its own
# documents' later copies and writes its texts again, which later passes read.

SUBSTRING_BYTES_PER_WINDOW = 40  # in memory while a hash range is sorted: key, position, the sort's copies


def window_chunk(state, c):
    """The window hashes of chunk c's alive documents, one document after another."""
    store, alive, w = state["store"], state["alive"], state["min_tokens"]
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    texts = store.chunk_texts(c)
    local = np.flatnonzero(alive[first:last])
    keys = [dedup.span_window_hashes(dedup.word_hashes(pretokenize(texts[k])), w) for k in local]
    keys = np.concatenate(keys + [np.zeros(0, np.uint64)])
    return {"keys": keys}, {"bytes": int(store.nbytes[first:last][local].sum()), "windows": len(keys)}, None


def substring_partitions(total_windows, max_memory):
    """P, a power of two: the hash ranges the windows are sorted in, each within a quarter of --max-memory."""
    share = max(max_memory / 4, 1)
    partitions = 1
    while total_windows * SUBSTRING_BYTES_PER_WINDOW / partitions > share:
        partitions *= 2
    return partitions


def mark_later_windows(run, starts, partitions, path):
    """marks[g] = 1 where window g (counted over all chunks, in order; chunk c's start at starts[c])
    repeats an earlier window: per hash range q (the top log2 P bits of the hash), the range's keys of
    every chunk, in order, then dedup.later_occurrences. Written once (by rank 0) to a uint8 array on
    disk at `path`."""
    n_chunks = len(starts) - 1
    if run.ranks.rank == 0 and not os.path.exists(path):
        temporary = f"{path}.tmp{os.getpid()}.npy"
        marks = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(max(int(starts[-1]), 1),))
        shift = np.uint64(64 - partitions.bit_length() + 1)
        for q in range(partitions):
            keys, where = [], []
            for c in range(n_chunks):
                chunk_keys = load_arrays(run.work, "substring_windows", c, ["keys"])["keys"]
                inside = np.flatnonzero(chunk_keys >> shift == q) if partitions > 1 else np.arange(len(chunk_keys))
                keys.append(chunk_keys[inside])
                where.append(starts[c] + inside)
            keys = np.concatenate(keys + [np.zeros(0, np.uint64)])
            where = np.concatenate(where + [np.zeros(0, np.int64)])
            marks[where[dedup.later_occurrences(keys)]] = 1
        marks.flush()
        del marks
        os.replace(temporary, path)
    run.ranks.barrier()


def cut_chunk(state, c):
    """Chunk c's texts again, every token inside a marked window of an alive document cut out."""
    store, alive, w = state["store"], state["alive"], state["min_tokens"]
    marks = np.load(state["marks"], mmap_mode="r")
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    position = int(state["window_starts"][c])
    texts, counts, changed, emptied = [], collections.Counter(), [], []
    for k, text in enumerate(store.chunk_texts(c)):
        if alive[first + k]:
            tokens = pretokenize(text)
            n_windows = max(len(tokens) - w + 1, 0)
            cut = dedup.tokens_in_marked_windows(marks[position:position + n_windows], len(tokens), w)
            position += n_windows
            counts["tokens"] += len(tokens)
            counts["removed_tokens"] += int(cut.sum())
            if cut.any():
                kept = "".join(token for token, drop in zip(tokens, cut) if not drop)
                counts["removed_bytes"] += len(utf8(text)) - len(utf8(kept))
                changed.append(k)
                text = kept
            if not text.strip():  # dropped, as dedup.substring_dedup drops it
                emptied.append(k)
        texts.append(utf8(text))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int64)
    info = {"bytes": int(offsets[-1]), **counts, "changed": len(changed),
            "examples": [int(first + k) for k in changed[:5]]}
    return ({"offsets": offsets, "emptied": np.asarray(emptied, dtype=np.int64) + first}, info,
            {"text": b"".join(texts)})


def repeated_spans(run, store, alive, n_chunks):
    """dedup.substring_dedup's decision from the chunk files: the documents left empty (a mask over
    all documents) and the report; the store reads the cut texts from then on."""
    args, w = run.args, run.args.substring_min_tokens
    state = {"store": store, "alive": alive, "min_tokens": w}
    run.throughput["substring_windows"] = map_chunks(run, "substring_windows", window_chunk,
                                                     ((c, c) for c in range(n_chunks)), state)
    counts = [load_info(run.work, "substring_windows", c)["windows"] for c in range(n_chunks)]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    partitions = substring_partitions(int(starts[-1]), args.max_memory)
    path = os.path.join(run.work, "substring_marks.npy")
    mark_later_windows(run, starts, partitions, path)
    state.update(marks=path, window_starts=starts)
    run.throughput["substring_cut"] = map_chunks(run, "substring", cut_chunk, ((c, c) for c in range(n_chunks)), state)
    infos = [load_info(run.work, "substring", c) for c in range(n_chunks)]
    store.use_texts_of("substring")
    emptied = np.zeros(len(store), dtype=bool)
    emptied[np.concatenate([load_arrays(run.work, "substring", c, ["emptied"])["emptied"] for c in range(n_chunks)]
                           + [np.zeros(0, np.int64)])] = True
    examples = [i for info in infos for i in info["examples"]][:5]
    report = {"min_tokens": w, "tokens": sum(info.get("tokens", 0) for info in infos),
              "removed_tokens": sum(info.get("removed_tokens", 0) for info in infos),
              "removed_bytes": sum(info.get("removed_bytes", 0) for info in infos),
              "documents_changed": sum(info["changed"] for info in infos),
              "examples": [store.origin(i) for i in examples]}
    report["partitions"] = partitions
    return emptied, report


# -----------------------------------------------------------------------------
# Pass 5: decontamination; then tokenisation
# -----------------------------------------------------------------------------

def contamination_chunk(state, c):
    store, alive, index = state["store"], state["alive"], state["index"]
    first, last = store.chunk_start[c], store.chunk_start[c + 1]
    texts = store.chunk_texts(c)
    flags = np.array([bool(alive[first + k]) and index.contaminated(t) for k, t in enumerate(texts)], dtype=bool)
    return {"contaminated": flags}, {"bytes": int(store.nbytes[first:last][alive[first:last]].sum())}, None


_encodings = {}


def tokenize_chunk(state, indices):
    """Token ids of the documents `indices` (in order), concatenated, and the length of each."""
    from data.tokenizer import load_tokenizer

    store, directory = state["store"], state["tokenizer_dir"]
    if directory not in _encodings:
        _encodings[directory] = load_tokenizer(directory)
    encoding = _encodings[directory]
    ids = [encoding.encode_ordinary(store.text(i)) for i in indices]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.uint32, count=int(lengths.sum()))
    return {"ids": flat, "lengths": lengths}, {"bytes": int(store.nbytes[indices].sum())}, None


def order_chunks(indices, sizes, chunk_bytes):
    """(c, indices[a:b]) cutting an ordered list of documents every chunk_bytes bytes."""
    start, total, c = 0, 0, 0
    for k, i in enumerate(indices):
        total += int(sizes[i])
        if total >= chunk_bytes:
            yield c, np.asarray(indices[start:k + 1], dtype=np.int64)
            c, start, total = c + 1, k + 1, 0
    if start < len(indices):
        yield c, np.asarray(indices[start:], dtype=np.int64)


# -----------------------------------------------------------------------------
# The whole streamed curation
# -----------------------------------------------------------------------------

class StreamingRun:
    """One streamed data.prepare run: its flags, work directory, ranks and worker count."""

    def __init__(self, args, fingerprint, ranks, workers, log):
        self.args, self.ranks, self.workers, self.log = args, ranks, workers, log
        self.work = os.path.join(args.out, WORK)
        self.throughput = {}
        if ranks.rank == 0:
            manifest = read_json(os.path.join(self.work, "manifest.json"))
            if manifest is None or manifest.get("fingerprint") != fingerprint or args.force:
                shutil.rmtree(self.work, ignore_errors=True)
                os.makedirs(self.work)
                write_json(os.path.join(self.work, "manifest.json"),
                           {"fingerprint": fingerprint, "chunk_bytes": chunk_bytes_for(args.max_memory, workers)})
            else:
                log.say(f"resuming the unfinished run in {self.work}")
        ranks.barrier()
        self.chunk_bytes = read_json(os.path.join(self.work, "manifest.json"))["chunk_bytes"]

    def curate(self, source_list, eval_texts, problems, report):
        """Passes 1-5 and the mixture: the final documents as indices into the returned store."""
        args, log = self.args, self.log
        names = [s.name for s in source_list]
        if len(set(names)) != len(names):
            raise DataError(f"--source: source names must differ, got {names}")
        counter, file_index = {}, index_input_files(self, source_list)
        check_document_memory(file_index.records, args.max_memory)
        state = {"args": args, "source_names": names, "sources": source_list, "pieces": file_index.pieces,
                 "identifier": langid.default_identifier() if args.language_list else None}
        chunks = document_chunks(source_list, args, problems, self.chunk_bytes, counter, file_index)
        self.throughput["curate"] = map_chunks(self, "curated", curate_chunk, chunks, state)
        n_chunks = counter["chunks"]
        infos = [load_info(self.work, "curated", c) for c in range(n_chunks)]
        funnel, report["normalise"], language, report["quality"] = merge_pass1_reports(infos)
        for stage in ("loaded", "normalised") + (("language",) if args.language_list else ()) + ("quality",):
            log.stage_counts(stage, funnel.get(stage, {}))
            if stage == "loaded" and problems:
                log.say(f"{len(problems)} malformed or skipped inputs (all in report.json), e.g. {problems[0]}")
        report["language"] = language if args.language_list else {"enabled": False}
        prose_rules, code_rules = args.rules
        report["quality"]["rules"] = {"prose": dataclasses.asdict(prose_rules), "code": dataclasses.asdict(code_rules)}

        store = CuratedStore(self.work, n_chunks, names)
        alive = np.ones(len(store), dtype=bool)

        by_source = {}
        if tuple(args.ppl_band) != (0.0, 100.0):
            fold, models, skipped = fit_perplexity_models(store, args.ppl_order, args.seed)
            self.throughput["perplexity"] = map_chunks(self, "perplexity", score_chunk, ((c, c) for c in range(n_chunks)),
                                                       {"store": store, "fold": fold, "models": models})
            ppl = np.concatenate([load_arrays(self.work, "perplexity", c)["ppl"] for c in range(n_chunks)]
                                 + [np.zeros(0)])
            keep, scored = perplexity_band(store, ppl, models, tuple(args.ppl_band))
            alive &= keep
            by_source = {name: scored.get(name) or skipped[name] for name in names if name in scored or name in skipped}
        report["perplexity"] = {"band_percentiles": list(args.ppl_band), "order": args.ppl_order, "by_source": by_source}
        self._stage("perplexity", store, alive)

        if args.classifier_reference != "none":
            keep, report["classifier"] = streamed_classifier(self, store, alive, n_chunks, eval_texts, problems)
            alive &= keep
            self._stage("classifier", store, alive)
        else:
            report["classifier"] = {"enabled": False}

        members = np.flatnonzero(alive)
        unique_hashes, first = np.unique(store.hash[members], return_index=True)
        duplicate = np.ones(len(members), dtype=bool)
        duplicate[first] = False
        removed = members[duplicate]
        alive[removed] = False
        report["exact_dedup"] = {"removed": int(len(removed)), "examples": [
            [store.origin(members[first[np.searchsorted(unique_hashes, store.hash[r])]]), store.origin(r)]
            for r in removed[:5]]}
        self._stage("exact_dedup", store, alive)

        bands, rows = dedup.optimal_bands_rows(args.minhash_threshold, args.num_perm, *dedup.LSH_WEIGHTS)
        self.throughput["minhash"] = map_chunks(self, "minhash", sign_chunk, ((c, c) for c in range(n_chunks)),
                                                {"store": store, "alive": alive, "args": args,
                                                 "bands": bands, "rows": rows})
        drop, report["near_dedup"] = near_duplicates(self, store, alive)
        alive &= ~drop
        self._stage("near_dedup", store, alive)

        if args.substring_dedup:
            emptied, report["substring_dedup"] = repeated_spans(self, store, alive, n_chunks)
            alive &= ~emptied
            self._stage("substring_dedup", store, alive)
        else:
            report["substring_dedup"] = {"enabled": False}

        index = curate.ContaminationIndex(eval_texts, args.decontaminate_ngram)
        contaminated = np.zeros(len(store), dtype=bool)
        if len(index):
            self.throughput["decontaminate"] = map_chunks(
                self, "decontaminate", contamination_chunk, ((c, c) for c in range(n_chunks)),
                {"store": store, "alive": alive, "index": index})
            contaminated = np.concatenate([load_arrays(self.work, "decontaminate", c)["contaminated"]
                                           for c in range(n_chunks)] + [np.zeros(0, bool)])
        removed = np.flatnonzero(contaminated)
        alive[removed] = False
        report["decontamination"] = {"eval_texts": len(eval_texts), "ngram": args.decontaminate_ngram,
                                     "removed": int(len(removed)), "examples": [store.origin(i) for i in removed[:5]]}
        self._stage("decontaminated", store, alive)

        members_of = {s.name: np.flatnonzero(alive & (store.source == k)) for k, s in enumerate(source_list)}
        chosen, report["mixture"] = sources.mix_positions({name: store.nbytes[m] for name, m in members_of.items()},
                                                          {s.name: s.weight for s in source_list}, args.max_bytes,
                                                          args.seed)
        final = np.concatenate([members_of[name][np.asarray(chosen[name], dtype=np.int64)] for name in chosen]
                               + [np.zeros(0, np.int64)])
        mixed = np.zeros(len(store), dtype=bool)
        mixed[final] = True
        self._stage("mixture", store, mixed)
        shortfall = sources.mixture_shortfall(report["mixture"], args.max_bytes)
        if shortfall:
            log.say(shortfall)
        report["streaming"] = {"chunk_bytes": self.chunk_bytes, "chunks": n_chunks, "workers": self.workers,
                               "ranks": self.ranks.world, "max_memory": args.max_memory,
                               "input_files": len({piece[1] for piece in file_index.pieces}),
                               "input_pieces": len(file_index.pieces), "indexed_pieces": len(file_index.indexed)}
        return store, final

    def _stage(self, name, store, mask):
        counts = {}
        for s, source in enumerate(store.source_names):
            selected = mask & (store.source == s)
            if selected.any():
                counts[source] = {"documents": int(selected.sum()), "bytes": int(store.nbytes[selected].sum())}
        self.log.stage_counts(name, counts)

    def tokenize(self, store, indices, split, tokenizer_dir):
        """Pass 6 for one split: token chunks of the documents `indices`, in order. Returns the number of chunks."""
        tasks = order_chunks(indices, store.nbytes, self.chunk_bytes)
        counter = collections.Counter()

        def counted():
            for c, payload in tasks:
                counter["chunks"] += 1
                yield c, payload

        mb_per_s = map_chunks(self, f"tokens_{split}", tokenize_chunk, counted(),
                              {"store": store, "tokenizer_dir": tokenizer_dir})
        self.throughput[f"tokenise_{split}"] = mb_per_s
        return counter["chunks"]

    def chunk_documents(self, store, indices):
        """The document indices of each token chunk of a split, as `tokenize` cut them."""
        for _, payload in order_chunks(indices, store.nbytes, self.chunk_bytes):
            yield payload

    def token_chunks(self, split, n_chunks):
        for c in range(n_chunks):
            arrays = load_arrays(self.work, f"tokens_{split}", c)
            yield arrays["ids"], arrays["lengths"]

    def cleanup(self):
        if self.ranks.rank == 0:
            shutil.rmtree(self.work, ignore_errors=True)

