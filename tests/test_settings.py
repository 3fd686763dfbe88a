"""settings.py: one declaration per setting → parser, range checks, runtime flags, flags reference;
and the stage scripts' command lines unchanged by the refactor that introduced it."""

import json

import pytest

from cli_surface import FIXTURE, all_surfaces


def test_every_scripts_command_line_is_the_recorded_one():
    """Same flags, defaults, types, choices, nargs and actions as before the settings refactor
    (the fixture was recorded from the hand-written parsers; see tests/cli_surface.py)."""
    with open(FIXTURE) as f:
        recorded = json.load(f)
    now = all_surfaces()
    assert now.keys() == recorded.keys()
    for script in recorded:
        for flag in recorded[script].keys() | now[script].keys():
            assert now[script].get(flag) == recorded[script].get(flag), f"{script} {flag}"


# The runtime flags each script left out of its stage fingerprint before the refactor, written out by hand:
# the derived sets must match them, or every finished stage.json would stop matching (and re-run).
RECORDED_RUNTIME_FLAGS = {
    "train_gpt": {"command", "device", "parallel", "micro_batch_size", "compile", "compile_backend", "log_every",
                  "eval_every", "checkpoint_every", "keep_checkpoints", "resume", "force", "peak_flops", "tp", "pp",
                  "micro_batches"},
    "sft": {"device", "log_every", "eval_batch_size", "force", "chat", "temperature", "top_k", "system",
            "checkpoint_every"},
    "reward": {"device", "log_every", "checkpoint_every", "force"},
    "ppo": {"device", "threads", "log_every", "checkpoint_every", "force"},
    "dpo": {"device", "log_every", "checkpoint_every", "force"},
}


@pytest.mark.parametrize("script", sorted(RECORDED_RUNTIME_FLAGS))
def test_runtime_flags_are_the_recorded_ones(script):
    import importlib
    module = importlib.import_module(script)
    derived = module.TRAIN_RUNTIME_FLAGS if script == "train_gpt" else module.RUNTIME_FLAGS
    assert derived == RECORDED_RUNTIME_FLAGS[script]


@pytest.mark.parametrize("value, check, inside", [
    (1e-9, "> 0", True), (0, "> 0", False), (-1, "> 0", False), (float("nan"), "> 0", False),
    (0, "≥ 0", True), (-1e-9, "≥ 0", False), (2, "≥ 2", True), (1, "≥ 2", False),
    (0, "(0, 1)", False), (0.5, "(0, 1)", True), (1, "(0, 1)", False),
    (0, "[0, 1)", True), (1, "[0, 1)", False), (1, "(0, 1]", True), (0, "(0, 1]", False),
    (0.5, "[0, 0.5]", True), (0.5, "[0, 0.5)", False), (float("nan"), "[0, 1]", False),
    (3.0, "finite", True), (float("inf"), "finite", False), (float("nan"), "finite", False),
])
def test_in_range_reads_the_range_as_written(value, check, inside):
    from settings import in_range
    assert in_range(value, check) is inside


def test_check_ranges_names_the_first_bad_flag_and_skips_unset_ones():
    import argparse
    from dataclasses import dataclass
    from settings import ConfigError, check_ranges, setting

    @dataclass
    class Toy:
        lr: float = setting(1e-3, "learning rate", check="> 0")
        lam: float = setting(0.9, "λ", check="[0, 1]")
        k: int = setting(4, "responses", check="≥ 2", why="a comparison needs two")
        cap: int = setting(None, "optional cap", check="≥ 0", flag="--max-cap")

    def error(**values):
        args = argparse.Namespace(**{"lr": 1e-3, "lam": 0.9, "k": 4, "cap": None, **values})
        try:
            check_ranges(args, Toy)
        except ConfigError as e:
            return str(e)
        return None

    assert error() is None and error(cap=None) is None
    assert error(lr=0) == "--lr must be > 0 (got 0)"
    assert error(lam=1.5, lr=-1) == "--lr must be > 0 (got -1)"  # declaration order
    assert error(lam=1.5) == "--lam must be in [0, 1] (got 1.5)"
    assert error(k=1) == "--k must be ≥ 2: a comparison needs two (got 1)"
    assert error(cap=-3) == "--max-cap must be ≥ 0 (got -3)"


@pytest.mark.parametrize("script, argv, message", [
    ("ppo", ["--lam", "1.5"], "--lam must be in [0, 1] (got 1.5)"),
    ("ppo", ["--gamma", "0"], "--gamma must be in (0, 1] (got 0.0)"),
    ("ppo", ["--length-bias", "inf"], "--length-bias must be a finite number (got inf)"),
    ("ppo", ["--algo", "grpo", "--group-size", "1"], "--group-size must be ≥ 2 for GRPO"),
    ("sft", ["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1) (got 1.0)"),
    ("sft", ["--lr", "0.1", "--min-lr", "0.2"], "--min-lr must be in [0, --lr] (got 0.2)"),
    ("reward", ["--label-noise", "0.7"], "--label-noise must be in [0, 0.5]: above 0.5 labelers mostly invert"),
    ("dpo", ["--label-noise", "0.5"], "--label-noise must be in [0, 0.5) (got 0.5)"),
    ("dpo", ["--orpo-lambda", "-1"], "--orpo-lambda must be ≥ 0 (got -1.0)"),
])
def test_each_stage_reports_a_bad_flag_in_one_line(script, argv, message):
    import importlib
    from settings import ConfigError
    module = importlib.import_module(script)
    with pytest.raises(ConfigError) as error:
        module.validate_args(module.build_parser().parse_args(argv))
    assert str(error.value).startswith(message)


def test_pretraining_model_flags_are_gptconfigs_defaults():
    """One source: the train command's --n-layer, --n-head, … default to GPTConfig's own fields."""
    import train_gpt
    args = train_gpt.build_parser().parse_args(["train"])
    config = train_gpt.GPTConfig()
    for name in ("block_size", "n_layer", "n_head", "n_embd", "dropout"):
        assert getattr(args, name) == getattr(config, name)
    assert args.no_bias is (not config.bias)
    with pytest.raises(train_gpt.ConfigError, match=r"--n-head must be > 0 \(got 0\)"):
        train_gpt.validate_train_args(train_gpt.build_parser().parse_args(["train", "--n-head", "0"]))


@pytest.mark.parametrize("script", ["train_gpt", "sft", "reward", "ppo", "dpo"])
def test_flags_reference_lists_every_flag_with_its_default(script, capsys):
    """`python settings.py --markdown SCRIPT` renders one row per flag of the script's parser."""
    import importlib
    import settings
    module = importlib.import_module(script)
    parser = module.build_parser()
    if script == "train_gpt":
        parser = next(a for a in parser._actions if a.dest == "command").choices["train"]
    settings.main(["--markdown", script])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `--")]
    flags = {row.split("`")[1] for row in rows}
    expected = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == expected and len(rows) == len(expected)
    lr_row = next(row for row in rows if row.startswith("| `--lr`"))
    assert f"`{parser.get_default('lr')}`" in lr_row and "> 0" in lr_row


@pytest.mark.parametrize("script", ["train_gpt", "sft", "reward", "ppo", "dpo"])
def test_help_renders_every_declared_help_line(script):
    """--help works (argparse %-formats help strings: "~20% of the time" must not break it) and shows each
    setting's one-line help, with its default."""
    import importlib
    import settings
    module = importlib.import_module(script)
    parser = module.build_parser()
    if script == "train_gpt":
        parser = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = "".join(parser.format_help().split())  # argparse re-wraps lines, also at hyphens
    for cls in settings.settings_classes(module):
        for f, meta in settings.declared(cls):
            assert "".join(meta["help"].split()) in text, f.name
