"""Tests for reward.py: the Bradley–Terry loss, rankings → pairs, the simulated labeler, the
scalar-head model and padding, preference JSONL formats and their errors, the reward shift, and
a reward model that must learn an easy synthetic preference.

Everything runs on CPU with a byte-level tokenizer built here (256 byte tokens + the special
tokens) and a tiny randomly initialised GPT as the "SFT" model.
"""

import json
import math
import random
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

import reward
from data.tasks import Task
from data.tokenizer import SPECIAL_TOKENS, save_tokenizer
from sft import chat_tokens, render_chat, render_prompt
from train_gpt import GPT, ConfigError, GPTConfig, atomic_save

PATTERN = r"""\s?\S+|\s+"""
RANKS = {bytes([i]): i for i in range(256)}
SPECIALS = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
ENC = tiktoken.Encoding("tiny", pat_str=PATTERN, mergeable_ranks=RANKS, special_tokens=SPECIALS)
PAD = chat_tokens(ENC).pad


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt(block_size=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


def tiny_reward_model(seed=0):
    return reward.reward_model_from_gpt(tiny_gpt(seed=seed))


def tiny_sft_checkpoint(tmp_path):
    """A tokenizer directory and a randomly initialised GPT saved in the SFT checkpoint layout."""
    tokenizer_dir = str(tmp_path / "tokenizer")
    save_tokenizer(tokenizer_dir, RANKS, PATTERN, SPECIALS, name="tiny")
    model = tiny_gpt()
    path = str(tmp_path / "sft.pt")
    atomic_save({"model": model.state_dict(), "config": asdict(model.config), "step": 0,
                 "tokenizer": tokenizer_dir, "stage": "sft"}, path)
    return path


def ids_of(prompt_text, response_text):
    messages = [{"role": "user", "content": prompt_text}]
    prompt = render_prompt(messages, ENC)
    full = render_chat(messages + [{"role": "assistant", "content": response_text}], ENC)[0]
    return prompt, full[len(prompt):]


# ----------------------------------------------------------------------------- the loss (3.3)

def test_loss_and_probability_match_hand_computation():
    r_chosen = torch.tensor([2.0, 0.0, -1.0])
    r_rejected = torch.tensor([0.5, 0.0, 1.0])
    differences = [1.5, 0.0, -2.0]
    sigmoid = [1 / (1 + math.exp(-d)) for d in differences]
    assert torch.allclose(reward.preference_probability(r_chosen, r_rejected), torch.tensor(sigmoid))
    expected = sum(math.log(1 + math.exp(-d)) for d in differences) / 3   # −log σ(d) = log(1 + e^{−d})
    assert reward.bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    # Equal rewards: P = ½ and the loss is ln 2.
    assert reward.bradley_terry_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))


def test_margin_and_weights():
    r_chosen, r_rejected = torch.tensor([2.0, 1.0]), torch.tensor([0.5, 1.5])
    # A margin m shifts the difference: −log σ(r_w − r_l − m).
    expected = (math.log(1 + math.exp(-(1.5 - 1.0))) + math.log(1 + math.exp(-(-0.5 - 1.0)))) / 2
    assert reward.bradley_terry_loss(r_chosen, r_rejected, margin=1.0).item() == pytest.approx(expected, rel=1e-6)
    per_pair = torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(-(-0.5 - 2.0)))) / 2
    assert reward.bradley_terry_loss(r_chosen, r_rejected, margin=per_pair).item() == pytest.approx(expected, rel=1e-6)
    # Weights: Σ w ℓ / Σ w.
    losses = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(0.5))]
    weighted = reward.bradley_terry_loss(r_chosen, r_rejected, weights=torch.tensor([1.0, 3.0])).item()
    assert weighted == pytest.approx((losses[0] + 3 * losses[1]) / 4, rel=1e-6)


