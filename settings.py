"""settings.py — every setting of a stage declared once: value, one-line help, allowed range.

Plumbing, not a stage of the pipeline. Each stage script declares its hyperparameters at the top in
one commented dataclass (as CleanRL does), one line per setting:

    @dataclass
    class Hyperparameters:
        beta: float = setting(0.2, "β: weight of the KL penalty to π_ref", check="≥ 0")
        lam: float = setting(0.95, "λ: GAE's bias–variance knob", check="[0, 1]")
        device: str = setting("auto", "cpu, cuda, cuda:1, …", runtime=True)

and everything else is derived from that one place:

    add_settings(parser, Hyperparameters)   the argparse flags (--beta, --lam, --device), help = the comment
    check_ranges(args, Hyperparameters)     one ConfigError per out-of-range flag: "--lam must be in [0, 1] (got 2)"
    runtime_flags(Hyperparameters)          the flags left out of the stage fingerprint (data.stages)
    python settings.py --markdown ppo       the flags reference of a script, as a Markdown table

A range (`check`) is written as it reads in the error message: "> 0", "≥ 0", "≥ 2", "(0, 1)",
"[0, 1)", "(0, 1]", "[0, 0.5]", or "finite". A value of None (an optional flag left unset) is
never checked. Checks that involve two flags (--min-lr ≤ --lr, --rollouts a multiple of
--group-size) are not ranges: they stay as small explicit code in each script's validate_args.
"""

import argparse
import dataclasses
import inspect
import math
import sys
import types
import typing


class ConfigError(ValueError):
    """Bad input the user can fix: a flag out of range, a missing file, a mismatched checkpoint."""


def setting(default, help, *, check=None, why=None, type=None, choices=None, nargs=None, metavar=None,
            action=None, group=None, runtime=False, flag=None):
    """A dataclass field that is also a command-line flag.

    default   the value (also the dataclass attribute's); a list default is copied per instance
    help      one line: what the setting does (argparse's help; the flags reference's text)
    check     the allowed range, as the error message says it (see the module docstring)
    why       a reason appended to the range's error message ("a comparison needs two responses")
    runtime   True for a flag that changes only speed, printing or bookkeeping, not the result
    flag      the option string when it is not --name-with-dashes (e.g. --no-bias for a bias field)
    type, choices, nargs, metavar, action, group: passed to argparse (type is inferred from the
              annotation when left out; a False bool becomes a store_true switch)
    """
    metadata = {"help": help, "check": check, "why": why, "type": type, "choices": choices, "nargs": nargs,
                "metavar": metavar, "action": action, "group": group, "runtime": runtime, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"setting": metadata})
    return dataclasses.field(default=default, metadata={"setting": metadata})


