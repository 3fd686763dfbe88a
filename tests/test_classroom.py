"""Tests for tests/classroom.py: the markers, the graders on the real project, student copies, wrong answers
and bad input."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import classroom

ROOT = classroom.ROOT
MODULES = ("train_gpt, sft, reward, ppo, dpo, data.dedup, data.tokenizer, kernels.flash_attention, "
           "parallel.tensor, parallel.pipeline")


def run_classroom(*args, cwd=ROOT, env=None):
    """`python -m tests.classroom ARGS` in the project (as `make student` / `make grade` run it)."""
    return subprocess.run([sys.executable, "-m", "tests.classroom", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {})))


def table_scores(output):
    """{assignment: 'passed/total'} from the grade table."""
    rows = (line.split() for line in output.splitlines())
    return {row[0]: row[-2] for row in rows if row and row[0] in classroom.GRADERS}


def failing(output):
    return {name for name, tests in table_scores(output).items() if tests.split("/")[0] != tests.split("/")[1]}


# ----------------------------------------------------------------------------------------------------------
# The markers and the grader table
# ----------------------------------------------------------------------------------------------------------

def test_every_marked_function_has_a_docstring_and_a_grader_of_its_own():
    exercises = classroom.find_exercises(ROOT)
    assert list(exercises) == list(classroom.GRADERS)   # every name graded, every grader marked, same order
    for ex in exercises.values():
        with open(os.path.join(ROOT, ex.path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert lines[ex.def_line - 2] == f"# classroom: begin {ex.name}"
        assert lines[ex.body_end] == f"# classroom: end {ex.name}"
        assert ex.def_line < ex.body_start <= ex.body_end
    node_ids = [n for ids in classroom.GRADERS.values() for n in ids]
    assert len(node_ids) == len(set(node_ids))           # no test grades two assignments
    for node_id in node_ids:                             # and each one exists
        path, test_name = node_id.split("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tests = {node.name for node in ast.parse(f.read()).body if isinstance(node, ast.FunctionDef)}
        assert test_name in tests, node_id


# ----------------------------------------------------------------------------------------------------------
# Grading the project itself, and student copies
# ----------------------------------------------------------------------------------------------------------

def test_the_project_passes_every_grader():
    result = run_classroom("grade", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    scores = table_scores(result.stdout)
    assert set(scores) == set(classroom.GRADERS) and not failing(result.stdout)
    assert f"{len(scores)}/{len(scores)} assignments complete" in result.stdout


def test_a_student_copy_imports_and_fails_exactly_the_stripped_graders(tmp_path):
    # naive_attention is the likeliest to leak: it is the reference of the other flash-attention tests.
    stripped = {"naive_attention", "gae", "minhash_signatures"}
    out = tmp_path / "hw"
    result = run_classroom("student", "--out", str(out), "--only", ",".join(sorted(stripped)))
    assert result.returncode == 0, result.stderr
    assert (out / "train_gpt.py").is_file() and not (out / ".venv").exists() and not (out / "runs").exists()
    imported = subprocess.run([sys.executable, "-c", f"import {MODULES}"], cwd=out, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr

    # By default a student copy grades its own assignments (tests/classroom_assignment.txt) ...
    graded = run_classroom("grade", "--root", str(out), "--quiet")
    assert graded.returncode == 1, graded.stdout + graded.stderr
    assert set(table_scores(graded.stdout)) == failing(graded.stdout) == stripped
    # ... and graded on everything, exactly the stripped functions fail: no grader depends on another one.
    graded = run_classroom("grade", "--root", str(out), "--quiet", "--only", ",".join(classroom.GRADERS))
    assert graded.returncode == 1, graded.stdout + graded.stderr
    assert set(table_scores(graded.stdout)) == set(classroom.GRADERS)
    assert failing(graded.stdout) == stripped
    # A submission runs its own tests: the teacher is told when they were changed.
    with open(out / "tests" / "test_sft.py", "a") as f:
        f.write("\n# edited by the student\n")
    graded = run_classroom("grade", "--root", str(out), "--quiet", "--only", "shift_targets")
    assert graded.returncode == 0 and "warning: tests/test_sft.py" in graded.stdout, graded.stdout


def test_stripped_bodies_raise_and_docstrings_stay(tmp_path):
    out = str(tmp_path / "hw")
    exercises = list(classroom.find_exercises(ROOT).values())
    classroom.write_student_copy(ROOT, out, exercises)

    def functions(root, path):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}

    for ex in exercises:
        original, stub = functions(ROOT, ex.path)[ex.function], functions(out, ex.path)[ex.function]
        assert ast.get_docstring(stub) == ast.get_docstring(original)
        assert ast.dump(stub.args) == ast.dump(original.args)
        assert [ast.dump(d) for d in stub.decorator_list] == [ast.dump(d) for d in original.decorator_list]
        assert len(stub.body) == 2 and isinstance(stub.body[1], ast.Raise)
    # Everything else is untouched: only the stripped lines differ.
    with open(os.path.join(ROOT, "train_gpt.py"), encoding="utf-8") as f:
        ours = f.read().splitlines()
    with open(os.path.join(out, "train_gpt.py"), encoding="utf-8") as f:
        theirs = f.read().splitlines()
    removed = sum(ex.body_end - ex.body_start for ex in exercises if ex.path == "train_gpt.py")
    assert len(ours) - len(theirs) == removed and ours[:10] == theirs[:10] and ours[-10:] == theirs[-10:]

    # Calling each stub (a @triton.jit one through its Python function, .fn) raises NotImplementedError.
    calls = [(ex.path[:-3].replace("/", "."), ex.function, ex.name) for ex in exercises]
    script = f"""
