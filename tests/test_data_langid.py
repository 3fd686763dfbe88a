"""data/langid.py: naive Bayes by hand, the byte n-gram features, held-out accuracy on the shipped corpus,
the .mo reader, and the language stage of data.prepare (funnel, flags)."""

import json
import random
import struct

import numpy as np
import pytest

from data import langid
from data.langid import (LanguageIdentifier, byte_ngram_buckets, clean_message, language_filter, naive_bayes_fit,
                         read_corpus, read_mo)
from data.prepare import main
from data.sources import Document


def test_naive_bayes_fit_by_hand():
    counts = np.array([[3, 0, 1], [0, 2, 2]])
    log_prior, log_likelihood = naive_bayes_fit(counts, [1, 3], alpha=0.5)
    assert np.exp(log_prior) == pytest.approx([0.25, 0.75])
    # class 0: (3.5, 0.5, 1.5) / (4 + 1.5); class 1: (0.5, 2.5, 2.5) / (4 + 1.5)
    assert np.exp(log_likelihood) == pytest.approx(np.array([[3.5, 0.5, 1.5], [0.5, 2.5, 2.5]]) / 5.5)
    _, big = naive_bayes_fit(np.random.default_rng(0).integers(0, 9, size=(4, 50)), [1, 1, 1, 1], alpha=0.1)
    assert np.exp(big).sum(axis=1) == pytest.approx(np.ones(4))


def test_scores_are_prior_plus_counts_times_log_likelihood():
    identifier = LanguageIdentifier(orders=(1,), num_buckets=1 << 10).fit(["aaa b", "ccc d", "aab"], ["x", "y", "x"])
    text = "abca"
    buckets = byte_ngram_buckets(text, (1,), 1 << 10)
    expected = [identifier.log_prior[c] + sum(identifier.log_likelihood[c, g] for g in buckets) for c in range(2)]
    assert identifier.scores(text) == pytest.approx(expected, rel=1e-5)
    assert identifier.predict(["aaaa", "cccc"]) == ["x", "y"]


def test_byte_ngrams_cover_every_position_and_are_deterministic():
    text = "Grüße"  # 7 UTF-8 bytes, padded to 9
    buckets = byte_ngram_buckets(text, (1, 2, 3, 4), 1 << 20)
    assert len(buckets) == 9 + 8 + 7 + 6
    assert buckets.tolist() == byte_ngram_buckets(text, (1, 2, 3, 4), 1 << 20).tolist()
    assert len(byte_ngram_buckets("", (1, 2), 64)) == 2 + 1  # just the two padding spaces
    assert byte_ngram_buckets("AB", (2,), 1 << 20).tolist() == byte_ngram_buckets("ab", (2,), 1 << 20).tolist()


def test_identifies_held_out_sentences_of_eleven_languages():
    identifier = LanguageIdentifier().fit(*read_corpus(split="train"))
    texts, labels = read_corpus(split="test")
    assert len(set(labels)) == 11 and len(texts) > 800
    predicted = identifier.predict(texts)
    accuracy = langid.accuracy_by_language(predicted, labels)
    assert np.mean([p == l for p, l in zip(predicted, labels)]) > 0.97
    assert min(accuracy.values()) > 0.9, accuracy
    # whole sentences written here, not from the catalogs
    assert identifier.predict(["The quick brown fox jumps over the lazy dog near the river bank.",
                               "Der schnelle braune Fuchs springt über den faulen Hund am Flussufer.",
                               "Le renard brun rapide saute par-dessus le chien paresseux près de la rivière.",
                               "El rápido zorro marrón salta sobre el perro perezoso junto al río."]) == ["en", "de", "fr", "es"]


def test_train_and_test_splits_share_no_sentence():
    train, test = (set(zip(*read_corpus(split=split))) for split in ("train", "test"))
    assert len(train) > 3000 and len(test) > 800 and not train & test


