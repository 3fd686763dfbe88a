"""Byte-level BPE: trained here, encoded by tiktoken (seed Part 1, section 1.3).

The algorithm (Sennrich et al. 2016; byte-level as in GPT-2):

    1. Pre-tokenise: split text into chunks with a regex (words, numbers, punctuation runs,
       whitespace), so that no merge ever crosses a chunk boundary ("dog." never becomes a token).
    2. Start from the 256 single bytes: every string is representable, nothing is unknown
       (the seed's "byte fallback" comes for free).
    3. Repeat until the vocabulary has `vocab_size` tokens: count every adjacent pair of tokens
       inside the chunks (weighted by how often each chunk occurs), merge the most frequent pair
       (a, b) into a new token ab everywhere, and give it the next rank.

Ties are broken deterministically: among pairs with the same count the smallest (id_a, id_b)
wins, so the same text always gives the same tokenizer.

Encoding a new text replays the merges by rank: inside each chunk, repeatedly merge the adjacent
pair whose concatenation has the lowest rank. That is exactly what tiktoken does (in Rust), so we
save the vocabulary as tiktoken's "ranks" file and let tiktoken encode; `encode_reference` is the
plain-Python version that the tests compare it with.

On disk (directory `tokenizer/`):

    tokenizer.tiktoken   one line per token: base64(token bytes) + " " + rank
    tokenizer.json       {"name", "pat_str", "special_tokens": {text: id}}

Special tokens get the ids right after the merges, in the order of `SPECIAL_TOKENS`.
"""

import base64
import collections
import functools
import heapq
import json
import os

import tiktoken

from data.errors import DataError

try:  # tiktoken depends on `regex`, so it is normally present; it knows \p{L} and possessive ++
    import regex as _regex

    HAVE_REGEX = True
except ImportError:  # pragma: no cover - only without tiktoken's dependency
    import re as _regex

    HAVE_REGEX = False

# GPT-4's split pattern (tiktoken's cl100k_base): contractions, letter runs with one optional
# leading non-letter, numbers of at most 3 digits, punctuation runs, newlines, other whitespace.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# The same idea in syntax that Python's `re` understands ([^\W\d_] = a letter), used only when
# the `regex` module is missing. tiktoken itself accepts either pattern.
SIMPLE_PATTERN = (
    r"""'(?:[sdmtSDMT]|ll|ve|re)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s"""
)
DEFAULT_PATTERN = CL100K_PATTERN if HAVE_REGEX else SIMPLE_PATTERN

# Ids vocab_size, vocab_size+1, ... in this order. <|pad|> is deliberately distinct from
# <|endoftext|>: if padding were end-of-text, masking the padding would also hide the stop token
# and an SFT/PPO model would never learn to stop. The chat tokens are reserved for SFT (Part 2.3).
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TEXT = SPECIAL_TOKENS[0]
PRETRAINED = ("gpt2", "cl100k_base")
RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer.json"

# Texts that catch tokenizer bugs, shared by the tests (tests/test_data_tokenizer.py trains a small
# BPE on SAMPLE_CORPUS and round-trips both lists) and by `train_gpt.py export-hf --verify`, which
# checks that another implementation of our tokenizer gives tiktoken's ids on them: repeated
# letters (overlapping merges), code, several scripts, combining marks, emoji with modifiers,
# control bytes, long runs of one character and of spaces, digit runs in several scripts, Unicode
# whitespace, and the empty string.
SAMPLE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't.\n" * 3,
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n\n\nprint(add(1, 2))  # 3\n" * 2,
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🙂 and 12345678 numbers, tabs\tand   spaces.",
    "aaaa aaaaa aaa baaa aab abab " * 5,
)
TRICKY_TEXTS = (
    "",
    "hello world",
    "   leading and trailing   \n\n\n",
    "e\u0301 (combining) vs é, Ω≈ç√∫, 🙂👍🏽, 中文, العربية, עברית, हिन्दी",
    "\x00\x01\x1f control \x7f and \ufffd replacement",
    "x" * 500 + " " * 300 + "y",
    "1234567890 3.14159 -42 1e10 0xFF, ٣٤٥٦ Ⅻ ½",
    "no-break\u00a0space, em\u2003space, \u3000, \x0b\x0c\x85 and line\u2028separators  \u00a0 \n",
)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _compiled(pattern):
    return _regex.compile(pattern)


