"""parallel/tensor.py — tensor parallelism, Megatron-style (seed 1.7, "Tensor Parallelism"), and 2D: data × tensor.

A linear layer Y = X·A is split over the k ranks of a tensor-parallel (TP) group in one of two ways
(Shoeybi et al. 2019, Megatron-LM):

    column-parallel   A = [A_1 … A_k] by output features    Y_i = X·A_i       rank i gets its columns of Y
    row-parallel      B = [B_1; …; B_k] by input features   Z = Σ_i Y_i·B_i   rank i adds its partial product

A column-parallel layer leaves on rank i exactly the input slice Y_i that a row-parallel layer wants, so a GPT
block is two such pairs with nothing exchanged in between:

    attention   QKV = X·A_qkv (column): rank i owns heads i·h/k … (i+1)·h/k − 1 and attends with them alone;
                out = Y·B_proj (row): the partial outputs are summed by one all-reduce
    MLP         H = GELU(X·A_fc) (column: GELU is element-wise);  out = H·B_proj (row), one all-reduce

The communication sits in two autograd functions, the paper's f before each column-parallel layer and g after
each row-parallel one: f is the identity forward and an all-reduce backward, g the other way round. Per block
and micro-batch that is 2 all-reduces forward and 2 backward, each of B·T·d activations, 2(k−1)/k of them sent
per rank — fine on a node's NVLink, too slow between nodes, which is why TP stays inside one. Embeddings,
LayerNorms and the row-parallel biases are replicated: every rank of the group computes them from the same
input, so their gradients come out equal without any communication.

2D (`--parallel dp-tp`): N = D·k ranks, rank = d·k + t. A TP group is k consecutive ranks (one node); a DP group
joins the D ranks that hold the same shard, which average their gradients after backward, as DDP does:

    N = 4, k = 2:     TP groups {0, 1} {2, 3}      DP groups {0, 2} {1, 3}
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from parallel.common import (Plan, all_reduce, clip_grads_, optimizer_state_by_name, optimizer_state_dict,
                             parameter_names, squared_norm, sum_over_ranks)

# =============================================================================
# 1. f and g, and the two parallel linear layers
# =============================================================================


class CopyToTensorParallel(torch.autograd.Function):
    """f: the identity forward, an all-reduce of the gradient backward.

    Every rank of the TP group feeds the same X into its own slice A_i, so ∂L/∂X = Σ_i ∂L/∂Y_i · A_i has one
    term on each rank; backward adds them up with one all-reduce over the group (2(k−1)/k of X's size sent
    per rank). Forward sends nothing."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class SumOverTensorParallel(torch.autograd.Function):
    """g: an all-reduce forward, the identity backward.

    Forward sums the partial products Y_i·B_i of a row-parallel layer over the TP group (2(k−1)/k of the
    output's size sent per rank). Since Z = Σ_i Z_i, ∂L/∂Z_i = ∂L/∂Z, which every rank already has: backward
    sends nothing."""

    @staticmethod
    def forward(ctx, partial, group):
        return all_reduce(partial.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# classroom: begin column_parallel_linear
def column_parallel_linear(x, weight, bias, group):
    """Megatron's column-parallel linear layer (seed 1.7): Y_i = f(X)·A_iᵀ + b_i, this rank's output features.

    The whole layer is nn.Linear's Y = X·Aᵀ + b with A of shape (out, in). Split by output features over the k
    ranks of `group`, rank i holds weight = A_i (out/k, in) and bias = b_i (out/k), or None. x (…, in) is the
    same on every rank, so forward needs no communication. Backward, ∂L/∂X = Σ_i ∂L/∂Y_i · A_i is a sum over
    ranks: pass x through f (CopyToTensorParallel.apply(x, group)), which all-reduces that gradient.
    Returns (…, out/k)."""
    return F.linear(CopyToTensorParallel.apply(x, group), weight, bias)
# classroom: end column_parallel_linear


# classroom: begin row_parallel_linear
def row_parallel_linear(x, weight, bias, group):
    """Megatron's row-parallel linear layer (seed 1.7): Z = g(Σ_i X_i·B_iᵀ) + b, the whole output on every rank.

    The whole layer is Z = X·Bᵀ + b with B of shape (out, in). Split by input features over the k ranks of
    `group`, rank i holds weight = B_i (out, in/k) and reads x = X_i (…, in/k), its slice of the input — the
    output of the column-parallel layer before it. The partial products X_i·B_iᵀ are summed over ranks by g
    (SumOverTensorParallel.apply(partial, group), an all-reduce). The bias (out), the same on every rank, or
    None, is added once, after the sum. Returns (…, out)."""
    out = SumOverTensorParallel.apply(F.linear(x, weight), group)
    return out if bias is None else out + bias
# classroom: end row_parallel_linear


class ColumnParallelLinear(nn.Module):
    """This rank's rows `index` of a whole nn.Linear (its output features), computed by column_parallel_linear."""

    def __init__(self, full, index, group):
        super().__init__()
        index = index.to(full.weight.device)
        self.weight = nn.Parameter(full.weight.detach().index_select(0, index).clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().index_select(0, index).clone())
        self.group = group

    def forward(self, x):
        return column_parallel_linear(x, self.weight, self.bias, self.group)


class RowParallelLinear(nn.Module):
    """This rank's columns `index` of a whole nn.Linear (its input features) and the whole bias."""

    def __init__(self, full, index, group):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().index_select(1, index.to(full.weight.device)).clone())
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())
        self.group = group

    def forward(self, x):
        return row_parallel_linear(x, self.weight, self.bias, self.group)


