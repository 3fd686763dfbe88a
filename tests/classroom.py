"""Classroom assignments generated from the code: a student copy with function bodies removed, and its grader.

The teachable functions are wrapped in two marker comments, a `begin` line right before the `def` (or
its decorator) and an `end` line right after the function's last line:

    # classroom: begin get_lr
    def get_lr(step, warmup_steps, total_steps, max_lr, min_lr=None):
        '''Linear warmup from 0, then cosine decay to min_lr (seed 1.8): the formulas...'''
        ...
    # classroom: end get_lr

The name is the function's own name without a leading underscore. Two commands, run from the repository root:

    python -m tests.classroom student --out ../hw1 [--only get_lr,perplexity] [--list]
    python -m tests.classroom grade [--root ../hw1] [--only get_lr,perplexity]

`student` copies the project and replaces each chosen body by `raise NotImplementedError(...)`, keeping
the signature, the decorators and the docstring; the copy lists its assignments in ASSIGNMENT_FILE, which
is what `grade` grades there by default. `grade` runs the tests listed in GRADERS for each
assignment — tests that check one function against an independent computation (a loop, a hand-computed
number), never against another marked function, so a missing function fails its own grader only — and
prints a score table. Both print one `error: ...` line and exit 2 on bad input.
"""

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Assignment → the pytest node ids that grade it, in the order of the pipeline. A node id without
# parameters selects all of its parametrisations. A new assignment also needs a wrong-but-plausible body in
# tests/test_classroom.py (WRONG_BODIES), which its graders must fail.
GRADERS = {
    # data (seed 1.2–1.3)
    "minhash_signatures": ["tests/test_data_dedup.py::test_minhash_signatures_are_the_minimum_of_each_permutation",
                           "tests/test_data_dedup.py::test_minhash_estimate_is_within_three_sigma_of_exact_jaccard",
                           "tests/test_data_dedup.py::test_signatures_do_not_overflow_for_large_hashes"],
    "lsh_probability": ["tests/test_data_dedup.py::test_lsh_probability_by_inclusion_exclusion",
                        "tests/test_data_dedup.py::test_optimal_bands_rows"],
    "sorted_band_candidates": ["tests/test_data_dedup.py::test_sorted_band_candidates_by_brute_force"],
    "naive_bayes_fit": ["tests/test_data_langid.py::test_naive_bayes_fit_by_hand"],
    "hashed_ngram_features": ["tests/test_data_quality.py::test_hashed_ngram_features_by_hand"],
    "merge_pair": ["tests/test_data_tokenizer.py::test_merge_pair_is_left_to_right_and_non_overlapping",
                   "tests/test_data_tokenizer.py::test_merge_pair_matches_str_replace"],
    # pretraining (seed 1.4–1.8)
    "naive_attention": ["tests/test_flash_attention.py::test_naive_attention_matches_loops"],
    "get_lr": ["tests/test_train_gpt.py::test_lr_schedule_endpoints_and_shape"],
    "perplexity": ["tests/test_train_gpt.py::test_perplexity_and_bits_per_byte"],
    "training_flops": ["tests/test_train_gpt.py::test_flop_formulas"],
    "isoflop_minimum": ["tests/test_scaling_laws.py::test_isoflop_minimum_by_hand",
                        "tests/test_scaling_laws.py::test_isoflop_minimum_recovers_the_vertex_of_a_parabola_in_log_n",
                        "tests/test_scaling_laws.py::test_isoflop_minimum_refuses_a_curve_without_a_minimum"],
    # kernels and model parallelism (seed 1.7)
    "forward_over_key_tiles": ["tests/test_flash_attention.py::test_flash_forward_matches_loops"],
    "column_parallel_linear": ["tests/test_parallel.py::test_column_parallel_linear_matches_the_whole_layer"],
    "row_parallel_linear": ["tests/test_parallel.py::test_row_parallel_linear_matches_the_whole_layer"],
    "bubble_fraction": ["tests/test_parallel.py::test_bubble_fraction_matches_a_simulated_schedule"],
    # SFT and the reward model (seed 2.3, 3.3)
    "shift_targets": ["tests/test_sft.py::test_shift_targets_by_hand"],
    "bradley_terry_loss": ["tests/test_reward.py::test_loss_and_probability_match_hand_computation",
                           "tests/test_reward.py::test_margin_and_weights",
                           "tests/test_reward.py::test_loss_is_stable_and_its_gradient_is_sigmoid_minus_one"],
    "noisy_bradley_terry_loss": ["tests/test_reward.py::test_noisy_loss_is_the_flip_likelihood_by_hand",
                                 "tests/test_reward.py::test_noisy_loss_is_bounded_where_plain_bradley_terry_pulls_hardest"],
    "aggregate_comparisons": ["tests/test_reward.py::test_net_wins_restores_a_flip_with_two_answers_between",
                              "tests/test_reward.py::test_net_wins_drops_what_the_votes_tie_and_keeps_a_flip_between_neighbours"],
    "best_of_n_kl": ["tests/test_best_of_n.py::test_best_of_n_kl_by_hand"],
    "best_of_n_expectation": ["tests/test_best_of_n.py::test_best_of_n_expectation_is_the_mean_over_every_subset"],
    # RLHF (seed 3.4)
    "sample_categorical": ["tests/test_train_gpt.py::test_inverse_transform_sampling_draws_each_token_with_its_probability"],
    "exact_kl": ["tests/test_ppo.py::test_exact_kl_by_hand_and_as_the_mean_of_k1"],
    "gae": ["tests/test_ppo.py::test_gae_matches_a_plain_loop",
            "tests/test_ppo.py::test_gae_with_lambda_one_gives_the_monte_carlo_return"],
    "ppo_policy_loss": ["tests/test_ppo.py::test_clipped_policy_loss_by_hand"],
    "value_loss": ["tests/test_ppo.py::test_clipped_value_loss_by_hand"],
    # DPO and its variants (seed 4.3, 4.5)
    "dpo_loss": ["tests/test_dpo.py::test_dpo_loss_is_ln2_when_policy_equals_reference",
                 "tests/test_dpo.py::test_dpo_matches_plain_python",
                 "tests/test_dpo.py::test_dpo_gradient_is_bounded_beta_times_sigmoid_minus_one"],
    "ipo_loss": ["tests/test_dpo.py::test_ipo_loss_and_rewards_by_hand"],
    "simpo_loss": ["tests/test_dpo.py::test_simpo_matches_plain_python"],
    "orpo_loss": ["tests/test_dpo.py::test_orpo_odds_and_loss_match_plain_python"],
    "kto_loss": ["tests/test_dpo.py::test_kto_matches_plain_python_with_zero_reference_point",
                 "tests/test_dpo.py::test_kto_reference_point_is_clamped_and_detached"],
    # the claims, measured (seed 4.2; experiments/alignment_claims.py)
    "optimal_policy": ["tests/test_alignment_claims.py::test_optimal_policy_by_hand",
                       "tests/test_alignment_claims.py::test_optimal_policy_limits_and_overflow",
                       "tests/test_alignment_claims.py::test_optimal_policy_maximises_the_rlhf_objective"],
}