def test_loss_is_stable_and_its_gradient_is_sigmoid_minus_one():
    r_chosen = torch.tensor([-200.0, 0.3], requires_grad=True)
    loss = reward.bradley_terry_loss(r_chosen, torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx((200 + math.log(1 + math.exp(-0.3))) / 2, rel=1e-6)
    loss.backward()
    # ∂/∂r_w of −log σ(d) is σ(d) − 1, divided by the 2 pairs of the mean.
    expected = torch.tensor([torch.sigmoid(torch.tensor(-200.0)) - 1, torch.sigmoid(torch.tensor(0.3)) - 1]) / 2
    assert torch.allclose(r_chosen.grad, expected)


def test_noisy_loss_is_the_flip_likelihood_by_hand():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.5, 0.0, 1.0])
    noise = 0.2
    # P(label) = (1 − ε)·σ(d) + ε·(1 − σ(d)): the labeler reports the true order or flips it.
    p_label = [(1 - noise) / (1 + math.exp(-d)) + noise * (1 - 1 / (1 + math.exp(-d))) for d in (1.5, 0.0, -2.0)]
    expected = -sum(math.log(p) for p in p_label) / 3
    assert reward.noisy_bradley_terry_loss(r_chosen, r_rejected, noise).item() == pytest.approx(expected, rel=1e-6)
    weighted = reward.noisy_bradley_terry_loss(r_chosen, r_rejected, noise, weights=torch.tensor([1.0, 0.0, 3.0]))
    assert weighted.item() == pytest.approx(-(math.log(p_label[0]) + 3 * math.log(p_label[2])) / 4, rel=1e-6)
    # ε = 0 is plain Bradley–Terry.
    plain = sum(math.log(1 + math.exp(-d)) for d in (1.5, 0.0, -2.0)) / 3
    assert reward.noisy_bradley_terry_loss(r_chosen, r_rejected, 0.0).item() == pytest.approx(plain, rel=1e-6)


def test_noisy_loss_is_bounded_where_plain_bradley_terry_pulls_hardest():
    # A label that contradicts a confident r_φ (d = −30): plain BT's loss is ≈ 30 and its gradient −1;
    # the flip likelihood's loss stays at −log ε and its gradient vanishes.
    r_chosen = torch.tensor([-30.0], requires_grad=True)
    loss = reward.noisy_bradley_terry_loss(r_chosen, torch.tensor([0.0]), 0.2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(0.2), rel=1e-6)
    loss.backward()
    assert abs(r_chosen.grad.item()) < 1e-10
    # Where r_φ is unsure (d = 0) it pulls with (1 − 2ε)·σ'(0)/P = 0.6 · 0.25 / 0.5 = 0.3.
    r_chosen = torch.tensor([0.0], requires_grad=True)
    reward.noisy_bradley_terry_loss(r_chosen, torch.tensor([0.0]), 0.2).backward()
    assert r_chosen.grad.item() == pytest.approx(-0.3, rel=1e-6)


def test_pairwise_accuracy_counts_ties_as_half():
    assert reward.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.0])) == 0.625


# ----------------------------------------------------------------------------- comparisons (3.2)

def test_ranking_to_pairs_gives_every_ordered_pair():
    assert reward.ranking_to_pairs(["a", "b", "c"], [2, 0, 1]) == [("c", "a"), ("c", "b"), ("a", "b")]
    pairs = reward.ranking_to_pairs(list("abcd"), [3, 1, 0, 2])
    assert len(pairs) == 6 == math.comb(4, 2)
    position = {r: i for i, r in enumerate("dbac")}
    assert all(position[w] < position[l] for w, l in pairs)
    assert len(set(pairs)) == 6


def sample(response, gold):
    return {"response": response, "tokens": len(response), "gold": gold}


def test_labeler_drops_ties_and_records_the_clean_label():
    samples = [sample("4", 1.0), sample("5", 0.3), sample("4", 1.0), sample("", 0.0)]
    pairs = reward.label_comparisons([{"role": "user", "content": "2+2?"}], samples, 0.0, 0.0, random.Random(0))
    # 6 pairs minus the tie ("4" vs "4").
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("4", "5"), ("4", ""), ("4", "5"), ("4", ""), ("5", "")]
    assert all(p["clean_label"] == 1.0 and not p["flipped"] for p in pairs)


