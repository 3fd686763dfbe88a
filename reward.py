"""reward.py — a Bradley–Terry reward model r_φ(x, y) learned from preference data (seed Part 3).

Read beside sections 3.1–3.3 of the seed chapter (shared/seeds/000_…) and the "Reinforcement
Learning with Human Feedback" section of the blog post (shared/seeds/004_…), whose notation we
keep: a prompt x, a preferred response y_w and a dispreferred one y_l (y_w ≻ y_l), the reward
model r_φ, the sigmoid σ. SFT taught the model the format; it did not teach it which of its own
answers people prefer (3.1). So we collect comparisons of its answers (3.2) and fit a scalar
score to them with the Bradley–Terry model (3.3; the blog derives it):

    P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))
    L_RM(φ) = −E_(x, y_w, y_l)~D [ log σ(r_φ(x, y_w) − r_φ(x, y_l)) ]

The trained r_φ is what PPO maximises (ppo.py, 3.4). The file reads top to bottom:

    1. Comparison data   k samples per prompt from π_SFT, ranked by the gold judge,
                         label noise and length bias, rankings → pairs                    (3.2)
    2. Preference files  {"prompt","chosen","rejected"} and {"prompt","responses","ranking"}
                         JSONL, validated with FILE:LINE errors                            (3.2)
    3. The model         the SFT backbone, LM head replaced by a scalar head read at the
                         response's final <|end|> token                                    (3.3)
    4. The loss          Bradley–Terry: preference_probability, bradley_terry_loss        (3.3; blog)
    5. Batches           every pair of a prompt in one batch, each response scored once   (InstructGPT)
    6. Training          AdamW, warmup + cosine, clipping, best checkpoint, reward shift
    7. Evaluation        accuracy vs noisy and clean labels, correlation with the gold
                         score, calibration, reward histograms
    8. Command line      training; `--best-of-n` runs best_of_n.py (r_φ at inference: best-of-n
                         sampling, over-optimisation against KL, 3.5), which builds on this file

Its settings are declared once, in `Hyperparameters` at the top (value, help, range; settings.py).

Later stages import from here: `load_preferences`, `write_preferences`, `pair_ids`,
`split_by_prompt`, `ranking_to_pairs`, `build_preference_data`, `load_reward_model`, `score`,
`RewardModel`, `bradley_terry_loss`, `preference_probability`.

Usage:
    python reward.py --sft runs/default/sft/model.pt --out runs/default/reward
    python reward.py --label-noise 0.2 --length-bias 0.02         # noisy labelers who like long answers
    python reward.py --data prefs.jsonl --val-data prefs_val.jsonl  # your own comparisons
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.errors import DataError
from data.tasks import generate_tasks, judge, write_jsonl
from data.tokenizer import load_tokenizer
from sft import (HELDOUT_SEED, chat_tokens, check_messages, collate_examples, comma_list, decode_response,
                 generate_responses, jsonl_records, load_chat_model, mean_and_stderr, paired_difference,
                 plot_train_val_loss, render_chat, render_prompt, sampled_evaluation)
from data.stages import begin_stage, finish_stage, finished_stage, stage_fingerprint
from settings import build_parser_from, check_ranges, runtime_flags, setting
from train_gpt import (GPT, ConfigError, GPTConfig, adamw, atomic_save, autocast_for, get_lr, load_checkpoint,
                       load_resume_point, log_line, pick_device, random_state, read_metrics, save_resume_point,
                       set_random_state, truncate_metrics)

# Hyperparameters: one line each — value, what it does, allowed range (settings.py makes the flags).
DATA_GROUP = "comparison data (default: sampled from the SFT model, ranked by the gold judge)"
BON_GROUP = "best-of-n and over-optimisation (best_of_n.py; instead of training)"


@dataclass
class Hyperparameters:
    sft: str = setting("runs/default/sft/model.pt", "the SFT checkpoint: it samples the responses and initialises r_φ")
    out: str = setting("runs/default/reward", "output directory: model.pt, preferences_*.jsonl, metrics, plots, "
                                              "eval.json")
    # comparison data (seed 3.2)
    data: str = setting(None, "preference JSONL ({prompt, chosen, rejected} or {prompt, responses, ranking}) "
                              "instead of the built-in comparisons", group=DATA_GROUP)
    val_data: str = setting(None, "held-out preference JSONL; without it, a --val-fraction of --data's prompts is "
                                  "held out", group=DATA_GROUP)
    num_prompts: int = setting(4000, "train-split task prompts to compare (train + val)", check="≥ 2",
                               why="some prompts are held out for validation", group=DATA_GROUP)
    families: list = setting(None, "task families of the built-in comparisons and the held-out samples, e.g. "
                                   "reverse,upper", type=comma_list(str), group=DATA_GROUP)
    levels: list = setting(None, "task levels of those tasks, e.g. 1,2", type=comma_list(int), group=DATA_GROUP)
    val_fraction: float = setting(0.1, "share of prompts held out for validation", check="(0, 1)", group=DATA_GROUP)
    k: int = setting(4, "responses sampled and ranked per prompt, C(k,2) pairs each (seed 3.2: k = 4–9 in "
                        "InstructGPT)", check="≥ 2", why="a comparison needs two responses", group=DATA_GROUP)
    label_noise: float = setting(0.2, "probability that the labeler flips a pair (seed 3.3: labelers disagree ~20% "
                                      "of the time)", check="[0, 0.5]",
                                 why="above 0.5 labelers mostly invert the gold judge", group=DATA_GROUP)
    length_bias: float = setting(0.0, "B: labeler score = gold + B · response tokens", check="finite",
                                 group=DATA_GROUP)
    temperature: float = setting(1.0, "sampling temperature of the k responses: diverse, still on-policy",
                                 check="> 0", group=DATA_GROUP)
    max_new_tokens: int = setting(32, "longest sampled response in tokens", check="> 0", group=DATA_GROUP)
    gen_batch_size: int = setting(64, "prompts generated (and samples scored) in parallel", check="> 0",
                                  group=DATA_GROUP)
    label_aggregation: str = setting("none", "none: train on each comparison as labelled; net-wins: relabel the "
                                             "training pairs by a majority over their prompt's comparisons "
                                             "(aggregate_comparisons)", choices=["none", "net-wins"],
                                     group=DATA_GROUP)
    # training (seed 3.3)
    epochs: int = setting(1, "passes over the training comparisons (InstructGPT: 1; a second one overfits here "
                             "too)", check="> 0", group="training")
    max_steps: int = setting(None, "stop after this many steps (none: run all epochs)", check="≥ 0", group="training")
    batch_size: int = setting(16, "prompts per optimizer step, each with all its pairs", check="> 0", group="training")
    weighting: str = setting("prompt", "prompt: each prompt's pairs share weight 1 (InstructGPT's 1/C(k,2)); "
                                       "pair: every pair weighs 1", choices=["prompt", "pair"], group="training")
    assumed_noise: float = setting(0.0, "ε of the noise-aware likelihood P(label) = ε + (1 − 2ε)·σ(Δ) "
                                        "(noisy_bradley_terry_loss): a label that contradicts a confident r_φ "
                                        "pulls with a bounded force; 0: plain Bradley–Terry", check="[0, 0.5)",
                                   group="training")
    lr: float = setting(3e-4, "peak learning rate: 3× below SFT's 1e-3", check="> 0", group="training")
    min_lr: float = setting(None, "final learning rate of the cosine (default lr/10)", group="training")
    warmup_ratio: float = setting(0.05, "share of the steps in linear warmup", check="[0, 1)", group="training")
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices", check="≥ 0", group="training")
    grad_clip: float = setting(1.0, "max global gradient norm", check="> 0", group="training")
    evals_per_epoch: int = setting(4, "validation evaluations per epoch", check="> 0", group="training")
    log_every: int = setting(10, "steps between progress lines", check="> 0", runtime=True, group="training")
    checkpoint_every: int = setting(None, "steps between resume points (default: at every validation); a rerun "
                                          "after an interruption continues from the last one", check="≥ 0",
                                    runtime=True, group="training")
    force: bool = setting(False, "train again even if --out holds a finished run of this configuration",
                          runtime=True, group="training")
    device: str = setting("auto", "cpu, cuda, cuda:1, … (auto: cuda if available)", runtime=True, group="training")
    seed: int = setting(1337, "seed for prompts, sampling, label noise, shuffling, head init", group="training")
    # evaluation
    eval_prompts: int = setting(200, "test-split prompts sampled k times to correlate r_φ with the gold score "
                                     "(0: skip); with --best-of-n, the prompts sampled max(n) times", check="≥ 0",
                                group="evaluation")
    # best-of-n (best_of_n.py)
    best_of_n: list = setting(None, "evaluate best-of-n sampling from --sft for these n (e.g. 1,2,4,8,16,32) with "
                                    "--reward-model, write bon.json and overoptimization.png to --out",
                              type=comma_list(int), group=BON_GROUP)
    reward_model: str = setting(None, "with --best-of-n: the trained r_φ that picks the best (several, "
                                      "comma-separated: an ensemble)", group=BON_GROUP)
    ensemble_reduce: str = setting("mean", "with several --reward-model checkpoints: score by the members' mean or "
                                           "their min", choices=["mean", "min"], group=BON_GROUP)
    policy: list = setting(None, "with --best-of-n: a policy (e.g. dpo=runs/default/dpo/model.pt) to place on the "
                                 "chart; repeatable", action="append", metavar="NAME=CKPT", group=BON_GROUP)
    ppo_run: str = setting(None, "with --best-of-n: a ppo.py output directory whose snapshots/ trace PPO on the "
                                 "chart", group=BON_GROUP)
    optimum_betas: list = setting([1.0, 0.5, 0.3, 0.2, 0.1, 0.05], "with --best-of-n: the β at which to chart π*, "
                                  "the optimum of E[r] − β·KL over the max(n) samples (what PPO and DPO aim at)",
                                  type=comma_list(float), group=BON_GROUP)


# The flags left out of the stage fingerprint (data.stages.stage_fingerprint): speed, printing, bookkeeping.
RUNTIME_FLAGS = runtime_flags(Hyperparameters)
CALIBRATION_BINS = 10               # bins of predicted P(y_w ≻ y_l) in the calibration plot


# =============================================================================
# 1. Comparison data (seed 3.2): sample k responses, let the "labeler" rank them
# =============================================================================

def ranking_to_pairs(responses, ranking):
    """A k-way ranking → all C(k, 2) = k(k−1)/2 comparisons (y_w, y_l)  (seed 3.2, step 4).

    `ranking` lists indices into `responses`, best first: ranking [2, 0, 1] means
    responses[2] ≻ responses[0] ≻ responses[1] and gives (r₂, r₀), (r₂, r₁), (r₀, r₁).
    The pairs of one ranking belong together: section 5 puts them in the same batch.
    """
    ordered = [responses[i] for i in ranking]
    return [(ordered[i], ordered[j]) for i in range(len(ordered)) for j in range(i + 1, len(ordered))]


def task_messages(task):
    """The prompt x of a built-in task: one user turn (as sft.evaluate_tasks asks it)."""
    return [{"role": "user", "content": task.prompt}]


def pair_ids(prompt, response, enc):
    """Token ids of (x, y): the chat template of prompt + [assistant: response], ending with <|end|>."""
    return render_chat(prompt + [{"role": "assistant", "content": response}], enc)[0]


def sample_responses(model, enc, tasks, k=Hyperparameters.k, temperature=Hyperparameters.temperature,
                     max_new_tokens=Hyperparameters.max_new_tokens, batch_size=Hyperparameters.gen_batch_size,
                     seed=Hyperparameters.seed, device="cpu", autocast=contextlib.nullcontext()):
    """k responses y ~ π_SFT(· | x) per task (seed 3.2, step 2), each judged by the gold judge.

    Batched, left-padded, KV-cached generation (sft.generate_responses). Returns, per task, k
    dicts {"response": text, "tokens": |y| without <|end|>, "gold": judge score in [0, 1]}.
    """
    special = chat_tokens(enc)
    prompts = [render_prompt(task_messages(task), enc) for task in tasks for _ in range(k)]
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        responses = generate_responses(model, prompts, max_new_tokens, special.end, special.pad, batch_size,
                                       temperature=temperature, generator=generator, device=device)
    samples = []
    for index, ids in enumerate(responses):
        text = decode_response(enc, ids)
        samples.append({"response": text, "tokens": sum(t != special.end for t in ids),
                        "gold": judge(tasks[index // k], text)})
    return [samples[i * k:(i + 1) * k] for i in range(len(tasks))]


def labeler_score(gold, response_tokens, length_bias):
    """How our simulated labeler rates a response: gold score + B · |y| (|y| in tokens).

    B = 0 is an honest labeler. B > 0 is one who finds longer answers more convincing (the
    blog's example of a preference that would teach a model to pad its answers): a bias the
    reward model learns and PPO can later exploit (seed 3.5, reward hacking).
    """
    return gold + length_bias * response_tokens


def clean_label(gold_chosen, gold_rejected):
    """The noise-free verdict on a pair: 1 if the gold judge prefers the chosen response,
    0 if it prefers the rejected one, 0.5 if it calls them equal."""
    return 1.0 if gold_chosen > gold_rejected else 0.0 if gold_chosen < gold_rejected else 0.5


def label_comparisons(prompt, samples, label_noise, length_bias, rng):
    """The comparisons the simulated labeler makes among one prompt's samples (seed 3.2, steps 3–4).

    1. Rank the samples by labeler_score, best first, and expand the ranking into all C(k, 2)
       pairs (ranking_to_pairs).
    2. Drop a pair whose two responses the labeler scores equal. Ties are common (two exact
       answers, two identical samples) and say neither response is better; Bradley–Terry has no
       term for them, and breaking them at random would only add noise.
    3. Flip each remaining pair with probability `label_noise`: labelers disagree (seed 3.3).
    Each record keeps the truth beside the label: the gold scores, `clean_label` (1 / 0 / 0.5:
    the gold judge prefers chosen / rejected / neither — 0.5 happens only where the length bias
    broke a gold tie) and whether the noise `flipped` it.
    """
    scores = [labeler_score(s["gold"], s["tokens"], length_bias) for s in samples]
    ranking = sorted(range(len(samples)), key=lambda i: -scores[i])
    records = []
    for better, worse in ranking_to_pairs(list(range(len(samples))), ranking):
        if scores[better] == scores[worse]:
            continue
        flipped = rng.random() < label_noise
        chosen, rejected = (samples[worse], samples[better]) if flipped else (samples[better], samples[worse])
        records.append({"prompt": prompt, "chosen": chosen["response"], "rejected": rejected["response"],
                        "clean_label": clean_label(chosen["gold"], rejected["gold"]), "flipped": flipped,
                        "chosen_gold": chosen["gold"], "rejected_gold": rejected["gold"],
                        "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"]})
    return records


def net_wins(records):
    """Each response's Copeland score within its prompt: comparisons won − comparisons lost.

    {(prompt key, response text): wins − losses} over the records' (chosen, rejected) pairs.
    """
    score = Counter()
    for r in records:
        key = json.dumps(r["prompt"])
        score[key, r["chosen"]] += 1
        score[key, r["rejected"]] -= 1
    return score


# classroom: begin aggregate_comparisons
def aggregate_comparisons(records):
    """Relabel every pair by a majority over its prompt's comparisons (seed 3.2, step 3: a ranking).

    A labeler who ranks a prompt's k answers gives one consistent order (InstructGPT's interface,
    seed 3.2); ours judged the C(k, 2) pairs one by one, each flipped with probability ε (seed 3.3),
    so its verdicts can contradict each other (a ≻ b, b ≻ c, c ≻ a). The ranking they vote for
    is the order of net wins s(y) = #won − #lost (net_wins); each pair (y_w, y_l) is re-oriented so
    that s(y_w) > s(y_l), and a pair with s(y_w) = s(y_l) is dropped — the votes do not decide it.
    Without noise or ties, a ≻ b with m responses ranked between them has s(a) − s(b) = 2(1 + m):
    2 from their own comparison, 2 from each response that beats b and loses to a. Flipping their
    verdict subtracts 4, so the majority restores it when m ≥ 2, drops the pair when m = 1 and keeps
    the flip only between neighbours (m = 0), the pairs whose gold scores differ least. The truth
    fields follow the pair: `flipped` now says whether the aggregated label contradicts the
    noise-free labeler; the gold scores and lengths travel with their answers.
    """
    score = net_wins(records)
    aggregated = []
    for r in records:
        key = json.dumps(r["prompt"])
        margin = score[key, r["chosen"]] - score[key, r["rejected"]]
        if margin == 0:
            continue
        if margin > 0:
            aggregated.append(r)
            continue
        swapped = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        for field in ("gold", "tokens"):
            if f"chosen_{field}" in r:
                swapped[f"chosen_{field}"], swapped[f"rejected_{field}"] = r[f"rejected_{field}"], r[f"chosen_{field}"]
        if "clean_label" in r:
            swapped["clean_label"] = 1.0 - r["clean_label"]
        if "flipped" in r:
            swapped["flipped"] = not r["flipped"]
        aggregated.append(swapped)
    return aggregated
# classroom: end aggregate_comparisons


def build_preference_data(model, enc, tasks, k=Hyperparameters.k, label_noise=Hyperparameters.label_noise,
                          length_bias=Hyperparameters.length_bias, temperature=Hyperparameters.temperature,
                          max_new_tokens=Hyperparameters.max_new_tokens, batch_size=Hyperparameters.gen_batch_size,
                          seed=Hyperparameters.seed, device="cpu", autocast=contextlib.nullcontext(), max_tokens=None):
    """Seed 3.2 end to end, offline: prompts → k samples from π_SFT → ranked → pairs.

    The gold judge (data.tasks.judge) plays the human labeler, optionally noisy and biased
    towards length. Returns (pairs, samples): preference records {"prompt", "chosen",
    "rejected", "clean_label", …} ready for write_preferences, and every sample {"prompt",
    "response", "tokens", "gold"}, including those of prompts whose samples all tied.
    With max_tokens, a sample whose prompt + response text re-encodes to more tokens is left
    out (a special token sampled mid-answer decodes to text that re-encodes as many tokens).
    """
    per_task = sample_responses(model, enc, tasks, k, temperature, max_new_tokens, batch_size, seed, device, autocast)
    rng = random.Random(seed)
    pairs, samples = [], []
    for task, task_samples in zip(tasks, per_task):
        prompt = task_messages(task)
        if max_tokens is not None:
            task_samples = [s for s in task_samples if len(pair_ids(prompt, s["response"], enc)) <= max_tokens]
        pairs += label_comparisons(prompt, task_samples, label_noise, length_bias, rng)
        samples += [{"prompt": prompt, **sample} for sample in task_samples]
    return pairs, samples


# =============================================================================
# 2. Preference files: the ecosystem's JSONL formats, validated (seed 3.2)
# =============================================================================
# ── first reading: skip to section 3 (reading and validating preference files) ──
#
#   {"prompt": x, "chosen": y_w, "rejected": y_l, …}            pairs (TRL; our own files)
#   {"chosen": conversation, "rejected": conversation}         implicit prompt (HH-RLHF, TRL)
#   {"prompt": x, "responses": [y_1 … y_k], "ranking": [i…]}    a k-way ranking, best first
#
# x is a string (one user turn) or a message list ending with a user turn; a response is a
# string or a one-message list [{"role": "assistant", "content": …}]. A conversation is an
# HH-RLHF transcript "\n\nHuman: …\n\nAssistant: …" or a message list; the prompt is everything
# but the last (assistant) turn, which must be shared by chosen and rejected. Any other keys of
# a record (clean_label, gold scores, ids) are kept with each of its pairs.

PAIR_FIELDS = ("prompt", "chosen", "rejected")
RANKING_FIELDS = ("prompt", "responses", "ranking")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def message_list(value, where, field):
    """A JSON list of {"role", "content"} objects → plain message dicts (checked later)."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise ConfigError(f"{where}: '{field}' must be a string or a non-empty list of {{\"role\", \"content\"}} objects")
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def prompt_messages(value, where):
    """The prompt x as messages: a string is one user turn; a list must end with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = message_list(value, where, "prompt")
    check_messages(messages + [{"role": "assistant", "content": ""}], f"{where}: prompt")
    return messages


def response_text(value, where, field):
    """A response y as text: a string, or TRL's conversational [{"role": "assistant", "content": …}]."""
    if isinstance(value, str):
        return value
    messages = message_list(value, where, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not isinstance(messages[0]["content"], str):
        raise ConfigError(f"{where}: '{field}' must be a string or a single assistant message "
                          f"(put the conversation before it in 'prompt')")
    return messages[0]["content"]


def messages_from_transcript(text, where):
    """An HH-RLHF transcript "\\n\\nHuman: …\\n\\nAssistant: …" → messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ConfigError(f"{where}: without a 'prompt', a string must be an HH-RLHF transcript "
                          f"('\\n\\nHuman: …\\n\\nAssistant: …')")
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def split_implicit_prompt(record, where):
    """(prompt, y_w, y_l) from chosen/rejected conversations that differ only in the last turn."""
    conversations = []
    for field in ("chosen", "rejected"):
        value = record[field]
        if isinstance(value, str):
            messages = messages_from_transcript(value, f"{where}: '{field}'")
        else:
            messages = message_list(value, where, field)
        check_messages(messages, f"{where}: '{field}'")
        conversations.append(messages)
    chosen, rejected = conversations
    if chosen[:-1] != rejected[:-1]:
        raise ConfigError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must share every turn but the last")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def check_ranking(ranking, k, where):
    if not isinstance(ranking, list) or not all(type(i) is int for i in ranking) or sorted(ranking) != list(range(k)):
        raise ConfigError(f"{where}: 'ranking' must list every index of 'responses' exactly once, best first "
                          f"(a permutation of 0..{k - 1}), got {ranking!r}")


def pairs_from_record(record, where):
    """One JSONL record → its comparison pairs {"prompt": messages, "chosen": str, "rejected": str, …}."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "responses" in record or "ranking" in record:
        missing = [f for f in RANKING_FIELDS if f not in record]
        if missing:
            raise ConfigError(f"{where}: a ranking record needs {', '.join(repr(f) for f in missing)}")
        prompt = prompt_messages(record["prompt"], where)
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise ConfigError(f"{where}: 'responses' must be a list of at least 2 responses")
        texts = [response_text(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        check_ranking(record["ranking"], len(texts), where)
        extra = {k: v for k, v in record.items() if k not in RANKING_FIELDS}
        return [{"prompt": prompt, "chosen": y_w, "rejected": y_l, **extra}
                for y_w, y_l in ranking_to_pairs(texts, record["ranking"])]
    if "chosen" in record and "rejected" in record:
        if "prompt" in record:
            prompt = prompt_messages(record["prompt"], where)
            chosen, rejected = (response_text(record[f], where, f) for f in ("chosen", "rejected"))
        else:
            prompt, chosen, rejected = split_implicit_prompt(record, where)
        if record.get("clean_label", 1.0) not in (0.0, 0.5, 1.0) or isinstance(record.get("clean_label"), bool):
            raise ConfigError(f"{where}: 'clean_label' must be 1, 0 or 0.5, got {record['clean_label']!r}")
        extra = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
        return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}]
    raise ConfigError(f"{where}: unknown format (keys {sorted(record)}); expected "
                      f"{{\"prompt\", \"chosen\", \"rejected\"}} or {{\"prompt\", \"responses\", \"ranking\"}}")


def check_pair_length(pair, enc, max_tokens, where):
    for field in ("chosen", "rejected"):
        n = len(pair_ids(pair["prompt"], pair[field], enc))
        if n > max_tokens:
            raise ConfigError(f"{where}: prompt + {field} response is {n} tokens, longer than the reward "
                              f"model's context ({max_tokens} tokens)")


def load_preferences(path, enc=None, max_tokens=None):
    """Every comparison in a JSONL file, as pair records {"prompt": messages, "chosen", "rejected", …}.

    Ranking records are expanded into their C(k, 2) pairs, adjacent in the list. With `enc` and
    `max_tokens`, a pair longer than max_tokens tokens is an error too. Errors name FILE:LINE.
    """
    pairs = []
    for where, record in jsonl_records(path, "preference"):
        new_pairs = pairs_from_record(record, where)
        if enc is not None and max_tokens is not None:
            for pair in new_pairs:
                check_pair_length(pair, enc, max_tokens, where)
        pairs += new_pairs
    if not pairs:
        raise ConfigError(f"{path}: no preference pairs in the file")
    return pairs


def write_preferences(path, records):
    """Write pair records as JSONL ({"prompt": messages, "chosen", "rejected", …} per line), atomically."""
    write_jsonl(path, records)


def split_by_prompt(pairs, val_fraction, seed):
    """A seeded split of pairs into train / validation by prompt: all pairs of a prompt go to the
    same side, so no held-out comparison shares a prompt with a training one."""
    prompts = list(dict.fromkeys(json.dumps(p["prompt"]) for p in pairs))
    if len(prompts) < 2:
        raise ConfigError(f"need comparisons on at least 2 distinct prompts to hold some out, got {len(prompts)}")
    random.Random(seed).shuffle(prompts)
    n_val = min(len(prompts) - 1, max(1, round(val_fraction * len(prompts))))
    val_prompts = set(prompts[:n_val])
    val = [p for p in pairs if json.dumps(p["prompt"]) in val_prompts]
    return [p for p in pairs if json.dumps(p["prompt"]) not in val_prompts], val


# =============================================================================
# 3. The model (seed 3.3, "Architecture")
# =============================================================================

class RewardModel(nn.Module):
    """r_φ(x, y): the SFT transformer with its LM head replaced by a linear layer d → 1.

    The scalar is read from the final, LayerNormed hidden state at the response's last token —
    normally its closing <|end|> — the only position whose causal context holds all of x and y.
    The head starts as w ~ N(0, 1/(d+1)) (std 1/√(d+1)), b = 0, the reward head of OpenAI's
    lm-human-preferences (Ziegler et al. 2019): the LayerNormed state h has components of about
    unit variance, so Var(w·h) ≈ d/(d+1) ≈ 1 — initial rewards are centred and of unit scale,
    where σ(r_w − r_l) is neither flat nor saturated. `reward_shift` is subtracted from every
    reward: 0 during training (Bradley–Terry sees only differences), then set so that rewards
    of SFT samples average 0 (section 6).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = GPT(config)
        self.backbone.lm_head = nn.Identity()  # no vocabulary logits: the (tied) embedding stays as input
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, mean=0.0, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("reward_shift", torch.zeros(()))

    def forward(self, ids, end_index, position_ids=None, doc_ids=None):
        """Rewards (B,) of rows ids (B, T); end_index (B,) is the position of each row's last real token.

        Rows are right-padded: causal attention never lets a real token see the padding after it,
        so a reward does not depend on how much padding follows (nor on the pad token's value).
        position_ids / doc_ids (B, T) are passed through for other layouts (e.g. left padding).
        """
        hidden = self.backbone.hidden_states(ids, position_ids, doc_ids)
        last = hidden[torch.arange(ids.shape[0], device=ids.device), end_index]
        with torch.autocast(device_type=ids.device.type, enabled=False):  # the scalar in fp32
            return self.head(last.float()).squeeze(-1) - self.reward_shift


def backbone_state_dict(gpt_state_dict):
    """A GPT state dict without the LM head (tied to the token embedding, which is kept)."""
    return {k: v for k, v in gpt_state_dict.items() if not k.startswith("lm_head.")}


def runtime_overrides(device):
    return {"attention": "flash" if device.type == "cuda" else "sdpa", "dropout": 0.0}


def load_sft(path, device):
    """The SFT checkpoint as a GPT (for sampling) and its checkpoint dict."""
    checkpoint = load_checkpoint(path, map_location=device)
    if checkpoint.get("stage") == "reward":
        raise ConfigError(f"{path}: a reward model checkpoint, not a policy (SFT) checkpoint")
    model = GPT(GPTConfig.from_dict({**checkpoint["config"], **runtime_overrides(device)}))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match the checkpoint's config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), checkpoint


def reward_model_from_gpt(gpt):
    """A RewardModel around a copy of `gpt`'s weights (its LM head dropped, a fresh scalar head)."""
    config = gpt.config
    model = RewardModel(config)
    model.backbone.load_state_dict(backbone_state_dict(gpt.state_dict()))
    return model.to(next(gpt.parameters()).device)


def load_reward_model(path, device="cpu", return_checkpoint=False):
    """A trained reward model (checkpoint written by this file) in eval mode, its shift applied
    (and, with return_checkpoint, the checkpoint dict it came from)."""
    device = torch.device(device)
    checkpoint = load_checkpoint(path, map_location=device)
    if checkpoint.get("stage") != "reward":
        raise ConfigError(f"{path}: not a reward model checkpoint (stage {checkpoint.get('stage')!r})")
    model = RewardModel(GPTConfig.from_dict({**checkpoint["config"], **runtime_overrides(device)}))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not match the checkpoint's config ({str(e).splitlines()[0]})") from None
    model = model.to(device).eval()
    return (model, checkpoint) if return_checkpoint else model


class RewardEnsemble(nn.Module):
    """r(x, y) of M reward models, combined per response (seed 3.5, prevention 3, "use multiple
    reward models and take minimum or average"). Members trained on the same comparisons differ
    only in head init and data order and share most of their errors; members trained on different
    comparisons (bagging: `reward.py --seed S` samples other prompts, answers and label flips)
    disagree more, and their mean ranks better (README, "Reward-model ensembles"):

        mean:  r(x, y) = (1/M) Σ_m r_φm(x, y)      — averages away each member's own errors
        min:   r(x, y) = min_m r_φm(x, y)          — pessimistic: a response must please every member

    A policy that exploits one member's blind spot gains little when the others disagree. Each
    member is centred on SFT samples (its reward_shift), so their scales are comparable and min
    is not just the member with the lowest offset. Same interface as RewardModel.
    """

    def __init__(self, members, reduce="mean"):
        super().__init__()
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce must be mean or min, got {reduce!r}")
        if len({(m.config.vocab_size, m.config.block_size) for m in members}) != 1:
            raise ValueError("ensemble members must share one vocabulary and context length")
        self.members, self.reduce, self.config = nn.ModuleList(members), reduce, members[0].config

    def forward(self, ids, end_index, position_ids=None, doc_ids=None):
        rewards = torch.stack([m(ids, end_index, position_ids, doc_ids) for m in self.members])
        return rewards.mean(0) if self.reduce == "mean" else rewards.min(0).values


def reward_model_paths(value):
    """--reward-model's value: one checkpoint, or several separated by commas (an ensemble)."""
    paths = [p for p in value.split(",") if p]
    if not paths:
        raise ConfigError(f"--reward-model {value!r}: no checkpoint named")
    return paths


def load_reward_models(value, device="cpu", reduce="mean"):
    """--reward-model a.pt or a.pt,b.pt,c.pt: one RewardModel, or a RewardEnsemble of several."""
    members = [load_reward_model(path, device) for path in reward_model_paths(value)]
    return members[0] if len(members) == 1 else RewardEnsemble(members, reduce).eval()


@torch.no_grad()
def score(model, prompt_ids_list, response_ids_list, batch_size=64, pad_token=0):
    """r_φ(x, y) (shift applied) for each pair of token lists: a (N,) fp32 tensor on the model's device.

    Each row is x + y, right-padded (with pad_token, whose value never matters: nothing real
    attends to it); its reward is read at its last real token — y's last token, normally <|end|>
    (PPO puts this score on that token). Rows are sorted by length so that a batch holds similar
    lengths; the rewards come back in input order.
    """
    sequences = [list(x) + list(y) for x, y in zip(prompt_ids_list, response_ids_list, strict=True)]
    if any(not s or len(s) > model.config.block_size for s in sequences):
        raise ValueError(f"every prompt + response must have 1..block_size={model.config.block_size} tokens")
    device = next(model.parameters()).device
    rewards = torch.empty(len(sequences), device=device)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = collate_examples([(sequences[i], [1] * len(sequences[i])) for i in chunk], pad_token)
        rewards[chunk] = model(ids.to(device), (mask.sum(1) - 1).to(device)).float()
    model.train(was_training)
    return rewards


# =============================================================================
# 4. The loss (seed 3.3; blog, the Bradley–Terry derivation)
# =============================================================================

def preference_probability(r_chosen, r_rejected):
    """P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))   (seed 3.3).

    Bradley–Terry: P(i ≻ j) = p_i / (p_i + p_j). With p_i = e^{β_i} this is
    1 / (1 + e^{−(β_i − β_j)}) = σ(β_i − β_j), and the blog sets β_i = r_φ(x, y_i). Only the
    difference of rewards matters: adding a constant to every reward changes no probability.
    """
    return torch.sigmoid(r_chosen - r_rejected)


# classroom: begin bradley_terry_loss
def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, weights=None):
    """L_RM = −mean_i log σ(r_φ(x, y_w) − r_φ(x, y_l) − m)   (seed 3.3; blog).

    The negative log-likelihood of the observed comparisons under Bradley–Terry. F.logsigmoid
    computes log σ(z) = −log(1 + e^{−z}) stably; log(sigmoid(z)) would give −inf once σ(z)
    underflows (z ≲ −100 in fp32). `margin` m (Llama 2) asks y_w to win by at least m before
    the loss lets go: a number or a per-pair tensor; 0 is plain Bradley–Terry. `weights` w_i
    make it Σ w_i ℓ_i / Σ w_i (section 5: each prompt's pairs share a weight of 1).
    """
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    if weights is None:
        return losses.mean()
    return (weights * losses).sum() / weights.sum()
# classroom: end bradley_terry_loss


# classroom: begin noisy_bradley_terry_loss
def noisy_bradley_terry_loss(r_chosen, r_rejected, noise, weights=None):
    """L = −mean_i log[ε + (1 − 2ε)·σ(r_φ(x, y_w) − r_φ(x, y_l))]   (seed 3.3: labelers disagree).

    Bradley–Terry with the labeler's flips in the likelihood. If a labeler reports the true order
    with probability 1 − ε and flips it with probability ε, a label "y_w ≻ y_l" has probability
    (1 − ε)·σ(Δ) + ε·σ(−Δ) = ε + (1 − 2ε)·σ(Δ), Δ = r_w − r_l. At ε = 0 this is
    bradley_terry_loss. The difference is in the gradient on a pair whose label contradicts a
    confident r_φ (Δ ≪ 0): plain BT pulls it back with force → 1 however sure r_φ is, this loss
    with force → 0 (the loss stays below −log ε), since a flip explains such a label better. The
    log of the sum is taken as logaddexp(log ε, log(1 − 2ε) + log σ(Δ)), stable for any Δ.
    `weights` as in bradley_terry_loss.
    """
    noise = torch.as_tensor(noise, dtype=r_chosen.dtype)
    log_p = torch.logaddexp(torch.log(noise), torch.log1p(-2 * noise) + F.logsigmoid(r_chosen - r_rejected))
    if weights is None:
        return -log_p.mean()
    return -(weights * log_p).sum() / weights.sum()
# classroom: end noisy_bradley_terry_loss


def preference_loss(r_chosen, r_rejected, noise=0.0, weights=None):
    """The training and validation loss: plain Bradley–Terry, or its noise-aware form when ε > 0."""
    if noise:
        return noisy_bradley_terry_loss(r_chosen, r_rejected, noise, weights)
    return bradley_terry_loss(r_chosen, r_rejected, weights=weights)


def pairwise_accuracy(r_chosen, r_rejected):
    """Share of pairs where r_φ agrees with the label, r(y_w) > r(y_l); an exact tie counts ½."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


# =============================================================================
# 5. Batches: all pairs of a prompt together, each response scored once (InstructGPT)
# =============================================================================
#
# Treating the C(k, 2) comparisons of one prompt as independent examples makes every response
# appear in k − 1 of them: shuffled into different batches, each response would get k − 1
# gradient updates per epoch and the model overfits (InstructGPT, Ouyang et al. 2022, §3.5).
# InstructGPT keeps all pairs of a prompt in one batch, which also costs only k forward passes
# for the C(k, 2) comparisons, and weights each pair 1/C(k, 2), so every prompt counts once.
# We do the same with weight 1/(pairs kept for the prompt) — equal to 1/C(k, 2) when no tie was
# dropped. `--weighting pair` gives every pair weight 1 instead (the plain mean).

@dataclass
class PreferenceExample:
    """A tokenized comparison: ids of (x, y_w) and (x, y_l); `group` numbers its prompt."""
    group: int
    chosen: tuple
    rejected: tuple
    clean_label: float | None = None


def tokenize_preferences(pairs, enc, max_tokens):
    """PreferenceExamples of the pairs that fit in max_tokens tokens, and how many did not."""
    groups, examples, dropped = {}, [], 0
    for pair in pairs:
        group = groups.setdefault(json.dumps(pair["prompt"]), len(groups))
        chosen, rejected = (tuple(pair_ids(pair["prompt"], pair[f], enc)) for f in ("chosen", "rejected"))
        if max(len(chosen), len(rejected)) > max_tokens:
            dropped += 1
            continue
        examples.append(PreferenceExample(group, chosen, rejected, pair.get("clean_label")))
    return examples, dropped


@dataclass
class PreferenceBatch:
    """Distinct sequences (each scored once) and the comparisons among them.

    ids (N, T) right-padded rows, end_index (N,) each row's last real token; chosen / rejected
    (P,) the rows of each pair's y_w and y_l; weights (P,); clean_label (P,), NaN where unknown.
    """
    ids: torch.Tensor
    end_index: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    weights: torch.Tensor
    clean_label: torch.Tensor

    def to(self, device):
        return PreferenceBatch(*(t.to(device) for t in (self.ids, self.end_index, self.chosen, self.rejected,
                                                        self.weights, self.clean_label)))


def collate_preferences(examples, pad_token, weighting="prompt"):
    rows = {}
    for e in examples:
        rows.setdefault(e.chosen, len(rows))
        rows.setdefault(e.rejected, len(rows))
    ids, mask = collate_examples([(list(seq), [1] * len(seq)) for seq in rows], pad_token)
    pairs_per_prompt = Counter(e.group for e in examples)
    weights = [1 / pairs_per_prompt[e.group] if weighting == "prompt" else 1.0 for e in examples]
    labels = [math.nan if e.clean_label is None else e.clean_label for e in examples]
    return PreferenceBatch(ids, mask.sum(1) - 1, torch.tensor([rows[e.chosen] for e in examples]),
                           torch.tensor([rows[e.rejected] for e in examples]), torch.tensor(weights),
                           torch.tensor(labels, dtype=torch.float))


def preference_batches(examples, batch_size, pad_token, weighting="prompt", seed=None):
    """Batches of `batch_size` prompts, each prompt with all of its pairs; shuffled when seed is given."""
    by_prompt = defaultdict(list)
    for e in examples:
        by_prompt[e.group].append(e)
    order = list(by_prompt)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [collate_preferences([e for g in order[i:i + batch_size] for e in by_prompt[g]], pad_token, weighting)
            for i in range(0, len(order), batch_size)]


def batch_rewards(model, batch):
    """(r_φ(x, y_w), r_φ(x, y_l)) for the batch's pairs, from one forward pass over its distinct rows."""
    rewards = model(batch.ids, batch.end_index)
    return rewards[batch.chosen], rewards[batch.rejected]


# =============================================================================
# 6. Training (seed 3.3)
# =============================================================================

def train_step(model, optimizer, batch, lr, grad_clip, autocast, noise=0.0):
    """One AdamW update on the batch's Bradley–Terry loss (noise-aware with ε = `noise` > 0); returns
    (loss, accuracy, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        r_chosen, r_rejected = batch_rewards(model, batch)
    loss = preference_loss(r_chosen, r_rejected, noise, batch.weights)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), pairwise_accuracy(r_chosen.detach(), r_rejected.detach()), grad_norm


@torch.no_grad()
def evaluate_pairs(model, batches, device, autocast=contextlib.nullcontext(), noise=0.0):
    """Rewards of every held-out pair and their summary: the training loss (BT, noise-aware with ε =
    `noise` > 0), accuracy against the labels
    (noisy), accuracy against the clean labels (pairs the gold judge does not call equal).

    Seed 3.3, "Reward model quality": an RM is judged by its accuracy on held-out comparisons,
    and 60–70% is typical because labelers disagree. With label noise p, even a perfect r_φ
    agrees with only ≈ 1 − p of the noisy labels; the clean labels show what it really learned.
    """
    was_training = model.training
    model.eval()
    parts = defaultdict(list)
    for batch in batches:
        batch = batch.to(device)
        with autocast:
            r_chosen, r_rejected = batch_rewards(model, batch)
        for name, value in [("r_chosen", r_chosen), ("r_rejected", r_rejected), ("weights", batch.weights),
                            ("clean_label", batch.clean_label)]:
            parts[name].append(value.float().cpu())
    model.train(was_training)
    r_chosen, r_rejected, weights, clean = (torch.cat(parts[n]) for n in ("r_chosen", "r_rejected", "weights",
                                                                            "clean_label"))
    decided = (clean == 0) | (clean == 1)
    # Against the clean label, a pair "agrees" when r_φ orders it as the gold judge does.
    signed = torch.where(clean == 1, r_chosen - r_rejected, r_rejected - r_chosen)[decided]
    return {"loss": preference_loss(r_chosen, r_rejected, noise, weights).item(),
            "accuracy": pairwise_accuracy(r_chosen, r_rejected),
            "clean_accuracy": pairwise_accuracy(signed, torch.zeros_like(signed)) if decided.any() else None,
            "pairs": len(r_chosen), "clean_pairs": int(decided.sum()),
            "r_chosen": r_chosen, "r_rejected": r_rejected, "clean_label": clean}


@torch.no_grad()
def center_rewards(model, prompt_ids_list, response_ids_list, batch_size=64):
    """Shift r_φ so that its mean over SFT samples is 0; returns the new shift.

    Bradley–Terry fixes rewards only up to a constant (section 4). InstructGPT removes it with a
    bias before RL, so that the rewards PPO starts from average 0; we centre on samples of
    π_SFT, the policy PPO starts from: reward_shift ← reward_shift + mean_i r_φ(x_i, y_i).
    """
    rewards = score(model, prompt_ids_list, response_ids_list, batch_size)
    model.reward_shift += rewards.mean().to(model.reward_shift)
    return model.reward_shift.item()


def reward_checkpoint(model, step, val, tokenizer_ref, args, extra):
    """train_gpt's layout ("model", "config", "step", "tokenizer") plus the reward-model entries."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": asdict(model.config),
            "step": step, "tokenizer": tokenizer_ref, "stage": "reward", "reward_shift": model.reward_shift.item(),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_clean_accuracy": val["clean_accuracy"],
            "reward": {"sft": args.sft, **extra}, "args": {k: v for k, v in vars(args).items() if k != "func"}}


def fit(model, optimizer, epochs, val_batches, schedule, save, metrics, args, device, autocast, resume=None,
        save_point=None):
    """The loop: AdamW steps over each epoch's batches with warmup + cosine LR (train_gpt.get_lr),
    validation every schedule["eval_every"] steps, the best model by validation loss saved by
    `save(step, val)`. The Bradley–Terry log-loss picks the checkpoint rather than the accuracy:
    it is the likelihood we train, it moves smoothly, and it also rewards calibrated margins,
    while accuracy on a few hundred noisy pairs moves in coarse steps. Returns (steps, best).

    Every --checkpoint-every steps (default: at each validation) `save_point(step, state)` stores
    weights, AdamW moments, random state and the best evaluation so far; given such a `resume`
    point the loop restores them and skips the steps already done (the batches are fixed up front)."""
    best = {"loss": math.inf, "step": None}
    checkpoint_every = args.checkpoint_every or schedule["eval_every"]

    def validate(step, epoch):
        val = evaluate_pairs(model, val_batches, device, autocast, args.assumed_noise)
        improved = val["loss"] < best["loss"]
        log_line(metrics, {"step": step, "epoch": epoch, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                           "val_clean_accuracy": val["clean_accuracy"], "best": improved})
        clean = f", vs clean labels {val['clean_accuracy']:.3f}" if val["clean_accuracy"] is not None else ""
        print(f"step {step}: val loss {val['loss']:.4f}, accuracy {val['accuracy']:.3f}{clean}"
              + (" — best so far, saved" if improved else ""))
        if improved:
            best.update(loss=val["loss"], step=step, accuracy=val["accuracy"], clean_accuracy=val["clean_accuracy"])
            save(step, val)

    if resume is None:
        validate(0, 0)  # an untrained head is a candidate too: model.pt always exists
    else:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        best.update(resume["best"])
        set_random_state(resume["random"])
    step, total = 0, schedule["total_steps"]
    model.train()
    for epoch, batches in enumerate(epochs, 1):
        for batch in batches:
            if step == total:
                return step, best
            if resume is not None and step < resume["step"]:  # done before the interruption
                step += 1
                continue
            t0 = time.time()
            lr = get_lr(step + 1, schedule["warmup_steps"], total, args.lr, args.min_lr)
            loss, accuracy, grad_norm = train_step(model, optimizer, batch.to(device), lr, args.grad_clip, autocast,
                                                   args.assumed_noise)
            step += 1
            log_line(metrics, {"step": step, "epoch": epoch, "loss": loss, "accuracy": accuracy, "lr": lr,
                               "grad_norm": grad_norm, "pairs": len(batch.chosen), "seconds": time.time() - t0})
            if step % args.log_every == 0:
                print(f"step {step}/{total} (epoch {epoch}): loss {loss:.4f}, accuracy {accuracy:.3f}, "
                      f"lr {lr:.2e}, grad norm {grad_norm:.3f}")
            if step % schedule["eval_every"] == 0 or step == total:
                validate(step, epoch)
            if save_point is not None and step % checkpoint_every == 0 and step < total:
                save_point(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "random": random_state(), "best": dict(best)})
    return step, best


# =============================================================================
# 7. Evaluation
# =============================================================================
# ── first reading: skip to the end (evaluation tables and plots: accuracy, calibration, reward vs gold) ──

def pearson(a, b):
    """Pearson correlation Σ(a−ā)(b−b̄) / √(Σ(a−ā)² Σ(b−b̄)²); None if either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else None


def average_ranks(values):
    """Ranks 1..n of values, tied values sharing the mean of their ranks (gold scores tie a lot)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a, b):
    """Spearman's ρ: the Pearson correlation of the ranks (tie-averaged) — does r_φ order like gold?"""
    return pearson(average_ranks(a), average_ranks(b))


def calibration_table(p_chosen, chosen_won, bins=CALIBRATION_BINS):
    """Predicted P(y_w ≻ y_l) binned against how often the preferred side really won.

    Every pair is counted in both orders, (p, won) and (1 − p, 1 − won): a label always names a
    winner, so one order alone would put every outcome at 1. Returns the bins ({"p_mean",
    "observed", "count"}) and the expected calibration error ECE = Σ_b (n_b/n)·|observed_b − p_b|.
    """
    p = np.concatenate([p_chosen, 1 - p_chosen])
    won = np.concatenate([chosen_won, 1 - chosen_won])
    index = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            table.append({"p_mean": float(p[in_bin].mean()), "observed": float(won[in_bin].mean()),
                          "count": int(in_bin.sum())})
            ece += in_bin.sum() / len(p) * abs(table[-1]["observed"] - table[-1]["p_mean"])
    return table, float(ece)


def within_prompt(values, groups):
    """Each value minus the mean of its prompt's values: what is left once every prompt's offset is removed."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    means = {g: values[groups == g].mean() for g in set(groups.tolist())}
    return values - np.array([means[g] for g in groups.tolist()])


def ranks_within_prompt(values, groups):
    """Each value's rank among its own prompt's values (ties share the mean rank)."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    ranks = np.empty(len(values))
    for g in set(groups.tolist()):
        ranks[groups == g] = average_ranks(values[groups == g])
    return ranks


def reward_vs_gold(model, enc, samples, batch_size=64):
    """Rewards of held-out SFT samples beside their gold scores, lengths and prompt numbers
    (samples too long for the context are skipped)."""
    kept = [s for s in samples if len(pair_ids(s["prompt"], s["response"], enc)) <= model.config.block_size]
    prompts = [render_prompt(s["prompt"], enc) for s in kept]
    responses = [pair_ids(s["prompt"], s["response"], enc)[len(x):] for s, x in zip(kept, prompts)]
    rewards = score(model, prompts, responses, batch_size).cpu().numpy() if kept else np.zeros(0)
    return rewards, *(np.array([s[name] for s in kept]) for name in ("gold", "tokens", "group"))


def correlations(rewards, gold, lengths, groups):
    """How r_φ tracks the gold score on held-out samples: Pearson and Spearman over all samples,
    and Pearson within prompts. Bradley–Terry only ever compares responses to the same prompt,
    so nothing ties one prompt's rewards to another's (an "easy" prompt may sit lower than a
    hard one); the within-prompt numbers remove each prompt's offset, and are the ones that
    matter for ranking a prompt's responses — what PPO's advantages use. The same for length:
    a learned length bias shows as a positive within-prompt reward ↔ length correlation."""
    if len(rewards) < 2:
        return {name: None for name in ("pearson_gold", "spearman_gold", "pearson_gold_within_prompt",
                                        "spearman_gold_within_prompt", "pearson_length",
                                        "pearson_length_within_prompt")}
    centred = within_prompt(rewards, groups)
    return {"pearson_gold": pearson(rewards, gold), "spearman_gold": spearman(rewards, gold),
            "pearson_gold_within_prompt": pearson(centred, within_prompt(gold, groups)),
            # Spearman within prompts: does r_φ put one prompt's answers in the judge's order?
            "spearman_gold_within_prompt": pearson(within_prompt(ranks_within_prompt(rewards, groups), groups),
                                                   within_prompt(ranks_within_prompt(gold, groups), groups)),
            "pearson_length": pearson(rewards, lengths),
            "pearson_length_within_prompt": pearson(centred, within_prompt(lengths, groups))}