ASSIGNMENT_FILE = "tests/classroom_assignment.txt"  # in a student copy: what `grade` grades by default
MARKER = re.compile(r"^\s*# classroom: (begin|end) (\S+)\s*$")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
GRADE_TIMEOUT = 300  # seconds for one pytest run (all graders together take seconds): a student's endless loop


class ClassroomError(Exception):
    """Bad input or a malformed marker: reported as one `error: ...` line, exit status 2."""


@dataclasses.dataclass
class Exercise:
    name: str
    path: str         # relative to the project root
    function: str     # the def's name
    def_line: int     # 1-based: the first decorator, or the def
    body_start: int   # first line after the docstring
    body_end: int     # the function's last line
    indent: str       # the body's indentation


# ----------------------------------------------------------------------------------------------------------
# Finding the marked functions
# ----------------------------------------------------------------------------------------------------------

def project_files(root):
    """The project's files, relative to root: what git tracks or would track (untracked but not ignored) in a
    git checkout, otherwise every file outside SKIP_DIRS (a student copy has no .git)."""
    if os.path.isdir(os.path.join(root, ".git")) and shutil.which("git"):
        listing = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 capture_output=True, text=True, check=True).stdout
        return sorted(p for p in set(listing.split("\0")) if p and os.path.isfile(os.path.join(root, p)))
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIP_DIRS)
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not n.endswith(".pyc")]
    return sorted(files)


