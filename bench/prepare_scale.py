"""data.prepare at scale: throughput and peak memory on synthetic JSONL corpora of growing size.

    python bench/prepare_scale.py [--sizes-mb 100,300] [--workers 1,2] [--dir /tmp/prepare_scale]
                                  [--datatrove]

Corpus (reproducible from --seed): English documents of 250-900 words drawn from the word
frequencies of the Python Language Reference (pydoc_data.topics, shipped with CPython), in
sentences of 8-20 words, one JSON record a line. 10% of the documents are followed, a few thousand
documents later, by a near-duplicate copy with one word in 200 replaced (Jaccard similarity of
the word 5-gram shingle sets ≈ 0.95, so ≥ 0.9) and 2% by an exact copy; the generator prints the
exact Jaccard similarity of the planted pairs it wrote (min and mean).

Each row is one `python -m data.prepare --source web=corpus.jsonl` run in a subprocess, with
--max-bytes the corpus size and --overread 1 (the whole corpus is read and curated), BPE on a
10 MB sample (--bpe-train-bytes 1e7) and the default --max-memory. Printed per row: wall time,
MB/s of input, the report's per-pass MB/s, and peak memory — of the largest process
(getrusage of children) and summed over the process tree (sampled from /proc every 0.2 s; that
sum counts pages shared by forked workers once per process, so it is an upper bound). A comment
line under each row gives the main process's peak after each stage (report.json's peak_memory_gb),
which shows the stage that set the peak.

--datatrove: if the `datatrove` package imports, also run its MinHash dedup pipeline (signatures,
buckets, clusters; 14 bands × 9 rows, word 5-grams, as ours) on every record of the smallest corpus
(or of --datatrove-size-mb), read the documents its filter step would drop from its .remove file,
and compare them with those our in-memory dedup.near_dedup removes from the same records. Each
side runs in a forked child, so that its time and peak memory (the child's, its own workers
included) are its own. Benchmark-only: datatrove is not in
requirements.txt.
"""

import argparse
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.dedup import shingle_hashes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vocabulary():
    """(words, cumulative counts): the lower-case alphabetic words of the Language Reference."""
    from pydoc_data.topics import topics

    counts = {}
    for text in topics.values():
        for word in re.findall(r"[a-z]{2,12}", text.lower()):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(counts)
    return words, list(itertools.accumulate(counts[w] for w in words))


def document(rng, words, cumulative):
    sentences, n_words = [], rng.randint(250, 900)
    while n_words > 0:
        k = min(n_words, rng.randint(8, 20))
        sentence = rng.choices(words, cum_weights=cumulative, k=k)
        sentences.append(" ".join([sentence[0].capitalize()] + sentence[1:]) + ".")
        n_words -= k
    return " ".join(sentences)


def near_copy(text, rng, words, every=200):
    """One word in `every` replaced by a random vocabulary word."""
    tokens = text.split(" ")
    for k in range(0, len(tokens), every):
        position = rng.randrange(k, min(k + every, len(tokens)))
        tokens[position] = rng.choice(words) + ("." if tokens[position].endswith(".") else "")
    return " ".join(tokens)


def jaccard(a, b):
    a, b = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    return len(a & b) / len(a | b)


def generate(path, size_bytes, seed=0):
    """Write the corpus; returns (documents, planted near pairs, planted exact copies, their Jaccard values)."""
    rng = random.Random(seed)
    words, cumulative = vocabulary()
    pending, written, n_docs, similarities, exact = [], 0, 0, [], 0
    with open(path + ".tmp", "w") as f:
        while written < size_bytes:
            if pending and pending[0][0] <= n_docs:
                _, text = pending.pop(0)
            else:
                text = document(rng, words, cumulative)
                roll = rng.random()
                if roll < 0.10:
                    copy = near_copy(text, rng, words)
                    if len(similarities) < 200:
                        similarities.append(jaccard(text, copy))
                    pending.append((n_docs + rng.randint(20, 2000), copy))
                elif roll < 0.12:
                    pending.append((n_docs + rng.randint(20, 2000), text))
                    exact += 1
                pending.sort(key=lambda p: p[0])
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            n_docs += 1
    os.replace(path + ".tmp", path)
    return n_docs, exact, similarities


