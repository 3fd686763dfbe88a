"""Our tokenizer in Hugging Face's format: `tokenizer.json` and `tokenizer_config.json`.

tiktoken (which encodes for us, data/tokenizer.py) and Hugging Face's `tokenizers` run the same
byte-level BPE (seed 1.3) but store it differently:

    tiktoken      ranks {token bytes: rank}; inside a chunk, repeatedly merge the adjacent pair
                  whose *concatenation* has the lowest rank.
    tokenizers    a vocabulary {token string: id} and an ordered list of merges "left right";
                  inside a chunk, repeatedly apply the earliest listed merge that is present.
                  Strings spell bytes with GPT-2's printable alphabet (`bytes_to_unicode`).

So the conversion spells every token with that alphabet (id = rank) and recovers, for every
multi-byte token, the pair whose merge created it (`recover_merges`), listed in rank order. The
split pattern is our regex, translated where Oniguruma (the regex engine of `tokenizers`) reads it
differently (`oniguruma_pattern`). The special tokens become "added tokens" with their ids.

Written with the standard library only; `verify_hf_tokenizer` (used by `train_gpt.py export-hf
--verify` and the tests) loads the result with `tokenizers` when that package is installed.
"""

import json
import os
import re

from data.errors import DataError
from data.tokenizer import END_OF_TEXT, SPECIAL_TOKENS

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_, PAD, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def bytes_to_unicode():
    """GPT-2's printable spelling of the 256 bytes: {byte: one character}.

    A vocabulary is stored as JSON strings, where raw bytes would not do: a space or a newline is
    invisible, control bytes are unreadable, and bytes 0x80-0xFF alone are not UTF-8 at all. The
    188 bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (control bytes, space, DEL, no-break space, soft hyphen) take the
    characters U+0100, U+0101, … in byte order — so a space is 'Ġ' (U+0120) and a newline 'Ċ'.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def spell(token_bytes, table):
    """A token's bytes as the string `tokenizers` stores: one character of `table` per byte."""
    return "".join(table[b] for b in token_bytes)


def bpe_split(token, mergeable_ranks):
    """The two tokens (left, right) whose merge created `token`, recovered from the ranks alone.

    BPE training makes a token t by merging two tokens that already existed, so both have lower
    ranks than t. Replaying the encoder on t's bytes with only the merges of rank < rank(t)
    (merge the adjacent pair whose concatenation has the lowest rank, leftmost on ties) rebuilds
    the pieces that training had just before it made t, and stops one merge short of t. A token
    that this replay cannot reach in exactly two pieces was not made by BPE: refused.
    """
    rank = mergeable_ranks[token]
    parts = [bytes([b]) for b in token]
    missing = [part for part in parts if part not in mergeable_ranks]
    if missing:
        raise DataError(f"tokenizer has no token for the single byte {missing[0]!r}: not a byte-level BPE")
    while len(parts) > 2:
        pair_ranks = [mergeable_ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # lowest rank, leftmost on ties
        if pair_ranks[best] >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise DataError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens: "
                        f"cannot recover its BPE merge")
    return parts[0], parts[1]


def recover_merges(mergeable_ranks):
    """The merge list [(left bytes, right bytes), …] of a tiktoken vocabulary, in rank order:
    one merge per multi-byte token, the one `bpe_split` recovers."""
    by_rank = sorted(mergeable_ranks.items(), key=lambda item: item[1])
    return [bpe_split(token, mergeable_ranks) for token, _ in by_rank if len(token) > 1]


# One operand of a quantifier: \p{L}-style class, an escape, a [...] set (escapes inside), or one character.
_OPERAND = r"(\\[pP]\{[^}]*\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]{}|])"
_POSSESSIVE_INTERVAL = re.compile(_OPERAND + r"(\{\d+(?:,\d*)?\})\+")


def oniguruma_pattern(pat_str):
    """Our split pattern in the regex dialect of `tokenizers` (Oniguruma, Ruby syntax).

    One construct reads differently there: X{1,3}+ is possessive in Python's `regex` and in
    tiktoken ("at most 3 digits, no backtracking"), but Ruby syntax takes it as (X{1,3})+, "any
    number of digits", so 12345678 would become one chunk instead of 123|456|78. An atomic group
    (?>X{1,3}) means the same as the possessive form in both dialects. ?+ *+ ++ are possessive
    in both and stay.
    """
    converted = _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pat_str)
    if re.search(r"\{\d+(?:,\d*)?\}\+", converted):
        raise DataError(f"split pattern {pat_str!r}: a possessive {{n,m}}+ on a group cannot be converted")
    return converted


