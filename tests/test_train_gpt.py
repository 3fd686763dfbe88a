"""Tests for train_gpt.py: the equations, the model, generation, the loop and its failure modes."""

import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_gpt2
import train_gpt as tg
from conftest import write_synthetic_data


def tiny_config(**overrides):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return tg.GPTConfig(**{**base, **overrides})


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--block-size", "32", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "32", "--micro-batch-size", "8", "--global-batch-size", "8", "--warmup-steps", "2",
            "--eval-every", "5", "--eval-windows", "8", "--log-every", "100", "--device", "cpu", *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- equations

def test_param_count_matches_12_L_d_squared():
    for n_layer, n_embd in [(12, 768), (24, 1024), (4, 256)]:
        model = tg.GPT(tg.GPTConfig(vocab_size=100, block_size=16, n_layer=n_layer, n_head=4, n_embd=n_embd))
        exact, approx = tg.count_params(model), tg.approx_params(n_layer, n_embd)
        assert abs(exact - approx) / approx < 0.02
    # GPT-2 small: 124M parameters in all (85M non-embedding), counting the tied head once.
    gpt2 = tg.GPT(tg.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert abs(tg.count_params(gpt2, non_embedding=False) - 124.44e6) < 0.01e6


def test_flop_formulas():
    assert tg.training_flops(175e9, 300e9) == pytest.approx(3.15e23)  # GPT-3, seed table 1.5
    assert tg.flops_per_token(1000, 2, 10, 8) == 6 * 1000 + 12 * 2 * 10 * 8
    assert tg.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    n_opt, d_opt = tg.chinchilla_optimal(5.88e23)  # Chinchilla's budget → ~70B params, ~1.4T tokens
    assert d_opt == pytest.approx(20 * n_opt)
    assert tg.training_flops(n_opt, d_opt) == pytest.approx(5.88e23)
    assert 65e9 < n_opt < 75e9


def test_lr_schedule_endpoints_and_shape():
    kw = dict(warmup_steps=10, total_steps=110, max_lr=1.0, min_lr=0.1)
    assert tg.get_lr(0, **kw) == 0.0
    assert tg.get_lr(5, **kw) == pytest.approx(0.5)           # linear warmup
    assert tg.get_lr(10, **kw) == pytest.approx(1.0)          # peak
    assert tg.get_lr(60, **kw) == pytest.approx(0.55)         # cosine midpoint: (max+min)/2
    assert tg.get_lr(110, **kw) == pytest.approx(0.1)
    assert tg.get_lr(500, **kw) == pytest.approx(0.1)
    decay = [tg.get_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))      # monotone decay
    assert tg.get_lr(110, 10, 110, 3.0) == pytest.approx(0.3)  # min_lr defaults to max/10


def test_perplexity_and_bits_per_byte():
    assert tg.perplexity(math.log(50)) == pytest.approx(50)
    # 2 nats/token, 4 bytes/token → 2/ln2/4 bits per byte
    assert tg.bits_per_byte(2.0, 10, 40) == pytest.approx(2 / math.log(2) / 4)


def test_unigram_loss_is_entropy_of_counts():
    train = np.array([0, 0, 0, 1])
    val = np.array([0, 1])
    p0, p1 = 4 / 6, 2 / 6  # add-one smoothing over a vocabulary of 2
    assert tg.unigram_loss(train, val, 2) == pytest.approx(-(math.log(p0) + math.log(p1)) / 2)


# ----------------------------------------------------------------------------- the model

def test_loss_equals_hand_computed_nll():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config())
    x = torch.randint(0, 64, (2, 10))
    y = torch.randint(0, 64, (2, 10))
    logits, loss = model(x, y)
    probs = torch.softmax(logits.double(), dim=-1)
    nll = [-math.log(probs[b, t, y[b, t]].item()) for b in range(2) for t in range(10)]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    y[0, :5] = -100  # ignored targets drop out of the mean
    _, loss = model(x, y)
    kept = [nll[i] for i in range(20) if i >= 5]
    assert loss.item() == pytest.approx(sum(kept) / len(kept), rel=1e-5)


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_causality(attention):
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(attention=attention)).eval()
    x = torch.randint(0, 64, (1, 20))
    changed = x.clone()
    changed[0, 12:] = torch.randint(0, 64, (8,))
    a, _ = model(x)
    b, _ = model(changed)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_attention_implementations_agree():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(attention="naive")).eval()
    x = torch.randint(0, 64, (3, 25))
    doc_ids = torch.tensor([[0] * 10 + [1] * 15, [0] * 25, [0] * 3 + [1] + [2] * 21])
    reference, _ = model(x)
    reference_docs, _ = model(x, doc_ids=doc_ids)
    for attention in ["sdpa"] + (["flash"] if flash_available() else []):
        for block in model.blocks:
            block.attn.attention = attention
        out, _ = model(x)
        out_docs, _ = model(x, doc_ids=doc_ids)
        assert torch.allclose(out, reference, atol=1e-4), attention
        assert torch.allclose(out_docs, reference_docs, atol=1e-4), attention


