"""ppo.py — RLHF with PPO (and GRPO): the policy learns to please the reward model (seed 3.4–3.5).

Read beside sections 3.4–3.5 of the seed chapter (shared/seeds/000_…) and the "Proximal Policy
Optimization (PPO)" section of the blog post (shared/seeds/004_…), whose notation we keep. The
language model is an RL agent: the state s_t = (x, y_<t) is the prompt and the response so far, the
action a_t = y_t is the next token, and the policy π_θ(a_t | s_t) is our GPT. We maximise

    J(θ) = E_{x∼D, y∼π_θ(·|x)} [ r_φ(x, y) − β · KL(π_θ(·|x) ‖ π_ref(·|x)) ]            (seed 3.4)

with four networks: the policy π_θ (initialised from SFT, trained), the reference π_ref (the SFT
model, frozen), the reward model r_φ (reward.py, frozen) and the value model V (the critic,
initialised from r_φ, trained). The loop follows seed 3.4's six steps:

    1. Prompts      a batch of train-split task prompts                              (training_prompts)
    2. Rollout      y ∼ π_θ(·|x) (KV-cached, left-padded prompts), keeping log π_old(y_t|s_t)
                                                                                     (sample_rollouts)
    3. Score        r_φ(x, y) once per response, read at its last real token; log π_ref and V(s_t)
                    on every response token, and the per-token reward
                    r_t = −β·(log π_θ − log π_ref)(y_t|s_t) + [t = last]·r_φ(x, y)    (make_experience; blog)
    4. Advantages   GAE: δ_t = r_t + γ·V(s_{t+1}) − V(s_t),  A_t = Σ_l (γλ)^l δ_{t+l}  (make_experience)
    5. Update       a few epochs of minibatch steps on the clipped objective (ppo_update). The seed's
                    L_PPO = E_t[min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)] is maximised, so the loss we
                    minimise is its negative, −L_PPO (ppo_policy_loss); the value loss and the entropy
                    term come from the blog, not the seed:  loss = −L_PPO + L_value − c₂·H
    6. Repeat                                                                        (run_iterations)

GRPO (`--algo grpo`, the other algorithm the blog names) drops the critic: it samples k responses
per prompt and uses A = (R − mean_group)/(std_group + ε) for every token of a response, with the
KL to π_ref moved from the reward into the loss. Section 3.5's reward hacking is reproduced by
`--beta-sweep`: PPO against a length-biased reward model, with and without the KL penalty. And
`--reward-source judge` swaps r_φ for the gold judge itself (a verifiable reward, as in
DeepSeek-R1): the same machinery with a reward that cannot be hacked, to tell apart what PPO
can do from what the reward model lets it do.

The file reads top to bottom:

    1. Hyperparameters
    2. The four models      policy, reference, reward model, value model; the memory of each  (3.4)
    3. Rollouts             sampling, padding and masks, per-token log-probs and values
    4. Rewards and KL       k1/k3 estimators, the KL-penalised per-token reward, adaptive β   (3.4)
    5. Advantages           GAE (PPO), group-relative advantages (GRPO), whitening           (3.4)
    6. Losses               clipped policy loss, clipped value loss, entropy                 (3.4; blog)
    7. The update           experience → epochs of minibatches; one training iteration
    8. Training             the loop, metrics.jsonl, checkpoint, held-out evaluation (SFT vs PPO)
    9. Reward hacking       a β sweep against a length-biased reward model                   (3.5)
   10. Plots
   11. Command line

Usage:
    python ppo.py --sft runs/default/sft/model.pt --reward-model runs/default/reward/model.pt --out runs/default/ppo
    python ppo.py --algo grpo --group-size 4 --beta 0.05
    python ppo.py --kl-target 2.0                                  # adaptive β (Ziegler et al. 2019)
    python ppo.py --reward-source judge --algo grpo                  # the gold judge as the reward
    python ppo.py --beta-sweep 0,0.02,0.2 --length-bias 0.05 --out runs/default/ppo_hacking
"""

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

import reward
from data.errors import DataError
from data.hf_tokenizer import write_json
from data.tasks import generate_tasks, judge
from data.tokenizer import load_tokenizer
from reward import (RewardEnsemble, load_reward_model, load_sft, reward_model_from_gpt, reward_model_paths, score,
                    task_messages)
from sft import (HELDOUT_SEED, IGNORE_INDEX, chat_tokens, comma_list, decode_response, evaluate_tasks, heldout_tasks,
                 left_pad, render_prompt, token_logprobs)
from data.stages import begin_stage, finish_stage, finished_stage, stage_fingerprint
from settings import build_parser_from, check_ranges, runtime_flags, setting
from train_gpt import (ConfigError, atomic_save, autocast_for, load_resume_point, log_line, pick_device,
                       random_state, read_metrics, save_resume_point, set_random_state, truncate_metrics)

# =============================================================================
# 1. Hyperparameters: one line each — value, what it does, allowed range (settings.py makes the flags)
# =============================================================================

# --reward-model's value when PPO trains on r_φ (left None, --beta-sweep trains a length-biased one of its own)
REWARD_MODEL = "runs/default/reward/model.pt"


@dataclass
class Hyperparameters:
    sft: str = setting("runs/default/sft/model.pt", "π_SFT: initialises the policy π_θ and is the frozen "
                                                    "reference π_ref")
    reward_model: str = setting(None, f"r_φ from reward.py, also the critic's start (default {REWARD_MODEL}; with "
                                      f"--beta-sweep and no value, a length-biased one is trained first; several, comma-separated: an "
                                      f"ensemble, see --ensemble-reduce)")
    out: str = setting("runs/default/ppo", "output directory: model.pt, metrics.jsonl, ppo.png, eval.json")
    algo: str = setting("ppo", "ppo: clipped objective, critic, GAE; grpo: group-relative advantages, no critic",
                        choices=["ppo", "grpo"])
    reward_source: str = setting("rm", "rm: the reward model r_φ (RLHF); judge: the gold judge, a verifiable "
                                       "reward (no r_φ to hack)", choices=["rm", "judge"])
    ensemble_reduce: str = setting("mean", "several --reward-model checkpoints (an ensemble, seed 3.5 prevention 3) "
                                           "score a response by the members' mean or their min", choices=["mean", "min"])
    # rollouts (seed 3.4, steps 1–3)
    iterations: int = setting(40, "rollout → update cycles", check="> 0", group="rollouts")
    rollouts: int = setting(64, "responses sampled per iteration (the experience batch)", check="> 0", group="rollouts")
    group_size: int = setting(4, "GRPO, and PPO with --reward-baseline group: responses per prompt, k (the group is "
                                 "the baseline)", group="rollouts")
    reward_baseline: str = setting("none", "PPO: group samples --group-size responses per prompt and subtracts their "
                                           "mean r_φ (Bradley–Terry leaves a constant per prompt free); none: r_φ as "
                                           "scored", choices=["none", "group"], group="rollouts")
    max_new_tokens: int = setting(32, "longest response in tokens (as reward.py sampled its data)", check="> 0",
                                  group="rollouts")
    temperature: float = setting(1.0, "rollout sampling temperature; 1 samples π_θ itself, as the KL assumes",
                                 check="> 0", group="rollouts")
    missing_end_penalty: float = setting(1.0, "subtracted from r_φ for a response that never emits <|end|>",
                                         check="≥ 0", group="rollouts")
    recompute_logprobs: bool = setting(False, "compute log π_old with a second forward after sampling instead of "
                                              "keeping the sampler's (equal to float error; costs a forward)",
                                       group="rollouts")
    families: list = setting(None, "task families for rollouts and evaluation, e.g. arith,sort (default: all)",
                             type=comma_list(str), group="rollouts")
    levels: list = setting(None, "task levels for rollouts and evaluation, e.g. 1,2 (default: the usual mix)",
                           type=comma_list(int), group="rollouts")
    # the objective (seed 3.4)
    beta: float = setting(0.2, "β: weight of the KL penalty to π_ref (seed 3.4: typically 0.1–0.3)", check="≥ 0",
                          group="objective")
    kl_penalty: str = setting("sampled", "sampled: β·k1 in each token's reward (PPO, the seed's) or β·k3 in the loss "
                                         "(GRPO); exact: β·KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over the vocabulary in "
                                         "the loss",
                              choices=["sampled", "exact"], group="objective")
    kl_target: float = setting(None, "adaptive β (Ziegler et al. 2019): target KL per response in nats (default: "
                                     "β stays fixed)", check="> 0", group="objective")
    kl_horizon: float = setting(1000, "adaptive β: horizon in responses, K_β = rollouts / horizon", check="> 0",
                                group="objective")
    gamma: float = setting(1.0, "γ: discount; 1 — the episode is one short response", check="(0, 1]",
                           group="objective")
    lam: float = setting(0.95, "λ: GAE's bias–variance knob (0: one-step TD, 1: Monte Carlo)", check="[0, 1]",
                         group="objective")
    # the update (seed 3.4, step 5)
    ppo_epochs: int = setting(4, "passes over each batch of experience", check="> 0", group="update")
    minibatch_size: int = setting(16, "responses per gradient step", check="> 0", group="update")
    clip_eps: float = setting(0.2, "ε: the ratio π_θ/π_old is clipped to [1 − ε, 1 + ε]", check="(0, 1)",
                              group="update")
    value_clip: float = setting(0.2, "the critic's new values stay within ± this of the rollout's", check="> 0",
                                group="update")
    entropy_coef: float = setting(0.0, "c₂: entropy bonus (0: the KL to π_ref already keeps diversity)",
                                  check="≥ 0", group="update")
    lr: float = setting(3e-5, "policy learning rate (SFT used 1e-3: RL steps must be small)", check="> 0",
                        group="update")
    value_lr: float = setting(1e-4, "critic learning rate (PPO)", group="update")
    anneal_lr: bool = setting(False, "decay both learning rates linearly to 0 over the iterations (CleanRL's "
                                     "default): late, noisy steps shrink", group="update")
    critic: str = setting("separate", "V: its own network (separate), or a scalar head on the policy's backbone "
                          "(shared: one forward for both, loss L_policy + c₁·L_value)", choices=("separate", "shared"),
                          group="update")
    value_coef: float = setting(0.1, "c₁: weight of the value loss in the shared loss (--critic shared)", check="> 0",
                                group="update")
    grad_clip: float = setting(1.0, "max gradient norm, per network", check="> 0", group="update")
    # reward hacking (seed 3.5)
    beta_sweep: list = setting(None, "run PPO once per β (e.g. 0,0.02,0.1) and plot reward_hacking.png",
                               type=comma_list(float), group="reward hacking (seed 3.5)")
    length_bias: float = setting(0.05, "B per token of the length-biased labeler when the sweep trains its reward "
                                       "model", check="finite", group="reward hacking (seed 3.5)")
    rm_prompts: int = setting(2000, "prompts compared to train the sweep's reward model", check="> 0",
                              group="reward hacking (seed 3.5)")
    # evaluation and running
    eval_tasks: int = setting(300, "held-out test-split tasks judged greedily for SFT and PPO (0: skip)", check="≥ 0",
                              group="evaluation and running")
    # Not runtime: it also cuts the sampled evaluation into batches, which changes its random draws.
    eval_batch_size: int = setting(64, "prompts generated (and responses scored) at once", check="> 0",
                                   group="evaluation and running")
    log_every: int = setting(1, "iterations between progress lines", check="> 0", runtime=True,
                             group="evaluation and running")
    snapshot_every: int = setting(0, "iterations between policy snapshots in --out/snapshots/ (0: none), for "
                                     "reward.py --best-of-n's over-optimisation chart", check="≥ 0",
                                  group="evaluation and running")
    checkpoint_every: int = setting(5, "iterations between resume points; a rerun after an interruption continues "
                                       "from the last one", check="> 0", runtime=True, group="evaluation and running")
    force: bool = setting(False, "train again even if --out holds a finished run of this configuration",
                          runtime=True, group="evaluation and running")
    device: str = setting("auto", "cpu, cuda, cuda:1, … (auto: cuda if available)", runtime=True,
                          group="evaluation and running")
    threads: int = setting(1, "CPU threads for torch (0: torch's default); a tiny model gains nothing from more",
                           check="≥ 0", runtime=True, group="evaluation and running")
    seed: int = setting(1337, "seed for prompts, sampling and minibatch order", group="evaluation and running")


