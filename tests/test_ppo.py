"""Tests for ppo.py: GAE against a plain loop, the clipped losses and the KL estimators against hand
computations, masking, where the reward lands, GRPO advantages, KL = 0 and ratio = 1 at the first
step, toy rewards that PPO and GRPO must learn, and the command line (outputs, checkpoint, errors).

Everything runs on CPU with tiny randomly initialised GPTs; the command-line tests use a byte-level
tokenizer built here (256 byte tokens + the special tokens).
"""

import copy
import json
import math
import os
import random
from dataclasses import asdict

import pytest
import tiktoken
import torch

import ppo
import reward
from data.tokenizer import SPECIAL_TOKENS, save_tokenizer
from sft import ChatTokens, chat_tokens
from train_gpt import GPT, GPTConfig, atomic_save, load_checkpoint, model_from_checkpoint

PATTERN = r"""\s?\S+|\s+"""
RANKS = {bytes([i]): i for i in range(256)}
SPECIALS = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
ENC = tiktoken.Encoding("tiny", pat_str=PATTERN, mergeable_ranks=RANKS, special_tokens=SPECIALS)

# A toy vocabulary of 16 tokens for the learning tests: 0–11 ordinary, 13 <|pad|>, 15 <|end|>.
TOY_VOCAB, TOY_PAD, TOY_END = 16, 13, 15
TOY = ChatTokens(end_of_text=12, pad=TOY_PAD, system=14, user=14, assistant=14, end=TOY_END)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt(vocab_size=TOY_VOCAB, block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


def toy_args(*flags):
    return ppo.build_parser().parse_args(["--max-new-tokens", "8", *flags])


def toy_prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(12) for _ in range(rng.randint(2, 6))] for _ in range(n)]


def toy_models(algo="ppo", seed=0, critic="separate"):
    policy = tiny_gpt(seed=seed)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if algo != "ppo":
        return policy, reference, None
    if critic == "shared":
        return policy, reference, ppo.SharedValueHead(policy)
    return policy, reference, ppo.ValueModel(reward.reward_model_from_gpt(tiny_gpt(seed=seed + 1)))


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------

