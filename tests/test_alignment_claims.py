"""Tests for experiments/alignment_claims.py: the exact optimal policy, KL, label flipping and the FLOPs
count against hand computations; then each experiment end to end on a tiny source run (random tiny
models, a byte-level tokenizer, a few synthetic comparisons), writing its results, figure and claims.md
row, and served from its cached stages the second time."""

import json
import math
import os
import random
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

import reward
from data.tasks import generate_tasks
from data.tokenizer import SPECIAL_TOKENS, save_tokenizer
from experiments import alignment_claims as ac
from train_gpt import GPT, ConfigError, GPTConfig, atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PATTERN = r"""\s?\S+|\s+"""
RANKS = {bytes([i]): i for i in range(256)}
SPECIALS = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}


# ----------------------------------------------------------------------------- the equations, by hand

def test_optimal_policy_by_hand():
    # Two candidates, π_ref = (0.5, 0.5), r = (1, 0), β = 1: π* = (e, 1)/(e + 1).
    p = ac.optimal_policy(np.log([0.5, 0.5]), [1.0, 0.0], 1.0)
    assert p == pytest.approx([math.e / (1 + math.e), 1 / (1 + math.e)], rel=1e-12)
    # π_ref = (0.2, 0.3, 0.5) (unnormalised log-probs: any offset cancels), r = (0, 1, 2), β = 0.5:
    # weights 0.2·e⁰, 0.3·e², 0.5·e⁴, divided by their sum.
    w = np.array([0.2, 0.3 * math.exp(2), 0.5 * math.exp(4)])
    p = ac.optimal_policy(np.log([0.2, 0.3, 0.5]) - 7.0, [0.0, 1.0, 2.0], 0.5)
    assert p == pytest.approx(w / w.sum(), rel=1e-12)


def test_optimal_policy_limits_and_overflow():
    ref = np.log([0.7, 0.2, 0.1])
    assert ac.optimal_policy(ref, [0.0, 0.3, 0.9], 1e6) == pytest.approx([0.7, 0.2, 0.1], abs=1e-5)  # β → ∞: π_ref
    assert ac.optimal_policy(ref, [0.0, 0.3, 0.9], 1e-3) == pytest.approx([0, 0, 1], abs=1e-9)     # β → 0: argmax r
    p = ac.optimal_policy(ref, [1000.0, 0.0, 0.0], 0.01)   # r/β = 1e5 would overflow exp() without the shift
    assert np.isfinite(p).all() and p[0] == pytest.approx(1.0)


def test_optimal_policy_maximises_the_rlhf_objective():
    # Against random distributions on the same candidates, π* has the highest E_π[r] − β·KL(π ‖ π_ref).
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(5))
    r, beta = rng.normal(size=5), 0.7
    best = ac.optimal_policy(np.log(ref), r, beta)

    def objective(p):
        return float(p @ r) - beta * ac.kl_divergence(p, ref)
    assert all(objective(best) >= objective(rng.dirichlet(np.ones(5))) for _ in range(200))
    # ... and its value is β·log Z (the Lagrangian's closed form).
    assert objective(best) == pytest.approx(beta * math.log(float(ref @ np.exp(r / beta))), rel=1e-9)


def test_kl_divergence_by_hand():
    assert ac.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert ac.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))   # p = 0 terms vanish
    assert ac.kl_divergence([0.3, 0.7], [0.3, 0.7]) == 0.0


def test_restricted_policy_renormalises_over_the_candidates():
    assert ac.restricted_policy(np.log([0.1, 0.3])) == pytest.approx([0.25, 0.75])


def test_bradley_terry_labels_follow_the_sigmoid():
    rng = random.Random(0)
    wins = ac.bradley_terry_labels(1.0, 0.0, 20_000, rng)
    assert wins / 20_000 == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    assert ac.bradley_terry_labels(0.0, 0.0, 0, rng) == 0


def pair(i, clean=1.0):
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good{i}", "rejected": f"bad{i}",
            "clean_label": clean, "flipped": False, "chosen_gold": 1.0, "rejected_gold": 0.0,
            "chosen_tokens": 1, "rejected_tokens": 2}


