"""Data parallelism (train_gpt.py section 8): 2 CPU processes with gloo, launched by torchrun.

Each launch costs a few seconds of start-up, so one session-scoped fixture runs the single-process
reference and the three strategies once, and the tests read their metrics.
"""

import json
import os

import numpy as np
import pytest
import torch

import train_gpt as tg
from parallel import costs
from conftest import torchrun

STEPS = 6


def run_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--block-size", "32", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--global-batch-size", "8", "--max-steps", str(STEPS), "--warmup-steps", "2",
            "--eval-every", "100", "--eval-windows", "4", "--checkpoint-every", "3", "--log-every", "100",
            "--device", "cpu", *extra]


def metrics(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data):
    base = tmp_path_factory.mktemp("dist")
    outs = {"single": str(base / "single"), "ddp": str(base / "ddp"), "fsdp": str(base / "fsdp"),
            "manual": str(base / "manual")}
    tg.main(run_args(synthetic_data, outs["single"], "--micro-batch-size", "8"))
    # micro-batch 2 × 2 ranks → 2 accumulation steps per optimizer step for ddp and manual
    torchrun(2, run_args(synthetic_data, outs["ddp"], "--parallel", "ddp", "--micro-batch-size", "2"))
    torchrun(2, run_args(synthetic_data, outs["manual"], "--parallel", "manual", "--micro-batch-size", "2"))
    torchrun(2, run_args(synthetic_data, outs["fsdp"], "--parallel", "fsdp", "--micro-batch-size", "4"))
    return outs


def test_rank_batches_are_disjoint_and_cover_the_global_batch():
    world, accum, micro = 2, 3, 4
    rows = [list(range(64))[tg.micro_batch_rows(r, world, m, micro, accum)] for r in range(world) for m in range(accum)]
    flat = [i for chunk in rows for i in chunk]
    assert len(flat) == len(set(flat)) == world * accum * micro
    assert sorted(flat) == list(range(world * accum * micro))
    assert tg.gradient_accumulation_steps(24, 4, 2) == 3
    with pytest.raises(tg.ConfigError, match="multiple of --micro-batch-size 4 × 2 ranks"):
        tg.gradient_accumulation_steps(20, 4, 2)


def test_memory_per_gpu_follows_zero_accounting():
    psi, n = 7.5e9, 64  # the ZeRO paper's example: 7.5B parameters on 64 GPUs
    assert costs.memory_per_gpu(psi, n, "ddp") / 1e9 == pytest.approx(120)
    assert costs.memory_per_gpu(psi, n, "zero1") / 1e9 == pytest.approx(31.4, abs=0.1)
    assert costs.memory_per_gpu(psi, n, "zero2") / 1e9 == pytest.approx(16.6, abs=0.1)
    assert costs.memory_per_gpu(psi, n, "fsdp") / 1e9 == pytest.approx(1.875)
    assert costs.memory_per_gpu(psi, 1, "zero3") == costs.memory_per_gpu(psi, 1, "ddp")


@pytest.mark.parametrize("strategy", ["ddp", "manual", "fsdp"])
def test_parallel_trajectory_matches_single_process(runs, strategy):
    for key in ("loss", "grad_norm"):
        single = metrics(runs["single"], key)
        parallel = metrics(runs[strategy], key)
        assert [s for s, _ in parallel] == list(range(1, STEPS + 1))
        np.testing.assert_allclose([v for _, v in parallel], [v for _, v in single], rtol=1e-5, err_msg=key)


def test_fsdp_writes_sharded_checkpoints_and_converts(runs, tmp_path):
    sharded = tg.checkpoint_paths(runs["fsdp"])[-1]
    assert os.path.isdir(sharded) and sharded.endswith(f"ckpt_{STEPS:07d}")
    converted = str(tmp_path / "converted.pt")
    tg.main(["convert", sharded, "--out", converted])
    gathered = torch.load(converted, weights_only=True)["model"]
    final = torch.load(os.path.join(runs["fsdp"], "model.pt"), weights_only=True)["model"]
    single = torch.load(os.path.join(runs["single"], "model.pt"), weights_only=True)["model"]
    assert gathered.keys() == final.keys() == single.keys()
    for name in final:
        assert torch.equal(gathered[name], final[name])
        assert torch.allclose(final[name], single[name], atol=1e-5)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_fsdp_resume_on_another_world_size(runs, synthetic_data, tmp_path, first, second):
    out = str(tmp_path / "resumed")
    micro = {1: "8", 2: "4"}
    torchrun(first, run_args(synthetic_data, out, "--parallel", "fsdp", "--micro-batch-size", micro[first],
                             "--max-steps", "3"))
    torchrun(second, run_args(synthetic_data, out, "--parallel", "fsdp", "--micro-batch-size", micro[second],
                              "--resume"))
    resumed = dict(metrics(out, "loss"))
    reference = dict(metrics(runs["single"], "loss"))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in range(4, STEPS + 1)],
                               [reference[s] for s in range(4, STEPS + 1)], rtol=1e-5)


def test_nan_on_one_rank_rolls_back_every_rank(synthetic_data, tmp_path):
    out = str(tmp_path / "nan")
    stdout = torchrun(2, run_args(synthetic_data, out, "--parallel", "ddp", "--micro-batch-size", "2",
                                  "--inject-nan-at", "5", "--inject-rank", "1"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    events = [r for r in records if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["skipped_batch"] == 5 and events[0]["step"] == 3
    assert stdout.count("rollback:") == 1  # printed once, by rank 0
    assert torch.load(os.path.join(out, "model.pt"), weights_only=True)["skipped_batches"] == [5]
    # Both ranks reloaded checkpoint 3 (weights and Adam state): with dropout 0 the re-run steps 4 and 5
    # (same batches) log exactly what their first pass logged — step 5 only if Adam's moments were reloaded.
    passes = {}
    for r in records:
        if "loss" in r:
            passes.setdefault(r["step"], []).append((r["loss"], r["grad_norm"]))
    assert {step: len(runs) for step, runs in passes.items()} == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 1}
    assert passes[4][0] == passes[4][1] and passes[5][0] == passes[5][1], passes
