"""Model parallelism (parallel/): tensor, pipeline, ZeRO-1 and data × tensor parallelism, each against one
process, on CPU with gloo; PowerSGD; the communication and memory formulas; the graders of the column/row
parallel layers and of the bubble fraction.

Each launch costs seconds, so one module fixture runs every strategy once: 6 steps of a tiny GPT, a NaN
injected into batch 5 on one rank (which every rank must roll back) — and the single-process reference
gets the same NaN, so the two trajectories, replayed steps included, stay comparable step for step.
"""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import torchrun
from gloo_workers import column_worker, linear_case, row_worker, spawn_gloo
from parallel import costs
from parallel.common import optimizer_state_by_name, optimizer_state_dict, parameter_names
from parallel.pipeline import PipelineStage, bubble_fraction, stage_layers
from parallel.tensor import params_per_rank, shard_index, shard_rule, tensor_and_data_groups

STEPS, NAN_BATCH = 6, 5
# strategy → (processes, flags); the NaN goes to a rank other than 0 (for pp: the first stage, whose NaN
# activations must reach the last stage's loss and be caught there).
LAUNCHES = {
    "tp": (2, ["--parallel", "tp", "--micro-batch-size", "4", "--inject-rank", "1"]),
    "pp": (2, ["--parallel", "pp", "--micro-batches", "4", "--inject-rank", "0"]),
    "zero1": (2, ["--parallel", "zero1", "--micro-batch-size", "2", "--inject-rank", "1"]),
    "dp-tp": (4, ["--parallel", "dp-tp", "--tp", "2", "--micro-batch-size", "2", "--inject-rank", "3"]),
}


def run_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--block-size", "32", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--global-batch-size", "8", "--max-steps", str(STEPS), "--warmup-steps", "2",
            "--eval-every", "100", "--eval-windows", "4", "--checkpoint-every", "3", "--log-every", "100",
            "--device", "cpu", *extra]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return list(map(json.loads, f))


def tiny_model(vocab_size=64):
    torch.manual_seed(0)
    return tg.GPT(tg.GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data):
    base = tmp_path_factory.mktemp("parallel")
    outs = {name: str(base / name) for name in ["single", *LAUNCHES, "powersgd"]}
    nan = ["--inject-nan-at", str(NAN_BATCH)]
    tg.main(run_args(synthetic_data, outs["single"], "--micro-batch-size", "8", *nan))
    for name, (nproc, flags) in LAUNCHES.items():
        torchrun(nproc, run_args(synthetic_data, outs[name], *flags, *nan))
    torchrun(2, run_args(synthetic_data, outs["powersgd"], "--parallel", "ddp", "--micro-batch-size", "4",
                         "--powersgd-rank", "1", "--powersgd-start-step", "2"))
    return outs


def parallel_event(out):
    return next(r for r in records(out) if r.get("event") == "parallel")


# ----------------------------------------------------------------------------------------------------------
# Every strategy against one process
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", list(LAUNCHES))
def test_trajectory_matches_single_process(runs, strategy):
    single = [r for r in records(runs["single"]) if "loss" in r]
    parallel = [r for r in records(runs[strategy]) if "loss" in r]
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == [1, 2, 3, 4, 5, 4, 5, 6]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in parallel], [r[key] for r in single], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("strategy", list(LAUNCHES))
def test_nan_on_one_rank_rolls_back_every_rank(runs, strategy):
    rows = records(runs[strategy])
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["skipped_batch"] == NAN_BATCH and events[0]["step"] == 3
    # Every rank reloaded checkpoint 3 — its piece of the single file, weights and optimizer state — so the
    # replayed steps 4 and 5 (same batches) log exactly what their first pass logged.
    passes = {}
    for r in rows:
        if "loss" in r:
            passes.setdefault(r["step"], []).append((r["loss"], r["grad_norm"]))
    assert passes[4][0] == passes[4][1] and passes[5][0] == passes[5][1], passes