def test_label_noise_flips_pairs_and_length_bias_prefers_long_answers():
    samples = [sample("4", 1.0), sample("5", 0.3), sample("6 is what I would say", 0.3)]
    flipped = reward.label_comparisons([], samples, 1.0, 0.0, random.Random(0))
    assert all(p["flipped"] and p["clean_label"] == 0.0 for p in flipped)
    noisy = [p for seed in range(200)
             for p in reward.label_comparisons([], samples, 0.2, 0.0, random.Random(seed))]
    assert 0.12 < sum(p["flipped"] for p in noisy) / len(noisy) < 0.28
    # B = 0.1 per token: the long wrong answer (22 tokens) now beats the exact one; the gold tie
    # between the two wrong answers is broken by length, and its clean label says "equal".
    biased = reward.label_comparisons([], samples, 0.0, 0.1, random.Random(0))
    assert (biased[0]["chosen"], biased[0]["rejected"]) == ("6 is what I would say", "4")
    assert biased[0]["clean_label"] == 0.0
    assert {p["clean_label"] for p in biased if {p["chosen"], p["rejected"]} == {"5", "6 is what I would say"}} == {0.5}


def flip(record):
    """The labeler's verdict on one pair reversed, as label noise would write it."""
    return {**record, "chosen": record["rejected"], "rejected": record["chosen"], "flipped": not record["flipped"],
            "chosen_gold": record["rejected_gold"], "rejected_gold": record["chosen_gold"],
            "chosen_tokens": record["rejected_tokens"], "rejected_tokens": record["chosen_tokens"],
            "clean_label": 1.0 - record["clean_label"]}


def four_answers(flipped_pair):
    """a ≻ b ≻ c ≻ d by gold, all six comparisons, the one between `flipped_pair` reversed."""
    samples = [sample(r, g) for r, g in zip("abcd", (1.0, 0.75, 0.5, 0.0))]
    pairs = reward.label_comparisons([{"role": "user", "content": "?"}], samples, 0.0, 0.0, random.Random(0))
    return [flip(p) if {p["chosen"], p["rejected"]} == set(flipped_pair) else p for p in pairs]


def oriented(pairs):
    return {(p["chosen"], p["rejected"]) for p in pairs}


def test_net_wins_restores_a_flip_with_two_answers_between():
    # a ≻ d has b and c between them: net wins a 1, b 1, c −1, d −1 after the flip → restored;
    # the flip cost a and d their margins over b and c, which now tie and are dropped.
    pairs = reward.aggregate_comparisons(four_answers("ad"))
    assert oriented(pairs) == {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")}
    restored = next(p for p in pairs if p["chosen"] == "a" and p["rejected"] == "d")
    assert not restored["flipped"] and restored["clean_label"] == 1.0
    assert (restored["chosen_gold"], restored["rejected_gold"]) == (1.0, 0.0)
    assert all(not p["flipped"] and p["chosen_gold"] > p["rejected_gold"] for p in pairs)


def test_net_wins_drops_what_the_votes_tie_and_keeps_a_flip_between_neighbours():
    # One answer (b) between a and c: a, b, c all end at net 1, so their three pairs are dropped.
    assert oriented(reward.aggregate_comparisons(four_answers("ac"))) == {("a", "d"), ("b", "d"), ("c", "d")}
    # Neighbours: nothing separates b from c but their own (flipped) verdict, which stands.
    kept = reward.aggregate_comparisons(four_answers("bc"))
    assert ("c", "b") in oriented(kept) and len(kept) == 6
    assert next(p for p in kept if p["chosen"] == "c")["flipped"]


def test_net_wins_counts_within_a_prompt_and_beats_the_raw_labels_under_noise():
    rng = random.Random(0)
    raw = []
    for prompt in range(300):
        samples = [sample(f"answer {i}", rng.random()) for i in range(8)]  # the same texts in every prompt
        raw += reward.label_comparisons([{"role": "user", "content": f"q{prompt}"}], samples, 0.2, 0.0, rng)
    aggregated = reward.aggregate_comparisons(raw)
    raw_agreement, aggregated_agreement = reward.label_agreement(raw), reward.label_agreement(aggregated)
    assert 0.77 < raw_agreement < 0.83
    assert aggregated_agreement > raw_agreement + 0.05
    assert all(p["flipped"] == (p["clean_label"] == 0.0) for p in aggregated)
    assert 0.85 * len(raw) < len(aggregated) <= len(raw)


def fake_judge(task, text):
    """Distinct scores for random text (the real judge gives a random model's nonsense 0)."""
    return sum(map(ord, text)) % 7 / 6


def test_build_preference_data_samples_k_per_prompt(monkeypatch):
    monkeypatch.setattr(reward, "judge", fake_judge)
    tasks = [Task("arith", "What is 1 + 2?", "3"), Task("arith", "What is 2 + 2?", "4")]
    pairs, samples = reward.build_preference_data(tiny_gpt(), ENC, tasks, k=3, label_noise=0.0, max_new_tokens=6,
                                                  seed=0)
    assert len(samples) == 6 and all(s["tokens"] <= 6 for s in samples)
    assert [s["prompt"][0]["content"] for s in samples] == ["What is 1 + 2?"] * 3 + ["What is 2 + 2?"] * 3
    assert 0 < len(pairs) <= 6
    for p in pairs:
        assert fake_judge(None, p["chosen"]) > fake_judge(None, p["rejected"])  # the judge's order, no noise


# ----------------------------------------------------------------------------- the model (3.3)

def test_reward_model_keeps_the_backbone_and_adds_a_fresh_scalar_head():
    gpt = tiny_gpt()
    model = reward.reward_model_from_gpt(gpt)
    assert isinstance(model.backbone.lm_head, torch.nn.Identity)
    assert not any(k.startswith("backbone.lm_head") for k in model.state_dict())
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, gpt.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (1, 32) and torch.all(model.head.bias == 0)
    torch.manual_seed(0)
    big = reward.RewardModel(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=1023))
    assert big.head.weight.std().item() == pytest.approx(1 / math.sqrt(1024), rel=0.1)