# The flags left out of the stage fingerprint (data.stages.stage_fingerprint): speed, printing, bookkeeping.
RUNTIME_FLAGS = runtime_flags(Hyperparameters)


# =============================================================================
# 2. The four models (seed 3.4): π_θ, π_ref, r_φ, V
# =============================================================================

class ValueModel(nn.Module):
    """V(s_t): the critic — the reward model's backbone and scalar head, read at *every* position.

    r_φ reads its head once, at the response's last token; V reads the same head at each position
    t, giving an estimate of the return from state s_t = (x, y_<t). Starting from r_φ (InstructGPT
    initialises its value function from the reward model) means the critic begins knowing what a
    good response looks like — read at a finished response it gives r_φ(x, y) itself — rather than
    from a random head. The reward model's `reward_shift` is kept, so V starts on the rewards' scale.
    """

    def __init__(self, reward_model):
        super().__init__()
        critic = copy.deepcopy(reward_model)
        self.config = critic.config
        self.backbone = critic.backbone
        self.head = critic.head
        self.register_buffer("reward_shift", critic.reward_shift.detach().clone())
        self.requires_grad_(True)

    def forward(self, ids, position_ids=None, doc_ids=None):
        """Values (B, T) in fp32: V at every position of ids (B, T)."""
        hidden = self.backbone.hidden_states(ids, position_ids, doc_ids)
        with torch.autocast(device_type=ids.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1) - self.reward_shift


class SharedValueHead(nn.Module):
    """V(s_t) as a scalar head on the policy's own backbone (--critic shared): V = w·h_t + b, where
    h_t is the policy's final hidden state. The blog's single loss L_policy + c₁·L_value − c₂·H
    trains both through one network, so one forward per minibatch serves the log-probs and the
    values — about half the update's compute of a separate critic — at the price of the value
    loss's gradient reaching the policy's weights (c₁ keeps it small). The head starts at zero
    (V = 0): r_φ's head reads r_φ's features, not the policy's. Only the head is this module's
    parameters; the policy is held, not owned (its weights are trained and saved as the policy's).
    """

    def __init__(self, policy):
        super().__init__()
        self.config = policy.config
        self.head = nn.Linear(policy.config.n_embd, 1).to(next(policy.parameters()).device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        object.__setattr__(self, "policy", policy)  # not a submodule: no second copy in parameters()

    def values_from_hidden(self, hidden):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1)

    def forward(self, ids, position_ids=None, doc_ids=None):
        """Values (B, T) in fp32: V at every position of ids (B, T)."""
        return self.values_from_hidden(self.policy.hidden_states(ids, position_ids, doc_ids))


# ── first reading: skip to section 3 (memory accounting; loading and checking the four models) ──

def model_memory(model, trainable):
    """Bytes a model holds: its weights (and buffers); if trained, also gradients and AdamW's two
    moment estimates (m, v), one tensor each per parameter — 4× the weights in fp32."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"params": sum(p.numel() for p in model.parameters()), "weights": weights + buffers,
            "gradients": weights if trainable else 0, "optimizer": 2 * weights if trainable else 0}


def print_memory(models):
    """The memory of each of the four models (seed 3.4: PPO holds four networks at once)."""
    print("models (PPO keeps four networks in memory; GRPO has no critic, --reward-source judge no r_φ):")
    total = 0
    for name, (model, trainable) in models.items():
        if model is None:
            continue
        m = model_memory(model, trainable)
        size = m["weights"] + m["gradients"] + m["optimizer"]
        total += size
        detail = (f"{m['weights'] / 2**20:.1f} MiB weights + {m['gradients'] / 2**20:.1f} gradients + "
                  f"{m['optimizer'] / 2**20:.1f} AdamW" if trainable else f"{m['weights'] / 2**20:.1f} MiB weights")
        print(f"  {name:<22} {'trained' if trainable else 'frozen ':<8} {m['params'] / 1e6:5.2f}M params  "
              f"{detail} = {size / 2**20:.1f} MiB")
    print(f"  {'total':<22} {'':<8} {'':>13}  {total / 2**20:.1f} MiB (activations come on top)")


def same_tokenizer(ref_a, ref_b):
    """True if two tokenizer references load the same vocabulary and special tokens."""
    if ref_a == ref_b:
        return True
    a, b = load_tokenizer(ref_a), load_tokenizer(ref_b)
    return a._mergeable_ranks == b._mergeable_ranks and a._special_tokens == b._special_tokens


def flagged(load, flag, path, *rest):
    """load(path, *rest), its ConfigError prefixed with the flag that named the file."""
    try:
        return load(path, *rest)
    except ConfigError as e:
        raise ConfigError(f"{flag} {e}") from None


def load_models(args, device):
    """π_θ and π_ref from --sft, r_φ from --reward-model, V from r_φ; the tokenizer and its reference.

    Refuses a reward model whose tokenizer or vocabulary differs from the policy's: it would score
    token ids that mean something else to it. With --reward-source judge there is no reward model
    (r_φ is None) and the critic starts from the SFT model with a zero head: V = 0 until it learns.
    """
    policy, sft_checkpoint = flagged(load_sft, "--sft", args.sft, device)
    tokenizer_ref = sft_checkpoint.get("tokenizer")
    if not tokenizer_ref:
        raise ConfigError(f"--sft {args.sft}: the checkpoint names no tokenizer")
    enc = load_tokenizer(tokenizer_ref)
    chat_tokens(enc)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = None
    if args.reward_source == "rm":
        reward_model = load_compatible_reward_model(args, policy, tokenizer_ref, device)
    critic = None
    if args.algo == "ppo" and args.critic == "shared":
        critic = SharedValueHead(policy).train()
    elif args.algo == "ppo":
        if reward_model is not None:  # an ensemble's critic starts from its first member
            critic = ValueModel(getattr(reward_model, "members", [reward_model])[0]).train()
        else:  # no r_φ to start from: the SFT backbone with a zero head, V(s) = 0 everywhere at first
            critic = ValueModel(reward_model_from_gpt(policy)).train()
            nn.init.zeros_(critic.head.weight)
            nn.init.zeros_(critic.head.bias)
    return policy.train(), reference, reward_model, critic, enc, tokenizer_ref


def load_compatible_reward_model(args, policy, tokenizer_ref, device):
    """r_φ from --reward-model (several comma-separated checkpoints: an ensemble reduced by
    --ensemble-reduce), frozen, each checked to read the policy's tokens. Each is built once: a
    RewardModel's head init draws from torch's global generator, which PPO's minibatches use next."""
    members = []
    for path in reward_model_paths(args.reward_model):
        member, rm_checkpoint = flagged(load_reward_model, "--reward-model", path, device, True)
        if member.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"--reward-model {path}: vocabulary of {member.config.vocab_size} tokens, "
                              f"but the policy ({args.sft}) has {policy.config.vocab_size}")
        try:
            compatible = same_tokenizer(tokenizer_ref, rm_checkpoint.get("tokenizer") or "")
        except (DataError, ConfigError, OSError) as e:
            raise ConfigError(f"--reward-model {path}: cannot load its tokenizer ({e})") from None
        if not compatible:
            raise ConfigError(f"--reward-model {path}: tokenizer {rm_checkpoint.get('tokenizer')!r} differs "
                              f"from the policy's {tokenizer_ref!r} ({args.sft})")
        members.append(member)
    reward_model = members[0] if len(members) == 1 else RewardEnsemble(members, args.ensemble_reduce)
    return reward_model.eval().requires_grad_(False)


