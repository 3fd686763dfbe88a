"""data/stream.py: the streamed curation against the in-memory reference (prepare.curate_documents),
the band-key candidates against lsh_candidate_pairs, resuming an interrupted run, and 2 gloo ranks."""

import json
import random

import numpy as np
import pytest

from conftest import torchrun
from data import dedup, prepare, stream
from data.prepare import Log, build_parser, check_args, curate_documents, main, split_documents
from data.shards import read_shard
from data.sources import parse_source_flag

WORDS = ("river mountain forest village market teacher student garden winter summer bridge letter window "
         "morning evening story music doctor kitchen animal harbour lantern meadow orchard thunder").split()


def _paragraph(rng, n_sentences=9):
    return " ".join(" ".join(["The"] + [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]) + "."
                    for _ in range(n_sentences))


def _perturbed(text, rng, changes=1):
    words = text.split()
    for _ in range(changes):
        k = rng.randrange(1, len(words) - 1)
        words[k] = rng.choice(WORDS)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL files of prose (exact and near duplicates spread far apart, so across chunks and
    ranks), one evaluation text planted in a document, and a directory of code files."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("stream_corpus")
    paragraphs = [_paragraph(rng) for _ in range(120)]
    records = list(paragraphs)
    records += [paragraphs[k] for k in (3, 50)]  # exact copies
    records += [_perturbed(paragraphs[k], rng) for k in (7, 8, 60, 61, 90)]  # near copies (J ≈ 0.9)
    records[40] += " The teacher river mountain winter music story evening letter doctor kitchen animal village."
    half = len(records) // 2
    (root / "web").mkdir()
    for name, part in (("a.jsonl", records[:half]), ("b.jsonl", records[half:] + ["{broken"])):
        (root / "web" / name).write_text("\n".join(json.dumps({"text": r}) if r != "{broken" else r for r in part) + "\n")
    (root / "code").mkdir()
    for i in range(30):
        body = "\n".join(f"    total_{j} = compute_{rng.choice(WORDS)}(value_{j}, {rng.randint(0, 99)})"
                         for j in range(rng.randint(8, 20)))
        (root / "code" / f"mod{i}.py").write_text(f"def function_{i}(value):\n{body}\n    return total_0\n")
    (root / "eval.txt").write_text("The teacher river mountain winter music story evening letter doctor kitchen "
                                   "animal village.\n")
    return root


def _argv(corpus, out, *extra):
    return ["--out", str(out), "--source", f"web={corpus / 'web'}:0.7", "--source", f"code={corpus / 'code'}:0.3:code",
            "--vocab-size", "300", "--max-bytes", "150000", "--shard-tokens", "5000", "--rule", "prose.min_words=50",
            "--decontaminate", str(corpus / "eval.txt"), "--quiet", *extra]


def _args(argv):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def test_streamed_curation_equals_the_in_memory_reference(corpus, tmp_path):
    """Many small chunks, two worker processes: the same documents in the same order, split the same way."""
    args = _args(_argv(corpus, tmp_path / "out", "--max-memory", "1e5", "--workers", "2"))
    source_list = [parse_source_flag(spec) for spec in args.source]
    eval_texts = prepare.read_eval_texts(args.decontaminate[0], [])
    reference_report, streamed_report = {}, {}
    documents = curate_documents(source_list, args, eval_texts, [], Log(quiet=True), reference_report)
    train, val = split_documents(documents, args.val_fraction, args.seed)

    run = stream.StreamingRun(args, "test", stream.Ranks(), 2, Log(quiet=True))
    store, final = run.curate(source_list, eval_texts, [], streamed_report)
    assert streamed_report["streaming"]["chunks"] >= 8  # the test means something only with many chunks
    train_positions, val_positions = prepare.split_order(store.nbytes[final], args.val_fraction, args.seed)
    assert [store.text(final[p]) for p in train_positions] == [d.text for d in train]
    assert [store.text(final[p]) for p in val_positions] == [d.text for d in val]
    for section in ("exact_dedup", "decontamination", "mixture", "quality"):
        assert streamed_report[section] == reference_report[section], section
    assert streamed_report["exact_dedup"]["removed"] >= 1 and streamed_report["decontamination"]["removed"] == 1
    near, near_reference = streamed_report["near_dedup"], reference_report["near_dedup"]
    assert near["removed"] == near_reference["removed"] >= 4
    assert near["candidate_similarities"] == near_reference["candidate_similarities"]
    assert near["random_pair_similarities"] == near_reference["random_pair_similarities"]
    for name, info in reference_report["perplexity"]["by_source"].items():
        assert streamed_report["perplexity"]["by_source"][name] == info