@pytest.mark.parametrize("strategy", list(LAUNCHES))
def test_checkpoints_are_single_files_with_the_same_loss(runs, strategy, synthetic_data):
    single = torch.load(os.path.join(runs["single"], "model.pt"), weights_only=True)
    for path in (os.path.join(runs[strategy], "model.pt"), tg.checkpoint_paths(runs[strategy])[-1]):
        model, checkpoint = tg.model_from_checkpoint(path)  # the loader every later stage uses
        assert checkpoint["model"].keys() == single["model"].keys()
        for name, tensor in checkpoint["model"].items():
            assert torch.allclose(tensor, single["model"][name], atol=1e-5), name
        data = tg.TokenData(synthetic_data, 32, 64)
        val_loss = tg.evaluate_loss(model, data, 4, 8, torch.device("cpu"), contextlib.nullcontext())
        assert val_loss == pytest.approx(single["val_loss"], rel=1e-5)
    # The optimizer state is in the single-process layout too: a plain AdamW loads it.
    model = tiny_model()
    optimizer = model.configure_optimizer(3e-3, 0.1)
    optimizer.load_state_dict(checkpoint["optimizer"])
    reference = torch.load(tg.checkpoint_paths(runs["single"])[-1], weights_only=True)["optimizer"]
    assert checkpoint["optimizer"]["state"].keys() == reference["state"].keys()
    for index, state in reference["state"].items():
        for key, value in state.items():
            assert torch.allclose(checkpoint["optimizer"]["state"][index][key], value, rtol=1e-4, atol=1e-8), key


