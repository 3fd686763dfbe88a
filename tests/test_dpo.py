"""Tests for dpo.py: each loss against plain-Python math and its limiting cases, the bounded DPO
gradient, masking of prompt and padding, KTO's data handling, a few real training steps, the
frontier plot and the command line.

CPU only, a byte-level tokenizer built here (256 byte tokens + the chat special tokens) and tiny
GPTs, so no run directory is needed.
"""

import contextlib
import json
import math
import os
import random
from dataclasses import asdict

import pytest
import tiktoken
import torch

import dpo
import sft
from data.tokenizer import SPECIAL_TOKENS, save_tokenizer
from train_gpt import GPT, ConfigError, GPTConfig, atomic_save, model_from_checkpoint

PATTERN = r"""\s?\S+|\s+"""
BYTE_RANKS = {bytes([i]): i for i in range(256)}
SPECIALS = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
ENC = tiktoken.Encoding("tiny", pat_str=PATTERN, mergeable_ranks=BYTE_RANKS, special_tokens=SPECIALS)
PAD = sft.chat_tokens(ENC).pad


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(n_layer=2, block_size=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def tensors(*lists):
    return [torch.tensor(x, dtype=torch.float32) for x in lists]


# Fixed vectors: summed log-probs of 3 pairs under the policy and the reference.
POLICY_CHOSEN, POLICY_REJECTED = [-12.0, -30.5, -7.25], [-15.0, -28.0, -9.0]
REFERENCE_CHOSEN, REFERENCE_REJECTED = [-13.0, -29.0, -8.0], [-14.0, -29.5, -8.5]


# ----------------------------------------------------------------------------- DPO

def test_dpo_loss_is_ln2_when_policy_equals_reference():
    chosen, rejected = torch.randn(8) * 10 - 20, torch.randn(8) * 10 - 20
    loss, chosen_rewards, rejected_rewards, accuracy = dpo.dpo_loss(chosen, rejected, chosen, rejected, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert chosen_rewards.item() == rejected_rewards.item() == 0.0 and accuracy.item() == 0.0


def test_dpo_loss_is_ln2_for_a_real_model_at_step_zero():
    """Reference log-probs cached in one batching, policy log-probs in another: still ln 2."""
    model = tiny_model().eval()
    pairs = synthetic_pairs(12, seed=3)
    dpo.cache_reference_logprobs(model, pairs, PAD, batch_size=5, device="cpu")
    logps = dpo.pair_logprobs(model, pairs, PAD, "cpu")
    loss, *_ = dpo.paired_loss("dpo", logps, pairs, {"beta": 0.1})
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    # Evaluated in the batches the cache used: bit-identical, so h = 0 exactly (accuracy 0, not noise).
    held_out = dpo.evaluate_pairs(model, pairs, "dpo", {"beta": 0.1}, PAD, batch_size=5, device="cpu")
    assert held_out["val_logratio_margin"] == 0.0 and held_out["val_logratio_accuracy"] == 0.0
    assert held_out["val_loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_matches_plain_python():
    beta = 0.2
    loss, chosen_rewards, rejected_rewards, accuracy = dpo.dpo_loss(
        *tensors(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), beta=beta)
    losses, r_w, r_l = [], [], []
    for pw, pl, rw, rl in zip(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED):
        r_w.append(beta * (pw - rw))
        r_l.append(beta * (pl - rl))
        losses.append(-math.log(sigmoid(r_w[-1] - r_l[-1])))
    assert loss.item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(sum(r_w) / 3, abs=1e-6)
    assert rejected_rewards.item() == pytest.approx(sum(r_l) / 3, abs=1e-6)
    assert accuracy.item() == pytest.approx(sum(w > l for w, l in zip(r_w, r_l)) / 3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_gradient_is_bounded_beta_times_sigmoid_minus_one(beta):
    """Blog: with Δ = β·h, ∂L/∂Δ = σ(Δ) − 1 ∈ [−1, 0]; by the chain rule ∂L/∂log π_θ(y_w) = β(σ(Δ) − 1)
    and ∂L/∂log π_θ(y_l) = −β(σ(Δ) − 1) — finite even for huge log-ratio differences."""
    for h in [-1e4, -50.0, -3.0, 0.0, 2.5, 40.0, 1e4]:
        policy_chosen = torch.tensor([h], requires_grad=True)
        policy_rejected = torch.tensor([0.0], requires_grad=True)
        loss, *_ = dpo.dpo_loss(policy_chosen, policy_rejected, torch.zeros(1), torch.zeros(1), beta=beta)
        loss.backward()
        expected = beta * (sigmoid(beta * h) - 1) if beta * h > -700 else -beta
        assert policy_chosen.grad.item() == pytest.approx(expected, abs=1e-6)
        assert policy_rejected.grad.item() == pytest.approx(-expected, abs=1e-6)
        assert -beta - 1e-6 <= policy_chosen.grad.item() <= 0 and math.isfinite(loss.item())


# ----------------------------------------------------------------------------- the variants

def test_ipo_matches_plain_python_and_has_its_minimum_at_one_over_two_beta():
    beta = 0.25
    loss, *_ = dpo.ipo_loss(*tensors(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), beta=beta)
    expected = [((pw - rw) - (pl - rl) - 1 / (2 * beta)) ** 2
                for pw, pl, rw, rl in zip(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # At π_θ = π_ref: (0 − 1/(2β))².
    zero = torch.zeros(1)
    assert dpo.ipo_loss(zero, zero, zero, zero, beta)[0].item() == pytest.approx(1 / (4 * beta**2))
    # Minimum 0 with zero gradient at h = 1/(2β); overshooting is penalised (unlike DPO).
    policy_chosen = torch.tensor([1 / (2 * beta)], requires_grad=True)
    loss, *_ = dpo.ipo_loss(policy_chosen, zero, zero, zero, beta)
    loss.backward()
    assert loss.item() == pytest.approx(0, abs=1e-10) and policy_chosen.grad.item() == pytest.approx(0, abs=1e-6)
    target, overshoot = torch.tensor([1 / (2 * beta)]), torch.tensor([3 / (2 * beta)])
    assert dpo.ipo_loss(overshoot, zero, zero, zero, beta)[0].item() > 1.0
    assert dpo.dpo_loss(overshoot, zero, zero, zero, beta)[0] < dpo.dpo_loss(target, zero, zero, zero, beta)[0]


AVG_CHOSEN, AVG_REJECTED = [-0.8, -2.1, -0.05], [-1.3, -1.9, -0.4]


def test_simpo_matches_plain_python():
    beta, gamma = 2.0, 0.7
    loss, chosen_rewards, rejected_rewards, accuracy = dpo.simpo_loss(*tensors(AVG_CHOSEN, AVG_REJECTED), beta, gamma)
    expected = [-math.log(sigmoid(beta * w - beta * l - gamma)) for w, l in zip(AVG_CHOSEN, AVG_REJECTED)]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(beta * sum(AVG_CHOSEN) / 3, rel=1e-6)
    assert accuracy.item() == pytest.approx(2 / 3)
    # Equal rewards: −log σ(−γ) = log(1 + e^γ) — the margin demands more than a tie.
    same = torch.tensor([-1.0])
    assert dpo.simpo_loss(same, same, beta, gamma)[0].item() == pytest.approx(math.log(1 + math.exp(gamma)), rel=1e-6)


def test_simpo_without_margin_is_dpo_on_averages_with_no_reference():
    chosen, rejected = tensors(AVG_CHOSEN, AVG_REJECTED)
    zeros = torch.zeros(3)
    simpo = dpo.simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)
    dpo_like = dpo.dpo_loss(chosen, rejected, zeros, zeros, beta=2.0)
    for a, b in zip(simpo, dpo_like):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_simpo_is_length_normalised_but_dpo_is_not():
    """Two pairs of the same per-token quality, one twice as long as the other, in one batch: SimPO's
    reward is the same for both (each sum divided by its own length), DPO's sums prefer the long pair."""
    per_token_chosen, per_token_rejected, lengths = -0.5, -0.9, [4, 8]
    logps = dpo.PairLogps(torch.tensor([per_token_chosen * n for n in lengths]),
                          torch.tensor([per_token_rejected * n for n in lengths]),
                          torch.tensor(lengths), torch.tensor(lengths))
    pairs = [dpo.PreferencePair((), (), reference_chosen_logp=0.0, reference_rejected_logp=0.0) for _ in lengths]
    hp = {"beta": 2.0, "gamma": 0.5}
    expected = -math.log(sigmoid(2.0 * (per_token_chosen - per_token_rejected) - 0.5))   # the same for both
    loss, chosen_rewards, _, _ = dpo.paired_loss("simpo", logps, pairs, hp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(2.0 * per_token_chosen, rel=1e-6)
    dpo_losses = [dpo.dpo_loss(logps.chosen[i:i + 1], logps.rejected[i:i + 1], torch.zeros(1), torch.zeros(1),
                               2.0)[0].item() for i in range(2)]
    assert dpo_losses[1] < dpo_losses[0]


def average_over_own_length(summed, sequences):
    """Summed log-probs divided by each response's own token count, read off its mask (the first token,
    <|endoftext|>, is never a target)."""
    return summed / torch.tensor([sum(mask[1:]) for _, mask in sequences], dtype=summed.dtype)


@pytest.mark.parametrize("loss_name", ["simpo", "orpo"])
def test_simpo_and_orpo_average_each_response_over_its_own_length(loss_name):
    """paired_loss on a real model's log-probs for pairs of different lengths (one right-padded batch)
    equals the loss on each response's summed log-prob over its own length — not over the batch's longest."""
    model = tiny_model().eval()
    pairs = synthetic_pairs(6, seed=4, length=(1, 9))
    for pair in pairs:
        pair.reference_chosen_logp = pair.reference_rejected_logp = 0.0   # unused by these two losses
    logps = dpo.pair_logprobs(model, pairs, PAD, "cpu")
    chosen_lengths = [sum(p.chosen[1][1:]) for p in pairs]
    assert len(set(chosen_lengths)) > 2 and logps.chosen_count.tolist() == chosen_lengths
    chosen_avg = average_over_own_length(logps.chosen, [p.chosen for p in pairs])
    rejected_avg = average_over_own_length(logps.rejected, [p.rejected for p in pairs])
    if loss_name == "simpo":
        hp = {"beta": 2.0, "gamma": 0.5}
        expected = dpo.simpo_loss(chosen_avg, rejected_avg, hp["beta"], hp["gamma"])
    else:
        hp = {"odds_ratio_weight": 0.3}
        expected = dpo.orpo_loss(chosen_avg, rejected_avg, hp["odds_ratio_weight"])
    got = dpo.paired_loss(loss_name, logps, pairs, hp)
    for name, a, b in zip(("loss", "chosen_rewards", "rejected_rewards", "accuracy"), got, expected):
        assert a.item() == pytest.approx(b.item(), rel=1e-6, abs=1e-7), name


def test_orpo_odds_and_loss_match_plain_python():
    for p in [0.01, 0.3, 0.5, 0.9, 0.999]:
        assert dpo.log_odds(torch.tensor([math.log(p)], dtype=torch.float64)).item() == pytest.approx(
            math.log(p / (1 - p)), rel=1e-9, abs=1e-12)
    assert dpo.log_odds(torch.tensor([math.log(0.5)])).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(dpo.log_odds(torch.tensor([0.0])).item())  # P = 1 is clamped, not infinite
    weight = 0.3
    loss, chosen_rewards, rejected_rewards, accuracy = dpo.orpo_loss(*tensors(AVG_CHOSEN, AVG_REJECTED), weight)
    expected, odds_w = [], []
    for w, l in zip(AVG_CHOSEN, AVG_REJECTED):
        log_odds_w = math.log(math.exp(w) / (1 - math.exp(w)))
        log_odds_l = math.log(math.exp(l) / (1 - math.exp(l)))
        odds_w.append(log_odds_w)
        expected.append(-w + weight * -math.log(sigmoid(log_odds_w - log_odds_l)))
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert chosen_rewards.item() == pytest.approx(sum(odds_w) / 3, rel=1e-5)
    assert accuracy.item() == pytest.approx(2 / 3)
    # λ = 0 leaves plain SFT: the mean NLL per token of the chosen responses.
    assert dpo.orpo_loss(*tensors(AVG_CHOSEN, AVG_REJECTED), 0.0)[0].item() == pytest.approx(-sum(AVG_CHOSEN) / 3)


def test_kto_matches_plain_python_with_zero_reference_point():
    beta, weight_d, weight_u = 0.5, 1.0, 1.5
    policy, reference = [-10.0, -12.0, -9.0, -20.0], [-11.0, -11.0, -9.5, -18.0]
    desirable = [True, True, False, False]
    loss, desirable_rewards, undesirable_rewards, z = dpo.kto_loss(
        *tensors(policy, reference), torch.tensor(desirable), torch.tensor(0.0), beta, weight_d, weight_u)
    expected = []
    for p, r, d in zip(policy, reference, desirable):
        reward = p - r
        expected.append(weight_d * (1 - sigmoid(beta * reward)) if d else weight_u * (1 - sigmoid(-beta * reward)))
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert desirable_rewards.item() == pytest.approx(beta * (1.0 + -1.0) / 2)
    assert undesirable_rewards.item() == pytest.approx(beta * (0.5 + -2.0) / 2)
    # Raising a desirable response's log-prob lowers the loss; raising an undesirable one raises it.
    logps = torch.tensor(policy, requires_grad=True)
    dpo.kto_loss(logps, torch.tensor(reference), torch.tensor(desirable), torch.tensor(0.0), beta)[0].backward()
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    assert dpo.kto_reference_point(policy, torch.tensor([-4.0, -4.0])).item() == 0.0   # negative KL estimate → 0
    z = dpo.kto_reference_point(policy, torch.tensor([-7.0, -9.0]))
    assert z.item() == pytest.approx(2.5) and not z.requires_grad
    # z_ref shifts the comparison: a reward equal to z_ref is the neutral point, σ(0) = ½.
    loss, *_ = dpo.kto_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([True]), torch.tensor(2.0), 0.1)
    assert loss.item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data and masking

PROMPT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "Reverse abc."}]


def masked_text(ids, mask):
    return ENC.decode([t for t, m in zip(ids, mask) if m])


def test_only_the_response_is_scored_not_earlier_assistant_turns():
    ids, mask = dpo.tokenize_response(PROMPT, "cba", ENC)
    assert ENC.decode(ids).endswith("Reverse abc.<|end|><|assistant|>cba<|end|>")
    assert masked_text(ids, mask) == "cba<|end|>"
    assert ids == sft.render_chat(PROMPT + [{"role": "assistant", "content": "cba"}], ENC)[0]


def test_prompt_tokens_never_contribute():
    """A model without attention (n_layer = 0) predicts from the current token and position only.
    Changing prompt tokens (same length, same last token <|assistant|>) then cannot change the
    response's log-prob — unless prompt positions were wrongly scored."""
    model = tiny_model(n_layer=0).eval()
    a = dpo.tokenize_response([{"role": "user", "content": "What is 2 + 3?"}], "5", ENC)
    b = dpo.tokenize_response([{"role": "user", "content": "Sort: 9, 1, 4!"}], "5", ENC)
    assert len(a[0]) == len(b[0]) and a[0] != b[0] and a[1] == b[1]
    logps = dpo.batch_logprobs(model, [a, b], PAD, "cpu")
    assert logps[0].item() == logps[1].item()
    # Chain rule with a real model: log π(y|x) = log π(x, y) − log π(x), the prompt scored from its 2nd token.
    model = tiny_model().eval()
    ids, mask = a
    everything = dpo.batch_logprobs(model, [(ids, [0] + [1] * (len(ids) - 1))], PAD, "cpu")
    prompt_only = dpo.batch_logprobs(model, [(ids, [0] + [1 - m for m in mask[1:]])], PAD, "cpu")
    response = dpo.batch_logprobs(model, [a], PAD, "cpu")
    assert response.item() == pytest.approx((everything - prompt_only).item(), abs=1e-4)


def test_padding_never_contributes():
    """A pair's log-probs are the same alone and batched with much longer pairs (more padding)."""
    model = tiny_model().eval()
    short = synthetic_pairs(1, seed=1, length=(1, 1))[0]
    long = synthetic_pairs(3, seed=2, length=(12, 14))
    alone = dpo.pair_logprobs(model, [short], PAD, "cpu")
    together = dpo.pair_logprobs(model, [short] + long, PAD, "cpu")
    assert together.chosen[0].item() == pytest.approx(alone.chosen[0].item(), abs=1e-5)
    assert together.rejected[0].item() == pytest.approx(alone.rejected[0].item(), abs=1e-5)
    assert together.chosen_count[0].item() == alone.chosen_count[0].item() == len("x") + 1


def test_pairs_convert_to_kto_examples_with_mismatched_prompts():
    records = [{"prompt": f"Reverse {w}.", "chosen": w[::-1], "rejected": w} for w in ("abc", "xyz", "hello", "kit")]
    unpaired = dpo.pairs_to_unpaired(records)
    assert [r["label"] for r in unpaired] == [True, False] * 4
    assert unpaired[0]["completion"] == "cba" and unpaired[1]["completion"] == "abc"
    examples, dropped = dpo.tokenize_unpaired(unpaired, ENC, 64, "test", seed=0)
    assert dropped == 0 and len(examples) == 8
    prompt_of = {r["completion"] + "<|end|>": r["prompt"] for r in unpaired}
    for example in examples:
        own_prompt, own_completion = ENC.decode(example.sequence[0]).split("<|assistant|>")
        mismatched_prompt, mismatched_completion = ENC.decode(example.mismatched[0]).split("<|assistant|>")
        assert mismatched_prompt == own_prompt                                               # x_i …
        assert prompt_of[mismatched_completion] != prompt_of[own_completion]                 # … y_j, j's prompt ≠ x_i
        assert masked_text(*example.mismatched) == mismatched_completion


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a", "completion": "b"}', "needs 'prompt', 'completion' and 'label'"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}', "'label' must be true or false"),
    ('{"prompt": 3, "completion": "b", "label": true}', "'prompt' must be a string"),
])
def test_malformed_unpaired_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "Hello", "label": true}\n' + line + "\n")
    with pytest.raises(ConfigError, match=f"{path}:2: .*{message}"):
        dpo.load_unpaired(str(path))