class TreeMemory(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled from /proc."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def tree_rss(self):
        children = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    children.setdefault(int(fields[1]), []).append((int(entry), int(fields[21]) * 4096))
                except (OSError, IndexError, ValueError):
                    pass
        total, stack = 0, [self.pid]
        while stack:
            for pid, rss in children.get(stack.pop(), []):
                total += rss
                stack.append(pid)
        return total

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.tree_rss())
            time.sleep(0.2)


def run_prepare(corpus, size, workers, out):
    argv = [sys.executable, "-m", "data.prepare", "--out", out, "--source", f"web={corpus}",
            "--max-bytes", str(size), "--overread", "1", "--bpe-train-bytes", "10000000", "--workers", str(workers),
            "--force", "--quiet"]
    # A wrapper process per row, so that getrusage(RUSAGE_CHILDREN) sees only this row's processes.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.time()
    process = subprocess.Popen([sys.executable, "-c", wrapper] + argv, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.running = False
    seconds = time.time() - start
    if process.returncode:
        raise SystemExit(f"data.prepare failed:\n{stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    largest = int(stdout.split()[-1]) * 1024  # the wrapper's last line: KB
    return seconds, largest, sampler.peak, report


def ours_near_dedup(corpus):
    """Our in-memory MinHash near-dedup (data/dedup.near_dedup, the decision data.prepare takes) on
    every record of the corpus: (line numbers removed, seconds)."""
    from data.dedup import near_dedup
    from data.sources import Document

    with open(corpus) as f:
        documents = [Document(json.loads(line)["text"], "web", str(i)) for i, line in enumerate(f)]
    start = time.time()
    _, removed, _ = near_dedup(documents, threshold=0.8, num_perm=128, ngram=5)
    return {int(d.origin) for d in removed}, len(documents), time.time() - start


def datatrove_near_dedup(corpus, work):
    """datatrove's four MinHash steps (14 buckets × 9 hashes, word 5-grams, 64-bit sha1 hashes; words are
    \\w+ runs as ours, since its default word tokenizers need spaCy or NLTK), one task each, on the same
    records: (line numbers removed, seconds)."""
    import shutil
    import types

    # datatrove's dedup package imports its exact-substring step, which imports Hugging Face `tokenizers`
    # (not installed here, and unused by MinHash): a placeholder module lets the MinHash steps import.
    if "tokenizers" not in sys.modules:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            placeholder, processors = types.ModuleType("tokenizers"), types.ModuleType("tokenizers.processors")
            processors.TemplateProcessing, placeholder.processors, placeholder.Tokenizer = object, processors, object
            sys.modules.update({"tokenizers": placeholder, "tokenizers.processors": processors})
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        def word_tokenize(self, text):
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    def read(data=None, rank=0, world_size=1):  # its JsonlReader needs orjson, not installed here
        with open(corpus) as f:
            for i, line in enumerate(f):
                yield Document(text=json.loads(line)["text"], id=str(i))

    from loguru import logger  # datatrove's logger: its progress lines would bury the table

    logger.remove()
    work = os.path.join(work, "datatrove")
    shutil.rmtree(work, ignore_errors=True)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=9,
                           hash_config=HashConfig(precision=64, hash_fc="sha1"))
    steps = [[read, MinhashDedupSignature(f"{work}/signatures", config=config, language=Words())],
             [MinhashDedupBuckets(f"{work}/signatures", f"{work}/buckets", config=config)],
             [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove_ids", config=config)]]
    start = time.time()
    for k, pipeline in enumerate(steps):
        LocalPipelineExecutor(pipeline, tasks=config.num_buckets if k == 1 else 1, workers=1,
                              logging_dir=f"{work}/logs_{k}", start_method="fork").run()
    seconds = time.time() - start
    # MinhashDedupFilter would drop these: the indices (uint32) of the documents to remove, of task 0
    removed = np.fromfile(f"{work}/remove_ids/000000.remove", dtype="<u4")
    return set(removed.tolist()), seconds


def in_child(function, *args):
    """function(*args) in a forked child process: (its result, the child's peak RSS in bytes —
    its waited-for descendants included, as wait4 reports it)."""
    import pickle

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            payload, code = pickle.dumps(function(*args)), 0
        except BaseException as e:  # noqa: BLE001 - sent back to the parent and raised there
            payload, code = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}")), 1
        with os.fdopen(write_end, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        payload = f.read()
    _, status, usage = os.wait4(pid, 0)
    result = pickle.loads(payload)
    if status:
        raise result
    return result, usage.ru_maxrss * 1024


def datatrove_comparison(corpus, work):
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("\ndatatrove: not installed (pip install datatrove); no comparison")
        return
    (ours, n, our_seconds), our_peak = in_child(ours_near_dedup, corpus)
    (theirs, their_seconds), their_peak = in_child(datatrove_near_dedup, corpus, work)
    agree = n - len(ours ^ theirs)
    print(f"\nnear-duplicate decisions on {os.path.basename(corpus)} ({n:,} documents, one process each, "
          f"MinHash step only): ours {len(ours):,} removed in {our_seconds:.0f} s, peak {our_peak / 1e9:.2f} GB; "
          f"datatrove {len(theirs):,} removed in {their_seconds:.0f} s, peak {their_peak / 1e9:.2f} GB; the same "
          f"decision on {agree / n:.2%} of documents; removed by both {len(ours & theirs):,}, only by ours "
          f"{len(ours - theirs):,}, only by datatrove {len(theirs - ours):,}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", default="100,300", help="corpus sizes in MB (1 MB = 10^6 bytes)")
    p.add_argument("--workers", default="1,2", help="worker counts to run each size with")
    p.add_argument("--dir", default="/tmp/prepare_scale", help="where corpora and outputs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datatrove", action="store_true", help="also compare with datatrove's MinHash dedup")
    p.add_argument("--datatrove-size-mb", type=int, default=None,
                   help="the corpus size to compare on (default: the smallest of --sizes-mb)")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    print("| corpus | workers | wall s | MB/s | largest process | all processes | passes MB/s (curate, perplexity, "
          "minhash, tokenise) | near-dup removed | exact removed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size_mb in [int(x) for x in args.sizes_mb.split(",")]:
        corpus = os.path.join(args.dir, f"corpus_{size_mb}mb_seed{args.seed}.jsonl")
        if not os.path.exists(corpus):
            n_docs, exact, similarities = generate(corpus, size_mb * 10**6, args.seed)
            print(f"<!-- {corpus}: {n_docs:,} documents, {exact:,} exact copies planted, near copies' Jaccard "
                  f"min {min(similarities):.3f} mean {sum(similarities) / len(similarities):.3f} -->", flush=True)
        for workers in [int(x) for x in args.workers.split(",")]:
            out = os.path.join(args.dir, f"out_{size_mb}mb_w{workers}")
            seconds, largest, tree, report = run_prepare(corpus, size_mb * 10**6, workers, out)
            t = report["throughput_mb_per_s"]
            passes = ", ".join(f"{t.get(k) or 0:.2f}" for k in ("curate", "perplexity", "minhash", "tokenise_train"))
            rows.append((size_mb, workers, seconds))
            print(f"| {size_mb} MB | {workers} | {seconds:.0f} | {size_mb / seconds:.2f} | {largest / 1e9:.2f} GB | "
                  f"{tree / 1e9:.2f} GB | {passes} | {report['near_dedup']['removed']:,} | "
                  f"{report['exact_dedup']['removed']:,} |", flush=True)
            print(f"<!-- {size_mb} MB, {workers} workers: main process's peak RSS (GB) after each stage: "
                  f"{report.get('peak_memory_gb')} -->", flush=True)
    if args.datatrove:
        size_mb = args.datatrove_size_mb or min(int(x) for x in args.sizes_mb.split(","))
        corpus = os.path.join(args.dir, f"corpus_{size_mb}mb_seed{args.seed}.jsonl")
        if not os.path.exists(corpus):
            generate(corpus, size_mb * 10**6, args.seed)
        datatrove_comparison(corpus, args.dir)


if __name__ == "__main__":
    main()
