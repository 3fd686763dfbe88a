"""Registers, spills, shared memory and occupancy of every flash-attention kernel build, compiled for real
GPUs on this machine (no GPU needed): the full grid that tests/test_flash_compile.py samples.

    python bench/kernel_resources.py                          # everything: sm_80 + sm_90, 3 dtypes, d = 32/64/128
    python bench/kernel_resources.py --arch sm_90 --dtypes bf16 --head-dims 64 128 --workers 2
    python bench/kernel_resources.py --json resources.json    # also write every row as JSON

Each row is one specialisation the launcher in kernels/flash_attention.py can compile (kernels/aot.py):
registers per thread, stack frame and local memory (bytes per thread; non-zero = spills), shared memory
per block, and the occupancy estimate — resident blocks per SM and the share of the SM's 64 warp slots
they fill. Exits 1 when a build fails `kernels.aot.problems` (a compile error; a spill in a config the
autotuner may pick; shared memory over the architecture's limit).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kernels import aot  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(aot.ARCHITECTURES), choices=list(aot.ARCHITECTURES),
                        help="GPU architectures to compile for")
    parser.add_argument("--dtypes", nargs="+", default=list(aot.DTYPES), choices=list(aot.DTYPES),
                        help="input dtypes")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(aot.HEAD_DIMS), help="head dims d")
    parser.add_argument("--kernels", nargs="+", default=list(aot.KERNELS), choices=list(aot.KERNELS),
                        help="which kernels")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser.parse_args()


def row(result):
    masks = "+".join(n for n, on in (("causal", result["causal"]), ("docs", result["has_docs"])) if on) or "-"
    tiles = f"{result['block_m']}×{result['block_n']}" if result["block_n"] else f"{result['block_m']}"
    config = f"{tiles} w{result['num_warps']} s{result['num_stages']}" + ("" if result["autotuned"] else " (fixed)")
    head = f"| {result['kernel']} | {result['dtype']} | {result['head_dim']} | {masks} | {config} | {result['arch']} |"
    if result["error"]:
        return head + f" compile error: {result['error']} |"
    blocks, warps = aot.occupancy(result["registers"], result["shared"], result["num_warps"], result["arch"])
    problems = "; ".join(aot.problems(result)) or ("spills (fixed config)" if result["stack"] or result["local"]
                                                   else "ok")
    return head + (f" {result['registers']} | {result['stack']} | {result['local']} | {result['shared'] / 1024:.1f} | "
                   f"{blocks} | {100 * warps:.0f}% | {result['seconds']:.1f} | {problems} |")


def main():
    args = parse_args()
    if not aot.has_nvidia_backend():
        sys.exit("error: the installed Triton has no NVIDIA backend (or its bundled ptxas/cuobjdump): "
                 "nothing to compile for")
    builds = [b for b in aot.launcher_builds(tuple(args.arch), tuple(args.head_dims), tuple(args.dtypes))
              if b.kernel in args.kernels]
    import triton
    print(f"# Flash-attention kernels compiled ahead of time: {len(builds)} builds, Triton {triton.__version__}, "
          f"{args.workers} worker(s)\n")
    started = time.time()
    print("| kernel | dtype | d | masks | config | arch | regs | stack | local | smem KiB | blocks/SM | warps | "
          "compile s | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for result in aot.compile_builds(builds, args.workers):   # printed as they come: the grid takes a while
        results.append(result)
        print(row(result), flush=True)
    bad = [(r, p) for r in results for p in aot.problems(r)]
    print(f"\n{len(results)} builds in {time.time() - started:.0f} s; {len(bad)} problem(s)")
    for result, problem in bad:
        print(f"  {aot.describe(result)}: {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
