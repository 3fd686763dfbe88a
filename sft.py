"""sft.py — supervised fine-tuning: a pretrained GPT becomes a chat assistant (seed Part 2).

Read beside Part 2 of the seed chapter (shared/seeds/000_…) and the "Supervised Fine Tuning"
section of the blog post (shared/seeds/004_…). In the blog's notation the data set is
D = {(x⁽ⁱ⁾, y⁽ⁱ⁾)}, i = 1..N — a prompt x (system + user turns) and an ideal response y — and
the policy π_θ is our GPT. SFT maximises the likelihood of the responses only:

    L_SFT(θ) = − Σ_i Σ_j log π_θ(y_j⁽ⁱ⁾ | x⁽ⁱ⁾, y_<j⁽ⁱ⁾)           (blog, "Supervised Fine Tuning")

The prompt tokens are context, never targets (seed 2.3, "Why mask the prompt?"). The file reads
top to bottom:

    1. Chat template   special tokens, render_chat / render_prompt, vocabulary growth   (2.3)
    2. Masked loss     shift by one, response-only targets, sequence log-probs        (2.3; blog)
    3. Packing         several conversations per row, document ids, positions restart  (2.4)
    4. Data            messages / Alpaca / ShareGPT JSONL, the built-in tasks, split   (2.2)
    5. Training        lower LR, warmup ratio + cosine, epochs, early stopping          (2.4)
    6. Evaluation      batched greedy decoding judged on held-out tasks, base vs SFT
    7. Chat            an interactive terminal chat, tokens streamed
    8. Command line

Its settings are declared once, in `Hyperparameters` at the top (value, help, range; settings.py).
Later stages import from here: `render_chat`, `render_prompt`, `chat_tokens`, `sequence_logprobs`,
`token_logprobs`, `shift_targets`, `collate_examples`, `generate_responses`, `evaluate_tasks`.

Usage:
    python sft.py --init runs/default/pretrain/model.pt --out runs/default/sft
    python sft.py --init-gpt2 gpt2_hf_state_dict.pt --tokenizer gpt2 --out runs/gpt2/sft
    python sft.py --data my_chats.jsonl --epochs 3 --lr 3e-4
    python sft.py --eval runs/default/sft/model.pt
    python sft.py --chat runs/default/sft/model.pt
"""

import argparse
import codecs
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.errors import DataError
from data.hf_tokenizer import write_json
from data.tasks import generate_tasks, judge, sft_conversations
from data.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer
from data.stages import begin_stage, finish_stage, finished_stage, stage_fingerprint
from hf_gpt2 import gpt2_from_hf_state_dict
from settings import build_parser_from, check_ranges, comma_list, runtime_flags, setting
from train_gpt import (GPT, ConfigError, KVCache, atomic_save, autocast_for, get_lr, load_resume_point, log_line,
                       model_from_checkpoint, perplexity, pick_device, random_state, read_metrics,
                       sample_next_token, save_resume_point, set_random_state, truncate_metrics)

# Hyperparameters: one line each — value, what it does, allowed range (settings.py makes the flags).
INIT = "runs/default/pretrain/model.pt"  # --init's value when neither --init nor --init-gpt2 is given


@dataclass
class Hyperparameters:
    # modes (default: fine-tune)
    chat: str = setting(None, "chat with a fine-tuned checkpoint in the terminal", metavar="CKPT", runtime=True,
                        group="modes (default: fine-tune)")
    eval: list = setting(None, "judge checkpoints on held-out tasks and exit; several: the pipeline's comparison "
                               "table", metavar="[NAME=]CKPT", nargs="+", group="modes (default: fine-tune)")
    reference: str = setting(None, "--eval: the NAME of π_ref for KL and paired differences (default sft)",
                             group="modes (default: fine-tune)")
    eval_out: str = setting(None, "--eval: write DIR/eval.json (a cached stage)", metavar="DIR",
                            group="modes (default: fine-tune)")
    eval_temperatures: list = setting(None, "--eval: also the --reference model with its logits divided by each T "
                                            "(e.g. 0.8,0.7): what plain sharpening buys in sampled gold, per nat of KL",
                                      type=comma_list(float), group="modes (default: fine-tune)")
    force: bool = setting(False, "redo the stage even if its outputs match this configuration", runtime=True,
                          group="modes (default: fine-tune)")
    # starting point
    init: str = setting(None, f"our pretrained checkpoint (default {INIT})", group="starting point")
    init_gpt2: str = setting(None, "a Hugging Face GPT-2 state dict saved with torch.save", metavar="FILE",
                             group="starting point")
    gpt2_n_head: int = setting(12, "attention heads of the GPT-2 model (12 for 124M)", check="> 0",
                               group="starting point")
    tokenizer: str = setting(None, "tokenizer directory or tiktoken name (default: the checkpoint's; gpt2 for "
                                   "--init-gpt2)", group="starting point")
    # data (seed 2.2)
    data: str = setting(None, "SFT JSONL: messages, Alpaca or ShareGPT records (default: built-in tasks)",
                        group="data")
    num_conversations: int = setting(10_000, "built-in task conversations to generate when --data is not given",
                                     check="> 0", group="data")
    families: list = setting(None, "task families for data and evaluation, e.g. arith,sort", type=comma_list(str),
                             group="data")
    levels: list = setting(None, "task levels for data and evaluation, e.g. 1,2", type=comma_list(int), group="data")
    val_fraction: float = setting(0.05, "share of conversations held out for validation loss", check="(0, 1)",
                                  group="data")
    seq_len: int = setting(None, "packed row length (default: the model's block size)", check="≥ 0", group="data")
    no_packing: bool = setting(False, "one conversation per row (padded) instead of packing", group="data")
    # training (seed 2.4)
    out: str = setting("runs/default/sft", "output directory: model.pt, metrics.jsonl, sft.png, eval.json",
                       group="training")
    epochs: int = setting(3, "passes over the training conversations (seed 2.4: \"train for 2-3 epochs\")",
                          check="> 0", group="training")
    max_steps: int = setting(None, "stop after this many steps (default: all epochs)", check="≥ 0", group="training")
    batch_size: int = setting(16, "packed rows per optimizer step", check="> 0", group="training")
    lr: float = setting(1e-3, "peak learning rate: 3× below pretraining's 3e-3 (seed 2.4: lower than pretraining)",
                        check="> 0", group="training")
    min_lr: float = setting(None, "final learning rate of the cosine (default lr/10)", group="training")
    warmup_ratio: float = setting(0.03, "share of the steps spent in linear warmup (seed 2.4's warmup_ratio=0.03)",
                                  check="[0, 1)", group="training")
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices", check="≥ 0", group="training")
    grad_clip: float = setting(1.0, "max global gradient norm", check="> 0", group="training")
    dropout: float = setting(None, "dropout during SFT (default: the checkpoint's)", check="[0, 1)", group="training")
    patience: int = setting(3, "early stop after this many evaluations without a better val loss", check="> 0",
                            group="training")
    evals_per_epoch: int = setting(4, "validation-loss evaluations per epoch", check="> 0", group="training")
    log_every: int = setting(10, "steps between progress lines", check="> 0", runtime=True, group="training")
    checkpoint_every: int = setting(None, "steps between resume points (default: at every validation); a rerun "
                                          "after an interruption continues from the last one", check="≥ 0",
                                    runtime=True, group="training")
    attention: str = setting(None, "attention implementation (default: flash on CUDA, sdpa on CPU)",
                             choices=["naive", "sdpa", "flash"], group="training")
    device: str = setting("auto", "cpu, cuda, cuda:1, … (auto: cuda if available)", runtime=True, group="training")
    seed: int = setting(1337, "seed for data, shuffling, held-out tasks and sampling", group="training")
    # evaluation and chat
    eval_tasks: int = setting(300, "held-out task prompts judged for the base and the SFT model (0: skip)",
                              check="≥ 0", group="evaluation and chat")
    eval_batch_size: int = setting(64, "prompts generated in parallel", check="> 0", runtime=True,
                                   group="evaluation and chat")
    max_new_tokens: int = setting(32, "longest reply in tokens", check="> 0", group="evaluation and chat")
    temperature: float = setting(0.7, "chat sampling temperature (0 = greedy)", runtime=True,
                                 group="evaluation and chat")
    top_k: int = setting(50, "chat: sample among the k most likely tokens (0: all of them)", runtime=True,
                         group="evaluation and chat")
    system: str = setting(None, "chat: a system message to start the conversation", runtime=True,
                          group="evaluation and chat")