def test_padding_never_changes_a_reward():
    model = tiny_reward_model().eval()
    short = ids_of("Hi", "Hello")
    long = ids_of("A much longer question here?", "And a much longer answer too.")
    alone = reward.score(model, [short[0]], [short[1]])
    batched = reward.score(model, [long[0], short[0], long[0]], [long[1], short[1], long[1]])
    assert torch.allclose(alone, batched[1:2], atol=1e-5)
    # Whatever fills the padding (and however much of it there is), the reward is the same.
    sequence = torch.tensor(short[0] + short[1])
    rows = torch.stack([torch.cat([sequence, torch.full((9,), PAD)]),
                        torch.cat([sequence, torch.randint(0, 256, (9,))])])
    end = torch.tensor([len(sequence) - 1] * 2)
    rewards = model(rows, end)
    assert torch.allclose(rewards, alone.expand(2), atol=1e-5)


def test_reward_is_read_at_the_last_real_token():
    model = tiny_reward_model().eval()
    prompt, response = ids_of("Q", "yes")
    full = torch.tensor([prompt + response])
    hidden = model.backbone.hidden_states(full)
    expected = model.head(hidden[0, -1]).squeeze()
    assert response[-1] == chat_tokens(ENC).end
    assert torch.allclose(reward.score(model, [prompt], [response]), expected, atol=1e-6)


