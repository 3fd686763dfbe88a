"""Tests for experiments/scaling_laws.py: the fits recover known exponents from synthetic losses, and a tiny
IsoFLOP sweep runs end to end through train_gpt.py's loop, writes its plots and fit, and is cached."""

import json
import math
import os

import numpy as np
import pytest

from conftest import write_synthetic_data
from experiments import scaling_laws as sl

# Chinchilla's fitted L(N, D) (Hoffmann et al. 2022, approach 3), used as a known ground truth.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


# ----------------------------------------------------------------------------- approach 2: one IsoFLOP curve

def test_isoflop_minimum_by_hand():
    # x = ln N at −1, 0, 1 with losses 3, 1, 2: c₂ = (3 + 2 − 2·1)/2 = 1.5, c₁ = (2 − 3)/2 = −0.5, c₀ = 1,
    # so the vertex is at x = 0.5/3 = 1/6 and the loss there 1 − 0.25/6.
    n_opt, loss_opt = sl.isoflop_minimum([math.exp(-1), 1.0, math.exp(1)], [3.0, 1.0, 2.0])
    assert n_opt == pytest.approx(math.exp(1 / 6), rel=1e-9)
    assert loss_opt == pytest.approx(1 - 0.25 / 6, rel=1e-9)


def test_isoflop_minimum_recovers_the_vertex_of_a_parabola_in_log_n():
    # Unevenly spaced sizes, none at the optimum N* = 12,345: the vertex is found between them, exactly.
    n = np.array([2_000, 5_000, 9_000, 30_000, 200_000], dtype=float)
    losses = 3.0 + 0.7 * (np.log(n) - math.log(12_345)) ** 2
    n_opt, loss_opt = sl.isoflop_minimum(n, losses)
    assert n_opt == pytest.approx(12_345, rel=1e-6)
    assert loss_opt == pytest.approx(3.0, abs=1e-9)


def test_isoflop_minimum_refuses_a_curve_without_a_minimum():
    with pytest.raises(ValueError, match="curve upward"):
        sl.isoflop_minimum([1e3, 1e4, 1e5], [3.0, 2.0, 0.5])   # falling ever faster: no minimum here
    with pytest.raises(ValueError, match="at least 3"):
        sl.isoflop_minimum([1e3, 1e4], [3.0, 2.0])


# ----------------------------------------------------------------------------- power laws and approach 3

def test_fit_power_law_recovers_exponent_and_coefficient():
    rng = np.random.default_rng(0)
    compute = np.geomspace(1e15, 1e21, 8)
    exact = sl.fit_power_law(compute, 0.1 * compute ** 0.5)
    assert exact == pytest.approx((0.5, 0.1), rel=1e-9)
    noisy, _ = sl.fit_power_law(compute, 0.1 * compute ** 0.5 * np.exp(rng.normal(0, 0.05, 8)))
    assert noisy == pytest.approx(0.5, abs=0.02)


def test_parametric_optimum_minimises_the_loss_at_fixed_compute():
    # Brute force: the loss along the IsoFLOP curve D = C/(6N) on a fine grid of N.
    for compute in [1e18, 1e21, 1e24]:
        n_opt, d_opt = sl.parametric_optimum(TRUE, compute)
        grid = np.geomspace(n_opt / 100, n_opt * 100, 200_001)
        brute = grid[np.argmin(sl.parametric_loss(grid, compute / (6 * grid), TRUE))]
        assert n_opt == pytest.approx(brute, rel=1e-3)
        assert 6 * n_opt * d_opt == pytest.approx(compute, rel=1e-9)


def synthetic_sweep(budgets, per_budget=7, span=8.0, noise=0.0, seed=0):
    """Runs laid out like a real sweep (sizes around each budget's optimum), losses from TRUE."""
    rng = np.random.default_rng(seed)
    runs = []
    for budget in budgets:
        centre, _ = sl.parametric_optimum(TRUE, budget)
        for n in np.geomspace(centre / span, centre * span, per_budget):
            d = budget / (6 * n)
            loss = float(sl.parametric_loss(n, d, TRUE)) + rng.normal(0, noise)
            runs.append({"budget": budget, "params": float(n), "tokens": d, "val_loss": loss,
                         "flops": budget, "attention_flops": 0.1 * budget})
    return runs


def test_fit_parametric_loss_recovers_chinchillas_exponents():
    runs = synthetic_sweep([1e18, 1e19, 1e20, 1e21])
    fit = sl.fit_parametric_loss([r["params"] for r in runs], [r["tokens"] for r in runs], [r["val_loss"] for r in runs])
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.005)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.005)
    assert fit["E"] == pytest.approx(TRUE["E"], abs=0.02)
    assert fit["rmse"] < 1e-3 and fit["r2"] > 0.999
    assert sl.fit_parametric_loss([1, 2], [1, 2], [1, 2]) is None   # too few points for 5 parameters


