"""parallel/zero.py — ZeRO stage 1 written by hand (seed 1.7, "ZeRO"; Rajbhandari et al. 2020).

Data parallelism keeps the whole optimizer state on each of the N ranks. With Adam in mixed precision that is
12 bytes per parameter — an fp32 master copy of the weights, Adam's m and v — beside 2 + 2 bytes of bf16
weights and gradients: 16Ψ per rank (parallel/costs.py's memory_per_gpu). Every rank then does the same update of
every weight. ZeRO-1 cuts the flat vector of parameters into N equal shards and lets rank r keep the
optimizer state of shard r only, and update only that shard: 4Ψ + 12Ψ/N per rank. One step:

    1. backward                  the full gradient, as in DDP (the loop's gradient accumulation unchanged)
    2. reduce-scatter            rank r receives the sum over ranks of shard r of the gradient   (N−1)/N·Ψ sent
    3. AdamW on shard r          from its fp32 master copy of the shard, its m and its v          12·Ψ/N bytes
    4. all-gather                every rank receives every updated shard: the whole weights     (N−1)/N·Ψ sent

A ring all-reduce is a reduce-scatter followed by an all-gather, so this sends what DDP sends, 2(N−1)/N·Ψ.
AdamW is element-wise, so the shards together take exactly the single-process step. Each parameter group
(matrices with weight decay, the rest without) is flattened and sharded on its own, padded with zeros to a
multiple of N. Here, without bf16 weights, the model's fp32 weights could serve as the master copy; the
shard keeps its own anyway, so that the 12Ψ/N of the formula are bytes this rank really holds.
"""

import math

import torch

from parallel.common import (Plan, all_gather, clip_grads_, parameter_names, reduce_scatter, squared_norm,
                             sum_over_ranks)