def test_reward_shift_makes_the_mean_zero_and_keeps_differences():
    model = tiny_reward_model().eval()
    with torch.no_grad():
        model.head.bias.fill_(3.0)  # an offset Bradley–Terry cannot see
    pairs = [ids_of(f"Question {i}?", "answer " * (i % 4)) for i in range(10)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    before = reward.score(model, prompts, responses)
    assert before.mean().item() > 1
    shift = reward.center_rewards(model, prompts, responses, batch_size=3)
    after = reward.score(model, prompts, responses)
    assert abs(after.mean().item()) < 1e-5
    assert shift == pytest.approx(before.mean().item(), abs=1e-5)
    assert torch.allclose(after[:, None] - after[None], before[:, None] - before[None], atol=1e-5)


def test_an_ensemble_scores_by_the_members_mean_or_min(tmp_path):
    """Seed 3.5, prevention 3: r = mean_m r_φm or min_m r_φm, per response, each member's shift applied."""
    members = [tiny_reward_model(seed=s).eval() for s in (0, 1, 2)]
    with torch.no_grad():
        members[1].reward_shift.fill_(0.5)
    pairs = [ids_of(f"Question {i}?", "answer " * (i % 3)) for i in range(6)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    each = torch.stack([reward.score(m, prompts, responses) for m in members])
    assert (each.max(0).values - each.min(0).values).min() > 1e-3   # the members disagree
    for reduce, expected in (("mean", each.mean(0)), ("min", each.min(0).values)):
        ensemble = reward.RewardEnsemble(members, reduce)
        assert torch.allclose(reward.score(ensemble, prompts, responses, batch_size=4), expected, atol=1e-6)
    paths = []
    for i, m in enumerate(members):
        paths.append(str(tmp_path / f"rm{i}.pt"))
        atomic_save({"model": m.state_dict(), "config": asdict(m.config), "stage": "reward"}, paths[-1])
    loaded = reward.load_reward_models(",".join(paths), reduce="min")
    assert isinstance(loaded, reward.RewardEnsemble) and len(loaded.members) == 3
    assert torch.allclose(reward.score(loaded, prompts, responses), each.min(0).values, atol=1e-6)
    assert isinstance(reward.load_reward_models(paths[0]), reward.RewardModel)
    with pytest.raises(ValueError, match="mean or min"):
        reward.RewardEnsemble(members, "median")


# ----------------------------------------------------------------------------- batches

def test_batches_keep_a_prompts_pairs_together_and_score_each_response_once():
    pairs = [{"prompt": [{"role": "user", "content": "Q1"}], "chosen": w, "rejected": l}
             for w, l in reward.ranking_to_pairs(list("abcd"), [0, 1, 2, 3])]
    pairs += [{"prompt": [{"role": "user", "content": "Q2"}], "chosen": "y", "rejected": "n", "clean_label": 0.0}]
    examples, dropped = reward.tokenize_preferences(pairs, ENC, 64)
    assert dropped == 0
    batches = reward.preference_batches(examples, batch_size=1, pad_token=PAD, seed=1)
    sizes = sorted(len(b.chosen) for b in batches)
    assert sizes == [1, 6]
    big = next(b for b in batches if len(b.chosen) == 6)
    assert big.ids.shape[0] == 4  # 4 distinct responses for 6 comparisons
    assert torch.allclose(big.weights, torch.full((6,), 1 / 6))
    assert torch.isnan(big.clean_label).all()
    small = next(b for b in batches if len(b.chosen) == 1)
    assert small.weights.tolist() == [1.0] and small.clean_label.tolist() == [0.0]
    flat = reward.preference_batches(examples, batch_size=2, pad_token=PAD, weighting="pair")[0]
    assert flat.weights.tolist() == [1.0] * 7


# ----------------------------------------------------------------------------- JSONL formats

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_pair_formats_parse_to_the_same_pair(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]},
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    ]
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    pairs = reward.load_preferences(path)
    assert pairs == [{"prompt": [user], "chosen": "4", "rejected": "5"}] * 4


def test_rankings_expand_to_all_pairs_and_files_round_trip(tmp_path):
    record = {"prompt": "Sort 3 1 2", "responses": ["1 2 3", "3 2 1", "1 3 2"], "ranking": [0, 2, 1], "id": 7}
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(record)])
    pairs = reward.load_preferences(path)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("1 2 3", "1 3 2"), ("1 2 3", "3 2 1"), ("1 3 2", "3 2 1")]
    assert all(p["id"] == 7 for p in pairs)
    copy = str(tmp_path / "copy.jsonl")
    reward.write_preferences(copy, pairs)
    assert reward.load_preferences(copy) == pairs


BAD_LINES = [
    ('{"prompt": "x", "chosen": "a"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"question": "x", "answer": "a"}', "unknown format"),
    ('{"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]}', "'ranking' must list every index"),
    ('{"prompt": "x", "responses": ["a"], "ranking": [0]}', "at least 2 responses"),
    ('{"prompt": "x", "ranking": [0, 1]}', "needs 'responses'"),
    ('{"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "single assistant message"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}', "expected a user turn"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' must be a string or a non-empty list"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: z\\n\\nAssistant: c"}', "share every turn"),
    ('{"chosen": "just text", "rejected": "more text"}', "HH-RLHF transcript"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "clean_label": 2}', "'clean_label' must be"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "chosen": "a", "rejected": "b"}', "", line])
    with pytest.raises(ConfigError) as error:
        reward.load_preferences(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_empty_file_and_too_long_pair_are_errors(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ConfigError, match="no preference pairs"):
        reward.load_preferences(empty)
    long = write_lines(tmp_path / "long.jsonl", ['{"prompt": "ok", "chosen": "a", "rejected": "b"}',
                                                 json.dumps({"prompt": "x", "chosen": "a" * 80, "rejected": "b"})])
    with pytest.raises(ConfigError, match=r"long.jsonl:2: prompt \+ chosen response is \d+ tokens"):
        reward.load_preferences(long, ENC, 64)


# ----------------------------------------------------------------------------- the command line

def synthetic_preferences(n, rng):
    """An easy preference: the chosen response contains an "x", the rejected one does not."""
    records = []
    for i in range(n):
        letters = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 8))]
        chosen = letters[:]
        chosen.insert(rng.randint(0, len(chosen)), "x")
        rejected = [rng.choice("abcdefgh") for _ in range(rng.randint(4, 9))]
        records.append({"prompt": f"Pick {i % 60}", "chosen": "".join(chosen), "rejected": "".join(rejected),
                        "clean_label": 1.0})
    return records