# The flags left out of the stage fingerprint (data.stages.stage_fingerprint): speed, printing, bookkeeping.
RUNTIME_FLAGS = runtime_flags(Hyperparameters)
NEW_ROW_NOISE = 0.1            # new embedding rows: mean + N(0, (0.1·σ_column)²)
HELDOUT_SEED = 0               # the held-out evaluation set is the same whatever --seed is
EXAMPLES_SIDE_BY_SIDE = 8      # --eval with several models: held-out prompts shown with every model's reply

IGNORE_INDEX = -100            # target value that F.cross_entropy (and GPT.forward) skips

# =============================================================================
# 1. The chat template (seed 2.3)
# =============================================================================

END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

ChatTokens = namedtuple("ChatTokens", "end_of_text pad system user assistant end")


def chat_tokens(enc):
    """The ids of the six special tokens in `enc` (ConfigError if one is missing)."""
    try:
        return ChatTokens(*(enc.encode_single_token(t) for t in SPECIAL_TOKENS))
    except KeyError as e:
        raise ConfigError(f"tokenizer '{enc.name}' has no special token {e.args[0]!r}: "
                          f"extend it with sft.with_chat_tokens") from None


def render_chat(messages, enc):
    """Token ids of a conversation and its loss mask: 1 on the tokens the assistant must produce.

        <|endoftext|> <|system|> S <|end|> <|user|> U₁ <|end|> <|assistant|> A₁ <|end|> <|user|> U₂ …
              0           0     0    0       0     0    0          0        1    1        0     0

    Every assistant turn is a target, its closing <|end|> included — that token is how the model
    learns to stop. The role tokens, including <|assistant|>, are prompt: at inference
    `render_prompt` supplies them. Contents are encoded with `encode_ordinary`, so text such as
    "<|end|>" typed by a user stays ordinary text and cannot forge a turn boundary. The leading
    <|endoftext|> is what the pretrained model saw in front of every document.
    """
    tokens = chat_tokens(enc)
    ids, mask = [tokens.end_of_text], [0]
    for message in messages:
        body = enc.encode_ordinary(message["content"]) + [tokens.end]
        is_target = int(message["role"] == "assistant")
        ids += [enc.encode_single_token(ROLE_TOKENS[message["role"]])] + body
        mask += [0] + [is_target] * len(body)
    return ids, mask


def render_prompt(messages, enc):
    """The prompt x for generation: the conversation so far, then <|assistant|> (the model's cue)."""
    ids, _ = render_chat(messages, enc)
    return ids + [chat_tokens(enc).assistant]


def with_chat_tokens(enc):
    """`enc` with any of SPECIAL_TOKENS it lacks appended after its largest id; (encoding, added).

    Our own tokenizer already has them. GPT-2's encoding has only <|endoftext|>, so SFT from GPT-2
    adds <|pad|>, <|system|>, <|user|>, <|assistant|>, <|end|> as ids 50257-50261 (seed 2.3:
    "special tokens are added to the tokenizer vocabulary during SFT").
    """
    specials = dict(enc._special_tokens)
    added = [t for t in SPECIAL_TOKENS if t not in specials]
    if not added:
        return enc, []
    for token in added:
        specials[token] = enc.max_token_value + 1 + added.index(token)
    extended = tiktoken.Encoding(f"{enc.name}_chat", pat_str=enc._pat_str,
                                 mergeable_ranks=enc._mergeable_ranks, special_tokens=specials)
    return extended, added


@torch.no_grad()
def grow_vocabulary(model, vocab_size, generator=None):
    """Give the token embedding (and the tied LM head) rows up to `vocab_size`; old rows unchanged.

    New rows start at the mean of the existing embeddings plus small noise, e_new = μ + ε,
    ε ~ N(0, (NEW_ROW_NOISE·σ)²) with σ the per-dimension spread of the old rows. Why the mean
    (Hewitt 2021): the head is tied, so a new token's logit is h·e_new = h·μ = mean_i(h·e_i) ≤
    log(mean_i exp(h·e_i)) by Jensen — a new token starts with at most about an average token's
    probability, and the pretrained distribution over the old tokens is barely disturbed. A random
    N(0, 0.02) row can instead land far from the trained embeddings, with a logit that is large
    for some contexts. The noise makes the new tokens distinct from each other (otherwise
    <|user|> and <|assistant|> would start as the same input). Returns the number of rows added.
    """
    old = model.token_embedding.weight
    n_old, n_embd = old.shape
    if vocab_size <= n_old:
        return 0
    noise = torch.randn(vocab_size - n_old, n_embd, generator=generator).to(old)
    new_rows = old.mean(dim=0) + NEW_ROW_NOISE * old.std(dim=0) * noise
    model.token_embedding = nn.Embedding(vocab_size, n_embd, device=old.device, dtype=old.dtype)
    model.token_embedding.weight.copy_(torch.cat([old, new_rows]))
    model.lm_head = nn.Linear(n_embd, vocab_size, bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = model.token_embedding.weight  # keep the head tied
    model.config = replace(model.config, vocab_size=vocab_size)
    return vocab_size - n_old


# =============================================================================
# 2. The masked loss and sequence log-probabilities (seed 2.3; blog, "Supervised Fine Tuning")
# =============================================================================

# classroom: begin shift_targets
def shift_targets(ids, mask):
    """Inputs x_0..x_{T-2} and targets x_1..x_{T-1}: the logits at position t predict token t+1.

    A target is kept only where mask = 1 (a response token); elsewhere it is IGNORE_INDEX, so
    prompt and padding tokens are context, not targets. ids, mask: (B, T) → two (B, T−1).
    """
    targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return ids[:, :-1], targets
# classroom: end shift_targets


def token_logprobs(logits, targets):
    """log π_θ(target_t | context_≤t) at every position, (B, T) in fp32; 0 where target = IGNORE_INDEX.

    log softmax(z)_y = z_y − log Σ_v exp(z_v) — computed in fp32 even under bf16 autocast: the
    values are sums of many small differences, and bf16 keeps only ~3 significant digits.
    """
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def sequence_logprobs(model, ids, mask, position_ids=None, doc_ids=None, reduction="sum", return_count=False):
    """log π_θ(y | x) = Σ_t log π_θ(y_t | x, y_<t) for each row: a (B,) fp32 tensor.

    ids (B, T): prompt + response (+ padding); mask (B, T): 1 on the response tokens y, aligned
    with ids (as `render_chat` returns it), 0 on prompt and padding. reduction="sum" is what DPO
    compares (Part 4); reduction="mean" divides by |y|, the per-token average that SimPO and ORPO
    use. return_count also returns |y| per row. position_ids / doc_ids (B, T) are for
    left-padded rows (padding: doc id −1). Gradients flow: wrap in torch.no_grad() for π_ref.
    """
    inputs, targets = shift_targets(ids, mask)
    hidden = model.hidden_states(inputs, None if position_ids is None else position_ids[:, :-1],
                                 None if doc_ids is None else doc_ids[:, :-1])
    # The LM head and its softmax run on the response positions only: the prompt's logits would be
    # thrown away, and on these short answers they were most of the vocabulary work.
    scored = targets != IGNORE_INDEX
    per_token = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    per_token[scored] = token_logprobs(model.lm_head(hidden[scored])[None], targets[scored][None])[0]
    logps = per_token.sum(dim=1)
    count = scored.sum(dim=1)
    if reduction == "mean":
        logps = logps / count.clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return (logps, count) if return_count else logps


def collate_examples(examples, pad_token):
    """Right-pad (ids, mask) pairs into (B, T) tensors ready for `sequence_logprobs`.

    Padding goes after the real tokens with mask 0: causal attention never lets a real token
    see it, so no position or document ids are needed.
    """
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_token, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (example_ids, example_mask) in enumerate(examples):
        ids[row, :len(example_ids)] = torch.tensor(example_ids)
        mask[row, :len(example_mask)] = torch.tensor(example_mask)
    return ids, mask


def sft_loss_sum(model, batch):
    """Σ over the batch's target tokens of −log π_θ(y_t | x, y_<t), and how many there are.

    The training loss is this sum divided by the count: a mean over *response tokens* (nats per
    token, comparable to pretraining). The blog divides Σ_i Σ_j by N examples instead; within a
    batch the two differ by a constant factor, and ours does not depend on how conversations
    are grouped into rows, so a packed batch has exactly the loss of the same examples unpacked.
    """
    logits, _ = model(batch.inputs, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
    return -token_logprobs(logits, batch.targets).sum(), (batch.targets != IGNORE_INDEX).sum()


# =============================================================================
# 3. Packing (seed 2.4, "Packing sequences")
# =============================================================================

@dataclass
class Batch:
    """(B, T) tensors of a training batch. Packed rows hold several conversations: positions
    restart at 0 and the document id changes at each one; padding has doc id −1, target −100."""

    inputs: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.inputs, self.targets, self.position_ids, self.doc_ids)))

    @property
    def num_targets(self):
        return int((self.targets != IGNORE_INDEX).sum())