# =============================================================================
# 3. Rollouts: sample responses, lay out the padding, read log-probs and values
# =============================================================================
#
# Layout of a batch of B rollouts (P = longest prompt, R = longest response):
#
#     columns   0 … P−1                          P … P+R−1
#               <pad> <pad> x₀ x₁ … x_{n−1}      y₀ y₁ … y_{m−1}=<|end|> <pad> <pad>
#     real      0     0     1  1  …  1           1  1  …  1              0     0
#
# Prompts are left-padded so that every response starts at column P; responses are right-padded
# after their <|end|>. Left padding gets doc id −1 (no real token attends to it) and positions
# restart at 0 on the first real token; right padding comes after every real token, so causal
# attention already hides it. response_mask (B, R) is 1 on y₀ … y_{m−1}, <|end|> included: that
# token is an action too (the decision to stop), and it is where the reward lands.
# The logits that predict y_t sit at column P−1+t, whose causal context is exactly s_t = (x, y_<t):
# log π(y_t | s_t) and V(s_t) are both read there.

@dataclass
class Rollout:
    """A batch of responses and, once `make_experience` has run, everything PPO needs about them."""

    sequences: torch.Tensor            # (B, P+R) prompt and response token ids, padded as drawn above
    position_ids: torch.Tensor         # (B, P+R) position of each token in its own sequence
    doc_ids: torch.Tensor              # (B, P+R) −1 on left padding, 0 elsewhere
    response_mask: torch.Tensor        # (B, R) 1.0 on real response tokens (up to and including <|end|>)
    ended: torch.Tensor                # (B,) True if the response emitted <|end|> (False: truncated)
    prompt_length: int                 # P: response token t sits at column P + t
    prompts: list                      # B prompt token lists (no padding)
    responses: list                    # B response token lists (no padding)
    old_logprobs: torch.Tensor = None  # (B, R) log π_old(y_t | s_t), the policy that sampled them
    ref_logprobs: torch.Tensor = None  # (B, R) log π_ref(y_t | s_t)
    rm_scores: torch.Tensor = None     # (B,) r_φ(x, y)
    scores: torch.Tensor = None        # (B,) r_φ(x, y), minus the penalty if <|end|> never came
    kl: torch.Tensor = None            # (B,) Σ_t k1_t: per-sequence KL estimate to π_ref
    kl_k3: torch.Tensor = None         # (B,) Σ_t k3_t
    values: torch.Tensor = None        # (B, R) V(s_t) at rollout time (PPO)
    rewards: torch.Tensor = None       # (B, R) r_t, the KL-penalised per-token reward (PPO)
    advantages: torch.Tensor = None    # (B, R) A_t (whitened for PPO; group-relative for GRPO)
    returns: torch.Tensor = None       # (B, R) A_t + V(s_t), the critic's regression target (PPO)
    advantage_std: float = None        # spread of A_t before whitening (PPO), scales --kl-penalty exact

    @property
    def batch_size(self):
        return self.sequences.shape[0]

    def select(self, rows):
        """The rollouts at `rows` (a 1-D index tensor): a minibatch, cut to its own padding.

        The batch was padded for its longest prompt and longest response; a minibatch drops the
        columns that are padding in all of its rows — leading prompt columns (the response still
        starts at column P, P smaller) and trailing response columns. On these short answers that
        is most of the width, and the update's forward and backward cost scales with it.
        """
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows.to(value.device)]
            elif isinstance(value, list):
                value = [value[i] for i in rows.tolist()]
            picked[f.name] = value
        P = self.prompt_length
        left = P - max(len(prompt) for prompt in picked["prompts"])
        width = max(int(picked["response_mask"].sum(dim=1).max().item()), 1)
        for name, value in picked.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                columns = slice(left, P + width) if value.shape[1] == self.sequences.shape[1] else slice(0, width)
                picked[name] = value[:, columns]
        picked["prompt_length"] = P - left
        return Rollout(**picked)


def response_mask_and_ended(responses, end_token):
    """(mask (B, R) float, ended (B,) bool) for generated tokens (B, R).

    A token is real if no <|end|> came before it: mask_t = 1 − [Σ_{s<t} end_s > 0]. The mask does
    not look for the pad token, so a policy that samples <|pad|> mid-answer is handled like any
    other token — and <|pad|> stays distinct from <|end|>, or padding would read as stopping.
    """
    is_end = (responses == end_token).long()
    ended_before = (is_end.cumsum(dim=1) - is_end) > 0
    return (~ended_before).float(), is_end.any(dim=1)


@torch.no_grad()
def sample_rollouts(policy, prompts, special, max_new_tokens, temperature, generator=None,
                    autocast=contextlib.nullcontext(), keep_logprobs=False):
    """Seed 3.4, step 2 (the rollout): y ∼ π_θ(·|x) for each prompt (token lists), as a Rollout.

    train_gpt's KV-cached `generate` samples all rows in step; a row that emits <|end|> is
    finished and later slots hold <|pad|>. A row that never emits it stops at max_new_tokens
    (truncated: `ended` is False, and the reward is read at its last generated token).
    With keep_logprobs the sampler's own log π_θ(y_t|s_t) become the rollout's log π_old: they are
    the numbers a second, full forward would compute (tests/test_ppo.py checks it to float error),
    and generation has them for free.
    """
    device = next(policy.parameters()).device
    ids, prompt_mask = left_pad(prompts, special.pad)
    ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    was_training = policy.training
    policy.eval()
    with autocast:
        generated = policy.generate(ids, max_new_tokens, temperature, eos_token=special.end, pad_token=special.pad,
                                    prompt_mask=prompt_mask, generator=generator, return_logprobs=keep_logprobs)
    policy.train(was_training)
    sequences, logprobs = generated if keep_logprobs else (generated, None)
    prompt_length = ids.shape[1]
    responses = sequences[:, prompt_length:]
    response_mask, ended = response_mask_and_ended(responses, special.end)
    real = torch.cat([prompt_mask, torch.ones_like(responses, dtype=torch.bool)], dim=1)
    position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    doc_ids = torch.where(real, 0, -1)
    lengths = response_mask.sum(dim=1).long().tolist()
    return Rollout(sequences, position_ids, doc_ids, response_mask, ended, prompt_length, [list(p) for p in prompts],
                   [row[:n] for row, n in zip(responses.tolist(), lengths)], old_logprobs=logprobs)


def response_hidden_states(gpt, rollout):
    """The final hidden states (B, R, d) at columns P−1 … P+R−2, where state s_t = (x, y_<t) ends."""
    P = rollout.prompt_length
    hidden = gpt.hidden_states(rollout.sequences[:, :-1], rollout.position_ids[:, :-1], rollout.doc_ids[:, :-1])
    return hidden[:, P - 1:]


def response_logprobs(model, rollout, temperature=1.0, with_entropy=False):
    """log π(y_t | s_t) for every response token (B, R), fp32, 0 on padding; and, if asked, the
    entropy H_t = −Σ_v π(v|s_t) log π(v|s_t) of each step's distribution (B, R).

    The LM head runs only on the R response columns (the prompt's logits are never needed). With
    temperature T the logits are divided by T: the log-probs are those of the distribution the
    tokens were sampled from.
    """
    return logprobs_from_hidden(model, response_hidden_states(model, rollout), rollout, temperature, with_entropy)


def logprobs_from_hidden(model, hidden, rollout, temperature=1.0, with_entropy=False):
    """response_logprobs from the response columns' hidden states (B, R, d) already computed."""
    logits = model.lm_head(hidden).float() / temperature
    targets = torch.where(rollout.response_mask.bool(), rollout.sequences[:, rollout.prompt_length:], IGNORE_INDEX)
    logprobs = token_logprobs(logits, targets)
    if not with_entropy:
        return logprobs, None
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return logprobs, entropy


def response_values(critic, rollout):
    """V(s_t) for every response token (B, R), fp32, 0 on padding: the critic read at the same
    columns P−1 … P+R−2 as the log-probs."""
    P = rollout.prompt_length
    values = critic(rollout.sequences[:, :-1], rollout.position_ids[:, :-1], rollout.doc_ids[:, :-1])
    return values[:, P - 1:] * rollout.response_mask


