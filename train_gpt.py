"""train_gpt.py — a GPT-2-style decoder, its pretraining loop and generation, in one file.

Read beside Part 1 of the seed chapter (shared/seeds/000_…): every equation of pretraining
is a small named function below, with its formula in the docstring and the section it
implements. The file reads top to bottom:

    0. Hyperparameters the `train` command's settings, declared once (settings.py); the model's are GPTConfig's
    1. The equations   6ND, 12·L·d², MFU, Chinchilla, warmup+cosine LR, perplexity   (1.4–1.6, 1.8)
    2. The model       GPTConfig, attention (naive | sdpa | flash), blocks, GPT       (1.4)
    3. Generation      KV cache, temperature / top-k / top-p sampling
    4. GPT-2 weights   in hf_gpt2.py: a Hugging Face GPT-2 state dict in, our GPT out as one
    5. Data            token shards → random training windows, fixed validation windows
    6. Checkpoints     atomic writes, resume, model soups                          (1.8)
    7. Stability       loss-spike / NaN detection and rollback                       (1.8)
    8. Parallelism     DDP (+ PowerSGD), FSDP2, hand-written all-reduce; memory and  (1.7)
                       communication per strategy; tp, pp, zero1, dp-tp live in parallel/
    9. The loop        run_training: batch → forward → NaN check → backward → clip → step
                       → log → checkpoint; AdamW, accumulation, rollback, plots     (1.8)
   10. Command line    `train`, `sample`, `soup`, `convert`, `export-hf`

Usage:
    python train_gpt.py train --data runs/default/data --out runs/default/pretrain
    python train_gpt.py sample runs/default/pretrain/model.pt --prompt "def "
    python train_gpt.py soup greedy ckpt_a.pt ckpt_b.pt --data runs/default/data --out soup.pt
    python train_gpt.py export-hf runs/default/sft/model.pt --out hf/sft --verify
"""

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time
import types
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.errors import DataError
from data.shards import ShardError, read_shard
from data.stages import (RESUME_FILE, exit_torchrun_worker, finish_stage, read_stage, stage_decision,
                         stage_fingerprint, write_stage)
from kernels.flash_attention import naive_attention
from parallel.costs import parallel_costs
from settings import ConfigError, add_settings, check_ranges, runtime_flags, setting


# =============================================================================
# 0. Hyperparameters of pretraining: one line each — value, what it does, allowed range. The model's
#    own (--n-layer, --n-head, --n-embd, --block-size, --dropout) are GPTConfig's fields (section 2);
#    settings.py turns both into the `train` command's flags, range checks and runtime-flag list.
# =============================================================================

MODEL_PARALLEL = ("tp", "dp-tp", "pp", "zero1")  # --parallel strategies implemented in parallel/


def int_list(text):
    return [int(x) for x in text.split(",") if x]


@dataclass
class Hyperparameters:
    # data and output
    data: str = setting("runs/default/data", "directory written by `python -m data.prepare`", group="data and output")
    out: str = setting("runs/default/pretrain", "output directory: checkpoints, metrics, plot", group="data and output")
    init_from: str = setting(None, "start from this checkpoint's weights (same config)", group="data and output")
    # the model, beyond GPTConfig's sizes
    no_bias: bool = setting(False, "no biases in Linear/LayerNorm layers (GPTConfig.bias = False)", group="model")
    attention: str = setting(None, "attention implementation (default: flash on CUDA, sdpa on CPU)",
                             choices=["naive", "sdpa", "flash"], group="model")
    # optimisation: AdamW; warmup + cosine LR and gradient clipping are seed 1.8's
    micro_batch_size: int = setting(16, "sequences per forward/backward", check="> 0", runtime=True,
                                    group="optimisation")
    global_batch_size: int = setting(16, "sequences per optimizer step (accumulated)", check="> 0",
                                     group="optimisation")
    max_steps: int = setting(1000, "optimizer steps", check="> 0", group="optimisation")
    lr: float = setting(3e-3, "peak learning rate", check="> 0", group="optimisation")
    min_lr: float = setting(None, "final learning rate (default lr/10)", group="optimisation")
    warmup_steps: int = setting(50, "linear warmup steps", group="optimisation")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices", group="optimisation")
    beta1: float = setting(0.9, "AdamW β1", group="optimisation")
    beta2: float = setting(0.95, "AdamW β2", group="optimisation")
    grad_clip: float = setting(1.0, "max global gradient norm", check="> 0", group="optimisation")
    seed: int = setting(1337, "random seed (model init and batch sampling)", group="optimisation")
    # stability (seed 1.8): spikes, NaN, rollback, and fault injection to exercise them
    spike_window: int = setting(50, "losses in the rolling spike-detection window", check="> 0", group="stability")
    spike_sigmas: float = setting(3.0, "a spike is a loss above mean + this many σ", group="stability")
    max_rollbacks: int = setting(5, "give up after this many rollbacks", group="stability")
    rollback_lr_factor: float = setting(1.0, "multiply the LR by this after a rollback", group="stability")
    inject_nan_at: list = setting([], "fault injection: batch numbers whose loss is NaN", type=int_list,
                                  group="stability")
    inject_garbage_at: list = setting([], "fault injection: batch numbers with random targets", type=int_list,
                                      group="stability")
    inject_rank: int = setting(-1, "fault injection only on this rank (-1: all)", group="stability")
    # evaluation, logging, checkpoints — bookkeeping: none of these changes the trained model
    eval_every: int = setting(100, "steps between validation evaluations", check="> 0", runtime=True,
                              group="evaluation, logging, checkpoints")
    eval_windows: int = setting(64, "validation windows per evaluation", check="> 0",
                                group="evaluation, logging, checkpoints")
    log_every: int = setting(10, "steps between progress lines", runtime=True, group="evaluation, logging, checkpoints")
    checkpoint_every: int = setting(100, "steps between checkpoints", check="> 0", runtime=True,
                                    group="evaluation, logging, checkpoints")
    keep_checkpoints: int = setting(3, "how many recent checkpoints to keep", check="> 0", runtime=True,
                                    group="evaluation, logging, checkpoints")
    resume: bool = setting(False, "continue from the latest checkpoint in --out (an unfinished run of the same "
                                  "configuration is resumed even without it)", runtime=True,
                           group="evaluation, logging, checkpoints")
    force: bool = setting(False, "train again even if --out holds a finished run of this configuration", runtime=True,
                          group="evaluation, logging, checkpoints")
    peak_flops: float = setting(None, "peak FLOP/s for MFU (default: from the GPU's name)", runtime=True,
                                group="evaluation, logging, checkpoints")
    # parallelism and speed (seed 1.7) — how the same step is computed, not what it computes
    parallel: str = setting("none", "under torchrun: data parallelism (DDP, FSDP2 = ZeRO-3, DDP's all-reduce written "
                                    "by hand), or from parallel/: tensor (tp), pipeline (pp), ZeRO-1 by hand (zero1), "
                                    "data × tensor (dp-tp)",
                            choices=["none", "ddp", "fsdp", "manual", *MODEL_PARALLEL], runtime=True, group="parallelism and speed")
    tp: int = setting(None, "ranks per tensor-parallel group (tp: all of them; dp-tp: a divisor of the world size, "
                            "the rest is data parallelism)", runtime=True, group="parallelism and speed")
    pp: int = setting(None, "pipeline stages under --parallel pp (one per rank: the world size)", runtime=True,
                      group="parallelism and speed")
    micro_batches: int = setting(None, "pp: micro-batches per step through the pipeline (sets the micro-batch size "
                                       "to global batch / M; default global / --micro-batch-size)", runtime=True,
                                 group="parallelism and speed")
    powersgd_rank: int = setting(0, "ddp: compress gradients with PowerSGD of this rank (0: off; lossy)",
                                 group="parallelism and speed")
    powersgd_start_step: int = setting(10, "ddp with PowerSGD: all-reduce uncompressed for this many steps first "
                                           "(at least 2)", group="parallelism and speed")
    compile: bool = setting(False, "torch.compile the model", runtime=True, group="parallelism and speed")
    compile_backend: str = setting("inductor", "torch.compile backend with --compile: inductor (generates fused "
                                               "kernels), or e.g. aot_eager (traces forward and backward, generates "
                                               "nothing: a quick check that the model compiles)", runtime=True,
                                   group="parallelism and speed")
    device: str = setting("auto", "cpu, cuda, cuda:1, … (auto: cuda if available)", runtime=True,
                          group="parallelism and speed")


