"""Language-identification benchmark: our naive Bayes over byte n-grams (data/langid.py) against `py3langid`
(langid.py's model, Lui & Baldwin 2012, trained on 97 languages of web, Wikipedia and government text).

    python bench/langid.py [--documents 400]

Two test sets:
  1. the held-out split of our shipped corpus (data/langid_corpus: translated gettext messages of 11
     languages; ours trained on the other split) — accuracy of each, py3langid restricted to the same
     11 languages (its documented set_languages) and unrestricted;
  2. prose documents of the default corpus (stdlib docstrings, comments, .txt/.rst files, the Language
     Reference; first 2,000 bytes) — no labels, so: how often each calls a document English, and how
     often the two agree.
Speed: texts per second on one core, each the time of identifying the whole set once.

`py3langid` is optional (pip install py3langid); without it only our numbers are printed.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import curate, langid, sources  # noqa: E402


def timed(function, texts):
    start = time.perf_counter()
    labels = [function(t) for t in texts]
    return labels, len(texts) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=400, help="default-corpus prose documents to label")
    args = p.parse_args()
    ours = langid.default_identifier()
    predict_ours = lambda text: ours.predict([text])[0]  # noqa: E731
    texts, labels = langid.read_corpus(split="test")
    documents = sources.stdlib_prose_source().load(10**9, 0, [])[:args.documents]
    documents = [curate.normalise_text(d.text)[0][:langid.MAX_BYTES] for d in documents]
    documents = [d for d in documents if d]

    methods = [("ours (naive Bayes, 11 languages)", predict_ours)]
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        everything = LanguageIdentifier.from_model_file(MODEL_FILE)
        restricted = LanguageIdentifier.from_model_file(MODEL_FILE)
        restricted.set_languages(ours.languages)
        methods += [("py3langid, same 11 languages", lambda t: restricted.classify(t)[0]),
                    ("py3langid, all 97 languages", lambda t: everything.classify(t)[0])]
    except ImportError:
        print("py3langid not installed (pip install py3langid): its rows are left out")

    print(f"1. held-out sentences of data/langid_corpus: {len(texts)} in {len(set(labels))} languages")
    print("| identifier | accuracy | worst language | sentences/s |")
    print("|---|---|---|---|")
    for name, function in methods:
        predicted, speed = timed(function, texts)
        accuracy = sum(a == b for a, b in zip(predicted, labels)) / len(labels)
        per_language = langid.accuracy_by_language(predicted, labels)
        worst = min(per_language, key=per_language.get)
        print(f"| {name} | {accuracy:.3f} | {worst} {per_language[worst]:.3f} | {speed:,.0f} |")

    print(f"\n2. default-corpus prose documents (first {langid.MAX_BYTES} bytes): {len(documents)}")
    print("| identifier | labelled English | agreement with ours | documents/s |")
    print("|---|---|---|---|")
    reference, _ = timed(predict_ours, documents)
    for name, function in methods:
        predicted, speed = timed(function, documents)
        english = sum(x == "en" for x in predicted) / len(predicted)
        agreement = sum(a == b for a, b in zip(predicted, reference)) / len(predicted)
        print(f"| {name} | {english:.3f} | {agreement:.3f} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
