"""data/quality.py: the hashed n-gram features, the fastText-style classifier, its metrics, and the
classifier stage of data.prepare (funnel, flags, errors)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data.dedup import word_hashes, words_of
from data.prepare import main
from data.quality import (FastTextClassifier, hashed_ngram_features, paragraph_chunks, precision_recall, roc_auc,
                          train_classifier)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = (1 << 64) - 1


def fmix64(x):
    """MurmurHash3's 64-bit finaliser, in Python integers (as data/dedup.py's numpy one)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    return x ^ (x >> 33)


def test_hashed_ngram_features_by_hand():
    text, buckets = "The cat sat, the CAT!", 1000
    hashes = [int(h) for h in word_hashes(words_of(text))]  # the words: the cat sat the cat
    assert len(hashes) == 5
    multiplier = 0x9E3779B97F4A7C15
    expected = [fmix64((h + (1 << 56)) & MASK) % buckets for h in hashes]
    expected += [fmix64((a * multiplier + b + (2 << 56)) & MASK) % buckets for a, b in zip(hashes, hashes[1:])]
    assert hashed_ngram_features(text, buckets, word_ngrams=2, char_ngrams=0).tolist() == expected
    # equal n-grams share a bucket: "the cat" twice, as a bigram and its words
    features = hashed_ngram_features(text, buckets, word_ngrams=2).tolist()
    assert features[0] == features[3] and features[5] == features[8]
    # character n-grams: one per position of the lower-cased, space-collapsed text, hashed as Σ c_k M^k
    with_chars = hashed_ngram_features("Ab  c", 1 << 20, word_ngrams=1, char_ngrams=3)
    characters, m = "ab c", 0xC2B2AE3D27D4EB4F
    tri = []
    for s in range(len(characters) - 2):
        h = sum(ord(c) * pow(m, k, 1 << 64) for k, c in enumerate(characters[s:s + 3])) & MASK
        tri.append(fmix64((fmix64(h) + (1 << 63) + (3 << 56)) & MASK) % (1 << 20))
    assert with_chars.tolist()[2:] == tri and len(with_chars) == 2 + 2


def test_hashing_is_deterministic_across_processes():
    code = ("from data.quality import hashed_ngram_features as f; "
            "print(f('Naive Bayes and fastText agree on ünïcode', 1 << 18, 2, 4).tolist())")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) > 10


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40) / 5  # many ties
    labels = rng.random(40) < 0.4
    pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
    by_pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, labels) == pytest.approx(by_pairs)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0