# =============================================================================
# 4. Rewards and KL (seed 3.4; blog, "LLM-specific PPO")
# =============================================================================

def masked_mean(x, mask):
    """Mean of x over the positions where mask = 1. Masked values are dropped, not multiplied by
    0 (so even a NaN or ∞ there cannot leak in)."""
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_sum(x, mask, dim=1):
    return torch.where(mask.bool(), x, 0.0).sum(dim=dim)


def kl_estimators(logprobs, ref_logprobs):
    """Per-token estimators of KL(π_θ ‖ π_ref) from tokens sampled from π_θ (Schulman, "Approximating
    KL divergence", 2020). With r = π_ref(y_t|s_t) / π_θ(y_t|s_t):

        k1 = −log r = log π_θ − log π_ref      unbiased, high variance, can be negative
        k3 = (r − 1) − log r                   unbiased, always ≥ 0 (log r ≤ r − 1), lower variance

    Both are 0 when π_θ = π_ref. Summed over a response's tokens they estimate the sequence KL.
    """
    log_r = ref_logprobs - logprobs
    return -log_r, torch.expm1(log_r) - log_r


# classroom: begin exact_kl
def exact_kl(logits, ref_logits):
    """The per-position KL that k1 estimates from one sampled token, computed over the whole
    vocabulary (seed 3.4, the KL penalty; blog, "LLM-specific PPO"):

        KL_t = KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) = Σ_v π_θ(v|s_t) · (log π_θ(v|s_t) − log π_ref(v|s_t))

    logits, ref_logits (B, R, V) → (B, R): no sampling noise at the visited states.
    """
    log_p, log_q = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
# classroom: end exact_kl


def exact_kl_penalty(policy, reference, hidden, batch, temperature=1.0):
    """--kl-penalty exact: mean_t KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over a minibatch's response tokens,
    differentiable in π_θ; `hidden` is the policy's response_hidden_states(batch).

    The sampled penalty −β·k1_t in the reward reaches the policy through the advantages, one
    sampled token per state and as noisy as they are; this term pulls every visited state's whole
    distribution back towards π_ref directly. Like GRPO's KL in the loss, it does not count how an
    action changes the states that follow it (the reward form does, in expectation).
    """
    with torch.no_grad():
        ref_logits = reference.lm_head(response_hidden_states(reference, batch)) / temperature
    return masked_mean(exact_kl(policy.lm_head(hidden) / temperature, ref_logits), batch.response_mask)


def per_token_rewards(scores, kl_tokens, mask, beta):
    """The reward PPO maximises, one per response token (B, R) (blog, "LLM-specific PPO"):

        r_t = −β · (log π_θ(y_t|s_t) − log π_ref(y_t|s_t))  +  [t = T_last] · r_φ(x, y)

    The KL penalty is paid on every token; the reward model's score arrives once, on the last
    real token — the <|end|> token, or the last generated token if the response was truncated.
    Not one past it: that position is padding, outside the mask, and a reward there would never
    reach any advantage. Padding gets 0.
    """
    rewards = torch.where(mask.bool(), -beta * kl_tokens, 0.0)
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores
    return rewards


class AdaptiveKLController:
    """β that steers the KL towards a target (Ziegler et al. 2019, "Fine-Tuning Language Models from
    Human Preferences", §2.2):

        e = clip((KL − KL_target) / KL_target, −0.2, 0.2),      β ← β · (1 + K_β · e)

    with K_β = (responses in the batch) / horizon. Too much KL raises β, too little lowers it.
    """

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_responses):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_responses / self.horizon
        return self.beta


class FixedKLController:
    """β that never changes (the default)."""

    def __init__(self, beta):
        self.beta = beta

    def update(self, kl, n_responses):
        return self.beta


# =============================================================================
# 5. Advantages (seed 3.4): GAE for PPO, the group baseline for GRPO
# =============================================================================

# classroom: begin gae
def gae(rewards, values, mask, gamma=Hyperparameters.gamma, lam=Hyperparameters.lam):
    """Generalised Advantage Estimation (Schulman et al. 2016; seed 3.4), all rows at once.

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t)                  (TD error; V after the last token = 0)
        A_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ·A_{t+1}    (computed backwards in time)
        returns_t = A_t + V(s_t)                           (the critic's target)

    rewards, values, mask: (B, T), right-padded. Padding holds no state: its value and advantage
    are 0, so the recursion restarts at each row's last real token. λ = 1 gives the Monte-Carlo
    return minus V; λ = 0 the one-step TD error.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask
# classroom: end gae


def masked_variance(x, mask):
    """Var[x] over the positions where mask = 1 (the population variance, n in the denominator)."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x, mask, eps=1e-8):
    """(x − mean) / std over the valid tokens of the whole batch; 0 on padding. Advantages on a
    fixed scale make the learning rate mean the same thing whatever the reward's scale."""
    return torch.where(mask.bool(), (x - masked_mean(x, mask)) * torch.rsqrt(masked_variance(x, mask) + eps), 0.0)


def group_centred_scores(scores, group_size):
    """R_i − mean_j R_j over the k responses j of the same prompt (adjacent in `scores`, B = prompts × k).

    Bradley–Terry sees only differences r_φ(x, y_w) − r_φ(x, y_l) between answers to one prompt, so
    r_φ(x, ·) + c(x) fits the comparisons as well as r_φ(x, ·) for any per-prompt c(x): the level of
    r_φ from one prompt to the next was never trained and is noise to PPO, which the critic must
    then learn to predict. Centring within each prompt's group removes it (GRPO's baseline, kept
    here under PPO's critic and GAE). It equals (k − 1)/k times RLOO's leave-one-out difference
    R_i − mean_{j≠i} R_j, a scale the whitened advantages divide out.
    """
    groups = scores.view(-1, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1)


def grpo_advantages(scores, group_size, eps=1e-6):
    """GRPO's advantage (Shao et al. 2024, DeepSeekMath): each response against its own group.

        A_i = (R_i − mean_j R_j) / (std_j R_j + ε)        over the k responses j of the same prompt

    scores (B,) with the k responses of a prompt adjacent (B = prompts × k); std is the sample
    standard deviation (k − 1 in the denominator). The group mean replaces the critic's V as the
    baseline; a group whose responses all score the same has A = 0 (nothing to learn from it).
    Every token of response i gets A_i.
    """
    spread = scores.view(-1, group_size).std(dim=1, keepdim=True) + eps
    return (group_centred_scores(scores, group_size).view(-1, group_size) / spread).view(-1)


def explained_variance(values, returns, mask):
    """1 − Var[returns − V] / Var[returns] over valid tokens: 1 is a perfect critic, 0 no better
    than a constant, negative worse than one."""
    var_returns = masked_variance(returns, mask)
    var_residual = masked_variance(returns - values, mask)
    return (1 - var_residual / var_returns).item() if var_returns > 0 else float("nan")


# =============================================================================
# 6. Losses (seed 3.4; blog, "Proximal Policy Optimization")
# =============================================================================

# classroom: begin ppo_policy_loss
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=Hyperparameters.clip_eps):
    """The clipped surrogate objective, as a loss to minimise (seed 3.4):

        ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
        L_policy = −L_PPO = −mean_t [ min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t) ]

    The seed's L_PPO is an objective to maximise; the optimiser minimises, so we return its negative.

    The min is pessimistic: once ρ has moved ε in the direction A favours, the clipped term is
    smaller, has no gradient, and the token stops pulling. The mean runs over the valid tokens of
    the minibatch. Also returns the diagnostics: mean ρ, the share of tokens with |ρ − 1| > ε (clip
    fraction), and approx_kl = mean (ρ − 1) − log ρ, the k3 estimate of KL(π_old ‖ π_θ).
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = log_ratio.exp()
    objective = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -masked_mean(objective, mask)
    with torch.no_grad():
        stats = {"ratio_mean": masked_mean(ratio, mask).item(),
                 "clip_fraction": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()}
    return loss, stats
# classroom: end ppo_policy_loss


# classroom: begin value_loss
def value_loss(values, old_values, returns, mask, clip=Hyperparameters.value_clip):
    """The critic's regression loss (blog: L_value = E[(V(s_t) − V̂_t)²]), clipped like the policy:

        V_clip = V_old + clip(V − V_old, −c, c)
        L_value = ½ · mean_t max((V − returns)², (V_clip − returns)²)

    The max is pessimistic too: a value may not jump more than c from what it was at rollout
    time in one iteration. Returns the loss and the share of tokens where the clipped term wins.
    """
    mask = mask.bool()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    squared_errors = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * masked_mean(squared_errors, mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask).item()
    return loss, {"value_clip_fraction": clip_fraction}
# classroom: end value_loss


# =============================================================================
# 7. The update: experience, then epochs of minibatches
# =============================================================================

def length_grouped_minibatches(rollout, minibatch_size, generator=None):
    """The rollout's row indices cut into minibatches of rows of similar length, in random order.

    A minibatch costs as much as its longest row (Rollout.select cuts it to that width); random
    rows would make nearly every minibatch as wide as the longest prompt plus the longest answer
    of the whole batch — half of its tokens padding on our tasks. Shuffle (random ties), sort by
    prompt + response length, cut, shuffle the minibatches. Each epoch still sees every row once.
    """
    order = torch.randperm(rollout.batch_size, generator=generator).tolist()
    lengths = [len(p) + len(r) for p, r in zip(rollout.prompts, rollout.responses)]
    order.sort(key=lambda i: lengths[i])
    batches = [torch.tensor(order[start:start + minibatch_size]) for start in range(0, len(order), minibatch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def per_token_in_chunks(fn, rollout, chunks, outputs=1):
    """fn(minibatch) → (b, r) per-token values (or a tuple of `outputs` of them), run chunk by chunk
    and laid back out as (B, R) each."""
    outs = [torch.zeros_like(rollout.response_mask) for _ in range(outputs)]
    for rows in chunks:
        results = fn(rollout.select(rows))
        for out, values in zip(outs, results if outputs > 1 else (results,)):
            out[rows.to(out.device), :values.shape[1]] = values.float()
    return outs[0] if outputs == 1 else tuple(outs)


def logprobs_and_values(policy, critic, rollout, temperature):
    """--critic shared: log π(y_t|s_t) and V(s_t) from one forward of the policy's backbone."""
    hidden = response_hidden_states(policy, rollout)
    return logprobs_from_hidden(policy, hidden, rollout, temperature)[0], critic.values_from_hidden(hidden)


