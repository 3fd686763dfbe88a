"""End to end: `python -m data.prepare` on a tiny synthetic corpus, shards, and CLI errors."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data import prepare
from data.prepare import main, split_documents, tokenize_texts, write_shards
from data.shards import ShardError, read_shard, write_shard
from data.sources import Document, text_list_source
from data.tokenizer import SPECIAL_TOKENS, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("river mountain forest village market teacher student garden winter summer bridge letter "
         "window morning evening story music doctor kitchen animal").split()


def _paragraph(rng, n_sentences=8):
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        sentences.append(" ".join(["The"] + words) + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prose directory (.txt, .jsonl with bad lines, .html) and a code directory, with planted
    exact and near duplicates and one evaluation text hidden in a document."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    prose, code = root / "prose", root / "code"
    prose.mkdir()
    code.mkdir()
    paragraphs = [_paragraph(rng) for _ in range(60)]
    for i, p in enumerate(paragraphs[:30]):
        (prose / f"doc{i:02d}.txt").write_text(p)
    (prose / "copy.txt").write_text(paragraphs[0])  # exact duplicate
    for k in (1, 2, 3):  # near duplicates: one word changed (several, as the perplexity band may drop one)
        words = paragraphs[k].split()
        words[len(words) // 2] = "river" if words[len(words) // 2] != "river" else "forest"
        (prose / f"near{k}.txt").write_text(" ".join(words))
    # made of the corpus's own words, so that the perplexity band does not remove the document first
    eval_text = "The teacher river mountain winter music story evening letter doctor kitchen animal village."
    (prose / "leak.txt").write_text(paragraphs[30] + " " + eval_text)
    records = [json.dumps({"text": p}) for p in paragraphs[31:]] + ["{broken json"]
    (prose / "more.jsonl").write_text("\n".join(records) + "\n")
    (prose / "page.html").write_text(f"<html><nav>menu</nav><p>{_paragraph(rng)}</p><p>{_paragraph(rng)}</p></html>")
    for i in range(25):
        body = "\n".join(f"    total_{j} = compute_{rng.choice(WORDS)}(value_{j}, {rng.randint(0, 99)})"
                         for j in range(rng.randint(8, 20)))
        (code / f"mod{i}.txt").write_text(f"def function_{i}(value):\n{body}\n    return total_0\n")
    (root / "eval.txt").write_text(eval_text + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    meta = main(["--out", str(out), "--source", f"prose={corpus / 'prose'}:0.6",
                 "--source", f"code={corpus / 'code'}:0.4:code", "--vocab-size", "300", "--max-bytes", "200000",
                 "--shard-tokens", "8000", "--decontaminate", str(corpus / "eval.txt"), "--substring-dedup",
                 "--rule", "prose.min_words=50", "--quiet"])
    return out, meta


def test_prepare_writes_the_contract(prepared):
    out, meta = prepared
    assert meta == json.loads((out / "meta.json").read_text())
    assert set(meta) == {"vocab_size", "eot_token", "tokenizer", "train_shards", "val_shards",
                         "train_tokens", "val_tokens", "val_bytes"}
    enc = load_tokenizer(out / meta["tokenizer"])
    assert meta["vocab_size"] == enc.n_vocab == 300 + len(SPECIAL_TOKENS) and meta["eot_token"] == enc.eot_token == 300
    assert len(meta["train_shards"]) > 1 and meta["val_shards"] == ["val_000000.bin"]
    train = np.concatenate([read_shard(out / name) for name in meta["train_shards"]])
    val = read_shard(out / "val_000000.bin")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert train.max() < meta["vocab_size"] and train[0] == val[0] == meta["eot_token"]
    # documents are separated by end-of-text; decoding the val shard gives back val_bytes of text
    pieces = enc.decode_bytes(val.tolist()).split(b"<|endoftext|>")
    assert pieces[0] == b"" and sum(len(p) for p in pieces) == meta["val_bytes"]
    for name in ("tokenizer/tokenizer.tiktoken", "tokenizer/tokenizer.json", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0


def test_report_counts_every_stage(prepared):
    out, meta = prepared
    report = json.loads((out / "report.json").read_text())
    stages = [s["stage"] for s in report["funnel"]]
    assert stages == ["loaded", "normalised", "language", "quality", "perplexity", "exact_dedup", "near_dedup",
                      "substring_dedup", "decontaminated", "mixture"]
    documents = [s["documents"] for s in report["funnel"]]
    assert documents == sorted(documents, reverse=True)
    assert report["exact_dedup"]["removed"] >= 1 and report["near_dedup"]["removed"] >= 1
    assert report["decontamination"]["removed"] == 1
    assert any("more.jsonl:" in p and "invalid JSON" in p for p in report["malformed"]["examples"])
    assert set(report["mixture"]) == {"prose", "code"}
    assert abs(sum(m["token_share"] for m in report["mixture"].values()) - 1) < 1e-3
    assert report["tokenizer"]["bytes_per_token_val"] > 1


def test_empty_corpus_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tiny.txt").write_text("too short")
    result = subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(tmp_path / "out"),
                             "--source", f"web={tmp_path / 'empty'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    for argv in (["--source", "nonsense"], ["--rule", "prose.nope=3"], ["--val-fraction", "2"],
                 ["--tokenizer", "no-such-tokenizer"], ["--source", f"x={tmp_path}/missing"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "o")] + argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_hooks_for_tasks_and_eval_prompts(corpus, tmp_path):
    tasks = [f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(30) for b in range(10)]
    meta = main(["--out", str(tmp_path), "--source", f"prose={corpus / 'prose'}:0.8", "--vocab-size", "280",
                 "--max-bytes", "100000", "--ppl-band", "0", "100", "--rule", "prose.min_words=50", "--quiet"],
                extra_sources=[text_list_source("tasks", tasks, weight=0.2)],  # short: kind "curated"
                eval_texts=[(corpus / "eval.txt").read_text().strip()])
    report = json.loads((tmp_path / "report.json").read_text())
    mixture = report["mixture"]
    # the mixture is drawn by bytes (the tokenizer does not exist yet); token shares are reported
    assert abs(mixture["tasks"]["bytes"] / (mixture["tasks"]["bytes"] + mixture["prose"]["bytes"]) - 0.2) < 0.02
    assert mixture["tasks"]["token_share"] > 0.1
    assert report["decontamination"]["removed"] == 1
    assert meta["vocab_size"] == 286


def test_shards_round_trip_and_corruption_is_named(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 70_000, size=1000)
    path = str(tmp_path / "t.bin")
    write_shard(path, tokens, 70_000)  # > 65,536: uint32 on disk
    assert np.array_equal(read_shard(path), tokens)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(ShardError, match="t.bin"):
        read_shard(path)
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 2000)
    with pytest.raises(ShardError, match="junk.bin"):
        read_shard(str(tmp_path / "junk.bin"))


def test_write_shards_splits_documents_with_end_of_text(tmp_path):
    docs = [np.arange(5), np.arange(3), np.arange(4)]
    names, total = write_shards(str(tmp_path), "train", docs, eot=99, vocab_size=100, shard_tokens=6)
    stream = np.concatenate([read_shard(str(tmp_path / n)) for n in names])
    assert total == 15 and names == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert stream.tolist() == [99, 0, 1, 2, 3, 4, 99, 0, 1, 2, 99, 0, 1, 2, 3]


_ENCODE_BATCH = prepare._encode_batch


def encode_batch_noting_the_process(batch):
    """prepare._encode_batch that first appends the id of the process running it to $PIDS_FILE. A module-level
    function: the pool pickles it by name, and a forked worker finds it in this module."""
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _ENCODE_BATCH(batch)


def test_parallel_tokenisation_matches_serial(prepared, tmp_path, monkeypatch):
    out, _ = prepared
    enc = load_tokenizer(out)
    texts = [f"document {i}: " + "word " * (i % 50) for i in range(400)] * 6  # > 1 MB triggers workers
    texts = [t * 20 for t in texts]
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    monkeypatch.setattr(prepare, "_encode_batch", encode_batch_noting_the_process)
    parallel, used = tokenize_texts(texts, str(out / "tokenizer"), workers=2)
    assert [a.tolist() for a in parallel] == [enc.encode_ordinary(t) for t in texts]
    if used == 1:
        pytest.skip("no process pool here: tokenize_texts fell back to one process")
    processes = set(pids_file.read_text().split())
    assert used == 2 and len(processes) == 2 and str(os.getpid()) not in processes  # two workers really ran


def nbytes(documents):
    return sum(len(d.text.encode("utf-8")) for d in documents)


@pytest.mark.parametrize("val_fraction", [0.1, 0.3, 0.5])
def test_split_is_by_document_and_keeps_both_sides(val_fraction):
    """Whole documents are held out in shuffled order until they hold val_fraction of the UTF-8 *bytes*
    (5 to 1280 characters of 1 or 2 bytes, so a share of the documents or of the characters is not a share
    of the bytes): the validation side reaches the fraction, and without its last document it would not."""
    rng = random.Random(3)
    docs = [Document("xé"[i % 2] * rng.choice([5, 20, 80, 320, 1280]), "s", str(i)) for i in range(20)]  # é: 2 bytes
    for seed in range(5):
        train, val = split_documents(docs, val_fraction, seed=seed)
        assert len(train) + len(val) == 20 and {d.origin for d in train}.isdisjoint(d.origin for d in val)
        assert val and train
        wanted = val_fraction * nbytes(docs)
        assert nbytes(val) >= wanted > nbytes(val[:-1]), seed
    # A tiny fraction still holds out one document; a huge one still leaves one to train on.
    assert len(split_documents(docs, 1e-6, seed=0)[1]) == 1 and len(split_documents(docs, 1.0, seed=0)[0]) == 1


def test_pretrained_tokenizer_is_copied_next_to_the_shards(corpus, tmp_path, monkeypatch):
    """--tokenizer gpt2 where tiktoken can load it (simulated: offline machines cannot download)."""
    import tiktoken

    from data.tokenizer import make_encoding, train_bpe

    ranks = train_bpe([(corpus / "prose" / "doc05.txt").read_text()], 300)
    fake_gpt2 = make_encoding("gpt2", ranks, special_tokens={"<|endoftext|>": 300})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake_gpt2)
    meta = main(["--out", str(tmp_path), "--source", f"prose={corpus / 'prose'}", "--tokenizer", "gpt2",
                 "--rule", "prose.min_words=50", "--quiet"])
    assert meta["vocab_size"] == 301 and meta["eot_token"] == 300
    assert load_tokenizer(tmp_path).name == "gpt2"
    assert read_shard(tmp_path / "val_000000.bin")[0] == 300


def test_a_finished_run_is_skipped_until_a_flag_or_an_input_changes(corpus, tmp_path, capsys):
    import shutil

    from train_gpt import read_stage

    prose, out = tmp_path / "prose", tmp_path / "out"
    shutil.copytree(corpus / "prose", prose)
    argv = ["--out", str(out), "--source", f"prose={prose}", "--vocab-size", "270", "--max-bytes", "50000",
            "--ppl-band", "0", "100", "--rule", "prose.min_words=50", "--quiet"]

    def run(*extra):
        capsys.readouterr()
        meta = main(argv + list(extra))
        return meta, "holds a finished run" in capsys.readouterr().out, read_stage(str(out))["fingerprint"]

    first, skipped, fingerprint = run()
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert not skipped and run("--workers", "1") == (first, True, fingerprint)  # a runtime flag: skipped
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    _, skipped, other = run("--vocab-size", "271")  # another flag: prepared again
    assert not skipped and other != fingerprint
    (prose / "doc03.txt").write_text(_paragraph(random.Random(5)))  # a corpus file changes
    _, skipped, changed = run("--vocab-size", "271")
    assert not skipped and changed != other


def test_the_fingerprint_covers_python_hook_texts_and_the_stdlib_version(monkeypatch):
    from data.prepare import build_parser, prepare_fingerprint
    from data.sources import default_sources

    args = build_parser().parse_args([])

    def fingerprint(extra=(), eval_texts=(), flag_sources=()):
        return prepare_fingerprint(args, list(flag_sources), list(extra), list(eval_texts))

    same = fingerprint([text_list_source("tasks", ["1 + 1 = 2"], 0.1)], ["What is 1 + 1?"])
    assert same == fingerprint([text_list_source("tasks", ["1 + 1 = 2"], 0.1)], ["What is 1 + 1?"])
    assert same != fingerprint([text_list_source("tasks", ["1 + 1 = 3"], 0.1)], ["What is 1 + 1?"])
    assert same != fingerprint([text_list_source("tasks", ["1 + 1 = 2"], 0.2)], ["What is 1 + 1?"])
    assert same != fingerprint([text_list_source("tasks", ["1 + 1 = 2"], 0.1)], ["What is 2 + 2?"])
    stdlib, without_stdlib = fingerprint(flag_sources=default_sources()), fingerprint()
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert fingerprint(flag_sources=default_sources()) != stdlib  # the standard library is a corpus
    assert fingerprint() == without_stdlib  # it is not: the Python version does not matter