def test_flip_labels_orients_by_the_judge_then_flips_the_share_asked():
    records = [pair(i) for i in range(2000)]
    records[0] = {**pair(0, 0.0), "chosen": "bad0", "rejected": "good0", "chosen_gold": 0.0, "rejected_gold": 1.0,
                  "chosen_tokens": 2, "rejected_tokens": 1}
    records.append(pair(9999, 0.5))  # a tie: dropped
    clean = ac.flip_labels(records, 0.0, seed=1)
    assert len(clean) == 2000 and all(r["chosen"].startswith("good") and r["clean_label"] == 1.0 for r in clean)
    assert clean[0]["chosen_gold"] == 1.0 and clean[0]["rejected_tokens"] == 2   # fields swapped with the texts
    noisy = ac.flip_labels(records, 0.3, seed=1)
    flipped = [r for r in noisy if r["flipped"]]
    assert len(flipped) / len(noisy) == pytest.approx(0.3, abs=0.03)
    assert all(r["chosen"].startswith("bad") and r["clean_label"] == 0.0 and r["chosen_gold"] == 0.0 for r in flipped)
    assert ac.flip_labels(records, 0.3, seed=1) == noisy                          # seeded
    with pytest.raises(ConfigError, match="clean_label"):
        ac.flip_labels([{"prompt": "x", "chosen": "a", "rejected": "b"}], 0.1, seed=0)


def test_flops_by_hand():
    # PPO, S = 100 tokens, N = 10, 4 epochs: forwards (generate, π_old, π_ref, r_φ, V) 5 × 2NS = 10,000,
    # trained (policy + critic) × 4 epochs × 6NS = 48,000.
    assert ac.ppo_flops(10, 100, 4) == 58_000
    assert ac.ppo_flops(10, 100, 4, with_reward_model=False, with_critic=False) == 3 * 2_000 + 4 * 6_000  # GRPO, judge
    assert ac.dpo_flops(10, trained_tokens=100, cached_tokens=120) == 2 * 10 * 120 + 6 * 10 * 100


