"""Tests for `train_gpt.py export-hf` and data/hf_tokenizer.py: our checkpoints as Hugging Face GPT-2.

The always-run tests need only torch: the exported state dict comes back through our own GPT-2
import with identical logits, and the exported merge list, replayed by a plain merge-list BPE
written here, gives tiktoken's ids. With `transformers` / `tokenizers` installed (a test-only
dependency, never a runtime one) the export is also loaded by them and compared with ours.
"""

import argparse
import json
import os
import random
from dataclasses import asdict

import pytest
import torch

import dpo
import ppo
import sft
import hf_gpt2
import train_gpt as tg
from data.errors import DataError
from data.hf_tokenizer import bytes_to_unicode, chat_template, oniguruma_pattern, recover_merges, verify_hf_tokenizer
from data.tokenizer import (CL100K_PATTERN, SAMPLE_CORPUS, SPECIAL_TOKENS, TRICKY_TEXTS, load_tokenizer, pretokenize,
                            save_tokenizer, train_bpe)

TEXTS = [*SAMPLE_CORPUS, *TRICKY_TEXTS, "<|endoftext|> typed as text <|end|><|user|>"]
_rng = random.Random(0)
NUMBERS = " ".join(str(_rng.randrange(10 ** _rng.randint(1, 9))) for _ in range(300))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: abc 123"},
        {"role": "assistant", "content": "cba 321"}, {"role": "user", "content": "Ünïcödé 🙂 and\nnewlines  "}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Our BPE (GPT-4's split pattern) trained on the tokenizer tests' corpus and some numbers
    (digit merges such as "34" that a wrongly split 12345678 would use), saved as data.prepare does."""
    directory = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    save_tokenizer(directory, train_bpe([*SAMPLE_CORPUS, NUMBERS], 256 + 400), CL100K_PATTERN, name="test")
    return directory


def tiny_policy(vocab_size, bias=True, seed=0):
    """A small GPT whose weights are far from their initialisation (non-zero biases, LayerNorm
    gains ≠ 1, logits of order 1), so a transposed or misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = tg.GPT(tg.GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def write_checkpoint(path, model, tokenizer, stage):
    """`model` in the checkpoint layout of one stage, written by that stage's own function."""
    if stage == "pretrain":
        checkpoint = {"model": model.state_dict(), "config": asdict(model.config), "step": 1, "tokenizer": tokenizer}
    elif stage == "sft":
        args = argparse.Namespace(init="base.pt", init_gpt2=None)
        checkpoint = sft.make_sft_checkpoint(model, 1, 0, 1.0, tokenizer, args, {})
    elif stage == "ppo":
        args = argparse.Namespace(sft="s", reward_model="r", algo="ppo")
        checkpoint = ppo.ppo_checkpoint(model, 1, tokenizer, args, {})
    else:
        checkpoint = dpo.make_checkpoint(model, 1, tokenizer, argparse.Namespace(sft="s"), "dpo", 0.1, {})
    tg.atomic_save(checkpoint, path)
    return path


def export(tmp_path, model, tokenizer, stage="sft", *flags):
    out = str(tmp_path / f"hf_{stage}")
    checkpoint = write_checkpoint(str(tmp_path / f"{stage}.pt"), model, tokenizer, stage)
    tg.main(["export-hf", checkpoint, "--out", out, *flags])
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids))[0]


# ----------------------------------------------------------------------------- weights, always

@pytest.mark.parametrize("stage", ["pretrain", "sft", "ppo", "dpo"])
def test_exported_weights_load_back_with_identical_logits(tmp_path, tokenizer_dir, stage):
    enc = load_tokenizer(tokenizer_dir)
    model = tiny_policy(enc.n_vocab)
    out = export(tmp_path, model, tokenizer_dir, stage)
    state_dict = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    config = json.load(open(os.path.join(out, "config.json")))
    assert torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"])  # the tied head
    assert state_dict["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    back = hf_gpt2.gpt2_from_hf_state_dict(state_dict, n_head=config["n_head"]).eval()
    ids = [[enc.eot_token, *enc.encode_ordinary(text)][:64] for text in SAMPLE_CORPUS[:2]]
    ids = [row[:min(map(len, ids))] for row in ids]
    assert torch.equal(logits(back, ids), logits(model, ids))
    assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"],
            config["n_inner"]) == (enc.n_vocab, 64, 32, 2, 2, 128)
    chat_model = stage != "pretrain"
    assert config["eos_token_id"] == enc.encode_single_token("<|end|>" if chat_model else "<|endoftext|>")