def tokenizer_json(enc):
    """The `tokenizer.json` of a tiktoken encoding, as a dict: byte-level BPE with our split
    pattern, vocabulary and merges from the ranks, special tokens as added tokens."""
    table = bytes_to_unicode()
    ranks = enc._mergeable_ranks
    added_tokens = [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True}
                    for text, token_id in sorted(enc._special_tokens.items(), key=lambda item: item[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,  # tiktoken does not normalise: the text's bytes are what is encoded
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": oniguruma_pattern(enc._pat_str)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,  # no token is added around the text (render_chat adds its own)
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # tiktoken takes a chunk that is itself a token whole, without merging; say so. (With
            # merges recovered by bpe_split, merging reaches that token anyway: the tests find no
            # case where this flag changes an id, but a vocabulary not trained by BPE could.)
            "ignore_merges": True,
            "vocab": {spell(token, table): rank for token, rank in ranks.items()},
            # "left right": unambiguous, as the byte alphabet spells a space as Ġ.
            "merges": [f"{spell(left, table)} {spell(right, table)}" for left, right in recover_merges(ranks)],
        },
    }


def chat_template():
    """A Jinja chat template that renders what `sft.render_chat` renders (and, with
    add_generation_prompt, what `sft.render_prompt` renders):

        <|endoftext|><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>…[<|assistant|>]

    One difference no string template can avoid: `render_chat` encodes message contents with
    `encode_ordinary`, so a user who types "<|end|>" gets ordinary text, while Hugging Face
    renders the template to one string and then finds special tokens anywhere in it.
    """
    roles = json.dumps(CHAT_ROLES)
    return ("{%- set role_tokens = " + roles + " -%}"
            + END_OF_TEXT
            + "{%- for message in messages -%}"
            "{%- if message['role'] not in role_tokens -%}"
            "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
            "{%- endif -%}"
            "{{ role_tokens[message['role']] + message['content'] + '" + END + "' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}")


def tokenizer_config(enc, model_max_length, eos_token):
    """`tokenizer_config.json`: which class loads tokenizer.json, the named special tokens, the
    context length and — when the vocabulary has our chat tokens — the chat template."""
    specials = enc._special_tokens
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "bos_token": END_OF_TEXT, "eos_token": eos_token, "unk_token": None,
              "pad_token": PAD if PAD in specials else None,
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    if all(token in specials for token in SPECIAL_TOKENS):
        config["chat_template"] = chat_template()
    return config


def write_json(path, obj):
    """JSON to a temporary file, then rename (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_hf_tokenizer(directory, enc, model_max_length, eos_token=END_OF_TEXT):
    """Write tokenizer.json and tokenizer_config.json for `enc` into `directory`."""
    if END_OF_TEXT not in enc._special_tokens:
        raise DataError(f"tokenizer '{enc.name}' has no {END_OF_TEXT} token")
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, HF_TOKENIZER_FILE), tokenizer_json(enc))
    write_json(os.path.join(directory, HF_TOKENIZER_CONFIG_FILE), tokenizer_config(enc, model_max_length, eos_token))


def verify_hf_tokenizer(directory, enc, texts):
    """Encode `texts` with the exported tokenizer.json (Hugging Face `tokenizers`) and with tiktoken.

    Compared both ways a text can be read: as untrusted data (tiktoken's encode_ordinary; in
    `tokenizers`, encode_special_tokens=True keeps "<|end|>" typed in a text as ordinary text)
    and with special tokens recognised (encode(…, allowed_special="all")), and decoded back.
    Returns a list of one-line mismatch descriptions (empty: identical). Needs `tokenizers`.
    """
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(os.path.join(directory, HF_TOKENIZER_FILE))
    as_data = hasattr(hf, "encode_special_tokens")  # tokenizers ≥ 0.15 can read special-token text as text
    mismatches = []
    for text in texts:
        ours_with_specials = enc.encode(text, allowed_special="all")
        comparisons = [("with special tokens", ours_with_specials, hf.encode(text, add_special_tokens=False).ids)]
        if as_data:
            hf.encode_special_tokens = True
            comparisons.append(("ordinary", enc.encode_ordinary(text), hf.encode(text, add_special_tokens=False).ids))
            hf.encode_special_tokens = False
        for what, ours, theirs in comparisons:
            if ours != theirs:
                first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                mismatches.append(f"{text[:40]!r}: ids differ ({what}) from token {first}: "
                                  f"tiktoken {ours[first:first + 4]} vs tokenizers {theirs[first:first + 4]}")
        if hf.decode(ours_with_specials, skip_special_tokens=False) != enc.decode(ours_with_specials):
            mismatches.append(f"{text[:40]!r}: decoded text differs")
    return mismatches