def pack_rows(lengths, capacity):
    """First-fit packing: each example goes into the first row with room for it, else a new row.

    lengths[i] is the number of slots example i needs (its tokens − 1: inputs, not the last
    target). Rows with less room than the shortest example are closed, so the scan stays short.
    Returns the example indices of each row.
    """
    rows, room, open_rows = [], [], []
    shortest = min(lengths, default=0)
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"example {index} needs {length} slots, more than a row holds ({capacity})")
        row = next((r for r in open_rows if room[r] >= length), None)
        if row is None:
            row = len(rows)
            rows.append([])
            room.append(capacity)
            open_rows.append(row)
        rows[row].append(index)
        room[row] -= length
        if room[row] < shortest:
            open_rows.remove(row)
    return rows


def collate_rows(examples, rows, pad_token):
    """Concatenate each row's examples into a Batch, padded to the longest row."""
    length = max(sum(len(examples[i][0]) - 1 for i in row) for row in rows)
    shape = (len(rows), length)
    batch = Batch(torch.full(shape, pad_token), torch.full(shape, IGNORE_INDEX),
                  torch.zeros(shape, dtype=torch.long), torch.full(shape, -1))
    for r, row in enumerate(rows):
        start = 0
        for doc, index in enumerate(row):
            ids, mask = (torch.tensor(x)[None] for x in examples[index])
            inputs, targets = shift_targets(ids, mask)
            end = start + inputs.shape[1]
            batch.inputs[r, start:end] = inputs[0]
            batch.targets[r, start:end] = targets[0]
            batch.position_ids[r, start:end] = torch.arange(end - start)
            batch.doc_ids[r, start:end] = doc
            start = end
    return batch


def make_batches(examples, block_size, batch_size, pad_token, pack=True, seed=None):
    """Shuffle (when seed is given), pack into rows of at most block_size slots, group into batches.

    pack=False puts one example per row (padded): the same loss, more padding, slower.
    """
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ordered = [examples[i] for i in order]
    lengths = [len(ids) - 1 for ids, _ in ordered]
    rows = pack_rows(lengths, block_size) if pack else [[i] for i in range(len(ordered))]
    return [collate_rows(ordered, rows[i:i + batch_size], pad_token) for i in range(0, len(rows), batch_size)]


# =============================================================================
# 4. Data (seed 2.2): the ecosystem's JSONL formats, the built-in tasks, the split
# =============================================================================

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages_from_record(record, where):
    """A JSONL record in any of the three formats → [{"role", "content"}, ...].

        {"messages": [{"role": "user", "content": …}, …]}                    (OpenAI / TRL)
        {"instruction": …, "input": …, "output": …}                          (Alpaca)
        {"conversations": [{"from": "human" | "gpt" | "system", "value": …}]} (ShareGPT)
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ConfigError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
        messages = [{"role": t.get("role"), "content": t.get("content")} for t in turns]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ConfigError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} objects")
        for i, t in enumerate(turns):
            if t.get("from") not in SHAREGPT_ROLES:
                raise ConfigError(f"{where}: conversations[{i}]: 'from' must be one of "
                                  f"{sorted(SHAREGPT_ROLES)}, got {t.get('from')!r}")
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]
    elif "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        if not all(isinstance(record[k], str) for k in ("instruction", "output")) or not isinstance(extra, str):
            raise ConfigError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        prompt = record["instruction"] + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ConfigError(f"{where}: unknown format (keys {sorted(record)}); expected 'messages', "
                          f"'conversations' (ShareGPT) or 'instruction'+'output' (Alpaca)")
    check_messages(messages, where)
    return messages


def check_messages(messages, where):
    """An optional system message, then user/assistant turns alternating, ending with the assistant."""
    if not messages:
        raise ConfigError(f"{where}: empty conversation")
    for i, message in enumerate(messages):
        if message["role"] not in ROLE_TOKENS:
            raise ConfigError(f"{where}: message {i}: role must be system, user or assistant, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ConfigError(f"{where}: message {i}: content must be a string")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConfigError(f"{where}: message {i + len(messages) - len(turns)}: expected a {expected} "
                              f"turn, got {message['role']} (user and assistant must alternate)")
    if not turns or turns[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the conversation must end with an assistant turn (nothing to learn otherwise)")


def jsonl_records(path, what="data"):
    """(where, record) for each non-empty line of a JSONL file, `where` = "FILE:LINE" for errors.

    A missing file, a line that is not JSON and bytes that are not UTF-8 each become one clear
    ConfigError. reward.py and dpo.py read their files through this too.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                yield where, record
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_conversations(path):
    """Every conversation of a JSONL file, validated; errors name FILE:LINE."""
    conversations = [messages_from_record(record, where) for where, record in jsonl_records(path)]
    if not conversations:
        raise ConfigError(f"{path}: no conversations in the file")
    return conversations


def tokenize_conversations(conversations, enc, block_size):
    """(ids, mask) of each conversation that fits the context; and how many were dropped.

    A conversation of n tokens fills n − 1 input slots (the last token is only a target), so it
    fits when n − 1 ≤ block_size. Longer ones are dropped, not truncated: a cut-off response is
    a wrong answer that never reaches its <|end|>.
    """
    examples = [render_chat(messages, enc) for messages in conversations]
    kept = [example for example in examples if len(example[0]) - 1 <= block_size]
    return kept, len(examples) - len(kept)


