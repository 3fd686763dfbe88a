"""parallel/pipeline.py — pipeline parallelism with the GPipe schedule (seed 1.7, "Pipeline Parallelism").

The L blocks are cut into p stages of consecutive blocks, one stage per rank; the first stage also holds the
embeddings, the last the final LayerNorm and the LM head. A stage sends its output activations (B·T·d values)
to the next one and, in backward, their gradients to the one before: that is all the communication, point to
point and small, which is why a pipeline can span nodes where tensor parallelism cannot.

One batch going through p stages keeps all but one of them idle at any time. GPipe (Huang et al. 2019) cuts
the batch into m micro-batches that follow each other down the pipeline — all forwards, then all backwards,
gradients accumulating, one optimizer step at the end. With a forward F and a backward B of one time unit each,
p = 3 stages and m = 4 micro-batches:

    time      1  2  3  4  5  6  7  8  9 10 11 12
    stage 0   F0 F1 F2 F3 ·  ·  ·  ·  B3 B2 B1 B0
    stage 1   ·  F0 F1 F2 F3 ·  ·  B3 B2 B1 B0 ·
    stage 2   ·  ·  F0 F1 F2 F3 B3 B2 B1 B0 ·  ·

Every stage works 2m of the 2(m + p − 1) units. The idle rest, the bubble, is (p − 1)/(m + p − 1) of the step
whatever the lengths of F and B (bubble_fraction): more micro-batches shrink it, but the activations of all m
wait in memory for their backward (1F1B schedules start the backwards earlier and keep at most p in flight,
with the same bubble). Each rank also measures its idle time, the bubble as it really is.

The LM head is tied to the token embedding, and the two sit on the first and the last stage: each keeps a
copy, initialised the same, and after backward an all-reduce between those two ranks sums their gradients
(Megatron's "embedding group"), so that both copies take the same step.
"""

import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from parallel.common import (Plan, all_reduce, clip_grads_, optimizer_state_by_name, optimizer_state_dict,
                             parameter_names, recv, send, squared_norm, sum_over_ranks)


# classroom: begin bubble_fraction
def bubble_fraction(stages, micro_batches):
    """The idle fraction of a GPipe step (seed 1.7, "pipeline bubbles"): (p − 1)/(m + p − 1).

    With p stages and m micro-batches, the forwards take m + p − 1 time slots (the last micro-batch starts
    p − 1 slots after the first and needs m − 1 more to enter), and so do the backwards; each stage computes
    during m of those slots in each phase and waits during the other p − 1."""
    return (stages - 1) / (micro_batches + stages - 1)
# classroom: end bubble_fraction


def stage_layers(n_layer, stages, stage):
    """The blocks of `stage`: consecutive, as even as possible (the first L mod p stages take one more)."""
    base, extra = divmod(n_layer, stages)
    first = stage * base + min(stage, extra)
    return range(first, first + base + (stage < extra))


class PipelineStage(nn.Module):
    """One stage of the GPT. It keeps the GPT's parameter names (blocks.5.attn.qkv.weight stays that), so
    checkpoints need no renaming: the first stage's token_embedding.weight and the last stage's lm_head.weight
    are the two copies of the tied embedding."""

    def __init__(self, model, stage, stages):
        super().__init__()
        self.stage, self.stages = stage, stages
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in stage_layers(len(model.blocks), stages, stage)})
        if self.is_first:
            self.token_embedding, self.position_embedding = model.token_embedding, model.position_embedding
            self.dropout = model.dropout
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        self.n_embd = model.config.n_embd

    def compute(self, x, targets=None):
        """This stage's part of GPT.forward: token ids → residual stream (B, T, d) on the first stage, residual
        stream → residual stream in the middle, → the mean cross-entropy against `targets` on the last."""
        if self.is_first:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.dropout(self.token_embedding(x) + self.position_embedding(positions))
        for block in self.blocks.values():
            x = block(x)
        if not self.is_last:
            return x
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)

    def forward(self, idx, targets):
        """One batch through the whole pipeline, no micro-batches (evaluation): (None, the loss on every rank)."""
        param = next(self.parameters())
        x = idx if self.is_first else recv((*idx.shape, self.n_embd), param.dtype, param.device, self.stage - 1)
        out = self.compute(x, targets if self.is_last else None)
        if not self.is_last:
            send(out.to(param.dtype), self.stage + 1)
        loss = out.detach().float() if self.is_last else torch.zeros((), device=param.device)
        dist.broadcast(loss, src=self.stages - 1)
        return None, loss


