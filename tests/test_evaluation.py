"""The pipeline's final evaluation (sft.py --eval with several checkpoints): its statistics against
independent computations, the sampled KL estimate against a token-by-token hand computation, and
the stage's caching."""

import json
import math
import os
import statistics
from dataclasses import asdict

import numpy as np
import pytest
import torch

import sft
from data.tasks import Task
from test_sft import ENC, tiny_model, tiny_run_files
from train_gpt import ConfigError, atomic_save


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TASKS = [Task("upper", "Convert cat to uppercase.", "CAT", 1), Task("arith", "What is 1 + 1?", "2", 1),
         Task("upper", "Convert dog to uppercase.", "DOG", 1)]


def test_mean_and_stderr_match_the_statistics_module():
    values = [0.1, 0.7, 0.25, 1.0, 0.0, 0.4]
    mean, stderr = sft.mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


def test_paired_difference_is_the_mean_and_stderr_of_differences():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    result = sft.paired_difference(a.tolist(), b.tolist())
    assert result["mean"] == pytest.approx((a - b).mean())
    assert result["stderr"] == pytest.approx((a - b).std(ddof=1) / np.sqrt(50))


def hand_logprob(model, prompt, response):
    """log π(y|x) token by token: one forward pass per prefix, log-softmax of the next token."""
    total, ids = 0.0, list(prompt)
    for token in response:
        logits, _ = model(torch.tensor([ids]))
        total += torch.log_softmax(logits[0, -1].double(), dim=-1)[token].item()
        ids.append(token)
    return total


def test_sampled_kl_is_zero_against_itself_and_matches_a_hand_computation():
    policy, reference = tiny_model(seed=1).eval(), tiny_model(seed=2).eval()
    same = sft.sampled_evaluation(policy, policy, ENC, TASKS, max_new_tokens=5, batch_size=2, device="cpu")
    assert same["kl"] == [0.0] * len(TASKS)
    assert all(0 <= g <= 1 for g in same["gold"]) and all(0 <= n <= 5 for n in same["length"])

    result = sft.sampled_evaluation(policy, reference, ENC, TASKS, max_new_tokens=5, batch_size=2, device="cpu")
    tokens = sft.chat_tokens(ENC)
    generator = torch.Generator().manual_seed(sft.HELDOUT_SEED)  # the same samples, drawn again
    prompts = [sft.render_prompt([{"role": "user", "content": t.prompt}], ENC) for t in TASKS]
    responses = sft.generate_responses(policy, prompts, 5, tokens.end, tokens.pad, 2, temperature=1.0,
                                       generator=generator)
    with torch.no_grad():
        expected = [hand_logprob(policy, p, r) - hand_logprob(reference, p, r) for p, r in zip(prompts, responses)]
    assert result["kl"] == pytest.approx(expected, abs=1e-4)


def test_eval_stage_compares_models_and_is_skipped_when_done(tmp_path, capsys):
    base, _ = tiny_run_files(tmp_path)
    other = str(tmp_path / "other.pt")
    model = tiny_model(vocab_size=ENC.n_vocab, seed=5)
    checkpoint = torch.load(base, weights_only=True)
    atomic_save({**checkpoint, "model": model.state_dict(), "config": asdict(model.config)}, other)
    out = str(tmp_path / "eval")
    argv = ["--eval", f"base={base}", f"sft={other}", "--eval-out", out, "--families", "upper", "--eval-tasks", "5",
            "--max-new-tokens", "4", "--device", "cpu"]
    result = sft.main(argv)
    assert result["reference"] == "sft" and set(result["models"]) == {"base", "sft"}
    assert result["models"]["sft"]["kl_to_reference"] == 0.0
    assert result["models"]["sft"]["greedy_vs_reference"] == {"mean": 0.0, "stderr": 0.0}
    assert len(result["examples"]) == 5 and set(result["examples"][0]["replies"]) == {"base", "sft"}
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f)["models"]["base"]["greedy_gold"] == result["models"]["base"]["greedy_gold"]
    mtime = os.path.getmtime(os.path.join(out, "eval.json"))
    capsys.readouterr()
    sft.main(argv)
    assert "skipped" in capsys.readouterr().out and os.path.getmtime(os.path.join(out, "eval.json")) == mtime


def test_eval_names_must_be_distinct_and_the_reference_one_of_them(tmp_path, capsys):
    base, _ = tiny_run_files(tmp_path)
    with pytest.raises(ConfigError, match="two checkpoints named 'a'"):
        sft.named_checkpoints([f"a={base}", f"a={base}"])
    with pytest.raises(SystemExit):
        sft.main(["--eval", f"a={base}", f"b={base}", "--reference", "c", "--eval-tasks", "2", "--device", "cpu"])
    assert "error: --reference c: not one of the --eval names (a, b)" in capsys.readouterr().err
