"""The command-line surface of every stage script: for each flag, its default, type, choices,
nargs, action and whether it is required — what a user can type and what it means, help text
aside. tests/fixtures/cli_surface.json was recorded from the parsers as they were *before* the
settings refactor (issue 23, step 0: `python tests/cli_surface.py --record`, run once at
commit b635a85); test_settings.py checks that the parsers derived from the declarations still
produce exactly that surface. Re-record only when a flag is meant to change, and say so."""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "cli_surface.json")
SCRIPTS = ("train_gpt", "sft", "reward", "ppo", "dpo")
PROBES = ("1,2", "0.5", "x")


def describe_type(convert):
    """A type callable by what it does: its name and what it makes of a few probe strings (so that
    comma_list(int) and comma_list(float), both named `parse`, differ)."""
    if convert is None:
        return None
    results = []
    for probe in PROBES:
        try:
            results.append(repr(convert(probe)))
        except Exception as e:  # noqa: BLE001 — the kind of refusal is part of the surface
            results.append(type(e).__name__)
    return f"{getattr(convert, '__name__', type(convert).__name__)}: {' | '.join(results)}"


def parser_surface(parser):
    """{flag or dest: {...}} for every argument of parser; subcommands nest under 'command NAME'."""
    surface = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                surface[f"command {name}"] = parser_surface(sub)
            continue
        key = action.option_strings[-1] if action.option_strings else action.dest
        surface[key] = {"dest": action.dest, "options": list(action.option_strings), "action": type(action).__name__,
                        "default": repr(action.default), "type": describe_type(action.type),
                        "choices": None if action.choices is None else list(action.choices),
                        "nargs": action.nargs, "const": repr(action.const), "required": action.required}
    return surface


def all_surfaces():
    sys.path.insert(0, ROOT)
    import importlib
    return {name: parser_surface(importlib.import_module(name).build_parser()) for name in SCRIPTS}


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/cli_surface.py --record   "
                 "(overwrites the fixture: only when a flag is meant to change)")
    with open(FIXTURE, "w") as f:
        json.dump(all_surfaces(), f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    print(f"recorded {FIXTURE}")