def test_bad_preference_records_are_clear_errors():
    with pytest.raises(ConfigError, match="record 1: a preference record needs"):
        dpo.tokenize_pairs([{"prompt": "x", "chosen": "y"}], ENC, 64, "prefs.jsonl")
    with pytest.raises(ConfigError, match="'chosen' must be a string or a single assistant message"):
        dpo.tokenize_pairs([{"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}],
                           ENC, 64, "prefs.jsonl")
    pairs, dropped = dpo.tokenize_pairs([{"prompt": "x", "chosen": "y" * 100, "rejected": "z"}], ENC, 64, "p")
    assert pairs == [] and dropped == 1


# ----------------------------------------------------------------------------- training

VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxz"


def synthetic_records(n, seed, length=(3, 6)):
    """An easy preference: the chosen reply is made of vowels, the rejected one of consonants."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = "".join(rng.choice(VOWELS + CONSONANTS) for _ in range(rng.randint(3, 5)))
        size = rng.randint(*length)
        records.append({"prompt": f"Say something about {word}.",
                        "chosen": "".join(rng.choice(VOWELS) for _ in range(size)),
                        "rejected": "".join(rng.choice(CONSONANTS) for _ in range(size))})
    return records


def synthetic_pairs(n, seed, length=(3, 6)):
    return dpo.tokenize_pairs(synthetic_records(n, seed, length), ENC, 64, "synthetic")[0]


def train_args(loss, extra=()):
    return dpo.build_parser().parse_args(["--loss", loss, "--lr", "2e-3", "--epochs", "2", "--batch-size", "16",
                                          "--evals-per-epoch", "1", "--log-every", "1000", *extra])


def run_fit(loss, train_records, val_records, extra=()):
    args = train_args(loss, extra)
    args.beta = dpo.BETA[loss] if args.beta is None else args.beta
    reference = tiny_model().eval()
    policy = tiny_model().train()   # same seed: π_θ = π_ref at step 0
    run = {"device": torch.device("cpu"), "autocast": torch.autocast("cpu", enabled=False), "pad": PAD}
    if loss == "kto":
        examples, _ = dpo.tokenize_unpaired(dpo.pairs_to_unpaired(train_records), ENC, 64, "train", seed=0)
    else:
        examples, _ = dpo.tokenize_pairs(train_records, ENC, 64, "train")
    val_pairs, _ = dpo.tokenize_pairs(val_records, ENC, 64, "val")
    dpo.cache_reference_logprobs(reference, examples + val_pairs, PAD, 32, "cpu")
    with open(os.devnull, "w") as metrics:
        steps, last = dpo.fit(policy, examples, val_pairs, loss, args.beta, args, run, metrics)
    return steps, last


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_a_few_steps_raise_held_out_preference_accuracy(loss):
    """~20 CPU steps on 'vowels beat consonants', judged on pairs with unseen prompts and replies:
    log π_θ/π_ref must rise for chosen over rejected. Starts at accuracy 0 (π_θ = π_ref: h = 0)."""
    steps, last = run_fit(loss, synthetic_records(160, seed=10), synthetic_records(40, seed=11))
    assert steps == (40 if loss == "kto" else 20)   # KTO: each pair is two examples
    assert last["val_logratio_accuracy"] > 0.9 and last["val_logratio_margin"] > 0


@pytest.mark.parametrize("max_steps, n_seen, n_used", [(2, 32, 32), (5, 66, 50)])
def test_examples_used_are_exactly_the_ones_the_steps_train_on(monkeypatch, max_steps, n_seen, n_used):
    """--max-steps short of the epochs: examples_used names the examples fit() will batch, no more, no
    fewer (within epoch 1, and across its short last batch into epoch 2), so π_ref need only be cached
    for those."""
    examples = synthetic_pairs(50, seed=3)
    args = train_args("dpo", ["--max-steps", str(max_steps), "--epochs", "3", "--batch-size", "16"])
    seen = []
    monkeypatch.setattr(dpo, "train_step", lambda policy, opt, chunk, *a: seen.extend(chunk) or {"loss": 0.0})
    run = {"device": torch.device("cpu"), "autocast": contextlib.nullcontext(), "pad": PAD}
    with open(os.devnull, "w") as metrics:
        steps, _ = dpo.fit(tiny_model(), examples, [], "dpo", 0.1, args, run, metrics)
    assert steps == max_steps and len(seen) == n_seen  # epoch 1 is 16 + 16 + 16 + 2
    used = dpo.examples_used(len(examples), args)
    assert len(used) == n_used and sorted({id(e) for e in seen}) == sorted(id(examples[i]) for i in used)


def test_swapped_preferences_train_the_other_way():
    """The same test with chosen and rejected swapped must fail: the signal really drives training."""
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in synthetic_records(160, seed=10)]
    _, last = run_fit("dpo", swapped, synthetic_records(40, seed=11))
    assert last["val_logratio_accuracy"] < 0.1


# ----------------------------------------------------------------------------- evaluation and the frontier

def test_kl_of_the_reference_to_itself_is_zero_and_win_rate_counts_ties_half():
    from data.tasks import generate_tasks
    model = tiny_model().eval()
    args = dpo.build_parser().parse_args(["--max-new-tokens", "6", "--eval-batch-size", "4"])
    tasks = generate_tasks(6, "test", seed=0, families=["arith"], levels=[1])
    baseline = dpo.sft_baseline(model, ENC, tasks, args, {"device": torch.device("cpu"),
                                                           "autocast": contextlib.nullcontext()})
    result = dpo.evaluate_policy(model, model, ENC, tasks, baseline, args, {"device": torch.device("cpu"),
                                                                          "autocast": contextlib.nullcontext()})
    assert abs(result["kl"]) < 1e-4 and 0 <= result["sampled_gold_score"] <= 1
    assert result["gold_score"] == baseline["mean_score"] and result["win_rate_vs_sft"] == 0.5
    assert dpo.win_rate([1.0, 0.5, 0.0, 0.2], [0.5, 0.5, 1.0, 0.1]) == (2.5 / 4, 2, 1)


def test_read_ppo_points_and_plot_frontier(tmp_path):
    ppo_dir = tmp_path / "ppo"
    ppo_dir.mkdir()
    lines = [{"iteration": 0, "kl": 0.0, "gold_score": 0.30}, {"iteration": 1, "loss": 1.2},
             {"iteration": 2, "kl": 1.5, "gold_score": 0.42}]
    (ppo_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    points = dpo.read_ppo_points(str(ppo_dir))
    assert [(p["kl"], p["gold_score"], p["label"]) for p in points] == [(0.0, 0.30, "it 0"), (1.5, 0.42, "it 2")]
    png = tmp_path / "frontier.png"
    dpo.plot_frontier({"DPO": [{"kl": 2.0, "gold_score": 0.5, "label": "β=0.1"}, {"kl": 0.5, "gold_score": 0.4}],
                       "PPO": points, "SFT": [{"kl": 0.0, "gold_score": 0.3}]}, str(png))
    assert png.stat().st_size > 1000
    (ppo_dir / "metrics.jsonl").write_text('{"kl": 1, "gold_score": 0.2}\n{"kl": "x", "gold_score": 0.2}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl:2: 'kl' and 'gold_score' must be numbers"):
        dpo.read_ppo_points(str(ppo_dir))
    with pytest.raises(ConfigError, match="not found"):
        dpo.read_ppo_points(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- command line, end to end

def tiny_sft_checkpoint(tmp_path):
    """A tokenizer directory and a random 'SFT' checkpoint in train_gpt's layout."""
    tokenizer_dir = str(tmp_path / "tokenizer")
    save_tokenizer(tokenizer_dir, BYTE_RANKS, PATTERN, SPECIALS, name="tiny")
    model = tiny_model()
    path = str(tmp_path / "sft" / "model.pt")
    os.makedirs(os.path.dirname(path))
    atomic_save({"model": model.state_dict(), "config": asdict(model.config), "step": 0, "tokenizer": tokenizer_dir}, path)
    return path


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_cli_trains_kto_on_unpaired_data_and_saves_a_loadable_checkpoint(tmp_path):
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "kto.jsonl", dpo.pairs_to_unpaired(synthetic_records(40, seed=5)))
    out = str(tmp_path / "kto")
    summary = dpo.main(["--sft", checkpoint, "--data", data, "--loss", "kto", "--out", out, "--max-steps", "3",
                        "--eval-tasks", "4", "--max-new-tokens", "4", "--families", "arith", "--levels", "1",
                        "--device", "cpu", "--lr", "1e-3"])
    assert summary["steps"] == 3 and summary["beta"] == dpo.BETA["kto"]
    policy = summary["policy"]
    assert policy["kl"] != 0 and 0 <= policy["win_rate_vs_sft"] <= 1 and "mean_score" in summary["sft"]
    model, ckpt = model_from_checkpoint(os.path.join(out, "model.pt"))
    assert ckpt["stage"] == "kto" and ckpt["step"] == 3 and ckpt["tokenizer"] == str(tmp_path / "tokenizer")
    reference, _ = model_from_checkpoint(checkpoint)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert sum("loss" in r for r in records) == 3 and records[-1]["event"] == "eval"
    for name in ("eval.json", "dpo.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_cli_dpo_on_paired_data_split_by_prompt(tmp_path):
    """A paired file (read by reward.load_preferences) split into train and held-out prompts."""
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(48, seed=7))
    out = str(tmp_path / "dpo")
    summary = dpo.main(["--sft", checkpoint, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8",
                        "--lr", "2e-3", "--eval-tasks", "0", "--device", "cpu"])
    assert summary["train_examples"] + summary["val_pairs"] == 48 and summary["val_pairs"] >= 1
    assert summary["preferences"]["val_logratio_accuracy"] > 0.5
    assert "policy" not in summary


def run_cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dpo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    checkpoint = tiny_sft_checkpoint(tmp_path)
    kto_file = write_jsonl(tmp_path / "kto.jsonl", dpo.pairs_to_unpaired(synthetic_records(4, seed=5)))
    out = str(tmp_path / "out")
    assert "--beta" in run_cli_error(["--sft", checkpoint, "--data", kto_file, "--beta", "-1", "--out", out], capsys)
    assert "--sft" in run_cli_error(["--sft", str(tmp_path / "nope.pt"), "--out", out], capsys)
    assert "--beta-sweep" in run_cli_error(["--sft", checkpoint, "--beta-sweep", "0,1", "--out", out], capsys)
    assert "--ppo-run" in run_cli_error(["--sft", checkpoint, "--ppo-run", out, "--out", out], capsys)
    err = run_cli_error(["--sft", checkpoint, "--data", kto_file, "--loss", "dpo", "--out", out], capsys)
    assert kto_file in err and "--loss kto" in err


def test_cli_beta_sweep_writes_the_frontier_with_ppo_points(tmp_path):
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(24, seed=8))
    ppo_dir = tmp_path / "ppo"
    ppo_dir.mkdir()
    write_jsonl(ppo_dir / "metrics.jsonl", [{"iteration": i, "kl": 0.5 * i, "gold_score": 0.1 * i} for i in range(3)])
    out = str(tmp_path / "sweep")
    by_method = dpo.main(["--sft", checkpoint, "--data", data, "--out", out, "--beta-sweep", "0.1,1", "--ppo-run",
                          str(ppo_dir), "--max-steps", "2", "--eval-tasks", "3", "--max-new-tokens", "4",
                          "--families", "arith", "--levels", "1", "--device", "cpu", "--lr", "1e-3"])
    assert [p["beta"] for p in by_method["DPO"]] == [0.1, 1.0] and len(by_method["PPO"]) == 3
    assert by_method["SFT"][0]["kl"] == 0.0
    for name in ("frontier.png", "frontier.json", "beta_0.1/model.pt", "beta_1/eval.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_ipo_loss_and_rewards_by_hand():
    """IPO on its own (the IPO test above also compares it with DPO): loss, implicit rewards, accuracy."""
    beta = 0.25
    loss, chosen_rewards, rejected_rewards, accuracy = dpo.ipo_loss(
        *tensors(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED), beta=beta)
    chosen = [pw - rw for pw, rw in zip(POLICY_CHOSEN, REFERENCE_CHOSEN)]        # 1, −1.5, 0.75
    rejected = [pl - rl for pl, rl in zip(POLICY_REJECTED, REFERENCE_REJECTED)]  # −1, 1.5, −0.5
    assert loss.item() == pytest.approx(sum((w - l - 1 / (2 * beta)) ** 2 for w, l in zip(chosen, rejected)) / 3)
    assert chosen_rewards.item() == pytest.approx(beta * sum(chosen) / 3)
    assert rejected_rewards.item() == pytest.approx(beta * sum(rejected) / 3)
    assert accuracy.item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- the stage: skip, resume

def test_a_finished_run_is_skipped_until_a_flag_or_an_input_changes(tmp_path, capsys):
    from train_gpt import read_stage
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(24, seed=7))
    out = tmp_path / "dpo"

    def run(*extra):
        capsys.readouterr()
        summary = dpo.main(["--sft", checkpoint, "--data", data, "--out", str(out), "--max-steps", "2",
                            "--eval-tasks", "0", "--device", "cpu", *extra])
        return summary, "holds a finished run" in capsys.readouterr().out, read_stage(str(out))["fingerprint"]

    first, skipped, fingerprint = run()
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert not skipped and run("--log-every", "1") == (first, True, fingerprint)  # a runtime flag: skipped
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    _, skipped, other = run("--lr", "1e-4")  # another flag: trained again
    assert not skipped and other != fingerprint
    write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(24, seed=8))  # new comparisons
    _, skipped, changed = run("--lr", "1e-4")
    assert not skipped and changed != other
    atomic_save({**torch.load(checkpoint, weights_only=True), "step": 1}, checkpoint)  # a new SFT model.pt
    assert not run("--lr", "1e-4")[1]


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_an_interrupted_run_resumes_to_the_same_policy_without_recomputing_the_reference(loss, tmp_path,
                                                                                         monkeypatch, capsys):
    from conftest import interrupt_on_call, without_timings
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(48, seed=7))
    flags = ["--sft", checkpoint, "--data", data, "--loss", loss, "--epochs", "2", "--batch-size", "8",
             "--lr", "2e-3", "--eval-tasks", "2", "--max-new-tokens", "4", "--device", "cpu"]
    expected = dpo.main([*flags, "--out", str(tmp_path / "straight")])
    assert expected["steps"] >= 8
    interrupt_on_call(monkeypatch, dpo, "train_step", 8)  # Ctrl-C during step 8
    with pytest.raises(KeyboardInterrupt):
        dpo.main([*flags, "--out", str(tmp_path / "interrupted")])
    monkeypatch.undo()
    for name in ("cache_reference_logprobs", "sft_baseline"):  # both come with the resume point
        monkeypatch.setattr(dpo, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran again after the resume"))
    capsys.readouterr()
    summary = dpo.main([*flags, "--out", str(tmp_path / "interrupted")])
    assert "resuming" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("straight", "interrupted"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [dpo.read_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("straight", "interrupted")]
    assert without_timings(records[0]) == without_timings(records[1])
    assert [r["step"] for r in records[1] if "loss" in r] == list(range(1, expected["steps"] + 1))
    ignore = ("wall_seconds", "train_seconds")
    assert {k: v for k, v in summary.items() if k not in ignore} == {k: v for k, v in expected.items() if k not in ignore}


def test_a_preference_set_built_into_out_is_output_not_input(tmp_path, monkeypatch):
    """Without preference files, dpo.py samples a set into --out: a second run must still be
    skipped (the set is the stage's own product), and a changed flag must build a new set."""
    import reward
    from train_gpt import read_stage
    monkeypatch.setattr(reward, "judge", lambda task, text: sum(map(ord, text)) % 7 / 6)  # distinct scores
    checkpoint = tiny_sft_checkpoint(tmp_path)
    out = tmp_path / "dpo"
    flags = ["--sft", checkpoint, "--out", str(out), "--num-prompts", "12", "--val-fraction", "0.25", "--k", "4",
             "--max-new-tokens", "4", "--max-steps", "1", "--eval-tasks", "0", "--device", "cpu"]
    dpo.main(flags)
    built, fingerprint = (out / "preferences_train.jsonl").read_text(), read_stage(str(out))["fingerprint"]
    stamp = (out / "model.pt").stat().st_mtime_ns
    dpo.main(flags)
    assert read_stage(str(out))["fingerprint"] == fingerprint and (out / "model.pt").stat().st_mtime_ns == stamp
    dpo.main([*flags, "--label-noise", "0.4"])  # another labeler: the set is built again
    assert (out / "preferences_train.jsonl").read_text() != built


def test_rounds_learn_from_the_previous_policys_own_samples_and_resume(tmp_path, monkeypatch):
    """--rounds 3: round r ≥ 2 starts from round r − 1's policy, takes it as π_ref, and learns from
    comparisons of that policy's samples; out/model.pt is the last round's; an interrupted run
    continues to the same weights, and a finished one is skipped."""
    import reward
    from conftest import interrupt_on_call
    monkeypatch.setattr(reward, "judge", lambda task, text: sum(map(ord, text)) % 7 / 6)  # distinct scores
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(24, seed=7))
    flags = ["--sft", checkpoint, "--data", data, "--rounds", "3", "--round-prompts", "8", "--k", "4",
             "--max-new-tokens", "4", "--max-steps", "2", "--lr", "1e-3", "--eval-tasks", "2", "--families", "arith",
             "--levels", "1", "--device", "cpu"]
    samplers = []
    build = dpo.build_default_preferences
    monkeypatch.setattr(dpo, "build_default_preferences", lambda policy, *a: samplers.append(
        {k: v.clone() for k, v in policy.state_dict().items()}) or build(policy, *a))
    straight = tmp_path / "straight"
    summary = dpo.main([*flags, "--out", str(straight)])
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3] and summary["policy"]["kl"] >= 0
    assert summary["rounds"][1]["train_file"] == str(straight / "round_2" / "preferences_train.jsonl")
    assert len(samplers) == 2
    for r, sampled_by in zip((2, 3), samplers):
        previous = torch.load(straight / f"round_{r - 1}" / "model.pt", weights_only=True)
        assert all(torch.equal(sampled_by[k], previous["model"][k]) for k in sampled_by)
        this = torch.load(straight / f"round_{r}" / "model.pt", weights_only=True)
        assert this["dpo"]["sft"] == str(straight / f"round_{r - 1}" / "model.pt")  # π_ref
    last, final = (torch.load(p, weights_only=True) for p in (straight / "round_3" / "model.pt", straight / "model.pt"))
    assert all(torch.equal(last["model"][k], final["model"][k]) for k in last["model"])
    assert not torch.equal(final["model"]["lm_head.weight"], torch.load(checkpoint, weights_only=True)["model"]["lm_head.weight"])
    merged = dpo.read_metrics(str(straight / "metrics.jsonl"))
    assert [r["step"] for r in merged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["round"] for r in merged if "loss" in r] == [1, 1, 2, 2, 3, 3]
    assert os.path.getsize(straight / "dpo.png") > 0

    stamp = (straight / "model.pt").stat().st_mtime_ns
    assert dpo.main([*flags, "--out", str(straight)]) == json.loads((straight / "eval.json").read_text())
    assert (straight / "model.pt").stat().st_mtime_ns == stamp  # finished: skipped

    interrupt_on_call(monkeypatch, dpo, "train_step", 4)  # round 2's second step
    with pytest.raises(KeyboardInterrupt):
        dpo.main([*flags, "--out", str(tmp_path / "interrupted")])
    monkeypatch.undo()
    monkeypatch.setattr(reward, "judge", lambda task, text: sum(map(ord, text)) % 7 / 6)
    resumed = dpo.main([*flags, "--out", str(tmp_path / "interrupted")])
    again = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)
    assert all(torch.equal(again["model"][k], final["model"][k]) for k in final["model"])
    assert resumed["policy"]["gold_score"] == summary["policy"]["gold_score"]