# =============================================================================
# 2. Which slice of which parameter a rank keeps
# =============================================================================

def shard_rule(name):
    """How the GPT parameter `name` is split over a TP group: (dim, "qkv" | "even"), or None when replicated."""
    if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        return 0, "qkv"        # rows [Q; K; V]: in each of the three, this rank's heads
    if name.endswith((".mlp.fc.weight", ".mlp.fc.bias")):
        return 0, "even"       # column-parallel: output features
    if name.endswith((".attn.proj.weight", ".mlp.proj.weight")):
        return 1, "even"       # row-parallel: input features (attention's: the heads, in order)
    return None


def shard_index(rule, size, rank, k):
    """Indices, along the split dimension of length `size` in the whole parameter, that TP rank `rank` of k keeps."""
    _, kind = rule
    if kind == "qkv":  # Q, K and V each hold h heads of d/h rows; rank i takes heads i·h/k … of each
        width = size // 3 // k
        return torch.cat([part * (size // 3) + rank * width + torch.arange(width) for part in range(3)])
    width = size // k
    return rank * width + torch.arange(width)


def params_per_rank(model, k):
    """Parameters one TP rank holds: 1/k of every split weight and bias, all of the replicated ones."""
    return sum(p.numel() // k if shard_rule(n) else p.numel() for n, p in model.named_parameters())


def tensor_and_data_groups(world_size, tp):
    """The rank lists of the 2D layout (see the top): TP groups of k consecutive ranks, DP groups of the ranks
    with the same position t in their TP group."""
    tp_groups = [list(range(first, first + tp)) for first in range(0, world_size, tp)]
    dp_groups = [list(range(t, world_size, tp)) for t in range(tp)]
    return tp_groups, dp_groups


def own_group(rank_lists, rank):
    """Create every group of rank_lists — dist.new_group is collective: all ranks create all groups, in the same
    order — and return the one that holds `rank`."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


# =============================================================================
# 3. The plan: TP inside each group of k ranks, DP across the groups
# =============================================================================

class TensorParallel(Plan):
    def __init__(self, model, ctx, tp, make_optimizer):
        self.reference_layout = parameter_names(model, make_optimizer(model))
        self.full_shapes = {name: t.shape for name, t in model.state_dict().items()}
        self.tp, self.data_world = tp, ctx.world_size // tp
        self.tp_rank, self.data_rank = ctx.rank % tp, ctx.rank // tp
        self.dropout_rank = self.data_rank  # one TP group, one input: the same dropout masks on every rank
        tp_groups, dp_groups = tensor_and_data_groups(ctx.world_size, tp)
        self.tp_group, self.dp_group = own_group(tp_groups, ctx.rank), own_group(dp_groups, ctx.rank)
        for i, block in enumerate(model.blocks):
            attn, mlp, name = block.attn, block.mlp, f"blocks.{i}."
            attn.qkv = ColumnParallelLinear(attn.qkv, self.index(name + "attn.qkv.weight"), self.tp_group)
            attn.proj = RowParallelLinear(attn.proj, self.index(name + "attn.proj.weight"), self.tp_group)
            mlp.fc = ColumnParallelLinear(mlp.fc, self.index(name + "mlp.fc.weight"), self.tp_group)
            mlp.proj = RowParallelLinear(mlp.proj, self.index(name + "mlp.proj.weight"), self.tp_group)
            attn.n_head //= tp  # the heads this rank attends with
        self.model = model
        self.optimizer = make_optimizer(model)  # over this rank's shards and the replicated parameters
        self.layout = parameter_names(model, self.optimizer)
        self.sharded = {n for n, _ in model.named_parameters() if shard_rule(n)}

    def index(self, name):
        rule = shard_rule(name)
        return shard_index(rule, self.full_shapes[name][rule[0]], self.tp_rank, self.tp)

    def sync_gradients(self):
        """2D: average every gradient over the DP group (the ranks holding the same shard), as DDP does."""
        if self.data_world > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    all_reduce(p.grad, self.dp_group).div_(self.data_world)

    def clip_grad_norm_(self, max_norm):
        """‖g‖² = (Σ over the TP group of each rank's ‖shard gradients‖²) + ‖replicated gradients‖² (once:
        every rank of the group has the same)."""
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        device = named[0][1].device
        sharded = sum_over_ranks(squared_norm([g for n, g in named if n in self.sharded], device), self.tp_group)
        replicated = squared_norm([g for n, g in named if n not in self.sharded], device)
        return clip_grads_([g for _, g in named], sharded + replicated, max_norm)

    # Checkpoints: the ranks of DP group 0 (ranks 0 … k−1) hold every shard once.
    def local_state(self):
        if self.data_rank != 0:
            return None
        return {"model": self.model.state_dict(),
                "optimizer": optimizer_state_by_name(self.optimizer.state_dict(), self.layout)}

    def assemble(self, parts):
        pieces = parts[:self.tp]  # TP ranks 0 … k−1, in order
        weights = {n: self.unshard(n, [p["model"][n] for p in pieces]) for n in pieces[0]["model"]}
        state = {n: {key: self.unshard(n, [p["optimizer"][n][key] for p in pieces]) if value.dim() else value
                     for key, value in s.items()} for n, s in pieces[0]["optimizer"].items()}
        return weights, state

    def unshard(self, name, pieces):
        rule = shard_rule(name)
        if rule is None:
            return pieces[0]
        full = pieces[0].new_empty(self.full_shapes[name])
        for rank, piece in enumerate(pieces):
            full.index_copy_(rule[0], shard_index(rule, full.shape[rule[0]], rank, self.tp), piece)
        return full

    def shard(self, name, full):
        rule = shard_rule(name)
        return full if rule is None else full.index_select(rule[0], self.index(name))

    def load_pieces(self, weights, state_by_name):
        self.model.load_state_dict({n: self.shard(n, t) for n, t in weights.items()})
        mine = {n: {key: self.shard(n, v) if v.dim() else v for key, v in s.items()} for n, s in state_by_name.items()}
        self.optimizer.load_state_dict(optimizer_state_dict(mine, self.layout, self.optimizer.param_groups))

    def summary(self):
        text, record = super().summary()
        return f"tensor parallel: {self.tp} ranks per TP group × {self.data_world} DP group(s); {text}", record
