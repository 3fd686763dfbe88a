"""Stages: skip a finished one (the bookkeeping shared by every stage of the pipeline).

Every stage — data.prepare, pretraining, SFT, reward model, PPO, DPO, the final evaluation —
writes <out>/stage.json. Its fingerprint is a hash of the flags that change the stage's result and
of the contents of the files it reads, so a second run with the same configuration is skipped,
and an upstream change (a new pretrained model.pt) re-runs everything downstream of it. A stage
killed half-way left stage.json with "complete": false; run again with the same configuration it
resumes from its resume point (train_gpt.save_resume_point / load_resume_point).

Plain JSON and hashing, no torch: it sits at the bottom of the import chain with the rest of data/.
"""

import hashlib
import json
import os
import sys
import time

from data.errors import DataError

STAGE_FILE = "stage.json"
RESUME_FILE = "resume.pt"


def path_digest(path):
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name in (STAGE_FILE, RESUME_FILE) or ".tmp" in name:
                    continue
                digest.update(os.path.relpath(os.path.join(root, name), path).encode())
                digest.update(path_digest(os.path.join(root, name)).encode())
    elif os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        raise DataError(f"{path}: input not found")
    return digest.hexdigest()


def stage_fingerprint(args, runtime_flags=(), inputs=()):
    """The identity of a stage's result: sha256 over its flags (all of argparse's, except those in
    `runtime_flags` that change only speed or printing: --device, --log-every, …) and over the
    contents of its input files or directories. A missing input is left out: the stage's own
    loader then reports it, naming the flag that gave it.

    Where things are is not what they are: --out and the flags naming an input (whose contents
    count instead) are left out too, so a run directory copied or moved elsewhere stays cached."""
    locations = [os.path.normpath(str(path)) for path in inputs if path]

    def names_an_input(value):  # an input itself, or the directory it was found in
        if not isinstance(value, str) or not value:
            return False
        value = os.path.normpath(value)
        return any(loc == value or loc.startswith(value + os.sep) for loc in locations)

    flags = {k: v for k, v in sorted(vars(args).items())
             if k not in runtime_flags and k != "out" and not callable(v) and not names_an_input(v)}
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True, default=str).encode())
    for path in inputs:
        if path and os.path.exists(path):
            digest.update(path_digest(path).encode())
    return digest.hexdigest()[:16]


def read_stage(out_dir):
    """stage.json's contents, or None when there is none (or it is unreadable: then the stage reruns)."""
    try:
        with open(os.path.join(out_dir, STAGE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_stage(out_dir, record):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, STAGE_FILE)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def stage_decision(previous, fingerprint, force=False):
    """What to do given the stage.json found: "skip" (a finished run of this configuration),
    "resume" (an unfinished one) or "fresh" (none, another configuration, or --force)."""
    if previous is None or previous.get("fingerprint") != fingerprint or force:
        return "fresh"
    return "skip" if previous.get("complete") else "resume"


def begin_stage(out_dir, name, fingerprint, force=False):
    """stage_decision for a single-process stage, acted on: a skip is announced; a fresh start
    records the fingerprint as unfinished and drops an old resume point."""
    decision = stage_decision(read_stage(out_dir), fingerprint, force)
    if decision == "skip":
        print(f"[{name}] {out_dir} holds a finished run of this configuration: skipped (--force redoes it)")
    elif decision == "fresh":
        if os.path.exists(os.path.join(out_dir, RESUME_FILE)):
            os.remove(os.path.join(out_dir, RESUME_FILE))
        write_stage(out_dir, {"stage": name, "fingerprint": fingerprint, "complete": False, "started": time.time()})
    return decision


def finished_stage(out_dir, name, fingerprint, force=False):
    """True, announced, when out_dir holds a finished run of this configuration. A stage asks this
    first, before loading anything, and calls begin_stage only once its inputs have loaded: a
    command that fails on a bad flag or file then leaves the record of the previous run alone."""
    if stage_decision(read_stage(out_dir), fingerprint, force) != "skip":
        return False
    print(f"[{name}] {out_dir} holds a finished run of this configuration: skipped (--force redoes it)")
    return True


def finish_stage(out_dir, name, fingerprint, started, summary=None):
    """Mark the stage finished (after its outputs are written) and drop its resume point."""
    if os.path.exists(os.path.join(out_dir, RESUME_FILE)):
        os.remove(os.path.join(out_dir, RESUME_FILE))
    write_stage(out_dir, {"stage": name, "fingerprint": fingerprint, "complete": True,
                          "seconds": round(time.time() - started, 1), "summary": summary or {}})


def exit_torchrun_worker():
    """End a torchrun worker whose stage has finished (its files written and closed) without the
    interpreter's teardown.

    Why: with gloo on CPU (torch 2.13), tearing down the C++ side of torch.distributed at
    interpreter exit sometimes calls std::terminate ("terminate called without an active exception",
    SIGABRT) after the last line of Python has run — seen in 3 of 42 two-rank FSDP resumes
    (tests/test_distributed.py), and once in CI. torchrun then reports the finished run as failed.
    Nothing is left to do by then, so leave at once with status 0, stdout and stderr flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
