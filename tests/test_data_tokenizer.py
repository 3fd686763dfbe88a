"""BPE training and the tiktoken round trip (data/tokenizer.py, seed section 1.3)."""

import random

import pytest

from data.errors import DataError
from data.tokenizer import (CL100K_PATTERN, SAMPLE_CORPUS, SIMPLE_PATTERN, SPECIAL_TOKENS, TRICKY_TEXTS, count_chunks,
                            encode_reference, load_tokenizer, make_encoding, merge_pair, save_tokenizer, train_bpe,
                            train_bpe_reference)

CORPUS = list(SAMPLE_CORPUS)
UNICODE_SAMPLES = list(TRICKY_TEXTS)


@pytest.fixture(scope="module")
def ranks():
    return train_bpe(CORPUS, 256 + 120)


@pytest.fixture(scope="module")
def encoding(ranks):
    return make_encoding("test", ranks)


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 7) == [7, 7, 3]


def test_first_merges_of_a_hand_worked_corpus():
    """Worked by hand; each text is one pre-tokenised chunk, and a pair counts once per occurrence in a
    chunk times the chunk's count:

        chunks   "aaa" ×2, "ab" ×2, "ba" ×3
        pairs    (a,a) 2·2 = 4,  (b,a) 3,  (a,b) 2                 → aa = 256, and "aaa" becomes [aa, a]
                 (b,a) 3,  (a,b) 2,  (aa,a) 2                      → ba = 257
                 (a,b) 2 = (aa,a) 2: the smaller ids (97, 98) win  → ab = 258
                 (aa,a) 2                                          → aaa = 259; no pair is left
    Counting each distinct chunk once would give ab = 257 (after aa every pair counts 1); breaking the
    tie towards larger ids would give aaa = 258."""
    texts = ["aaa"] * 2 + ["ab"] * 2 + ["ba"] * 3
    expected = {b"aa": 256, b"ba": 257, b"ab": 258, b"aaa": 259}
    for train in (train_bpe, train_bpe_reference):
        merges = {t: r for t, r in train(texts, 300).items() if r >= 256}  # 300: more merges than pairs
        assert merges == expected, train.__name__
        assert {t: r for t, r in train(texts, 258).items() if r >= 256} == {b"aa": 256, b"ba": 257}
    encoding = make_encoding("hand", train_bpe(texts, 300))
    assert encoding.encode_ordinary("aaa ab ba") == [259, 32, 258, 32, 257]  # chunks "aaa", " ab", " ba"


def test_fast_training_equals_the_plain_reference(ranks):
    assert train_bpe_reference(CORPUS, 256 + 120) == ranks


def test_fast_and_reference_agree_on_random_two_letter_strings():
    # One-chunk words over {a, b} make many equal counts (tie-breaks) and repeated byte strings.
    rng = random.Random(0)
    texts = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 30))) for _ in range(200)]
    fast, reference = train_bpe(texts, 300), train_bpe_reference(texts, 300)
    assert fast == reference
    assert sorted(fast.values()) == list(range(len(fast)))  # ranks contiguous, no duplicate bytes


def test_vocabulary_size_and_ranks(ranks):
    assert len(ranks) == 256 + 120
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))


def test_counts_each_distinct_chunk_once():
    counts = count_chunks(["the cat the cat the"])
    assert counts[b" cat"] == 2 and counts[b"the"] == 1 and counts[b" the"] == 2


def test_tiktoken_ids_equal_reference_encoder(ranks, encoding):
    for text in CORPUS + UNICODE_SAMPLES:
        assert encoding.encode_ordinary(text) == encode_reference(text, ranks), text


@pytest.mark.parametrize("text", UNICODE_SAMPLES + CORPUS)
def test_round_trip_unicode(encoding, text):
    assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_round_trip_arbitrary_bytes(encoding):
    rng = random.Random(1)
    for _ in range(20):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        assert encoding.decode_bytes(encoding._encode_bytes(data)) == data  # byte-level: nothing unknown