def gae_by_hand(rewards, values, length, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_s = r_s + γ·V_{s+1} − V_s with V after the last token = 0."""
    def delta(s):
        next_value = values[s + 1] if s + 1 < length else 0.0
        return rewards[s] + gamma * next_value - values[s]
    return [sum((gamma * lam) ** l * delta(t + l) for l in range(length - t)) for t in range(length)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_plain_loop(gamma, lam):
    torch.manual_seed(0)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)  # padding holds garbage: it must not count
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = gae_by_hand(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert advantages[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[b, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b, :n].tolist())],
                                                         abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_gae_with_lambda_one_gives_the_monte_carlo_return():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.5, 0.4, -0.3, 0.2]])
    _, returns = ppo.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert returns[0].tolist() == pytest.approx([1.2, 1.1, 1.3, 1.0], abs=1e-6)  # Σ_{s≥t} r_s


# ----------------------------------------------------------------------------------------------
# Losses and KL estimators, on fixed vectors computed by hand
# ----------------------------------------------------------------------------------------------

def test_clipped_policy_loss_by_hand():
    # ρ = 1.5, 0.5, 1.1, 0.7 with A = +1, +1, −1, −1 and ε = 0.2; a fifth, masked token is garbage.
    logprobs = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7, 1e6])).requires_grad_(True)
    old_logprobs = torch.zeros(5)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1e6])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, stats = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # min(ρA, clip(ρ)A): min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5; min(−1.1, −1.1) = −1.1; min(−0.7, −0.8) = −0.8
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1 - 0.8) / 4, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(3 / 4)  # |ρ − 1| > 0.2 for 1.5, 0.5, 0.7
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)) / 4
    assert stats["approx_kl"] == pytest.approx(expected_kl, abs=1e-6)
    loss.backward()
    # Clipped tokens (1 and 4) get no gradient; the others get −ρA/N; the masked one none at all.
    assert logprobs.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0], abs=1e-6)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 0.0, 2.0, 123.0])
    old_values = torch.tensor([0.5, 0.5, 2.0, -50.0])
    returns = torch.tensor([2.0, 0.0, 1.0, 7.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss, stats = ppo.value_loss(values, old_values, returns, mask, clip=0.2)
    # V_clip = 0.7, 0.3, 2.0 → max of squared errors: max(1, 1.69), max(0, 0.09), max(1, 1)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 1.0) / 3, abs=1e-6)
    assert stats["value_clip_fraction"] == pytest.approx(2 / 3)


def test_kl_estimators_by_hand():
    logprobs = torch.log(torch.tensor([0.5, 0.2, 0.3]))
    ref_logprobs = torch.log(torch.tensor([0.25, 0.4, 0.3]))
    k1, k3 = ppo.kl_estimators(logprobs, ref_logprobs)
    assert k1.tolist() == pytest.approx([math.log(2), -math.log(2), 0.0], abs=1e-6)
    # r = π_ref/π_θ = 0.5, 2, 1 → k3 = (r − 1) − log r
    assert k3.tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2), 0.0], abs=1e-6)


def test_kl_estimators_are_unbiased_on_samples_from_the_policy():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=generator), 0)
    q = torch.softmax(torch.randn(6, generator=generator), 0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    k1, k3 = ppo.kl_estimators(p.log()[samples], q.log()[samples])
    true_kl = (p * (p.log() - q.log())).sum().item()
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all()


def test_exact_kl_by_hand_and_as_the_mean_of_k1():
    """KL(p ‖ q) = Σ_v p_v log(p_v / q_v) from logits, at each position; k1 on samples from p averages to it."""
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    logits = torch.stack([p.log() + 3.0, q.log()])[None]     # (1, 2, V): a constant shift changes nothing
    ref_logits = torch.stack([q.log(), q.log() - 1.0])[None]
    kl = ppo.exact_kl(logits, ref_logits)
    by_hand = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.5)  # 0.635; KL(q ‖ p) 0.676
    assert kl[0].tolist() == pytest.approx([by_hand, 0.0], abs=1e-6)
    samples = torch.multinomial(p, 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, _ = ppo.kl_estimators(p.log()[samples], q.log()[samples])
    assert k1.mean().item() == pytest.approx(kl[0, 0].item(), abs=0.01)


def test_exact_kl_penalty_pulls_the_policy_back_to_the_reference():
    """With a reward that is the same for every response, only the penalty can move the policy: a
    perturbed policy trained with --kl-penalty exact (PPO and GRPO) returns towards π_ref; with β = 0
    it stays where it is."""
    def distance(policy, reference, rollout):
        with torch.no_grad():
            hidden = ppo.response_hidden_states(policy, rollout)
            return ppo.exact_kl_penalty(policy, reference, hidden, rollout).item()

    for algo, beta, pulled in (("ppo", 1.0, True), ("grpo", 1.0, True), ("ppo", 0.0, False)):
        torch.manual_seed(0)
        policy, reference, critic = toy_models(algo)
        with torch.no_grad():
            policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
        probe = ppo.sample_rollouts(reference, toy_prompts(16, seed=7), TOY, 6, 1.0, torch.Generator().manual_seed(1))
        before = distance(policy, reference, probe)
        args = toy_args("--algo", algo, "--kl-penalty", "exact", "--beta", str(beta), "--rollouts", "32",
                        "--minibatch-size", "16", "--lr", "3e-3", "--value-lr", "3e-3", "--group-size", "4")
        optimizer = ppo.make_optimizer(policy, critic, args)
        generator = torch.Generator().manual_seed(0)
        for iteration in range(12):
            prompts = [p for p in toy_prompts(8, seed=20 + iteration) for _ in range(4)]
            ppo.train_iteration(policy, reference, critic, optimizer, prompts, lambda p, r: torch.zeros(len(r)), TOY,
                                beta, args, generator)
        after = distance(policy, reference, probe)
        assert before > 0.1
        assert (after < 0.5 * before) if pulled else (after > 0.9 * before), (algo, beta, before, after)


def test_grpo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    advantages = ppo.grpo_advantages(scores, group_size=4)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # sample std of the first group around its mean 3
    assert advantages[:4].tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std], abs=1e-4)
    assert advantages[4:].tolist() == [0.0] * 4  # a group that all scored the same teaches nothing


def test_group_centred_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    assert ppo.group_centred_scores(scores, group_size=4).tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    # A constant added to one prompt's rewards (what Bradley–Terry cannot see) changes nothing.
    shifted = scores + torch.tensor([5.0] * 4 + [-7.0] * 4)
    assert torch.equal(ppo.group_centred_scores(shifted, 4), ppo.group_centred_scores(scores, 4))
    # (k − 1)/k times RLOO's leave-one-out difference R_i − mean_{j≠i} R_j.
    group = scores[:4].tolist()
    loo = [r - (sum(group) - r) / 3 for r in group]
    assert ppo.group_centred_scores(scores, 4)[:4].tolist() == pytest.approx([0.75 * d for d in loo])


def test_whitening_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, 1e9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    white = ppo.whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / valid.std(unbiased=False)
    assert white[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert white[~mask.bool()].tolist() == [0.0, 0.0, 0.0]


def test_adaptive_kl_controller():
    controller = ppo.AdaptiveKLController(beta=0.1, target=1.0, horizon=100)
    assert controller.update(kl=5.0, n_responses=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    assert controller.update(kl=0.95, n_responses=10) == pytest.approx(0.1 * 1.02 * (1 - 0.05 * 0.1))
    assert ppo.FixedKLController(0.3).update(kl=100.0, n_responses=10) == 0.3


# ----------------------------------------------------------------------------------------------
# Masks and where the reward lands
# ----------------------------------------------------------------------------------------------

def test_response_mask_stops_after_the_end_token_not_at_pad():
    end, pad = TOY_END, TOY_PAD
    responses = torch.tensor([[3, 4, end, pad, pad],     # ended at index 2
                              [3, pad, 4, 5, 6],         # a sampled <|pad|> mid-answer is just a token; truncated
                              [end, pad, pad, pad, pad]])  # stopped at once
    mask, ended = ppo.response_mask_and_ended(responses, end)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_reward_lands_on_the_last_real_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.5], [-0.2, 9.0, 9.0, 9.0, 9.0]])
    rewards = ppo.per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, 1.0 - 0.15, 0.0, 0.0],    # the score on the <|end|> token
                             [0.0, 0.0, 0.0, 0.0, 2.0 - 0.25],      # truncated: on the last generated token
                             [3.0 + 0.1, 0.0, 0.0, 0.0, 0.0]])      # an empty answer: <|end|> is the only token
    torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0)


def test_rollout_logprobs_and_values_match_unpadded_sequences():
    """Left-padded prompts, right-padded responses: each row's log-probs and values equal those of
    the same sequence run alone, without padding — padding never changes a real token."""
    policy, _, critic = toy_models()
    prompts = toy_prompts(6, seed=1)
    generator = torch.Generator().manual_seed(0)
    rollout = ppo.sample_rollouts(policy, prompts, TOY, 8, 1.0, generator)
    logprobs, entropy = ppo.response_logprobs(policy, rollout, with_entropy=True)
    values = ppo.response_values(critic, rollout)
    for b, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses)):
        n = len(response)
        assert n == int(rollout.response_mask[b].sum())
        if rollout.ended[b]:
            assert response[-1] == TOY_END and TOY_END not in response[:-1]
        sequence = torch.tensor([prompt + response])
        logits, _ = policy(sequence[:, :-1])
        alone = torch.log_softmax(logits[0, len(prompt) - 1:], -1).gather(1, sequence[0, len(prompt):, None])[:, 0]
        assert logprobs[b, :n].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
        assert logprobs[b, n:].abs().sum() == 0
        alone_values = critic(sequence[:, :-1])[0, len(prompt) - 1:]
        assert values[b, :n].tolist() == pytest.approx(alone_values.tolist(), abs=1e-5)
        assert values[b, n:].abs().sum() == 0
    assert torch.isfinite(entropy).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samplers_logprobs_are_those_a_second_forward_computes(temperature):
    """keep_logprobs: log π_old from the KV-cached sampling steps equals response_logprobs of the
    finished rollout (a full forward over left-padded prompts), 0 on padding — and keeping them
    draws the very same responses."""
    policy, _, _ = toy_models()
    prompts = toy_prompts(6, seed=1)
    kept = ppo.sample_rollouts(policy, prompts, TOY, 8, temperature, torch.Generator().manual_seed(0),
                               keep_logprobs=True)
    plain = ppo.sample_rollouts(policy, prompts, TOY, 8, temperature, torch.Generator().manual_seed(0))
    assert kept.responses == plain.responses and plain.old_logprobs is None
    recomputed, _ = ppo.response_logprobs(policy, kept, temperature)
    assert kept.old_logprobs.shape == kept.response_mask.shape
    torch.testing.assert_close(kept.old_logprobs, recomputed, atol=1e-5, rtol=0)
    assert (kept.old_logprobs[kept.response_mask == 0] == 0).all()
    assert kept.old_logprobs[kept.response_mask == 1].lt(0).all()


def test_a_minibatch_is_cut_to_its_own_padding_and_keeps_every_value():
    """Rollout.select drops columns that are padding in all chosen rows: narrower tensors, the same
    log-probs, values and experience for every chosen row as in the full batch."""
    policy, reference, critic = toy_models()
    args = toy_args("--rollouts", "8", "--minibatch-size", "8")
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8, 9], [1, 2, 3], [4, 5]]
    rollout = ppo.sample_rollouts(policy, prompts, TOY, 8, 1.0, torch.Generator().manual_seed(3))
    ppo.make_experience(rollout, policy, reference, critic, lambda p, r: torch.randn(len(r)), 0.1, args)
    rows = torch.tensor([0, 3])  # the two short prompts: the long prompt's columns go
    batch = rollout.select(rows)
    lengths = [len(rollout.responses[i]) for i in rows.tolist()]
    assert batch.prompt_length == 2 and batch.response_mask.shape == (2, max(lengths))
    assert batch.sequences.shape[1] == 2 + max(lengths) < rollout.sequences.shape[1]
    full_logprobs, _ = ppo.response_logprobs(policy, rollout)
    cut_logprobs, _ = ppo.response_logprobs(policy, batch)
    width = max(lengths)
    torch.testing.assert_close(cut_logprobs, full_logprobs[rows, :width], atol=1e-5, rtol=0)
    torch.testing.assert_close(ppo.response_values(critic, batch), ppo.response_values(critic, rollout)[rows, :width],
                               atol=1e-5, rtol=0)
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns", "response_mask"):
        assert torch.equal(getattr(batch, name), getattr(rollout, name)[rows, :width]), name
    assert (getattr(rollout, "response_mask")[rows, width:] == 0).all()
    assert batch.responses == [rollout.responses[i] for i in rows.tolist()]


def test_value_model_starts_as_the_reward_model():
    rm = reward.reward_model_from_gpt(tiny_gpt(seed=3))
    rm.reward_shift.fill_(0.25)
    critic = ppo.ValueModel(rm)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    assert critic(ids)[:, -1].tolist() == pytest.approx(rm(ids, torch.tensor([4, 4])).tolist(), abs=1e-6)
    assert all(p.requires_grad for p in critic.parameters())
    assert critic.backbone is not rm.backbone


def test_padding_never_contributes_to_the_update():
    """Change what sits in padded positions — response tokens after <|end|>, old log-probs,
    advantages, values, returns — and the loss and its gradients stay the same."""
    policy, reference, critic = toy_models()
    args = toy_args("--rollouts", "8", "--minibatch-size", "8")
    generator = torch.Generator().manual_seed(0)
    rollout = ppo.sample_rollouts(policy, toy_prompts(8, seed=2), TOY, 8, 1.0, generator)
    ppo.make_experience(rollout, policy, reference, critic, lambda p, r: torch.randn(len(r)), 0.1, args)
    padding = ~rollout.response_mask.bool()
    assert padding.any(), "the test needs some padding"

    def loss_and_grads(r):
        policy.zero_grad()
        critic.zero_grad()
        logprobs, _ = ppo.response_logprobs(policy, r)
        loss, _ = ppo.ppo_policy_loss(logprobs, r.old_logprobs, r.advantages, r.response_mask)
        critic_loss, _ = ppo.value_loss(ppo.response_values(critic, r), r.values, r.returns, r.response_mask)
        (loss + critic_loss).backward()
        return (loss + critic_loss).item(), [p.grad.clone() for p in list(policy.parameters()) + list(critic.parameters())]

    clean_loss, clean_grads = loss_and_grads(rollout)
    noisy = copy.copy(rollout)
    P = rollout.prompt_length
    responses = rollout.sequences[:, P:].clone()
    responses[padding] = torch.randint(0, 12, (int(padding.sum()),))
    noisy.sequences = torch.cat([rollout.sequences[:, :P], responses], dim=1)
    for name in ("old_logprobs", "advantages", "values", "returns"):
        tensor = getattr(rollout, name).clone()
        tensor[padding] = 1e4
        setattr(noisy, name, tensor)
    noisy_loss, noisy_grads = loss_and_grads(noisy)
    assert noisy_loss == pytest.approx(clean_loss, abs=1e-6)
    for a, b in zip(clean_grads, noisy_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The first step: π_θ = π_ref = π_old
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_kl_is_zero_and_ratio_is_one_at_the_first_step(algo):
    policy, reference, critic = toy_models(algo)
    args = toy_args("--algo", algo, "--rollouts", "16", "--minibatch-size", "16", "--ppo-epochs", "1",
                    "--group-size", "4")
    optimizer = ppo.make_optimizer(policy, critic, args)
    prompts = [p for p in toy_prompts(4, seed=3) for _ in range(4)]
    scores = torch.arange(16.0)
    rollout, stats = ppo.train_iteration(policy, reference, critic, optimizer, prompts, lambda p, r: scores, TOY,
                                         0.1, args, torch.Generator().manual_seed(0))
    assert rollout.kl.abs().max().item() < 1e-6 and rollout.kl_k3.abs().max().item() < 1e-6
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    if algo == "ppo":
        # No KL yet, so the only reward is the score (minus the penalty for a response that never ended)
        # on each response's last real token, found here from the mask; 0 everywhere else.
        expected = torch.zeros_like(rollout.rewards)
        for row, mask_row in enumerate(rollout.response_mask.tolist()):
            last = max(t for t, m in enumerate(mask_row) if m)
            expected[row, last] = scores[row].item() - args.missing_end_penalty * (not rollout.ended[row].item())
        torch.testing.assert_close(rollout.rewards, expected, atol=1e-6, rtol=0)
    else:
        assert stats["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_missing_end_penalty_is_subtracted_from_truncated_responses():
    policy, reference, critic = toy_models()
    args = toy_args("--rollouts", "8", "--missing-end-penalty", "2.5", "--max-new-tokens", "3")
    rollout = ppo.sample_rollouts(policy, toy_prompts(8, seed=4), TOY, 3, 1.0, torch.Generator().manual_seed(0))
    ppo.make_experience(rollout, policy, reference, critic, lambda p, r: torch.ones(len(r)), 0.0, args)
    assert (~rollout.ended).any(), "the test needs a truncated response"
    assert rollout.scores.tolist() == [1.0 if e else -1.5 for e in rollout.ended.tolist()]


# ----------------------------------------------------------------------------------------------
# Learning: a toy reward the policy must learn within a few CPU iterations
# ----------------------------------------------------------------------------------------------

TARGET = 3  # "emit token 3": the reward is the share of response tokens equal to it


def share_of_target(prompts, responses):
    return torch.tensor([sum(t == TARGET for t in r) / len(r) for r in responses])


@pytest.mark.parametrize("algo,critic,baseline,penalty", [("ppo", "separate", "none", []),
                                                          ("ppo", "shared", "none", []),
                                                          ("ppo", "separate", "group", []),
                                                          ("ppo", "separate", "none", ["--kl-penalty", "exact"]),
                                                          ("grpo", "separate", "none", [])])
def test_policy_learns_a_toy_reward(algo, critic, baseline, penalty):
    """Starts near 1/16 (random tiny GPT); must clearly rise. A sign error in the advantages, a
    reward on the wrong token or a broken ratio makes this fail."""
    torch.manual_seed(0)
    policy, reference, value_model = toy_models(algo, critic=critic)
    critic_flags = ["--critic", critic, "--value-coef", "0.1", "--reward-baseline", baseline] if algo == "ppo" else []
    args = toy_args("--algo", algo, "--rollouts", "64", "--minibatch-size", "16", "--lr", "3e-3", "--value-lr",
                    "3e-3", "--beta", "0.02" if penalty else "0", "--missing-end-penalty", "0", "--group-size", "4",
                    *critic_flags, *penalty)
    critic = value_model
    optimizer = ppo.make_optimizer(policy, critic, args)
    generator = torch.Generator().manual_seed(0)
    history = []
    for iteration in range(12):
        prompts = [p for p in toy_prompts(16, seed=10 + iteration) for _ in range(4)]
        rollout, _ = ppo.train_iteration(policy, reference, critic, optimizer, prompts, share_of_target, TOY,
                                         args.beta, args, generator)
        history.append(rollout.rm_scores.mean().item())
    assert history[0] < 0.2
    assert sum(history[-2:]) / 2 > 0.5, history


def test_shared_value_head_reads_the_policys_own_hidden_states_and_trains_them():
    """--critic shared: V = w·h_t + b on the policy's backbone. Its only parameters are the head (the
    policy is not counted twice), it starts at V = 0, the update's one forward gives the same
    log-probs as response_logprobs, and c₁·L_value's gradient reaches the policy's weights."""
    torch.manual_seed(0)
    policy, reference, critic = toy_models("ppo", critic="shared")
    assert [name for name, _ in critic.named_parameters()] == ["head.weight", "head.bias"]
    rollout = ppo.sample_rollouts(policy, toy_prompts(8, seed=5), TOY, 5, 1.0, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(ppo.response_values(critic, rollout)) == 0
    with torch.no_grad():
        critic.head.weight.normal_()
        hidden = ppo.response_hidden_states(policy, rollout)
        by_hand = (hidden @ critic.head.weight[0] + critic.head.bias) * rollout.response_mask
        torch.testing.assert_close(ppo.response_values(critic, rollout), by_hand)
        torch.testing.assert_close(ppo.logprobs_from_hidden(policy, hidden, rollout)[0],
                                   ppo.response_logprobs(policy, rollout)[0])
    args = toy_args("--rollouts", "8", "--minibatch-size", "8", "--ppo-epochs", "1", "--critic", "shared",
                    "--lr", "1e-9", "--value-lr", "1e-9")
    ppo.make_experience(rollout, policy, reference, critic, lambda p, r: torch.arange(8.0), 0.0, args)
    with torch.no_grad():  # the experience's one shared forward = the two separate reads
        torch.testing.assert_close(rollout.values, ppo.response_values(critic, rollout))
        torch.testing.assert_close(rollout.old_logprobs, ppo.response_logprobs(policy, rollout)[0])
    rollout.advantages = torch.zeros_like(rollout.advantages)  # no policy-gradient signal: only the value loss
    optimizer = ppo.make_optimizer(policy, critic, args)
    ppo.ppo_update(policy, critic, optimizer, rollout, 0.0, args)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.blocks.parameters())


def test_shared_critic_needs_ppo(tmp_path, capsys):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    error = run_expecting_error(capsys, ["--sft", sft_path, "--reward-model", rm_path, "--algo", "grpo",
                                         "--critic", "shared"])
    assert "--critic shared" in error


# ----------------------------------------------------------------------------------------------
# The command line: outputs, checkpoint, β sweep, errors
# ----------------------------------------------------------------------------------------------

def save_tiny_checkpoints(tmp_path, rm_vocab=None, rm_tokenizer=None):
    """A tokenizer directory, an SFT checkpoint and a reward-model checkpoint of tiny models."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = str(tmp_path / "tokenizer")
    save_tokenizer(tokenizer_dir, RANKS, PATTERN, SPECIALS, name="tiny")
    policy = tiny_gpt(ENC.n_vocab, block_size=128)
    sft_path = str(tmp_path / "sft.pt")
    atomic_save({"model": policy.state_dict(), "config": asdict(policy.config), "step": 0, "tokenizer": tokenizer_dir,
                 "stage": "sft"}, sft_path)
    rm = reward.reward_model_from_gpt(tiny_gpt(rm_vocab or ENC.n_vocab, block_size=128, seed=1))
    rm_path = str(tmp_path / "rm.pt")
    atomic_save({"model": rm.state_dict(), "config": asdict(rm.config), "step": 0,
                 "tokenizer": rm_tokenizer or tokenizer_dir, "stage": "reward"}, rm_path)
    return sft_path, rm_path


