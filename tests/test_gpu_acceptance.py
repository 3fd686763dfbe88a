"""bench/gpu_acceptance.py, the one-command GPU acceptance run: its --dry-run (every part's code path at toy
sizes on the CPU, kernels in the Triton interpreter), its Makefile reader and its failure isolation."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_acceptance as ga  # noqa: E402


def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "acceptance"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_acceptance.py"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "report.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["parts"]) == ["warm-up", "a", "b", "c", "d", "e"]
    for key, part in report["parts"].items():
        assert part["status"] == "ok", (key, part.get("verdict"), part.get("error"))
    assert proc.returncode == 0, proc.stdout[-3000:]

    accuracy = report["parts"]["a"]["results"]
    assert {(r["dtype"], r["mask"]) for r in accuracy} == {(d, m) for d in ("float16", "bfloat16")
                                                            for m in ("causal", "documents")}
    assert all(0 < max(r["ours"]) < 1e-2 and 0 < max(r["sdpa"]) < 1e-2 for r in accuracy)
    speed = [r for r in report["parts"]["b"]["results"] if "method" in r]
    assert {r["method"] for r in speed} == {"ours", "sdpa-flash", "naive"}
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in speed)
    runs = report["parts"]["c"]["results"]
    assert [r["run"] for r in runs] == ["flash", "flash + compile"]
    assert all(r["tokens_per_sec"] > 0 for r in runs)
    checks = report["parts"]["d"]["checks"]
    assert len(checks) == 5 and all(c["ok"] for c in checks)
    assert os.path.exists(out / "work" / "e_tiny" / "ppo" / "model.pt")

    markdown = (out / "report.md").read_text()
    for key in ga.PARTS:
        assert f"## ({key})" in markdown
    assert "| d | T | dtype | mask | O | dQ | dK | dV | verdict |" in markdown


def test_makefile_flags_are_the_presets_own():
    gpu = ga.makefile_flags("gpu", "PRETRAIN")
    assert gpu[:6] == ["--n-layer", "6", "--n-head", "6", "--n-embd", "384"]  # a continued line is joined
    assert "--max-steps" in gpu and "\\" not in gpu
    assert "--families" in ga.makefile_flags("cpu", "SFT")
    assert ga.makefile_flags("cpu", "SFT")[ga.makefile_flags("cpu", "SFT").index("--families") + 1] == "reverse,upper"
    with pytest.raises(KeyError, match="gpu_NOPE"):
        ga.makefile_flags("gpu", "NOPE")


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(sizes, work):
        raise ValueError("planted failure")

    def quick(sizes, work):
        return {"status": "ok", "verdict": "fine", "markdown": ["all good"]}

    monkeypatch.setattr(ga, "part_accuracy", broken)
    monkeypatch.setattr(ga, "part_speed", quick)
    status = ga.main(["--dry-run", "--no-warm-up", "--parts", "a,b", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == 1
    assert report["parts"]["a"]["status"] == "failed" and "planted failure" in report["parts"]["a"]["error"]
    assert report["parts"]["b"]["status"] == "ok"
    assert "planted failure" in (tmp_path / "report.md").read_text()


def test_time_limit_interrupts_a_part_and_kills_its_commands(tmp_path):
    with pytest.raises(ga.PartTimeout):
        with ga.time_limit(0.3):
            time.sleep(5)
    started = time.time()
    with pytest.raises(ga.PartTimeout):
        ga.run_command([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "log"), timeout=1)
    assert time.time() - started < 10


def test_no_gpu_without_dry_run_is_a_clear_error(capsys):
    if ga.HAS_GPU:
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        ga.parse_args([])
    assert exit_info.value.code == 2
    assert "--dry-run" in capsys.readouterr().err