def evaluate_reward_model(model, enc, val_batches, heldout_samples, device, autocast, noise=0.0):
    """eval.json's numbers, and the arrays behind the plots; val_loss is the training loss (ε = `noise`),
    the one that picked the checkpoint."""
    val = evaluate_pairs(model, val_batches, device, autocast, noise)
    p_chosen = preference_probability(val["r_chosen"], val["r_rejected"]).numpy()
    noisy_table, noisy_ece = calibration_table(p_chosen, np.ones_like(p_chosen))
    clean = val["clean_label"].numpy()
    decided = (clean == 0) | (clean == 1)
    clean_table, clean_ece = calibration_table(p_chosen[decided], clean[decided]) if decided.any() else ([], None)
    rewards, gold, lengths, groups = reward_vs_gold(model, enc, heldout_samples)
    numbers = {"val_pairs": val["pairs"], "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_clean_pairs": val["clean_pairs"], "val_clean_accuracy": val["clean_accuracy"],
               "calibration_ece": noisy_ece, "calibration_ece_clean": clean_ece,
               "heldout_samples": len(rewards),
               **correlations(rewards, gold, lengths, groups),
               "mean_reward_heldout": float(rewards.mean()) if len(rewards) else None,
               "calibration": {"noisy": noisy_table, "clean": clean_table}}
    arrays = {"r_chosen": val["r_chosen"].numpy(), "r_rejected": val["r_rejected"].numpy(),
              "rewards": rewards, "gold": gold}
    return numbers, arrays