def test_a_model_without_biases_exports_with_zero_biases(tmp_path, tokenizer_dir):
    enc = load_tokenizer(tokenizer_dir)
    model = tiny_policy(enc.n_vocab, bias=False)
    hf = hf_gpt2.gpt2_to_hf_state_dict(model)
    assert torch.count_nonzero(hf["transformer.h.0.mlp.c_fc.bias"]) == 0 and hf["transformer.ln_f.bias"].shape == (32,)
    back = hf_gpt2.gpt2_from_hf_state_dict(hf, n_head=2).eval()
    ids = [[enc.eot_token, *enc.encode_ordinary(SAMPLE_CORPUS[0])][:40]]
    assert torch.allclose(logits(back, ids), logits(model, ids), atol=1e-6)


def test_what_gpt2_cannot_express_is_refused_in_one_line(tmp_path, tokenizer_dir, capsys):
    enc = load_tokenizer(tokenizer_dir)
    model = tiny_policy(enc.n_vocab)
    reward_model = tmp_path / "reward.pt"
    tg.atomic_save({"model": {}, "config": asdict(model.config), "stage": "reward", "tokenizer": tokenizer_dir},
                   str(reward_model))
    foreign = tmp_path / "rope.pt"
    tg.atomic_save({"model": model.state_dict(), "config": {**asdict(model.config), "rotary": True},
                    "tokenizer": tokenizer_dir}, str(foreign))
    small = tmp_path / "small.pt"
    small_model = tiny_policy(300)
    tg.atomic_save({"model": small_model.state_dict(), "config": asdict(small_model.config),
                    "tokenizer": tokenizer_dir}, str(small))
    for path, message in [(reward_model, "a reward model"), (foreign, "rotary=True has no counterpart"),
                          (small, "300 embeddings")]:
        with pytest.raises(SystemExit) as exit_info:
            tg.main(["export-hf", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- tokenizer, always

def test_bytes_to_unicode_is_gpt2s_printable_alphabet():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("~")] == "~" and table[0xE9] == "é"  # printable: themselves
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "\u0100"  # the rest from U+0100


def merge_list_encode(text, merges, vocab, pattern):
    """Hugging Face's BPE, written plainly: inside each chunk (a chunk that is a token is taken
    whole), apply the earliest-listed merge present, leftmost first, until none applies."""
    table = bytes_to_unicode()
    priority = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for chunk in pretokenize(text, pattern):
        parts = [table[b] for b in chunk.encode("utf-8")]
        if "".join(parts) in vocab:
            parts = ["".join(parts)]
        while len(parts) > 1:
            ranked = [(priority.get((a, b), len(merges)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(ranked)
            if best == len(merges):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def test_recovered_merges_reproduce_tiktoken_ids(tmp_path, tokenizer_dir):
    enc = load_tokenizer(tokenizer_dir)
    out = export(tmp_path, tiny_policy(enc.n_vocab), tokenizer_dir)
    model = json.load(open(os.path.join(out, "tokenizer.json"), encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ")) for m in model["merges"]]
    assert len(merges) == len(enc._mergeable_ranks) - 256 and model["vocab"]["Ġthe"] == enc.encode_single_token(" the")
    rng = random.Random(0)
    noise = ["".join(rng.choice("ab 1") for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in TEXTS + noise:
        assert merge_list_encode(text, merges, model["vocab"], CL100K_PATTERN) == enc.encode_ordinary(text), text


def test_merges_of_a_hand_made_vocabulary():
    ranks = {bytes([i]): i for i in range(256)}
    for token in [b"ab", b"abc", b"bc", b"abcbc"]:
        ranks[token] = len(ranks)
    # "abcbc" (rank 259): with merges below its rank, a·b·c·b·c → ab·c·bc → abc·bc.
    assert recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"abc", b"bc")]
    with pytest.raises(DataError, match="not a merge of two lower-ranked tokens"):
        recover_merges({**{bytes([i]): i for i in range(256)}, b"xyz": 256})  # no xy or yz to build it from


def test_possessive_intervals_become_atomic_groups():
    converted = oniguruma_pattern(CL100K_PATTERN)
    assert r"(?>\p{N}{1,3})" in converted and r"\p{N}{1,3}+" not in converted
    assert oniguruma_pattern(r"[a\]b]{2}+|\s++$") == r"(?>[a\]b]{2})|\s++$"
    with pytest.raises(Exception, match="cannot be converted"):
        oniguruma_pattern(r"(ab){1,3}+")


def test_chat_template_is_written_only_with_chat_tokens(tmp_path, tokenizer_dir):
    enc = load_tokenizer(tokenizer_dir)
    config = json.load(open(os.path.join(export(tmp_path, tiny_policy(enc.n_vocab), tokenizer_dir),
                                         "tokenizer_config.json")))
    assert config["chat_template"] == chat_template() and config["eos_token"] == "<|end|>"
    plain = tmp_path / "plain_tokenizer"
    save_tokenizer(str(plain), enc._mergeable_ranks, CL100K_PATTERN, {"<|endoftext|>": len(enc._mergeable_ranks)})
    out = export(tmp_path, tiny_policy(enc.n_vocab), str(plain), "pretrain")
    config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert "chat_template" not in config and config["pad_token"] is None


# ----------------------------------------------------------------------------- with transformers / tokenizers

def test_transformers_gives_our_logits(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    enc = load_tokenizer(tokenizer_dir)
    model = tiny_policy(enc.n_vocab)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export(tmp_path, model, tokenizer_dir)).eval()
    for text in TEXTS:
        ids = [[enc.eot_token, *enc.encode_ordinary(text)][:64]]
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits
        assert (theirs - logits(model, ids)).abs().max() < 1e-5, text
    assert logits(model, ids).abs().max() > 1  # logits of a size where an error would show


def test_hf_tokenizer_gives_tiktoken_ids_on_the_tokenizer_test_corpus(tmp_path, tokenizer_dir):
    pytest.importorskip("tokenizers")
    enc = load_tokenizer(tokenizer_dir)
    out = export(tmp_path, tiny_policy(enc.n_vocab), tokenizer_dir)
    rng = random.Random(1)
    noise = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 100))).decode("utf-8", "replace")
             for _ in range(50)] + [str(rng.randrange(10 ** 12)) for _ in range(50)]
    assert verify_hf_tokenizer(out, enc, TEXTS + noise) == []


def test_apply_chat_template_gives_render_chat_tokens(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    enc = load_tokenizer(tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(export(tmp_path, tiny_policy(enc.n_vocab), tokenizer_dir))
    for messages in [CHAT, CHAT[1:3], CHAT[:1]]:
        rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(rendered) == sft.render_chat(messages, enc)[0]
    prompt = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(prompt) == sft.render_prompt(CHAT, enc)
    assert tok.eos_token_id == sft.chat_tokens(enc).end and tok.pad_token_id == sft.chat_tokens(enc).pad


def test_verify_flag_passes_and_catches_a_broken_export(tmp_path, tokenizer_dir, capsys):
    pytest.importorskip("transformers")
    enc = load_tokenizer(tokenizer_dir)
    model = tiny_policy(enc.n_vocab)
    out = export(tmp_path, model, tokenizer_dir, "sft", "--verify")
    printed = capsys.readouterr().out
    assert f"verify tokenizer: {len(TEXTS)} texts, 0 mismatches" in printed and "verify model:" in printed
    weights = os.path.join(out, "pytorch_model.bin")
    state_dict = torch.load(weights, weights_only=True)
    state_dict["transformer.h.0.attn.c_proj.weight"] = state_dict["transformer.h.0.attn.c_proj.weight"].t().contiguous()
    torch.save(state_dict, weights)
    with pytest.raises(SystemExit, match="differs from the checkpoint"):
        hf_gpt2.verify_hf_export(out, model, enc)


def test_verify_says_clearly_when_the_packages_are_absent(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    enc = load_tokenizer(tokenizer_dir)
    export(tmp_path, tiny_policy(enc.n_vocab), tokenizer_dir, "sft", "--verify")
    printed = capsys.readouterr().out
    assert "verify tokenizer: skipped, the `tokenizers` package is not installed" in printed
    assert "verify model: skipped, the `transformers` package is not installed" in printed