def pretokenize(text, pattern=DEFAULT_PATTERN) -> list:
    """Split text into the chunks that BPE merges never cross; "".join(chunks) == text."""
    return _compiled(pattern).findall(text)


def count_chunks(texts, pattern=DEFAULT_PATTERN) -> collections.Counter:
    """Pre-tokenise every text and count each distinct chunk once: {chunk bytes: occurrences}.

    A corpus has far fewer distinct chunks than chunks (" the" occurs thousands of times), and
    BPE only needs each distinct chunk with its count, so training works on this table.
    """
    counts = collections.Counter()
    for text in texts:
        counts.update(pretokenize(text, pattern))
    return collections.Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


# classroom: begin merge_pair
def merge_pair(word, pair, new_id):
    """Replace each non-overlapping occurrence of `pair` in `word`, left to right, by `new_id`."""
    a, b = pair
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
# classroom: end merge_pair


def _check_vocab_size(vocab_size):
    if vocab_size < 256:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least the 256 byte tokens")


def _add_token(pair, token_bytes, ranks):
    """The id of the token a+b, creating it with the next rank unless those bytes already exist.

    Two different merges can spell the same bytes ((aa, a) and (a, aa) both give "aaa"); tiktoken
    keys ranks by bytes, so the second one reuses the first id instead of wasting a rank.
    """
    merged = token_bytes[pair[0]] + token_bytes[pair[1]]
    if merged not in ranks:
        ranks[merged] = len(token_bytes)
        token_bytes.append(merged)
    return ranks[merged]


def train_bpe_reference(texts, vocab_size, pattern=DEFAULT_PATTERN) -> dict:
    """The plainest BPE (as in minbpe): recount every pair after every merge. O(merges × corpus).

    Kept as the readable definition; `train_bpe` must return exactly the same ranks.
    """
    _check_vocab_size(vocab_size)
    chunk_counts = count_chunks(texts, pattern)
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    token_bytes = [bytes([i]) for i in range(256)]
    ranks = {t: i for i, t in enumerate(token_bytes)}
    while len(ranks) < vocab_size:
        pair_counts = collections.Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break  # every chunk is a single token: nothing left to merge
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # most frequent, then smallest ids
        new_id = _add_token(best, token_bytes, ranks)
        words = [merge_pair(word, best, new_id) for word in words]
    return ranks


def train_bpe(texts, vocab_size, pattern=DEFAULT_PATTERN) -> dict:
    """Byte-level BPE with incremental pair counts; returns tiktoken ranks {token bytes: rank}.

    `vocab_size` counts the 256 byte tokens plus the merges (special tokens come after).

    Same merges as `train_bpe_reference`, but instead of recounting all pairs after a merge of
    (a, b) we only revisit the chunks that contain (a, b) (`pair_words` indexes them) and apply
    the change of their pair counts:  count[p] += freq · (occurrences of p after − before).
    The most frequent pair comes from a heap of (−count, pair) entries; a count change pushes a
    new entry and stale ones are skipped when popped ("lazy deletion"). The heap order
    (−count, a, b) is the reference's tie-break: most frequent, then smallest ids.
    """
    _check_vocab_size(vocab_size)
    chunk_counts = count_chunks(texts, pattern)
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    token_bytes = [bytes([i]) for i in range(256)]
    ranks = {t: i for i, t in enumerate(token_bytes)}

    pair_counts = collections.defaultdict(int)
    pair_words = collections.defaultdict(set)  # pair -> indices of the words that (may) contain it
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed after it was pushed
        new_id = _add_token(pair, token_bytes, ranks)
        for index in pair_words.pop(pair):
            word = words[index]
            merged = merge_pair(word, pair, new_id)
            if len(merged) == len(word):
                continue  # the index was stale: an earlier merge already consumed this pair here
            change = collections.Counter()
            for old in zip(word, word[1:]):
                change[old] -= freqs[index]
            for new in zip(merged, merged[1:]):
                change[new] += freqs[index]
                pair_words[new].add(index)
            for p, delta in change.items():
                if delta:
                    pair_counts[p] += delta
                    if pair_counts[p] > 0:
                        heapq.heappush(heap, (-pair_counts[p], p))
                    else:
                        del pair_counts[p]
            words[index] = merged
    return ranks