def plot_training(metrics_path, png_path):
    """Train loss per step, validation loss and accuracies per evaluation (star: kept checkpoint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _, val = plot_train_val_loss(axes[0], read_metrics(metrics_path))
    axes[0].axhline(math.log(2), color="gray", ls="--", label="ln 2 (r_φ ignores the response)")
    axes[0].set(title="Bradley–Terry loss −log σ(r_w − r_l)", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="vs labels (noisy)")
    if any(r["val_clean_accuracy"] is not None for r in val):
        axes[1].plot([r["step"] for r in val], [r["val_clean_accuracy"] for r in val], "s-", label="vs clean labels")
    axes[1].axhline(0.5, color="gray", ls="--", label="chance")
    axes[1].set(title="held-out pairwise accuracy", xlabel="step", ylim=(0.4, 1.0))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_calibration(calibration, png_path):
    """Reliability diagram: predicted P(y_w ≻ y_l) per bin against the observed win frequency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", ls="--", label="perfectly calibrated")
    for name, marker in [("noisy", "o-"), ("clean", "s-")]:
        table = calibration[name]
        if table:
            ax.plot([b["p_mean"] for b in table], [b["observed"] for b in table], marker,
                    label=f"vs {name} labels")
    ax.set(title="calibration on held-out pairs", xlabel="predicted P(win) = σ(r_w − r_l)",
           ylabel="observed win frequency", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_rewards(arrays, png_path):
    """Histograms of r_φ for the chosen and rejected held-out responses; reward against gold score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    both = np.concatenate([arrays["r_chosen"], arrays["r_rejected"]])
    bins = np.linspace(both.min(), both.max(), 40) if both.size and both.min() < both.max() else 20
    axes[0].hist(arrays["r_chosen"], bins=bins, alpha=0.6, label="chosen y_w")
    axes[0].hist(arrays["r_rejected"], bins=bins, alpha=0.6, label="rejected y_l")
    axes[0].set(title="rewards of held-out pairs", xlabel="r_φ(x, y)", ylabel="responses")
    axes[0].legend()
    axes[1].scatter(arrays["gold"], arrays["rewards"], s=6, alpha=0.4)
    axes[1].set(title="held-out SFT samples: reward vs gold score", xlabel="gold score (data.tasks.judge)",
                ylabel="r_φ(x, y) (shifted)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# =============================================================================
# 8. Command line
# =============================================================================

def validate_args(args):
    """One clear error per out-of-range flag, before any work starts: the declared ranges, then the
    checks that involve two flags."""
    check_ranges(args, Hyperparameters)
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr must be in [0, --lr] (got {args.min_lr})")
    if args.val_data and not args.data:
        raise ConfigError("--val-data needs --data (the default data is split by prompt)")
    try:
        generate_tasks(1, "train", families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--families/--levels: {e}") from None



def default_preference_data(policy, enc, args, device, autocast):
    """The built-in comparisons: --num-prompts train-split tasks, a --val-fraction of them held out,
    k samples each, ranked by the (noisy, possibly length-biased) gold judge; written as JSONL."""
    try:
        tasks = generate_tasks(args.num_prompts, "train", seed=args.seed, families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--num-prompts {args.num_prompts}: {e}") from None
    n_val = min(len(tasks) - 1, max(1, round(args.val_fraction * len(tasks))))
    splits = {"train": tasks[n_val:], "val": tasks[:n_val]}
    data = {}
    for offset, (name, split_tasks) in enumerate(splits.items()):
        t0 = time.time()
        pairs, samples = build_preference_data(policy, enc, split_tasks, args.k, args.label_noise, args.length_bias,
                                               args.temperature, args.max_new_tokens, args.gen_batch_size,
                                               args.seed + offset, device, autocast, policy.config.block_size)
        path = os.path.join(args.out, f"preferences_{name}.jsonl")
        write_preferences(path, pairs)
        data[name] = (pairs, samples)
        print(f"{name}: {len(split_tasks)} prompts × {args.k} samples (T={args.temperature}) → {len(pairs)} pairs "
              f"({len(pairs) / len(split_tasks):.2f} per prompt of C(k,2)={args.k * (args.k - 1) // 2}; ties dropped), "
              f"mean gold {np.mean([s['gold'] for s in samples]):.3f}, {time.time() - t0:.0f}s → {path}")
    return data["train"], data["val"]


def file_preference_data(args, enc, block_size):
    """Comparisons from --data (and --val-data, or a split of --data by prompt). The SFT samples
    the reward is centred on are then the distinct responses of the training pairs."""
    train_pairs = load_preferences(args.data, enc, block_size)
    if args.val_data:
        val_pairs = load_preferences(args.val_data, enc, block_size)
    else:
        train_pairs, val_pairs = split_by_prompt(train_pairs, args.val_fraction, args.seed)
    samples = list({(json.dumps(p["prompt"]), p[f]): {"prompt": p["prompt"], "response": p[f]}
                    for p in train_pairs for f in ("chosen", "rejected")}.values())
    print(f"data: {args.data}: {len(train_pairs)} train / {len(val_pairs)} val pairs")
    return (train_pairs, samples), (val_pairs, [])


def heldout_samples(policy, enc, args, device, autocast):
    """Fresh π_SFT samples on --eval-prompts test-split tasks (never compared, never trained on),
    for the correlation of r_φ with the gold score."""
    if not args.eval_prompts:
        return []
    try:
        tasks = generate_tasks(args.eval_prompts, "test", seed=HELDOUT_SEED, families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--eval-prompts {args.eval_prompts}: {e}") from None
    per_task = sample_responses(policy, enc, tasks, args.k, args.temperature, args.max_new_tokens,
                                args.gen_batch_size, args.seed + 2, device, autocast)
    return [{"prompt": task_messages(t), "group": i, **s} for i, (t, samples) in enumerate(zip(tasks, per_task))
            for s in samples]


def load_models(args, device):
    """π_SFT (for sampling), the reward model initialised from it, the tokenizer and its reference."""
    policy, checkpoint = load_sft(args.sft, device)
    tokenizer_ref = checkpoint.get("tokenizer")
    if not tokenizer_ref:
        raise ConfigError(f"{args.sft}: the checkpoint names no tokenizer")
    enc = load_tokenizer(tokenizer_ref)
    chat_tokens(enc)
    model = reward_model_from_gpt(policy)
    return policy, model, enc, tokenizer_ref


def train_reward(args):
    """Collect (or load) comparisons, fit r_φ, keep the best checkpoint, centre it, evaluate.
    A stage (data.stages.begin_stage): skipped when --out holds a finished run of this configuration
    and these inputs, resumed from its last resume point when it holds an interrupted one."""
    validate_args(args)
    started = time.time()
    fingerprint = stage_fingerprint(args, RUNTIME_FLAGS, [args.sft, args.data, args.val_data])
    if finished_stage(args.out, "reward", fingerprint, args.force):
        with open(os.path.join(args.out, "eval.json")) as f:
            return json.load(f)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    autocast = autocast_for(device)
    os.makedirs(args.out, exist_ok=True)
    policy, model, enc, tokenizer_ref = load_models(args, device)
    block_size = model.config.block_size
    pad = chat_tokens(enc).pad

    file_data = file_preference_data(args, enc, block_size) if args.data else None
    # The inputs loaded: the stage begins (a fresh start, or the continuation of an interrupted one).
    decision = begin_stage(args.out, "reward", fingerprint, args.force)
    resume = load_resume_point(args.out, fingerprint) if decision == "resume" else None
    if resume is not None:
        print(f"resuming {args.out} after step {resume['step']}")
    data, heldout = comparisons_and_heldout(args, policy, enc, file_data, resume, device, autocast)
    (train_pairs, train_samples), (val_pairs, _) = data
    if args.label_aggregation == "net-wins":
        train_pairs = aggregate_comparisons(train_pairs)
        agreement = label_agreement(train_pairs)
        print(f"net-wins aggregation: {len(data[0][0])} training pairs → {len(train_pairs)} (ties of net wins "
              f"dropped)" + ("" if agreement is None else f"; labels agree with the judge {agreement:.3f}"))
    train_examples, val_examples = tokenize_splits(train_pairs, val_pairs, enc, block_size)
    generation_seconds = time.time() - started

    epochs, val_batches, schedule = training_schedule(train_examples, val_examples, pad, args)
    # GPT's optimizer recipe (decay on matrices only) works on any module's parameters.
    optimizer = adamw(model, args.lr, args.weight_decay, device_type=device.type)
    model_path = os.path.join(args.out, "model.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    extra = {"train_pairs": len(train_examples), "val_pairs": len(val_examples), "label_noise": args.label_noise,
             "length_bias": args.length_bias, "data": args.data or "built-in tasks", "weighting": args.weighting}

    def save(step, val):
        atomic_save(reward_checkpoint(model, step, val, tokenizer_ref, args, extra), model_path)

    def save_point(step, state):
        sampled = {"data": None if args.data else data, "heldout": heldout}
        save_resume_point(args.out, fingerprint, step, {**state, "sampled": sampled})

    if resume is not None:  # the lines logged after the resume point are logged again
        truncate_metrics(metrics_path, resume["step"], final_events=("reward_shift",))
    with open(metrics_path, "w" if resume is None else "a") as metrics:
        steps, best = fit(model, optimizer, epochs, val_batches, schedule, save, metrics, args, device, autocast,
                          resume, save_point)
        shift = centre_best_checkpoint(model, model_path, train_samples, enc, best, metrics, args, device, autocast)
    with autocast:
        numbers, arrays = evaluate_reward_model(model, enc, val_batches, heldout, device, autocast,
                                               args.assumed_noise)
    summary = {**numbers, "label_agreement": label_agreement(val_pairs), "train_pairs": len(train_examples),
               "train_prompts": len({e.group for e in train_examples}), "best_step": best["step"], "steps": steps,
               "reward_shift": shift, "label_noise": args.label_noise, "length_bias": args.length_bias,
               "generation_seconds": round(generation_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "device": str(device)}
    write_outputs(summary, arrays, args, fingerprint, started)
    return summary


def comparisons_and_heldout(args, policy, enc, file_data, resume, device, autocast):
    """The comparisons ((train pairs, samples), (val pairs, _)) and the held-out SFT samples.
    Sampling them is the slow part before training: a resume point carries what was sampled
    (files given with --data are simply read again)."""
    if file_data is not None:
        data = file_data
    elif resume is not None:
        data = resume["sampled"]["data"]
    else:
        data = default_preference_data(policy, enc, args, device, autocast)
    heldout = resume["sampled"]["heldout"] if resume is not None else heldout_samples(policy, enc, args, device,
                                                                                      autocast)
    return data, heldout


def tokenize_splits(train_pairs, val_pairs, enc, block_size):
    train_examples, dropped = tokenize_preferences(train_pairs, enc, block_size)
    val_examples, val_dropped = tokenize_preferences(val_pairs, enc, block_size)
    if dropped or val_dropped:
        print(f"dropped {dropped} train / {val_dropped} val pairs longer than the context ({block_size} tokens)")
    if not train_examples or not val_examples:
        raise ConfigError(f"no comparisons to {'train on' if not train_examples else 'validate on'}: every sample pair "
                          f"tied (try more --num-prompts, a larger --k or a higher --temperature)")
    return train_examples, val_examples


def training_schedule(train_examples, val_examples, pad, args):
    """Each epoch's batches (its own shuffle), the validation batches, and the step schedule."""
    epochs = [preference_batches(train_examples, args.batch_size, pad, args.weighting, seed=args.seed + e)
              for e in range(args.epochs)]
    val_batches = preference_batches(val_examples, args.batch_size, pad, args.weighting)
    total_steps = min(sum(map(len, epochs)), args.max_steps or math.inf)
    schedule = {"total_steps": total_steps, "warmup_steps": round(args.warmup_ratio * total_steps),
                "eval_every": max(1, math.ceil(len(epochs[0]) / args.evals_per_epoch))}
    print(f"schedule: {args.epochs} epochs × {len(epochs[0])} steps of {args.batch_size} prompts "
          f"(total {total_steps}), warmup {schedule['warmup_steps']}, lr {args.lr:g} cosine, "
          f"validation every {schedule['eval_every']} steps")
    return epochs, val_batches, schedule


def centre_best_checkpoint(model, model_path, train_samples, enc, best, metrics, args, device, autocast):
    """Reload the best checkpoint into `model`, shift its reward so the mean over the SFT samples is 0
    (center_rewards), save it again; returns the shift."""
    block_size = model.config.block_size
    checkpoint = load_checkpoint(model_path, map_location=device)
    model.load_state_dict(checkpoint["model"])
    prompts = [render_prompt(s["prompt"], enc) for s in train_samples]
    responses = [pair_ids(s["prompt"], s["response"], enc)[len(x):] for s, x in zip(train_samples, prompts)]
    fits = [len(x) + len(y) <= block_size for x, y in zip(prompts, responses)]
    with autocast:
        shift = center_rewards(model, [x for x, f in zip(prompts, fits) if f],
                               [y for y, f in zip(responses, fits) if f], args.gen_batch_size)
    atomic_save({**checkpoint, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                 "reward_shift": shift}, model_path)
    log_line(metrics, {"event": "reward_shift", "step": best["step"], "reward_shift": shift, "samples": sum(fits)})
    print(f"best val loss {best['loss']:.4f} at step {best['step']}; reward shift {shift:+.4f} "
          f"(mean r_φ over {sum(fits)} SFT samples is now 0)")
    return shift


def write_outputs(summary, arrays, args, fingerprint, started):
    """eval.json and the three figures; the stage marked finished."""
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_training(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "reward_training.png"))
    plot_calibration(summary["calibration"], os.path.join(args.out, "calibration.png"))
    plot_rewards(arrays, os.path.join(args.out, "reward_histogram.png"))
    finish_stage(args.out, "reward", fingerprint, started,
                 {k: summary[k] for k in ("val_accuracy", "val_clean_accuracy", "label_agreement", "pearson_gold",
                                          "reward_shift", "best_step", "steps")})
    print_summary(summary)
    print(f"saved {os.path.join(args.out, 'model.pt')}, eval.json, reward_training.png, calibration.png, "
          f"reward_histogram.png in {summary['wall_seconds']:.0f}s")