@torch.no_grad()
def make_experience(rollout, policy, reference, critic, score_fn, beta, args, autocast=contextlib.nullcontext()):
    """Seed 3.4, steps 3–4 (score, advantages): fill `rollout` with what the update needs (in place).

    log π_old (unless the sampler kept it) and log π_ref on every response token; the reward
    model's score (minus the penalty if the response never ended); the KL estimates; then for PPO
    the values, the KL-penalised per-token rewards, GAE advantages (whitened) and returns, for GRPO
    the group advantages.
    `score_fn(prompts, responses) → (B,)` is r_φ (or, in tests, any reward function).
    """
    was_training = policy.training
    policy.eval()
    mask = rollout.response_mask
    chunks = length_grouped_minibatches(rollout, args.minibatch_size)
    shared = isinstance(critic, SharedValueHead)
    with autocast:
        if shared:  # one forward of the shared network gives log π_old and V(s_t)
            rollout.old_logprobs, shared_values = per_token_in_chunks(
                lambda b: logprobs_and_values(policy, critic, b, args.temperature), rollout, chunks, outputs=2)
        elif rollout.old_logprobs is None:  # not kept from sampling (--recompute-logprobs)
            rollout.old_logprobs = per_token_in_chunks(lambda b: response_logprobs(policy, b, args.temperature)[0],
                                                       rollout, chunks)
        rollout.ref_logprobs = per_token_in_chunks(lambda b: response_logprobs(reference, b, args.temperature)[0],
                                                   rollout, chunks)
    policy.train(was_training)
    rollout.rm_scores = torch.as_tensor(score_fn(rollout.prompts, rollout.responses)).float().to(mask.device)
    rollout.scores = rollout.rm_scores - args.missing_end_penalty * (~rollout.ended).float()
    k1, k3 = kl_estimators(rollout.old_logprobs, rollout.ref_logprobs)
    rollout.kl, rollout.kl_k3 = masked_sum(k1, mask), masked_sum(k3, mask)
    if args.algo == "ppo":
        was_training = critic.training
        critic.eval()
        if shared:
            rollout.values = shared_values * mask
        else:
            with autocast:
                rollout.values = per_token_in_chunks(lambda b: response_values(critic, b), rollout, chunks)
        critic.train(was_training)
        scores = (group_centred_scores(rollout.scores, args.group_size) if args.reward_baseline == "group"
                  else rollout.scores)
        in_reward = beta if args.kl_penalty == "sampled" else 0.0  # exact: the loss carries the penalty
        rollout.rewards = per_token_rewards(scores, k1, mask, in_reward)
        advantages, rollout.returns = gae(rollout.rewards, rollout.values, mask, args.gamma, args.lam)
        rollout.advantages = whiten(advantages, mask)
        # whitening divided the advantages by their spread; the loss's KL term is divided by it too,
        # so that β weighs it against r_φ as it would inside the reward
        rollout.advantage_std = float(masked_variance(advantages, mask).sqrt())
    else:
        rollout.advantages = grpo_advantages(rollout.scores, args.group_size)[:, None] * mask
    return rollout


def ppo_update(policy, critic, optimizer, rollout, beta, args, autocast=contextlib.nullcontext(), reference=None):
    """Seed 3.4, step 5 (the update): `args.ppo_epochs` passes over the rollouts in minibatches (seed 3.4) — rows of similar
    length together, the minibatches in random order.

    PPO:   loss = L_policy + L_value − c₂·H                 (β·k1 in the per-token rewards)
           loss = L_policy + (β/σ_A)·mean_t KL_t + L_value − c₂·H       (--kl-penalty exact)
    GRPO:  loss = L_policy + β · mean_t k3_t − c₂·H       (KL to π_ref in the loss, not the reward;
                                                           KL_t in place of k3_t with --kl-penalty exact)

    KL_t = KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over the vocabulary (exact_kl_penalty); σ_A is the spread
    the advantages had before whitening, so that β weighs the penalty against r_φ as in the reward.

    The blog writes PPO's loss as L_policy + c₁·L_value − c₂·H. With a separate critic (the default)
    the two networks share no weight, each is clipped separately and has its own AdamW learning
    rate; Adam divides out any constant factor on a gradient, so c₁ would change nothing and the
    critic's learning rate takes its place. With --critic shared the value head sits on the policy's
    backbone: one forward gives both, and c₁ (--value-coef) weighs the value loss's pull on the
    shared weights. Returns the diagnostics averaged over all minibatches.
    """
    policy.train()
    if critic is not None:
        critic.train()
    shared = isinstance(critic, SharedValueHead)
    totals = defaultdict(list)
    for _ in range(args.ppo_epochs):
        for rows in length_grouped_minibatches(rollout, args.minibatch_size):
            batch = rollout.select(rows)
            mask = batch.response_mask
            with autocast:
                hidden = response_hidden_states(policy, batch)
                logprobs, entropy = logprobs_from_hidden(policy, hidden, batch, args.temperature, with_entropy=True)
            loss, stats = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, args.clip_eps)
            stats["policy_loss"] = loss.item()
            entropy = masked_mean(entropy, mask)
            if args.entropy_coef:  # at 0 the entropy is only reported: no backward through it
                loss = loss - args.entropy_coef * entropy
            stats["entropy"] = entropy.item()
            if args.kl_penalty == "exact" or args.algo == "grpo":  # the KL to π_ref in the loss
                if args.kl_penalty == "exact":
                    with autocast:
                        kl_loss = exact_kl_penalty(policy, reference, hidden, batch, args.temperature)
                else:
                    kl_loss = masked_mean(kl_estimators(logprobs, batch.ref_logprobs)[1], mask)  # k3
                # GRPO's advantages are divided by each group's spread already; PPO's were whitened, so
                # the penalty is divided by their spread too, to stay in r_φ's units
                weight = beta if args.algo == "grpo" else beta / max(rollout.advantage_std, 1e-8)
                loss = loss + weight * kl_loss
                stats["kl_loss"] = kl_loss.item()
            if args.algo == "ppo":
                if shared:  # the same forward's hidden states: V = w·h_t + b
                    values = critic.values_from_hidden(hidden) * mask
                else:
                    with autocast:
                        values = response_values(critic, batch)
                critic_loss, value_stats = value_loss(values, batch.values, batch.returns, mask, args.value_clip)
                loss = loss + (args.value_coef if shared else 1.0) * critic_loss
                stats.update(value_loss=critic_loss.item(), **value_stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip).item()
            if critic is not None:
                stats["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip).item()
            optimizer.step()
            for key, value in stats.items():
                totals[key].append(value)
    return {key: sum(values) / len(values) for key, values in totals.items()}


def make_optimizer(policy, critic, args):
    """AdamW over the policy (lr) and, for PPO, the critic (value lr); no weight decay."""
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.lr}]
    if critic is not None:
        groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": args.value_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)


def annealed_lr(base_lr, iteration, iterations):
    """lr_i = base · (1 − (i − 1)/N) for iteration i of N: the full rate first, 1/N of it last
    (CleanRL's default). Measured on the judge reward it gained nothing over a constant rate of the
    same mean (README, "Annealing PPO's learning rate"), so it is off by default."""
    return base_lr * (1 - (iteration - 1) / iterations)


def set_learning_rates(optimizer, args, iteration):
    """The policy's and the critic's rate for this iteration (fixed, or annealed with --anneal-lr)."""
    for group, base in zip(optimizer.param_groups, (args.lr, args.value_lr)):
        group["lr"] = annealed_lr(base, iteration, args.iterations) if args.anneal_lr else base


def train_iteration(policy, reference, critic, optimizer, prompts, score_fn, special, beta, args,
                    generator=None, autocast=contextlib.nullcontext()):
    """One PPO/GRPO iteration on `prompts`: rollout, experience, update. Returns (rollout, stats),
    stats with the seconds spent generating, scoring (the no-grad forwards of step 3) and optimising."""
    t0 = time.time()
    keep = not args.recompute_logprobs and args.critic != "shared"
    rollout = sample_rollouts(policy, prompts, special, args.max_new_tokens, args.temperature, generator, autocast,
                              keep_logprobs=keep)
    t1 = time.time()
    make_experience(rollout, policy, reference, critic, score_fn, beta, args, autocast)
    t2 = time.time()
    stats = ppo_update(policy, critic, optimizer, rollout, beta, args, autocast, reference)
    t3 = time.time()
    stats.update(time_generation=t1 - t0, time_scoring=t2 - t1, time_optimisation=t3 - t2)
    return rollout, stats


