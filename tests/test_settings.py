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