def split_train_val(examples, val_fraction, seed):
    """A seeded random split: round(val_fraction · n) examples (at least 1) for validation."""
    if len(examples) < 2:
        raise ConfigError(f"need at least 2 conversations that fit the context (one for validation), "
                          f"got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# =============================================================================
# 5. Training (seed 2.4)
# =============================================================================

def load_base_model(args, device):
    """The model to fine-tune, its tokenizer (with the chat tokens), and the tokenizer reference.

    Either our pretrained checkpoint (--init) or a Hugging Face GPT-2 state dict (--init-gpt2).
    If the tokenizer lacks the chat tokens they are added, the embedding grows to match, and the
    extended tokenizer is saved under --out so the SFT checkpoint can name it.
    """
    overrides = {"attention": args.attention or ("flash" if device.type == "cuda" else "sdpa")}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.init_gpt2:
        imported = load_gpt2(args.init_gpt2, args.gpt2_n_head)
        model = GPT(replace(imported.config, **overrides))  # rebuilt: attention/dropout are read at construction
        model.load_state_dict(imported.state_dict())
        model.to(device)
        tokenizer_ref = args.tokenizer or "gpt2"
    else:
        path = args.init or INIT
        try:
            model, checkpoint = model_from_checkpoint(path, device, **overrides)
        except RuntimeError as e:
            first_line = str(e).splitlines()[0]
            raise ConfigError(f"{path}: weights do not match the checkpoint's config ({first_line})") from None
        tokenizer_ref = args.tokenizer or checkpoint.get("tokenizer")
        if not tokenizer_ref:
            raise ConfigError(f"{path}: the checkpoint names no tokenizer; pass --tokenizer")
    enc, added = with_chat_tokens(load_tokenizer(tokenizer_ref))
    if added:
        tokenizer_ref = os.path.join(args.out, "tokenizer")
        save_tokenizer(tokenizer_ref, enc._mergeable_ranks, enc._pat_str, enc._special_tokens, name=enc.name)
        print(f"tokenizer: added {', '.join(added)}; saved to {tokenizer_ref}")
    grown = grow_vocabulary(model, enc.n_vocab, torch.Generator().manual_seed(args.seed))
    if grown:
        print(f"embedding: {grown} new rows (mean of the old rows + noise), vocab_size {model.config.vocab_size}")
    return model, enc, tokenizer_ref


def load_gpt2(path, n_head):
    """A GPT from a Hugging Face GPT-2 state dict saved with torch.save (one clear error if not)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--init-gpt2 {path}: file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means a corrupt file
        raise ConfigError(f"--init-gpt2 {path}: corrupt or not a torch.save file ({type(e).__name__})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError(f"--init-gpt2 {path}: not a state dict (name → tensor)")
    try:
        return gpt2_from_hf_state_dict(state_dict, n_head=n_head)
    except KeyError as e:
        raise ConfigError(f"--init-gpt2 {path}: not a GPT-2 state dict (no {e.args[0]!r})") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"--init-gpt2 {path}: {e} (check --gpt2-n-head)") from None


def load_sft_data(args, enc, block_size):
    """Train and validation examples, from --data or from the built-in tasks (data/tasks.py)."""
    if args.data:
        conversations, source = load_conversations(args.data), args.data
    else:
        records = sft_conversations(args.num_conversations, seed=args.seed, families=args.families, levels=args.levels)
        conversations, source = [r["messages"] for r in records], "built-in tasks (data/tasks.py)"
    examples, dropped = tokenize_conversations(conversations, enc, block_size)
    if dropped:
        print(f"dropped {dropped} of {len(conversations)} conversations longer than the context "
              f"({block_size + 1} tokens)")
    if not examples:
        raise ConfigError(f"{args.data or '--num-conversations'}: no conversation fits the context "
                          f"of {block_size} tokens")
    train_examples, val_examples = split_train_val(examples, args.val_fraction, args.seed)
    print(f"data: {source}: {len(train_examples)} train / {len(val_examples)} val conversations")
    return train_examples, val_examples, dropped


@torch.no_grad()
def evaluate_val_loss(model, batches, device, autocast):
    """Validation L_SFT: Σ response-token NLL / number of response tokens, over all batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast:
            loss_sum, n = sft_loss_sum(model, batch.to(device))
        total += loss_sum.item()
        count += n.item()
    model.train(was_training)
    return total / max(count, 1)


def train_step(model, optimizer, batch, lr, grad_clip, device, autocast):
    """One AdamW update on the batch's mean response-token NLL; returns (loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss_sum, count = sft_loss_sum(model, batch.to(device))
    loss = loss_sum / count.clamp(min=1)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm


def make_sft_checkpoint(model, step, epoch, val_loss, tokenizer_ref, args, extra):
    """train_gpt's checkpoint layout ("model", "config", "step", "tokenizer") plus SFT entries."""
    return {"model": model.state_dict(), "config": asdict(model.config), "step": step, "tokenizer": tokenizer_ref,
            "val_loss": val_loss, "epoch": epoch, "stage": "sft",
            "sft": {"init": args.init_gpt2 or args.init or INIT, "chat_tokens": list(SPECIAL_TOKENS), **extra},
            "args": {k: v for k, v in vars(args).items()}}


class EarlyStopping:
    """Track the best validation loss; `should_stop` after `patience` evaluations without a better one.

    With a small SFT set the model soon starts to memorise it (seed 2.4, "Overfitting on SFT"):
    the train loss keeps falling while the validation loss turns up. We keep the checkpoint at
    the validation minimum and stop once it has not improved for a while.
    """

    def __init__(self, patience):
        self.patience = patience
        self.best = {"val_loss": math.inf, "step": None, "epoch": None}
        self.evals_without_gain = 0

    def update(self, val_loss, step, epoch):
        """Record an evaluation; True if it is the best so far."""
        if val_loss < self.best["val_loss"]:
            self.best = {"val_loss": val_loss, "step": step, "epoch": epoch}
            self.evals_without_gain = 0
            return True
        self.evals_without_gain += 1
        return False

    @property
    def should_stop(self):
        return self.evals_without_gain >= self.patience


def fit(model, optimizer, epochs, val_batches, schedule, save, metrics, args, device, autocast, resume=None,
        save_point=None):
    """The SFT loop: steps over the packed batches of each epoch, LR from warmup + cosine
    (train_gpt.get_lr), validation every schedule["eval_every"] steps, the best model saved by
    `save(step, epoch, val_loss)`. Returns (steps done, why it stopped, best evaluation).

    Every --checkpoint-every steps (default: at each validation) `save_point(step, state)` stores
    what the loop needs to go on: weights, AdamW moments, random state, early-stopping record.
    Given such a `resume` point, the loop restores it and skips the steps already done: the
    batches of every epoch are fixed up front, so the run continues as if never interrupted."""
    stopper = EarlyStopping(args.patience)
    checkpoint_every = args.checkpoint_every or schedule["eval_every"]

    def validate(step, epoch):
        val_loss = evaluate_val_loss(model, val_batches, device, autocast)
        improved = stopper.update(val_loss, step, epoch)
        log_line(metrics, {"step": step, "epoch": epoch, "val_loss": val_loss, "best": improved})
        print(f"step {step}: val loss {val_loss:.4f} (perplexity {perplexity(val_loss):.2f})"
              + (" — best so far, saved" if improved else ""))
        if improved:
            save(step, epoch, val_loss)

    if resume is None:
        validate(0, 0)  # the starting point is a candidate too: model.pt always exists
    else:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        stopper.best, stopper.evals_without_gain = resume["early_stopping"]
        set_random_state(resume["random"])  # dropout continues with the same masks
    step, total = 0, schedule["total_steps"]
    model.train()
    for epoch, batches in enumerate(epochs, 1):
        for batch in batches:
            if step == total:
                return step, f"--max-steps {args.max_steps} reached", stopper.best
            if resume is not None and step < resume["step"]:  # done before the interruption
                step += 1
                continue
            t0 = time.time()
            lr = get_lr(step + 1, schedule["warmup_steps"], total, args.lr, args.min_lr)
            loss, grad_norm = train_step(model, optimizer, batch, lr, args.grad_clip, device, autocast)
            step += 1
            log_line(metrics, {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "targets": batch.num_targets, "seconds": time.time() - t0})
            if step % args.log_every == 0:
                print(f"step {step}/{total} (epoch {epoch}): loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}")
            if step % schedule["eval_every"] == 0 or step == total:
                validate(step, epoch)
                if stopper.should_stop:
                    return step, f"early stop: no better validation loss in {args.patience} evaluations", stopper.best
            if save_point is not None and step % checkpoint_every == 0 and step < total:
                save_point(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "random": random_state(),
                                  "early_stopping": [stopper.best, stopper.evals_without_gain]})
    return step, f"{len(epochs)} epochs done", stopper.best