def marker_pairs(lines, path):
    """[(name, begin line, end line)] for the marker comments of one file (1-based line numbers)."""
    pairs, open_name, open_line = [], None, None
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if not match:
            continue
        kind, name = match.groups()
        if kind == "begin":
            if open_name is not None:
                raise ClassroomError(f"{path}:{number}: 'begin {name}' inside 'begin {open_name}' (line {open_line})")
            open_name, open_line = name, number
        else:
            if name != open_name:
                raise ClassroomError(f"{path}:{number}: 'end {name}' does not close "
                                     + (f"'begin {open_name}'" if open_name else "any 'begin'"))
            pairs.append((name, open_line, number))
            open_name = None
    if open_name is not None:
        raise ClassroomError(f"{path}:{open_line}: 'begin {open_name}' is never closed")
    return pairs


def exercise_between(tree, path, name, begin, end):
    """The one function def between a begin and an end marker, which must hold only it."""
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and begin < node.lineno < end]
    outermost = [f for f in functions if not any(g is not f and g.lineno < f.lineno <= g.end_lineno
                                                  for g in functions)]
    where = f"{path}:{begin}: classroom: begin {name}:"
    if len(outermost) != 1:
        raise ClassroomError(f"{where} the markers must wrap exactly one def, found {len(outermost)}")
    node = outermost[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if first != begin + 1 or node.end_lineno != end - 1:
        raise ClassroomError(f"{where} put the markers right before the def (or its decorator) and right after "
                             f"its last line (lines {first - 1} and {node.end_lineno + 1})")
    if node.name.lstrip("_") != name:
        raise ClassroomError(f"{where} the name must be the function's, '{node.name.lstrip('_')}'")
    if ast.get_docstring(node) is None or len(node.body) < 2:
        raise ClassroomError(f"{where} '{node.name}' needs a docstring (the student's specification) and a body")
    docstring, first_statement = node.body[0], node.body[1]
    if docstring.lineno == node.lineno:
        raise ClassroomError(f"{where} put the docstring of '{node.name}' on its own line")
    return Exercise(name, path, node.name, first, docstring.end_lineno + 1, node.end_lineno,
                    " " * first_statement.col_offset)


def find_exercises(root):
    """{name: Exercise} for every marked function of the project under root, in the order of GRADERS.

    Only Python files outside tests/ are searched: this module's own docstring shows a marker."""
    found = {}
    for path in project_files(root):
        if not path.endswith(".py") or path.split(os.sep)[0] == "tests":
            continue
        with open(os.path.join(root, path), encoding="utf-8") as f:
            text = f.read()
        if "# classroom:" not in text:
            continue
        tree = ast.parse(text, filename=path)
        for name, begin, end in marker_pairs(text.splitlines(), path):
            if name in found:
                raise ClassroomError(f"{path}:{begin}: '{name}' is marked twice (also in {found[name].path})")
            found[name] = exercise_between(tree, path, name, begin, end)
    order = list(GRADERS)
    return dict(sorted(found.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def choose(exercises, only):
    """The exercises named in the comma-separated `only` (all of them when it is None)."""
    if only is None:
        return list(exercises.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in exercises]
    if unknown or not names:
        raise ClassroomError(f"unknown assignment {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"known: {', '.join(exercises)}")
    return [exercises[n] for n in exercises if n in names]


# ----------------------------------------------------------------------------------------------------------
# The student copy
# ----------------------------------------------------------------------------------------------------------

def strip_bodies(source, exercises):
    """source with each exercise's body (everything after its docstring) replaced by one raise."""
    lines = source.splitlines(keepends=True)
    for ex in sorted(exercises, key=lambda e: e.body_start, reverse=True):  # bottom up: line numbers hold
        stub = f'{ex.indent}raise NotImplementedError("classroom exercise: {ex.name} — see the docstring")\n'
        lines[ex.body_start - 1:ex.body_end] = [stub]
    return "".join(lines)


def write_student_copy(root, out, exercises):
    """Copy the project files to out, strip the chosen bodies and list them in ASSIGNMENT_FILE.
    Returns the number of files copied."""
    files = project_files(root)
    for path in files:
        os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(root, path), os.path.join(out, path))
    with open(os.path.join(out, ASSIGNMENT_FILE), "w", encoding="utf-8") as f:
        f.write("# The functions to implement in this copy (see their docstrings); `make grade` grades these.\n")
        f.writelines(f"{ex.name}\n" for ex in exercises)
    for path in sorted({ex.path for ex in exercises}):
        target = os.path.join(out, path)
        with open(target, encoding="utf-8") as f:
            stripped = strip_bodies(f.read(), [ex for ex in exercises if ex.path == path])
        ast.parse(stripped, filename=path)  # a stub must never break the file
        with open(target, "w", encoding="utf-8") as f:
            f.write(stripped)
    return len(files)


def check_out_folder(root, out):
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ClassroomError(f"--out {out} already exists and is not an empty folder")
    if os.path.commonpath([out, os.path.abspath(root)]) == os.path.abspath(root):
        raise ClassroomError(f"--out {out} is inside the project; choose a folder outside it (e.g. ../hw1)")
    return out


def student_command(args):
    exercises = find_exercises(ROOT)
    chosen = choose(exercises, args.only)
    if args.list:
        for ex in chosen:
            where = f"{ex.path}:{ex.def_line}"
            print(f"{ex.name:<24} {where:<32} {ex.function}")
        return 0
    if not args.out:
        raise ClassroomError("student needs --out DIR (or --list)")
    out = check_out_folder(ROOT, args.out)
    n_files = write_student_copy(ROOT, out, chosen)
    print(f"wrote {n_files} files to {out}")
    for ex in chosen:
        print(f"  exercise {ex.name:<24} {ex.path}:{ex.def_line}")
    print(f"students implement them, then run `make grade` (or `python -m tests.classroom grade`) in {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------------------

# The grading run loads this module into pytest as a plugin (`-p classroom`): these two hooks append one JSON
# line per test outcome to the file named by CLASSROOM_OUTCOMES. A module that fails to import is reported by
# pytest_collectreport, against the module's own node id.

def _record(nodeid, outcome):
    path = os.environ.get("CLASSROOM_OUTCOMES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"nodeid": nodeid, "outcome": outcome}) + "\n")


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid, "error")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # setup/teardown only count when they fail or skip
        _record(report.nodeid, report.outcome)


def grading_env(outcomes_file):
    """The grader's environment: this module importable as the plugin `classroom`, Triton in its interpreter
    when there is no GPU (as tests/conftest.py does), and where to write the outcomes."""
    env = dict(os.environ, CLASSROOM_OUTCOMES=outcomes_file)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                      env.get("PYTHONPATH")]))
    if shutil.which("nvidia-smi") is None:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_pytest(root, node_ids, quiet):
    """Run pytest on node_ids in root; {node id: outcome}, or None when pytest did not finish its run (a crash,
    a node id it cannot find, the time limit)."""
    with tempfile.TemporaryDirectory() as tmp:
        outcomes_file = os.path.join(tmp, "outcomes.jsonl")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "classroom",
                   "--tb=short", "--continue-on-collection-errors", *node_ids]
        output = subprocess.DEVNULL if quiet else None
        try:
            returncode = subprocess.run(command, cwd=root, env=grading_env(outcomes_file), stdout=output,
                                        stderr=output, timeout=GRADE_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            return None
        if returncode not in (0, 1) or not os.path.exists(outcomes_file):
            return None
        outcomes = {}
        with open(outcomes_file, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if outcomes.get(record["nodeid"], "passed") == "passed":  # keep a test's first non-pass
                    outcomes[record["nodeid"]] = record["outcome"]
        return outcomes


def score(node_ids, outcomes):
    """(tests passed, tests in all) for one assignment. A node id with no outcome of its own — its module
    failed to import, or the run never finished — counts as one failed test."""
    passed = total = 0
    for node_id in node_ids:
        module = node_id.split("::")[0]
        mine = [o for n, o in outcomes.items() if n == node_id or n.startswith(node_id + "[")]
        if not mine or outcomes.get(module) == "error":
            mine = ["error"]
        passed += sum(o == "passed" for o in mine)
        total += len(mine)
    return passed, total


def check_root(root):
    if not os.path.isdir(root):
        raise ClassroomError(f"--root {root} is not a folder")
    exercises = find_exercises(root)
    if not exercises:
        raise ClassroomError(f"no classroom markers under {root}: is it the project or a student copy of it?")
    missing = sorted({n.split("::")[0] for ids in GRADERS.values() for n in ids
                      if not os.path.isfile(os.path.join(root, n.split("::")[0]))})
    if missing:
        raise ClassroomError(f"{root} lacks the grading tests {', '.join(missing)}")
    return exercises


def warn_if_tests_differ(root):
    """Grading runs the tests of the folder it grades: say so when a submission's grading tests differ from ours."""
    if os.path.samefile(root, ROOT):
        return
    for test_file in sorted({n.split("::")[0] for ids in GRADERS.values() for n in ids}):
        with open(os.path.join(root, test_file), "rb") as theirs, open(os.path.join(ROOT, test_file), "rb") as ours:
            if theirs.read() != ours.read():
                print(f"warning: {test_file} in {root} differs from {ROOT}'s: the grade uses the submission's copy")


def print_table(rows):
    print(f"\n{'assignment':<24} {'file':<28} {'tests':>7} {'score':>6}")
    for name, path, passed, total in rows:
        print(f"{name:<24} {path:<28} {f'{passed}/{total}':>7} {100 * passed / total:>5.0f}%")
    passed, total = sum(r[2] for r in rows), sum(r[3] for r in rows)
    complete = sum(r[2] == r[3] for r in rows)
    print(f"{'total':<24} {f'{complete}/{len(rows)} assignments complete':<28} {f'{passed}/{total}':>7} "
          f"{100 * passed / total:>5.0f}%")


def assigned(root):
    """The assignments a student copy lists in ASSIGNMENT_FILE, comma-separated; None in the project itself."""
    path = os.path.join(root, ASSIGNMENT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return ",".join(line.strip() for line in f if line.strip() and not line.startswith("#"))


def grade_command(args):
    root = os.path.abspath(args.root)
    exercises = check_root(root)
    graded = [ex for ex in choose(exercises, args.only or assigned(root)) if ex.name in GRADERS]
    warn_if_tests_differ(root)
    # One pytest process for all assignments (a process costs ~2 s of imports); if it does not finish,
    # run one per assignment so that a crash or a hang costs only its own assignment.
    outcomes = run_pytest(root, [n for ex in graded for n in GRADERS[ex.name]], args.quiet)
    if outcomes is None:
        print("note: the grading run did not finish; grading each assignment on its own")
        outcomes = {}
        for ex in graded:
            outcomes.update(run_pytest(root, GRADERS[ex.name], args.quiet) or {})
    rows = [(ex.name, ex.path, *score(GRADERS[ex.name], outcomes)) for ex in graded]
    print_table(rows)
    return 0 if all(passed == total for _, _, passed, total in rows) else 1


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="python -m tests.classroom", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write a student copy with the marked function bodies removed")
    student.add_argument("--out", help="an empty or new folder, outside the project")
    student.add_argument("--only", help="comma-separated assignments to strip (default: all)")
    student.add_argument("--list", action="store_true", help="list the assignments (file:line) and exit")
    grade = commands.add_parser("grade", help="run each assignment's tests and print a score table")
    grade.add_argument("--root", default=ROOT, help="the project or student copy to grade (default: this one)")
    grade.add_argument("--only", help="comma-separated assignments to grade (default: those of a student copy's "
                       f"{ASSIGNMENT_FILE}, all in the project itself)")
    grade.add_argument("--quiet", action="store_true", help="print the table only, not pytest's output")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return student_command(args) if args.command == "student" else grade_command(args)
    except ClassroomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