# =============================================================================
# 8. Training: the loop, metrics, checkpoint, held-out evaluation
# =============================================================================

def run_iterations(policy, reference, critic, reward, tasks, prompts, enc, args, metrics_path, device,
                   autocast=contextlib.nullcontext(), resume=None, save_point=None, snapshot=None):
    """The training loop: --iterations × (rollout, experience, update), one metrics.jsonl line and
    (every --log-every) one progress line each; β updated by the KL controller. Returns (records, β).

    Every --checkpoint-every iterations `save_point(iteration, state)` stores the policy, the critic,
    AdamW's moments, β and the random states (the global one shuffles the minibatches, `generator`
    samples the rollouts). Given such a `resume` point the loop continues after its iteration:
    iteration i always uses the same prompts, so the run goes on as if never interrupted. Every
    --snapshot-every iterations `snapshot(iteration)` keeps the policy as it is then."""
    special = chat_tokens(enc)
    optimizer = make_optimizer(policy, critic, args)
    controller = (AdaptiveKLController(args.beta, args.kl_target, args.kl_horizon) if args.kl_target
                  else FixedKLController(args.beta))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    done = restore(resume, policy, critic, optimizer, controller, generator, metrics_path)
    records = read_metrics(metrics_path) if done else []
    with open(metrics_path, "a" if done else "w") as metrics:
        for iteration in range(done + 1, args.iterations + 1):
            batch = slice((iteration - 1) * args.rollouts, iteration * args.rollouts)
            beta = controller.beta
            set_learning_rates(optimizer, args, iteration)

            def score_fn(prompt_ids, response_ids):
                return reward(prompt_ids, response_ids, tasks[batch])

            rollout, stats = train_iteration(policy, reference, critic, optimizer, prompts[batch], score_fn, special,
                                             beta, args, generator, autocast)
            gold = [judge(task, decode_response(enc, r)) for task, r in zip(tasks[batch], rollout.responses)]
            record = iteration_record(iteration, rollout, stats, gold, beta, optimizer.param_groups[0]["lr"])
            records.append(record)
            log_line(metrics, record)
            if iteration % args.log_every == 0 or iteration in (1, args.iterations):
                print(format_record(record, args.iterations))
            controller.update(record["kl"], rollout.batch_size)
            if snapshot is not None and args.snapshot_every and iteration % args.snapshot_every == 0:
                snapshot(iteration)
            if save_point is not None and iteration % args.checkpoint_every == 0 and iteration < args.iterations:
                save_point(iteration, resume_state(policy, critic, optimizer, controller, generator))
    return records, controller.beta


# ── first reading: skip to section 9 (prompts, the reward function, held-out evaluation, records,
#    resume points, snapshots, the stage around the loop) ──

def training_prompts(args, enc):
    """(tasks, prompts) for every iteration: train-split tasks rendered with the chat template.
    GRPO repeats each prompt k times, adjacently (a group)."""
    copies = args.group_size if args.algo == "grpo" or args.reward_baseline == "group" else 1
    per_iteration = args.rollouts // copies
    try:
        tasks = generate_tasks(args.iterations * per_iteration, "train", seed=args.seed, families=args.families,
                               levels=args.levels)
    except ValueError as e:
        raise ConfigError(f"--families/--levels: {e}") from None
    tasks = [task for task in tasks for _ in range(copies)]
    return tasks, [render_prompt(task_messages(task), enc) for task in tasks]


def check_context(prompts, args, models):
    """Every prompt + --max-new-tokens must fit in the context of each model that reads it."""
    longest = max(map(len, prompts))
    for flag, model in models.items():
        if model is not None and longest + args.max_new_tokens > model.config.block_size:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: prompts of up to {longest} tokens + "
                              f"{args.max_new_tokens} exceed the context of {flag} (block_size={model.config.block_size})")


def make_reward_function(reward_model, enc, args, autocast=contextlib.nullcontext()):
    """reward(prompts, responses, tasks) → (B,): r_φ(x, y) from the reward model (RLHF) or, with
    --reward-source judge, the gold judge itself — a verifiable reward, nothing to hack."""
    pad = chat_tokens(enc).pad

    def reward(prompts, responses, tasks):
        if reward_model is None:
            return torch.tensor([judge(task, decode_response(enc, r)) for task, r in zip(tasks, responses)])
        with autocast:
            return score(reward_model, prompts, responses, args.eval_batch_size, pad)
    return reward


@torch.no_grad()
def sampled_evaluation(policy, reference, enc, tasks, args, device, autocast=contextlib.nullcontext()):
    """Held-out tasks answered by sampling at temperature 1, like the rollouts: the mean gold score
    and the mean KL(π_θ ‖ π_ref) per response (Σ_t k1, the same estimate as the rollouts' "kl")."""
    special = chat_tokens(enc)
    prompts = [render_prompt(task_messages(task), enc) for task in tasks]
    generator = torch.Generator(device=device).manual_seed(HELDOUT_SEED)
    gold, kl = [], []
    for start in range(0, len(prompts), args.eval_batch_size):
        chunk = slice(start, start + args.eval_batch_size)
        rollout = sample_rollouts(policy, prompts[chunk], special, args.max_new_tokens, 1.0, generator, autocast)
        with autocast:
            logprobs, _ = response_logprobs(policy, rollout)
            ref_logprobs, _ = response_logprobs(reference, rollout)
        kl += masked_sum(logprobs - ref_logprobs, rollout.response_mask).tolist()
        gold += [judge(task, decode_response(enc, r)) for task, r in zip(tasks[chunk], rollout.responses)]
    return {"sampled_gold_score": sum(gold) / len(gold), "kl": sum(kl) / len(kl)}


def evaluate_heldout(name, policy, reference, enc, tasks, args, device, autocast=contextlib.nullcontext()):
    """The held-out evaluation of one model: sft.evaluate_tasks (greedy answers, judged) plus the
    gold score and KL of answers sampled at temperature 1."""
    result = evaluate_tasks(policy, enc, tasks, args.max_new_tokens, args.eval_batch_size, device, autocast)
    result.update(sampled_evaluation(policy, reference, enc, tasks, args, device, autocast))
    print(f"{name} on {result['n']} held-out tasks: greedy gold score {result['mean_score']:.3f} (exact "
          f"{result['exact_match']:.1%}, stopped with <|end|> {result['stopped']:.1%}); sampled (T=1) gold score "
          f"{result['sampled_gold_score']:.3f}, KL to π_SFT {result['kl']:.3f}")
    return result


def iteration_record(iteration, rollout, stats, gold, beta, lr):
    """One line of metrics.jsonl: what the rollouts scored and how the update went."""
    mask = rollout.response_mask
    timings = ("time_generation", "time_scoring", "time_optimisation")
    ev = explained_variance(rollout.values, rollout.returns, mask) if rollout.values is not None else math.nan
    return {
        "iteration": iteration,
        "rm_score": rollout.rm_scores.mean().item(),                      # r_φ(x, y) (--reward-source judge: the judge's)
        "score": rollout.scores.mean().item(),                            # … minus the missing-end penalty
        "gold_score": sum(gold) / len(gold),                              # data.tasks.judge, in [0, 1]
        "kl": rollout.kl.mean().item(),                                   # Σ_t k1_t, mean over responses (nats)
        "kl_k3": rollout.kl_k3.mean().item(),                             # Σ_t k3_t
        "objective": (rollout.scores - beta * rollout.kl).mean().item(),  # J(θ) = r − β·KL, estimated
        "response_length": (mask.sum(dim=1) - rollout.ended.float()).mean().item(),  # tokens, <|end|> not counted
        "ended": rollout.ended.float().mean().item(),                     # share that emitted <|end|>
        "beta": beta,
        "lr": lr,                                                         # the policy's (--anneal-lr decays it)
        "explained_variance": None if math.isnan(ev) else ev,
        **{k: v for k, v in stats.items() if k not in timings},
        "rollout_tokens_per_sec": mask.sum().item() / max(stats["time_generation"], 1e-9),
        **{k: stats[k] for k in timings},
        "time_iteration": sum(stats[k] for k in timings),
    }


def format_record(r, iterations):
    ev = "n/a" if r["explained_variance"] is None else f"{r['explained_variance']:+.2f}"
    seconds = r["time_iteration"]
    share = {k: 100 * r[f"time_{k}"] / seconds for k in ("generation", "scoring", "optimisation")}
    return (f"it {r['iteration']}/{iterations}: rm {r['rm_score']:+.3f} gold {r['gold_score']:.3f} "
            f"KL {r['kl']:.3f} (k3 {r['kl_k3']:.3f}) len {r['response_length']:.1f} ended {r['ended']:.0%} | "
            f"ratio {r['ratio_mean']:.3f} clip {r['clip_fraction']:.1%} approx_kl {r['approx_kl']:.4f} "
            f"EV {ev} H {r['entropy']:.2f} β {r['beta']:.3g} | {r['rollout_tokens_per_sec']:,.0f} tok/s, "
            f"gen {share['generation']:.0f}% score {share['scoring']:.0f}% opt {share['optimisation']:.0f}% "
            f"of {seconds:.1f}s")