def _write_mo(path, catalog, charset="latin-1"):
    """A GNU .mo file, written by hand from the format's description."""
    catalog = {"": f"Content-Type: text/plain; charset={charset}\n", **catalog}
    keys = sorted(catalog)
    originals = [k.encode(charset) for k in keys]
    translations = [catalog[k].encode(charset) for k in keys]
    n, header = len(keys), 28
    table_o, table_t = header, header + 8 * n
    data_start = table_t + 8 * n
    blob, entries_o, entries_t = b"", [], []
    for s in originals:
        entries_o.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    for s in translations:
        entries_t.append((len(s), data_start + len(blob)))
        blob += s + b"\0"
    raw = struct.pack("<7I", 0x950412DE, 0, n, table_o, table_t, 0, 0)
    raw += b"".join(struct.pack("<2I", *e) for e in entries_o) + b"".join(struct.pack("<2I", *e) for e in entries_t)
    path.write_bytes(raw + blob)


def test_read_mo_decodes_with_the_header_charset(tmp_path):
    _write_mo(tmp_path / "x.mo", {"Cannot open file %s": "Impossible d'ouvrir le fichier « %s »"})
    # the header (the empty original) names the charset and is not a message
    assert read_mo(tmp_path / "x.mo") == {"Cannot open file %s": "Impossible d'ouvrir le fichier « %s »"}


def test_clean_message_removes_placeholders_and_short_messages():
    assert clean_message("E37: No write since last change (add ! to override)") == \
        "No write since last change (add ! to override)"
    assert clean_message("Save &As %s to\n<b>%d</b> other files") == "Save As to other files"
    assert clean_message('Cannot open "%s" for writing') == "Cannot open for writing"
    assert clean_message("Open %s") is None


def _documents(language, n, split="test"):
    texts = [t for t, l in zip(*read_corpus(split=split)) if l == language]
    return [Document(" ".join(texts[i:i + 5]), "prose", f"{language}{i}", "prose") for i in range(0, 5 * n, 5)]


def test_language_filter_keeps_the_target_languages_and_passes_code():
    documents = _documents("en", 5) + _documents("de", 5) + _documents("fr", 5)
    documents.append(Document("def f(x):\n    return x  # Rückgabe des Werts", "code", "f.py", "code"))
    kept, removed, report = language_filter(documents, ["en", "de"])
    assert [d.origin for d in removed] == [d.origin for d in documents if d.origin.startswith("fr")]
    assert report["by_language"] == {"en": 5, "de": 5, "fr": 5} and report["removed"] == 5
    assert kept[-1].kind == "code" and report["labelled"] == 15 and report["documents_per_second"] > 0
    with pytest.raises(langid.DataError, match="--languages"):
        language_filter(documents, ["xx"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("langid_corpus")
    words = "the river and the mountain were quiet while the teacher told a story to every student".split()
    for i in range(30):
        sentences = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(12)]
        (root / f"en{i:02d}.txt").write_text(" ".join(sentences))
    german = [t for t, l in zip(*read_corpus(split="train")) if l == "de"]
    for i in range(3):
        (root / f"de{i}.txt").write_text(". ".join(german[40 * i:40 * i + 40]) + ".")
    return root


def test_language_stage_is_in_the_funnel_and_respects_its_flag(corpus, tmp_path):
    common = ["--source", f"prose={corpus}", "--vocab-size", "280", "--max-bytes", "100000", "--ppl-band", "0", "100",
              "--rule", "prose.min_words=50", "--quiet"]
    main(["--out", str(tmp_path / "en"), *common])
    report = json.loads((tmp_path / "en" / "report.json").read_text())
    names = [s["stage"] for s in report["funnel"]]
    assert names[:4] == ["loaded", "normalised", "language", "quality"]
    assert report["language"]["by_language"] == {"en": 30, "de": 3} and report["language"]["removed"] == 3
    assert report["funnel"][1]["documents"] - report["funnel"][2]["documents"] == 3
    main(["--out", str(tmp_path / "any"), *common, "--languages", "any"])
    report = json.loads((tmp_path / "any" / "report.json").read_text())
    assert "language" not in [s["stage"] for s in report["funnel"]] and report["language"] == {"enabled": False}
    main(["--out", str(tmp_path / "de"), *common, "--languages", "de"])
    report = json.loads((tmp_path / "de" / "report.json").read_text())
    assert report["funnel"][2]["documents"] == 3


def test_bad_languages_flag_is_a_one_line_error(tmp_path, capsys):
    for value in ("xx", ","):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "o"), "--languages", value, "--source", f"p={tmp_path}", "--quiet"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --languages") and err.count("\n") == 1, err