class Pipeline(Plan):
    def __init__(self, model, ctx, make_optimizer):
        self.reference_layout = parameter_names(model, make_optimizer(model))
        self.model = PipelineStage(model, ctx.rank, ctx.world_size)
        self.optimizer = make_optimizer(self.model)
        self.layout = parameter_names(self.model, self.optimizer)
        self.data_rank, self.data_world, self.dropout_rank = 0, 1, ctx.rank  # every stage sees the whole batch
        self.device, self.dtype = ctx.device, next(self.model.parameters()).dtype
        self.rank, self.stages = ctx.rank, ctx.world_size
        # The two copies of the tied embedding, and the group that sums their gradients (every rank creates it).
        self.embedding_group = dist.new_group(sorted({0, ctx.world_size - 1}))
        self.tied = (self.model.token_embedding.weight if self.model.is_first else
                     self.model.lm_head.weight if self.model.is_last else None)
        self.micro_batches, self.idle = None, None

    def clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: wait for them before reading the time
        return time.perf_counter()

    def train_step(self, micro_batches, autocast, any_rank, poison=False):
        """One GPipe step (the schedule above) over micro_batches [(x, y), …] of the global batch. Returns
        (mean loss, None) on every rank — or (nan, reason) when some stage computed a non-finite value: that is
        found after the forwards, before any backward, and agreed on by all ranks (`any_rank`), so that every
        rank rolls back together. `poison` makes this stage's outputs NaN (fault injection)."""
        stage, m = self.model, len(micro_batches)
        self.micro_batches, started, busy = m, self.clock(), 0.0
        inputs, outputs = [], []
        for x, y in micro_batches:  # forward: F0 F1 … F(m−1)
            if stage.is_first:
                inp = x.to(self.device)
            else:
                inp = recv((*x.shape, stage.n_embd), self.dtype, self.device, self.rank - 1).requires_grad_()
            t = self.clock()
            with autocast:
                out = stage.compute(inp, y.to(self.device) if stage.is_last else None)
            if poison:
                out = out * float("nan")
            busy += self.clock() - t
            if not stage.is_last:  # the residual stream travels in the weights' dtype, which the receiver expects
                send(out.detach().to(self.dtype), self.rank + 1)
            inputs.append(inp)
            outputs.append(out)
        if any_rank(not all(torch.isfinite(out).all().item() for out in outputs)):
            return float("nan"), "non-finite loss (or activations) in the pipeline"
        for i in reversed(range(m)):  # backward: B(m−1) … B0
            if stage.is_last:  # the loss is the mean over micro-batches, as in gradient accumulation
                target, grad = outputs[i] / m, None
            else:
                target, grad = outputs[i], recv(outputs[i].shape, self.dtype, self.device, self.rank + 1)
            t = self.clock()
            torch.autograd.backward(target, grad)
            busy += self.clock() - t
            if not stage.is_first:
                send(inputs[i].grad, self.rank - 1)
        loss = torch.tensor(sum(out.item() for out in outputs) / m if stage.is_last else 0.0, dtype=torch.float64,
                            device=self.device)
        dist.broadcast(loss, src=self.stages - 1)
        self.idle = 1 - busy / (self.clock() - started)
        return loss.item(), None

    def sync_gradients(self):
        """The tied embedding: first stage's gradient (as an embedding) + last stage's (as the LM head)."""
        if self.tied is not None:
            all_reduce(self.tied.grad, self.embedding_group)

    def clip_grad_norm_(self, max_norm):
        """‖g‖² summed over the stages; the last stage's copy of the tied embedding is left out (it is counted
        on the first stage)."""
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        counted = [g for n, g in named if not (self.model.is_last and n == "lm_head.weight")]
        return clip_grads_([g for _, g in named], sum_over_ranks(squared_norm(counted, self.device)), max_norm)

    def measure_step(self):
        return {"idle_fraction": self.idle}

    def local_state(self):
        return {"model": self.model.state_dict(),
                "optimizer": optimizer_state_by_name(self.optimizer.state_dict(), self.layout)}

    def assemble(self, parts):
        weights, state = {}, {}
        for part in parts:
            weights.update(part["model"])
            state.update(part["optimizer"])
        state.pop("lm_head.weight", None)  # the last stage's copy: the same as the first stage's token_embedding
        return weights, state

    def load_pieces(self, weights, state_by_name):
        self.model.load_state_dict({n: weights[n] for n in self.model.state_dict()})
        source = {"lm_head.weight": "token_embedding.weight"}  # one state for the tied weight, in both copies
        mine = {n: state_by_name[source.get(n, n)] for group in self.layout for n in group
                if source.get(n, n) in state_by_name}
        self.optimizer.load_state_dict(optimizer_state_dict(mine, self.layout, self.optimizer.param_groups))

    def summary(self):
        text, record = super().summary()
        if self.micro_batches is None:  # no step ran
            return text, record
        theory = record["bubble_fraction"] = bubble_fraction(self.stages, self.micro_batches)
        idle = ", ".join(f"{f:.3f}" for f in record["idle_fraction"])
        return (f"{text}\npipeline bubble: (p − 1)/(m + p − 1) = {theory:.3f} for p = {self.stages} stages and "
                f"m = {self.micro_batches} micro-batches; measured idle fraction per rank (median step): "
                f"{idle}"), record