def test_reward_model_learns_an_easy_preference_end_to_end(tmp_path, monkeypatch):
    rng = random.Random(0)
    train, val = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    reward.write_preferences(train, synthetic_preferences(240, rng))
    reward.write_preferences(val, synthetic_preferences(100, rng))
    out = tmp_path / "rm"
    summary = reward.main(["--sft", tiny_sft_checkpoint(tmp_path), "--out", str(out), "--data", train,
                           "--val-data", val, "--epochs", "2", "--batch-size", "4", "--lr", "3e-3",
                           "--eval-prompts", "4", "--k", "2", "--max-new-tokens", "4", "--device", "cpu"])
    assert summary["val_accuracy"] >= 0.9 and summary["val_clean_accuracy"] == summary["val_accuracy"]
    for name in ["model.pt", "metrics.jsonl", "eval.json", "reward_training.png", "calibration.png",
                 "reward_histogram.png"]:
        assert (out / name).exists(), name
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert checkpoint["stage"] == "reward" and checkpoint["val_accuracy"] >= 0.5
    assert checkpoint["reward_shift"] == pytest.approx(checkpoint["model"]["reward_shift"].item())
    model = reward.load_reward_model(str(out / "model.pt"), "cpu")
    # The shift centres rewards on the training responses.
    pairs = reward.load_preferences(train)
    samples = {(p["prompt"][0]["content"], p[f]) for p in pairs for f in ("chosen", "rejected")}
    ids = [ids_of(prompt, text) for prompt, text in samples]
    rewards = reward.score(model, [x for x, _ in ids], [y for _, y in ids])
    assert abs(rewards.mean().item()) < 1e-4
    # And the loaded model ranks held-out pairs as the run reported.
    val_ids = [(ids_of(p["prompt"][0]["content"], p["chosen"]), ids_of(p["prompt"][0]["content"], p["rejected"]))
               for p in reward.load_preferences(val)]
    r_w = reward.score(model, [c[0] for c, _ in val_ids], [c[1] for c, _ in val_ids])
    r_l = reward.score(model, [r[0] for _, r in val_ids], [r[1] for _, r in val_ids])
    assert reward.pairwise_accuracy(r_w, r_l) == pytest.approx(summary["val_accuracy"])


def test_default_data_is_sampled_ranked_and_written(tmp_path, monkeypatch):
    # A random "SFT" model answers nonsense that the real judge scores 0 (all ties); a fake
    # judge gives the samples distinct scores so that comparisons exist.
    monkeypatch.setattr(reward, "judge", fake_judge)
    out = tmp_path / "rm"
    summary = reward.main(["--sft", tiny_sft_checkpoint(tmp_path), "--out", str(out), "--num-prompts", "12",
                           "--k", "3", "--max-new-tokens", "6", "--eval-prompts", "3", "--epochs", "1",
                           "--label-noise", "0.2", "--device", "cpu"])
    train = reward.load_preferences(str(out / "preferences_train.jsonl"))
    val = reward.load_preferences(str(out / "preferences_val.jsonl"))
    assert train and val and summary["train_pairs"] == len(train) and summary["val_pairs"] == len(val)
    assert {p["prompt"][0]["content"] for p in train}.isdisjoint({p["prompt"][0]["content"] for p in val})
    for p in train + val:
        assert p["clean_label"] in (0.0, 1.0) and p["flipped"] == (p["clean_label"] == 0.0)
        assert p["chosen_gold"] == fake_judge(None, p["chosen"])
    assert 0 < summary["heldout_samples"] <= 9 and json.loads((out / "eval.json").read_text())["steps"] >= 1


@pytest.mark.parametrize("flags, message", [
    (["--label-noise", "0.7"], "--label-noise must be in [0, 0.5]"),
    (["--k", "1"], "--k must be ≥ 2"),
    (["--num-prompts", "1"], "--num-prompts must be ≥ 2"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--val-data", "x.jsonl"], "--val-data needs --data"),
    (["--families", "poetry"], "--families/--levels"),
])
def test_out_of_range_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        reward.main(["--sft", "missing.pt", "--out", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    bad_data = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "x"}'])
    sft_path = tiny_sft_checkpoint(tmp_path)
    cases = [(["--sft", str(corrupt)], "corrupt or not a checkpoint"),
             (["--sft", sft_path, "--data", bad_data], "bad.jsonl:1: unknown format"),
             (["--sft", sft_path, "--data", str(tmp_path / "none.jsonl")], "preference file not found")]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            reward.main([*flags, "--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="not a reward model checkpoint"):
        reward.load_reward_model(sft_path)


# ----------------------------------------------------------------------------- evaluation

def test_correlations_and_calibration_against_hand_computations():
    assert reward.average_ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]
    # Pearson of (1, 2, 3) and (2, 4, 7): deviations (−1, 0, 1) and (−7/3, −1/3, 8/3).
    assert reward.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx((7 / 3 + 8 / 3) / math.sqrt(2 * (49 + 1 + 64) / 9))
    assert reward.spearman([1, 2, 3], [2, 4, 70]) == pytest.approx(1.0)   # monotone: ranks agree exactly
    assert reward.pearson([1, 1, 1], [1, 2, 3]) is None
    assert reward.within_prompt([1.0, 3.0, 10.0, 14.0], [0, 0, 1, 1]).tolist() == [-1.0, 1.0, -2.0, 2.0]
    # Two prompts whose offsets disagree with gold: every prompt's own order is right.
    numbers = reward.correlations(np.array([5.0, 6.0, 0.0, 1.0]), np.array([0.0, 0.5, 0.5, 1.0]),
                                  np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1]))
    assert numbers["pearson_gold"] < 0 and numbers["pearson_gold_within_prompt"] == pytest.approx(1.0)
    assert numbers["spearman_gold_within_prompt"] == pytest.approx(1.0)
    assert reward.ranks_within_prompt([5.0, 1.0, 7.0, 7.0, 2.0], [0, 0, 1, 1, 1]).tolist() == [2.0, 1.0, 2.5, 2.5, 1.0]
    # Within prompt 0 the order is reversed, within prompt 1 it is right: ranks centred per prompt
    # are (+½, −½ | −1, 0, +1) for r_φ and (−½, +½ | −1, 0, +1) for gold → Pearson (−½ + 2) / (½ + 2).
    numbers = reward.correlations(np.array([2.0, 1.0, 0.0, 5.0, 9.0]), np.array([0.0, 1.0, 0.1, 0.2, 0.3]),
                                  np.array([1, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 1]))
    assert numbers["spearman_gold_within_prompt"] == pytest.approx(1.5 / 2.5)
    table, ece = reward.calibration_table(np.array([0.9, 0.9, 0.9, 0.9]), np.array([1.0, 1.0, 1.0, 0.0]), bins=10)
    # Both orders of each pair: p = 0.9 won 3 of 4, p = 0.1 won 1 of 4 → |0.75 − 0.9| = 0.15 in both bins.
    assert [(round(b["p_mean"], 6), b["observed"], b["count"]) for b in table] == [(0.1, 0.25, 4), (0.9, 0.75, 4)]
    assert ece == pytest.approx(0.15)


# ----------------------------------------------------------------------------- the stage: skip, resume

def test_a_finished_run_is_skipped_until_a_flag_or_an_input_changes(tmp_path, capsys):
    from train_gpt import read_stage
    rng = random.Random(0)
    train, val = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    reward.write_preferences(train, synthetic_preferences(40, rng))
    reward.write_preferences(val, synthetic_preferences(12, rng))
    sft_path, out = tiny_sft_checkpoint(tmp_path), tmp_path / "rm"

    def run(*extra):
        capsys.readouterr()
        summary = reward.main(["--sft", sft_path, "--out", str(out), "--data", train, "--val-data", val,
                               "--batch-size", "4", "--max-steps", "2", "--eval-prompts", "0", "--device", "cpu",
                               *extra])
        return summary, "holds a finished run" in capsys.readouterr().out, read_stage(str(out))["fingerprint"]

    first, skipped, fingerprint = run()
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert not skipped and run("--log-every", "1") == (first, True, fingerprint)  # a runtime flag: skipped
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    _, skipped, other = run("--lr", "1e-3")  # another flag: trained again
    assert not skipped and other != fingerprint
    assert run()[1:] == (False, fingerprint)  # and back
    torch.save({**torch.load(sft_path, weights_only=True), "step": 1}, sft_path)  # a new SFT model.pt
    assert not run()[1]
    reward.write_preferences(train, synthetic_preferences(40, random.Random(1)))  # new comparisons
    assert not run()[1]


def test_an_interrupted_run_resumes_without_sampling_again(tmp_path, monkeypatch, capsys):
    from conftest import interrupt_on_call, without_timings
    sft_path = tiny_sft_checkpoint(tmp_path)
    flags = ["--sft", sft_path, "--num-prompts", "12", "--k", "3", "--max-new-tokens", "6", "--eval-prompts", "3",
             "--epochs", "2", "--batch-size", "2", "--device", "cpu"]
    monkeypatch.setattr(reward, "judge", fake_judge)
    expected = reward.main([*flags, "--out", str(tmp_path / "straight")])
    assert expected["steps"] >= 8
    interrupt_on_call(monkeypatch, reward, "train_step", 8)  # Ctrl-C during step 8
    with pytest.raises(KeyboardInterrupt):
        reward.main([*flags, "--out", str(tmp_path / "interrupted")])
    monkeypatch.undo()
    monkeypatch.setattr(reward, "judge", fake_judge)
    monkeypatch.setattr(reward, "sample_responses", lambda *a, **k: pytest.fail("sampled again after the resume"))
    capsys.readouterr()
    summary = reward.main([*flags, "--out", str(tmp_path / "interrupted")])
    assert "resuming" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("straight", "interrupted"))
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [reward.read_metrics(str(tmp_path / name / "metrics.jsonl")) for name in ("straight", "interrupted")]
    assert without_timings(records[0]) == without_timings(records[1])
    assert [r["step"] for r in records[1] if "loss" in r] == list(range(1, expected["steps"] + 1))
    ignore = ("wall_seconds", "generation_seconds")
    assert {k: v for k, v in summary.items() if k not in ignore} == {k: v for k, v in expected.items() if k not in ignore}


