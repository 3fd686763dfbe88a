"""dpo.py — Direct Preference Optimization and its variants: IPO, SimPO, ORPO, KTO (seed Part 4).

Read beside Part 4 of the seed chapter (shared/seeds/000_…, "DPO (Direct Preference Optimization)")
and the "Direct Preference Optimization (DPO)" section of the blog post (shared/seeds/004_…).
Notation: x a prompt, y_w ≻ y_l the chosen and rejected responses, π_θ the policy we train,
π_ref the frozen SFT model it starts from, β the strength of the pull towards π_ref, σ the sigmoid.

The derivation in five lines (seed 4.2; blog, "Direct Preference Optimization")
-------------------------------------------------------------------------------
1. RLHF maximises  E_{y∼π}[r(x, y)] − β·KL(π ‖ π_ref)                     (seed 3.4, the same objective PPO optimises)
2. Its maximiser has a closed form  π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x)   (the blog's Lagrangian)
3. Solved for the reward:  r(x, y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x)
4. Bradley–Terry (seed 3.3) only sees reward differences, so β·log Z(x) cancels:
       P(y_w ≻ y_l | x) = σ( β·log π*(y_w|x)/π_ref(y_w|x) − β·log π*(y_l|x)/π_ref(y_l|x) )
5. Put the trainable π_θ in place of π* and maximise the likelihood of the observed preferences:
       L_DPO(θ) = −E_{(x, y_w, y_l)} log σ( β·[log π_θ(y_w|x)/π_ref(y_w|x) − log π_θ(y_l|x)/π_ref(y_l|x)] )

So DPO is logistic regression on preference pairs, with the *implicit reward*
r_θ(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)): no reward model, no critic, no rollouts (seed 4.4's
table). Two remarks on the sources. The blog's last step drops the π_SFT terms as "constant with
respect to θ"; they are constant, but they sit inside σ, so they do change the gradient — DPO
keeps them, and that is what anchors π_θ to π_ref. The seed's listing documents its inputs as
"per-token average log probabilities"; DPO's are *sums* over the response's tokens,
log π(y|x) = Σ_t log π(y_t | x, y_<t) — averaging is what SimPO and ORPO do (4.5).

The file reads top to bottom:

    1. Losses          dpo_loss, ipo_loss, simpo_loss, orpo_loss, kto_loss               (4.3, 4.5)
    2. Data            preference / unpaired JSONL, pairs → KTO examples, tokenisation
    3. Log-probs       chosen and rejected in one forward; π_ref's cached once, no grad  (4.3)
    4. Training        AdamW, warmup + cosine, clipping, metrics.jsonl, checkpoint
    5. Evaluation      held-out reward accuracy, KL(π_θ ‖ π_ref) on the policy's own samples,
                       gold score and win rate against the SFT model                    (4.6)
    6. The frontier    gold score against KL, DPO's β sweep beside PPO's run             (4.4)
    7. Putting it together   the stage (preferences found or built, train, evaluate), iterated
                       rounds on the policy's own samples (3.5), the β sweep, the command line

Its settings are declared once, in `Hyperparameters` at the top (value, help, range; settings.py).

Usage:
    python dpo.py --sft runs/default/sft/model.pt --out runs/default/dpo
    python dpo.py --loss ipo --beta 0.1 --data prefs.jsonl --out runs/default/ipo
    python dpo.py --loss kto --data unpaired.jsonl --out runs/default/kto
    python dpo.py --beta-sweep 0.05,0.1,0.3,1.0 --ppo-run runs/default/ppo --out runs/default/dpo_sweep
    python dpo.py --rounds 2 --out runs/default/dpo   # round 2 on the round-1 policy's own samples
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from data.errors import DataError
from data.hf_tokenizer import write_json
from data.tasks import generate_tasks
from reward import (Hyperparameters as RewardHyperparameters, aggregate_comparisons, build_preference_data,
                    load_preferences, prompt_messages, response_text, split_by_prompt, write_preferences)
from sft import (chat_tokens, collate_examples, comma_list, evaluate_tasks, heldout_tasks, jsonl_records,
                 load_chat_model, render_chat, render_prompt, sampled_evaluation, sequence_logprobs)
from data.stages import begin_stage, finish_stage, finished_stage, read_stage, stage_decision, stage_fingerprint
from settings import build_parser_from, check_ranges, runtime_flags, setting
from train_gpt import (ConfigError, atomic_save, autocast_for, get_lr, load_resume_point, log_line, pick_device,
                       random_state, read_metrics, save_resume_point, set_random_state, truncate_metrics)

# Hyperparameters: one line each — value, what it does, allowed range (settings.py makes the flags).
LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")  # --loss choices: DPO and the variants of seed 4.5
BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.0, "kto": 0.1}  # per-loss β (DPO/IPO/KTO papers; SimPO's β≈2; ORPO has none)
DATA_GROUP, LOSS_GROUP, EVAL_GROUP = "models and data", "the objective", "evaluation and the frontier"
ROUNDS_GROUP = "iterated DPO"


def float_list(text):
    return comma_list(float)(text)


@dataclass
class Hyperparameters:
    # models and data
    sft: str = setting("runs/default/sft/model.pt", "SFT checkpoint: the starting policy π_θ and the frozen "
                                                    "reference π_ref", group=DATA_GROUP)
    out: str = setting("runs/default/dpo", "run directory: model.pt, metrics.jsonl, eval.json, dpo.png (and the "
                                           "sweep's frontier.png)", group=DATA_GROUP)
    data: str = setting(None, "preference JSONL {prompt, chosen, rejected} or, for KTO, {prompt, completion, label} "
                              "(default: the reward run's preferences_train.jsonl, else one built into --out)",
                        group=DATA_GROUP)
    val_data: str = setting(None, "held-out preference pairs (default: a split of --data by prompt)", group=DATA_GROUP)
    reward_run: str = setting(None, "reward run directory with preferences_{train,val}.jsonl (default: <run>/reward "
                                    "next to the SFT directory)", group=DATA_GROUP)
    val_fraction: float = setting(0.1, "share of --data's prompts held out when no validation file is given",
                                  check="(0, 1)", group=DATA_GROUP)
    num_prompts: int = setting(RewardHyperparameters.num_prompts, "train-split task prompts when the preference set "
                               "must be built (as reward.py)", check="> 0", group=DATA_GROUP)
    k: int = setting(RewardHyperparameters.k, "SFT responses sampled and ranked per prompt for that set",
                     check="> 0", group=DATA_GROUP)
    label_noise: float = setting(RewardHyperparameters.label_noise, "probability that the simulated labeler flips a "
                                 "pair in that set", check="[0, 0.5)", group=DATA_GROUP)
    families: list = setting(None, "task families for built data and evaluation, e.g. arith,sort",
                             type=comma_list(str), group=DATA_GROUP)
    levels: list = setting(None, "task levels for built data and evaluation, e.g. 1,2", type=comma_list(int),
                           group=DATA_GROUP)
    label_aggregation: str = setting(RewardHyperparameters.label_aggregation, "none: train on each comparison as "
                                     "labelled; net-wins: relabel the training pairs by a majority over their "
                                     "prompt's comparisons (reward.aggregate_comparisons)",
                                     choices=["none", "net-wins"], group=DATA_GROUP)
    # the objective (seed 4.3, 4.5)
    loss: str = setting("dpo", "the objective: DPO (seed 4.3) or a variant (4.5)", choices=LOSSES, group=LOSS_GROUP)
    beta: float = setting(None, f"β (default per loss: {BETA}); IPO's τ; unused by ORPO", group=LOSS_GROUP)
    simpo_gamma: float = setting(1.0, "SimPO target reward margin γ (the paper's γ/β ≈ 0.5)", group=LOSS_GROUP)
    orpo_lambda: float = setting(0.1, "ORPO weight λ of the odds-ratio term (the paper's default)", check="≥ 0",
                                 group=LOSS_GROUP)
    kto_desirable_weight: float = setting(1.0, "KTO λ_D", check="≥ 0", group=LOSS_GROUP)
    kto_undesirable_weight: float = setting(1.0, "KTO λ_U", check="≥ 0", group=LOSS_GROUP)
    # training
    epochs: int = setting(1, "passes over the training pairs (1-3 is usual; a 2nd pass over our noisy labels raised "
                             "KL, not gold)", check="> 0", group="training")
    max_steps: int = setting(None, "stop after this many steps (default: all epochs)", check="≥ 0", group="training")
    batch_size: int = setting(16, "pairs (KTO: examples) per optimizer step", check="> 0", group="training")
    lr: float = setting(3e-5, "peak learning rate, by experiment on the default model: 3e-4 collapses, 1e-4 drifts "
                              "(KL 2+ nats)", check="> 0", group="training")
    min_lr: float = setting(None, "final learning rate of the cosine (default lr/10)", group="training")
    warmup_ratio: float = setting(0.1, "share of the steps spent in linear warmup", check="[0, 1)", group="training")
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices", check="≥ 0", group="training")
    grad_clip: float = setting(1.0, "max global gradient norm", check="> 0", group="training")
    evals_per_epoch: int = setting(4, "held-out preference evaluations per epoch", check="> 0", group="training")
    log_every: int = setting(20, "steps between progress lines", check="> 0", runtime=True, group="training")
    checkpoint_every: int = setting(None, "steps between resume points (default: at every evaluation); a rerun "
                                          "after an interruption continues from the last one", check="≥ 0",
                                    runtime=True, group="training")
    force: bool = setting(False, "train again even if --out holds a finished run of this configuration",
                          runtime=True, group="training")
    device: str = setting("auto", "cpu, cuda, cuda:1, … (auto: cuda if available)", runtime=True, group="training")
    seed: int = setting(1337, "seed for data order, KTO mismatches and sampling", group="training")
    # iterated DPO (seed 3.5, prevention 6)
    rounds: int = setting(1, "rounds of DPO: round r ≥ 2 starts from round r − 1's policy, which is also its π_ref, "
                             "and learns from comparisons of that policy's own samples", check="> 0",
                          group=ROUNDS_GROUP)
    round_prompts: int = setting(700, "fresh train-split prompts × --k samples per round r ≥ 2, ranked by the noisy "
                                      "judge: ≈ the pairs one round's steps use, so 2 rounds label fewer prompts "
                                      "than the reward model's 4,000", check="≥ 2",
                                 why="some prompts are held out for validation", group=ROUNDS_GROUP)
    # evaluation and the frontier (seed 4.4, 4.6)
    eval_tasks: int = setting(200, "held-out prompts for KL, gold score, win rate (0: skip)", check="≥ 0",
                              group=EVAL_GROUP)
    # Not runtime: it cuts sampling into batches (the evaluation's, a built preference set's), changing the draws.
    eval_batch_size: int = setting(64, "prompts generated in parallel", check="> 0", group=EVAL_GROUP)
    max_new_tokens: int = setting(32, "longest generated reply in tokens", check="> 0", group=EVAL_GROUP)
    beta_sweep: list = setting(None, "train one policy per β (out/beta_<β>/) and plot gold score against KL "
                                     "(frontier.png)", type=float_list, metavar="B1,B2,…", group=EVAL_GROUP)
    ppo_run: str = setting(None, "PPO run directory whose metrics.jsonl has per-iteration 'kl' and 'gold_score': "
                                 "its points join the frontier", metavar="DIR", group=EVAL_GROUP)


# The flags left out of the stage fingerprint (data.stages.stage_fingerprint): speed, printing, bookkeeping.
RUNTIME_FLAGS = runtime_flags(Hyperparameters)


# =============================================================================
# 1. The losses (seed 4.3, 4.5)
# =============================================================================

# classroom: begin dpo_loss
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1):
    """DPO (Rafailov et al. 2023; seed 4.3, the listing; blog, "Direct Preference Optimization").

        h  = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]
        L  = −mean log σ(β·h)

    Inputs are (B,) *summed* response log-probs. Returns (loss, chosen_rewards, rejected_rewards,
    reward_accuracies), the last three batch means of the implicit rewards β·log π_θ/π_ref and of
    [r_w > r_l]. With π_θ = π_ref, h = 0 and L = −log σ(0) = ln 2.

    The gradient is bounded (blog): with Δ = β·h, ∂L/∂Δ = σ(Δ) − 1 ∈ [−1, 0] per pair — a pair the
    policy already ranks right (Δ ≫ 0) contributes almost nothing; no importance ratio can explode.
    """
    chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_log_ratios - rejected_log_ratios)).mean()
    chosen_rewards = beta * chosen_log_ratios.detach()
    rejected_rewards = beta * rejected_log_ratios.detach()
    reward_accuracies = (chosen_rewards > rejected_rewards).float()
    return loss, chosen_rewards.mean(), rejected_rewards.mean(), reward_accuracies.mean()
# classroom: end dpo_loss


# classroom: begin ipo_loss
def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"; seed 4.5).

        h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]
        L = mean (h − 1/(2β))²

    DPO's −log σ(β·h) keeps falling as h → ∞, so on deterministic preferences (y_w always wins)
    it drives π_θ(y_l) → 0 whatever β says: the KL anchor stops holding. IPO regresses h onto a
    finite target 1/(2β) instead (β is the paper's τ): minimum 0 at h = 1/(2β), and overshooting
    is penalised. Rewards returned as in `dpo_loss` (β·log-ratio), summed log-probs as inputs.
    """
    chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
    loss = ((chosen_log_ratios - rejected_log_ratios - 1 / (2 * beta)) ** 2).mean()
    chosen_rewards = beta * chosen_log_ratios.detach()
    rejected_rewards = beta * rejected_log_ratios.detach()
    return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
