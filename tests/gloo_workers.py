"""What the processes spawned by tests/test_parallel.py run: a gloo group of a few ranks on one machine, each
computing its piece of a tensor-parallel layer. Kept apart from the test module so that a spawned process
imports torch and parallel/ only (seconds less per process, which the classroom graders feel)."""

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.tensor import column_parallel_linear, row_parallel_linear


def spawn_gloo(worker, directory, nprocs=2, timeout=120):
    """Run worker(rank, directory) in `nprocs` fresh processes joined in a gloo group. Collectives time out
    rather than hang, and so does the whole; a worker that raises fails the caller (ProcessRaisedException)."""
    context = mp.start_processes(gloo_entry, args=(worker, nprocs, str(directory)), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while not context.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{worker.__name__} hung for {timeout}s")


def gloo_entry(rank, worker, world_size, directory):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, directory)
    finally:
        dist.destroy_process_group()


def linear_case(out_features, in_features):
    """A layer's weight and bias, an input and the cotangent of the output: the same on every rank."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
    x, cotangent = torch.randn(2, 3, in_features, generator=g), torch.randn(2, 3, out_features, generator=g)
    return weight, bias, x, cotangent


def column_worker(rank, directory):
    """Rank r of 2 holds output features 3r … 3r + 2 of a 6 × 4 layer."""
    weight, bias, x, cotangent = linear_case(6, 4)
    rows = slice(rank * 3, (rank + 1) * 3)
    w, b, x = (t.clone().requires_grad_() for t in (weight[rows], bias[rows], x))
    y = column_parallel_linear(x, w, b, dist.group.WORLD)
    (y * cotangent[..., rows]).sum().backward()
    torch.save({"y": y.detach(), "x": x.grad, "weight": w.grad, "bias": b.grad}, f"{directory}/rank{rank}.pt")


def row_worker(rank, directory):
    """Rank r of 2 holds input features 3r … 3r + 2 of a 5 × 6 layer, and reads those of the input."""
    weight, bias, x, cotangent = linear_case(5, 6)
    cols = slice(rank * 3, (rank + 1) * 3)
    w, b, x = (t.clone().requires_grad_() for t in (weight[:, cols], bias, x[..., cols]))
    z = row_parallel_linear(x, w, b, dist.group.WORLD)
    (z * cotangent).sum().backward()
    torch.save({"y": z.detach(), "x": x.grad, "weight": w.grad, "bias": b.grad}, f"{directory}/rank{rank}.pt")