def test_fit_sweep_recovers_the_compute_optimal_exponents_from_isoflop_profiles():
    # The true frontier of TRUE: a = β/(α+β) = 0.4516, b = 0.5484. Approach 2 sees it only through parabolas
    # fitted to 7 noisy sizes per budget; approach 3 refits the surface.
    runs = synthetic_sweep([1e18, 1e19, 1e20, 1e21], noise=0.002)
    fit = sl.fit_sweep(runs)
    true_a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit["a"] == pytest.approx(true_a, abs=0.03)
    assert fit["b"] == pytest.approx(1 - true_a, abs=0.03)
    assert all(o["bracketed"] for o in fit["optima"]) and not fit["notes"]
    for o, c in zip(fit["optima"], [1e18, 1e19, 1e20, 1e21]):
        assert o["n_opt"] == pytest.approx(sl.parametric_optimum(TRUE, c)[0], rel=0.15)
        assert o["tokens_per_param"] == pytest.approx(o["d_opt"] / o["n_opt"])
        assert o["attention_share"] == pytest.approx(0.1)
    # Attention adds the same 10 % at every budget: it shifts C, not the slope.
    assert fit["a_with_attention"] == pytest.approx(fit["a"], abs=1e-9)
    assert fit["parametric"]["a"] == pytest.approx(true_a, abs=0.03)


def test_fit_sweep_says_when_the_optimum_is_not_bracketed():
    # Budget 1e18 keeps only sizes below its optimum: its lowest loss is at its largest size.
    centre = sl.parametric_optimum(TRUE, 1e18)[0]
    runs = [r for r in synthetic_sweep([1e18, 1e19]) if r["budget"] == 1e19 or r["params"] < centre / 1.5]
    fit = sl.fit_sweep(runs)
    assert [note.split(":")[0] for note in fit["notes"]] == ["C1e18"]
    assert [o["bracketed"] for o in fit["optima"] if o["budget"] == 1e19] == [True]


# ----------------------------------------------------------------------------- the sweep

def test_plan_runs_sets_d_from_the_budget_and_keeps_the_window():
    shapes = [(1, 8, 1), (1, 16, 2), (2, 32, 2)]
    runs = sl.plan_runs([1e8], shapes, vocab_size=64, block_size=16, batch_size=4, min_ratio=0.0, max_ratio=1e9)
    for run in runs:
        assert run["tokens"] == run["steps"] * 4 * 16
        assert run["flops"] == pytest.approx(1e8, rel=0.5 * 64 / run["tokens"] + 1e-12)   # D rounded to whole steps
        assert run["attention_flops"] == 12 * run["n_layer"] * 16 * run["n_embd"] * run["tokens"]
    # N counts every parameter, the tied embedding included (Chinchilla's count), and more than without.
    assert runs[0]["params"] > runs[0]["non_embedding_params"] + 64 * 8
    narrow = sl.plan_runs([1e8], shapes, 64, 16, 4, min_ratio=10, max_ratio=1e9)
    assert all(r["tokens"] / r["params"] >= 10 for r in narrow) and len(narrow) < len(runs)


def test_bad_flags_are_one_line_errors(capsys, tmp_path):
    data = write_synthetic_data(str(tmp_path / "data"), n_train=2_000, n_val=500)
    for flags, message in [(["--sizes", "1:8"], "n_layer:n_embd:n_head"),
                           (["--sizes", "1:8:3,1:16:2,1:24:2"], "divisible"),
                           (["--budgets", "lots"], "--budgets"),
                           (["--data-dir", str(tmp_path / "missing")], "meta.json")]:
        with pytest.raises(SystemExit) as e:
            sl.main(["--data-dir", data, "--run-dir", str(tmp_path / "runs"), "--plan", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_tiny_sweep_end_to_end_writes_plots_and_fit_and_is_cached(tmp_path, capsys):
    data = write_synthetic_data(str(tmp_path / "data"), n_train=20_000, n_val=2_000)
    run_dir = str(tmp_path / "scaling")
    flags = ["--data-dir", data, "--run-dir", run_dir, "--budgets", "3e7,1e8", "--sizes", "1:4:1,1:8:1,1:12:1,1:16:2",
             "--block-size", "16", "--batch-size", "4", "--eval-windows", "16", "--min-tokens-per-param", "0.5",
             "--max-tokens-per-param", "100", "--device", "cpu"]
    fit = sl.main(flags)
    for name in ["results.json", "scaling.md", "isoflop.png", "optima.png"]:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    runs = results["runs"]
    assert {r["budget"] for r in runs} == {3e7, 1e8} and len(runs) == 7
    for r in runs:   # each run is a finished train_gpt.py stage with its loss
        with open(os.path.join(sl.run_dir(run_dir, r), "stage.json")) as f:
            stage = json.load(f)
        assert stage["complete"] and stage["summary"]["val_loss"] == pytest.approx(r["val_loss"])
        assert stage["summary"]["steps"] == r["steps"]
    assert results["fit"]["optima"] == fit["optima"] and fit["parametric"]["rmse"] < 0.2   # 7 runs: approach 3 too
    with open(os.path.join(run_dir, "scaling.md")) as f:
        assert sum(line.startswith(("| 3e+07 |", "| 1e+08 |")) for line in f) == len(runs) + len(fit["optima"])
    # A second run trains nothing: every run is skipped, with the same losses.
    again = sl.main(flags)
    assert again["optima"] == fit["optima"]
    with open(os.path.join(run_dir, "results.json")) as f:
        assert all(r["seconds"] == 0 for r in json.load(f)["runs"])
