"""parallel/costs.py — what each parallel strategy costs, in closed form (seed 1.7; ZeRO, Rajbhandari et al. 2020).

Model state per GPU (memory_per_gpu) and bytes one rank sends per optimizer step (communication_per_step),
for every strategy train_gpt.py runs: DDP, FSDP and ZeRO, tensor, pipeline and 2D data × tensor
parallelism. A run prints them (parallel_costs); bench/parallel_costs.py tabulates them for real model
layouts; tests/test_parallel.py checks them against the bytes the counted collectives of
parallel/common.py really send. Kept out of train_gpt.py, whose story is the loop that runs a strategy.
"""


def memory_per_gpu(n_params, world_size, strategy):
    """Bytes of model state per GPU for mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020).

    Per parameter Ψ: 2 bytes of bf16 weights + 2 of bf16 gradients + 12 of fp32 optimizer state
    (master weights, Adam m and v) = 16 bytes. Sharding over N data-parallel ranks:
        ddp            16Ψ                 (everything replicated)
        zero1          4Ψ  + 12Ψ/N         (optimizer state sharded)
        zero2          2Ψ  + 14Ψ/N         (… and gradients)
        zero3 / fsdp   16Ψ/N               (… and the weights themselves)
    Activations are extra and depend on batch size and sequence length.
    """
    psi, n = n_params, world_size
    per_strategy = {"ddp": 16 * psi, "zero1": 4 * psi + 12 * psi / n, "zero2": 2 * psi + 14 * psi / n,
                    "zero3": 16 * psi / n, "fsdp": 16 * psi / n}
    if strategy not in per_strategy:
        raise ValueError(f"unknown strategy {strategy!r}; one of {sorted(per_strategy)}")
    return per_strategy[strategy]


def communication_per_step(strategy, n_params, world_size, tp=1, tokens=0, n_layer=0, n_embd=0, vocab_size=0,
                           bytes_per_value=2):
    """Bytes one rank sends per optimizer step (seed 1.7), with ring collectives over n ranks: an all-gather
    or a reduce-scatter sends (n−1)/n of the buffer per rank, an all-reduce — the two in a row — 2(n−1)/n.

        ddp, manual    2(N−1)/N · Ψ              the gradients, all-reduced
        zero1, zero2   2(N−1)/N · Ψ              gradients reduce-scattered, updated weights all-gathered
        fsdp, zero3    3(N−1)/N · Ψ              weights all-gathered for forward and again for backward,
                                                 gradients reduce-scattered
        tp             4L · 2(k−1)/k · B·T·d     per block, attention and MLP each all-reduce their output
                                                 forward (g) and their input's gradient backward (f)
        dp-tp          the same + 2(D−1)/D · Ψ   then one TP shard's gradients, all-reduced over D = N/k ranks
        pp             max(2·B·T·d, B·T·d + V·d)  the busiest stage: a middle one sends the activations forward
                                                 and their gradients back; the first and the last send one way
                                                 and all-reduce the gradient of the tied embedding (V·d)

    Ψ: the parameters whose gradients a rank exchanges (for dp-tp, those of its TP shard: Ψ/k and the
    replicated ones). B·T = tokens: what one model replica processes per step, all micro-batches together.
    bytes_per_value: 2 for bf16 (memory_per_gpu's accounting), 4 for fp32 (our CPU runs).
    """
    def all_reduce(ranks):  # the fraction of a buffer each rank sends in a ring all-reduce
        return 2 * (ranks - 1) / ranks

    n, activations = world_size, tokens * n_embd
    values = {"ddp": all_reduce(n) * n_params, "manual": all_reduce(n) * n_params,
              "zero1": all_reduce(n) * n_params, "zero2": all_reduce(n) * n_params,
              "fsdp": 3 * (n - 1) / n * n_params, "zero3": 3 * (n - 1) / n * n_params,
              "tp": 4 * n_layer * all_reduce(tp) * activations,
              "dp-tp": 4 * n_layer * all_reduce(tp) * activations + all_reduce(n // tp) * n_params,
              "pp": 0 if n == 1 else max(2 * activations if n > 2 else 0,
                                         activations + all_reduce(2) * vocab_size * n_embd),
              "none": 0}
    if strategy not in values:
        raise ValueError(f"unknown strategy {strategy!r}; one of {sorted(values)}")
    return values[strategy] * bytes_per_value


def parallel_costs(strategy, config, model, n_all, world_size, tp, tokens):
    """The line a run prints about its strategy: model state per GPU (memory_per_gpu, 16 bytes per parameter
    held) and bytes sent per rank and step (communication_per_step, at 4 bytes a value). `model` is what this
    rank runs — a TP shard or a pipeline stage holds fewer than all n_all parameters — and `tokens` go
    through it."""
    held = sum(p.numel() for p in model.parameters()) if strategy in ("tp", "dp-tp", "pp") else n_all
    memory = memory_per_gpu(held, world_size, strategy if strategy in ("fsdp", "zero1") else "ddp")
    sent = communication_per_step(strategy, held, world_size, tp or 1, tokens, config.n_layer, config.n_embd,
                                  config.vocab_size, bytes_per_value=4)
    return (f"model state per GPU (16 bytes/param, ZeRO accounting) {memory / 2**20:,.1f} MiB; "
            f"sent per rank and step {sent / 2**20:,.3f} MiB")