# =============================================================================
# 1. The equations of pretraining
# =============================================================================

def count_params(model, non_embedding=True):
    """N: the number of learnable parameters (seed 1.5).

    With non_embedding=True the token and position embeddings are left out, as in the
    scaling-law papers (Kaplan et al. 2020): their N counts the weights that do the compute.
    The LM head is tied to the token embedding, so it is not counted twice.
    """
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.token_embedding.weight.numel() + model.position_embedding.weight.numel()
    return n


def approx_params(n_layer, n_embd):
    """N ≈ 12·L·d²  (seed 1.5).

    Per block: attention has Q, K, V and output projections, 4·d² weights; the MLP has
    d→4d and 4d→d, 8·d². Biases and LayerNorms (O(d) each) are ignored.
    """
    return 12 * n_layer * n_embd**2


# classroom: begin training_flops
def training_flops(n_params, n_tokens):
    """C ≈ 6·N·D  (seed 1.5): 2 FLOPs per multiply-add, ×3 for forward + backward (≈ 2× forward)."""
    return 6 * n_params * n_tokens
# classroom: end training_flops


def flops_per_token(n_params, n_layer, seq_len, n_embd):
    """FLOPs to train on one token: 6·N + 12·L·T·d.

    6·N is the weight matmuls (forward + backward); 12·L·T·d adds attention's Q·Kᵀ and P·V,
    which grow with the context length T and are not in N (PaLM paper, appendix B).
    """
    return 6 * n_params + 12 * n_layer * seq_len * n_embd


# Dense bf16 peak FLOP/s (no sparsity) of common accelerators, from their data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def mfu(tokens_per_sec, flops_per_tok, peak_flops):
    """Model FLOPs utilisation = achieved FLOP/s ÷ peak FLOP/s = tokens/s · FLOPs/token ÷ peak."""
    return tokens_per_sec * flops_per_tok / peak_flops


def device_peak_flops(device):
    """Look the accelerator's name up in PEAK_FLOPS; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def chinchilla_optimal(compute):
    """Compute-optimal (N*, D*) for a budget C (seed 1.6, Hoffmann et al. 2022).

    With D* ≈ 20·N* and C = 6·N·D:  C = 120·N*²  ⇒  N* = √(C/120),  D* = 20·N*.
    """
    n_opt = math.sqrt(compute / (6 * 20))
    return n_opt, 20 * n_opt


# classroom: begin get_lr
def get_lr(step, warmup_steps, total_steps, max_lr, min_lr=None):
    """Linear warmup from 0, then cosine decay to min_lr (seed 1.8, "Learning rate schedule").

        lr(t) = max_lr · t / warmup                                   t < warmup
        lr(t) = min_lr + ½ (max_lr − min_lr) (1 + cos(π · p))         p = (t − warmup)/(total − warmup)
        lr(t) = min_lr                                                t ≥ total
    min_lr defaults to max_lr / 10.
    """
    min_lr = max_lr / 10 if min_lr is None else min_lr
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
# classroom: end get_lr


# classroom: begin perplexity
def perplexity(mean_nll):
    """Perplexity = exp( (1/T) Σ_t −log P(x_t | x_<t) ) = exp(mean NLL in nats)  (seed 1.4)."""
    return math.exp(mean_nll)
# classroom: end perplexity


def bits_per_byte(mean_nll, n_tokens, n_bytes):
    """Bits per byte = (mean NLL / ln 2) · tokens / bytes.

    NLL per token depends on the tokenizer (bigger tokens → higher loss per token);
    per byte of the underlying text it does not, so runs with different tokenizers compare.
    """
    return mean_nll / math.log(2) * n_tokens / n_bytes


def unigram_loss(train_tokens, val_tokens, vocab_size):
    """Cross-entropy of the best context-free model: −mean log p(x), p = add-one-smoothed counts.

    A language model has learned something only when its validation loss is well below this.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(val_tokens)].mean())


# =============================================================================
# 2. The model
# =============================================================================

@dataclass
class GPTConfig:
    vocab_size: int = 4102     # tokens in the vocabulary (our 4,096 BPE tokens + 6 special tokens); from the data
    block_size: int = setting(256, "context length T: the longest context the position embedding covers", check="> 0",
                              group="model")
    n_layer: int = setting(4, "transformer blocks L", check="> 0", group="model")
    n_head: int = setting(4, "attention heads per block", check="> 0", group="model")
    n_embd: int = setting(128, "residual stream width d", check="> 0", group="model")
    dropout: float = setting(0.0, "dropout on attention and MLP outputs (0 for pretraining)", check="[0, 1)",
                             group="model")
    bias: bool = True          # biases in Linear and LayerNorm, as in GPT-2 (the flag is --no-bias)
    attention: str = "sdpa"    # naive | sdpa | flash — how attention is computed; not part of the maths

    # Fields that change how the model computes but not what its weights mean.
    RUNTIME_FIELDS = ("dropout", "attention")

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def attention_mask(query_doc_ids, key_doc_ids, query_positions, key_positions):
    """Boolean mask (B, 1, Tq, Tk): True where query i may attend to key j.

    allowed[i, j] = (pos_j ≤ pos_i) and (doc_j = doc_i) — causal, and never across documents.
    Padding is a document of its own (id −1), so real tokens never attend to it.
    """
    causal = key_positions[:, None, :] <= query_positions[:, :, None]
    same_doc = key_doc_ids[:, None, :] == query_doc_ids[:, :, None]
    return (causal & same_doc)[:, None]