# classroom: end ipo_loss


# classroom: begin simpo_loss
def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta=2.0, gamma=1.0):
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"; seed 4.5).

        r(x, y) = (β/|y|)·log π_θ(y|x)             the length-normalised (average) log-prob
        L       = −mean log σ( r(x, y_w) − r(x, y_l) − γ )

    No reference model: the reward is the policy's own average log-prob, the quantity generation
    ranks by, and dividing by |y| removes the pull towards longer (or shorter) responses that a
    sum has. γ asks the chosen response to win by a margin. Inputs are (B,) *average* log-probs.
    With γ = 0 it is DPO's shape, −log σ(β·difference), with π_ref ≡ 1 and averages for sums.
    Returns (loss, chosen_rewards, rejected_rewards, reward_accuracies) with r as above.
    """
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
# classroom: end simpo_loss


def log_odds(avg_logps):
    """log odds(y|x) = log P/(1 − P) with P = exp(average token log-prob) (ORPO's odds).

        log odds = a − log(1 − eᵃ),   computed as a − log(−expm1(a)), accurate for a near 0.
    a is clamped just below 0 (P < 1), where the odds are finite.
    """
    avg_logps = avg_logps.clamp(max=-1e-6)
    return avg_logps - torch.log(-torch.expm1(avg_logps))


# classroom: begin orpo_loss
def orpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, odds_ratio_weight=0.1):
    """ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model"; seed 4.5).

        L_SFT = −(1/|y_w|)·log π_θ(y_w|x)                                   NLL of the chosen response
        L_OR  = −log σ( log odds(y_w|x) − log odds(y_l|x) )                 odds(y|x) = P/(1 − P),
                                                                            P = exp((1/|y|)·log π_θ(y|x))
        L     = mean (L_SFT + λ·L_OR)

    SFT and preference learning in one objective, no reference model: the NLL keeps the chosen
    responses likely, the odds-ratio term pushes the rejected ones down relative to them. Inputs
    are (B,) *average* log-probs. The rewards returned are the log odds of each response.
    """
    chosen_log_odds = log_odds(policy_chosen_avg_logps)
    rejected_log_odds = log_odds(policy_rejected_avg_logps)
    odds_ratio_term = -F.logsigmoid(chosen_log_odds - rejected_log_odds)
    loss = (-policy_chosen_avg_logps + odds_ratio_weight * odds_ratio_term).mean()
    chosen_rewards, rejected_rewards = chosen_log_odds.detach(), rejected_log_odds.detach()
    return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
# classroom: end orpo_loss


def kto_reference_point(policy_mismatched_logps, reference_mismatched_logps):
    """KTO's reference point z_ref ≈ KL(π_θ ‖ π_ref), estimated on *mismatched* pairs (x_i, y_j), j ≠ i:

        z_ref = max(0, mean_j [log π_θ(y_j|x_i) − log π_ref(y_j|x_i)])      detached: no gradient

    Responses to other prompts stand in for samples from π_θ(·|x_i) (cheap: no generation). The
    clamp is the paper's (a KL is ≥ 0; a noisy negative estimate would shift every reward).
    """
    return (policy_mismatched_logps - reference_mismatched_logps).mean().clamp(min=0).detach()


# classroom: begin kto_loss
def kto_loss(policy_logps, reference_logps, is_desirable, reference_point, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; seed 4.5).

        r(x, y) = log π_θ(y|x) − log π_ref(y|x)
        v(x, y) = λ_D·σ(β·(r − z_ref))     if y is desirable
                  λ_U·σ(β·(z_ref − r))     if y is undesirable
        L       = mean (λ_y − v(x, y))

    Unpaired data: each example is one response with a thumbs up or down, no partner needed. The
    value v is a prospect-theory curve around the reference point z_ref (`kto_reference_point`):
    concave for gains, and λ_U > λ_D makes losses loom larger. Inputs (B,) summed log-probs and a
    (B,) bool tensor. Returns (loss, desirable_rewards, undesirable_rewards, reference_point):
    mean β·r over each group (NaN for an empty group) and z_ref.
    """
    rewards = policy_logps - reference_logps
    desirable_values = desirable_weight * torch.sigmoid(beta * (rewards - reference_point))
    undesirable_values = undesirable_weight * torch.sigmoid(beta * (reference_point - rewards))
    losses = torch.where(is_desirable, desirable_weight - desirable_values, undesirable_weight - undesirable_values)
    implicit_rewards = beta * rewards.detach()
    return (losses.mean(), implicit_rewards[is_desirable].mean(), implicit_rewards[~is_desirable].mean(),
            reference_point)
# classroom: end kto_loss


# =============================================================================
# 2. Data: preference pairs and unpaired examples
# =============================================================================
# ── first reading: skip to section 3 (preference files, KTO examples) ──
#
# Paired: the reward model's files, read by reward.load_preferences (same formats, same FILE:LINE
# errors): {"prompt", "chosen", "rejected"}, {"prompt", "responses", "ranking"}, or HH-RLHF-style
# conversations. It returns {"prompt": messages, "chosen": text, "rejected": text, …} records.
# Unpaired (KTO): {"prompt": str | messages, "completion": str | [assistant message], "label": bool},
# validated with reward.py's prompt_messages / response_text.

@dataclass
class PreferencePair:
    """One (x, y_w, y_l) tokenised: (ids, mask) of prompt + response, mask 1 on the response only."""

    chosen: tuple
    rejected: tuple
    prompt_key: str = ""
    reference_chosen_logp: float = None     # log π_ref(y_w|x), filled once by cache_reference_logprobs
    reference_rejected_logp: float = None


@dataclass
class UnpairedExample:
    """One (x, y, desirable?) for KTO, with a mismatched (x, y') whose y' answers another prompt."""

    sequence: tuple
    desirable: bool
    prompt_key: str = ""
    mismatched: tuple = None
    reference_logp: float = None
    reference_mismatched_logp: float = None


def tokenize_response(prompt, response, enc):
    """(ids, mask) of prompt x + response y through the chat template (sft.render_chat), the mask
    1 only on y's tokens and its closing <|end|>: the prompt — earlier assistant turns of a
    multi-turn prompt included — is context, never scored."""
    ids, mask = render_chat(prompt + [{"role": "assistant", "content": response}], enc)
    prompt_length = len(render_prompt(prompt, enc))
    return ids, [0] * prompt_length + mask[prompt_length:]


def prompt_key(prompt):
    return json.dumps(prompt, sort_keys=True)


def fits(sequence, block_size):
    """A sequence of n tokens fills n − 1 input slots (the last token is only a target)."""
    return len(sequence[0]) - 1 <= block_size


def tokenize_pairs(records, enc, block_size, source):
    """PreferencePairs from {"prompt", "chosen", "rejected"} records. A pair that does not fit the
    context is dropped, not truncated (a cut response would be scored without its end).
    Returns (pairs, number dropped)."""
    pairs, dropped = [], 0
    for index, record in enumerate(records, 1):
        where = f"{source}: record {index}"
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
            raise ConfigError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'")
        prompt = prompt_messages(record["prompt"], where)
        chosen, rejected = (response_text(record[field], where, field) for field in ("chosen", "rejected"))
        pair = PreferencePair(tokenize_response(prompt, chosen, enc), tokenize_response(prompt, rejected, enc),
                              prompt_key(prompt))
        if fits(pair.chosen, block_size) and fits(pair.rejected, block_size):
            pairs.append(pair)
        else:
            dropped += 1
    return pairs, dropped


def load_unpaired(path):
    """KTO records {"prompt": messages, "completion": text, "label": bool} from a JSONL file;
    errors name FILE:LINE."""
    records = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not {"prompt", "completion", "label"} <= set(record):
            raise ConfigError(f"{where}: an unpaired (KTO) record needs 'prompt', 'completion' and 'label'")
        if not isinstance(record["label"], bool):
            raise ConfigError(f"{where}: 'label' must be true or false, got {record['label']!r}")
        records.append({"prompt": prompt_messages(record["prompt"], where),
                        "completion": response_text(record["completion"], where, "completion"),
                        "label": record["label"]})
    if not records:
        raise ConfigError(f"{path}: no records in the file")
    return records


def pairs_to_unpaired(records):
    """A paired set as KTO data: each chosen response is desirable, each rejected one undesirable."""
    unpaired = []
    for record in records:
        unpaired.append({"prompt": record["prompt"], "completion": record["chosen"], "label": True})
        unpaired.append({"prompt": record["prompt"], "completion": record["rejected"], "label": False})
    return unpaired


def tokenize_unpaired(records, enc, block_size, source, seed):
    """UnpairedExamples, each with a mismatched sequence (its own prompt, another prompt's
    completion) for KTO's z_ref. The mismatch is drawn once (seeded), so π_ref's log-prob of it
    can be cached like every other. Returns (examples, number dropped as too long)."""
    examples, parts, dropped = [], [], 0
    for index, record in enumerate(records, 1):
        where = f"{source}: record {index}"
        prompt = prompt_messages(record["prompt"], where)
        completion = response_text(record["completion"], where, "completion")
        sequence = tokenize_response(prompt, completion, enc)
        if not fits(sequence, block_size):
            dropped += 1
            continue
        examples.append(UnpairedExample(sequence, bool(record["label"]), prompt_key(prompt)))
        parts.append((prompt, completion))
    if len({e.prompt_key for e in examples}) < 2:
        raise ConfigError(f"{source}: KTO needs examples from at least 2 different prompts (for z_ref's mismatched pairs)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for position, i in enumerate(order):
        for offset in range(1, len(order)):  # the next example in the shuffled order with another prompt that fits
            j = order[(position + offset) % len(order)]
            if examples[j].prompt_key != examples[i].prompt_key:
                mismatched = tokenize_response(parts[i][0], parts[j][1], enc)
                if fits(mismatched, block_size):
                    examples[i].mismatched = mismatched
                    break
        if examples[i].mismatched is None:  # no other completion fits after this prompt
            examples[i].mismatched = examples[i].sequence
    return examples, dropped


def is_unpaired_file(path):
    """True if the first record of a JSONL file has the KTO keys ("completion", "label")."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the loader reports the line
                return isinstance(record, dict) and "completion" in record and "label" in record
    return False


# =============================================================================
# 3. Log-probabilities: chosen and rejected in one forward; π_ref cached once (seed 4.3 takes
#    π_ref's log-probs as inputs; computing them once before training is ours)
# =============================================================================

PairLogps = namedtuple("PairLogps", "chosen rejected chosen_count rejected_count")


def pair_logprobs(model, pairs, pad_token, device):
    """log π(y_w|x) and log π(y_l|x) summed over response tokens, with |y_w| and |y_l|: the 2B
    sequences (chosen rows, then rejected rows) are right-padded into one batch, one forward.
    sft.sequence_logprobs shifts by one, masks prompt and padding, and computes in fp32."""
    ids, mask = collate_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token)
    logps, counts = sequence_logprobs(model, ids.to(device), mask.to(device), return_count=True)
    chosen, rejected = logps.chunk(2)
    chosen_count, rejected_count = counts.chunk(2)
    return PairLogps(chosen, rejected, chosen_count, rejected_count)


def batch_logprobs(model, sequences, pad_token, device):
    """Summed response log-probs (B,) of (ids, mask) sequences, right-padded into one batch."""
    ids, mask = collate_examples(sequences, pad_token)
    return sequence_logprobs(model, ids.to(device), mask.to(device))


def batches(items, batch_size):
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


@torch.no_grad()
def cache_reference_logprobs(reference, examples, pad_token, batch_size, device, autocast=contextlib.nullcontext()):
    """log π_ref of every sequence, computed once before training, without gradient, stored on
    each example: π_ref is frozen, so recomputing it every step would only double the cost."""
    was_training = reference.training
    reference.eval()
    for chunk in batches(examples, batch_size):
        with autocast:
            if isinstance(chunk[0], PreferencePair):
                logps = pair_logprobs(reference, chunk, pad_token, device)
                for pair, chosen, rejected in zip(chunk, logps.chosen.tolist(), logps.rejected.tolist()):
                    pair.reference_chosen_logp, pair.reference_rejected_logp = chosen, rejected
            else:
                logps = batch_logprobs(reference, [e.sequence for e in chunk] + [e.mismatched for e in chunk],
                                       pad_token, device).tolist()
                for example, logp, mismatched in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                    example.reference_logp, example.reference_mismatched_logp = logp, mismatched
    reference.train(was_training)


def reference_logprobs_of(examples):
    """The π_ref log-probs cache_reference_logprobs stored on each example, as plain dicts: a resume
    point keeps them, so that a resumed run does not pass over the data again."""
    return [{f.name: getattr(e, f.name) for f in fields(e) if f.name.startswith("reference_")} for e in examples]


def loss_hyperparameters(args, beta):
    return {"beta": beta, "gamma": args.simpo_gamma, "odds_ratio_weight": args.orpo_lambda,
            "desirable_weight": args.kto_desirable_weight, "undesirable_weight": args.kto_undesirable_weight}


def paired_loss(loss_name, logps, pairs, hp):
    """The chosen paired loss on a batch's policy log-probs and its cached reference log-probs."""
    device = logps.chosen.device
    reference_chosen = torch.tensor([p.reference_chosen_logp for p in pairs], device=device)
    reference_rejected = torch.tensor([p.reference_rejected_logp for p in pairs], device=device)
    if loss_name == "dpo":
        return dpo_loss(logps.chosen, logps.rejected, reference_chosen, reference_rejected, hp["beta"])
    if loss_name == "ipo":
        return ipo_loss(logps.chosen, logps.rejected, reference_chosen, reference_rejected, hp["beta"])
    chosen_avg = logps.chosen / logps.chosen_count.clamp(min=1)
    rejected_avg = logps.rejected / logps.rejected_count.clamp(min=1)
    if loss_name == "simpo":
        return simpo_loss(chosen_avg, rejected_avg, hp["beta"], hp["gamma"])
    if loss_name == "orpo":
        return orpo_loss(chosen_avg, rejected_avg, hp["odds_ratio_weight"])
    raise ValueError(f"not a paired loss: {loss_name!r}")


def kto_batch_loss(policy, examples, hp, pad_token, device):
    """KTO on a batch of unpaired examples: the policy's log-probs with gradient; the mismatched
    pairs' only for z_ref (detached anyway, so computed without a graph)."""
    policy_logps = batch_logprobs(policy, [e.sequence for e in examples], pad_token, device)
    with torch.no_grad():
        policy_mismatched = batch_logprobs(policy, [e.mismatched for e in examples], pad_token, device)
    reference_mismatched = torch.tensor([e.reference_mismatched_logp for e in examples], device=device)
    reference_point = kto_reference_point(policy_mismatched, reference_mismatched)
    return kto_loss(policy_logps, torch.tensor([e.reference_logp for e in examples], device=device),
                    torch.tensor([e.desirable for e in examples], device=device), reference_point,
                    hp["beta"], hp["desirable_weight"], hp["undesirable_weight"])


def batch_loss(policy, chunk, loss_name, hp, pad_token, device):
    if loss_name == "kto":
        return kto_batch_loss(policy, chunk, hp, pad_token, device)
    return paired_loss(loss_name, pair_logprobs(policy, chunk, pad_token, device), chunk, hp)


# =============================================================================
# 4. Training
# =============================================================================

def metric_names(loss_name):
    """How the three metrics after the loss are called in metrics.jsonl, per loss."""
    if loss_name == "kto":
        return "desirable_reward", "undesirable_reward", "reference_point"
    return "chosen_reward", "rejected_reward", "reward_accuracy"


def as_float(value):
    """A JSON-safe float (None for NaN, e.g. a KTO batch without undesirable examples)."""
    value = float(value)
    return None if math.isnan(value) else value


def train_step(policy, optimizer, chunk, loss_name, hp, lr, grad_clip, pad_token, device, autocast):
    """One AdamW update; returns the loss and its metrics as a dict of floats."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss, first, second, third = batch_loss(policy, chunk, loss_name, hp, pad_token, device)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = metric_names(loss_name)
    record = {"loss": loss.item(), names[0]: as_float(first), names[1]: as_float(second), names[2]: as_float(third),
              "grad_norm": grad_norm}
    if loss_name != "kto":
        record["reward_margin"] = record["chosen_reward"] - record["rejected_reward"]
    return record


@torch.no_grad()
def evaluate_pairs(policy, pairs, loss_name, hp, pad_token, batch_size, device, autocast=contextlib.nullcontext()):
    """Held-out preference metrics. For every loss, the log-ratio h = log π_θ/π_ref(y_w) −
    log π_θ/π_ref(y_l) (DPO's implicit reward margin ÷ β, in nats — comparable across methods):
    its accuracy P(h > 0) and mean. For paired losses also the loss and its own reward metrics."""
    was_training = policy.training
    policy.eval()
    with autocast:
        parts = [pair_logprobs(policy, chunk, pad_token, device) for chunk in batches(pairs, batch_size)]
    policy.train(was_training)
    logps = PairLogps(*(torch.cat(column) for column in zip(*parts)))
    reference_chosen = torch.tensor([p.reference_chosen_logp for p in pairs], device=logps.chosen.device)
    reference_rejected = torch.tensor([p.reference_rejected_logp for p in pairs], device=logps.chosen.device)
    log_ratio_margin = (logps.chosen - reference_chosen) - (logps.rejected - reference_rejected)
    result = {"val_logratio_accuracy": (log_ratio_margin > 0).float().mean().item(),
              "val_logratio_margin": log_ratio_margin.mean().item(),
              "val_chosen_logratio": (logps.chosen - reference_chosen).mean().item(),
              "val_rejected_logratio": (logps.rejected - reference_rejected).mean().item()}
    if loss_name != "kto":
        loss, chosen_reward, rejected_reward, accuracy = paired_loss(loss_name, logps, pairs, hp)
        result.update({"val_loss": loss.item(), "val_chosen_reward": chosen_reward.item(),
                       "val_rejected_reward": rejected_reward.item(), "val_reward_accuracy": accuracy.item(),
                       "val_reward_margin": (chosen_reward - rejected_reward).item()})
    return result


def make_checkpoint(policy, step, tokenizer_ref, args, loss_name, beta, extra):
    """train_gpt's checkpoint layout ("model", "config", "step", "tokenizer") plus DPO entries, so
    any later script loads the policy with train_gpt.model_from_checkpoint."""
    return {"model": {k: v.detach().cpu() for k, v in policy.state_dict().items()}, "config": asdict(policy.config),
            "step": step, "tokenizer": tokenizer_ref, "stage": loss_name,
            "dpo": {"sft": args.sft, "loss": loss_name, "beta": beta, **extra},
            "args": {k: v for k, v in vars(args).items()}}


def training_schedule(n_examples, args):
    steps_per_epoch = math.ceil(n_examples / args.batch_size)
    total = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    return {"steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": round(args.warmup_ratio * total),
            "eval_every": max(1, math.ceil(steps_per_epoch / args.evals_per_epoch))}


def epoch_order(n_examples, seed, epoch):
    """The shuffled order of the training examples in one epoch (seeded per epoch, so a resumed run
    and examples_used see the same batches)."""
    order = list(range(n_examples))
    random.Random(seed + epoch).shuffle(order)
    return order


def examples_used(n_examples, args):
    """Indices of the training examples the schedule's steps will see, in the batches fit() makes.
    With --max-steps short of the epochs only these need π_ref's log-probs (the cpu preset's 700
    steps of 16 pairs see 11,200 of its 51,901 training pairs)."""
    total_steps, step, used = training_schedule(n_examples, args)["total_steps"], 0, set()
    for epoch in range(1, args.epochs + 1):
        for chunk in batches(epoch_order(n_examples, args.seed, epoch), args.batch_size):
            if step == total_steps:
                return sorted(used)
            used.update(chunk)
            step += 1
    return sorted(used)


def fit(policy, train_examples, val_pairs, loss_name, beta, args, run, metrics, resume=None, save_point=None):
    """The training loop: epochs of shuffled batches, LR from warmup + cosine (train_gpt.get_lr),
    held-out preference metrics every schedule["eval_every"] steps and at the end.

    Every --checkpoint-every steps (default: at each evaluation) `save_point(step, state)` stores the
    weights, AdamW's moments, the random state and the last evaluation; given such a `resume` point
    the loop restores them and skips the steps already done (each epoch's order is seeded)."""
    hp = loss_hyperparameters(args, beta)
    schedule = training_schedule(len(train_examples), args)
    checkpoint_every = args.checkpoint_every or schedule["eval_every"]
    optimizer = policy.configure_optimizer(args.lr, args.weight_decay, device_type=run["device"].type)
    pad, device, autocast = run["pad"], run["device"], run["autocast"]

    def validate(step, epoch):
        if not val_pairs:
            return {}
        result = evaluate_pairs(policy, val_pairs, loss_name, hp, pad, args.batch_size, device, autocast)
        log_line(metrics, {"step": step, "epoch": epoch, **result})
        return result

    print(f"{loss_name.upper()} β={beta:g}: {len(train_examples)} training examples, {schedule['total_steps']} steps "
          f"({schedule['steps_per_epoch']}/epoch), warmup {schedule['warmup_steps']}, lr {args.lr:g}")
    if resume is None:
        last = validate(0, 0)
    else:
        policy.load_state_dict(resume["policy"])
        optimizer.load_state_dict(resume["optimizer"])
        last = resume["last_evaluation"]
        set_random_state(resume["random"])
    step = 0
    policy.train()
    for epoch in range(1, args.epochs + 1):
        order = epoch_order(len(train_examples), args.seed, epoch)
        for chunk in batches([train_examples[i] for i in order], args.batch_size):
            if step == schedule["total_steps"]:
                break
            if resume is not None and step < resume["step"]:  # done before the interruption
                step += 1
                continue
            t0 = time.time()
            lr = get_lr(step + 1, schedule["warmup_steps"], schedule["total_steps"], args.lr, args.min_lr)
            record = train_step(policy, optimizer, chunk, loss_name, hp, lr, args.grad_clip, pad, device, autocast)
            step += 1
            log_line(metrics, {"step": step, "epoch": epoch, "lr": lr, **record, "seconds": time.time() - t0})
            if step % args.log_every == 0:
                print(f"step {step}/{schedule['total_steps']}: loss {record['loss']:.4f}, "
                      + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in ("loss",) and v is not None))
            if step % schedule["eval_every"] == 0 or step == schedule["total_steps"]:
                last = validate(step, epoch)
                if last:
                    print(f"step {step}: held-out log-ratio accuracy {last['val_logratio_accuracy']:.3f}, "
                          f"margin {last['val_logratio_margin']:.3f} nats"
                          + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""))
            if save_point is not None and step % checkpoint_every == 0 and step < schedule["total_steps"]:
                save_point(step, {"policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                                  "random": random_state(), "last_evaluation": last})
    return step, last


# =============================================================================
# 5. Evaluation: KL to π_ref and the gold score against the SFT model (measures seed 4.4's "Quality"
#    row and 4.6's KL-budget remark on our tasks; the seeds have no evaluation recipe)
# =============================================================================

def win_rate(policy_scores, sft_scores):
    """P(gold(policy) > gold(SFT)) on the same prompts, ties counted half."""
    wins = sum(p > s for p, s in zip(policy_scores, sft_scores))
    ties = sum(p == s for p, s in zip(policy_scores, sft_scores))
    return (wins + 0.5 * ties) / max(1, len(policy_scores)), wins, ties


def mean(values):
    return sum(values) / max(1, len(values))


def sft_baseline(reference, enc, tasks, args, run):
    """The SFT model's greedy and sampled gold scores (computed once, shared by a β sweep)."""
    greedy = evaluate_tasks(reference, enc, tasks, args.max_new_tokens, args.eval_batch_size, run["device"],
                            run["autocast"], keep_scores=True)
    sampled = sampled_evaluation(reference, reference, enc, tasks, args.max_new_tokens, args.eval_batch_size,
                                 run["device"], run["autocast"])
    return {"scores": greedy["scores"], "mean_score": greedy["mean_score"], "exact_match": greedy["exact_match"],
            "stopped": greedy["stopped"], "sampled_gold_score": mean(sampled["gold"])}


def evaluate_policy(policy, reference, enc, tasks, baseline, args, run):
    """eval.json's generation numbers: KL(π_θ ‖ π_ref) on the policy's own samples at temperature 1
    (sft.sampled_evaluation: Σ_t log π_θ − log π_ref, the frontier's x), sampled and greedy gold
    scores, and the greedy win rate against the SFT model on the same held-out prompts."""
    sampled = sampled_evaluation(policy, reference, enc, tasks, args.max_new_tokens, args.eval_batch_size,
                                 run["device"], run["autocast"])
    greedy = evaluate_tasks(policy, enc, tasks, args.max_new_tokens, args.eval_batch_size, run["device"],
                            run["autocast"], keep_scores=True)
    scores, replies = greedy["scores"], greedy["replies"]
    rate, wins, ties = win_rate(scores, baseline["scores"])
    return {"kl": mean(sampled["kl"]), "sampled_gold_score": mean(sampled["gold"]),
            "gold_score": greedy["mean_score"], "exact_match": greedy["exact_match"], "stopped": greedy["stopped"],
            "win_rate_vs_sft": rate, "wins": wins, "ties": ties, "losses": len(tasks) - wins - ties,
            "examples": [{"prompt": t.prompt, "answer": t.answer, "reply": r, "score": round(s, 3),
                          "sft_score": round(b, 3)}
                         for t, r, s, b in list(zip(tasks, replies, scores, baseline["scores"]))[:8]]}


# =============================================================================
# 6. The frontier: gold score against KL, DPO beside PPO (seed 4.4; DPO paper, figure 2)
# =============================================================================
# ── first reading: skip to section 7 (the frontier plot) ──
#
# A PPO run directory holds metrics.jsonl; every line with both keys below is one point (other
# lines are ignored), in iteration order:
#     {"iteration": 12, "kl": 3.1, "gold_score": 0.41, ...}
#     kl          mean over the iteration's sampled responses of Σ_t log π_θ(y_t|·) − log π_ref(y_t|·),
#                 in nats per response (the same estimator as `sft.sampled_evaluation`)
#     gold_score  mean data.tasks.judge score of those responses, in [0, 1]

def read_ppo_points(run_dir):
    """PPO's (KL, gold score) points from DIR/metrics.jsonl (format above); errors name FILE:LINE."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"--ppo-run {run_dir}: {path} not found")
    points = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "kl" not in record or "gold_score" not in record:
                continue
            if not all(isinstance(record[k], (int, float)) for k in ("kl", "gold_score")):
                raise ConfigError(f"{path}:{line_number}: 'kl' and 'gold_score' must be numbers")
            label = f"it {record['iteration']}" if "iteration" in record else None
            points.append({"kl": float(record["kl"]), "gold_score": float(record["gold_score"]), "label": label})
    if not points:
        raise ConfigError(f"{path}: no lines with both 'kl' and 'gold_score' (the PPO metrics format)")
    return points


def plot_frontier(points_by_method, png):
    """Gold score against KL(π_θ ‖ π_ref), one series per method: {"DPO": [{"kl", "gold_score",
    "label"?}, …], "PPO": […], "SFT": […]}. The better method is up and to the left: more gold
    score for the same drift from the SFT model. PPO's points are its iterations (a trajectory,
    joined in order); other methods' points are sorted by KL and labelled (e.g. by β)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, points in points_by_method.items():
        if not points:
            continue
        ordered = points if method.upper().startswith("PPO") else sorted(points, key=lambda p: p["kl"])
        kls, golds = [p["kl"] for p in ordered], [p["gold_score"] for p in ordered]
        if method.upper() == "SFT":
            ax.plot(kls, golds, "k*", ms=14, label=method)
            continue
        style = "-" if method.upper().startswith("PPO") else "o--"
        ax.plot(kls, golds, style, ms=6, lw=1.2, alpha=0.85, label=method)
        if not method.upper().startswith("PPO"):
            for p in ordered:
                if p.get("label"):
                    ax.annotate(p["label"], (p["kl"], p["gold_score"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8)
    ax.set(xlabel="KL(π_θ ‖ π_ref) per response (nats, policy samples)", ylabel="gold score (sampled, T=1)",
           title="Reward–KL frontier on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_training(metrics_path, png, loss_name, round_starts=()):
    """Training loss and, on held-out pairs, the log-ratio accuracy and the chosen/rejected log-ratios
    (with --rounds, a dashed line where each later round starts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_logratio_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    if loss_name == "dpo":
        axes[0].axhline(math.log(2), color="gray", ls=":", label="ln 2 (π_θ = π_ref)")
        axes[0].legend()
    axes[0].set(title=f"{loss_name.upper()} training loss", xlabel="step")
    axes[1].plot([r["step"] for r in val], [r["val_logratio_accuracy"] for r in val], "o-")
    axes[1].set(title="held-out accuracy: P(h > 0)", xlabel="step", ylim=(0, 1))
    axes[2].plot([r["step"] for r in val], [r["val_chosen_logratio"] for r in val], "o-", label="chosen y_w")
    axes[2].plot([r["step"] for r in val], [r["val_rejected_logratio"] for r in val], "o-", label="rejected y_l")
    axes[2].axhline(0, color="gray", ls=":")
    axes[2].set(title="held-out log π_θ/π_ref (nats)", xlabel="step")
    axes[2].legend()
    for ax in axes:
        for step in round_starts:
            ax.axvline(step, color="gray", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# =============================================================================
# 7. Putting it together, and the command line
# =============================================================================

def default_reward_dir(sft_path):
    """runs/<name>/sft/model.pt → runs/<name>/reward (where reward.py writes its preference files)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(sft_path))), "reward")


def find_preference_files(args):
    """The files preference_files reads, if they exist: (train file, val file or None, built_here),
    else None. built_here: a set that an earlier run built into --out, not another stage's files."""
    if args.data:
        return args.data, args.val_data, False
    reward_dir = args.reward_run or default_reward_dir(args.sft)
    for directory in (reward_dir, args.out):
        train_path = os.path.join(directory, "preferences_train.jsonl")
        val_path = os.path.join(directory, "preferences_val.jsonl")
        if os.path.isfile(train_path):
            return train_path, (val_path if os.path.isfile(val_path) else None), directory != reward_dir
    return None


def preference_files(args, reference, enc, run):
    """(train file, val file or None): --data/--val-data if given; else the reward run's
    preferences_{train,val}.jsonl, so DPO and the reward model (hence PPO) learn from the same
    comparisons; else a set built now into --out (`build_default_preferences`)."""
    found = find_preference_files(args)
    return found[:2] if found else build_default_preferences(reference, enc, args, run)


def build_default_preferences(reference, enc, args, run):
    """The reward stage's comparison data, built the same way (reward.build_preference_data, seed
    3.2): --num-prompts train-split tasks, a --val-fraction of them held out, k samples each from
    π_SFT ranked by the gold judge with --label-noise. Written to --out/preferences_*.jsonl."""
    print(f"no preference files found: sampling {args.num_prompts} prompts × {args.k} responses from {args.sft}, "
          f"ranked by the gold judge (label noise {args.label_noise})")
    try:
        tasks = generate_tasks(args.num_prompts, "train", seed=args.seed, families=args.families, levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--num-prompts/--families/--levels: {e}") from None
    n_val = min(len(tasks) - 1, max(1, round(args.val_fraction * len(tasks))))
    paths = []
    for offset, (name, split_tasks) in enumerate((("train", tasks[n_val:]), ("val", tasks[:n_val]))):
        pairs, _ = build_preference_data(reference, enc, split_tasks, k=args.k, label_noise=args.label_noise,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                         seed=args.seed + offset, device=run["device"], autocast=run["autocast"],
                                         max_tokens=reference.config.block_size)
        paths.append(os.path.join(args.out, f"preferences_{name}.jsonl"))
        write_preferences(paths[-1], pairs)
        print(f"{name}: {len(split_tasks)} prompts → {len(pairs)} pairs → {paths[-1]}")
    return tuple(paths)


def load_training_data(args, reference, enc, run):
    """Tokenised training examples (pairs, or KTO's unpaired examples) and held-out pairs."""
    block_size = reference.config.block_size
    train_path, val_path = preference_files(args, reference, enc, run)
    unpaired = is_unpaired_file(train_path)
    if unpaired and args.loss != "kto":
        raise ConfigError(f"{train_path}: unpaired {{prompt, completion, label}} records; --loss {args.loss} needs "
                          f"pairs {{prompt, chosen, rejected}} (use --loss kto)")
    records = load_unpaired(train_path) if unpaired else load_preferences(train_path)
    if val_path:
        if is_unpaired_file(val_path):
            raise ConfigError(f"{val_path}: held-out data must be preference pairs {{prompt, chosen, rejected}}")
        val_records = load_preferences(val_path)
    elif unpaired:
        val_records = []
    else:
        records, val_records = split_by_prompt(records, args.val_fraction, args.seed)
    if args.label_aggregation == "net-wins" and not unpaired:
        before = len(records)
        records = aggregate_comparisons(records)
        print(f"net-wins aggregation: {before} training pairs → {len(records)} (ties of net wins dropped)")
    if args.loss == "kto":
        examples, dropped = tokenize_unpaired(records if unpaired else pairs_to_unpaired(records), enc, block_size,
                                              train_path, args.seed)
    else:
        examples, dropped = tokenize_pairs(records, enc, block_size, train_path)
    val_pairs, val_dropped = tokenize_pairs(val_records, enc, block_size, val_path or train_path)
    if not examples:
        raise ConfigError(f"{train_path}: no record fits the context of {block_size} tokens")
    print(f"data: {train_path}: {len(examples)} training {'examples' if args.loss == 'kto' else 'pairs'}, "
          f"{len(val_pairs)} held-out pairs" + (f" ({dropped + val_dropped} too long, dropped)" if dropped + val_dropped else ""))
    return examples, val_pairs, {"train_file": train_path, "val_file": val_path, "dropped_too_long": dropped + val_dropped}


def prepare(args, fingerprint=None):
    """Everything a run (or a β sweep) shares: models, data, cached π_ref log-probs, SFT baseline.
    With a stage `fingerprint` (train_stage) the stage begins once the model and data have loaded,
    and a resumed run (run["resume"]: its resume point) takes the log-probs and baseline from there."""
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    reference, enc = load_chat_model(args.sft, None, device)
    for p in reference.parameters():
        p.requires_grad_(False)
    tokenizer_ref = torch.load(args.sft, map_location="cpu", weights_only=True).get("tokenizer")
    autocast = autocast_for(device)
    run = {"device": device, "autocast": autocast, "pad": chat_tokens(enc).pad, "enc": enc,
           "reference": reference, "tokenizer_ref": tokenizer_ref}
    examples, val_pairs, data_info = load_training_data(args, reference, enc, run)
    resume = None
    if fingerprint is not None and begin_stage(args.out, args.loss, fingerprint, args.force) == "resume":
        resume = load_resume_point(args.out, fingerprint)
    run["resume"] = resume
    if resume is not None:
        print(f"resuming {args.out} after step {resume['step']}")
        for example, cached in zip(examples + val_pairs, resume["prelude"]["reference_logprobs"]):
            vars(example).update(cached)
    else:
        t0 = time.time()
        used = [examples[i] for i in examples_used(len(examples), args)]
        cache_reference_logprobs(reference, used, run["pad"], args.batch_size, device, autocast)
        # Held-out pairs in evaluate_pairs' batches: the same shapes give bit-identical log-probs, so
        # at step 0 (π_θ = π_ref) every h is exactly 0 — accuracy 0, loss ln 2 — not float noise.
        cache_reference_logprobs(reference, val_pairs, run["pad"], args.batch_size, device, autocast)
        print(f"π_ref log-probs cached for {len(used)} of {len(examples)} training examples (those the "
              f"{training_schedule(len(examples), args)['total_steps']} steps use) and {len(val_pairs)} held-out "
              f"in {time.time() - t0:.1f}s")
    run.update(examples=examples, val_pairs=val_pairs, data_info=data_info, tasks=heldout_tasks(args))
    if resume is not None:
        run["baseline"] = resume["prelude"]["baseline"]
    else:
        run["baseline"] = sft_baseline(reference, enc, run["tasks"], args, run) if run["tasks"] else None
    if run["baseline"]:
        print(f"SFT model on {len(run['tasks'])} held-out prompts: greedy gold {run['baseline']['mean_score']:.3f}, "
              f"sampled gold {run['baseline']['sampled_gold_score']:.3f}")
    return run


def new_policy(args, run):
    """A fresh trainable copy of the SFT model (dropout 0: with dropout, π_θ ≠ π_ref at step 0)."""
    policy, _ = load_chat_model(args.sft, None, run["device"])
    return policy.train()


def train_one(args, run, beta, out_dir, fingerprint=None, resume=None):
    """Train one policy with --loss at this β into out_dir; evaluate; return eval.json's dict.
    With a stage `fingerprint` (not in a sweep) it writes resume points, continues from `resume`,
    and marks the stage finished at the end (train_stage)."""
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    policy = new_policy(args, run)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    save_point = None
    if fingerprint is not None:
        prelude = {"reference_logprobs": reference_logprobs_of(run["examples"] + run["val_pairs"]),
                   "baseline": run["baseline"]}

        def save_point(step, state):
            save_resume_point(out_dir, fingerprint, step, {**state, "prelude": prelude})
    if resume is not None:  # the lines logged after the resume point are logged again
        truncate_metrics(metrics_path, resume["step"], final_events=("eval",))
    with open(metrics_path, "w" if resume is None else "a") as metrics:
        steps, last_val = fit(policy, run["examples"], run["val_pairs"], args.loss, beta, args, run, metrics,
                              resume, save_point)
        train_seconds = time.time() - started
        extra = {"train_examples": len(run["examples"]), "val_pairs": len(run["val_pairs"]), **run["data_info"]}
        model_path = os.path.join(out_dir, "model.pt")
        atomic_save(make_checkpoint(policy, steps, run["tokenizer_ref"], args, args.loss, beta, extra), model_path)
        summary = {"loss": args.loss, "beta": beta, "steps": steps, "lr": args.lr, "epochs": args.epochs,
                   **extra, "preferences": last_val, "train_seconds": round(train_seconds, 1)}
        if run["tasks"]:
            generation = evaluate_policy(policy, run["reference"], run["enc"], run["tasks"], run["baseline"], args, run)
            baseline = {k: v for k, v in run["baseline"].items() if k != "scores"}
            summary.update({"heldout_prompts": len(run["tasks"]), "policy": generation, "sft": baseline})
            log_line(metrics, {"event": "eval", "step": steps, **{k: v for k, v in generation.items() if k != "examples"}})
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["device"] = str(run["device"])
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_training(metrics_path, os.path.join(out_dir, "dpo.png"), args.loss)
    if fingerprint is not None:
        policy_numbers, sft_numbers = summary.get("policy") or {}, summary.get("sft") or {}
        finish_stage(out_dir, args.loss, fingerprint, started,
                     {"sft_gold": sft_numbers.get("mean_score"), "policy_gold": policy_numbers.get("gold_score"),
                      "kl": policy_numbers.get("kl"), "win_rate_vs_sft": policy_numbers.get("win_rate_vs_sft"),
                      "val_logratio_accuracy": (last_val or {}).get("val_logratio_accuracy"), "steps": steps})
    print_summary(summary, out_dir)
    return summary


def train_stage(args):
    """One run (no sweep) as a stage (data.stages.begin_stage): skipped when --out holds a finished run
    of this configuration and these inputs, resumed from its resume point when it holds an
    interrupted one. Its inputs are --sft and the preference files made by another stage."""
    found = find_preference_files(args)
    built_here = found is not None and found[2]
    fingerprint = stage_fingerprint(args, RUNTIME_FLAGS, [args.sft, *(found[:2] if found and not built_here else ())])
    if finished_stage(args.out, args.loss, fingerprint, args.force):
        with open(os.path.join(args.out, "eval.json")) as f:
            return json.load(f)
    if built_here and stage_decision(read_stage(args.out), fingerprint, args.force) == "fresh":
        for path in found[:2]:  # a set built from another --sft or other flags: build it again
            if path:
                os.remove(path)
    run = prepare(args, fingerprint)
    return train_one(args, run, args.beta, args.out, fingerprint, run["resume"])


def round_args(args, r, previous):
    """The flags of round r of --rounds, trained into out/round_<r>/. Round 1 is plain DPO on the
    given comparisons. Round r ≥ 2 is the same loss one step further on: its π_θ starts from, and
    its π_ref is, the policy `previous` of round r − 1, and its data are comparisons of that
    policy's own samples (own_comparisons) — offline DPO learns only on the SFT model's answers,
    and drifts away from them as it trains (seed 3.5, prevention 6: collect new comparisons on
    the policy's outputs; Llama 2 iterates rounds the same way)."""
    out = os.path.join(args.out, f"round_{r}")
    # rounds and round_prompts say how many rounds and how they sample, not what round r trains on:
    # kept out of its flags (and so of its fingerprint), a finished round survives a change of either.
    flags = {**vars(args), "out": out, "rounds": 1, "round_prompts": None, "eval_tasks": 0}
    if r > 1:
        flags.update(sft=previous, data=os.path.join(out, "preferences_train.jsonl"),
                     val_data=os.path.join(out, "preferences_val.jsonl"), reward_run=None,
                     num_prompts=args.round_prompts, seed=args.seed + r - 1)
    return argparse.Namespace(**flags)


COMPARISONS_ORIGIN = "comparisons.json"  # in round_<r>/: which policy and flags sampled its comparisons


def comparisons_origin(args):
    """What round r's comparisons come from: the contents of the policy that sampled them (round
    r − 1's model.pt) and the round's flags (k, prompts, seed, labeler, …), as one fingerprint."""
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("data", "val_data")})
    return stage_fingerprint(flags, RUNTIME_FLAGS, [args.sft])


def own_comparisons(args):
    """Round r's comparisons (round_args): --round-prompts fresh train-split prompts, k samples each
    from the previous round's policy, ranked by the same noisy judge (build_default_preferences).
    Files already there are reused only when comparisons.json says they were sampled by this very
    policy with these flags: a round 1 retrained (another β, say) makes round 2 sample afresh."""
    origin = comparisons_origin(args)
    record = os.path.join(os.path.dirname(args.data), COMPARISONS_ORIGIN)
    if os.path.isfile(args.data) and os.path.isfile(args.val_data) and os.path.isfile(record):
        with open(record) as f:
            if json.load(f).get("origin") == origin:
                return
    device = pick_device(args.device)
    autocast = autocast_for(device)
    policy, enc = load_chat_model(args.sft, None, device)
    build_default_preferences(policy.eval(), enc, args, {"device": device, "autocast": autocast})
    write_json(record, {"origin": origin, "sampled_by": args.sft})  # last: the files above are complete


def evaluate_against(policy_path, args):
    """evaluate_policy for a trained checkpoint, against --sft (a later round's π_ref is not the SFT
    model, so the rounds' own evaluations would not compare with a one-round run's)."""
    device = pick_device(args.device)
    run = {"device": device, "autocast": autocast_for(device)}
    reference, enc = load_chat_model(args.sft, None, device)
    policy, _ = load_chat_model(policy_path, None, device)
    tasks = heldout_tasks(args)
    baseline = sft_baseline(reference.eval(), enc, tasks, args, run)
    return evaluate_policy(policy.eval(), reference, enc, tasks, baseline, args, run), baseline


def merge_round_metrics(round_dirs, path):
    """The rounds' metrics.jsonl as one file: each line tagged with its round, steps counted on from
    one round to the next. Returns the step at which each later round starts."""
    offset, starts = 0, []
    with open(path, "w") as merged:
        for r, directory in enumerate(round_dirs, 1):
            if r > 1:
                starts.append(offset)
            records = read_metrics(os.path.join(directory, "metrics.jsonl"))
            for record in records:
                step = record.get("step", 0) + offset
                merged.write(json.dumps({**record, "round": r, "step": step}) + "\n")
            offset += max((record.get("step", 0) for record in records), default=0)
    return starts


def iterated_stage(args):
    """--rounds R as one stage: each round a stage of its own in out/round_<r>/ (skipped when
    finished, resumed when interrupted), the last round's policy copied to out/model.pt and
    evaluated against the SFT model; eval.json lists every round's held-out preference numbers, and
    metrics.jsonl / dpo.png follow the rounds one after the other."""
    found = find_preference_files(args)
    fingerprint = stage_fingerprint(args, RUNTIME_FLAGS, [args.sft, *(found[:2] if found and not found[2] else ())])
    if finished_stage(args.out, args.loss, fingerprint, args.force):
        with open(os.path.join(args.out, "eval.json")) as f:
            return json.load(f)
    started = time.time()
    # Each round is a stage of its own: one whose fingerprint (and comparisons' origin) still match is
    # skipped, so another --rounds, --round-prompts or --eval-tasks keeps the rounds already trained.
    begin_stage(args.out, args.loss, fingerprint, args.force)
    previous, rounds, round_dirs = args.sft, [], []
    for r in range(1, args.rounds + 1):
        flags = round_args(args, r, previous)
        round_dirs.append(flags.out)
        if r > 1:
            own_comparisons(flags)
        result = train_stage(flags)
        rounds.append({"round": r, "train_file": result.get("train_file"), "train_examples": result["train_examples"],
                       "steps": result["steps"], "preferences": result["preferences"]})
        previous = os.path.join(flags.out, "model.pt")
    model_path = os.path.join(args.out, "model.pt")
    atomic_save(torch.load(previous, map_location="cpu", weights_only=True), model_path)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    starts = merge_round_metrics(round_dirs, metrics_path)
    plot_training(metrics_path, os.path.join(args.out, "dpo.png"), args.loss, starts)
    summary = {"loss": args.loss, "beta": args.beta, "rounds": rounds}
    if args.eval_tasks:
        generation, baseline = evaluate_against(model_path, args)
        summary.update({"heldout_prompts": args.eval_tasks, "policy": generation,
                        "sft": {k: v for k, v in baseline.items() if k != "scores"}})
    summary["wall_seconds"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    policy_numbers = summary.get("policy") or {}
    finish_stage(args.out, args.loss, fingerprint, started,
                 {"rounds": args.rounds, "policy_gold": policy_numbers.get("gold_score"), "kl": policy_numbers.get("kl"),
                  "val_logratio_accuracy": (rounds[-1]["preferences"] or {}).get("val_logratio_accuracy")})
    print(f"{args.rounds} rounds: " + "; ".join(
        f"round {e['round']} {e['train_examples']} pairs, held-out log-ratio accuracy "
        f"{(e['preferences'] or {}).get('val_logratio_accuracy', float('nan')):.3f}" for e in rounds))
    if "policy" in summary:
        p, s = summary["policy"], summary["sft"]
        print(f"held-out prompts, against the SFT model: KL {p['kl']:.3f} nats; gold score {p['gold_score']:.3f} "
              f"(SFT {s['mean_score']:.3f}); sampled gold {p['sampled_gold_score']:.3f} (SFT {s['sampled_gold_score']:.3f})")
    print(f"saved {model_path}, metrics.jsonl, eval.json, dpo.png ({summary['wall_seconds']:.0f}s)")
    return summary


def print_summary(summary, out_dir):
    prefs = summary.get("preferences") or {}
    if prefs:
        print(f"held-out pairs: log-ratio accuracy {prefs['val_logratio_accuracy']:.3f}, margin "
              f"{prefs['val_logratio_margin']:.3f} nats" + (f", reward accuracy {prefs['val_reward_accuracy']:.3f}, "
                                                           f"margin {prefs['val_reward_margin']:.3f}"
                                                           if "val_reward_accuracy" in prefs else ""))
    if "policy" in summary:
        p, s = summary["policy"], summary["sft"]
        print(f"held-out prompts: KL(π_θ‖π_ref) {p['kl']:.3f} nats; gold score {p['gold_score']:.3f} (SFT "
              f"{s['mean_score']:.3f}); sampled gold {p['sampled_gold_score']:.3f} (SFT {s['sampled_gold_score']:.3f}); "
              f"win rate vs SFT {p['win_rate_vs_sft']:.1%}")
    print(f"saved {os.path.join(out_dir, 'model.pt')}, metrics.jsonl, eval.json, dpo.png ({summary['wall_seconds']:.0f}s)")


def beta_sweep(args, run):
    """Train one policy per β in --beta-sweep (out/beta_<β>/), and plot the frontier with the SFT
    point and, with --ppo-run, PPO's iterations. Writes out/frontier.json and out/frontier.png."""
    if not run["tasks"]:
        raise ConfigError("--beta-sweep needs held-out prompts for KL and gold score (--eval-tasks > 0)")
    points = []
    for beta in args.beta_sweep:
        summary = train_one(args, run, beta, os.path.join(args.out, f"beta_{beta:g}"))
        points.append({"kl": summary["policy"]["kl"], "gold_score": summary["policy"]["sampled_gold_score"],
                       "label": f"β={beta:g}", "beta": beta, "greedy_gold_score": summary["policy"]["gold_score"],
                       "win_rate_vs_sft": summary["policy"]["win_rate_vs_sft"]})
    by_method = {args.loss.upper(): points,
                 "SFT": [{"kl": 0.0, "gold_score": run["baseline"]["sampled_gold_score"], "label": "SFT"}]}
    if args.ppo_run:
        by_method["PPO"] = read_ppo_points(args.ppo_run)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(by_method, f, indent=2)
    plot_frontier(by_method, os.path.join(args.out, "frontier.png"))
    for p in points:
        print(f"{p['label']}: KL {p['kl']:.3f}, sampled gold {p['gold_score']:.3f}, greedy gold "
              f"{p['greedy_gold_score']:.3f}, win rate {p['win_rate_vs_sft']:.1%}")
    print(f"wrote {os.path.join(args.out, 'frontier.png')} and frontier.json")
    return by_method


def validate_args(args):
    """One clear error per out-of-range flag, before any work starts: the declared ranges, then the
    checks that involve two flags (β's default depends on --loss)."""
    if args.beta is None:
        args.beta = BETA[args.loss]
    check_ranges(args, Hyperparameters)
    if args.loss != "orpo" and args.beta <= 0:
        raise ConfigError(f"--beta must be > 0 for --loss {args.loss} (got {args.beta})")
    if args.beta_sweep is not None and (not args.beta_sweep or min(args.beta_sweep) <= 0):
        raise ConfigError(f"--beta-sweep must list positive β values, e.g. 0.05,0.1,0.3,1.0 (got {args.beta_sweep})")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr must be in [0, --lr] (got {args.min_lr})")
    if args.val_data and not args.data:
        raise ConfigError("--val-data needs --data (the default preference set comes with its own split)")
    if args.rounds > 1 and args.beta_sweep is not None:
        raise ConfigError("--rounds and --beta-sweep: a sweep trains one round per β; give one of them")
    if args.ppo_run and args.beta_sweep is None:
        raise ConfigError("--ppo-run is read by --beta-sweep (the frontier plot); give both")
    for flag, path in (("--sft", args.sft), ("--data", args.data), ("--val-data", args.val_data)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: file not found")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" after a help string, except where X is None (the help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    return build_parser_from(Hyperparameters, __doc__.split("\n")[0], formatter_class=HelpFormatter)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        if args.beta_sweep is not None:  # several runs, each redone: a sweep is not cached as one stage
            return beta_sweep(args, prepare(args))
        return iterated_stage(args) if args.rounds > 1 else train_stage(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
