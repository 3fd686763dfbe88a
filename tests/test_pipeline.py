"""The main job end to end: `make run PRESET=tiny` (data → pretraining → SFT → reward model → PPO →
DPO → evaluation → report.md), then the same command again, which must skip every stage."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "bon", "eval")


def make_run(runs_dir, *extra, run="smoke"):
    """`make run` with this interpreter (no venv install), one torch thread per stage process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = ["make", "--no-print-directory", "-C", ROOT, "run", "PRESET=tiny", f"RUN={run}", f"RUNS={runs_dir}",
               "INSTALL=", f"PY={sys.executable}", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def outputs_mtimes(run):
    return {path: os.path.getmtime(os.path.join(run, path))
            for path in ("data/meta.json", "pretrain/model.pt", "sft/model.pt", "reward/model.pt", "ppo/model.pt",
                         "dpo/model.pt", "bon/bon.json", "eval/eval.json")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    first = make_run(runs)
    run = os.path.join(runs, "smoke")
    mtimes = outputs_mtimes(run)
    second = make_run(runs)
    return runs, run, first, second, mtimes


def test_every_stage_finishes_and_the_report_has_finite_numbers(pipeline):
    _, run, _, _, _ = pipeline
    for stage in STAGES:
        with open(os.path.join(run, stage, "stage.json")) as f:
            assert json.load(f)["complete"], stage
    with open(os.path.join(run, "eval", "eval.json")) as f:
        evaluation = json.load(f)
    assert set(evaluation["models"]) == {"base", "sft", "ppo", "dpo"}
    for name, result in evaluation["models"].items():
        for key in ("greedy_gold", "sampled_gold", "kl_to_reference", "response_length"):
            assert math.isfinite(result[key]), (name, key)
        assert 0.0 <= result["greedy_gold"] <= 1.0 and 0.0 <= result["sampled_gold"] <= 1.0
    assert evaluation["models"]["sft"]["kl_to_reference"] == 0.0  # the reference against itself

    report = open(os.path.join(run, "report.md")).read()
    assert "unfinished" not in report  # JUDGE=0: ppo_judge is not part of the run, so not missing
    table = [line for line in report.splitlines() if re.match(r"\| (base|sft|ppo|dpo) \|", line)]
    assert len(table) == 4
    best_of_n = [line for line in report.splitlines() if re.match(r"\| best-of-\d+, chosen by (r_φ|the judge) ", line)]
    assert len(best_of_n) == 2, best_of_n
    optimum = [line for line in report.splitlines() if line.startswith("| π* on r_φ, its best β ")]
    assert len(optimum) == 1 and math.isfinite(float(optimum[0].split("|")[5])), optimum
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        numbers = [float(re.match(r"[-+]?\d+\.?\d*", c).group()) for c in cells]
        assert all(math.isfinite(x) for x in numbers), line
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert os.path.getsize(os.path.join(run, image)) > 1000, image
    assert "nan" not in report.lower().split()


def test_a_second_run_skips_every_stage(pipeline):
    _, run, _, second, mtimes_before = pipeline
    assert outputs_mtimes(run) == mtimes_before  # nothing was rewritten
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "bon", "eval"):
        assert re.search(rf"\[{stage}\] .*skipped", second), f"{stage} was not skipped:\n{second[-2000:]}"
    assert re.search(r"\[(data|prepare)\] .*skipped", second), second[-2000:]


def test_a_moved_run_directory_stays_cached(pipeline):
    """Fingerprints hash what the inputs contain, not where they are: a copy is a finished run too."""
    runs, run, _, _, _ = pipeline
    shutil.copytree(run, os.path.join(runs, "moved"))
    output = make_run(runs, run="moved")
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "bon", "eval"):
        assert re.search(rf"\[{stage}\] .*skipped", output), f"{stage} ran again:\n{output[-2000:]}"