import importlib, inspect, json
raised = {{}}
for module, function, name in {calls!r}:
    fn = getattr(importlib.import_module(module), function)
    fn = getattr(fn, "fn", fn)
    required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
    try:
        fn(*[None] * len(required))
    except NotImplementedError as e:
        raised[name] = str(e)
print(json.dumps(raised))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    raised = json.loads(result.stdout)
    assert set(raised) == {ex.name for ex in exercises}
    assert all(message.startswith(f"classroom exercise: {name}") for name, message in raised.items())


# ----------------------------------------------------------------------------------------------------------
# Wrong answers: a body that returns something plausible but wrong must fail its grader too
# ----------------------------------------------------------------------------------------------------------

# One mistake a student could plausibly make per assignment, written as the body that follows the docstring
# (in the names of the function's own module). The stubs above only show that a *missing* function fails.
WRONG_BODIES = {
    "minhash_signatures": """
        a, b = permutation_parameters(num_perm, seed)
        signatures = np.empty((len(shingle_sets), num_perm), dtype=np.uint64)
        for d, shingles in enumerate(shingle_sets):  # (a·h + b) mod p straight in uint64: a·h wraps past 2^64
            h = np.asarray(shingles, dtype=np.uint64)
            signatures[d] = ((a[:, None] * h[None, :] + b[:, None]) % MERSENNE_61).min(axis=1)
        return signatures
        """,
    "lsh_probability": """
        s = np.asarray(s, dtype=np.float64)
        return 1.0 - (1.0 - s ** bands) ** rows  # bands and rows swapped
        """,
    "sorted_band_candidates": """
        keys = np.asarray(keys)
        order = np.argsort(keys, kind="stable")
        pairs = [np.zeros((0, 2), dtype=np.int64)]
        for key in np.unique(keys):  # every bucket in full: a bucket of 10,000 documents gives 50 million pairs
            members = order[keys[order] == key].astype(np.int64)
            i, j = np.triu_indices(len(members), 1)
            pairs.append(np.stack([members[i], members[j]], axis=1))
        return np.concatenate(pairs)
        """,
    "naive_bayes_fit": """
        counts = np.asarray(counts, dtype=np.float64)
        documents_per_class = np.asarray(documents_per_class, dtype=np.float64)
        log_prior = np.log(documents_per_class / documents_per_class.sum())
        totals = counts.sum(axis=1, keepdims=True)
        return log_prior, np.log(counts + alpha) - np.log(totals + alpha)  # α once, not α·G: P(g | c) sums past 1
        """,
    "hashed_ngram_features": """
        words = text_word_hashes(text)
        pieces = [ngram_hashes(words, n) for n in range(1, word_ngrams + 1)]  # orders not tagged
        if char_ngrams:
            code_points = _code_points(" ".join(text.lower().split()))
            starts = np.arange(max(len(code_points) - char_ngrams + 1, 0))
            pieces.append(_substring_hashes(code_points, starts, starts + char_ngrams))
        hashes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
        return (_fmix64(hashes) % np.uint64(num_buckets)).astype(np.int64)
        """,
    "merge_pair": """
        a, b = pair
        for i in range(len(word) - 1):  # only the first occurrence
            if word[i] == a and word[i + 1] == b:
                return list(word[:i]) + [new_id] + list(word[i + 2:])
        return list(word)
        """,
    "naive_attention": """
        T, D = q.shape[-2], q.shape[-1]
        sm_scale = 1.0 if sm_scale is None else sm_scale  # the 1/√d scale forgotten
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) * sm_scale
        scores = scores.masked_fill(~reference_attention_mask(T, causal, doc_ids, q.device), float("-inf"))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        out = torch.softmax(scores, dim=-1).to(q.dtype) @ v
        if return_lse:
            return out, torch.logsumexp(scores, dim=-1)
        return out
        """,
    "get_lr": """
        min_lr = max_lr / 10 if min_lr is None else min_lr
        if step >= total_steps:  # no warmup: the cosine starts at max_lr on step 0
            return min_lr
        return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))
        """,
    "optimal_policy": """
        logits = np.asarray(rewards, dtype=np.float64) / beta  # π_ref forgotten: a softmax of r/β alone
        logits -= logits.max()
        weights = np.exp(logits)
        return weights / weights.sum()
        """,
    "perplexity": """
        return 2 ** mean_nll  # base 2, but the NLL is in nats
        """,
    "training_flops": """
        return 2 * n_params * n_tokens  # the forward pass only
        """,
    "isoflop_minimum": """
        x = np.asarray(n_params, dtype=np.float64)  # the parabola in N, not in ln N
        y = np.asarray(losses, dtype=np.float64)
        if len(x) < 3:
            raise ValueError(f"an IsoFLOP parabola needs at least 3 runs, got {len(x)}")
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            raise ValueError("the losses do not curve upward in ln N: no minimum inside these sizes")
        return float(-c1 / (2 * c2)), float(c0 - c1 * c1 / (4 * c2))
        """,
    "forward_over_key_tiles": """
        for n0 in range(start, end, BLOCK_N):
            k_rows = n0 + tl.arange(0, BLOCK_N)
            k = _load_rows(K_head, k_rows, cols, stride_kt, T, HEAD_DIM, UPCAST)
            v = _load_rows(V_head, k_rows, cols, stride_vt, T, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if APPLY_MASK:
                doc_k = k_rows
                if HAS_DOCS:
                    doc_k = tl.load(Doc_row + k_rows, mask=k_rows < T, other=-1)
                s = tl.where(_is_allowed(q_rows, k_rows, doc_q, doc_k, T, CAUSAL, HAS_DOCS), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # acc not rescaled by α
            m_i = m_new
        return acc, m_i, l_i
        """,
    "column_parallel_linear": """
        return F.linear(x, weight, bias)  # the forward is right; without f, ∂L/∂X is this rank's term alone
        """,
    "row_parallel_linear": """
        return SumOverTensorParallel.apply(F.linear(x, weight, bias), group)  # the bias summed k times
        """,
    "bubble_fraction": """
        return (stages - 1) / micro_batches  # the idle time relative to the compute, not to the whole step
        """,
    "shift_targets": """
        targets = torch.where(mask[:, :-1].bool(), ids[:, 1:], IGNORE_INDEX)  # the mask of the input, not the target
        return ids[:, :-1], targets
        """,
    "bradley_terry_loss": """
        losses = -torch.log(torch.sigmoid(r_chosen - r_rejected - margin))  # −inf once σ underflows
        if weights is None:
            return losses.mean()
        return (weights * losses).sum() / weights.sum()
        """,
    "noisy_bradley_terry_loss": """
        p = (1 - noise) * torch.sigmoid(r_chosen - r_rejected) + noise  # forgets that a flip also removes a true label
        log_p = torch.log(p)
        if weights is None:
            return -log_p.mean()
        return -(weights * log_p).sum() / weights.sum()
        """,
    "best_of_n_kl": """
        return math.log(n)  # the KL of the best of n, forgetting the −(n − 1)/n term
        """,
    "best_of_n_expectation": """
        N = len(proxy)
        if not 1 <= n <= N:
            raise ValueError(f"best-of-{n} needs at least {n} samples, got {N}")
        order = sorted(range(N), key=lambda i: proxy[i])  # ties broken by position, not shared
        total = math.comb(N, n)
        return sum(math.comb(i - 1, n - 1) / total * values[order[i - 1]] for i in range(n, N + 1))
        """,
    "sample_categorical": """
        cdf = probs.float().cumsum(dim=-1)
        u = torch.rand(1, device=probs.device, generator=generator)  # one u for the whole batch: every row alike
        return torch.searchsorted(cdf, u.expand(probs.shape[0], 1) * cdf[:, -1:], right=True).squeeze(1)
        """,
    "aggregate_comparisons": """
        score = net_wins(records)
        aggregated = []
        for r in records:  # re-oriented, but the truth fields stay with the old orientation
            key = json.dumps(r["prompt"])
            margin = score[key, r["chosen"]] - score[key, r["rejected"]]
            if margin != 0:
                aggregated.append(r if margin > 0 else {**r, "chosen": r["rejected"], "rejected": r["chosen"]})
        return aggregated
        """,
    "exact_kl": """
        log_p, log_q = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(ref_logits.float(), dim=-1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)  # KL(π_ref ‖ π_θ), the wrong direction
        """,
    "gae": """
        values = values * mask
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(rewards[:, 0])
        next_advantage = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantages[:, t] = (delta + gamma * next_advantage) * mask[:, t]  # λ forgotten
            next_value, next_advantage = values[:, t], advantages[:, t]
        return advantages, (advantages + values) * mask
        """,
    "ppo_policy_loss": """
        mask = mask.bool()
        log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
        advantages = torch.where(mask, advantages, 0.0)
        ratio = log_ratio.exp()
        objective = torch.max(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)  # optimistic
        loss = -masked_mean(objective, mask)
        with torch.no_grad():
            stats = {"ratio_mean": masked_mean(ratio, mask).item(),
                     "clip_fraction": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                     "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()}
        return loss, stats
        """,
    "value_loss": """
        mask = mask.bool()
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        squared_errors = torch.min((values - returns) ** 2, (clipped - returns) ** 2)  # min: not pessimistic
        loss = 0.5 * masked_mean(squared_errors, mask)
        with torch.no_grad():
            clip_fraction = masked_mean(((clipped - returns) ** 2 < (values - returns) ** 2).float(), mask).item()
        return loss, {"value_clip_fraction": clip_fraction}
        """,
    "dpo_loss": """
        chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
        rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
        loss = -F.logsigmoid(chosen_log_ratios - rejected_log_ratios).mean()  # β forgotten
        chosen_rewards = beta * chosen_log_ratios.detach()
        rejected_rewards = beta * rejected_log_ratios.detach()
        reward_accuracies = (chosen_rewards > rejected_rewards).float()
        return loss, chosen_rewards.mean(), rejected_rewards.mean(), reward_accuracies.mean()
        """,
    "ipo_loss": """
        chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
        rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
        loss = ((chosen_log_ratios - rejected_log_ratios - 1 / beta) ** 2).mean()  # target 1/β, not 1/(2β)
        chosen_rewards = beta * chosen_log_ratios.detach()
        rejected_rewards = beta * rejected_log_ratios.detach()
        return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
        """,
    "simpo_loss": """
        chosen_rewards = beta * policy_chosen_avg_logps
        rejected_rewards = beta * policy_rejected_avg_logps
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards + gamma).mean()  # the margin's sign flipped
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
        """,
    "orpo_loss": """
        chosen_log_odds = log_odds(policy_chosen_avg_logps)
        rejected_log_odds = log_odds(policy_rejected_avg_logps)
        odds_ratio_term = -F.logsigmoid(policy_chosen_avg_logps - policy_rejected_avg_logps)  # log-probs, not odds
        loss = (-policy_chosen_avg_logps + odds_ratio_weight * odds_ratio_term).mean()
        chosen_rewards, rejected_rewards = chosen_log_odds.detach(), rejected_log_odds.detach()
        return loss, chosen_rewards.mean(), rejected_rewards.mean(), (chosen_rewards > rejected_rewards).float().mean()
        """,
    "kto_loss": """
        rewards = policy_logps - reference_logps
        desirable_values = desirable_weight * torch.sigmoid(beta * rewards)  # the reference point z_ref forgotten
        undesirable_values = undesirable_weight * torch.sigmoid(-beta * rewards)
        losses = torch.where(is_desirable, desirable_weight - desirable_values, undesirable_weight - undesirable_values)
        implicit_rewards = beta * rewards.detach()
        return (losses.mean(), implicit_rewards[is_desirable].mean(), implicit_rewards[~is_desirable].mean(),
                reference_point)
        """,
}

# Put on the wrong copy's import path and loaded into its grading run as a pytest plugin (PYTEST_PLUGINS): each
# wrong body first calls `called(name)`, which notes the test it ran in (pytest sets PYTEST_CURRENT_TEST), and
# the hook notes the exception each failing test raised — so the test below can tell whose wrong body a grader
# met, and that it failed on a wrong answer (an assertion) rather than on a crash.
RECORDER = '''# Written by tests/test_classroom.py.
import json
import os
import re

_noted = set()


def _note(kind, test, what):
    test = test.split("[")[0]
    if (kind, test, what) not in _noted:
        _noted.add((kind, test, what))
        with open(os.environ["WRONG_BODY_RECORD"], "a", encoding="utf-8") as f:
            f.write(json.dumps([kind, test, what]) + "\\n")


def called(name):
    _note("called", os.environ.get("PYTEST_CURRENT_TEST", "(outside a test)").rsplit(" (", 1)[0], name)


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        _note("raised", item.nodeid, call.excinfo.typename)
'''


def write_wrong_copy(out, exercises):
    """A copy of the project in which every exercise's body is its WRONG_BODIES entry, preceded by a call to
    `called` (not in a @triton.jit function compiled for a GPU: only the interpreter runs Python there)."""
    classroom.write_student_copy(ROOT, out, [])
    for path in sorted({ex.path for ex in exercises}):
        with open(os.path.join(out, path), encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        for ex in sorted((e for e in exercises if e.path == path), key=lambda e: e.body_start, reverse=True):
            body = textwrap.indent(textwrap.dedent(WRONG_BODIES[ex.name]).strip("\n") + "\n", ex.indent)
            if recorded(ex):
                body = f'{ex.indent}__import__("wrong_body_calls").called("{ex.name}")\n' + body
            lines[ex.body_start - 1:ex.body_end] = [body]
        source = "".join(lines)
        ast.parse(source, filename=path)
        with open(os.path.join(out, path), "w", encoding="utf-8") as f:
            f.write(source)


def recorded(ex):
    """Whether the wrong body of ex can note its calls: any Python function, a Triton one only in the interpreter."""
    with open(os.path.join(ROOT, ex.path), encoding="utf-8") as f:
        jit = f.read().splitlines()[ex.def_line - 1].strip() == "@triton.jit"
    return not jit or os.environ.get("TRITON_INTERPRET") == "1"


def test_wrong_bodies_fail_their_own_graders(tmp_path):
    exercises = classroom.find_exercises(ROOT)
    assert set(WRONG_BODIES) == set(exercises)  # every assignment has its wrong body here
    out, recorder, record = tmp_path / "wrong", tmp_path / "recorder", tmp_path / "record.jsonl"
    write_wrong_copy(str(out), list(exercises.values()))
    recorder.mkdir()
    (recorder / "wrong_body_calls.py").write_text(RECORDER)
    graded = run_classroom("grade", "--root", str(out), "--quiet", "--only", ",".join(classroom.GRADERS),
                           env={"PYTHONPATH": str(recorder), "PYTEST_PLUGINS": "wrong_body_calls",
                                "WRONG_BODY_RECORD": str(record)})
    assert graded.returncode == 1, graded.stdout + graded.stderr
    assert set(table_scores(graded.stdout)) == failing(graded.stdout) == set(classroom.GRADERS), graded.stdout
    # Each grader failed on its own assignment's wrong body (the only one its tests ran), by an assertion.
    assignment_of = {node_id: name for name, ids in classroom.GRADERS.items() for node_id in ids}
    met, raised = {name: set() for name in classroom.GRADERS}, {name: set() for name in classroom.GRADERS}
    for kind, test, what in map(json.loads, record.read_text().splitlines()):
        (met if kind == "called" else raised)[assignment_of[test]].add(what)
    for name, ex in exercises.items():
        assert met[name] == ({name} if recorded(ex) else set()), (name, met[name])
        assert raised[name] and raised[name] <= {"AssertionError", "Failed"}, (name, raised[name])  # or pytest.fail


# ----------------------------------------------------------------------------------------------------------
# Bad input: one `error: ...` line, exit status 2
# ----------------------------------------------------------------------------------------------------------

def assert_error(capsys, argv, expected):
    assert classroom.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_bad_command_lines(tmp_path, capsys):
    assert_error(capsys, ["student", "--list", "--only", "get_lr,nope"], "unknown assignment 'nope'")
    assert_error(capsys, ["grade", "--only", "nope"], "unknown assignment 'nope'")
    assert_error(capsys, ["student"], "--out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert_error(capsys, ["student", "--out", str(tmp_path / "full")], "not an empty folder")
    inside = os.path.join(ROOT, "runs", "classroom-test-copy")
    assert_error(capsys, ["student", "--out", inside], "inside the project")
    assert not os.path.exists(inside)
    assert_error(capsys, ["grade", "--root", str(tmp_path / "missing")], "not a folder")
    assert_error(capsys, ["grade", "--root", str(tmp_path)], "no classroom markers")


MALFORMED = {
    "no def": ("# classroom: begin f\nX = 1\n# classroom: end f\n", "exactly one def"),
    "two defs": ('# classroom: begin f\ndef f():\n    """d"""\n    return 1\ndef g():\n    """d"""\n    return 2\n'
                 "# classroom: end f\n", "exactly one def"),
    "never closed": ('# classroom: begin f\ndef f():\n    """d"""\n    return 1\n', "never closed"),
    "wrong end": ('# classroom: begin f\ndef f():\n    """d"""\n    return 1\n# classroom: end g\n', "does not close"),
    "wrong name": ('# classroom: begin g\ndef f():\n    """d"""\n    return 1\n# classroom: end g\n', "function's"),
    "no docstring": ("# classroom: begin f\ndef f():\n    return 1\n# classroom: end f\n", "docstring"),
    "gap": ('# classroom: begin f\n\ndef f():\n    """d"""\n    return 1\n# classroom: end f\n', "right before"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_markers_are_refused(tmp_path, capsys, case):
    source, expected = MALFORMED[case]
    (tmp_path / "lesson.py").write_text(source)
    with pytest.raises(classroom.ClassroomError, match=expected):
        classroom.find_exercises(str(tmp_path))
    assert_error(capsys, ["grade", "--root", str(tmp_path)], "lesson.py:")


def test_stripping_keeps_signature_decorators_and_docstring():
    source = ('import functools\n\n\n# classroom: begin area\n@functools.lru_cache()\ndef area(w, h=2):\n'
              '    """w · h"""\n    # a comment\n    return w * h\n# classroom: end area\n\n\nAFTER = 1\n')
    tree = ast.parse(source)
    ex = classroom.exercise_between(tree, "lesson.py", "area", 4, 10)
    assert (ex.def_line, ex.body_start, ex.body_end, ex.indent) == (5, 8, 9, "    ")
    assert classroom.strip_bodies(source, [ex]) == (
        'import functools\n\n\n# classroom: begin area\n@functools.lru_cache()\ndef area(w, h=2):\n'
        '    """w · h"""\n    raise NotImplementedError("classroom exercise: area — see the docstring")\n'
        '# classroom: end area\n\n\nAFTER = 1\n')


# ----------------------------------------------------------------------------------------------------------
# The first-reading path: every signpost leads forward to a section that exists
# ----------------------------------------------------------------------------------------------------------

SIGNPOST = re.compile(r"^# ── first reading: skip to (?:section (\d+)|the end)")
BANNER = re.compile(r"^# (\d+)\. ")


def first_reading(path):
    """(lines a first reading reads, [(signpost line, target section or None for 'the end')]):
    a signpost skips to the next banner of its section, or to the end of the file."""
    lines = open(path, encoding="utf-8").read().split("\n")
    read, signposts, skipping_to = 0, [], False
    for number, line in enumerate(lines, 1):
        if (m := SIGNPOST.match(line)):
            signposts.append((number, m.group(1)))
            skipping_to = m.group(1) or "end"
        elif skipping_to and (b := BANNER.match(line)) and b.group(1) == skipping_to:
            skipping_to = False
        if not skipping_to:
            read += 1
    return read, signposts


@pytest.mark.parametrize("script", ["train_gpt.py", "sft.py", "reward.py", "ppo.py", "dpo.py"])
def test_first_reading_signposts_lead_forward_to_an_existing_section(script):
    path = os.path.join(ROOT, script)
    lines = open(path, encoding="utf-8").read().split("\n")
    banners = {int(b.group(1)): n for n, line in enumerate(lines, 1) if (b := BANNER.match(line))}
    read, signposts = first_reading(path)
    assert signposts, f"{script} has no first-reading signpost"
    for line, target in signposts:
        if target is not None:
            assert int(target) in banners and banners[int(target)] > line, \
                f"{script}:{line}: the signpost skips to section {target}, which does not follow it"
    assert read < len(lines)