def train_sft(args):
    """Fine-tune, keep the best checkpoint by validation loss, judge base vs SFT on held-out tasks.
    A stage (data.stages.begin_stage): skipped when --out holds a finished run of this configuration
    and these inputs, resumed from its last resume point when it holds an interrupted one."""
    validate_args(args)
    started = time.time()
    tokenizer_dir = args.tokenizer if args.tokenizer and os.path.isdir(args.tokenizer) else None
    inputs = [args.init_gpt2 or args.init or INIT, args.data, tokenizer_dir]
    fingerprint = stage_fingerprint(args, RUNTIME_FLAGS, inputs)
    if finished_stage(args.out, "sft", fingerprint, args.force):
        with open(os.path.join(args.out, "eval.json")) as f:
            return json.load(f)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    model, enc, tokenizer_ref = load_base_model(args, device)
    pad = chat_tokens(enc).pad
    block_size = args.seq_len or model.config.block_size
    if block_size > model.config.block_size:
        raise ConfigError(f"--seq-len {block_size} exceeds the model's context (block_size={model.config.block_size})")
    train_examples, val_examples, dropped = load_sft_data(args, enc, block_size)
    heldout = heldout_tasks(args)
    # The inputs loaded: the stage begins (a fresh start, or the continuation of an interrupted one).
    decision = begin_stage(args.out, "sft", fingerprint, args.force)
    resume = load_resume_point(args.out, fingerprint) if decision == "resume" else None

    epochs, val_batches, schedule = epochs_and_schedule(train_examples, val_examples, block_size, pad, args)

    autocast = autocast_for(device)
    evaluation = {}
    if resume is not None:  # the base model's evaluation travels in the resume point: not redone
        evaluation = resume["evaluation"]
        print(f"resuming {args.out} after step {resume['step']}")
    elif heldout:
        evaluation["base"] = evaluate_tasks(model, enc, heldout, args.max_new_tokens, args.eval_batch_size,
                                            device, autocast)
        print_task_scores("base model", evaluation["base"])
    optimizer = model.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
    model_path = os.path.join(args.out, "model.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    extra = {"train_conversations": len(train_examples), "val_conversations": len(val_examples),
             "dropped_too_long": dropped, "seq_len": block_size, "packing": not args.no_packing}

    def save(step, epoch, val_loss):
        atomic_save(make_sft_checkpoint(model, step, epoch, val_loss, tokenizer_ref, args, extra), model_path)

    def save_point(step, state):
        save_resume_point(args.out, fingerprint, step, {**state, "evaluation": evaluation})

    if resume is not None:  # the lines logged after the resume point are logged again
        truncate_metrics(metrics_path, resume["step"], final_events=("stop", "eval_tasks"))
    with open(metrics_path, "w" if resume is None else "a") as metrics:
        steps, stop_reason, best = fit(model, optimizer, epochs, val_batches, schedule, save, metrics, args,
                                       device, autocast, resume, save_point)
        log_line(metrics, {"event": "stop", "step": steps, "reason": stop_reason, "best_step": best["step"],
                           "best_val_loss": best["val_loss"]})
        print(f"{stop_reason}; best val loss {best['val_loss']:.4f} at step {best['step']}")
        model.load_state_dict(load_sft_weights(model_path, device))
        if heldout:
            evaluation["sft"] = evaluate_tasks(model, enc, heldout, args.max_new_tokens, args.eval_batch_size,
                                               device, autocast)
            print_task_scores("SFT model", evaluation["sft"])
            for name, result in evaluation.items():
                log_line(metrics, {"event": "eval_tasks", "model": name, "step": best["step"] if name == "sft" else 0,
                                   **{k: v for k, v in result.items() if k != "examples"}})
    return finish_sft(args, fingerprint, started, evaluation, len(heldout), best, steps, stop_reason, device)


# ── first reading: skip to the end (printing and plots; then evaluation, chat, the command line) ──

def epochs_and_schedule(train_examples, val_examples, block_size, pad, args):
    """The packed batches of every epoch, the validation batches, and the LR/evaluation schedule.
    Every epoch reshuffles and repacks; the batches are built up front so that the LR schedule
    knows the total number of steps."""
    epochs = [make_batches(train_examples, block_size, args.batch_size, pad, not args.no_packing, seed=args.seed + e)
              for e in range(args.epochs)]
    val_batches = make_batches(val_examples, block_size, args.batch_size, pad, not args.no_packing)
    total_steps = min(sum(map(len, epochs)), args.max_steps or math.inf)
    schedule = {"total_steps": total_steps, "warmup_steps": round(args.warmup_ratio * total_steps),
                "eval_every": max(1, math.ceil(len(epochs[0]) / args.evals_per_epoch))}
    print_packing_and_schedule(epochs[0], len(train_examples), block_size, schedule, args)
    return epochs, val_batches, schedule


def finish_sft(args, fingerprint, started, evaluation, n_heldout, best, steps, stop_reason, device):
    """eval.json (the base and SFT scores, the best step), sft.png, and stage.json marked complete."""
    wall = time.time() - started
    summary = {**evaluation, "heldout_tasks": n_heldout, "best_step": best["step"],
               "best_val_loss": best["val_loss"], "steps": steps, "stop_reason": stop_reason,
               "wall_seconds": round(wall, 1), "device": str(device)}
    write_json(os.path.join(args.out, "eval.json"), summary)
    plot_sft(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "sft.png"))
    finish_stage(args.out, "sft", fingerprint, started,
                 {"base_gold": evaluation["base"]["mean_score"] if n_heldout else None,
                  "sft_gold": evaluation["sft"]["mean_score"] if n_heldout else None,
                  "best_val_loss": best["val_loss"], "best_step": best["step"], "steps": steps})
    print(f"saved {os.path.join(args.out, 'model.pt')} (best val loss {best['val_loss']:.4f}), eval.json, "
          f"sft.png in {wall:.0f}s")
    return summary

def print_packing_and_schedule(batches, n_conversations, block_size, schedule, args):
    rows = sum(len(b.inputs) for b in batches)
    slots = sum(b.inputs.numel() for b in batches)
    real = sum(int((b.doc_ids >= 0).sum()) for b in batches)
    targets = sum(b.num_targets for b in batches)
    print(f"packing: {n_conversations} conversations → {rows} rows of ≤{block_size} tokens; {real / slots:.0%} of "
          f"slots hold real tokens, {targets / real:.0%} of those are response targets")
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    print(f"schedule: {args.epochs} epochs × {len(batches)} steps (total {schedule['total_steps']}), warmup "
          f"{schedule['warmup_steps']}, lr {args.lr:g} → {min_lr:g} cosine, validation every "
          f"{schedule['eval_every']} steps, patience {args.patience}")


def print_task_scores(name, result):
    print(f"{name} on {result['n']} held-out tasks: mean gold score {result['mean_score']:.3f}, "
          f"exact match {result['exact_match']:.1%}, stopped with <|end|> {result['stopped']:.1%}")
    show_examples(result["examples"])