class KVCache:
    """Keys and values of the tokens seen so far, so each new token costs O(T), not O(T²).

    Buffers are preallocated for `max_len` tokens; `length` says how many are filled.
    Alongside the keys we keep each token's document id and sequence index, from which the
    attention mask of later queries is built.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.doc_ids = torch.empty(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0

    def append(self, layer, k, v):
        """Write this layer's new keys/values after the cached ones; return all of them."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.layer_index = layer_index
        self.attention = config.attention
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, doc_ids=None, mask=None, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=2)
        # (B, T, C) → (B, heads, T, head_dim): each head attends independently. (Under tensor parallelism a
        # rank holds n_head/k of the heads, and q, k, v are C/k wide: parallel/tensor.py.)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        y = self.attend(q, k, v, doc_ids, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.proj(y))

    def attend(self, q, k, v, doc_ids, mask):
        """softmax(Q·Kᵀ/√d + mask)·V, computed by the selected implementation.

        Training takes the causal fast path of each implementation (with per-token document
        ids for packed sequences). Decoding with a KV cache and left padding needs a general
        mask, which goes to PyTorch's SDPA whatever the choice.
        """
        dropout = self.dropout if self.training else 0.0
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.attention == "naive":
            return naive_attention(q, k, v, causal=True, doc_ids=doc_ids)
        if self.attention == "flash":
            from kernels.flash_attention import flash_attention
            return flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        positions = torch.arange(q.shape[2], device=q.device).expand(q.shape[0], -1)
        mask = attention_mask(doc_ids, doc_ids, positions, positions)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class MLP(nn.Module):
    """Position-wise feed-forward: d → 4d → GELU → d."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, doc_ids=None, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), doc_ids, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer reuses the input embedding.
        self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and residual projections
        scaled by 1/√(2·n_layer) — each block adds two outputs to the residual stream, so
        without the scaling its variance would grow with depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, position_ids=None, doc_ids=None, cache=None):
        """Logits (B, T, vocab) for every position, and the mean NLL if targets are given.

        position_ids restart at 0 for each packed example; doc_ids keep attention inside one
        document (packing) and away from padding (id −1). Targets equal to −100 are ignored.
        """
        logits = self.lm_head(self.hidden_states(idx, position_ids, doc_ids, cache))
        loss = None
        if targets is not None:
            # fp32 log-softmax even under bf16 autocast: the loss is a sum of small differences.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx, position_ids=None, doc_ids=None, cache=None):
        """The final, LayerNormed residual stream (B, T, n_embd) — what the LM head reads, and
        what a reward or value head reads instead (reward.py, ppo.py)."""
        B, T = idx.shape
        offset = cache.length if cache is not None else 0
        if position_ids is None:
            if offset + T > self.config.block_size:
                raise ValueError(f"position {offset + T - 1} is beyond the context length "
                                 f"block_size={self.config.block_size}")
            position_ids = torch.arange(offset, offset + T, device=idx.device).expand(B, -1)
        elif not torch.compiler.is_compiling() and int(position_ids.max()) >= self.config.block_size:
            # Reading the maximum is a host sync and a torch.compile graph break: only given positions
            # need it, and a compiled model leaves the check to the embedding lookup (an index error).
            raise ValueError(f"position {int(position_ids.max())} is beyond the context length "
                             f"block_size={self.config.block_size}")
        mask = None
        if cache is not None:
            doc_ids = torch.zeros_like(idx) if doc_ids is None else doc_ids
            cache.doc_ids[:, offset:offset + T] = doc_ids
            all_positions = torch.arange(offset + T, device=idx.device).expand(B, -1)
            mask = attention_mask(doc_ids, cache.doc_ids[:, :offset + T], all_positions[:, offset:], all_positions)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(position_ids))
        for block in self.blocks:
            x = block(x, doc_ids, mask, cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
        return adamw(self, lr, weight_decay, betas, device_type)

    # =========================================================================
    # 3. Generation
    # =========================================================================

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_token=None, pad_token=None, prompt_mask=None, use_cache=True, generator=None,
                 return_logprobs=False):
        """Sample max_new_tokens continuations of idx (B, T) autoregressively.

        temperature 0 is greedy decoding. Prompts of different lengths come left-padded, with
        prompt_mask (B, T) True on real tokens; padding gets doc id −1 and no position.
        A sequence that has emitted eos_token is finished: later slots hold pad_token (or eos).
        With use_cache the keys and values of earlier tokens are kept (KVCache), so each step
        feeds only the newest token; without it every step re-reads the whole sequence.
        With return_logprobs it returns (sequences, logprobs): logprobs (B, R) holds
        log softmax(logits / T)[y_t] of each sampled token — the log-prob under the distribution it
        was drawn from, which RL needs anyway — and 0 in the slots after a row finished.
        """
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context "
                             f"length block_size={self.config.block_size}")
        if return_logprobs and (temperature == 0 or top_k is not None or top_p is not None):
            raise ValueError("return_logprobs needs plain sampling (temperature > 0, no top_k or top_p)")
        real = torch.ones_like(idx, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
        doc_ids = torch.where(real, 0, -1)
        position_ids = (real.long().cumsum(1) - 1).clamp(min=0)
        fill_token = pad_token if pad_token is not None else eos_token
        cache = None
        if use_cache:
            dtype = next(self.parameters()).dtype
            if torch.is_autocast_enabled(idx.device.type):
                dtype = torch.get_autocast_dtype(idx.device.type)
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, dtype)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = idx
        logprobs = []

        def last_logits(tokens, positions, docs):
            # Only the last position's logits are sampled from: the LM head skips the other columns
            # (on a 30-token prompt batch it was most of the prefill's work).
            return self.lm_head(self.hidden_states(tokens, positions, docs, cache)[:, -1])

        logits = last_logits(idx, position_ids, doc_ids)
        for _ in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if return_logprobs:
                logprob = torch.log_softmax(logits.float() / temperature, dim=-1)
                logprobs.append(torch.where(finished, 0.0, logprob.gather(1, next_token[:, None]).squeeze(1)))
            if eos_token is not None:
                next_token = torch.where(finished, fill_token, next_token)
                finished |= next_token == eos_token
            out = torch.cat([out, next_token[:, None]], dim=1)
            if eos_token is not None and finished.all():
                break
            next_position = position_ids[:, -1:] + 1
            position_ids = torch.cat([position_ids, next_position], dim=1)
            doc_ids = torch.cat([doc_ids, torch.zeros_like(next_position)], dim=1)
            if use_cache:
                logits = last_logits(next_token[:, None], next_position, doc_ids[:, -1:])
            else:
                logits = last_logits(out, position_ids, doc_ids)
        if not return_logprobs:
            return out
        return out, torch.stack(logprobs, dim=1) if logprobs else torch.zeros(B, 0, device=idx.device)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab).

    temperature rescales the logits (0 → argmax); top_k keeps the k most likely tokens;
    top_p (nucleus sampling) keeps the smallest set whose probability mass reaches p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass *before* it already reaches p (so the top token stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return sample_categorical(torch.softmax(logits, dim=-1), generator)


# classroom: begin sample_categorical
def sample_categorical(probs, generator=None):
    """One draw per row from the categorical distribution probs (B, V), by inverse transform
    (every sampled response — seed 3.2's k samples, 3.4's rollouts — is a chain of these draws):

        y = min { i : F_i > x },   x = u · F_V,   F_i = Σ_{j ≤ i} p_j (the CDF),   u ∼ U[0, 1)

    One uniform per row. torch.multinomial draws one exponential per vocabulary entry instead —
    on CPU about 50× slower at 256 × 4,096 (bench/sampling.py), and 59 % of a PPO rollout's time.
    A token of probability 0 (cut by top-k or top-p) has F_i = F_{i−1}, so it is never the first
    with F_i > x. Scaling u by F_V absorbs the float32 CDF's rounding (F_V ≈ 1); u < 1 keeps
    x below F_V, so the search always ends on a token of positive probability.
    """
    cdf = probs.float().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
# classroom: end sample_categorical


# =============================================================================
# 4. GPT-2 weights from and to Hugging Face: hf_gpt2.py (the key map, the transposed Conv1D weights,
#    the config, and the `export-hf` command) — a format conversion, not pretraining's own story
# =============================================================================

# =============================================================================
# 5. Data: token shards → training windows
# =============================================================================

def read_meta(data_dir):
    """meta.json of a prepared data directory: vocabulary size, shard names, token and byte counts."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{meta_path}: not found — run `python -m data.prepare --out {data_dir}` first")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta_path}: not valid JSON ({e})") from None