def test_near_dedup_in_key_ranges_and_pair_blocks_decides_as_the_in_memory_one(corpus, tmp_path, monkeypatch):
    """Each band's keys sorted in 8+ key ranges and the candidates verified 2 pairs at a time (what
    a corpus far larger than --max-memory gets): the same candidates, similarities and removals."""
    monkeypatch.setattr(stream, "BAND_SORT_BYTES_PER_KEY", 4000)  # 40 KB a key range at --max-memory 1e5
    monkeypatch.setattr(stream, "PAIR_BLOCK", 2)
    args = _args(_argv(corpus, tmp_path / "out", "--max-memory", "1e5", "--workers", "1"))
    source_list = [parse_source_flag(spec) for spec in args.source]
    eval_texts = prepare.read_eval_texts(args.decontaminate[0], [])
    reference_report, streamed_report = {}, {}
    curate_documents(source_list, args, eval_texts, [], Log(quiet=True), reference_report)
    stream.StreamingRun(args, "test", stream.Ranks(), 1, Log(quiet=True)).curate(source_list, eval_texts, [],
                                                                                streamed_report)
    near, near_reference = streamed_report["near_dedup"], reference_report["near_dedup"]
    assert near["band_sort_partitions"] >= 8
    assert near["candidate_pairs"] == near_reference["candidate_pairs"] > 2 * 2  # three blocks or more
    assert near["removed"] == near_reference["removed"] >= 4
    assert near["candidate_similarities"] == near_reference["candidate_similarities"]
    assert near["random_pair_similarities"] == near_reference["random_pair_similarities"]


def test_band_partitions_keep_a_key_range_within_an_eighth_of_max_memory():
    assert stream.band_partitions(1000, 2e9) == 1
    for n, max_memory in ((10**6, 1e6), (3 * 10**7, 2e9), (12345, 1e5)):
        partitions = stream.band_partitions(n, max_memory)
        assert partitions & (partitions - 1) == 0  # a power of two: the top bits of a key choose its range
        assert n * stream.BAND_SORT_BYTES_PER_KEY / partitions <= max_memory / 8
        assert n * stream.BAND_SORT_BYTES_PER_KEY / (partitions / 2) > max_memory / 8


def test_too_many_documents_for_max_memory_is_one_error_after_the_file_index(corpus, tmp_path, capsys, monkeypatch):
    """A corpus whose per-document numbers would not fit in half of --max-memory stops after pass 0
    with one line naming the flag and the bound to pass; no curation has run."""
    monkeypatch.setattr(stream, "BYTES_PER_DOCUMENT", 1000)  # the corpus's ~160 documents: ~160 KB > 1e5 / 2
    with pytest.raises(SystemExit) as stopped:
        main(_argv(corpus, tmp_path / "out", "--max-memory", "1e5", "--workers", "1"))
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: --max-memory 100000: the ")
    assert "pass --max-memory" in error
    assert not (tmp_path / "out" / stream.WORK / "curated").exists()
    monkeypatch.setattr(stream, "BYTES_PER_DOCUMENT", 100)  # ~16 KB: within the bound, the run goes on
    main(_argv(corpus, tmp_path / "out", "--max-memory", "1e5", "--workers", "1"))
    assert (tmp_path / "out" / "meta.json").exists()


def test_the_streamed_classifier_decides_as_the_in_memory_one(corpus, tmp_path):
    """The quality classifier planned from counts, trained on the chunks read back and scored chunk by
    chunk: the same training examples, model, scores and kept documents as quality.classifier_filter."""
    args = _args(_argv(corpus, tmp_path / "out", "--max-memory", "1e5", "--workers", "2",
                       "--classifier-reference", "stdlib-topics", "--classifier-keep-fraction", "0.6"))
    source_list = [parse_source_flag(spec) for spec in args.source]
    eval_texts = prepare.read_eval_texts(args.decontaminate[0], [])
    reference_report, streamed_report = {}, {}
    documents = curate_documents(source_list, args, eval_texts, [], Log(quiet=True), reference_report)
    run = stream.StreamingRun(args, "test", stream.Ranks(), 2, Log(quiet=True))
    store, final = run.curate(source_list, eval_texts, [], streamed_report)
    assert sorted(store.text(i) for i in final) == sorted(d.text for d in documents)
    timings = ("train_seconds", "documents_per_second")
    reference, streamed = ({k: v for k, v in r["classifier"].items() if k not in timings}
                           for r in (reference_report, streamed_report))
    assert streamed == reference and reference["removed"] >= 20 and reference["train_chunks"]["random"] > 50