def load_sft_weights(path, device):
    return torch.load(path, map_location=device, weights_only=True)["model"]


def plot_train_val_loss(ax, records):
    """Train loss per step and validation loss per evaluation on one axis, the kept (best)
    checkpoint starred. Returns the (train, val) records. reward.py draws its curves with it too."""
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.plot(best["step"], best["val_loss"], "*", ms=15, color="gold", mec="black", label="kept checkpoint")
    return train, val


def plot_sft(metrics_path, png_path):
    """Train loss per step and validation loss per evaluation; a widening gap is overfitting.

    Epoch boundaries are dotted lines, the kept (best) checkpoint a star.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    train, _ = plot_train_val_loss(axes[0], read_metrics(metrics_path))
    for a, b in zip(train, train[1:]):
        if b["epoch"] != a["epoch"]:
            axes[0].axvline(a["step"], color="gray", ls=":", lw=1)
    # Log scale: the first steps (new chat tokens, unseen format) fall from ~ln(vocab); the late
    # train/validation gap, where overfitting shows, is a small difference at the bottom.
    axes[0].set(title="SFT loss on response tokens (nats/token)", xlabel="step", yscale="log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate (warmup + cosine)", xlabel="step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# =============================================================================
# 6. Evaluation: greedy answers to held-out tasks, judged
# =============================================================================

def left_pad(prompts, pad_token):
    """Left-pad token lists into (B, T) ids and a prompt mask (True on real tokens), so every
    prompt ends at the last column and generation continues all rows in step."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = True
    return ids, mask


@torch.no_grad()
def generate_responses(model, prompts, max_new_tokens, stop_token, pad_token, batch_size=64, temperature=0.0,
                       top_k=None, top_p=None, generator=None, device="cpu"):
    """Response token ids for each prompt (token lists), up to and including stop_token if emitted.

    Prompts are sorted by length and batched left-padded (train_gpt's KV-cached `generate`
    with prompt_mask), then returned in the original order. temperature 0 is greedy.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_token)
        if ids.shape[1] + max_new_tokens > model.config.block_size:
            raise ConfigError(f"a prompt of {ids.shape[1]} tokens + --max-new-tokens {max_new_tokens} exceeds the "
                              f"context (block_size={model.config.block_size})")
        out = model.generate(ids.to(device), max_new_tokens, temperature, top_k, top_p, eos_token=stop_token,
                             pad_token=pad_token, prompt_mask=mask.to(device), generator=generator)
        for i, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
            responses[i] = row[:row.index(stop_token) + 1] if stop_token in row else row
    model.train(was_training)
    return responses


def decode_response(enc, response_ids):
    """The response text, without its closing <|end|>."""
    end = chat_tokens(enc).end
    return enc.decode([t for t in response_ids if t != end])


def evaluate_tasks(model, enc, tasks, max_new_tokens=Hyperparameters.max_new_tokens, batch_size=64, device="cpu",
                   autocast=contextlib.nullcontext(), score=judge, keep_scores=False):
    """Greedy answers to `tasks` (data.tasks.Task), scored by the gold judge.

    Returns {"n", "mean_score", "exact_match", "stopped", "by_family", "examples"}: mean gold
    score in [0, 1], the share of exact answers (score 1), the share of replies that ended with
    <|end|> (a model that never learned to stop shows it here), per-family numbers, and examples;
    keep_scores adds every task's "scores" and "replies".
    """
    tokens = chat_tokens(enc)
    prompts = [render_prompt([{"role": "user", "content": t.prompt}], enc) for t in tasks]
    with autocast:
        responses = generate_responses(model, prompts, max_new_tokens, tokens.end, tokens.pad, batch_size,
                                       device=device)
    replies = [decode_response(enc, r) for r in responses]
    scores = [score(t, reply) for t, reply in zip(tasks, replies)]

    def summary(indices):
        return {"n": len(indices), "mean_score": sum(scores[i] for i in indices) / max(1, len(indices)),
                "exact_match": sum(scores[i] == 1.0 for i in indices) / max(1, len(indices))}

    families = sorted({t.family for t in tasks})
    return {**summary(range(len(tasks))),
            "stopped": sum(bool(r) and r[-1] == tokens.end for r in responses) / max(1, len(tasks)),
            "by_family": {f: summary([i for i, t in enumerate(tasks) if t.family == f]) for f in families},
            "examples": [{"prompt": t.prompt, "answer": t.answer, "reply": reply, "score": round(s, 3)}
                         for t, reply, s in list(zip(tasks, replies, scores))[:8]],
            **({"scores": scores, "replies": replies} if keep_scores else {})}


def heldout_tasks(args):
    """The evaluation set: --eval-tasks distinct test-split tasks. Its seed is fixed (HELDOUT_SEED),
    not --seed, so every stage and every run is judged on the same questions."""
    if not args.eval_tasks:
        return []
    try:
        return generate_tasks(args.eval_tasks, "test", seed=HELDOUT_SEED, families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--eval-tasks {args.eval_tasks}: {e}") from None


def show_examples(examples):
    for e in examples[:5]:
        print(f"  {e['prompt']!r} → {e['reply']!r} (gold {e['answer']!r}, score {e['score']})")


def response_logprob_sums(model, prompts, responses, pad_token, batch_size, device,
                          autocast=contextlib.nullcontext()):
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) for each (prompt, response) pair: a list of floats."""
    sequences = [(p + r, [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)]
    sums = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = collate_examples(sequences[start:start + batch_size], pad_token)
        with autocast:
            sums += sequence_logprobs(model, ids.to(device), mask.to(device)).tolist()
    return sums


@torch.no_grad()
def sampled_evaluation(policy, reference, enc, tasks, max_new_tokens, batch_size, device,
                       autocast=contextlib.nullcontext(), seed=HELDOUT_SEED):
    """Held-out tasks answered by sampling π_θ at temperature 1 — the distribution that RLHF's
    objective E_y∼π_θ[r(x, y)] − β·KL(π_θ ‖ π_ref) is about. Per prompt, with y ∼ π_θ(·|x):

        gold   = judge(task, y)
        kl     = log π_θ(y|x) − log π_ref(y|x)      (its mean estimates KL(π_θ ‖ π_ref) per response)
        length = |y|, <|end|> not counted
        responses = y's token ids (with <|end|> when it came)

    The sampling seed is fixed, so every model is judged on the same prompts and random numbers."""
    tokens = chat_tokens(enc)
    prompts = [render_prompt([{"role": "user", "content": t.prompt}], enc) for t in tasks]
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        responses = generate_responses(policy, prompts, max_new_tokens, tokens.end, tokens.pad, batch_size,
                                       temperature=1.0, generator=generator, device=device)
    policy_logps = response_logprob_sums(policy.eval(), prompts, responses, tokens.pad, batch_size, device, autocast)
    reference_logps = response_logprob_sums(reference.eval(), prompts, responses, tokens.pad, batch_size, device,
                                            autocast)
    return {"gold": [judge(t, decode_response(enc, r)) for t, r in zip(tasks, responses)], "responses": responses,
            "kl": [p - q for p, q in zip(policy_logps, reference_logps)],
            "length": [len(r) - (bool(r) and r[-1] == tokens.end) for r in responses]}


def mean_and_stderr(values):
    """(mean, standard error of the mean) = (x̄, s/√n), s the sample standard deviation."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(variance / n)


def paired_difference(scores, reference_scores):
    """Δ = mean_i(a_i − b_i) over the same prompts, and its standard error std(a − b)/√n: pairing
    removes the prompt-to-prompt spread, so much smaller differences are detectable."""
    mean, stderr = mean_and_stderr([a - b for a, b in zip(scores, reference_scores)])
    return {"mean": mean, "stderr": stderr}


class SharpenedHead(nn.Module):
    """The LM head with its logits divided by a temperature T: sampling the model at 1 then samples
    π_T(v | s) ∝ π(v | s)^(1/T). It wraps the model's own head, so the tied embedding stays shared."""

    def __init__(self, head, temperature):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden):
        return self.head(hidden) / self.temperature


