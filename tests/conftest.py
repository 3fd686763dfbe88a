"""Shared pytest set-up: import from the repository root, and run Triton kernels in the
interpreter when there is no GPU (TRITON_INTERPRET must be set before triton is imported)."""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_synthetic_data(directory, vocab_size=64, n_train=40_000, n_val=4_000, seed=0):
    """A prepared-data directory without a tokenizer: shards of a learnable token stream
    (each token mostly determines the next: t_{i+1} = (3·t_i + 1) mod V, with 10% noise)."""
    from data.shards import write_shard

    rng = np.random.default_rng(seed)

    def stream(n):
        tokens = np.empty(n, dtype=np.int64)
        tokens[0] = 0
        for i in range(1, n):
            tokens[i] = (3 * tokens[i - 1] + 1) % vocab_size if rng.random() > 0.1 else rng.integers(vocab_size)
        return tokens

    os.makedirs(directory, exist_ok=True)
    write_shard(os.path.join(directory, "train_000000.bin"), stream(n_train), vocab_size)
    write_shard(os.path.join(directory, "val_000000.bin"), stream(n_val), vocab_size)
    meta = {"vocab_size": vocab_size, "eot_token": vocab_size - 1, "tokenizer": "tokenizer",
            "train_shards": ["train_000000.bin"], "val_shards": ["val_000000.bin"],
            "train_tokens": n_train, "val_tokens": n_val, "val_bytes": 3 * n_val}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`).
    Its models are tiny: one thread is faster than two, and far faster when other jobs share the
    machine's 2 cores (two spinning OpenMP threads made the SFT tests ~20× slower; a small matmul
    went from 0.1 ms to 8 ms). Module-scoped, so that the module's own module-scoped fixtures
    (models trained once) also run on one thread."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return write_synthetic_data(str(tmp_path_factory.mktemp("data")))


def interrupt_on_call(monkeypatch, module, name, call):
    """Simulate Ctrl-C: `module.name` raises KeyboardInterrupt on its `call`-th call (1-based) —
    how the tests of stage resumption stop a run half-way. monkeypatch.undo() lifts it."""
    original, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def without_timings(records):
    """metrics.jsonl records without their wall-clock measurements (seconds, time_*, *_per_sec, mfu),
    which differ between two runs that compute the same numbers."""
    def is_timing(key):
        return key == "seconds" or key == "mfu" or key.startswith("time_") or key.endswith("per_sec")
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def torchrun(nproc, argv, timeout=240, script="train_gpt.py"):
    """`torchrun --standalone --nproc_per_node=nproc script argv` on CPU (gloo, one thread per process); its
    stdout. A failure or a hang fails the test with the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *argv]
    # A session of its own, so that on a hang the workers die with torchrun instead of lingering.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout}s: {stdout[-2000:]}{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout
