"""Compile the flash-attention kernels for real GPUs on a machine that has none, and read what they use.

Triton compiles ahead of time without a device: `triton.compile(ASTSource(kernel, signature, constexprs),
target=GPUTarget("cuda", 90, 32))` runs the whole pipeline (Triton IR → LLVM → PTX → ptxas → cubin) with
the ptxas bundled in the Triton wheel. The wheel's `cuobjdump -res-usage` then reads, from the cubin, what
one program (a CUDA block) of the kernel needs:

    REG     registers per thread (255 at most: a kernel that needs more spills the rest to memory)
    STACK   bytes of stack frame per thread — non-zero means ptxas spilled registers (or made a call)
    LOCAL   bytes of local memory per thread — spilled arrays; like STACK, it lives in slow device memory
and Triton's own metadata gives the shared memory (the pipelined K/V tiles of `num_stages` stages).

A spill in the hot loop of attention costs a trip to device memory per use: this is how a config that
looks fine in the interpreter is slow on the first GPU. So every specialisation the launcher in
kernels/flash_attention.py can pick is listed by `launcher_builds` (kernel, dtype, head dim, masks,
autotune config, architecture), compiled by `compile_builds` (a process pool: compiling is CPU-bound) and
judged by `problems`. tests/test_flash_compile.py compiles a sample of them in CI; bench/kernel_resources.py
compiles them all and prints the table, with an occupancy estimate (`occupancy`).

Workers import the kernels with TRITON_INTERPRET=0: in the interpreter `@triton.jit` gives functions that
run on the CPU and cannot be compiled, so this never compiles in the calling process.
"""

import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Architecture:
    """The per-SM limits of one GPU generation (CUDA programming guide, "compute capabilities" table)."""
    capability: int
    shared_per_block: int      # the most dynamic shared memory one block may opt into, bytes
    shared_per_sm: int         # shared memory per SM, bytes (1 KiB of it is reserved for each resident block)
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHITECTURES = {
    "sm_80": Architecture(80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),   # A100
    "sm_90": Architecture(90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),   # H100, H200
}
HEAD_DIMS = (32, 64, 128)
DTYPES = ("fp16", "bf16", "fp32")
KERNELS = ("forward", "preprocess", "dkdv", "dq")


@dataclass(frozen=True)
class Build:
    """One specialisation of one kernel, as the launcher would compile it on a GPU."""
    kernel: str            # forward | preprocess | dkdv | dq
    dtype: str             # fp16 | bf16 | fp32 (the dtype of q, k, v)
    head_dim: int
    causal: bool
    has_docs: bool
    block_m: int
    block_n: int           # 0 for the preprocess kernel (it has no key tiles)
    num_warps: int
    num_stages: int
    arch: str              # a key of ARCHITECTURES
    autotuned: bool        # True: one of the autotuner's fp16/bf16 configs, which must not spill

    @property
    def config(self):
        tiles = f"{self.block_m}×{self.block_n}" if self.block_n else f"{self.block_m} rows"
        return f"{tiles}, {self.num_warps} warps, {self.num_stages} stages"


def has_nvidia_backend():
    """True when the installed Triton can compile for NVIDIA GPUs here: its nvidia backend and the ptxas
    and cuobjdump it bundles are present."""
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    if "nvidia" not in backends:
        return False
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(tools, name)) for name in ("ptxas", "cuobjdump"))


def launcher_builds(archs=tuple(ARCHITECTURES), head_dims=HEAD_DIMS, dtypes=DTYPES):
    """Every (kernel, dtype, head dim, causal, documents, config, architecture) the launcher can compile:
    fp16/bf16 run each config the autotuner may time for that head dim (AUTOTUNE_CONFIGS), fp32 its one
    fixed config (GPU_FP32_CONFIG); the Δ preprocess has no masks and one config (PREPROCESS_CONFIG)."""
    from kernels import flash_attention as fa  # noqa: PLC0415  (its constants only: no kernel is compiled here)

    builds = []
    for arch in archs:
        for dtype in dtypes:
            for head_dim in head_dims:
                block_m, num_warps, num_stages = fa.PREPROCESS_CONFIG
                builds.append(Build("preprocess", dtype, head_dim, False, False, block_m, 0, num_warps, num_stages,
                                    arch, autotuned=False))
                for kernel in ("forward", "dkdv", "dq"):
                    if dtype == "fp32":
                        configs, autotuned = [fa.GPU_FP32_CONFIG], False
                    else:
                        configs, autotuned = fa.autotune_configs(kernel, head_dim), True
                    for causal in (True, False):
                        for has_docs in (False, True):
                            for block_m, block_n, num_warps, num_stages in configs:
                                builds.append(Build(kernel, dtype, head_dim, causal, has_docs, block_m, block_n,
                                                    num_warps, num_stages, arch, autotuned))
    return builds


# ----------------------------------------------------------------------------------------------------------
# Compiling one build (in a worker process)
# ----------------------------------------------------------------------------------------------------------

TRITON_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
INPUT_TENSORS = {"Q", "K", "V", "O", "dO", "dQ", "dK", "dV"}     # q's dtype
FP32_TENSORS = {"LSE", "Delta"}                                  # always fp32
INT32_TENSORS = {"DocIds", "DocStart", "DocEnd", "DocsSorted"}   # document ids and bounds
FLOAT_SCALARS = {"qk_scale", "sm_scale"}
INT_SCALARS = {"n_heads", "n_kv_heads", "kv_group_size", "T", "T_TUNE"}  # and every stride_*