def resume_state(policy, critic, optimizer, controller, generator):
    """What a resume point holds: the two networks, AdamW's moments, β and the random states."""
    return {"policy": policy.state_dict(), "critic": critic.state_dict() if critic is not None else None,
            "optimizer": optimizer.state_dict(), "beta": controller.beta, "random": random_state(generator)}


def restore(resume, policy, critic, optimizer, controller, generator, metrics_path):
    """Load a resume point (resume_state's dict) into the run's objects; the metrics logged after it
    are dropped, to be logged again. Returns the iterations already done (0 without one)."""
    if resume is None:
        return 0
    policy.load_state_dict(resume["policy"])
    if critic is not None:
        critic.load_state_dict(resume["critic"])
    optimizer.load_state_dict(resume["optimizer"])
    controller.beta = resume["beta"]
    set_random_state(resume["random"], generator)
    truncate_metrics(metrics_path, resume["step"], key="iteration")
    return resume["step"]


def save_snapshot(policy, iteration, tokenizer_ref, args):
    """The policy after `iteration`, as a loadable checkpoint in --out/snapshots/ (reward.py
    --best-of-n --ppo-run traces PPO's gold and r_φ against KL with them). Iteration 0 is π_SFT."""
    folder = os.path.join(args.out, "snapshots")
    os.makedirs(folder, exist_ok=True)
    atomic_save(ppo_checkpoint(policy, iteration, tokenizer_ref, args, {}),
                os.path.join(folder, f"iteration_{iteration:04d}.pt"))


def ppo_checkpoint(policy, iteration, tokenizer_ref, args, extra):
    """train_gpt's layout ("model", "config", "step", "tokenizer") plus the PPO entries:
    train_gpt.model_from_checkpoint and sft.load_chat_model load it like any GPT checkpoint."""
    return {"model": {k: v.detach().cpu() for k, v in policy.state_dict().items()}, "config": asdict(policy.config),
            "step": iteration, "tokenizer": tokenizer_ref, "stage": "ppo",
            "ppo": {"sft": args.sft, "reward_model": args.reward_model, "algo": args.algo, **extra},
            "args": {k: v for k, v in vars(args).items()}}


def average(records, keys=("rm_score", "gold_score", "kl", "kl_k3", "response_length", "ended")):
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


def print_time_shares(totals, tokens_per_sec):
    seconds = sum(totals.values())
    shares = [f"{k.removeprefix('time_')} {v:.0f}s ({100 * v / seconds:.0f}%)" for k, v in totals.items()]
    print(f"time: {', '.join(shares)}; {tokens_per_sec:,.0f} rollout tokens/s")


def setup(args):
    """The device, bf16 autocast on CUDA, CPU threads, the global seed (minibatch order)."""
    device = pick_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    autocast = autocast_for(device)
    return device, autocast


def train(args, sft_evaluation=None):
    """Load the models, run the iterations, evaluate SFT vs the trained policy on held-out tasks,
    save model.pt, metrics.jsonl, eval.json and ppo.png. Returns the summary written to eval.json;
    `sft_evaluation` (a previous run's "sft" entry) skips re-judging the same SFT model in a sweep.
    A stage (data.stages.begin_stage): skipped when --out holds a finished run of this configuration
    and these inputs, resumed from its last resume point when it holds an interrupted one."""
    validate_args(args)
    started = time.time()
    inputs = [args.sft, *(reward_model_paths(args.reward_model) if args.reward_source == "rm" else [None])]
    fingerprint = stage_fingerprint(args, RUNTIME_FLAGS, inputs)
    if finished_stage(args.out, "ppo", fingerprint, args.force):
        with open(os.path.join(args.out, "eval.json")) as f:
            return json.load(f)
    device, autocast = setup(args)
    os.makedirs(args.out, exist_ok=True)
    policy, reference, reward_model, critic, enc, tokenizer_ref = load_models(args, device)
    print_memory({"policy π_θ": (policy, True), "reference π_ref": (reference, False),
                  "reward model r_φ": (reward_model, False), "value model V": (critic, True)})
    tasks, prompts = training_prompts(args, enc)
    check_context(prompts, args, {f"--sft {args.sft}": policy, f"--reward-model {args.reward_model}": reward_model})
    heldout = heldout_tasks(args)
    # The inputs loaded: the stage begins (a fresh start, or the continuation of an interrupted one).
    resume, evaluation = begin_ppo_stage(args, fingerprint, reference, enc, heldout, sft_evaluation, device, autocast)
    print_plan(args, reward_model)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    reward = make_reward_function(reward_model, enc, args, autocast)

    def save_point(iteration, state):
        save_resume_point(args.out, fingerprint, iteration, {**state, "evaluation": evaluation})

    records, final_beta = run_iterations(policy, reference, critic, reward, tasks, prompts, enc, args, metrics_path,
                                         device, autocast, resume, save_point,
                                         lambda iteration: save_snapshot(policy, iteration, tokenizer_ref, args))
    if heldout:
        evaluation["ppo"] = evaluate_heldout(f"{args.algo.upper()} policy", policy, reference, enc, heldout, args,
                                             device, autocast)
    return write_outputs(args, policy, tokenizer_ref, records, final_beta, evaluation, len(heldout), fingerprint,
                         started, device)


def begin_ppo_stage(args, fingerprint, reference, enc, heldout, sft_evaluation, device, autocast):
    """Begin the stage: (the resume point or None, the evaluations so far). A fresh start judges the
    SFT model on the held-out tasks first; a resumed one finds that evaluation in its resume point."""
    decision = begin_stage(args.out, "ppo", fingerprint, args.force)
    resume = load_resume_point(args.out, fingerprint) if decision == "resume" else None
    evaluation = {}
    if resume is not None:
        evaluation = resume["evaluation"]
        print(f"resuming {args.out} after iteration {resume['step']}")
    elif heldout:
        evaluation["sft"] = sft_evaluation or evaluate_heldout("SFT model", reference, reference, enc, heldout, args,
                                                               device, autocast)
    return resume, evaluation


def print_plan(args, reward_model):
    print(f"{args.algo.upper()}: {args.iterations} iterations × {args.rollouts} responses"
          + (f" ({args.rollouts // args.group_size} prompts × k={args.group_size})"
             if args.algo == "grpo" or args.reward_baseline == "group" else "")
          + f", {args.ppo_epochs} epochs of minibatches of {args.minibatch_size}, lr {args.lr:g}, β {args.beta:g}"
          + (f" (adaptive, target KL {args.kl_target:g})" if args.kl_target else "")
          + f", reward: {'the gold judge' if reward_model is None else 'r_φ ' + args.reward_model}")