class TokenData:
    """The shards written by data/prepare.py, read through np.memmap.

    Training batches are *stateless*: the windows of batch number b are drawn from a random
    generator seeded with (seed, b). Resuming, skipping a bad batch and splitting a global
    batch across ranks therefore need no saved sampler state — only batch numbers.
    """

    def __init__(self, data_dir, block_size, vocab_size):
        self.meta = read_meta(data_dir)
        self.block_size = block_size
        self.train = [self._open(os.path.join(data_dir, s), vocab_size) for s in self.meta["train_shards"]]
        self.val = [self._open(os.path.join(data_dir, s), vocab_size) for s in self.meta["val_shards"]]
        # A window is block_size inputs plus one more token for the last target.
        self.train_starts = np.array([max(0, len(s) - block_size - 1) for s in self.train])
        if self.train_starts.sum() == 0 or not any(len(s) > block_size for s in self.val):
            raise ConfigError(f"--block-size {block_size} is longer than the data in {data_dir} "
                              f"(largest train shard {max(map(len, self.train))} tokens)")
        self.tokenizer = os.path.join(data_dir, self.meta.get("tokenizer", "tokenizer"))

    @staticmethod
    def _open(path, vocab_size):
        tokens = read_shard(path)
        shard_vocab = int(np.fromfile(path, dtype=np.int32, count=4)[3])
        if shard_vocab > vocab_size:
            raise ConfigError(f"{path}: token ids come from a vocabulary of {shard_vocab}, "
                              f"larger than the model's vocab_size={vocab_size}")
        return tokens

    def window(self, shards, shard_index, start):
        chunk = torch.from_numpy(shards[shard_index][start:start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch_windows(self, seed, batch_number, global_batch_size):
        """(shard, start) of every window of global batch `batch_number`, uniform over all starts."""
        rng = np.random.default_rng([seed, batch_number])
        flat = rng.integers(0, self.train_starts.sum(), size=global_batch_size)
        shard = np.searchsorted(np.cumsum(self.train_starts), flat, side="right")
        start = flat - np.concatenate([[0], np.cumsum(self.train_starts)])[shard]
        return list(zip(shard.tolist(), start.tolist()))

    def train_batch(self, windows):
        x, y = zip(*(self.window(self.train, s, i) for s, i in windows))
        return torch.stack(x), torch.stack(y)

    def val_windows(self, max_windows):
        """Fixed, non-overlapping validation windows, the same at every evaluation."""
        windows = [(s, i) for s, shard in enumerate(self.val)
                   for i in range(0, len(shard) - self.block_size - 1, self.block_size)]
        step = max(1, len(windows) // max_windows)
        return windows[::step][:max_windows]

    def val_batches(self, max_windows, batch_size):
        windows = self.val_windows(max_windows)
        for i in range(0, len(windows), batch_size):
            x, y = zip(*(self.window(self.val, s, j) for s, j in windows[i:i + batch_size]))
            yield torch.stack(x), torch.stack(y)


def micro_batch_rows(rank, world_size, micro_step, micro_batch_size, grad_accum):
    """Which rows of the global batch this rank reads at this micro-step.

    The global batch (world_size · grad_accum · micro_batch_size rows) is cut into one
    contiguous slice per rank, each slice into grad_accum micro-batches: disjoint across
    ranks, and together exactly the single-process batch.
    """
    first = (rank * grad_accum + micro_step) * micro_batch_size
    return slice(first, first + micro_batch_size)


def batch_number_for_step(step, skipped_batches):
    """The step-th batch number that has not been skipped after a loss spike."""
    number = step
    for skipped in sorted(skipped_batches):
        if skipped <= number:
            number += 1
    return number


# =============================================================================
# 6. Checkpoints
# =============================================================================
# ── first reading: skip to section 7 (checkpoint files, resume, model soups) ──

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with weights_only=True; one clear error if it is missing or corrupt."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means a corrupt file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{path}: corrupt or not a checkpoint ({type(e).__name__}: {first_line[:120]})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ConfigError(f"{path}: not a checkpoint of this project (no 'model'/'config' entries)")
    return checkpoint


def check_same_config(config, checkpoint_config, path):
    """Refuse to load weights into a model of another shape, naming the first difference."""
    for name, value in asdict(config).items():
        if name in GPTConfig.RUNTIME_FIELDS:
            continue
        if checkpoint_config.get(name) != value:
            raise ConfigError(f"{path}: checkpoint from a different config: "
                              f"{name}={checkpoint_config.get(name)} there, {value} here")


def model_from_checkpoint(path, device="cpu", **overrides):
    """A GPT with the checkpoint's config and weights (the loader every later stage uses)."""
    checkpoint = load_checkpoint(path)
    config = GPTConfig.from_dict({**checkpoint["config"], **overrides})
    model = GPT(config)
    model.load_state_dict(checkpoint["model"])
    return model.to(device), checkpoint


def checkpoint_paths(out_dir):
    """Step checkpoints in out_dir, oldest first: ckpt_<step>.pt files, or ckpt_<step>/ sharded directories."""
    return sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt_*")) if not p.endswith(".tmp") and ".pt.tmp" not in p)


def uniform_soup(state_dicts):
    """Model soup (Wortsman et al. 2022, seed 1.8): θ_soup = (1/k) Σ_i θ_i, element-wise."""
    return {name: sum(sd[name].double() for sd in state_dicts).div(len(state_dicts)).to(state_dicts[0][name].dtype)
            for name in state_dicts[0]}


def greedy_soup(state_dicts, evaluate):
    """Greedy soup: sort checkpoints by validation loss, then add each to the soup only if the
    soup's validation loss does not get worse. `evaluate(state_dict) → loss`. Returns the soup
    and the indices of the checkpoints kept."""
    losses = [evaluate(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: losses[i])
    kept = [order[0]]
    best_loss = losses[order[0]]
    for i in order[1:]:
        candidate_loss = evaluate(uniform_soup([state_dicts[j] for j in kept + [i]]))
        if candidate_loss <= best_loss:
            kept.append(i)
            best_loss = candidate_loss
    return uniform_soup([state_dicts[j] for j in kept]), kept


# -----------------------------------------------------------------------------
# Stages: resume an interrupted one
#
# data/stages.py keeps each stage's stage.json (the fingerprint of its flags and inputs; finished
# or not): a finished stage of the same configuration is skipped. A stage killed half-way (Ctrl-C,
# a crash) left its latest resume point, resume.pt, below: running it again continues from there.
# -----------------------------------------------------------------------------

def save_resume_point(out_dir, fingerprint, step, state):
    """Everything an interrupted stage needs to continue after `step` (model and optimizer state
    dicts, RNG states, counters), written atomically to <out>/resume.pt."""
    atomic_save({"fingerprint": fingerprint, "step": step, **state}, os.path.join(out_dir, RESUME_FILE))


def load_resume_point(out_dir, fingerprint):
    """The resume point saved by save_resume_point for this fingerprint, or None."""
    path = os.path.join(out_dir, RESUME_FILE)
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — a corrupt resume point costs the interval, not the run
        print(f"warning: {path}: unreadable resume point ({type(e).__name__}); starting the stage over")
        return None
    return saved if saved.get("fingerprint") == fingerprint else None


def random_state(generator=None):
    """The random-number states a resumed stage continues from: torch's CPU generator (dropout,
    shuffles), the CUDA ones if CUDA is in use, and the stage's own sampling generator if it has one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_random_state(state, generator=None):
    """Undo random_state: put every generator back where the resume point left it."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])


# =============================================================================
# 7. Stability: loss spikes and NaN (seed 1.8)
# =============================================================================

class SpikeDetector:
    """A loss is a spike when it exceeds the rolling mean + k·σ of the last `window` losses.

    The first `window // 2` losses only fill the window: at the start of training the loss
    falls fast and its spread says nothing yet.
    """

    def __init__(self, window=50, num_sigmas=3.0):
        self.window = window
        self.num_sigmas = num_sigmas
        self.history = []

    def is_spike(self, loss):
        if len(self.history) < max(2, self.window // 2):
            return False
        recent = np.array(self.history[-self.window:])
        return loss > recent.mean() + self.num_sigmas * recent.std()

    def record(self, loss):
        self.history.append(loss)
        del self.history[:-self.window]


# =============================================================================
# 8. Data parallelism: DDP, FSDP, and DDP written out by hand (seed 1.7)
#
# Tensor and pipeline parallelism, ZeRO-1 by hand and 2D data × tensor parallelism are in parallel/, one
# strategy per file; the loop below reaches them through a "plan" (parallel/common.py). What each strategy
# costs — model state per GPU, bytes sent per step — is parallel/costs.py.
# =============================================================================
# ── first reading: skip to section 9 (DDP, FSDP, PowerSGD: read it with seed 1.7) ──

@dataclass
class Distributed:
    rank: int = 0          # this process's index among all processes
    world_size: int = 1    # number of processes (one per GPU)
    local_rank: int = 0    # index on this machine → which GPU
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        """Rank 0 alone prints, plots and writes the non-sharded files."""
        return self.rank == 0


def setup_distributed(args):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group:
    NCCL between GPUs, gloo between CPU processes. Without torchrun: one process, no group."""
    if "RANK" not in os.environ:
        if args.parallel != "none":
            raise ConfigError(f"--parallel {args.parallel} needs to be launched with torchrun")
        return Distributed(device=pick_device(args.device))
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.parallel == "none" and world_size > 1:
        raise ConfigError("--parallel none under torchrun with several processes: choose one of ddp, fsdp, "
                          "manual, " + ", ".join(MODEL_PARALLEL))
    device = pick_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def wrap_model(model, strategy, ctx, powersgd_rank=0, powersgd_start=10):
    """Wrap the model for data parallelism. Each wrapper's communication is spelled out."""
    if strategy == "ddp":
        # DDP: every rank keeps a full replica. During backward, gradients are grouped into
        # ~25 MB buckets and each bucket is all-reduced (averaged) as soon as it is ready,
        # overlapping communication with the rest of the backward pass. Weights stay in sync
        # because every rank applies the same averaged gradient.
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        if powersgd_rank:
            add_powersgd(ddp, powersgd_rank, powersgd_start)
        return ddp
    if strategy == "fsdp":
        # FSDP2 (ZeRO-3): each rank stores 1/N of every parameter, gradient and Adam state.
        # Before a block's forward (and again before its backward) its parameters are
        # all-gathered from all ranks, then freed; after its backward the gradients are
        # reduce-scattered so each rank keeps only its shard's average. The optimizer then
        # updates only the local shard. One fully_shard per block = one all-gather per block.
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy()  # fp32 on CPU
        if ctx.device.type == "cuda":
            # bf16 compute and communication of weights, fp32 gradient reduction.
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the root: embeddings, final LayerNorm, tied head
        return model
    # "manual" and "none": the plain module; manual averages gradients itself (below).
    return model


def add_powersgd(ddp, rank, start_step):
    """Gradient compression (seed 1.7, "PowerSGD"; Vogels et al. 2019) through DDP's communication hook.

    Each gradient matrix M (n × m) is approximated by P·Qᵀ of rank r: P = M·Q, orthogonalised, all-reduced;
    Q = Mᵀ·P, all-reduced — (n + m)·r values instead of n·m. What the approximation misses is kept on each rank
    and added to the next step's gradient (error feedback), so nothing is lost for good, only delayed.
    Vectors (biases, LayerNorms) and matrices too small to gain are all-reduced whole. The first `start_step`
    steps all-reduce everything (PowerSGD's warm-up). Lossy: the run no longer equals one process. Its state
    (error feedback, the warm-started Q) is not in the checkpoints: a resumed run starts it afresh."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                   start_powerSGD_iter=max(2, start_step))
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    ddp.powersgd_state = state  # for compression_summary


def compression_summary(ddp, world_size):
    """(text, record) on what PowerSGD sent: gradient values all-reduced per compressed step, before and after."""
    rate, before, after = ddp.powersgd_state.compression_stats()
    steps = max(1, ddp.powersgd_state.iter - ddp.powersgd_state.start_powerSGD_iter)
    ring = 2 * (world_size - 1) / world_size * 4  # bytes sent per fp32 value in a ring all-reduce
    record = {"compression_rate": rate, "values_per_step": before / steps, "compressed_values_per_step": after / steps}
    return (f"PowerSGD: {after / steps:,.0f} of {before / steps:,.0f} gradient values all-reduced per compressed "
            f"step ({rate:.1f}× fewer bytes: {ring * after / steps / 2**20:.3f} MiB sent per rank instead of "
            f"{ring * before / steps / 2**20:.3f})"), record


def all_reduce_gradients_by_hand(model, world_size):
    """What DDP does, written out: sum every gradient over ranks, then divide by their number.
    (DDP does the same maths in buckets, overlapped with backward; this waits until the end.)"""
    import torch.distributed as dist
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world_size


def all_reduce_mean(value, ctx):
    """Average a Python float over ranks (for the logged loss)."""
    if ctx.world_size == 1:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / ctx.world_size


def any_rank(flag, ctx):
    """True on every rank if `flag` is True on any rank, so all ranks take the same branch."""
    if ctx.world_size == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gradient_sync(model, strategy, last_micro_step):
    """During gradient accumulation only the last micro-step needs synchronised gradients:
    DDP's no_sync() skips the all-reduce, FSDP keeps unsharded gradients locally."""
    if strategy == "ddp" and not last_micro_step:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def barrier(ctx):
    if ctx.world_size > 1:
        import torch.distributed as dist
        dist.barrier()


# =============================================================================
# 9. The training loop
# =============================================================================

def adamw(module, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW over a module's trainable parameters, with weight decay only on matrices (≥ 2-D):
    decaying biases and LayerNorm gains has no regularising purpose and hurts. Serves the GPT
    and the models built around it (reward model, value model)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))


@torch.no_grad()
def evaluate_loss(model, data, max_windows, batch_size, device, autocast):
    """Mean NLL per token over the fixed validation windows (every rank sees all of them,
    which FSDP needs anyway: its forward is a collective)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(max_windows, batch_size):
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def gradient_accumulation_steps(global_batch_size, micro_batch_size, world_size):
    """Micro-steps per optimizer step: global batch = micro batch × ranks × accumulation."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                          f"{micro_batch_size} × {world_size} ranks = {per_step}")
    return global_batch_size // per_step


def accumulate_gradients(model, micro_batches, strategy, autocast, ctx, poison=False):
    """Forward and backward over one step's micro-batches [(x, y), …], the gradients accumulating (each loss
    divided by their number). Returns (the mean loss over micro-batches and ranks, None), or (nan, reason)
    for a non-finite loss; `poison` makes the losses NaN (fault injection)."""
    loss_sum = 0.0
    for micro_step, (x, y) in enumerate(micro_batches):
        with gradient_sync(model, strategy, last_micro_step=micro_step == len(micro_batches) - 1):
            with autocast:
                _, loss = model(x.to(ctx.device), y.to(ctx.device))
            if poison:
                loss = loss * float("nan")
            # NaN/Inf is caught before backward — one bad backward would poison every weight —
            # and agreed on by all ranks, so they all skip the step together.
            if any_rank(not torch.isfinite(loss).item(), ctx):
                return float("nan"), "non-finite loss"
            (loss / len(micro_batches)).backward()
        loss_sum += loss.item()
    return all_reduce_mean(loss_sum / len(micro_batches), ctx), None


def set_learning_rate(args, run, step):
    """get_lr's warmup + cosine at this step, times the rollbacks' --rollback-lr-factor, into every group."""
    lr = get_lr(step, args.warmup_steps, args.max_steps, args.lr, args.min_lr) * run.state["lr_scale"]
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def step_batch(args, run, step):
    """This step's batch, numbered (a rolled-back batch stays skipped): this rank's micro-batches
    [(x, y), …] and whether fault injection poisons its loss."""
    batch_number = batch_number_for_step(step, run.state["skipped_batches"])
    windows = run.data.batch_windows(args.seed, batch_number, args.global_batch_size)
    micro_batches = [run.data.train_batch(windows[micro_batch_rows(run.data_rank, run.data_world, micro_step,
                                                                   args.micro_batch_size, run.grad_accum)])
                     for micro_step in range(run.grad_accum)]
    if run.injected_here and batch_number in args.inject_garbage_at:  # fault injection: unpredictable targets
        micro_batches = [(x, torch.randint_like(y, run.config.vocab_size)) for x, y in micro_batches]
    poison = run.injected_here and batch_number in args.inject_nan_at  # fault injection: a non-finite loss
    return batch_number, micro_batches, poison


def forward_backward(ctx, run, micro_batches, poison):
    """Forward, NaN check, backward over the micro-batches (accumulate_gradients; under pp the GPipe
    schedule of parallel/pipeline.py). Returns (mean loss, None) or (nan, the problem)."""
    if run.plan:
        run.plan.start_step()
    if run.strategy == "pp":  # the micro-batches go through the pipeline together (GPipe)
        return run.plan.train_step(micro_batches, run.autocast, lambda flag: any_rank(flag, ctx), poison)
    return accumulate_gradients(run.model, micro_batches, run.strategy, run.autocast, ctx, poison)


def synchronise_and_clip(args, ctx, run):
    """Gradient synchronisation still owed (manual all-reduce; the plan's), then clipping to --grad-clip:
    only now, when every rank holds the same averaged gradient. Returns the norm before clipping."""
    if run.strategy == "manual":
        all_reduce_gradients_by_hand(run.model, ctx.world_size)
    if run.plan:  # no rank holds all the gradients: the plan sums the norm from pieces
        run.plan.sync_gradients()
        return run.plan.clip_grad_norm_(args.grad_clip)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()


def roll_back(args, ctx, run, step, batch_number, problem):
    """Seed 1.8's recovery: drop the gradients, reload the last checkpoint, skip the offending batch from
    now on, optionally lower the LR; give up after --max-rollbacks. Returns the step to continue from."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.state["rollbacks"] >= args.max_rollbacks:
        raise RuntimeError(f"step {step}: {problem}; giving up after {run.state['rollbacks']} rollbacks "
                           f"(--max-rollbacks)")
    path = checkpoint_paths(args.out)[-1]
    step = restore_run(args, ctx, run, path)["step"]
    run.state["skipped_batches"].append(batch_number)
    run.state["rollbacks"] += 1
    run.state["lr_scale"] *= args.rollback_lr_factor
    run.log({"step": step, "event": "rollback", "reason": problem, "skipped_batch": batch_number,
             "lr_scale": run.state["lr_scale"]})
    run.say(f"rollback: {problem} at batch {batch_number}; back to {path}, batch skipped")
    return step


def run_training(args, ctx):
    """Pretraining (seed 1.4–1.8), one optimizer step at a time:

        batch → forward → NaN check → backward → (spike? roll back) → clip → step → log → checkpoint

    Returns the final validation loss. Each step's pieces are the functions just above; the set-up,
    the resume decision and the bookkeeping follow below (a first reading may skip them); `run`
    holds what they all share."""
    stage_started = time.time()
    run = set_up_run(args, ctx)
    start_step = begin_or_resume(args, ctx, run)
    if start_step is None:  # a finished run of this configuration
        return read_stage(args.out)["summary"]["val_loss"]
    print_run_plan(args, ctx, run)
    if args.compile:
        run.model = torch.compile(run.model, backend=args.compile_backend)
    open_metrics(ctx, run)
    if not run.resuming:
        save_step(args, ctx, run, 0)  # a first good checkpoint, so a spike at step 1 has somewhere to roll back to

    step, started, last_val = start_step, time.time(), None
    while step < args.max_steps:
        t0 = time.time()
        lr = set_learning_rate(args, run, step)
        batch_number, micro_batches, poison = step_batch(args, run, step)                 # batch
        loss, problem = forward_backward(ctx, run, micro_batches, poison)                 # forward, NaN check, backward
        if problem is None and run.state["spikes"].is_spike(loss):
            problem = f"loss spike ({loss:.3f} > rolling mean + {args.spike_sigmas}σ)"
        if problem is not None:
            step = roll_back(args, ctx, run, step, batch_number, problem)                 # seed 1.8: roll back
            continue
        grad_norm = synchronise_and_clip(args, ctx, run)                                  # clip
        run.optimizer.step()                                                              # step
        run.optimizer.zero_grad(set_to_none=True)
        run.state["spikes"].record(loss)
        step += 1
        log_step(args, run, step, loss, lr, grad_norm, time.time() - t0, started, start_step)   # log
        if step % args.eval_every == 0 or step == args.max_steps:
            last_val = evaluate_step(args, run, step)
        if step % args.checkpoint_every == 0 or step == args.max_steps:
            save_step(args, ctx, run, step)                                               # checkpoint
    if last_val is None:
        last_val = evaluate_step(args, run, step)
    return finish_run(args, ctx, run, step, last_val, stage_started)


# ── first reading: skip to the end (the loop's set-up, resume, checkpoints, metrics, plot; the command line) ──

def set_up_run(args, ctx):
    """Everything the loop works on, in one namespace: the config, data, model and optimizer (wrapped
    for --parallel), the micro-batch plan, and the resumable state (skipped batches, LR scale, rollbacks,
    the spike detector's history)."""
    run = types.SimpleNamespace(say=print if ctx.master else (lambda *a, **k: None), device=ctx.device,
                                strategy=args.parallel)
    run.meta = read_meta(args.data)
    run.config = config = GPTConfig(
        vocab_size=run.meta["vocab_size"], block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, dropout=args.dropout, bias=not args.no_bias,
        attention=args.attention or ("flash" if run.device.type == "cuda" else "sdpa"))
    run.data = TokenData(args.data, config.block_size, config.vocab_size)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(config).to(run.device)
    if args.init_from:
        source, _ = model_from_checkpoint(args.init_from)
        check_same_config(config, asdict(source.config), args.init_from)
        model.load_state_dict(source.state_dict())
    run.n_params, run.n_all = count_params(model), count_params(model, non_embedding=False)
    run.plan = None
    if run.strategy in MODEL_PARALLEL:
        # tp, dp-tp, pp, zero1 (parallel/): the plan cuts this rank's piece out of the whole model and knows
        # how its gradients are synchronised and clipped, and how its checkpoints are gathered.
        import parallel
        run.plan = parallel.setup(run.strategy, model, ctx, lambda module: adamw(
            module, args.lr, args.weight_decay, (args.beta1, args.beta2), run.device.type), tp=args.tp)
        run.model, run.optimizer = run.plan.model, run.plan.optimizer
    else:
        run.model = wrap_model(model, run.strategy, ctx, args.powersgd_rank, args.powersgd_start_step)
        # After fully_shard the model is still a GPT whose parameters are shards (DTensors), so the
        # same optimizer set-up serves every strategy: under FSDP, Adam's state is sharded too.
        run.optimizer = unwrap(run.model).configure_optimizer(args.lr, args.weight_decay, (args.beta1, args.beta2),
                                                              run.device.type)
    # The ranks that read different rows of the batch (under TP, one TP group reads the same rows).
    run.data_rank, run.data_world = ((run.plan.data_rank, run.plan.data_world) if run.plan
                                     else (ctx.rank, ctx.world_size))
    run.grad_accum = gradient_accumulation_steps(args.global_batch_size, args.micro_batch_size, run.data_world)
    run.dropout_rank = run.plan.dropout_rank if run.plan else ctx.rank
    torch.manual_seed(args.seed + run.dropout_rank)  # different dropout masks on different ranks
    run.autocast = autocast_for(run.device)
    run.state = {"skipped_batches": [], "lr_scale": 1.0, "rollbacks": 0,
                 "spikes": SpikeDetector(args.spike_window, args.spike_sigmas)}
    run.metrics_path = os.path.join(args.out, "metrics.jsonl")
    run.injected_here = args.inject_rank in (-1, ctx.rank)
    if ctx.master:
        os.makedirs(args.out, exist_ok=True)
    barrier(ctx)
    return run


def restore_run(args, ctx, run, path):
    """Load checkpoint `path` into the run (weights, optimizer, RNG, the spike detector's history); its dict."""
    saved = restore_checkpoint(path, run.model, run.optimizer, run.strategy, run.config, run.device, run.plan)
    if ctx.world_size == 1:
        torch.set_rng_state(saved["rng"]["torch"])
    else:  # one saved RNG state cannot serve several ranks: reseed from (seed, rank, step)
        torch.manual_seed(args.seed + 1000 * saved["step"] + run.dropout_rank)
    run.state["spikes"].history = list(saved["loss_history"])
    return saved


def begin_or_resume(args, ctx, run):
    """The stage's first step: skip a finished run of this configuration (returns None), resume an
    unfinished one from its last checkpoint, or start afresh; returns the step to start from."""
    # Decide once, before any rank writes: a rank that looked after rank 0 had saved would
    # see a different directory and take another branch — and the collectives would deadlock.
    # Without --resume, an unfinished run of the same configuration (stage.json) is resumed too.
    run.fingerprint = stage_fingerprint(args, TRAIN_RUNTIME_FLAGS, [args.data, args.init_from])
    decision = stage_decision(read_stage(args.out), run.fingerprint, args.force)
    run.resuming = (args.resume or decision == "resume") and bool(checkpoint_paths(args.out))
    barrier(ctx)
    if decision == "skip":
        run.say(f"[pretrain] {args.out} holds a finished run of this configuration: skipped (--force redoes it)")
        return None
    if ctx.master and decision == "fresh":
        write_stage(args.out, {"stage": "pretrain", "fingerprint": run.fingerprint, "complete": False,
                               "started": time.time()})
    start_step = 0
    if run.resuming:
        saved = restore_run(args, ctx, run, checkpoint_paths(args.out)[-1])
        start_step = saved["step"]
        run.state.update(skipped_batches=saved["skipped_batches"], lr_scale=saved["lr_scale"],
                         rollbacks=saved["rollbacks"])
        if ctx.master:
            truncate_metrics(run.metrics_path, start_step)
        run.say(f"resumed from {checkpoint_paths(args.out)[-1]} at step {start_step}")
    elif ctx.master:  # a fresh run: earlier checkpoints here must not become rollback targets
        for old in checkpoint_paths(args.out) + [run.metrics_path]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old) if os.path.exists(old) else None
    barrier(ctx)
    return start_step


def print_run_plan(args, ctx, run):
    """The numbers of sections 1.5–1.7, printed before the first step: N, D, C = 6ND, Chinchilla's
    (N*, D*), the parallel costs, the unigram baseline. Also sets what the progress lines need."""
    config, say = run.config, run.say
    run.tokens_per_step = args.global_batch_size * config.block_size
    total_tokens = run.tokens_per_step * args.max_steps
    compute = training_flops(run.n_params, total_tokens)
    n_opt, d_opt = chinchilla_optimal(compute)
    run.unigram = unigram_loss(run.data.train[0][:2_000_000], run.data.val[0], config.vocab_size)
    say(f"model: N={run.n_params:,} non-embedding parameters (12·L·d² = "
        f"{approx_params(config.n_layer, config.n_embd):,}); data: {run.meta['train_tokens']:,} train tokens")
    say(f"run: D={total_tokens:,} tokens, C=6ND={compute:.3g} FLOPs, {total_tokens / run.n_params:.1f} "
        f"tokens/parameter (Chinchilla-optimal at this C: N*={n_opt:,.0f}, D*={d_opt:,.0f})")
    say(f"parallel: {run.strategy} on {ctx.world_size} rank(s), grad accumulation {run.grad_accum}; "
        + parallel_costs(run.strategy, config, run.model, run.n_all, ctx.world_size, args.tp,
                         run.tokens_per_step // run.data_world))
    say(f"unigram baseline val loss {run.unigram:.3f}; device {run.device}, attention {config.attention}")
    run.peak = args.peak_flops or device_peak_flops(run.device)
    run.flops_per_tok = flops_per_token(run.n_params, config.n_layer, config.block_size, config.n_embd)
    run.val_bytes_per_token = run.meta["val_bytes"] / run.meta["val_tokens"]


def open_metrics(ctx, run):
    """metrics.jsonl (rank 0 appends to it; the other ranks log nothing)."""
    run.metrics = open(run.metrics_path, "a") if ctx.master else None
    run.log = (lambda record: log_line(run.metrics, record)) if ctx.master else (lambda record: None)


def save_step(args, ctx, run, step):
    """Checkpoint ckpt_<step>: weights, optimizer and trainer state (the rollback and resume target)."""
    extra = trainer_state(run.config, step, run.state, args, run.data.tokenizer)
    save_checkpoint(run.model, run.optimizer, extra, run.strategy, args.out, args.keep_checkpoints, ctx, run.plan)


def evaluate_step(args, run, step):
    """Validation loss, perplexity and bits per byte on the fixed validation windows; logged and printed."""
    val_loss = evaluate_loss(run.model, run.data, args.eval_windows, args.micro_batch_size, run.device, run.autocast)
    record = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
              "val_bpb": bits_per_byte(val_loss, 1, run.val_bytes_per_token), "unigram_loss": run.unigram}
    run.log(record)
    run.say(f"step {step}: val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}, "
            f"bits/byte {record['val_bpb']:.3f}")
    return val_loss


def log_step(args, run, step, loss, lr, grad_norm, seconds, started, start_step):
    """A metrics.jsonl record per step (tokens/s, MFU on a known GPU); a progress line every --log-every."""
    tokens_per_sec = run.tokens_per_step / seconds
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
              "mfu": mfu(tokens_per_sec, run.flops_per_tok, run.peak) if run.peak else None}
    if run.plan:  # what the step sent, and under pp each rank's idle time
        record.update(run.plan.step_record())
    run.log(record)
    if step % args.log_every == 0 or step == args.max_steps:
        eta = (time.time() - started) / (step - start_step) * (args.max_steps - step)
        mfu_text = f", MFU {100 * record['mfu']:.1f}%" if run.peak else ""
        run.say(f"step {step}/{args.max_steps}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                f"{tokens_per_sec:,.0f} tok/s{mfu_text}, ETA {eta:.0f}s")


def finish_run(args, ctx, run, step, last_val, stage_started):
    """After the last step: the strategy's own measurements, model.pt (gathered from the pieces under
    FSDP and parallel/), the plot, and stage.json marked complete."""
    summaries = [run.plan.summary()] if run.plan else []  # what the strategy measured: communication, bubble, memory
    if args.powersgd_rank:
        summaries.append(compression_summary(run.model, ctx.world_size))
    for text, record in summaries:
        run.log({"step": step, "event": "parallel", "strategy": run.strategy, **record})
        run.say(text)
    # The single-file checkpoint every later stage loads (under FSDP and parallel/: gathered from the pieces).
    weights = full_state_dict(run.model, run.strategy, run.plan)
    if ctx.master:
        extra = trainer_state(run.config, step, run.state, args, run.data.tokenizer)
        atomic_save({"model": weights, **extra, "val_loss": last_val}, os.path.join(args.out, "model.pt"))
        run.metrics.close()
        plot_metrics(run.metrics_path, os.path.join(args.out, "pretrain.png"))
        finish_stage(args.out, "pretrain", run.fingerprint, stage_started,
                     {"val_loss": last_val, "unigram_loss": run.unigram, "steps": step, "params": run.n_params,
                      "val_bpb": bits_per_byte(last_val, 1, run.val_bytes_per_token)})
        run.say(f"saved {os.path.join(args.out, 'model.pt')} (val loss {last_val:.4f})")
    return last_val


def trainer_state(config, step, state, args, tokenizer):
    """Everything but weights and optimizer that a resume or a rollback needs (plain values)."""
    return {"config": asdict(config), "step": step, "rng": {"torch": torch.get_rng_state()},
            "skipped_batches": list(state["skipped_batches"]), "lr_scale": state["lr_scale"],
            "rollbacks": state["rollbacks"], "loss_history": list(state["spikes"].history),
            "tokenizer": tokenizer, "args": {k: v for k, v in vars(args).items() if k != "func"}}


def save_checkpoint(model, optimizer, extra, strategy, out_dir, keep_last, ctx, plan=None):
    """Write ckpt_<step>: one file from rank 0, or under FSDP a sharded directory written by all
    ranks through torch.distributed.checkpoint (each rank writes its shards; the metadata
    says which slice of which tensor is where, so any world size can read it back). Under the
    strategies of parallel/ the pieces are gathered to rank 0 into the single-process file."""
    path = os.path.join(out_dir, f"ckpt_{extra['step']:07d}")
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        content = {"model": get_model_state_dict(model)}
        # Adam has no state before its first step; asking for it then would make DCP create it
        # with a fake zero-gradient step, which shifts Adam's step count (and bias correction).
        extra = {**extra, "optimizer_saved": bool(optimizer.state)}
        if extra["optimizer_saved"]:
            content["optimizer"] = get_optimizer_state_dict(model, optimizer)
        tmp = path + ".tmp"
        dcp.save(content, checkpoint_id=tmp)
        if ctx.master:
            torch.save(extra, os.path.join(tmp, "trainer_state.pt"))
            os.replace(tmp, path)  # rename: the directory appears complete or not at all
    elif plan is not None:
        weights, optimizer_state = plan.gather()  # a collective; None on every rank but 0
        if ctx.master:
            atomic_save({"model": weights, "optimizer": optimizer_state, **extra}, path + ".pt")
    elif ctx.master:
        atomic_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **extra}, path + ".pt")
    barrier(ctx)
    if ctx.master:
        for old in checkpoint_paths(out_dir)[:-keep_last]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    barrier(ctx)


def restore_checkpoint(path, model, optimizer, strategy, config, device, plan=None):
    """Load weights and optimizer state from either kind of checkpoint; return its trainer state.
    A sharded checkpoint is resharded to the current world size by torch.distributed.checkpoint;
    a plan (parallel/) takes its rank's piece of a single file."""
    if os.path.isdir(path) and plan is not None:
        raise ConfigError(f"{path}: a sharded FSDP checkpoint; --parallel {strategy} resumes from single files "
                          f"(gather it with `train_gpt.py convert`)")
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd
        saved = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
        check_same_config(config, saved["config"], path)
        content = {"model": sd.get_model_state_dict(model)}
        if saved["optimizer_saved"]:
            content["optimizer"] = sd.get_optimizer_state_dict(model, optimizer)
        dcp.load(content, checkpoint_id=path)  # fills the templates above, resharding as needed
        sd.set_model_state_dict(model, content["model"])
        if saved["optimizer_saved"]:
            sd.set_optimizer_state_dict(model, optimizer, content["optimizer"])
        else:
            optimizer.state.clear()
        return saved
    if strategy == "fsdp":
        raise ConfigError(f"{path}: a single-file checkpoint; resume FSDP from its sharded checkpoints "
                          f"(or start from these weights with --init-from)")
    saved = load_checkpoint(path, map_location="cpu" if plan else device)
    check_same_config(config, saved["config"], path)
    if plan is not None:
        plan.load(saved["model"], saved["optimizer"])
        return saved
    unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved


def full_state_dict(model, strategy, plan=None):
    """The whole, unsharded model state dict (on CPU, on rank 0 at least), as every other script loads it."""
    if plan is not None:
        return plan.gather()[0]
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def unwrap(model):
    """The plain GPT inside DDP and torch.compile wrappers (its state dict has no prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def log_line(metrics_file, record):
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def read_metrics(path):
    """The records of a metrics.jsonl written with log_line (every stage's plots read them back)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path, after_step, key="step", final_events=()):
    """On resume, forget metrics logged after the checkpoint we resume from (records whose `key`,
    the step or iteration, is larger), and the records of `final_events` that a stage logs once
    after its loop (the resumed run logs them again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [(line, json.loads(line)) for line in f if line.strip()]
    kept = [line for line, r in records if r.get(key, 0) <= after_step and r.get("event") not in final_events]
    with open(f"{path}.tmp{os.getpid()}", "w") as f:  # a kill mid-write must not lose the history
        f.writelines(kept)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def plot_metrics(metrics_path, png_path):
    """Train/val loss, learning rate and gradient norm against steps, rollbacks marked in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    rollbacks = [r["step"] for r in records if r.get("event") == "rollback"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=0.8)
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    if val:
        axes[0].axhline(val[-1]["unigram_loss"], color="gray", ls="--", label="unigram baseline")
        # bits/byte is the same curve in tokenizer-independent units: a fixed factor of the val loss
        ratio = val[-1]["val_bpb"] / val[-1]["val_loss"]
        right = axes[0].secondary_yaxis("right", functions=(lambda x: x * ratio, lambda y: y / ratio))
        right.set_ylabel("validation bits per byte")
    axes[0].set(title="loss (nats/token)", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["grad_norm"] for r in train], lw=0.8)
    axes[2].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
    for ax in axes:
        for step in rollbacks:
            ax.axvline(step, color="red", alpha=0.5)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def validate_train_args(args):
    """One clear error per out-of-range flag, before any work starts."""
    check_ranges(args, GPTConfig, Hyperparameters)
    if not 0 <= args.warmup_steps <= args.max_steps:
        raise ConfigError(f"--warmup-steps must be in [0, --max-steps] (got {args.warmup_steps})")
    if args.n_embd % args.n_head:
        raise ConfigError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if args.attention == "flash" and not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        raise ConfigError("--attention flash needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernel on CPU, slowly)")
    validate_parallel_args(args, int(os.environ.get("WORLD_SIZE", 1)))


def validate_parallel_args(args, world_size):
    """The flags of tp, dp-tp, pp and PowerSGD against the number of ranks and the model's shape. Fills in
    --tp (tp: every rank) and, under pp, the micro-batch size from --micro-batches."""
    strategy = args.parallel
    for flag, value, allowed in [("tp", args.tp, ("tp", "dp-tp")), ("pp", args.pp, ("pp",)),
                                 ("micro-batches", args.micro_batches, ("pp",)),
                                 ("powersgd-rank", args.powersgd_rank, ("ddp",))]:
        if value and strategy not in allowed:
            raise ConfigError(f"--{flag} is for --parallel {' or '.join(allowed)} (got --parallel {strategy})")
        if value is not None and value < 0:
            raise ConfigError(f"--{flag} must be ≥ 0 (got {value})")
    if strategy in ("tp", "dp-tp"):
        if strategy == "dp-tp" and not args.tp:
            raise ConfigError("--parallel dp-tp needs --tp: the ranks of one tensor-parallel group "
                              "(a divisor of the world size)")
        args.tp = args.tp or world_size
        if strategy == "tp" and args.tp != world_size:
            raise ConfigError(f"--parallel tp puts all {world_size} ranks in one TP group (--tp {args.tp}); "
                              f"for TP groups × data parallelism use --parallel dp-tp")
        if world_size % args.tp or args.n_head % args.tp:
            raise ConfigError(f"--tp {args.tp} must divide the {world_size} ranks and --n-head {args.n_head}")
    if strategy == "pp":
        args.pp = args.pp or world_size
        if args.pp != world_size or not 2 <= args.pp <= args.n_layer:
            raise ConfigError(f"--pp {args.pp}: one stage per rank, so launch {args.pp} processes; at least 2 stages, "
                              f"at most --n-layer {args.n_layer} (got {world_size} ranks)")
        if args.compile:
            raise ConfigError("--compile is not supported with --parallel pp")
        if args.micro_batches:
            if args.global_batch_size % args.micro_batches:
                raise ConfigError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                                  f"--micro-batches {args.micro_batches}")
            args.micro_batch_size = args.global_batch_size // args.micro_batches


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device):
    """bfloat16 autocast on a GPU (bf16 keeps float32's exponent range: no loss scaling); on the CPU,
    plain float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# Flags that change only speed, memory, logging or bookkeeping, not the trained model: left out of
# the stage fingerprint, so changing them neither re-trains nor blocks a resume.
TRAIN_RUNTIME_FLAGS = runtime_flags(GPTConfig, Hyperparameters) | {"command"}


def train(args):
    validate_train_args(args)
    ctx = setup_distributed(args)
    try:
        return run_training(args, ctx)
    finally:
        if ctx.world_size > 1 or "RANK" in os.environ:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


# =============================================================================
# 10. Command line
# =============================================================================

def sample_command(args):
    from data.tokenizer import load_tokenizer

    device = pick_device(args.device)
    model, checkpoint = model_from_checkpoint(args.checkpoint, device)
    model.eval()
    enc = load_tokenizer(args.tokenizer or checkpoint["tokenizer"])
    prompt = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             eos_token=enc.eot_token, generator=generator)
    except ValueError as e:
        raise ConfigError(f"--prompt/--max-new-tokens: {e}") from None
    for row in out.tolist():
        text = enc.decode([t for t in row if t != enc.eot_token])
        print(text)
        print("-" * 40)


def soup_command(args):
    checkpoints = [load_checkpoint(p) for p in args.checkpoints]
    for path, checkpoint in zip(args.checkpoints[1:], checkpoints[1:]):
        check_same_config(GPTConfig.from_dict(checkpoints[0]["config"]), checkpoint["config"], path)
    state_dicts = [c["model"] for c in checkpoints]
    if args.method == "uniform":
        soup, kept = uniform_soup(state_dicts), list(range(len(state_dicts)))
    else:
        if not args.data:
            raise ConfigError("--data is needed for a greedy soup (it evaluates validation loss)")
        config = GPTConfig.from_dict(checkpoints[0]["config"])
        model = GPT(config)
        data = TokenData(args.data, config.block_size, config.vocab_size)

        def evaluate(state_dict):
            model.load_state_dict(state_dict)
            return evaluate_loss(model, data, args.eval_windows, 8, torch.device("cpu"), contextlib.nullcontext())

        soup, kept = greedy_soup(state_dicts, evaluate)
    atomic_save({**checkpoints[0], "model": soup, "soup_of": [args.checkpoints[i] for i in kept]}, args.out)
    print(f"{args.method} soup of {len(kept)} checkpoint(s) → {args.out}")


def sharded_to_single_file(sharded_dir):
    """Gather an FSDP sharded checkpoint (any world size) into the single-file layout, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    extra = torch.load(os.path.join(sharded_dir, "trainer_state.pt"), weights_only=True)
    model = GPT(GPTConfig.from_dict(extra["config"]))
    model_state = get_model_state_dict(model)
    dcp.load({"model": model_state}, checkpoint_id=sharded_dir)
    return {"model": model_state, **extra}


def convert_command(args):
    if not os.path.isfile(os.path.join(args.sharded, "trainer_state.pt")):
        raise ConfigError(f"{args.sharded}: not a sharded checkpoint directory (no trainer_state.pt)")
    atomic_save(sharded_to_single_file(args.sharded), args.out)
    print(f"{args.sharded} → {args.out}")


def export_hf_command(args):
    from hf_gpt2 import export_hf  # hf_gpt2 builds on this file: imported when the command runs

    return export_hf(args)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain a GPT on token shards", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings(t, GPTConfig)
    add_settings(t, Hyperparameters)
    t.set_defaults(func=train)

    s = sub.add_parser("sample", help="generate text from a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("checkpoint", help="a checkpoint .pt file")
    s.add_argument("--prompt", default="", help="text to continue")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the checkpoint names)")
    s.add_argument("--num-samples", type=int, default=3, help="samples to draw")
    s.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    s.add_argument("--device", default="auto", help="cpu, cuda, …")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.set_defaults(func=sample_command)

    p = sub.add_parser("soup", help="average checkpoints (model soups)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("method", choices=["uniform", "greedy"], help="uniform average, or greedy by validation loss")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files of the same config")
    p.add_argument("--data", default=None, help="data directory for the greedy soup's validation loss")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows for the greedy soup")
    p.add_argument("--out", required=True, help="where to write the soup checkpoint")
    p.set_defaults(func=soup_command)

    c = sub.add_parser("convert", help="gather an FSDP sharded checkpoint into one file")
    c.add_argument("sharded", help="a ckpt_<step>/ directory written under --parallel fsdp")
    c.add_argument("--out", required=True, help="the single-file checkpoint to write")
    c.set_defaults(func=convert_command)

    e = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 directory (weights + tokenizer)")
    e.add_argument("checkpoint", help="a pretrained, SFT, PPO or DPO checkpoint .pt file")
    e.add_argument("--out", required=True, help="directory for config.json, pytorch_model.bin, tokenizer.json, …")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the checkpoint names)")
    e.add_argument("--verify", action="store_true", help="load the export with transformers/tokenizers (if "
                   "installed) and compare logits and token ids with ours")
    e.set_defaults(func=export_hf_command)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ShardError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        exit_torchrun_worker()  # a finished torchrun worker: skip the teardown that can abort (data/stages.py)