def flash_available():
    try:
        from kernels.flash_attention import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def test_packed_documents_equal_separate_sequences():
    """With doc ids and restarted positions, a packed row computes each document on its own."""
    torch.manual_seed(0)
    model = tg.GPT(tiny_config()).eval()
    first, second = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 5))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    logits, _ = model(packed, position_ids=positions, doc_ids=doc_ids)
    alone_first, _ = model(first)
    alone_second, _ = model(second)
    assert torch.allclose(logits[:, :7], alone_first, atol=1e-5)
    assert torch.allclose(logits[:, 7:], alone_second, atol=1e-5)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config())
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))
    optimizer = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # from ln(64) ≈ 4.16


def test_weight_decay_only_on_matrices():
    model = tg.GPT(tiny_config())
    decay, no_decay = model.configure_optimizer(1e-3, 0.1).param_groups
    # Every parameter (the tied embedding / head once) is in exactly one group: none dropped, none twice.
    grouped = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- generation

def test_kv_cache_matches_uncached_greedy():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config()).eval()
    prompt = torch.randint(0, 64, (3, 5))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, uncached)


def test_left_padded_prompts_generate_as_if_alone():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config()).eval()
    short, long = torch.randint(0, 64, (1, 3)), torch.randint(0, 64, (1, 6))
    batch = torch.cat([torch.cat([torch.full((1, 3), 7), short], dim=1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6], dtype=torch.bool)
    for use_cache in (True, False):
        out = model.generate(batch, 10, temperature=0, prompt_mask=mask, use_cache=use_cache)
        assert torch.equal(out[0, 6:], model.generate(short, 10, temperature=0)[0, 3:])
        assert torch.equal(out[1], model.generate(long, 10, temperature=0)[0])


def test_generation_stops_at_eos_and_pads():
    torch.manual_seed(0)
    model = tg.GPT(tiny_config()).eval()
    prompt = torch.randint(0, 64, (4, 3))
    greedy = model.generate(prompt, 12, temperature=0)
    eos = greedy[0, 5].item()  # the token row 0 emits third
    out = model.generate(prompt, 12, temperature=0, eos_token=eos, pad_token=63)
    for row in out:
        hits = (row[3:] == eos).nonzero()
        if len(hits):
            after = row[3 + hits[0, 0] + 1:]
            assert (after == 63).all()
    assert (out[0, 6:] == 63).all()


def test_prompt_longer_than_context_is_a_clear_error():
    model = tg.GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size=32"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5)


SPARSE_P = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0])  # zeros first, inside and last


def test_inverse_transform_sampling_draws_each_token_with_its_probability():
    """sample_categorical: 200,000 draws from p match p within 5 standard errors per token; a token
    of probability 0 is never drawn; rows are drawn independently (two rows of one distribution
    differ about 1 − Σp² of the time)."""
    p = SPARSE_P
    g = torch.Generator().manual_seed(0)
    draws = tg.sample_categorical(p.repeat(200_000, 1), g)
    assert draws.shape == (200_000,)
    frequency = torch.bincount(draws, minlength=len(p)).double() / len(draws)
    standard_error = (p.double() * (1 - p.double()) / len(draws)).sqrt()
    assert ((frequency - p.double()).abs() <= 5 * standard_error + 1e-12).all(), frequency
    assert (frequency[p == 0] == 0).all()
    differ = (draws[0::2] != draws[1::2]).double().mean().item()
    assert differ == pytest.approx(1 - (p.double() ** 2).sum().item(), abs=0.01)


