"""parallel/common.py — what the model-parallel strategies share.

1. Counted collectives: torch.distributed's, plus a count of the bytes this rank sends in each, so that a run
   can compare what it communicated with parallel/costs.py's communication_per_step.
2. Clipping by the global gradient norm when no rank holds all the gradients.
3. Checkpoints: each rank's piece gathered into the single-process layout (one model.pt-style file), and a
   single-process checkpoint cut back into this rank's piece — so every strategy reads every other's files.
4. Plan: the steps every strategy has, built from the above.
"""

import statistics

import torch
import torch.distributed as dist

# =============================================================================
# 1. Collectives that count what they send
# =============================================================================

# Bytes this rank sent since the last reset. A ring collective over N ranks moves the buffer in N − 1 hops of
# 1/N of it: an all-gather or a reduce-scatter sends (N−1)/N of the full buffer per rank, an all-reduce (a
# reduce-scatter, then an all-gather) 2(N−1)/N. The count uses these volumes, whatever algorithm the backend
# picks; scalars (norms, losses, flags) are left out.
sent = {"bytes": 0}


def all_reduce(tensor, group=None):
    """Sum `tensor` over the ranks of `group`, in place. Sends 2(N−1)/N of it."""
    n = dist.get_world_size(group)
    sent["bytes"] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_scatter(shard, full, group=None):
    """shard ← the sum over ranks of this rank's 1/N slice of the flat tensor `full`. Sends (N−1)/N of `full`."""
    n = dist.get_world_size(group)
    sent["bytes"] += (n - 1) / n * full.numel() * full.element_size()
    dist.reduce_scatter(shard, list(full.chunk(n)), op=dist.ReduceOp.SUM, group=group)
    return shard


def all_gather(full, shard, group=None):
    """The flat tensor full ← every rank's shard, in rank order. Sends (N−1)/N of `full`: its own shard to each
    of the N − 1 other ranks."""
    n = dist.get_world_size(group)
    sent["bytes"] += (n - 1) / n * full.numel() * full.element_size()
    dist.all_gather(list(full.chunk(n)), shard.contiguous(), group=group)
    return full


def send(tensor, dst):
    """Point to point, to rank `dst`. Sends all of it."""
    sent["bytes"] += tensor.numel() * tensor.element_size()
    dist.send(tensor.contiguous(), dst)


def recv(shape, dtype, device, src):
    """A tensor of `shape` received from rank `src` (which must send one of that shape)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(tensor, src)
    return tensor


def sum_over_ranks(value, group=None):
    """A scalar tensor summed over the ranks of `group`, in place (not counted)."""
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


# =============================================================================
# 2. Clipping by the global norm
# =============================================================================

def squared_norm(tensors, device):
    """Σ ‖t‖² over `tensors` (fp32), a scalar tensor on `device` (0 for none)."""
    return sum((t.detach().float().pow(2).sum() for t in tensors), torch.zeros((), device=device))


def clip_grads_(grads, norm_squared, max_norm):
    """Scale every gradient by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ = √norm_squared: what
    torch.nn.utils.clip_grad_norm_ does, for a norm put together from pieces on several ranks. Returns ‖g‖."""
    total_norm = norm_squared.sqrt()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return total_norm.item()


# =============================================================================
# 3. Checkpoints in the single-process layout
# =============================================================================

def parameter_names(module, optimizer):
    """[[names of group 0], [names of group 1], …]: the order in which optimizer.state_dict() numbers the
    parameters of `module` (group by group, in each group's order)."""
    names = {p: n for n, p in module.named_parameters()}
    return [[names[p] for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state_by_name(state_dict, layout):
    """An optimizer.state_dict()'s per-parameter state, keyed by parameter name instead of index."""
    flat = [name for group in layout for name in group]
    return {flat[i]: state for i, state in state_dict["state"].items()}


def optimizer_state_dict(state_by_name, layout, param_groups):
    """The inverse: an optimizer.state_dict() for the parameters of `layout`, with the hyperparameters of
    `param_groups` (lr, betas, weight decay, …), loadable by optimizer.load_state_dict."""
    flat = [name for group in layout for name in group]
    index = {name: i for i, name in enumerate(flat)}
    groups, first = [], 0
    for hyper, names in zip(param_groups, layout):
        groups.append({**{k: v for k, v in hyper.items() if k != "params"},
                       "params": list(range(first, first + len(names)))})
        first += len(names)
    return {"state": {index[n]: s for n, s in state_by_name.items() if n in index}, "param_groups": groups}


def on_cpu(tree):
    """Copies of the tensors of a nested dict, on the CPU (what gather_object can send between any backends)."""
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    return tree.detach().cpu().clone() if isinstance(tree, torch.Tensor) else tree


def gather_to_master(obj):
    """Every rank's `obj`, as a list in rank order on rank 0 (None elsewhere)."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


# =============================================================================
# 4. The plan: what a strategy provides to the training loop
# =============================================================================

class Plan:
    """The common part of a strategy. A subclass sets model, optimizer, data_rank, data_world, dropout_rank,
    reference_layout (parameter_names of the whole GPT with the single-process optimizer) and implements
    sync_gradients, clip_grad_norm_, local_state, assemble and load_pieces."""

    def start_step(self):
        sent["bytes"] = 0

    def step_record(self):
        """What this step communicated (bytes this rank sent) and measure_step's numbers, for metrics.jsonl."""
        record = {"sent_bytes": sent["bytes"], **self.measure_step()}
        self.history = getattr(self, "history", []) + [record]
        return record

    def measure_step(self):
        return {}

    def gather(self):
        """(model state dict, optimizer state dict) in the single-process layout on rank 0, None elsewhere.
        A collective: every rank sends its piece to rank 0, which puts the whole together."""
        parts = gather_to_master(on_cpu(self.local_state()))
        if parts is None:
            return None, None
        weights, state_by_name = self.assemble(parts)
        return weights, optimizer_state_dict(state_by_name, self.reference_layout, self.optimizer.param_groups)

    def load(self, weights, optimizer_state):
        """Take this rank's piece of a single-process checkpoint (model and optimizer state dicts)."""
        self.load_pieces(weights, optimizer_state_by_name(optimizer_state, self.reference_layout))

    def summary(self):
        """(text, record) on every rank: per rank, the median of what a step sent. A collective."""
        mine = {key: statistics.median(r[key] for r in self.history) for key in self.history[0]} if getattr(
            self, "history", None) else {}
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, mine)
        record = {key: [r.get(key) for r in per_rank] for key in mine}
        sent_mib = ", ".join(f"{b / 2**20:.3f}" for b in record.get("sent_bytes", []))
        return f"communication per step, counted on each rank: {sent_mib} MiB", record