# -----------------------------------------------------------------------------
# Encoding (plain-Python reference; tiktoken does the real work)
# -----------------------------------------------------------------------------

def encode_reference(text, mergeable_ranks, pattern=DEFAULT_PATTERN) -> list:
    """Encode `text` (no special tokens) by applying merges by rank, one chunk at a time.

    Inside a chunk: start from its bytes; while some adjacent pair concatenates to a known token,
    merge the pair of lowest rank (leftmost on ties). This is tiktoken's algorithm without Rust.
    """
    ids = []
    for chunk in pretokenize(text, pattern):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [mergeable_ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(mergeable_ranks[p] for p in parts)
    return ids


def special_token_ids(mergeable_ranks) -> dict:
    """{special text: id} with ids right after the merges, in the order of SPECIAL_TOKENS."""
    first = max(mergeable_ranks.values()) + 1
    return {text: first + i for i, text in enumerate(SPECIAL_TOKENS)}


def make_encoding(name, mergeable_ranks, pat_str=DEFAULT_PATTERN, special_tokens=None) -> tiktoken.Encoding:
    """Wrap ranks in a tiktoken.Encoding (special tokens default to SPECIAL_TOKENS after the merges)."""
    if special_tokens is None:
        special_tokens = special_token_ids(mergeable_ranks)
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)


# -----------------------------------------------------------------------------
# Saving and loading
# -----------------------------------------------------------------------------

def save_tokenizer(directory, mergeable_ranks, pat_str=DEFAULT_PATTERN, special_tokens=None, name=None) -> None:
    """Write `directory`/tokenizer.tiktoken (base64 token, space, rank) and tokenizer.json."""
    if special_tokens is None:
        special_tokens = special_token_ids(mergeable_ranks)
    os.makedirs(directory, exist_ok=True)
    name = name or f"bpe{len(mergeable_ranks)}"
    with open(os.path.join(directory, RANKS_FILE), "w") as f:
        for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"name": name, "pat_str": pat_str, "special_tokens": special_tokens}, f, indent=2)


def _read_ranks(path) -> dict:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"{path}:{lineno}: not a tiktoken ranks line (want 'base64token rank')") from None
    return ranks


def _tokenizer_directory(path):
    """Accept the tokenizer directory itself, or a prepared data directory holding `tokenizer/`."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    meta = os.path.join(path, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            return os.path.join(path, json.load(f).get("tokenizer", "tokenizer"))
    return os.path.join(path, "tokenizer")


def load_tokenizer(path_or_name) -> tiktoken.Encoding:
    """A saved tokenizer directory, or a pretrained tiktoken name ("gpt2", "cl100k_base").

    Pretrained vocabularies are downloaded by tiktoken on first use; offline (and not cached)
    that fails, and we say so in one line instead of a network traceback.
    """
    path_or_name = str(path_or_name)
    if path_or_name in PRETRAINED and not os.path.isdir(path_or_name):
        try:
            return tiktoken.get_encoding(path_or_name)
        except Exception as e:
            raise DataError(f"tokenizer '{path_or_name}': tiktoken cannot load it here (no network and "
                            f"not cached: {type(e).__name__}); train one with `python -m data.prepare`") from None
    if not os.path.isdir(path_or_name):
        raise DataError(f"tokenizer '{path_or_name}': neither a tokenizer directory nor one of {PRETRAINED}")
    directory = _tokenizer_directory(path_or_name)
    config_path = os.path.join(directory, CONFIG_FILE)
    ranks_path = os.path.join(directory, RANKS_FILE)
    for p in (config_path, ranks_path):
        if not os.path.isfile(p):
            raise DataError(f"{p}: tokenizer file not found")
    try:
        with open(config_path) as f:
            config = json.load(f)
        pat_str, special_tokens = config["pat_str"], config["special_tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{config_path}: not a tokenizer config ({type(e).__name__}: {e})") from None
    ranks = _read_ranks(ranks_path)
    try:
        return tiktoken.Encoding(config.get("name", "bpe"), pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens={k: int(v) for k, v in special_tokens.items()})
    except Exception as e:
        raise DataError(f"{directory}: tiktoken rejected the tokenizer ({type(e).__name__}: {e})") from None