def test_inverse_transform_sampling_at_the_extremes_of_u(monkeypatch):
    """u = 0 gives the first token of positive probability, torch.rand's largest float32 below 1
    the last one — never the zero-probability token after it."""
    p = SPARSE_P
    for u, token in ((0.0, 1), (1 - 2 ** -24, 5)):  # torch.rand's extremes: the first and last positive token
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u))
        assert tg.sample_categorical(p[None]).item() == token


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = tg.sample_next_token(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    nucleus = tg.sample_next_token(logits, 1.0, top_p=0.7, generator=g)  # 0.5 + 0.3 reaches 0.7
    assert set(nucleus.tolist()) == {0, 1}
    assert (tg.sample_next_token(logits[:1], 1.0, top_p=0.1, generator=g) == 0).all()
    assert tg.sample_next_token(logits[:1], 0).item() == 0


# ----------------------------------------------------------------------------- GPT-2 import

def test_loads_hugging_face_gpt2_state_dict():
    """A state dict laid out like HF's GPT2LMHeadModel (Conv1D weights (in, out), mask buffers)."""
    torch.manual_seed(0)
    ours = tg.GPT(tg.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    hf = {}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for our_name, hf_name in hf_gpt2.gpt2_key_map(2).items():
        tensor = ours.state_dict()[our_name]
        hf["transformer." + hf_name] = tensor.t().clone() if hf_name.endswith(conv1d) else tensor.clone()
    for i in range(2):
        hf[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        hf[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    loaded = hf_gpt2.gpt2_from_hf_state_dict(hf, n_head=2).eval()
    x = torch.randint(0, 50, (2, 16))
    assert torch.allclose(loaded(x)[0], ours(x)[0], atol=1e-6)


# ----------------------------------------------------------------------------- the loop

def test_training_beats_unigram_and_writes_outputs(tmp_path, synthetic_data):
    out = str(tmp_path / "run")
    val_loss = tg.main(train_args(synthetic_data, out, "--max-steps", "80", "--eval-every", "40"))
    records = read_metrics(out)
    first_val = next(r for r in records if "val_loss" in r)
    assert val_loss < 0.6 * first_val["unigram_loss"]
    assert os.path.exists(os.path.join(out, "pretrain.png"))
    checkpoint = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert checkpoint["step"] == 80 and checkpoint["val_loss"] == pytest.approx(val_loss)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])
    assert len(tg.checkpoint_paths(out)) == 2  # step 0 and the final step (--checkpoint-every 100)
    # the synthetic stream mostly follows t → 3t+1 mod 64: greedy decoding should have learned it
    model, _ = tg.model_from_checkpoint(os.path.join(out, "model.pt"))
    tokens = model.eval().generate(torch.tensor([[5]]), 8, temperature=0)[0].tolist()
    assert sum(b == (3 * a + 1) % 64 for a, b in zip(tokens, tokens[1:])) >= 7


def test_train_compile_flash_attention_has_no_graph_break(tmp_path, synthetic_data, monkeypatch):
    """`train --compile --attention flash` traces the whole model, flash-attention included (a torch.library
    custom operator), as one graph: here torch.compile gets fullgraph=True, which raises at the first graph
    break. On the CPU --compile-backend aot_eager stands in for inductor (the same Dynamo and AOTAutograd
    tracing of forward and backward, no C++ compiler), and the kernels run in the Triton interpreter. The
    compiled run trains like the plain sdpa one."""
    if not flash_available():
        pytest.skip("no Triton")
    compiled = []
    real_compile = torch.compile

    def strict_compile(model, **kwargs):
        compiled.append(kwargs)
        return real_compile(model, **kwargs, fullgraph=True)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", strict_compile)
    flags = ("--max-steps", "2", "--eval-windows", "1", "--checkpoint-every", "2", "--micro-batch-size", "2",
             "--global-batch-size", "2")
    flash = str(tmp_path / "flash")
    tg.main(train_args(synthetic_data, flash, "--compile", "--compile-backend", "aot_eager", "--attention", "flash",
                       *flags))
    monkeypatch.undo()
    plain = str(tmp_path / "sdpa")
    tg.main(train_args(synthetic_data, plain, "--attention", "sdpa", *flags))
    assert compiled == [{"backend": "aot_eager"}]
    losses = [[r["loss"] for r in read_metrics(out) if "loss" in r] for out in (flash, plain)]
    assert len(losses[0]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-4)
    checkpoint = torch.load(os.path.join(flash, "model.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])


def test_packed_flash_forward_compiles_as_one_graph():
    """Document ids (packed SFT rows) and given positions: still no graph break."""
    if not flash_available():
        pytest.skip("no Triton")
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(attention="flash")).eval()
    x = torch.randint(0, 64, (2, 20))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    positions = torch.cat([torch.arange(8), torch.arange(12)]).expand(2, -1).contiguous()
    positions[1] = torch.arange(20)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out, _ = compiled(x, position_ids=positions, doc_ids=doc_ids)
        expected, _ = model(x, position_ids=positions, doc_ids=doc_ids)
    assert torch.allclose(out, expected, atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, synthetic_data):
    big = str(tmp_path / "big")
    small = str(tmp_path / "accumulated")
    tg.main(train_args(synthetic_data, big, "--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "8"))
    tg.main(train_args(synthetic_data, small, "--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "2"))
    # The gradient norm too: without the 1/grad_accum scaling it is 4× too large, while gradient
    # clipping and Adam keep the losses of the first steps close.
    for key in ("loss", "grad_norm"):
        a = [r[key] for r in read_metrics(big) if key in r]
        b = [r[key] for r in read_metrics(small) if key in r]
        assert len(a) == len(b) == 4 and np.allclose(a, b, rtol=1e-5), key


def test_resume_reproduces_uninterrupted_run(tmp_path, synthetic_data, capsys):
    straight = str(tmp_path / "straight")
    interrupted = str(tmp_path / "interrupted")
    common = ["--checkpoint-every", "5", "--dropout", "0.1"]
    tg.main(train_args(synthetic_data, straight, "--max-steps", "12", *common))
    tg.main(train_args(synthetic_data, interrupted, "--max-steps", "12", *common, "--inject-nan-at", ""))
    # simulate a crash after step 7: drop the last checkpoints, and the run is unfinished
    for path in tg.checkpoint_paths(interrupted):
        if int(path[-10:-3]) > 5:
            os.remove(path)
    tg.write_stage(interrupted, {**tg.read_stage(interrupted), "complete": False})
    capsys.readouterr()
    tg.main(train_args(synthetic_data, interrupted, "--max-steps", "12", *common, "--resume"))
    assert "resumed from" in capsys.readouterr().out
    a = [(r["step"], r["loss"]) for r in read_metrics(straight) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(interrupted) if "loss" in r]
    assert a == b


def same_state(a, b):
    """Two (nested) state dicts hold equal values: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_nan_and_spike_trigger_rollback_and_skip(tmp_path, synthetic_data, monkeypatch):
    out = str(tmp_path / "faults")
    # Watch the run's model and optimizer: at each rollback event they must equal the checkpoint rolled back to.
    watched, at_rollback = {}, []
    make_adamw, write_line = tg.adamw, tg.log_line

    def adamw_watched(module, *args, **kwargs):
        watched["model"], watched["optimizer"] = module, make_adamw(module, *args, **kwargs)
        return watched["optimizer"]

    def log_line_checking_rollbacks(metrics_file, record):
        if record.get("event") == "rollback":
            checkpoint = torch.load(os.path.join(out, f"ckpt_{record['step']:07d}.pt"), weights_only=True)
            at_rollback.append((same_state(watched["model"].state_dict(), checkpoint["model"]),
                                same_state(watched["optimizer"].state_dict(), checkpoint["optimizer"])))
        write_line(metrics_file, record)

    monkeypatch.setattr(tg, "adamw", adamw_watched)
    monkeypatch.setattr(tg, "log_line", log_line_checking_rollbacks)
    tg.main(train_args(synthetic_data, out, "--max-steps", "40", "--checkpoint-every", "5",
                       "--spike-window", "10", "--inject-nan-at", "12", "--inject-garbage-at", "30"))
    records = read_metrics(out)
    events = [r for r in records if r.get("event") == "rollback"]
    assert [e["skipped_batch"] for e in events] == [12, 30]
    assert "non-finite" in events[0]["reason"] and "spike" in events[1]["reason"]
    assert events[0]["step"] == 10 and events[1]["step"] == 25  # back to the last checkpoint
    assert at_rollback == [(True, True), (True, True)]          # weights and Adam's moments reloaded
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(x) for x in losses)
    assert torch.load(os.path.join(out, "model.pt"), weights_only=True)["skipped_batches"] == [12, 30]
    # With dropout 0, a step re-run after a rollback (same weights, optimizer state and batch) logs exactly
    # what its first pass logged: steps 11–12 (batch 12 was bad) and 26–29 (batch 30, reached at step 30).
    passes = {}
    for r in records:
        if "loss" in r:
            passes.setdefault(r["step"], []).append((r["loss"], r["grad_norm"], r["lr"]))
    replayed = {step: runs for step, runs in passes.items() if len(runs) > 1}
    assert sorted(replayed) == [11, 12, 26, 27, 28, 29]
    assert all(first == second for first, second in replayed.values()), replayed
    assert sorted(passes) == list(range(1, 41))


def test_rollbacks_are_capped(tmp_path, synthetic_data):
    out = str(tmp_path / "capped")
    with pytest.raises(RuntimeError, match="giving up"):
        tg.main(train_args(synthetic_data, out, "--max-steps", "20", "--max-rollbacks", "1",
                           "--inject-nan-at", "3,4"))


def test_batch_numbers_skip_bad_batches():
    assert [tg.batch_number_for_step(s, [2, 5]) for s in range(6)] == [0, 1, 3, 4, 6, 7]


# ----------------------------------------------------------------------------- soups

def test_soups():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    same = tg.uniform_soup([a, a, a])
    assert all(torch.equal(same[k], a[k]) for k in a)
    mean = tg.uniform_soup([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and torch.equal(mean["b"], torch.tensor([0.5]))
    # greedy: loss is the distance of w to (2, 4); a alone scores 5, b alone 5, the average 0
    loss = lambda sd: float(((sd["w"] - torch.tensor([2.0, 4.0])) ** 2).sum())  # noqa: E731
    soup, kept = tg.greedy_soup([a, b], loss)
    assert kept == [0, 1] and torch.equal(soup["w"], torch.tensor([2.0, 4.0]))
    far = {"w": torch.tensor([100.0, 100.0]), "b": torch.tensor([0.0])}
    _, kept = tg.greedy_soup([far, a], loss)
    assert kept == [1]


def test_soup_command_on_real_checkpoints(tmp_path, synthetic_data):
    out = str(tmp_path / "run")
    tg.main(train_args(synthetic_data, out, "--max-steps", "10", "--checkpoint-every", "5"))
    first, middle, last = tg.checkpoint_paths(out)  # steps 0 (the initialisation), 5 and 10
    checkpoint = torch.load(last, weights_only=True)
    soup_path = str(tmp_path / "soup.pt")

    # Uniform: two different checkpoints average element-wise.
    tg.main(["soup", "uniform", middle, last, "--out", soup_path])
    a, b = torch.load(middle, weights_only=True)["model"], checkpoint["model"]
    soup = torch.load(soup_path, weights_only=True)
    assert soup["soup_of"] == [middle, last] and soup["model"].keys() == a.keys()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(soup["model"][k], (a[k] + b[k]) / 2, atol=1e-7, rtol=1e-6)

    # Greedy, on candidates whose merits this test measures itself: the trained weights ± the same noise
    # (each worse than their mean, which is the trained model) and the random initialisation.
    config = tg.GPTConfig.from_dict(checkpoint["config"])
    model, data = tg.GPT(config), tg.TokenData(synthetic_data, config.block_size, config.vocab_size)

    def val_loss(state_dict):
        model.load_state_dict(state_dict)
        return tg.evaluate_loss(model, data, 8, 8, torch.device("cpu"), contextlib.nullcontext())

    def mean(*state_dicts):
        return {k: sum(sd[k] for sd in state_dicts) / len(state_dicts) for k in state_dicts[0]}

    def perturbed(sign):
        model.load_state_dict(checkpoint["model"])
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p += sign * 0.01 * torch.randn(p.shape, generator=generator)
        return {k: v.clone() for k, v in model.state_dict().items()}

    candidates = {first: torch.load(first, weights_only=True)["model"]}
    for name, sign in (("plus.pt", 1), ("minus.pt", -1)):
        path = str(tmp_path / name)
        tg.atomic_save({**checkpoint, "model": perturbed(sign)}, path)
        candidates[path] = torch.load(path, weights_only=True)["model"]
    plus, minus = str(tmp_path / "plus.pt"), str(tmp_path / "minus.pt")
    losses = {path: val_loss(sd) for path, sd in candidates.items()}
    best, second = sorted([plus, minus], key=losses.get)
    pair_loss = val_loss(mean(candidates[plus], candidates[minus]))
    assert losses[first] > losses[second] and pair_loss < losses[best]  # averaging the pair helps ...
    assert val_loss(mean(candidates[plus], candidates[minus], candidates[first])) > pair_loss  # ... adding init hurts
    tg.main(["soup", "greedy", first, plus, minus, "--data", synthetic_data, "--eval-windows", "8",
             "--out", soup_path])
    soup = torch.load(soup_path, weights_only=True)
    assert soup["soup_of"] == [best, second]
    for k in b:
        torch.testing.assert_close(soup["model"][k], b[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bad input

def expect_error(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        tg.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_bad_flags_and_files_give_one_line_errors(tmp_path, capsys, synthetic_data):
    out = str(tmp_path / "x")
    expect_error(capsys, train_args(synthetic_data, out, "--lr", "-1"), "--lr must be > 0")
    expect_error(capsys, train_args(synthetic_data, out, "--n-embd", "33"), "divisible by --n-head")
    expect_error(capsys, train_args(str(tmp_path / "nowhere"), out), "meta.json: not found")
    expect_error(capsys, train_args(synthetic_data, out, "--block-size", "100000"), "--block-size 100000")

    corrupt = str(tmp_path / "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"not a checkpoint")
    expect_error(capsys, ["sample", corrupt], "corrupt or not a checkpoint")


def test_corrupt_shard_and_foreign_vocabulary(tmp_path, capsys):
    data = write_synthetic_data(str(tmp_path / "data"), n_train=5000, n_val=1000)
    shard = os.path.join(data, "train_000000.bin")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    expect_error(capsys, train_args(data, str(tmp_path / "x")), "truncated or corrupt shard")

    data = write_synthetic_data(str(tmp_path / "data2"), n_train=5000, n_val=1000)
    meta_path = os.path.join(data, "meta.json")
    meta = json.load(open(meta_path))
    meta["vocab_size"] = 32  # the shards hold ids from a vocabulary of 64
    json.dump(meta, open(meta_path, "w"))
    expect_error(capsys, train_args(data, str(tmp_path / "y")), "larger than the model's vocab_size=32")


def test_resume_refuses_a_different_config(tmp_path, capsys, synthetic_data):
    out = str(tmp_path / "run")
    tg.main(train_args(synthetic_data, out, "--max-steps", "2"))
    expect_error(capsys, train_args(synthetic_data, out, "--max-steps", "4", "--resume", "--n-layer", "3"),
                 "n_layer=2 there, 3 here")


# ----------------------------------------------------------------------------- the stage: skip, resume

def test_a_finished_run_is_skipped_until_a_flag_or_the_data_changes(tmp_path, capsys):
    data = write_synthetic_data(str(tmp_path / "data"), n_train=5000, n_val=1000)
    out = str(tmp_path / "run")
    model_path = os.path.join(out, "model.pt")
    val_loss = tg.main(train_args(data, out, "--max-steps", "3"))
    stamp, fingerprint = os.stat(model_path).st_mtime_ns, tg.read_stage(out)["fingerprint"]
    capsys.readouterr()
    # --log-every and --checkpoint-every change no result: the same configuration, skipped.
    assert tg.main(train_args(data, out, "--max-steps", "3", "--log-every", "1", "--checkpoint-every", "2")) == val_loss
    assert "holds a finished run" in capsys.readouterr().out and os.stat(model_path).st_mtime_ns == stamp
    tg.main(train_args(data, out, "--max-steps", "3", "--lr", "1e-3"))  # another flag: trained again
    assert tg.read_stage(out)["fingerprint"] != fingerprint and tg.read_stage(out)["complete"]
    tg.main(train_args(data, out, "--max-steps", "3"))
    assert tg.read_stage(out)["fingerprint"] == fingerprint
    write_synthetic_data(data, n_train=5000, n_val=1000, seed=1)  # new shards in the same directory
    capsys.readouterr()
    tg.main(train_args(data, out, "--max-steps", "3"))
    assert "holds a finished run" not in capsys.readouterr().out and tg.read_stage(out)["fingerprint"] != fingerprint


def test_an_interrupted_run_resumes_by_itself_to_the_same_model(tmp_path, monkeypatch, capsys, synthetic_data):
    from conftest import interrupt_on_call, without_timings
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    common = ["--max-steps", "12", "--checkpoint-every", "5", "--dropout", "0.1"]
    tg.main(train_args(synthetic_data, straight, *common))
    interrupt_on_call(monkeypatch, tg, "batch_number_for_step", 9)  # Ctrl-C during step 9
    with pytest.raises(KeyboardInterrupt):
        tg.main(train_args(synthetic_data, interrupted, *common))
    monkeypatch.undo()
    capsys.readouterr()
    tg.main(train_args(synthetic_data, interrupted, *common))  # no --resume: stage.json says unfinished
    assert "at step 5" in capsys.readouterr().out  # from the last checkpoint, not from scratch
    a, b = (torch.load(os.path.join(d, "model.pt"), weights_only=True) for d in (straight, interrupted))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(interrupted))
    assert [r["step"] for r in read_metrics(interrupted) if "loss" in r] == list(range(1, 13))