def test_first_prompts_keeps_whole_prompts():
    records = [pair(i // 3) for i in range(12)]     # 4 prompts × 3 pairs
    assert len(ac.first_prompts(records, 4)) == 6    # the 2nd prompt is started, so it is kept whole
    assert len(ac.first_prompts(records, 100)) == 12


# ----------------------------------------------------------------------------- the experiments, tiny

def tiny_gpt(vocab_size, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))


def synthetic_pairs(n_prompts, split, seed):
    """Judge-ranked-looking comparisons: the right answer against a wrong one, 20 % flipped."""
    rng = random.Random(seed)
    records = []
    for task in generate_tasks(n_prompts, split, seed=seed, families=["reverse", "upper"]):
        for wrong in (task.answer[::-1] + "x", "no"):
            flipped = rng.random() < 0.2
            good, bad = task.answer, wrong
            records.append({"prompt": reward.task_messages(task), "chosen": bad if flipped else good,
                            "rejected": good if flipped else bad, "clean_label": 0.0 if flipped else 1.0,
                            "flipped": flipped, "chosen_gold": 0.0 if flipped else 1.0,
                            "rejected_gold": 1.0 if flipped else 0.0, "chosen_tokens": 3, "rejected_tokens": 3})
    return records


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny `make run` directory: tokenizer, sft/model.pt, reward/model.pt, reward/preferences_*.jsonl."""
    root = tmp_path_factory.mktemp("source")
    tokenizer_dir = str(root / "tokenizer")
    save_tokenizer(tokenizer_dir, RANKS, PATTERN, SPECIALS, name="tiny")
    vocab = tiktoken.Encoding("tiny", pat_str=PATTERN, mergeable_ranks=RANKS, special_tokens=SPECIALS).n_vocab
    os.makedirs(root / "sft")
    os.makedirs(root / "reward")
    policy = tiny_gpt(vocab, 0)
    atomic_save({"model": policy.state_dict(), "config": asdict(policy.config), "step": 0,
                 "tokenizer": tokenizer_dir, "stage": "sft"}, str(root / "sft" / "model.pt"))
    rm = reward.reward_model_from_gpt(tiny_gpt(vocab, 1))
    atomic_save({"model": rm.state_dict(), "config": asdict(rm.config), "step": 0, "tokenizer": tokenizer_dir,
                 "stage": "reward"}, str(root / "reward" / "model.pt"))
    reward.write_preferences(str(root / "reward" / "preferences_train.jsonl"), synthetic_pairs(30, "train", 0))
    reward.write_preferences(str(root / "reward" / "preferences_val.jsonl"), synthetic_pairs(8, "test", 1))
    return str(root)


TINY = ["--eval-tasks", "4", "--ppo-iterations", "1", "--ppo-rollouts", "8", "--ppo-minibatch", "4",
        "--dpo-steps", "2", "--rm-pairs", "20", "--rm-epochs", "1", "--val-pairs", "8", "--noise-levels", "0,0.4",
        "--kl-dpo-betas", "0.5,0.1", "--kl-ppo-betas", "0.3,0.05", "--grid-dpo-lrs", "3e-5,1e-4",
        "--grid-dpo-betas", "0.5", "--grid-ppo-lrs", "3e-5", "--grid-ppo-betas", "0.3,0.05", "--online-rounds", "2",
        "--online-prompts", "6", "--optimal-prompts", "3", "--optimal-k", "3", "--optimal-dpo-steps", "2",
        "--optimal-ppo-iterations", "1", "--device", "cpu"]


def run_tiny(source_run, run_dir, experiment):
    return ac.main(["--source-run", source_run, "--run", str(run_dir), "--experiment", experiment, *TINY])


def check_outcome(run_dir, experiment, outcomes):
    result = outcomes[experiment]
    assert result["rows"] and all(row["claim"] and row["measurement"] and row["holds"] for row in result["rows"])
    saved = json.load(open(os.path.join(run_dir, experiment, "results.json")))
    assert saved["rows"] == result["rows"]
    assert os.path.getsize(os.path.join(run_dir, experiment, f"{experiment}.png")) > 1000
    claims = open(os.path.join(run_dir, "claims.md")).read()
    assert result["rows"][0]["holds"] in claims
    assert f"--experiment {experiment}" in claims


def test_optimal_experiment_measures_kl_to_the_exact_optimum(source_run, tmp_path):
    outcomes = run_tiny(source_run, tmp_path, "optimal")
    check_outcome(tmp_path, "optimal", outcomes)
    models = outcomes["optimal"]["models"]
    assert set(models) == {"sft", "dpo", "ppo", "optimal"}
    # KL ≥ 0; in float64 a model already at π* can land a rounding error below it (−6e-116 was seen)
    assert all(m["kl_to_optimal"] >= -1e-12 for name, m in models.items() if name != "optimal")
    assert models["sft"]["kl_from_sft"] == pytest.approx(0.0, abs=1e-9)
    # π* is by construction at least as good on the candidates as π_SFT (r increases with gold)
    assert models["optimal"]["gold"] >= models["sft"]["gold"] - 1e-9
    candidates = json.load(open(tmp_path / "optimal" / "candidates.json"))
    assert len(candidates) == 3 and all(c["gold"][0] == 1.0 for c in candidates)  # the right answer is a candidate
    for other in EXPERIMENTS_NOT("optimal"):
        assert f"| {other} | not run this session |" in open(tmp_path / "claims.md").read()


def EXPERIMENTS_NOT(name):
    return [e for e in ac.EXPERIMENTS if e != name]


def test_compute_experiment_counts_flops_time_and_memory(source_run, tmp_path):
    outcomes = run_tiny(source_run, tmp_path, "compute")
    check_outcome(tmp_path, "compute", outcomes)
    r = outcomes["compute"]
    assert r["flops"]["ppo"] > 0 and r["flops"]["dpo"] > 0
    assert r["measured"]["ppo"]["peak_rss_mib"] > 50 and r["measured"]["dpo"]["seconds"] > 0
    assert r["networks"] == {"ppo": ["policy", "reference", "reward model", "critic"], "dpo": ["policy", "reference"]}
    assert r["network_memory_mib"]["ppo"] > r["network_memory_mib"]["dpo"]
    # The stages it measured are the kl experiment's largest-β runs: cached there.
    assert json.load(open(tmp_path / "stages" / "ppo_b0.3_lr3e-5" / "stage.json"))["complete"]


def test_noise_experiment_flips_the_labels_and_trains_both_methods(source_run, tmp_path):
    outcomes = run_tiny(source_run, tmp_path, "noise")
    check_outcome(tmp_path, "noise", outcomes)
    points = outcomes["noise"]["points"]
    assert [p["noise"] for p in points] == [0.0, 0.4]
    clean = ac.read_jsonl(tmp_path / "data" / "train_noise0.jsonl")
    noisy = ac.read_jsonl(tmp_path / "data" / "train_noise0.4.jsonl")
    assert not any(r["flipped"] for r in clean) and any(r["flipped"] for r in noisy)
    assert all(0 <= p["dpo_val_accuracy"] <= 1 and 0 <= p["rm_val_accuracy"] <= 1 for p in points)


def test_kl_and_sensitivity_experiments_share_their_cached_runs(source_run, tmp_path, capsys):
    outcomes = run_tiny(source_run, tmp_path, "kl")
    check_outcome(tmp_path, "kl", outcomes)
    assert [p["beta"] for p in outcomes["kl"]["points"]["DPO"]] == [0.5, 0.1]
    capsys.readouterr()
    outcomes = run_tiny(source_run, tmp_path, "sensitivity")
    check_outcome(tmp_path, "sensitivity", outcomes)
    assert len(outcomes["sensitivity"]["cells"]["DPO"]) == 2 and len(outcomes["sensitivity"]["cells"]["PPO"]) == 2
    # dpo β 0.5 lr 3e-5 and both PPO runs at lr 3e-5 were trained by the kl experiment: skipped here
    assert capsys.readouterr().out.count("holds a finished run of this configuration: skipped") >= 3
    claims = open(tmp_path / "claims.md").read()
    assert "| kl | not run" not in claims and "| sensitivity | not run" not in claims


def test_online_experiment_and_a_rerun_is_served_from_cache(source_run, tmp_path, capsys, monkeypatch):
    # A random tiny policy scores 0 on every task, so every pair would tie: a labeler that tells its
    # samples apart by length stands in for the judge when the comparisons are built.
    monkeypatch.setattr(reward, "judge", lambda task, text: (len(text) % 5) / 4)
    first = run_tiny(source_run, tmp_path, "online")
    check_outcome(tmp_path, "online", first)
    # round 2 samples from round 1's policy and uses it as its reference
    round2 = torch.load(tmp_path / "stages" / "online_round2_of2_p6" / "model.pt", weights_only=True)
    assert round2["args"]["sft"].endswith(os.path.join("online_round1_of2_p6", "model.pt"))
    capsys.readouterr()
    second = run_tiny(source_run, tmp_path, "online")
    assert second["online"]["rows"] == first["online"]["rows"]
    assert "sampling" not in capsys.readouterr().out   # nothing re-sampled, nothing retrained


def test_bad_flags_give_one_clear_error(source_run, tmp_path, capsys):
    for argv, message in ((["--experiment", "nope"], "--experiment"), (["--noise-levels", "0.6,0"], "--noise-levels"),
                          (["--dpo-steps", "0"], "--dpo-steps")):
        with pytest.raises(SystemExit):
            ac.main(["--source-run", source_run, "--run", str(tmp_path), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ac.main(["--source-run", str(tmp_path / "missing"), "--run", str(tmp_path)])
    assert "run `make run` first" in capsys.readouterr().err


def test_compute_verdict_prefers_the_main_jobs_budgets():
    row = {"sampled": 0.02, "sampled_se": 0.008}
    verdict = ac.compute_verdict(1.5, 1.2, {"ppo": row, "dpo": row}, {"ppo": 3e12, "dpo": 1e12},
                                 {"ppo": 200.0, "dpo": 100.0}, {"ppo": row, "dpo": {**row, "sampled": 0.01}})
    assert verdict.startswith("yes at the main job's budgets: PPO/DPO = 3.0× the FLOPs, 2.0× the wall time")
    verdict = ac.compute_verdict(1.5, 1.2, {"ppo": row, "dpo": row}, {}, {}, {})
    assert "1.5× the FLOPs" in verdict and "the two gains differ" in verdict