def test_rounds_already_trained_survive_another_round_count_and_a_new_round_1_resamples(tmp_path, monkeypatch):
    """A finished round is a stage of its own: asking for one more round (or another --round-prompts)
    trains only what is new, to the weights a straight run gives; a changed β retrains round 1, and
    round 2 then samples its comparisons afresh from the new round-1 policy instead of reusing the
    files the old one sampled."""
    import reward
    monkeypatch.setattr(reward, "judge", lambda task, text: sum(map(ord, text)) % 7 / 6)  # distinct scores
    checkpoint = tiny_sft_checkpoint(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_records(24, seed=7))
    flags = ["--sft", checkpoint, "--data", data, "--round-prompts", "8", "--k", "4", "--max-new-tokens", "4",
             "--max-steps", "2", "--lr", "1e-3", "--eval-tasks", "0", "--families", "arith", "--levels", "1",
             "--device", "cpu"]
    samplers = []
    build = dpo.build_default_preferences
    monkeypatch.setattr(dpo, "build_default_preferences", lambda policy, *a: samplers.append(
        {k: v.clone() for k, v in policy.state_dict().items()}) or build(policy, *a))
    weights = lambda path: torch.load(path, weights_only=True)["model"]  # noqa: E731
    straight = tmp_path / "straight"
    dpo.main([*flags, "--rounds", "3", "--out", str(straight)])
    grown = tmp_path / "grown"
    dpo.main([*flags, "--rounds", "2", "--out", str(grown)])
    stamps = [(grown / f"round_{r}" / "model.pt").stat().st_mtime_ns for r in (1, 2)]
    samplers.clear()
    dpo.main([*flags, "--rounds", "3", "--out", str(grown)])
    assert [(grown / f"round_{r}" / "model.pt").stat().st_mtime_ns for r in (1, 2)] == stamps  # kept
    assert len(samplers) == 1  # round 3's comparisons only
    final, expected = weights(grown / "model.pt"), weights(straight / "model.pt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)

    origin = grown / "round_2" / "comparisons.json"
    kept, old_round_1 = json.loads(origin.read_text())["origin"], weights(grown / "round_1" / "model.pt")
    samplers.clear()
    dpo.main([*flags, "--rounds", "2", "--beta", "0.3", "--out", str(grown)])
    new_round_1 = weights(grown / "round_1" / "model.pt")
    assert not torch.equal(new_round_1["lm_head.weight"], old_round_1["lm_head.weight"])
    assert len(samplers) == 1 and all(torch.equal(samplers[0][k], new_round_1[k]) for k in samplers[0])
    assert json.loads(origin.read_text())["origin"] != kept
    assert json.loads(origin.read_text())["sampled_by"] == str(grown / "round_1" / "model.pt")


def test_cli_net_wins_drops_a_cycle_of_verdicts(tmp_path):
    records = [{"prompt": p, "chosen": w, "rejected": l} for p, w, l in
               [("cycle", "aa", "bb"), ("cycle", "bb", "cc"), ("cycle", "cc", "aa"),
                ("order", "xx", "yy"), ("order", "xx", "zz"), ("order", "zz", "yy")]]
    data, val = write_jsonl(tmp_path / "prefs.jsonl", records), write_jsonl(tmp_path / "val.jsonl", records[3:])
    summary = dpo.main(["--sft", tiny_sft_checkpoint(tmp_path), "--data", data, "--val-data", val, "--out",
                        str(tmp_path / "dpo"), "--max-steps", "1", "--eval-tasks", "0", "--device", "cpu",
                        "--label-aggregation", "net-wins"])
    assert summary["train_examples"] == 3