def sharpened(model, temperature):
    """A copy of `model` whose every distribution is π_T = softmax(logits / T) (T < 1: sharper).

    A baseline for RLHF's sampled gold: its greedy answers are the model's own (the argmax does not
    move), yet sampled at 1 it answers like the model at T, and KL(π_T ‖ π) prices that sharpening in
    the same nats a policy's distance from π_SFT is measured in. A policy whose sampled gain does not
    beat π_T's at the same KL has bought no more than a lower temperature."""
    copied = copy.deepcopy(model)
    copied.lm_head = SharpenedHead(copied.lm_head, temperature)
    return copied


def evaluate_models(models, reference_name, enc, tasks, args, device, autocast=contextlib.nullcontext()):
    """The pipeline's final table: every model on the same held-out tasks — greedy answers judged
    (evaluate_tasks), samples at temperature 1 judged, their KL to the reference π_ref (the SFT
    model) and length — plus paired differences to the reference and replies side by side."""
    greedy, sampled = {}, {}
    for name, model in models.items():
        greedy[name] = evaluate_tasks(model, enc, tasks, args.max_new_tokens, args.eval_batch_size, device, autocast,
                                      keep_scores=True)
        sampled[name] = sampled_evaluation(model, models[reference_name], enc, tasks, args.max_new_tokens,
                                           args.eval_batch_size, device, autocast)
    results = {}
    for name in models:
        results[name] = {"greedy_gold": greedy[name]["mean_score"], "exact_match": greedy[name]["exact_match"],
                         "stopped": greedy[name]["stopped"], "by_family": greedy[name]["by_family"],
                         "sampled_gold": mean_and_stderr(sampled[name]["gold"])[0],
                         "kl_to_reference": mean_and_stderr(sampled[name]["kl"])[0],
                         "response_length": mean_and_stderr(sampled[name]["length"])[0],
                         "greedy_vs_reference": paired_difference(greedy[name]["scores"],
                                                                  greedy[reference_name]["scores"]),
                         "sampled_vs_reference": paired_difference(sampled[name]["gold"],
                                                                   sampled[reference_name]["gold"])}
        if isinstance(models[name].lm_head, SharpenedHead):  # the reference at a lower temperature
            results[name]["temperature"] = models[name].lm_head.temperature
        r = results[name]
        print(f"{name}: greedy gold {r['greedy_gold']:.3f} (exact {r['exact_match']:.1%}, "
              f"{r['greedy_vs_reference']['mean']:+.3f} ± {r['greedy_vs_reference']['stderr']:.3f} vs "
              f"{reference_name}), sampled gold {r['sampled_gold']:.3f}, KL to {reference_name} "
              f"{r['kl_to_reference']:.2f} nats, length {r['response_length']:.1f} tokens")
    examples = [{"prompt": t.prompt, "answer": t.answer, "replies": {name: greedy[name]["replies"][i] for name in models}}
                for i, t in enumerate(tasks[:EXAMPLES_SIDE_BY_SIDE])]
    return {"tasks": len(tasks), "reference": reference_name, "max_new_tokens": args.max_new_tokens,
            "models": results, "examples": examples}


def named_checkpoints(values):
    """--eval's [NAME=]CKPT arguments → {name: path}; an unnamed one is named by its directory."""
    named = {}
    for value in values:
        name, _, path = value.rpartition("=")
        name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
        if name in named:
            raise ConfigError(f"--eval: two checkpoints named {name!r}; name them NAME=PATH")
        named[name] = path
    return named


def eval_command(args):
    """`--eval [NAME=]CKPT …`: judge checkpoints on the held-out tasks.

    One checkpoint: print its greedy scores. Several: the pipeline's comparison (evaluate_models)
    against --reference; with --eval-out DIR it is a stage: DIR/eval.json, skipped when a finished
    evaluation of the same checkpoints and flags is there."""
    checkpoints = named_checkpoints(args.eval)
    if any(not (t > 0 and math.isfinite(t)) for t in args.eval_temperatures or ()):
        raise ConfigError(f"--eval-temperatures must all be > 0 (got {','.join(map(str, args.eval_temperatures))})")
    device = pick_device(args.device)
    autocast = autocast_for(device)
    tasks = heldout_tasks(args)
    if not tasks:
        raise ConfigError("--eval needs --eval-tasks > 0")
    if len(checkpoints) == 1 and not args.eval_temperatures:
        model, enc = load_chat_model(next(iter(checkpoints.values())), args.tokenizer, device)
        result = evaluate_tasks(model, enc, tasks, args.max_new_tokens, args.eval_batch_size, device, autocast)
        show_examples(result["examples"])
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
        return result
    reference = args.reference or ("sft" if "sft" in checkpoints else next(iter(checkpoints)))
    if reference not in checkpoints:
        raise ConfigError(f"--reference {reference}: not one of the --eval names ({', '.join(checkpoints)})")
    if args.eval_out:
        # the models' names and contents count, not their paths (data.stages.stage_fingerprint)
        identity = argparse.Namespace(**{**vars(args), "eval": list(checkpoints)})
        fingerprint = stage_fingerprint(identity, RUNTIME_FLAGS | {"eval_out"}, list(checkpoints.values()))
        if finished_stage(args.eval_out, "eval", fingerprint, args.force):
            with open(os.path.join(args.eval_out, "eval.json")) as f:
                return json.load(f)
    started = time.time()
    models, encodings = {}, {}
    for name, path in checkpoints.items():
        models[name], encodings[name] = load_chat_model(path, args.tokenizer, device, add_chat_tokens=True)
    for name, enc in encodings.items():  # one token space, or the KL and the replies would not compare
        if enc.n_vocab != encodings[reference].n_vocab or models[name].config.vocab_size != models[reference].config.vocab_size:
            raise ConfigError(f"{checkpoints[name]}: another tokenizer or vocabulary than {checkpoints[reference]}")
    enc = encodings[reference]
    for temperature in args.eval_temperatures or ():
        name = f"{reference}@T{temperature:g}"
        if name in models:
            raise ConfigError(f"--eval-temperatures {temperature:g}: a checkpoint is already named {name!r}")
        models[name] = sharpened(models[reference], temperature)
    if args.eval_out:
        begin_stage(args.eval_out, "eval", fingerprint, args.force)
    result = evaluate_models(models, reference, enc, tasks, args, device, autocast)
    if args.eval_out:
        result["checkpoints"] = checkpoints
        result["wall_seconds"] = round(time.time() - started, 1)
        write_json(os.path.join(args.eval_out, "eval.json"), result)
        finish_stage(args.eval_out, "eval", fingerprint, started,
                     {name: {k: r[k] for k in ("greedy_gold", "sampled_gold", "kl_to_reference")}
                      for name, r in result["models"].items()})
        print(f"saved {os.path.join(args.eval_out, 'eval.json')} in {result['wall_seconds']:.0f}s")
    return result


# =============================================================================
# 7. Chat in the terminal
# =============================================================================

def load_chat_model(path, tokenizer, device, add_chat_tokens=False):
    """A fine-tuned checkpoint in eval mode and its tokenizer (which must have the chat tokens).
    add_chat_tokens: a pretrained checkpoint is also accepted and given the chat tokens exactly as
    SFT adds them (same rows, same seed), so the base model answers the prompts SFT models see."""
    attention = "flash" if device.type == "cuda" else "sdpa"
    try:
        model, checkpoint = model_from_checkpoint(path, device, attention=attention, dropout=0.0)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match the checkpoint's config ({str(e).splitlines()[0]})") from None
    enc = load_tokenizer(tokenizer or checkpoint.get("tokenizer") or "")
    if add_chat_tokens:
        enc, _ = with_chat_tokens(enc)
        grow_vocabulary(model, enc.n_vocab, torch.Generator().manual_seed(Hyperparameters.seed))
    chat_tokens(enc)
    return model.eval(), enc