def test_resume_from_another_strategys_checkpoint(runs, synthetic_data, tmp_path):
    """Tensor-parallel checkpoint 3, gathered into one file, resumed as a pipeline: the same steps 4–6."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(os.path.join(runs["tp"], "ckpt_0000003.pt"), out / "ckpt_0000003.pt")
    torchrun(2, run_args(synthetic_data, str(out), "--parallel", "pp", "--micro-batches", "2", "--resume",
                         "--inject-nan-at", str(NAN_BATCH)))
    resumed = [r for r in records(str(out)) if "loss" in r]
    single = [r for r in records(runs["single"]) if "loss" in r][3:]
    assert [r["step"] for r in resumed] == [r["step"] for r in single] == [4, 5, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in single], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# What each strategy measured: communication, the ZeRO-1 optimizer state, the pipeline bubble
# ----------------------------------------------------------------------------------------------------------

def test_counted_communication_equals_the_formula(runs):
    model, tokens = tiny_model(), 8 * 32
    psi = tg.count_params(model, non_embedding=False)
    dims = dict(n_layer=2, n_embd=32, vocab_size=64, bytes_per_value=4)  # fp32 on CPU
    groups = [sum(p.numel() for p in g["params"]) for g in model.configure_optimizer(1, 0.1).param_groups]
    per_group = sum(-(-n // 2) * 2 for n in groups)  # ZeRO-1's flat groups, each padded to 2 shards
    expected = {
        "tp": costs.communication_per_step("tp", psi, 2, tp=2, tokens=tokens, **dims),
        "dp-tp": costs.communication_per_step("dp-tp", params_per_rank(model, 2), 4, tp=2, tokens=tokens // 2, **dims),
        "pp": costs.communication_per_step("pp", psi, 2, tokens=tokens, **dims),
        "zero1": costs.communication_per_step("zero1", per_group, 2, **dims),
    }
    for strategy, formula in expected.items():
        sent = [r["sent_bytes"] for r in records(runs[strategy]) if "loss" in r]
        assert sent and all(s == formula for s in sent), (strategy, sent[:3], formula)
        assert parallel_event(runs[strategy])["sent_bytes"] == [formula] * LAUNCHES[strategy][0]
    assert expected["tp"] == 4 * 2 * 1 * tokens * 32 * 4  # 4 all-reduces per block of B·T·d, 2(k−1)/k = 1


def test_zero1_keeps_a_shard_of_the_optimizer_state(runs):
    event = parallel_event(runs["zero1"])
    model = tiny_model()
    groups = [sum(p.numel() for p in g["params"]) for g in model.configure_optimizer(1, 0.1).param_groups]
    psi = sum(groups)
    assert event["params"] == psi and event["formula_bytes"] == 12 * psi / 2
    shard = sum(-(-n // 2) for n in groups)  # each group's shard: ⌈numel / N⌉ values
    # master copy, m and v: 12 bytes a value; plus a 4-byte step count per group
    assert event["optimizer_state_bytes"] == [12 * shard + 4 * len(groups)] * 2
    assert abs(event["optimizer_state_bytes"][0] - 12 * psi / 2) <= 12 * len(groups) + 4 * len(groups)
    # One process would hold 8 bytes (m, v) for every parameter: each rank holds about half of 12.
    assert event["optimizer_state_bytes"][0] < 0.8 * 8 * psi


def test_pipeline_reports_its_bubble(runs):
    event = parallel_event(runs["pp"])
    assert event["bubble_fraction"] == pytest.approx(1 / 5)  # p = 2 stages, m = 4 micro-batches
    assert len(event["idle_fraction"]) == 2 and all(0 <= f < 1 for f in event["idle_fraction"])
    steps = [r for r in records(runs["pp"]) if "loss" in r]
    assert all(0 <= r["idle_fraction"] < 1 for r in steps)


def test_powersgd_sends_fewer_bytes_and_is_lossy(runs):
    event = parallel_event(runs["powersgd"])
    # Every gradient value goes through the hook each step; a rank-1 approximation sends far fewer.
    assert event["values_per_step"] == tg.count_params(tiny_model(), non_embedding=False)
    assert event["compression_rate"] > 2 and event["compressed_values_per_step"] < event["values_per_step"] / 2
    ddp = [r for r in records(runs["single"]) if "loss" in r]
    compressed = [r for r in records(runs["powersgd"]) if "loss" in r]
    assert [r["step"] for r in compressed] == list(range(1, STEPS + 1))
    # The first two steps all-reduce whole gradients (PowerSGD's warm-up): DDP's numbers. Then it is lossy.
    np.testing.assert_allclose([r["grad_norm"] for r in compressed[:2]], [r["grad_norm"] for r in ddp[:2]], rtol=1e-5)
    assert abs(compressed[2]["grad_norm"] - ddp[2]["grad_norm"]) > 1e-3 * ddp[2]["grad_norm"]
    assert all(np.isfinite(r["loss"]) for r in compressed)


# ----------------------------------------------------------------------------------------------------------
# The formulas and the layouts, without processes
# ----------------------------------------------------------------------------------------------------------

def test_communication_per_step_by_hand():
    psi, n = 1e9, 8
    assert costs.communication_per_step("ddp", psi, n) == 2 * 7 / 8 * psi * 2  # ring all-reduce of bf16 gradients
    assert costs.communication_per_step("zero1", psi, n) == costs.communication_per_step("ddp", psi, n)
    assert costs.communication_per_step("fsdp", psi, n) == pytest.approx(1.5 * costs.communication_per_step("ddp", psi, n))
    # GPT-2 124M sized: L = 12, d = 768, a step of 2^19 tokens, 8-way TP: 4 · 12 · (14/8) · 2^19 · 768 · 2 bytes.
    assert costs.communication_per_step("tp", psi, 8, tp=8, tokens=2**19, n_layer=12, n_embd=768) == \
        4 * 12 * 1.75 * 2**19 * 768 * 2
    assert costs.communication_per_step("dp-tp", 100, 8, tp=2, tokens=10, n_layer=1, n_embd=4, bytes_per_value=1) == \
        4 * 1 * 1 * 40 + 2 * 3 / 4 * 100
    # pp: the busiest stage — a middle one (forward + backward activations) or an end one (+ the tied embedding)
    pp = dict(tokens=1000, n_embd=10, vocab_size=50, bytes_per_value=1)
    assert costs.communication_per_step("pp", 0, 2, **pp) == 1000 * 10 + 50 * 10
    assert costs.communication_per_step("pp", 0, 4, **pp) == 2 * 1000 * 10
    with pytest.raises(ValueError, match="unknown strategy"):
        costs.communication_per_step("zero4", psi, n)


def test_two_d_layout_and_stages():
    tp_groups, dp_groups = tensor_and_data_groups(4, 2)
    assert tp_groups == [[0, 1], [2, 3]] and dp_groups == [[0, 2], [1, 3]]
    tp_groups, dp_groups = tensor_and_data_groups(8, 4)
    assert tp_groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and dp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for n_layer, stages in [(4, 2), (5, 2), (12, 5), (3, 3)]:
        layers = [list(stage_layers(n_layer, stages, s)) for s in range(stages)]
        assert sum(layers, []) == list(range(n_layer))
        assert max(map(len, layers)) - min(map(len, layers)) <= 1


def test_tensor_parallel_shards_whole_heads():
    # qkv rows [Q; K; V], d = 8 in 4 heads of 2: rank 1 of 2 keeps heads 2–3 of each of Q, K and V.
    assert shard_index(shard_rule("blocks.0.attn.qkv.weight"), 24, 1, 2).tolist() == \
        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert shard_index(shard_rule("blocks.3.mlp.proj.weight"), 32, 3, 4).tolist() == list(range(24, 32))
    assert shard_rule("blocks.0.mlp.proj.bias") is None and shard_rule("token_embedding.weight") is None
    model = tiny_model()
    psi = tg.count_params(model, non_embedding=False)
    split = sum(p.numel() for n, p in model.named_parameters() if shard_rule(n))
    assert params_per_rank(model, 2) == psi - split // 2
    with torch.device("meta"):  # GPT-2 124M's TP shard and pipeline stages, without allocating them
        gpt2 = tg.GPT(tg.GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    stages = [sum(p.numel() for p in PipelineStage(gpt2, s, 4).parameters()) for s in range(4)]
    assert stages[1] == stages[2] == 3 * 12 * 768**2 + 3 * 13 * 768  # three blocks (weights, biases, LayerNorms)


def test_optimizer_state_keeps_its_layout_by_name():
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-3, 0.1)
    x = torch.randint(0, 64, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    layout = parameter_names(model, optimizer)
    assert layout[0][0] == "token_embedding.weight" and "ln_f.bias" in layout[1]
    by_name = optimizer_state_by_name(optimizer.state_dict(), layout)
    rebuilt = optimizer_state_dict(by_name, layout, optimizer.param_groups)
    original = optimizer.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    assert rebuilt["state"].keys() == original["state"].keys()
    fresh = tiny_model().configure_optimizer(1e-3, 0.1)
    fresh.load_state_dict(rebuilt)


def test_model_parallel_flags_are_checked(capsys, synthetic_data, tmp_path):
    out = str(tmp_path / "x")
    for flags, message in [(["--parallel", "ddp", "--tp", "2"], "--tp is for --parallel tp or dp-tp"),
                           (["--micro-batches", "4"], "--micro-batches is for --parallel pp"),
                           (["--powersgd-rank", "2"], "--powersgd-rank is for --parallel ddp"),
                           (["--parallel", "dp-tp"], "--parallel dp-tp needs --tp"),
                           (["--parallel", "pp"], "one stage per rank")]:
        with pytest.raises(SystemExit):
            tg.main(run_args(synthetic_data, out, *flags))
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Graders of the classroom assignments (tests/classroom.py)
# ----------------------------------------------------------------------------------------------------------

def gpipe_idle_fraction(stages, micro_batches, forward=1.0, backward=1.0):
    """Simulate GPipe: F(s, i) starts when stage s is free and stage s − 1 has sent micro-batch i; the backwards,
    last micro-batch first, start when stage s + 1 has sent the gradient. Returns the idle fraction of stage 0."""
    free = [0.0] * stages
    forward_done = [[0.0] * micro_batches for _ in range(stages)]
    for i in range(micro_batches):
        for s in range(stages):
            start = max(free[s], forward_done[s - 1][i] if s else 0.0)
            forward_done[s][i] = free[s] = start + forward
    backward_done = [[0.0] * micro_batches for _ in range(stages)]
    for i in reversed(range(micro_batches)):
        for s in reversed(range(stages)):
            start = max(free[s], backward_done[s + 1][i] if s < stages - 1 else 0.0)
            backward_done[s][i] = free[s] = start + backward
    total = max(free)
    return 1 - micro_batches * (forward + backward) / total


def test_bubble_fraction_matches_a_simulated_schedule():
    for stages, micro_batches in [(1, 4), (2, 1), (2, 4), (3, 4), (4, 8), (8, 3)]:
        assert bubble_fraction(stages, micro_batches) == pytest.approx(gpipe_idle_fraction(stages, micro_batches))
        assert bubble_fraction(stages, micro_batches) == pytest.approx(
            gpipe_idle_fraction(stages, micro_batches, forward=1.0, backward=2.0))
    assert bubble_fraction(3, 4) == pytest.approx(2 / 6)  # the schedule drawn in parallel/pipeline.py


def full_linear(weight, bias, x, cotangent):
    """y = x·Wᵀ + b and the gradients of Σ y·cotangent, by hand."""
    y = x @ weight.T + bias
    flat_x, flat_c = x.reshape(-1, x.shape[-1]), cotangent.reshape(-1, cotangent.shape[-1])
    return y, {"x": cotangent @ weight, "weight": flat_c.T @ flat_x, "bias": flat_c.sum(0)}


def test_column_parallel_linear_matches_the_whole_layer(tmp_path):
    spawn_gloo(column_worker, tmp_path)
    y, grads = full_linear(*linear_case(6, 4))
    for rank in range(2):
        got, rows = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), slice(rank * 3, (rank + 1) * 3)
        torch.testing.assert_close(got["y"], y[..., rows])                  # this rank's output features
        torch.testing.assert_close(got["x"], grads["x"])                    # ∂L/∂X summed over ranks (f)
        torch.testing.assert_close(got["weight"], grads["weight"][rows])
        torch.testing.assert_close(got["bias"], grads["bias"][rows])


def test_row_parallel_linear_matches_the_whole_layer(tmp_path):
    spawn_gloo(row_worker, tmp_path)
    z, grads = full_linear(*linear_case(5, 6))
    for rank in range(2):
        got, cols = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), slice(rank * 3, (rank + 1) * 3)
        torch.testing.assert_close(got["y"], z)                             # the whole output on every rank (g)
        torch.testing.assert_close(got["x"], grads["x"][..., cols])
        torch.testing.assert_close(got["weight"], grads["weight"][:, cols])
        torch.testing.assert_close(got["bias"], grads["bias"])