@pytest.fixture(scope="module")
def boilerplate_corpus(tmp_path_factory):
    """Prose whose documents share spans: a 5-sentence footer under every third one, a quoted sentence
    of an earlier document in every seventh, and one document made of the first document's opening
    and the footer (both seen before: cut to nothing, so dropped)."""
    rng = random.Random(2)
    root = tmp_path_factory.mktemp("boilerplate_corpus")
    footer = _paragraph(rng, 5)
    records = []
    for i in range(90):
        text = _paragraph(rng)
        if i % 3 == 0:
            text += " " + footer
        if i % 7 == 6:
            text = records[i // 2].split(". ")[1] + ". " + text
        records.append(text)
    records.insert(45, ". ".join(records[0].split(". ")[:3]) + ". " + footer)
    (root / "web.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in records) + "\n")
    return root


def _substring_argv(corpus, out, *extra):
    return ["--out", str(out), "--source", f"web={corpus / 'web.jsonl'}", "--vocab-size", "300", "--max-bytes", "1000000",
            "--shard-tokens", "5000", "--rule", "prose.min_words=50", "--substring-dedup", "--substring-min-tokens",
            "20", "--ppl-band", "0", "100", "--quiet", "--max-memory", "1e5", "--workers", "2", *extra]


@pytest.mark.parametrize("bytes_per_window", [1e-3, stream.SUBSTRING_BYTES_PER_WINDOW])
def test_streamed_substring_dedup_cuts_what_the_suffix_array_cuts(boilerplate_corpus, tmp_path, monkeypatch,
                                                                   bytes_per_window):
    """Window hashes in chunk files, first occurrences found per hash range (one range when a window
    is counted as nothing; at its real 40 bytes and --max-memory 1e5, many), later copies cut chunk by
    chunk: the documents and the report of dedup.substring_dedup's suffix array in memory."""
    monkeypatch.setattr(stream, "SUBSTRING_BYTES_PER_WINDOW", bytes_per_window)
    args = _args(_substring_argv(boilerplate_corpus, tmp_path / "out"))
    source_list = [parse_source_flag(spec) for spec in args.source]
    reference_report, streamed_report = {}, {}
    documents = curate_documents(source_list, args, [], [], Log(quiet=True), reference_report)
    run = stream.StreamingRun(args, "test", stream.Ranks(), 2, Log(quiet=True))
    store, final = run.curate(source_list, [], [], streamed_report)
    assert streamed_report["streaming"]["chunks"] >= 8
    assert [store.text(i) for i in final] == [d.text for d in documents]
    streamed = dict(streamed_report["substring_dedup"])
    assert (streamed.pop("partitions") > 1) == (bytes_per_window > 1)
    assert streamed == reference_report["substring_dedup"]
    assert streamed["documents_changed"] >= 20 and streamed["removed_tokens"] > 1000
    assert len(documents) == 90  # of 91: the opening-and-footer document was cut to nothing and dropped


def test_two_gloo_ranks_cut_the_spans_one_process_cuts(boilerplate_corpus, tmp_path):
    """Under torchrun each rank hashes and cuts its own chunks, rank 0 alone finds the first
    occurrences: the same shards and the same substring report as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    main(_substring_argv(boilerplate_corpus, one, "--workers", "1"))
    torchrun(2, _substring_argv(boilerplate_corpus, two, "--workers", "1"), timeout=300, script="data/prepare.py")
    meta = json.loads((one / "meta.json").read_text())
    assert json.loads((two / "meta.json").read_text()) == meta
    for name in meta["train_shards"] + meta["val_shards"]:
        assert np.array_equal(read_shard(str(one / name)), read_shard(str(two / name))), name
    reports = [json.loads((d / "report.json").read_text())["substring_dedup"] for d in (one, two)]
    assert reports[0] == reports[1] and reports[0]["documents_changed"] >= 20


def test_later_occurrences_and_marked_windows_by_hand():
    """later_occurrences marks every repeat of an earlier key; tokens_in_marked_windows covers
    [p, p + w) for each marked p, overlapping windows joined, the last one clipped at the end."""
    keys = np.array([5, 3, 5, 7, 3, 5], dtype=np.uint64)
    assert dedup.later_occurrences(keys).tolist() == [False, False, True, False, True, True]
    marked = np.array([False, True, True, False, False, True])
    assert dedup.tokens_in_marked_windows(marked, 8, 2).tolist() == [False, True, True, True, False, True, True, False]
    assert dedup.tokens_in_marked_windows(np.array([True]), 3, 3).tolist() == [True, True, True]
    hashes = dedup.span_window_hashes(dedup.word_hashes(["a", " b", " c", " a", " b", " c"]), 2)
    # windows "a b", " b c", " c a", " a b", " b c": only the second " b c" repeats (" a" is not "a")
    assert dedup.later_occurrences(hashes).tolist() == [False, False, False, False, True]


def test_band_key_candidates_are_lsh_candidate_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**61, size=(300, 32), dtype=np.uint64)
    signatures[150:170] = signatures[0:20]  # whole copies: share every band
    signatures[200:260, :8] = signatures[0, :8]  # 60 documents share band 0 only: a bucket above the star limit
    bands, rows = 4, 8
    monkeypatch.setattr(dedup, "LARGE_BUCKET", 50)
    keys = dedup.band_keys(signatures, bands, rows)
    found = dedup.unique_pairs([dedup.sorted_band_candidates(keys[:, b], large_bucket=50) for b in range(bands)], 300)
    assert [tuple(p) for p in found.tolist()] == sorted(dedup.lsh_candidate_pairs(signatures, bands, rows))
    assert len(found) == 20 + 60  # 20 copies (every band), and a star from document 0 over the 60 sharing band 0
    clusters, _ = dedup.near_duplicate_clusters(signatures, 0.5, bands, rows, verify=False)
    assert dedup.clusters_of_pairs(found) == clusters


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_last_chunk(corpus, tmp_path, monkeypatch):
    """Stop in the middle of the MinHash pass; the second run recomputes neither pass 1 nor the
    finished signature chunks, and writes exactly what an uninterrupted run writes."""
    main(_argv(corpus, tmp_path / "whole", "--max-memory", "1e5", "--workers", "1"))
    computed, armed = [], [True]
    original = stream._compute

    def interrupting(task, state=None):
        computed.append((task[2], task[3]))
        if armed[0] and computed.count(("minhash", 2)):  # killed while computing the third signature chunk
            armed[0] = False
            raise Interrupted
        return original(task, state)

    monkeypatch.setattr(stream, "_compute", interrupting)
    with pytest.raises(Interrupted):
        main(_argv(corpus, tmp_path / "resumed", "--max-memory", "1e5", "--workers", "1"))
    first_run = list(computed)
    computed.clear()
    main(_argv(corpus, tmp_path / "resumed", "--max-memory", "1e5", "--workers", "1"))
    assert not [task for task in computed if task[0] in ("curated", "perplexity")]
    assert [task for task in computed if task[0] == "minhash"][0] == ("minhash", 2)
    assert len(first_run) > 10
    for name in ["meta.json", "tokenizer/tokenizer.tiktoken"] + json.loads((tmp_path / "whole" / "meta.json").read_text())["train_shards"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert not (tmp_path / "resumed" / stream.WORK).exists()


def test_two_gloo_ranks_write_what_one_process_writes(corpus, tmp_path):
    one = tmp_path / "one"
    main(_argv(corpus, one, "--max-memory", "1e5", "--workers", "1"))
    two = tmp_path / "two"
    torchrun(2, _argv(corpus, two, "--max-memory", "1e5", "--workers", "1"), timeout=300, script="data/prepare.py")
    meta = json.loads((one / "meta.json").read_text())
    assert json.loads((two / "meta.json").read_text()) == meta
    for name in meta["train_shards"] + meta["val_shards"]:  # the same tokens, in the same shards
        assert np.array_equal(read_shard(str(one / name)), read_shard(str(two / name))), name
    assert (one / "tokenizer/tokenizer.tiktoken").read_bytes() == (two / "tokenizer/tokenizer.tiktoken").read_bytes()
    reports = [json.loads((d / "report.json").read_text()) for d in (one, two)]
    assert reports[1]["streaming"]["ranks"] == 2 and reports[0]["streaming"]["ranks"] == 1
    assert [s["documents"] for s in reports[0]["funnel"]] == [s["documents"] for s in reports[1]["funnel"]]
    assert reports[1]["near_dedup"]["removed"] == reports[0]["near_dedup"]["removed"] >= 4


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """A directory of eight JSONL files with bad lines, plus a binary file, a text file and one of an
    unsupported kind: what the file index must replay exactly as sources.take_until reads it."""
    rng = random.Random(2)
    root = tmp_path_factory.mktemp("many_files")
    for i in range(8):
        lines = [json.dumps({"text": _paragraph(rng, rng.randint(2, 6))}) for _ in range(rng.randint(3, 9))]
        lines.insert(rng.randrange(len(lines)), "{not json")
        lines.insert(rng.randrange(len(lines)), json.dumps({"body": "no text field"}))
        (root / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "part3b.jsonl").write_bytes(b"\x00\x01binary")
    (root / "notes.txt").write_text(_paragraph(rng))
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


class ThreadRanks(stream.Ranks):
    """Two ranks as two threads of this process, meeting at a threading barrier."""

    def __init__(self, rank, barrier):
        super().__init__(rank, 2)
        self.meeting = barrier

    def barrier(self):
        self.meeting.wait(timeout=60)


@pytest.mark.parametrize("piece_bytes", [10**9, 97])  # whole files; files cut in pieces, many mid-line
@pytest.mark.parametrize("max_bytes", [1_500, 4_000, 10**9])  # the budget inside a file, later, never reached
def test_the_file_index_reads_what_the_stream_reads(many_files, tmp_path, max_bytes, piece_bytes, monkeypatch):
    """Pass 0 + the chunk plan + chunk_documents give take_until's documents and problems (file:line
    included), in order, whether files are read whole or in pieces; a corpus larger than the budget
    is indexed only as far as its files' sizes cover the budget."""
    monkeypatch.setattr(stream, "PIECE_BYTES", piece_bytes)
    argv = ["--out", str(tmp_path / "out"), "--source", f"web={many_files}", "--max-bytes", str(max_bytes),
            "--overread", "1", "--quiet"]
    args = _args(argv)
    source_list = [parse_source_flag(spec) for spec in args.source]
    expected_problems = []
    expected = source_list[0].load(max_bytes, args.seed, expected_problems)
    run = stream.StreamingRun(args, "test", stream.Ranks(), 1, Log(quiet=True))
    index = stream.index_input_files(run, source_list)
    problems, counter = [], {}
    chunks = list(stream.document_chunks(source_list, args, problems, 400, counter, index))
    state = {"sources": source_list, "pieces": index.pieces}
    documents = [doc for _, items in chunks for doc in stream.chunk_documents(state, items)]
    assert documents == expected and problems == expected_problems
    assert len(chunks) > 2 and any("unsupported extension" in p for p in problems)
    assert (len(index.pieces) > 3 * 11) == (piece_bytes == 97)  # 8 JSONL files of 200–2,000 bytes, cut
    if max_bytes == 1_500:
        assert len(index.indexed) < len(index.pieces)  # the pieces past the budget were not read
    else:
        assert any("invalid JSON" in p for p in problems)
    if max_bytes == 10**9:
        assert len(index.indexed) == len(index.pieces) and sum("binary" in p for p in problems) == 1


@pytest.mark.parametrize("piece_bytes", [10**9, 300])
def test_each_piece_is_indexed_by_one_rank(many_files, tmp_path, monkeypatch, piece_bytes):
    """Two ranks (threads here): rank r reads exactly the pieces c with c mod 2 = r — whole files, or
    with small pieces one file shared by both ranks — and both end with the same index."""
    import threading

    monkeypatch.setattr(stream, "PIECE_BYTES", piece_bytes)
    args = _args(["--out", str(tmp_path / "out"), "--source", f"web={many_files}", "--quiet"])
    source_list = [parse_source_flag(spec) for spec in args.source]
    read_by, original = {}, stream.sources.located_documents

    def recording(path, text_field, source, kind, problems, offset=0, first_line=1, end=None):
        read_by.setdefault((path, end), set()).add(threading.current_thread().name)
        return original(path, text_field, source, kind, problems, offset, first_line, end)

    monkeypatch.setattr(stream.sources, "located_documents", recording)
    meeting, indexes = threading.Barrier(2), {}
    work = tmp_path / "out" / stream.WORK
    work.mkdir(parents=True)

    def rank(r):
        run = stream.StreamingRun.__new__(stream.StreamingRun)
        run.args, run.ranks, run.workers, run.work, run.throughput = args, ThreadRanks(r, meeting), 1, str(work), {}
        indexes[r] = stream.index_input_files(run, source_list)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    pieces = indexes[0].pieces
    assert read_by == {(path, end): {f"rank{c % 2}"} for c, (_, path, _, end) in enumerate(pieces)}
    assert sorted(indexes[0].indexed) == sorted(indexes[1].indexed) == list(range(len(pieces)))
    assert indexes[0].records == indexes[1].records > 0
    readers = {}
    for (path, _), ranks in read_by.items():
        readers.setdefault(path, set()).update(ranks)
    shared = [path for path, ranks in readers.items() if len(ranks) == 2]  # files whose pieces both ranks read
    assert len(pieces) == 10 and not shared if piece_bytes == 10**9 else len(shared) >= 4
