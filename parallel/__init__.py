"""parallel/ — the model-parallel strategies of seed section 1.7, one per file, beside train_gpt.py's DDP/FSDP.

    tensor.py     Megatron-style tensor parallelism (`--parallel tp`), and data × tensor parallelism (`dp-tp`)
    pipeline.py   pipeline parallelism with the GPipe schedule (`--parallel pp`)
    zero.py       ZeRO stage 1 written by hand (`--parallel zero1`)
    common.py     what they share: counted collectives, clipping by a global norm, the single-file checkpoint

train_gpt.py builds the GPT on every rank (same seed, same weights) and hands it to `setup`, which returns a
plan: the module this rank runs (`plan.model`), its optimizer, and the steps where the strategy differs from
one process — `sync_gradients`, `clip_grad_norm_`, `gather` / `load` (checkpoints in the single-process
layout, so any strategy resumes from any other's), and `summary`. Nothing here imports train_gpt.py: it runs
as `__main__`, and a second copy of it would be a second set of classes.
"""

STRATEGIES = ("tp", "dp-tp", "pp", "zero1")


def setup(strategy, model, ctx, make_optimizer, tp=None):
    """The plan of `strategy` for this rank. `model` is the whole GPT, `make_optimizer(module)` the AdamW one
    process would use (train_gpt.adamw with the run's hyperparameters), `tp` the tensor-parallel degree."""
    if strategy in ("tp", "dp-tp"):
        from parallel.tensor import TensorParallel
        return TensorParallel(model, ctx, tp or ctx.world_size, make_optimizer)
    if strategy == "pp":
        from parallel.pipeline import Pipeline
        return Pipeline(model, ctx, make_optimizer)
    if strategy == "zero1":
        from parallel.zero import ZeroOne
        return ZeroOne(model, ctx, make_optimizer)
    raise ValueError(f"unknown model-parallel strategy {strategy!r}; one of {STRATEGIES}")