def test_families_restrict_the_comparison_prompts(tmp_path, monkeypatch):
    seen = []

    def fake_build(policy, enc, tasks, *rest, **kwargs):
        seen.extend(tasks)
        return [], [{"gold": 0.0}]
    monkeypatch.setattr(reward, "build_preference_data", fake_build)
    args = reward.build_parser().parse_args(["--out", str(tmp_path), "--num-prompts", "40", "--families", "upper,reverse"])
    policy = type("Policy", (), {"config": type("Config", (), {"block_size": 64})})()
    reward.default_preference_data(policy, None, args, "cpu", None)
    assert len(seen) == 40 and {task.family for task in seen} == {"upper", "reverse"}


def test_cli_net_wins_trains_on_the_aggregated_pairs(tmp_path, capsys):
    """--label-aggregation net-wins: a prompt whose verdicts form a cycle (a ≻ b ≻ c ≻ a) has
    every net win at 0 and leaves no pair; a consistent prompt keeps its three."""
    def pair(prompt, chosen, rejected):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    records = [pair("cycle", "aa", "bb"), pair("cycle", "bb", "cc"), pair("cycle", "cc", "aa"),
               pair("order", "xx", "yy"), pair("order", "xx", "zz"), pair("order", "zz", "yy")]
    train, val = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    reward.write_preferences(train, records)
    reward.write_preferences(val, records[3:])
    summary = reward.main(["--sft", tiny_sft_checkpoint(tmp_path), "--out", str(tmp_path / "rm"), "--data", train,
                           "--val-data", val, "--max-steps", "1", "--eval-prompts", "0", "--device", "cpu",
                           "--label-aggregation", "net-wins"])
    assert summary["train_pairs"] == 3 and summary["train_prompts"] == 1
    assert "net-wins aggregation: 6 training pairs → 3" in capsys.readouterr().out