def test_special_token_text_in_data_stays_text(encoding, ranks):
    eot = encoding.eot_token
    assert eot == len(ranks)  # specials come right after the merges
    assert [encoding.encode_single_token(t) for t in SPECIAL_TOKENS] == list(range(len(ranks), len(ranks) + 6))
    ids = encoding.encode_ordinary("<|endoftext|> and <|pad|>")
    assert eot not in ids and len(ids) > 2
    assert encoding.decode(ids) == "<|endoftext|> and <|pad|>"
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [eot]


def test_save_and_load(tmp_path, ranks, encoding):
    save_tokenizer(tmp_path / "tok", ranks, CL100K_PATTERN)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.n_vocab == len(ranks) + len(SPECIAL_TOKENS)
    assert loaded.eot_token == len(ranks)
    assert loaded.encode_single_token("<|pad|>") == len(ranks) + 1
    for text in CORPUS:
        assert loaded.encode_ordinary(text) == encoding.encode_ordinary(text)
    line = (tmp_path / "tok" / "tokenizer.tiktoken").read_text().splitlines()[65]
    assert line.split()[1] == "65"  # "base64 rank" per line


def test_corrupt_tokenizer_file_names_file_and_line(tmp_path, ranks):
    save_tokenizer(tmp_path, ranks)
    ranks_file = tmp_path / "tokenizer.tiktoken"
    lines = ranks_file.read_text().splitlines()
    lines[3] = "not-a-valid-line"
    ranks_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"tokenizer\.tiktoken:4:"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer"):
        load_tokenizer(tmp_path / "nowhere")


def test_pretrained_names_load_or_fail_clearly(monkeypatch):
    import tiktoken

    # Whether tiktoken itself can load "gpt2" here decides which answer is right.
    try:
        available = tiktoken.get_encoding("gpt2").n_vocab == 50257
    except Exception:  # noqa: BLE001 — offline and not cached: any error tiktoken raises
        available = False
    if available:
        assert load_tokenizer("gpt2").n_vocab == 50257
    else:
        with pytest.raises(DataError, match="tokenizer 'gpt2': tiktoken cannot load it here"):
            load_tokenizer("gpt2")
    # Both branches, whatever this machine can do: a download that fails is one clear DataError naming the
    # error; an encoding tiktoken returns is returned as it is.
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="tokenizer 'cl100k_base': .*ConnectionError"):
        load_tokenizer("cl100k_base")
    fake = make_encoding("gpt2", {bytes([i]): i for i in range(256)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake if name == "gpt2" else offline(name))
    assert load_tokenizer("gpt2") is fake


def test_simple_pattern_without_regex_module_also_round_trips():
    ranks = train_bpe(CORPUS, 300, SIMPLE_PATTERN)
    enc = make_encoding("simple", ranks, SIMPLE_PATTERN)
    for text in CORPUS:
        assert enc.decode(enc.encode_ordinary(text)) == text
        assert enc.encode_ordinary(text) == encode_reference(text, ranks, SIMPLE_PATTERN)


def test_vocab_size_below_256_is_rejected():
    with pytest.raises(DataError, match="--vocab-size"):
        train_bpe(CORPUS, 100)


def test_pretokenize_covers_every_character():
    from data.tokenizer import pretokenize

    for text in CORPUS + UNICODE_SAMPLES:
        assert "".join(pretokenize(text)) == text
    assert pretokenize("Hello world's 12345!!\n\n  x") == ["Hello", " world", "'s", " ", "123", "45", "!!\n\n", " ",
                                                             " x"]


def test_merge_pair_matches_str_replace():
    """str.replace is left to right and non-overlapping too: spell the ids as characters and compare."""
    rng = random.Random(0)
    for _ in range(300):
        word = [rng.randrange(3) for _ in range(rng.randrange(12))]
        pair = (rng.randrange(3), rng.randrange(3))
        original = list(word)
        expected = "".join(map(chr, word)).replace(chr(pair[0]) + chr(pair[1]), chr(9))
        assert merge_pair(word, pair, 9) == [ord(c) for c in expected]
        assert word == original  # the input word is left alone