def test_precision_and_recall_by_hand():
    precision, recall = precision_recall([0.9, 0.8, 0.4, 0.7, 0.2], [1, 0, 1, 1, 0], threshold=0.5)
    assert (precision, recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_paragraph_chunks_join_short_paragraphs():
    text = "\n\n".join(["x" * 300] * 7)
    chunks = paragraph_chunks(text, chunk_chars=1000)
    assert [c.count("x") for c in chunks] == [1200, 900]
    assert paragraph_chunks("short") == ["short"]


GOOD_WORDS = ("the function returns a value when the argument is valid and the loop terminates after each "
              "iteration of the sequence so the result is defined by the expression").split()
BAD_WORDS = "click here buy now free offer winner casino cheap deal subscribe login password viagra".split()


def _good(rng):
    return " ".join(" ".join(rng.choice(GOOD_WORDS) for _ in range(12)).capitalize() + "." for _ in range(6))


def _bad(rng):
    return " ".join(rng.choice(BAD_WORDS + GOOD_WORDS[:5]) for _ in range(60)) + " !!! $$$"


def test_classifier_separates_planted_good_from_bad_text():
    rng = random.Random(0)
    good, bad = [_good(rng) for _ in range(60)], [_bad(rng) for _ in range(60)]
    classifier, report = train_classifier(good, bad, seed=0, num_buckets=1 << 14)
    assert report["heldout_auc"] > 0.99 and report["heldout_accuracy"] > 0.95
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    fresh = classifier.predict_proba([_good(rng) for _ in range(20)] + [_bad(rng) for _ in range(20)])
    assert (fresh[:20] > 0.5).all() and (fresh[20:] < 0.5).all()


def test_an_empty_text_scores_from_the_bias_alone():
    classifier = FastTextClassifier(num_buckets=64, dim=4)
    classifier.b = 2.0
    assert classifier.predict_proba(["", "..."]) == pytest.approx([1 / (1 + np.exp(-2.0))] * 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A pool of prose — half explanatory sentences, half keyword spam — plus code, and a reference
    directory of good text."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("quality_corpus")
    for name in ("pool", "code", "reference"):
        (root / name).mkdir()
    for i in range(40):
        good = "\n\n".join(_good(rng) for _ in range(3))
        spam = "\n\n".join(" ".join(rng.choice(BAD_WORDS) for _ in range(15)).capitalize()
                           + ". " + _good(rng) for _ in range(3))
        (root / "pool" / f"good{i:02d}.txt").write_text(good)
        (root / "pool" / f"spam{i:02d}.txt").write_text(spam)
        (root / "reference" / f"ref{i:02d}.txt").write_text("\n\n".join(_good(rng) for _ in range(3)))
    for i in range(20):
        body = "\n".join(f"    x_{j} = f_{j}(x_{j - 1}, {rng.randint(0, 99)})" for j in range(1, 12))
        (root / "code" / f"mod{i}.txt").write_text(f"def g_{i}(x_0):\n{body}\n    return x_11\n")
    return root


def _prepare(corpus, out, *flags):
    main(["--out", str(out), "--source", f"prose={corpus / 'pool'}:0.5", "--source", f"code={corpus / 'code'}:0.5:code",
          "--vocab-size", "300", "--max-bytes", "300000", "--ppl-band", "0", "100", "--rule", "prose.min_words=50",
          "--quiet", *flags])
    return json.loads((out / "report.json").read_text())


def test_classifier_stage_is_in_the_funnel_and_keeps_the_top_fraction(corpus, tmp_path):
    report = _prepare(corpus, tmp_path / "a", "--classifier-reference", str(corpus / "reference"),
                      "--classifier-keep-fraction", "0.5")
    stages = {s["stage"]: s for s in report["funnel"]}
    names = [s["stage"] for s in report["funnel"]]
    assert names.index("perplexity") + 1 == names.index("classifier") < names.index("exact_dedup")
    before, after = stages["perplexity"]["by_source"], stages["classifier"]["by_source"]
    assert after["code"] == before["code"]  # code passes
    info = report["classifier"]
    assert info["scored"] == before["prose"]["documents"] == 80
    assert before["prose"]["documents"] - after["prose"]["documents"] == info["removed"] == 40
    # the "random" negatives are half good text themselves, so the held-out AUC is well below 1
    assert info["heldout_auc"] > 0.7 and 0 < info["documents_per_second"]
    assert all(os.path.basename(p).startswith("good") for p in info["highest"])
    assert all(os.path.basename(p).startswith("spam") for p in info["lowest"])


def test_classifier_threshold_and_off_switch(corpus, tmp_path):
    report = _prepare(corpus, tmp_path / "t", "--classifier-reference", str(corpus / "reference"),
                      "--classifier-threshold", "0.999999")
    assert report["classifier"]["threshold"] == pytest.approx(0.999999, abs=1e-4)
    assert report["classifier"]["removed"] == sum(s < 0.999999 for s in report["classifier"]["scores"])
    off = _prepare(corpus, tmp_path / "off", "--classifier-reference", "none")
    assert "classifier" not in [s["stage"] for s in off["funnel"]] and off["classifier"] == {"enabled": False}


@pytest.mark.parametrize("flags", [["--classifier-keep-fraction", "1.5"], ["--classifier-threshold", "-1"],
                                   ["--classifier-reference", "no/such/dir"], ["--classifier-epochs", "0"]])
def test_bad_classifier_flags_are_one_line_errors(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --classifier") and err.count("\n") == 1


def test_fineweb_lesson_holds_out_topics_the_classifier_never_sees():
    from pydoc_data.topics import topics

    from experiments.fineweb_lesson import split_topics
    held, reference = split_topics(0.2, seed=0)
    assert len(held) == round(0.2 * len(topics)) and len(held) + len(reference) == len(topics)
    assert not set(held) & set(reference)
    assert split_topics(0.2, seed=0) == (held, reference) and split_topics(0.2, seed=1)[0] != held