def kernel_signature(fn, dtype, constexprs):
    """The (signature, attrs) the launcher's call would give Triton: tensors are pointers of their dtype,
    the scale factors fp32, every other argument an int32; pointers (torch aligns every allocation) and
    strides (multiples of the head dim) are marked divisible by 16, as Triton's specialisation would; the
    sizes (T, head counts) are not: the kernels ask Triton not to specialise them."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INPUT_TENSORS | FP32_TENSORS | INT32_TENSORS:
            signature[name] = ("*fp32" if name in FP32_TENSORS else "*i32" if name in INT32_TENSORS
                               else TRITON_TYPES[dtype])
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name in INT_SCALARS or name.startswith("stride_"):
            signature[name] = "i32"
            if name.startswith("stride_"):     # the sizes are not specialised (do_not_specialize)
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{fn.__name__}: argument {name!r} has no type here; add it to kernels/aot.py")
    return signature, attrs


def kernel_function(build):
    """(the @triton.jit function, its constexpr values) for one build, taken from the launcher's own code."""
    from kernels import flash_attention as fa  # noqa: PLC0415

    constexprs = fa.launch_constexprs(build.dtype, build.head_dim, build.causal, build.has_docs, on_gpu=True)
    if build.kernel == "preprocess":
        return fa._backward_preprocess_kernel, dict(HEAD_DIM=build.head_dim, BLOCK_M=build.block_m,
                                                     BLOCK_D=constexprs["BLOCK_D"])
    fn = {"forward": fa._flash_forward_kernel, "dkdv": fa._flash_backward_dkdv_kernel,
          "dq": fa._flash_backward_dq_kernel}[build.kernel]
    return fn, dict(constexprs, BLOCK_M=build.block_m, BLOCK_N=build.block_n)


RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin):
    """(registers, stack bytes, static shared bytes, local bytes) per thread, read by `cuobjdump -res-usage`."""
    import triton  # noqa: PLC0415

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = RESOURCE_LINE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{text}")
    return tuple(int(x) for x in match.groups())


def compile_build(build):
    """Compile one build for its architecture; returns a dict: the build's fields, plus registers, stack,
    local, shared (dynamic + static bytes per block), seconds, and error (None, or why it failed)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    result = dict(asdict(build), registers=None, stack=None, local=None, shared=None, seconds=None, error=None)
    started = time.perf_counter()
    try:
        fn, constexprs = kernel_function(build)
        signature, attrs = kernel_signature(fn, build.dtype, constexprs)
        target = GPUTarget("cuda", ARCHITECTURES[build.arch].capability, 32)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=dict(num_warps=build.num_warps, num_stages=build.num_stages))
        registers, stack, static_shared, local = resource_usage(compiled.asm["cubin"])
        result.update(registers=registers, stack=stack, local=local,
                      shared=compiled.metadata.shared + static_shared)
    except Exception as error:  # a compile error is a result to report, not a crash of the whole grid
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
    result["seconds"] = time.perf_counter() - started
    return result


def _worker_start():
    """Each worker compiles for real: the kernels must not be defined in interpreter mode."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton ≥ 3.9 warns when unset; 1 is the old default


def compile_builds(builds, workers=None):
    """Compile every build in a pool of fresh ('spawn') processes; yields the results in the order of
    `builds`, each as soon as it and those before it are done."""
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                initializer=_worker_start) as pool:
        yield from pool.map(compile_build, builds, chunksize=1)


# ----------------------------------------------------------------------------------------------------------
# Judging the results
# ----------------------------------------------------------------------------------------------------------

def occupancy(registers, shared, num_warps, arch):
    """(resident blocks per SM, fraction of the SM's warp slots filled), the CUDA occupancy calculator's
    rule: the fewest blocks allowed by registers, shared memory, warp slots and the block limit.

        registers:  65,536 per SM, per warp in units of 256  → ⌊65536 / (⌈32·REG/256⌉·256 · warps)⌋
        shared:     ⌊shared per SM / (shared per block + 1 KiB reserved)⌋
        warps:      ⌊64 / warps⌋,   and at most 32 blocks
    """
    limits = ARCHITECTURES[arch]
    registers_per_warp = -(-32 * registers // 256) * 256
    by_registers = limits.registers_per_sm // (registers_per_warp * num_warps)
    by_shared = limits.shared_per_sm // (shared + 1024)
    blocks = min(by_registers, by_shared, limits.max_warps_per_sm // num_warps, limits.max_blocks_per_sm)
    return blocks, blocks * num_warps / limits.max_warps_per_sm


def problems(result):
    """What is wrong with one compiled build (an empty list when nothing is): it failed to compile; it spills
    (stack frame or local memory) although the autotuner may pick it; its shared memory exceeds the limit."""
    if result["error"]:
        return [f"does not compile: {result['error']}"]
    found = []
    if result["autotuned"] and (result["stack"] or result["local"]):
        found.append(f"spills: {result['registers']} registers, {result['stack']}-byte stack frame, "
                     f"{result['local']} bytes of local memory")
    limit = ARCHITECTURES[result["arch"]].shared_per_block
    if result["shared"] > limit:
        found.append(f"needs {result['shared']:,} bytes of shared memory, {result['arch']} allows {limit:,}")
    return found


def describe(result):
    """One line naming the build, for error messages."""
    masks = "+".join(name for name, on in (("causal", result["causal"]), ("docs", result["has_docs"])) if on)
    tiles = f"{result['block_m']}x{result['block_n']}" if result["block_n"] else f"{result['block_m']} rows"
    return (f"{result['kernel']} {result['dtype']} d={result['head_dim']} {masks or 'no mask'} {tiles} "
            f"w{result['num_warps']} s{result['num_stages']} {result['arch']}")