def declared(cls, names=None):
    """The (field, its setting metadata) pairs of a dataclass, in declaration order (or in `names`' order)."""
    found = {f.name: (f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata}
    if names is None:
        return list(found.values())
    return [found[name] for name in names]


def default_of(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_of(f, meta):
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _argparse_type(f, meta):
    """int or float from the annotation (also from `int | None`); None (argparse's str) otherwise."""
    if meta["type"] is not None:
        return meta["type"]
    annotation = f.type
    if isinstance(annotation, (types.UnionType, typing._UnionGenericAlias)):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    return annotation if annotation in (int, float) else None


def add_settings(parser, cls, names=None):
    """Add the flags of dataclass `cls` (all of them, or those in `names`) to an argparse parser,
    each in its `group` (an argument group made once per title). Returns the parser."""
    groups = parser.__dict__.setdefault("_setting_groups", {})
    for f, meta in declared(cls, names):
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kwargs = {"default": default_of(f), "help": meta["help"].replace("%", "%%")}  # argparse formats help with %
        if meta["flag"]:
            kwargs["dest"] = f.name
        if meta["action"]:
            kwargs["action"] = meta["action"]
        if meta["action"] == "store_true" or (meta["action"] is None and f.default is False):
            kwargs["action"] = "store_true"
        else:
            for key in ("choices", "nargs", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
            if _argparse_type(f, meta) is not None:
                kwargs["type"] = _argparse_type(f, meta)
        target.add_argument(flag_of(f, meta), **kwargs)
    return parser


def comma_list(convert):
    """An argparse type: "a,b,c" → [convert(a), convert(b), convert(c)] (empty items dropped)."""
    def parse(text):
        try:
            return [convert(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
    return parse


def build_parser_from(cls, description, formatter_class=argparse.ArgumentDefaultsHelpFormatter):
    """A parser holding exactly the flags of `cls`."""
    return add_settings(argparse.ArgumentParser(description=description, formatter_class=formatter_class), cls)


def in_range(value, check):
    """Whether value lies in `check`: "> 0", "≥ 0", "(0, 1]", "finite", … (NaN lies in no range)."""
    if check == "finite":
        return math.isfinite(value)
    if check[0] in "([":
        low, high = (float(x) for x in check[1:-1].split(","))
        above = value > low if check[0] == "(" else value >= low
        below = value < high if check[-1] == ")" else value <= high
        return above and below
    op, bound = check.split()
    bound = float(bound)
    return {">": value > bound, "≥": value >= bound, "<": value < bound, "≤": value <= bound}[op]


def range_error(flag, value, check, why=None):
    """The one-line message: "--lr must be > 0 (got -1)", "--lam must be in [0, 1] (got 2)"."""
    if check == "finite":
        wording = "a finite number"
    else:
        wording = f"in {check}" if check[0] in "([" else check
    return f"{flag} must be {wording}{': ' + why if why else ''} (got {value})"


def check_ranges(args, *classes):
    """Raise ConfigError naming the first flag (in declaration order) whose value is out of its range."""
    for cls in classes:
        for f, meta in declared(cls):
            value = getattr(args, f.name, None)
            if meta["check"] and value is not None and not in_range(value, meta["check"]):
                raise ConfigError(range_error(flag_of(f, meta), value, meta["check"], meta["why"]))


def runtime_flags(*classes):
    """Names of the settings that change only speed, printing or bookkeeping: data.stages.stage_fingerprint
    leaves them out, so changing one neither re-runs a finished stage nor blocks a resume."""
    return {f.name for cls in classes for f, meta in declared(cls) if meta["runtime"]}


def markdown_table(*classes):
    """The flags reference of some settings classes: flag, default, range, what it does."""
    rows = ["| flag | default | range | what it does |", "|---|---|---|---|"]
    for cls in classes:
        for f, meta in declared(cls):
            default = default_of(f)
            shown = "off" if default is False else ("" if default is None else f"`{default}`")
            allowed = meta["check"] or (" \\| ".join(map(str, meta["choices"])) if meta["choices"] else "")
            what = meta["help"].replace("|", "\\|") + (" *(runtime)*" if meta["runtime"] else "")
            rows.append(f"| `{flag_of(f, meta)}` | {shown} | {allowed} | {what} |")
    return "\n".join(rows)


def settings_classes(module):
    """The settings dataclasses a stage module declares, in the order they appear in its source."""
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
             and declared(obj)]
    return sorted(found, key=lambda cls: inspect.getsourcelines(cls)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description="print a stage script's flags reference")
    parser.add_argument("--markdown", metavar="SCRIPT", required=True,
                        help="train_gpt, sft, reward, ppo or dpo: print its settings as a Markdown table")
    args = parser.parse_args(argv)
    import importlib
    try:
        module = importlib.import_module(args.markdown.removesuffix(".py"))
    except ImportError:
        sys.exit(f"error: --markdown {args.markdown}: no such script")
    classes = settings_classes(module)
    if not classes:
        sys.exit(f"error: --markdown {args.markdown}: declares no settings")
    print(markdown_table(*classes))


if __name__ == "__main__":
    main()
