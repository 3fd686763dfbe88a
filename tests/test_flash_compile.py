"""The flash-attention kernels compiled for real GPUs (sm_80, sm_90) on this CPU: kernels/aot.py.

No GPU is needed: Triton compiles ahead of time with the ptxas in its wheel, and cuobjdump reads registers,
stack, local and shared memory from the cubin. The full grid — every kernel × dtype × head dim × mask ×
config × architecture the launcher can pick, 554 builds — is too much for CI, so each run compiles a
deterministic sample: every autotune config of every kernel at its worst case (the largest head dim it is
listed for), the Δ preprocess, one kernel's fixed fp32 config, and a rotating slice of the rest chosen by
FLASH_COMPILE_SEED (default: the day of the year), so that the whole grid is covered over
successive days. FLASH_COMPILE_SEED=all compiles everything; `python bench/kernel_resources.py` prints the
full table. Skipped when the installed Triton has no NVIDIA backend.
"""

import dataclasses
import datetime
import os

import pytest

from kernels import aot
from kernels import flash_attention as fa

pytestmark = pytest.mark.skipif(not aot.has_nvidia_backend(),
                                reason="the installed Triton has no NVIDIA backend (ptxas, cuobjdump)")

ROTATING = 4          # builds of the rotating slice per run
# A config that spills (the forward at 128×64 tiles with 4 warps and d = 128 on sm_80: 255 registers and a
# ~500-byte stack frame; not among the autotuner's), compiled every run as a control: a detector that found
# nothing would fail here.
SPILLING_CONTROL = aot.Build("forward", "bf16", 128, True, True, 128, 64, 4, 3, "sm_80", autotuned=True)


def worst_case_sample(builds):
    """Per (kernel, config): one build at the largest head dim it is listed for (the most registers), with
    the architecture, the masks (causal + documents, or none) and the 16-bit dtype alternating along the
    list; the fixed fp32 config of each kernel and the Δ preprocess likewise at d = 128."""
    chosen, seen = [], set()
    for build in sorted(builds, key=lambda b: -b.head_dim):
        key = (build.kernel, build.config, build.autotuned)
        if key not in seen:
            seen.add(key)
            chosen.append(build)
    archs, masks = list(aot.ARCHITECTURES), [(True, True), (False, False)]
    varied = []
    for i, b in enumerate(chosen):
        causal, has_docs = masks[i // 2 % 2] if b.kernel != "preprocess" else (False, False)
        dtype = "fp32" if b.dtype == "fp32" and b.kernel != "preprocess" else ("bf16", "fp16")[i // 4 % 2]
        varied.append(dataclasses.replace(b, arch=archs[i % 2], causal=causal, has_docs=has_docs, dtype=dtype))
    return varied


def sample(builds, seed):
    """The worst-case sample (of its fixed fp32 configs, which compile slowest, one kernel's per run) and a
    rotating slice of the rest: every stride-th build from seed % stride, so successive seeds cover all."""
    if seed == "all":
        return builds
    core = worst_case_sample(builds)
    fp32 = [b for b in core if b.dtype == "fp32"]
    core = [b for b in core if b.dtype != "fp32"] + [fp32[int(seed) % len(fp32)]]
    rest = [b for b in builds if b not in set(core)]
    stride = max(1, len(rest) // ROTATING)
    return core + rest[int(seed) % stride::stride][:ROTATING]


@pytest.fixture(scope="module")
def compiled():
    seed = os.environ.get("FLASH_COMPILE_SEED", str(datetime.date.today().timetuple().tm_yday))
    builds = sample(aot.launcher_builds(), seed) + [SPILLING_CONTROL]
    print(f"\ncompiling {len(builds)} kernel builds (FLASH_COMPILE_SEED={seed})")
    return list(aot.compile_builds(builds, workers=min(2, os.cpu_count() or 1)))


def test_every_sampled_build_compiles_without_spills_within_shared_memory(compiled):
    bad = [f"{aot.describe(r)}: {problem}" for r in compiled[:-1] for problem in aot.problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] <= 255 and r["shared"] > 0 for r in compiled[:-1])


def test_the_spill_detector_sees_a_real_spill(compiled):
    control = compiled[-1]
    assert control["error"] is None
    assert any("spills" in problem for problem in aot.problems(control)), control


def test_sample_covers_every_autotune_config_of_every_kernel():
    core = worst_case_sample(aot.launcher_builds())
    for kernel in ("forward", "dkdv", "dq"):
        listed = {c for d in aot.HEAD_DIMS for c in fa.autotune_configs(kernel, d)}
        sampled = {(b.block_m, b.block_n, b.num_warps, b.num_stages) for b in core
                   if b.kernel == kernel and b.autotuned}
        assert sampled == listed, kernel
    assert {b.kernel for b in core if not b.autotuned} == {"forward", "dkdv", "dq", "preprocess"}
    assert len(sample(aot.launcher_builds(), "7")) <= 20      # the CI budget: a few CPU-seconds per build


def test_the_grid_is_every_launcher_specialisation():
    builds = aot.launcher_builds()
    assert len(builds) == len(set(builds))
    for kernel in ("forward", "dkdv", "dq"):
        for d in aot.HEAD_DIMS:
            for dtype in ("fp16", "bf16"):
                got = {(b.block_m, b.block_n, b.num_warps, b.num_stages, b.causal, b.has_docs) for b in builds
                       if b.kernel == kernel and b.head_dim == d and b.dtype == dtype and b.arch == "sm_90"}
                assert got == {(*c, causal, docs) for c in fa.autotune_configs(kernel, d)
                               for causal in (True, False) for docs in (True, False)}
            fp32 = {b for b in builds if b.kernel == kernel and b.head_dim == d and b.dtype == "fp32"}
            assert {(b.block_m, b.block_n, b.num_warps, b.num_stages) for b in fp32} == {fa.GPU_FP32_CONFIG}


def test_occupancy_by_hand():
    # 128 registers × 32 threads = 4,096 per warp; 8 warps → 32,768 per block: 2 blocks fit in 65,536.
    assert aot.occupancy(128, 16 * 1024, 8, "sm_90") == (2, 0.25)
    # 255 registers round up to 256 per thread (8,192 per warp); 4 warps → 32,768: 2 blocks, 8 warps of 64.
    assert aot.occupancy(255, 1024, 4, "sm_80") == (2, 0.125)
    # shared memory binds: 100 KiB + 1 KiB reserved per block, 164 KiB per SM on sm_80 → 1 block.
    assert aot.occupancy(64, 100 * 1024, 4, "sm_80") == (1, 0.0625)


def test_problems_reads_spills_and_shared_memory():
    ok = dict(kernel="forward", dtype="bf16", head_dim=64, causal=True, has_docs=False, block_m=128, block_n=64,
              num_warps=8, num_stages=3, arch="sm_80", autotuned=True, registers=200, stack=0, local=0,
              shared=48 * 1024, seconds=1.0, error=None)
    assert aot.problems(ok) == []
    assert "spills" in aot.problems({**ok, "registers": 255, "stack": 16})[0]
    assert aot.problems({**ok, "stack": 16, "autotuned": False}) == []    # fp32's fixed config may spill
    assert "shared memory" in aot.problems({**ok, "shared": 200 * 1024})[0]   # over sm_80's 163 KiB
    assert aot.problems({**ok, "shared": 200 * 1024, "arch": "sm_90"}) == []  # within sm_90's 227 KiB
    assert aot.problems({**ok, "error": "CompilationError: …"}) == ["does not compile: CompilationError: …"]
