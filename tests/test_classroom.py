"""Tests for tests/classroom.py: the markers, the graders on the real project, student copies and bad input."""

import ast
import json
import os
import subprocess
import sys

import pytest

import classroom

ROOT = classroom.ROOT
MODULES = "train_gpt, sft, reward, ppo, dpo, data.dedup, data.tokenizer, kernels.flash_attention"


def run_classroom(*args, cwd=ROOT):
    """`python -m tests.classroom ARGS` in the project (as `make student` / `make grade` run it)."""
    return subprocess.run([sys.executable, "-m", "tests.classroom", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))


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