class ShardedAdamW:
    """The optimizer of one rank under ZeRO-1: `optimizer` (the AdamW one process would use, not yet stepped)
    with its parameter groups and hyperparameters, holding the state of this rank's shard only."""

    def __init__(self, optimizer, rank, world_size):
        self.rank, self.world = rank, world_size
        self.groups = [list(group["params"]) for group in optimizer.param_groups]
        self.shard_sizes = [math.ceil(sum(p.numel() for p in params) / world_size) for params in self.groups]
        self.masters = [self.my_shard(self.flatten(params, size)).detach().float().clone()
                        for params, size in zip(self.groups, self.shard_sizes)]
        self.inner = type(optimizer)([{**group, "params": [master]}
                                      for group, master in zip(optimizer.param_groups, self.masters)])

    @property
    def param_groups(self):
        """The groups of the shard's AdamW, where the loop sets the learning rate (a property: load_state_dict
        replaces the list)."""
        return self.inner.param_groups

    def flatten(self, tensors, shard_size):
        """The tensors as one flat vector, zero-padded to N · shard_size."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(shard_size * self.world - flat.numel())])

    def my_shard(self, flat):
        size = flat.numel() // self.world
        return flat[self.rank * size:(self.rank + 1) * size]

    @torch.no_grad()
    def reload_masters(self):
        """master ← this rank's shard of the weights (after they were loaded from a checkpoint)."""
        for params, size, master in zip(self.groups, self.shard_sizes, self.masters):
            master.copy_(self.my_shard(self.flatten(params, size)))

    def reduce_scatter_gradients(self):
        """Step 2: master.grad ← the average over ranks of this rank's shard of the gradient."""
        for params, size, master in zip(self.groups, self.shard_sizes, self.masters):
            flat = self.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], size)
            shard = reduce_scatter(flat.new_empty(size), flat)
            master.grad = shard.div_(self.world).float()

    def clip_grad_norm_(self, max_norm):
        """‖g‖² = the sum over ranks of each rank's ‖shard gradient‖² (the zero padding adds nothing)."""
        grads = [master.grad for master in self.masters]
        return clip_grads_(grads, sum_over_ranks(squared_norm(grads, grads[0].device)), max_norm)

    @torch.no_grad()
    def step(self):
        """Steps 3 and 4: AdamW on the shard, then every rank gathers the whole updated weights."""
        self.inner.step()
        for params, size, master in zip(self.groups, self.shard_sizes, self.masters):
            flat = all_gather(master.new_empty(size * self.world, dtype=params[0].dtype),
                              master.to(params[0].dtype))
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none=True):
        for params, master in zip(self.groups, self.masters):
            master.grad = None
            for p in params:
                p.grad = None

    def state_bytes(self):
        """Bytes of optimizer state on this rank: the master shard, and AdamW's m, v and step count for it."""
        tensors = list(self.masters) + [v for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


class ZeroOne(Plan):
    def __init__(self, model, ctx, make_optimizer):
        optimizer = make_optimizer(model)
        self.reference_layout = parameter_names(model, optimizer)
        self.model = model
        self.optimizer = ShardedAdamW(optimizer, ctx.rank, ctx.world_size)
        self.data_rank, self.data_world, self.dropout_rank = ctx.rank, ctx.world_size, ctx.rank
        self.names = {p: n for n, p in model.named_parameters()}
        self.n_params = sum(p.numel() for params in self.optimizer.groups for p in params)

    def sync_gradients(self):
        self.optimizer.reduce_scatter_gradients()

    def clip_grad_norm_(self, max_norm):
        return self.optimizer.clip_grad_norm_(max_norm)

    # Checkpoints: every rank has the whole weights; each holds 1/N of the optimizer state.
    def local_state(self):
        return {"model": self.model.state_dict() if self.data_rank == 0 else None,
                "optimizer": self.optimizer.inner.state_dict()["state"]}  # {group index: state of its shard}

    def assemble(self, parts):
        state = {}
        for g, params in enumerate(self.optimizer.groups):
            shards = [part["optimizer"].get(g) for part in parts]
            if shards[0] is None:  # no step yet: no state
                continue
            for key, value in shards[0].items():
                # A per-element state (m, v) is cut back into parameters; a scalar (the step count) is shared.
                flat = torch.cat([s[key] for s in shards]) if value.dim() else None
                offset = 0
                for p in params:
                    piece = value if flat is None else flat[offset:offset + p.numel()].view(p.shape)
                    state.setdefault(self.names[p], {})[key] = piece
                    offset += p.numel()
        return parts[0]["model"], state

    def load_pieces(self, weights, state_by_name):
        self.model.load_state_dict(weights)
        self.optimizer.reload_masters()
        shards = {}
        for g, (params, size) in enumerate(zip(self.optimizer.groups, self.optimizer.shard_sizes)):
            names = [self.names[p] for p in params]
            if not all(n in state_by_name for n in names):
                continue
            first = state_by_name[names[0]]
            shards[g] = {key: self.my_shard_of([state_by_name[n][key] for n in names], size) if value.dim() else value
                         for key, value in first.items()}
        inner = self.optimizer.inner
        inner.load_state_dict({"state": shards, "param_groups": inner.state_dict()["param_groups"]})

    def my_shard_of(self, tensors, size):
        """This rank's shard of the tensors (one per parameter of a group), flattened like the parameters."""
        return self.optimizer.my_shard(self.optimizer.flatten(tensors, size)).clone()

    def summary(self):
        text, record = super().summary()
        mine = self.optimizer.state_bytes()
        per_rank = [None] * self.data_world
        torch.distributed.all_gather_object(per_rank, mine)
        formula = 12 * self.n_params / self.data_world
        record.update(optimizer_state_bytes=per_rank, params=self.n_params, formula_bytes=formula)
        measured = ", ".join(f"{b / 2**20:.3f}" for b in per_rank)
        return (f"{text}\nZeRO-1 optimizer state per rank (master shard + Adam m, v): {measured} MiB; "
                f"12Ψ/N = {formula / 2**20:.3f} MiB for Ψ = {self.n_params:,}, N = {self.data_world}"), record
