"""BPE training benchmark: data/tokenizer.py's train_bpe against Hugging Face `tokenizers`.

    python bench/bpe_train.py [--train-mb 10] [--vocab-size 4096] [--test-mb 1]

Text: the default offline corpus (standard-library code and prose, normalised, shuffled), 10 MB
for training and a disjoint ~1 MB for measuring compression (UTF-8 bytes per token; higher =
better).
Both trainers get the same pre-tokeniser (GPT-4's split pattern) and the same vocabulary size
(256 byte tokens + merges). Ours runs in one process on one core; `tokenizers` (Rust) is given
one thread too (RAYON_NUM_THREADS=1) and, if installed, is optional (pip install tokenizers).
The plain `train_bpe_reference` is timed on a small slice to show what the heap buys.
"""

import argparse
import os
import random
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.curate import normalise_text  # noqa: E402
from data.sources import stdlib_code_source, stdlib_prose_source  # noqa: E402
from data.tokenizer import DEFAULT_PATTERN, make_encoding, train_bpe, train_bpe_reference  # noqa: E402


def corpus(train_bytes, test_bytes, seed=0):
    """All of the stdlib code and prose documents (~17 MB), shuffled, cut into a training part
    and a disjoint test part."""
    docs = [normalise_text(d.text)[0] for source in (stdlib_code_source(), stdlib_prose_source())
            for d in source.load(10**10, seed, [])]
    random.Random(seed).shuffle(docs)
    train, test, size = [], [], 0
    for text in docs:
        if size < train_bytes:
            train.append(text)
        elif size < train_bytes + test_bytes:
            test.append(text)
        size += len(text.encode())
    return train, test


def bytes_per_token(texts, count_tokens):
    return sum(len(t.encode()) for t in texts) / sum(count_tokens(t) for t in texts)


def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DEFAULT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-mb", type=float, default=10, help="megabytes of training text")
    p.add_argument("--test-mb", type=float, default=1, help="megabytes of held-out text for compression")
    p.add_argument("--vocab-size", type=int, default=4096, help="256 byte tokens + merges")
    args = p.parse_args()

    train, test = corpus(int(args.train_mb * 1e6), int(args.test_mb * 1e6))
    train_mb = sum(len(t.encode()) for t in train) / 1e6
    test_mb = sum(len(t.encode()) for t in test) / 1e6
    print(f"training text {train_mb:.1f} MB ({len(train)} documents), held-out {test_mb:.1f} MB, "
          f"vocabulary {args.vocab_size}\n")

    rows = []
    start = time.perf_counter()
    ranks = train_bpe(train, args.vocab_size)
    ours_seconds = time.perf_counter() - start
    enc = make_encoding("bench", ranks)
    ours_bpt = bytes_per_token(test, lambda t: len(enc.encode_ordinary(t)))
    rows.append(("ours: train_bpe (heap)", ours_seconds, ours_bpt))

    try:
        hf, hf_seconds = train_hf(train, args.vocab_size)
        hf_bpt = bytes_per_token(test, lambda t: len(hf.encode(t).ids))
        rows.append(("tokenizers BPE (1 thread)", hf_seconds, hf_bpt))
    except ImportError:
        hf_bpt = None
        print("tokenizers not installed (pip install tokenizers): no comparison\n")

    print(f"{'trainer':<28}{'seconds':>9}{'MB/s':>8}{'bytes/token (held-out)':>25}")
    for name, seconds, bpt in rows:
        print(f"{name:<28}{seconds:>9.1f}{train_mb / seconds:>8.2f}{bpt:>25.3f}")
    if hf_bpt:
        print(f"\ncompression of ours relative to tokenizers: {100 * (ours_bpt / hf_bpt - 1):+.2f}%")

    small = train[:40]
    small_mb = sum(len(t.encode()) for t in small) / 1e6
    start = time.perf_counter()
    fast = train_bpe(small, 512)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = train_bpe_reference(small, 512)
    reference_seconds = time.perf_counter() - start
    print(f"\nsmall slice ({small_mb:.2f} MB, vocabulary 512): train_bpe {fast_seconds:.2f}s, "
          f"train_bpe_reference {reference_seconds:.2f}s, same merges: {fast == reference}")


if __name__ == "__main__":
    main()