def label_agreement(pairs):
    """Share of pairs with a clean verdict whose label agrees with it: the accuracy a perfect
    gold-judge reward would reach on the noisy labels (≈ 1 − label noise)."""
    decided = [p["clean_label"] for p in pairs if p.get("clean_label") in (0.0, 1.0)]
    return sum(decided) / len(decided) if decided else None


def print_summary(s):
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    print(f"held-out pairs: accuracy {fmt(s['val_accuracy'])} vs labels (labels agree with the gold judge "
          f"{fmt(s['label_agreement'])}), {fmt(s['val_clean_accuracy'])} vs clean labels; ECE {fmt(s['calibration_ece'])}")
    print(f"held-out SFT samples ({s['heldout_samples']}): reward vs gold Pearson {fmt(s['pearson_gold'])}, "
          f"Spearman {fmt(s['spearman_gold'])}, Pearson within prompts {fmt(s['pearson_gold_within_prompt'])}, Spearman within "
          f"prompts {fmt(s['spearman_gold_within_prompt'])}; "
          f"reward vs length Pearson {fmt(s['pearson_length'])}, within prompts {fmt(s['pearson_length_within_prompt'])}")


def build_parser():
    return build_parser_from(Hyperparameters, __doc__.split("\n")[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.best_of_n is not None:
            from best_of_n import best_of_n_command, validate_best_of_n_args  # it builds on this file
            validate_best_of_n_args(args)
            return best_of_n_command(args)
        return train_reward(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