SMALL_RUN = ["--iterations", "2", "--rollouts", "8", "--minibatch-size", "4", "--max-new-tokens", "6",
             "--ppo-epochs", "1", "--eval-tasks", "4", "--group-size", "4"]


@pytest.mark.parametrize("algo,reward_source", [("ppo", "rm"), ("grpo", "rm"), ("ppo", "judge")])
def test_command_line_run_writes_metrics_plots_eval_and_a_loadable_checkpoint(tmp_path, algo, reward_source):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    out = str(tmp_path / "ppo")
    ppo.main(["--sft", sft_path, "--reward-model", rm_path, "--out", out, "--algo", algo,
              "--reward-source", reward_source, *SMALL_RUN])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in records] == [1, 2]
    required = {"iteration", "rm_score", "gold_score", "kl", "kl_k3", "response_length", "ratio_mean", "clip_fraction",
                "approx_kl", "explained_variance", "entropy", "rollout_tokens_per_sec", "time_generation",
                "time_optimisation"}
    assert required <= set(records[0])
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= records[0]["gold_score"] <= 1.0
    assert (records[0]["explained_variance"] is None) == (algo == "grpo")
    evaluation = json.load(open(os.path.join(out, "eval.json")))
    assert evaluation["sft"]["n"] == 4 and evaluation["ppo"]["n"] == 4
    assert evaluation["sft"]["kl"] == pytest.approx(0.0, abs=1e-5) and 0 <= evaluation["ppo"]["sampled_gold_score"] <= 1
    if reward_source == "judge":
        assert [r["rm_score"] for r in records] == pytest.approx([r["gold_score"] for r in records])
    assert os.path.getsize(os.path.join(out, "ppo.png")) > 0
    model, checkpoint = model_from_checkpoint(os.path.join(out, "model.pt"))
    assert checkpoint["stage"] == "ppo" and checkpoint["tokenizer"] == str(tmp_path / "tokenizer")
    assert isinstance(model, GPT)


def test_the_judge_rewards_critic_starts_at_zero_and_the_rm_critic_from_r_phi(tmp_path):
    """Without r_φ a random value head put explained variance at −9 in the first iteration; the
    critic must start at V = 0 on every state. With r_φ it starts as r_φ (same scores)."""
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    prompts = [[1, 2, 3], [4, 5]]
    for source in ("judge", "rm"):
        args = ppo.build_parser().parse_args(["--sft", sft_path, "--reward-model", rm_path, "--reward-source", source])
        policy, _, reward_model, critic, _, _ = ppo.load_models(args, torch.device("cpu"))
        rollout = ppo.sample_rollouts(policy, prompts, chat_tokens(ENC), 5, 1.0, torch.Generator().manual_seed(0))
        values = ppo.response_values(critic, rollout)
        if source == "judge":
            assert reward_model is None and torch.count_nonzero(values) == 0
        else:
            assert torch.count_nonzero(values) > 0
            assert critic.head.weight.data_ptr() != reward_model.head.weight.data_ptr()  # a copy, not r_φ itself


def test_an_ensemble_of_reward_models_is_loaded_and_its_first_member_starts_the_critic(tmp_path, capsys,
                                                                                       monkeypatch):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    other = str(tmp_path / "rm2.pt")
    rm2 = reward.reward_model_from_gpt(tiny_gpt(ENC.n_vocab, block_size=128, seed=7))
    atomic_save({"model": rm2.state_dict(), "config": asdict(rm2.config), "step": 0,
                 "tokenizer": str(tmp_path / "tokenizer"), "stage": "reward"}, other)
    args = ppo.build_parser().parse_args(["--sft", sft_path, "--reward-model", f"{rm_path},{other}",
                                          "--ensemble-reduce", "min"])
    built, init = [], reward.RewardModel.__init__  # each member built once: its head init draws from the
    monkeypatch.setattr(reward.RewardModel, "__init__",  # global generator, which PPO's minibatches use next
                        lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    read = []  # and each checkpoint file read once
    monkeypatch.setattr(reward, "load_checkpoint",  # ppo.load_models reads every checkpoint through reward.py
                        lambda path, *a, **k: read.append(path) or load_checkpoint(path, *a, **k))
    _, _, reward_model, critic, _, _ = ppo.load_models(args, torch.device("cpu"))
    assert len(built) == 2
    assert sorted(read) == sorted([sft_path, rm_path, other])
    assert isinstance(reward_model, reward.RewardEnsemble) and reward_model.reduce == "min"
    first = reward_model.members[0]
    assert torch.equal(critic.head.weight, first.head.weight) and critic.head.weight.data_ptr() != first.head.weight.data_ptr()
    error = run_expecting_error(capsys, ["--sft", sft_path, "--reward-model", f"{rm_path},{tmp_path}/nope.pt"])
    assert "--reward-model" in error and "nope.pt" in error


def test_beta_sweep_writes_the_reward_hacking_plot(tmp_path):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    out = str(tmp_path / "sweep")
    result = ppo.main(["--sft", sft_path, "--reward-model", rm_path, "--out", out, "--beta-sweep", "0,0.1",
                       *SMALL_RUN[:-4], "--eval-tasks", "0"])
    assert set(result["runs"]) == {"0", "0.1"}
    assert os.path.getsize(os.path.join(out, "reward_hacking.png")) > 0
    assert os.path.isfile(os.path.join(out, "beta_0.1", "metrics.jsonl"))
    assert json.load(open(os.path.join(out, "sweep.json")))["reward_model"] == rm_path


def run_expecting_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        ppo.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    return error


def test_bad_input_gives_one_clear_error_line(tmp_path, capsys):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    base = ["--sft", sft_path, "--reward-model", rm_path, "--out", str(tmp_path / "out")]
    missing = str(tmp_path / "nope.pt")
    assert missing in run_expecting_error(capsys, ["--sft", missing, "--reward-model", rm_path])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert "corrupt" in run_expecting_error(capsys, base[:2] + ["--reward-model", str(corrupt)])
    assert "reward model checkpoint" in run_expecting_error(capsys, ["--sft", rm_path, "--reward-model", rm_path])
    assert "not a reward model" in run_expecting_error(capsys, ["--sft", sft_path, "--reward-model", sft_path])
    assert "--clip-eps" in run_expecting_error(capsys, base + ["--clip-eps", "1.5"])
    assert "--rollouts" in run_expecting_error(capsys, base + ["--rollouts", "0"])
    assert "--group-size" in run_expecting_error(capsys, base + ["--algo", "grpo", "--rollouts", "10"])
    assert "--group-size" in run_expecting_error(capsys, base + ["--reward-baseline", "group", "--rollouts", "10"])
    assert "--reward-baseline" in run_expecting_error(capsys, base + ["--algo", "grpo", "--reward-baseline", "group"])
    assert "--beta" in run_expecting_error(capsys, base + ["--beta", "-1"])
    assert "--max-new-tokens" in run_expecting_error(capsys, base + ["--max-new-tokens", "200"])


def test_incompatible_reward_model_is_refused(tmp_path, capsys):
    sft_path, rm_path = save_tiny_checkpoints(tmp_path / "a", rm_vocab=300)
    error = run_expecting_error(capsys, ["--sft", sft_path, "--reward-model", rm_path])
    assert rm_path in error and "vocabulary" in error
    other = str(tmp_path / "other_tokenizer")
    shuffled = dict(zip(RANKS, random.Random(0).sample(range(256), 256)))
    save_tokenizer(other, shuffled, PATTERN, SPECIALS, name="other")
    sft_path, rm_path = save_tiny_checkpoints(tmp_path / "b", rm_tokenizer=other)
    error = run_expecting_error(capsys, ["--sft", sft_path, "--reward-model", rm_path])
    assert rm_path in error and "tokenizer" in error


# ----------------------------------------------------------------------------------------------
# The stage: skip a finished run, resume an interrupted one
# ----------------------------------------------------------------------------------------------

def test_a_finished_run_is_skipped_until_a_flag_or_the_reward_model_changes(tmp_path, capsys):
    from train_gpt import read_stage
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    out = tmp_path / "ppo"

    def run(*extra):
        capsys.readouterr()
        summary = ppo.main(["--sft", sft_path, "--reward-model", rm_path, "--out", str(out), *SMALL_RUN[2:],
                            "--iterations", "1", "--eval-tasks", "0", *extra])
        return summary, "holds a finished run" in capsys.readouterr().out, read_stage(str(out))["fingerprint"]

    first, skipped, fingerprint = run()
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert not skipped and run("--log-every", "5", "--threads", "1") == (first, True, fingerprint)
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    _, skipped, other = run("--beta", "0.1")  # another flag: trained again
    assert not skipped and other != fingerprint
    rm = torch.load(rm_path, weights_only=True)  # a new reward model.pt at the same path
    torch.save({**rm, "model": {k: v + 0.01 if v.is_floating_point() else v for k, v in rm["model"].items()}}, rm_path)
    _, skipped, changed = run("--beta", "0.1")
    assert not skipped and changed != other


def test_an_interrupted_run_resumes_to_the_same_policy_and_metrics(tmp_path, monkeypatch, capsys):
    from conftest import interrupt_on_call, without_timings
    sft_path, rm_path = save_tiny_checkpoints(tmp_path)
    flags = ["--sft", sft_path, "--reward-model", rm_path, *SMALL_RUN[2:], "--iterations", "5",
             "--checkpoint-every", "2", "--kl-target", "0.5", "--kl-horizon", "20",  # β adapts: its state is saved too
             "--anneal-lr", "--lr", "1e-4"]  # and the learning rate decays, by iteration: resumed where it was
    expected = ppo.main([*flags, "--out", str(tmp_path / "straight")])
    interrupt_on_call(monkeypatch, ppo, "train_iteration", 4)  # Ctrl-C during iteration 4
    with pytest.raises(KeyboardInterrupt):
        ppo.main([*flags, "--out", str(tmp_path / "interrupted")])
    monkeypatch.undo()
    capsys.readouterr()
    summary = ppo.main([*flags, "--out", str(tmp_path / "interrupted")])
    assert "resuming" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("straight", "interrupted"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [ppo.read_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("straight", "interrupted")]
    assert [r["iteration"] for r in records[1]] == [1, 2, 3, 4, 5]  # iteration 3 once: logged again, not twice
    assert without_timings(records[0]) == without_timings(records[1])
    assert [r["lr"] for r in records[1]] == pytest.approx([1e-4, 0.8e-4, 0.6e-4, 0.4e-4, 0.2e-4])
    assert summary["final_beta"] == expected["final_beta"] != 0.2 and summary["ppo"] == expected["ppo"]
