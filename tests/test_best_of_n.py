"""Tests for best_of_n.py: the best-of-n KL and expectation against brute force, the KL-regularised
optimum over a set of samples, and `reward.py --best-of-n` end to end on tiny models."""

import itertools
import json
import math
import random
from dataclasses import asdict

import numpy as np
import pytest

import best_of_n
import reward
from test_reward import fake_judge, tiny_reward_model, tiny_sft_checkpoint
from train_gpt import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def test_best_of_n_kl_by_hand():
    assert best_of_n.best_of_n_kl(1) == 0.0
    assert best_of_n.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n.best_of_n_kl(16) == pytest.approx(2.772588722 - 15 / 16)


def test_best_of_n_expectation_is_the_mean_over_every_subset():
    """The closed form against brute force: every n-subset of N samples, its proxy-best's value."""
    rng = random.Random(0)
    for N in (1, 4, 7):
        proxy = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(N)]  # ties included
        values = [rng.random() for _ in range(N)]
        for n in range(1, N + 1):
            subsets = list(itertools.combinations(range(N), n))
            brute = 0.0
            for subset in subsets:
                best = max(proxy[i] for i in subset)
                tied = [values[i] for i in subset if proxy[i] == best]
                brute += sum(tied) / len(tied) / len(subsets)
            assert best_of_n.best_of_n_expectation(proxy, values, n) == pytest.approx(brute, abs=1e-12), (N, n)
    assert best_of_n.best_of_n_expectation([3.0, 1.0, 2.0], [0.3, 0.1, 0.2], 3) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        best_of_n.best_of_n_expectation([1.0], [1.0], 2)


def test_kl_regularized_optimum_by_hand_and_as_the_maximiser():
    """π* over N samples of uniform π_SFT: two samples by hand (weights e^{r/β} normalised, KL to ½–½);
    the β limits (the sample mean at KL 0; best-of-N by proxy at KL log N); and no other distribution
    over the samples reaches a higher E[r] − β·KL (random Dirichlet draws)."""
    value, kl = best_of_n.kl_regularized_optimum([1.0, 0.0], [1.0, 0.0], 1.0)
    w = math.e / (math.e + 1)
    assert value == pytest.approx(w)
    assert kl == pytest.approx(w * math.log(2 * w) + (1 - w) * math.log(2 * (1 - w)))
    proxy, gold = [0.2, 0.9, 0.5, 0.1], [1.0, 0.0, 0.5, 0.25]
    assert best_of_n.kl_regularized_optimum(proxy, gold, 1e6) == pytest.approx((np.mean(gold), 0.0), abs=1e-6)
    assert best_of_n.kl_regularized_optimum(proxy, gold, 1e-4) == pytest.approx((0.0, math.log(4)), abs=1e-6)
    rng = np.random.default_rng(0)
    beta = 0.3
    best_value, best_kl = best_of_n.kl_regularized_optimum(proxy, proxy, beta)
    objective = best_value - beta * best_kl
    for _ in range(200):
        p = rng.dirichlet(np.ones(4))
        assert float(p @ proxy) - beta * float(np.sum(p * np.log(p * 4))) <= objective + 1e-12


def test_best_of_n_command_writes_curves_policy_points_and_a_plot(tmp_path, monkeypatch, capsys):
    """The command end to end on tiny models: the judge's best-of-n never falls as n grows and is
    never below r_φ's choice; n = 1 is the plain sample mean for both; a policy equal to π_SFT sits
    at KL 0; bad flags are one-line errors."""
    monkeypatch.setattr(best_of_n, "judge", fake_judge)
    sft = tiny_sft_checkpoint(tmp_path)
    rm_path = str(tmp_path / "rm.pt")
    rm = tiny_reward_model(seed=5)
    atomic_save({"model": rm.state_dict(), "config": asdict(rm.config), "step": 0, "stage": "reward",
                 "tokenizer": str(tmp_path / "tokenizer")}, rm_path)
    out = tmp_path / "bon"
    flags = ["--best-of-n", "1,2,4", "--sft", sft, "--reward-model", rm_path, "--out", str(out), "--eval-prompts", "6",
             "--max-new-tokens", "6", "--device", "cpu"]
    result = reward.main(flags + ["--policy", f"same={sft}"])
    by_judge = [c["gold"][0] for c in result["best_of_n"]["judge"]]
    by_rm = [c["gold"][0] for c in result["best_of_n"]["rm"]]
    assert by_judge == sorted(by_judge) and all(j >= r - 1e-12 for j, r in zip(by_judge, by_rm))
    assert by_judge[0] == pytest.approx(by_rm[0]) and result["best_of_n"]["rm"][0]["kl"] == 0.0
    assert result["policies"]["same"]["kl"][0] == pytest.approx(0.0, abs=1e-5)
    assert (out / "overoptimization.png").is_file() and json.loads((out / "bon.json").read_text())["prompts"] == 6
    optimum = result["optimum"]["judge"]   # π* on the gold score: more gold, more KL, as β falls
    assert [c["beta"] for c in optimum] == reward.Hyperparameters().optimum_betas
    assert all(a["gold"][0] <= b["gold"][0] + 1e-12 and a["kl"] <= b["kl"] + 1e-12 for a, b in zip(optimum, optimum[1:]))
    assert all(0 <= c["kl"] <= math.log(4) + 1e-9 for c in optimum + result["optimum"]["rm"])
    for bad, message in ((["--best-of-n", "0,2"], "--best-of-n"), (["--best-of-n", "2", "--reward-model", ""], ""),
                         (["--policy", "nonsense"], "--policy"), (["--optimum-betas", "0.1,0"], "--optimum-betas")):
        with pytest.raises(SystemExit):
            reward.main(flags + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