@torch.no_grad()
def stream_reply(model, enc, prompt, max_new_tokens, temperature=0.7, top_k=50, generator=None):
    """Yield the reply's text piece by piece as tokens are sampled (KV cache: O(T) per token).

    Tokens are byte sequences; a UTF-8 character can span two tokens, so bytes go through an
    incremental decoder that only emits complete characters. Stops at <|end|> or <|endoftext|>.
    """
    tokens = chat_tokens(enc)
    device = next(model.parameters()).device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, next(model.parameters()).dtype)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    for _ in range(max_new_tokens):
        token = sample_next_token(logits[:, -1], temperature, top_k, None, generator)
        if token.item() in (tokens.end, tokens.end_of_text):
            break
        yield decoder.decode(enc.decode_single_token_bytes(token.item()))
        logits, _ = model(token[:, None], cache=cache)
    yield decoder.decode(b"", final=True)


def fit_history(messages, enc, max_prompt_tokens):
    """The prompt for the latest user turn and how many of the oldest messages had to go for it
    to fit in max_prompt_tokens: exchanges (user + assistant) are dropped oldest first, a system
    message is always kept. (None, 0) if the latest message alone is too long."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    for dropped in range(0, len(turns), 2):
        prompt = render_prompt(system + turns[dropped:], enc)
        if len(prompt) <= max_prompt_tokens:
            return prompt, dropped
    return None, 0


CHAT_COMMANDS = {  # usage: what it does
    "/clear": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message (/system alone removes it)",
    "/temperature T": "sampling temperature, 0 = greedy",
    "/top-k K": "sample among the K most likely tokens, 0 = all of them",
    "/help": "this list",
    "/quit": "leave the chat (Ctrl-D too)",
}


def parse_number(text, kind):
    """kind(text) (int or float), or None if text does not spell one."""
    try:
        return kind(text)
    except ValueError:
        return None


class Chat:
    """A conversation in the terminal: its messages, the sampling settings, and the /commands.

    The model reads at most block_size tokens and a reply may take max_new_tokens of them, so the
    prompt (system message + turns + <|assistant|>) has the rest; when the conversation outgrows
    it, the oldest exchanges are forgotten and the user is told. Ctrl-C during a reply stops the
    reply, keeps what was written of it, and returns to the prompt.
    """

    def __init__(self, model, enc, max_new_tokens, temperature=0.7, top_k=50, system=None, generator=None):
        self.model, self.enc, self.generator = model, enc, generator
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = model.config.block_size - max_new_tokens
        self.temperature, self.top_k, self.system = temperature, top_k or None, system or None
        self.turns = []  # user and assistant messages, alternating
        self.done = False

    def messages(self):
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def prompt_label(self):
        """`you [used/context tokens]> `: how much of the model's context the conversation fills
        (past the end, the next message makes room by forgetting the oldest turns)."""
        used = len(render_chat(self.messages(), self.enc)[0])
        return f"you [{used}/{self.model.config.block_size} tokens]> "

    def handle(self, line):
        """One line typed by the user: a /command, or a message for the model ('//' sends a '/')."""
        text = line.strip()
        if not text:
            return
        if text.startswith("/") and not text.startswith("//"):
            print(self.command(text))
        else:
            self.send(text[1:] if text.startswith("//") else text)

    def command(self, text):
        """Run a /command and return what to tell the user; a line that is no command is refused."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/clear":
            self.turns = []
            return "(conversation cleared)"
        if name == "/system":
            self.system = arg or None
            return f"(system message: {arg})" if arg else "(no system message)"
        if name == "/temperature":
            value = parse_number(arg, float)
            if value is None or not math.isfinite(value) or value < 0:
                return f"(/temperature needs a number ≥ 0, e.g. /temperature 0.7; it is {self.temperature})"
            self.temperature = value
            return f"(temperature {value})"
        if name == "/top-k":
            value = parse_number(arg, int)
            if value is None or value < 0:
                return f"(/top-k needs a whole number ≥ 0, e.g. /top-k 50; it is {self.top_k or 0})"
            self.top_k = value or None
            return f"(top-k {self.top_k or 'off: all tokens'})"
        if name == "/help":
            lines = [f"  {usage:<15} {what}" for usage, what in CHAT_COMMANDS.items()]
            return "\n".join(lines + ["  //text          send '/text' to the model", "  Ctrl-C          stop a reply"])
        if name == "/quit":
            self.done = True
            return "(bye)"
        names = " ".join(usage.split()[0] for usage in CHAT_COMMANDS)
        return f"(unknown command {name}, not sent to the model; the commands are {names}; //text sends /text)"

    def send(self, text):
        """Add the user's message, stream the reply, and keep both in the conversation."""
        self.turns.append({"role": "user", "content": text})
        prompt, dropped = fit_history(self.messages(), self.enc, self.max_prompt_tokens)
        if prompt is None:
            self.turns.pop()
            print(f"(message too long for the {self.max_prompt_tokens} prompt tokens the context leaves; "
                  f"try a shorter one)")
            return
        if dropped:
            del self.turns[:dropped]
            print(f"(the conversation outgrew the context of {self.model.config.block_size} tokens: "
                  f"forgot the oldest {dropped} messages)")
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in stream_reply(self.model, self.enc, prompt, self.max_new_tokens, self.temperature,
                                      self.top_k, self.generator):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        self.turns.append({"role": "assistant", "content": "".join(pieces)})


def chat_command(args):
    """`--chat CKPT`: talk to the model; replies are streamed; /help lists the commands."""
    device = pick_device(args.device)
    model, enc = load_chat_model(args.chat, args.tokenizer, device)
    if model.config.block_size - args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                          f"(block_size={model.config.block_size})")
    if not args.temperature >= 0 or args.top_k < 0:
        raise ConfigError(f"--temperature ({args.temperature}) and --top-k ({args.top_k}) must be ≥ 0")
    try:
        import readline  # noqa: F401 — arrow keys and history for input(), where the platform has it
    except ImportError:
        pass
    chat = Chat(model, enc, args.max_new_tokens, args.temperature, args.top_k, args.system,
                torch.Generator(device=device).manual_seed(args.seed))
    # Ctrl-C must stop a reply even when the chat was started with SIGINT ignored (by nohup, a
    # background job, or a parent that ignores it): Python installs its handler only over SIG_DFL.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"chatting with {args.chat} (temperature {chat.temperature}, top-k {chat.top_k or 'off'}); "
          f"/help lists the commands; Ctrl-C stops a reply, Ctrl-D or /quit leaves")
    while not chat.done:
        try:
            line = input(chat.prompt_label())
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops a reply; Ctrl-D or /quit leaves the chat)")
            continue
        chat.handle(line)


# =============================================================================
# 8. Command line
# =============================================================================

def validate_args(args):
    """One clear error per out-of-range flag, before any work starts: the declared ranges, then the
    checks that involve two flags."""
    check_ranges(args, Hyperparameters)
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr must be in [0, --lr] (got {args.min_lr})")
    if args.init and args.init_gpt2:
        raise ConfigError("give either --init or --init-gpt2, not both")
    try:
        generate_tasks(1, "train", families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--families/--levels: {e}") from None


def build_parser():
    return build_parser_from(Hyperparameters, __doc__.split("\n")[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.chat:
            return chat_command(args)
        if args.eval:
            return eval_command(args)
        return train_sft(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