def write_outputs(args, policy, tokenizer_ref, records, final_beta, evaluation, heldout_tasks, fingerprint, started,
                  device):
    """model.pt, eval.json (the summary, returned), ppo.png; the stage marked finished."""
    window = max(1, min(5, args.iterations // 4))
    first, last = average(records[:1]), average(records[-window:])
    model_path = os.path.join(args.out, "model.pt")
    atomic_save(ppo_checkpoint(policy, args.iterations, tokenizer_ref, args, {"final_beta": final_beta, **last}),
                model_path)
    totals = {k: sum(r[k] for r in records) for k in ("time_generation", "time_scoring", "time_optimisation")}
    generated_tokens = sum(r["rollout_tokens_per_sec"] * r["time_generation"] for r in records)
    tokens_per_sec = generated_tokens / totals["time_generation"]
    summary = {"first_iteration": first, f"last_{window}_iterations": last, **evaluation, "algo": args.algo,
               "reward_source": args.reward_source, "reward_model": args.reward_model, "beta": args.beta,
               "final_beta": final_beta, "iterations": args.iterations, "rollouts_per_iteration": args.rollouts,
               "heldout_tasks": heldout_tasks, "rollout_tokens_per_sec": tokens_per_sec,
               **{k: round(v, 1) for k, v in totals.items()}, "wall_seconds": round(time.time() - started, 1),
               "device": str(device)}
    write_json(os.path.join(args.out, "eval.json"), summary)
    plot_training(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "ppo.png"))
    finish_stage(args.out, "ppo", fingerprint, started,
                 {"heldout": {name: {k: result.get(k) for k in ("mean_score", "sampled_gold_score", "kl")}
                              for name, result in evaluation.items()},
                  "last_rollouts": {k: last[k] for k in ("rm_score", "gold_score", "kl")}, "final_beta": final_beta})
    print(f"rollouts, first iteration → mean of the last {window}: rm score {first['rm_score']:+.3f} → "
          f"{last['rm_score']:+.3f}, gold {first['gold_score']:.3f} → {last['gold_score']:.3f}, KL {first['kl']:.3f} → "
          f"{last['kl']:.3f}, length {first['response_length']:.1f} → {last['response_length']:.1f}")
    print_time_shares(totals, tokens_per_sec)
    print(f"saved {model_path}, metrics.jsonl, ppo.png, eval.json in {summary['wall_seconds']:.0f}s")
    return summary


# =============================================================================
# 9. Reward hacking (seed 3.5): a β sweep against a length-biased reward model
# =============================================================================
#
# A labeler who finds longer answers more convincing (reward.py --length-bias B: labeler score =
# gold + B·|y|) teaches r_φ to pay for length. The gold judge does the opposite: text after the
# answer costs a factor e^(−chars/20). PPO with β = 0 is free to find that loophole — the reward
# model's score climbs while the gold score falls (Gao et al. 2023, "Scaling Laws for Reward
# Model Overoptimization": gold reward first rises, then falls, as √KL grows). The KL penalty
# keeps the policy near π_SFT, where r_φ is still a fair judge.

def train_length_biased_reward_model(args):
    """Train r_φ with reward.py on comparisons from a labeler with length bias --length-bias."""
    out = os.path.join(args.out, "reward_length_bias")
    rm_args = reward.build_parser().parse_args(
        ["--sft", args.sft, "--out", out, "--length-bias", str(args.length_bias), "--num-prompts", str(args.rm_prompts),
         "--eval-prompts", "100", "--device", args.device, "--seed", str(args.seed),
         *(["--families", ",".join(args.families)] if args.families else []),
         *(["--levels", ",".join(map(str, args.levels))] if args.levels else [])])
    print(f"training a length-biased reward model (B = {args.length_bias} per token) → {out}")
    reward.train_reward(rm_args)
    return os.path.join(out, "model.pt")


def beta_sweep(args):
    """PPO once per β in --beta-sweep, same SFT model, same reward model, same prompts; then
    reward_hacking.png (r_φ and gold score per iteration, gold against √KL) and sweep.json."""
    validate_args(args)
    setup(args)  # CPU threads before reward.py runs too
    os.makedirs(args.out, exist_ok=True)
    if args.reward_model is None:
        args.reward_model = train_length_biased_reward_model(args)
    runs, sft_evaluation, summaries = {}, None, {}
    for beta in args.beta_sweep:
        run_args = argparse.Namespace(**{**vars(args), "beta": beta, "beta_sweep": None,
                                         "out": os.path.join(args.out, f"beta_{beta:g}")})
        print(f"\n=== β = {beta:g} → {run_args.out} ===")
        summary = train(run_args, sft_evaluation)
        sft_evaluation = summary.get("sft")
        runs[beta] = read_metrics(os.path.join(run_args.out, "metrics.jsonl"))
        summaries[f"{beta:g}"] = {k: v for k, v in summary.items() if k not in ("sft",)}
    plot_reward_hacking(runs, os.path.join(args.out, "reward_hacking.png"))
    result = {"reward_model": args.reward_model, "length_bias": args.length_bias, "sft": sft_evaluation,
              "runs": {b: {k: s[k] for k in s if k in ("first_iteration", "ppo") or k.startswith("last_")}
                       for b, s in summaries.items()}}
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(result, f, indent=2, default=lambda o: None)
    print("\nβ      rm score (first → last)   gold (first → last)   KL (last)   length (last)   held-out gold")
    for beta in runs:
        s = summaries[f"{beta:g}"]
        last = next(v for k, v in s.items() if k.startswith("last_"))
        first = s["first_iteration"]
        heldout = f"{s['ppo']['mean_score']:.3f}" if s.get("ppo") else "n/a"
        print(f"{beta:<6g} {first['rm_score']:+.3f} → {last['rm_score']:+.3f}          "
              f"{first['gold_score']:.3f} → {last['gold_score']:.3f}         {last['kl']:7.2f}     "
              f"{last['response_length']:6.1f}          {heldout}")
    print(f"saved {os.path.join(args.out, 'reward_hacking.png')} and sweep.json")
    return result


# =============================================================================
# 10. Plots
# =============================================================================
# ── first reading: skip to the end (plots, the command line) ──

def smooth(values, window=5):
    """Trailing moving average (rollout statistics are noisy from one iteration to the next)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def plot_training(metrics_path, png_path):
    """Six panels against iterations: r_φ score, gold score, KL (k1, k3), response length, the
    policy-update diagnostics (ratio, clip fraction, approx KL) and the critic's explained
    variance with the policy's entropy. Thin lines per iteration, thick lines smoothed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "iteration" in r]
    x = [r["iteration"] for r in records]

    def curve(ax, key, label=None, color=None):
        values = [r.get(key) for r in records]
        if all(v is None for v in values):
            return
        line, = ax.plot(x, [math.nan if v is None else v for v in values], lw=0.7, alpha=0.4, color=color)
        ax.plot(x, [math.nan if v is None else v for v in smooth(values)], lw=2, color=line.get_color(),
                label=label or key)

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    curve(axes[0, 0], "rm_score", "r_φ(x, y)")
    curve(axes[0, 0], "score", "r_φ − missing-end penalty")
    axes[0, 0].set(title="reward-model score of the rollouts", xlabel="iteration")
    curve(axes[0, 1], "gold_score", "gold (judge)", color="green")
    axes[0, 1].set(title="gold score of the rollouts (the true goal)", xlabel="iteration")
    curve(axes[0, 2], "kl", "k1 = Σ log π_θ/π_ref")
    curve(axes[0, 2], "kl_k3", "k3")
    axes[0, 2].set(title="KL(π_θ ‖ π_ref) per response (nats)", xlabel="iteration")
    curve(axes[1, 0], "response_length", "tokens (without <|end|>)")
    axes[1, 0].set(title="response length", xlabel="iteration")
    curve(axes[1, 1], "clip_fraction", "clip fraction")
    curve(axes[1, 1], "approx_kl", "approx KL(π_old ‖ π_θ)")
    ratio_axis = axes[1, 1].twinx()
    curve(ratio_axis, "ratio_mean", "mean ratio ρ (right axis)", color="gray")
    ratio_axis.legend(fontsize=8, loc="lower right")
    axes[1, 1].set(title="policy update (per iteration, averaged over minibatches)", xlabel="iteration")
    curve(axes[1, 2], "explained_variance", "critic explained variance")
    curve(axes[1, 2], "entropy", "policy entropy (nats/token)")
    axes[1, 2].set(title="critic and entropy", xlabel="iteration")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_reward_hacking(runs, png_path):
    """Seed 3.5 in one figure, one colour per β: r_φ score and gold score per iteration, response
    length, and gold score against √KL — Gao et al.'s over-optimisation curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for beta, records in runs.items():
        x = [r["iteration"] for r in records]
        label = f"β = {beta:g}"
        line, = axes[0].plot(x, smooth([r["rm_score"] for r in records]), lw=2, label=label)
        color = line.get_color()
        axes[1].plot(x, smooth([r["gold_score"] for r in records]), lw=2, color=color, label=label)
        axes[2].plot(x, smooth([r["response_length"] for r in records]), lw=2, color=color, label=label)
        sqrt_kl = [math.sqrt(max(r["kl"], 0.0)) for r in records]
        gold = [r["gold_score"] for r in records]
        axes[3].scatter(sqrt_kl, gold, s=10, alpha=0.35, color=color)
        axes[3].plot(smooth(sqrt_kl), smooth(gold), "-", lw=2, color=color, label=label)
    axes[0].set(title="proxy: reward-model score (length-biased r_φ)", xlabel="iteration")
    axes[1].set(title="truth: gold score", xlabel="iteration")
    axes[2].set(title="response length (tokens)", xlabel="iteration")
    axes[3].set(title="gold score vs √KL(π_θ ‖ π_ref) (Gao et al. 2023)", xlabel="√KL per response (√nats)",
                ylabel="gold score (dots: iterations; lines: smoothed)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Reward hacking (seed 3.5): the proxy rises, the truth falls — "
                 "unless the KL penalty holds the policy back")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# =============================================================================
# 11. Command line
# =============================================================================

def validate_args(args):
    """One clear error per out-of-range flag, before any work starts: the declared ranges, then the
    checks that involve two flags."""
    check_ranges(args, Hyperparameters)
    if args.algo == "ppo" and not args.value_lr > 0:
        raise ConfigError(f"--value-lr must be > 0 (got {args.value_lr})")
    if args.critic == "shared" and args.algo != "ppo":
        raise ConfigError("--critic shared is PPO's value head: GRPO has no critic (drop --critic or use --algo ppo)")
    if args.reward_baseline == "group" and args.algo != "ppo":
        raise ConfigError("--reward-baseline group is PPO's: GRPO always centres on its group (drop the flag)")
    if args.algo == "grpo" or args.reward_baseline == "group":
        if args.group_size < 2:
            raise ConfigError(f"--group-size must be ≥ 2 for GRPO and for --reward-baseline group: the group is the "
                              f"baseline (got {args.group_size})")
        if args.rollouts % args.group_size:
            raise ConfigError(f"--rollouts {args.rollouts} must be a multiple of --group-size {args.group_size}")
    if args.beta_sweep is not None and (not args.beta_sweep or any(not b >= 0 for b in args.beta_sweep)):
        raise ConfigError(f"--beta-sweep needs one or more β ≥ 0, e.g. 0,0.02,0.1 (got {args.beta_sweep})")
    if args.beta_sweep is not None and args.reward_source != "rm":
        raise ConfigError("--beta-sweep studies a (length-biased) reward model: it needs --reward-source rm")


def build_parser():
    return build_parser_from(Hyperparameters, __doc__.split("\n")[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.beta_sweep is not None:
            return beta_sweep(args)
        if args.reward_model is None and args.reward_source == "rm":
            args.reward_model = REWARD_MODEL
        return train(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
