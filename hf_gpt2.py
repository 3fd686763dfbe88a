"""hf_gpt2.py — our GPT as Hugging Face's GPT-2, both ways: a GPT-2 state dict loaded into our GPT
(sft.py --init-gpt2 starts from OpenAI's weights this way), and any of our language-model
checkpoints written as a GPT-2 directory that transformers, evaluation harnesses and serving engines
load (`python train_gpt.py export-hf CKPT --out DIR [--verify]`).

A format conversion, kept out of train_gpt.py, whose story is pretraining. It reads:
    1. The key map and the weights   gpt2_key_map, gpt2_from_hf_state_dict, gpt2_to_hf_state_dict
    2. The config                    gpt2_hf_config: what GPT-2's architecture can express, or an error
    3. The export command            export_hf (config.json, weights, tokenizer), verify_hf_export
"""

import os
import sys
from dataclasses import asdict

import torch
import torch.nn as nn

from train_gpt import GPT, ConfigError, GPTConfig, atomic_save, count_params, load_checkpoint

# Hugging Face GPT-2 keeps these linear layers as `Conv1D`, whose weight is (in, out): the transpose of nn.Linear's.
GPT2_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPTConfig fields that GPT-2's architecture can express (attention only says how it is computed).
GPT2_CONFIG_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attention")


def gpt2_key_map(n_layer):
    """Our parameter names → Hugging Face GPT-2 names (without the `transformer.` prefix)."""
    names = {"token_embedding.weight": "wte.weight", "position_embedding.weight": "wpe.weight",
             "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    for i in range(n_layer):
        for ours, theirs in [("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"h.{i}.{theirs}.{kind}"
    return names


def gpt2_from_hf_state_dict(hf_state_dict, n_head=12, block_size=None):
    """Build a GPT from a Hugging Face GPT2LMHeadModel (or GPT2Model) state dict.

    Two differences to bridge: HF stores its linear layers as `Conv1D` with weights of shape
    (in, out) — ours are nn.Linear, (out, in), so they are transposed — and it keeps the
    causal mask as `attn.bias` / `attn.masked_bias` buffers, which we do not need.
    n_head cannot be read off the shapes (12 for the 124M model).
    """
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    vocab_size, n_embd = sd["wte.weight"].shape
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size or sd["wpe.weight"].shape[0],
                       n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=True)
    model = GPT(config)
    ours = model.state_dict()
    for our_name, hf_name in gpt2_key_map(n_layer).items():
        tensor = sd[hf_name].t() if hf_name.endswith(GPT2_CONV1D_WEIGHTS) else sd[hf_name]
        if our_name == "position_embedding.weight":
            tensor = tensor[:config.block_size]
        if tensor.shape != ours[our_name].shape:
            raise ConfigError(f"GPT-2 weight {hf_name}: shape {tuple(tensor.shape)} != {tuple(ours[our_name].shape)}")
        ours[our_name] = tensor
    model.load_state_dict(ours)
    return model


def gpt2_to_hf_state_dict(model):
    """Our GPT's weights in the layout of Hugging Face's GPT2LMHeadModel: the inverse of
    gpt2_from_hf_state_dict. nn.Linear weights (out, in) become Conv1D weights (in, out); a model
    built with bias=False gets zero biases (GPT-2 always has them, and a zero bias computes what
    no bias computes); the LM head is the token embedding itself, stored once under both names."""
    ours = model.state_dict()
    hf = {}
    for our_name, hf_name in gpt2_key_map(model.config.n_layer).items():
        if our_name in ours:
            tensor = ours[our_name]
        else:  # the bias of a bias=False layer: zeros, one per output (= rows of its weight)
            weight = ours[our_name.removesuffix("bias") + "weight"]
            tensor = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if hf_name.endswith(GPT2_CONV1D_WEIGHTS):
            tensor = tensor.t()
        hf["transformer." + hf_name] = tensor.detach().cpu().contiguous().clone()
    hf["lm_head.weight"] = hf["transformer.wte.weight"]
    return hf


def gpt2_hf_config(model, bos_token_id, eos_token_id, pad_token_id=None):
    """The `config.json` under which Hugging Face's GPT2LMHeadModel computes what `model` computes;
    a ConfigError for anything GPT-2's architecture cannot express."""
    c = model.config
    unknown = set(asdict(c)) - set(GPT2_CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"config field {sorted(unknown)[0]!r} has no counterpart in GPT-2's architecture")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ConfigError(f"LayerNorms with different eps {sorted(eps)}: GPT-2 has one layer_norm_epsilon")
    if model.lm_head.weight is not model.token_embedding.weight:
        raise ConfigError("the LM head is not tied to the token embedding (GPT-2's is)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            # GPT-2's tanh GELU ("gelu_new"), computed by the same PyTorch kernel as MLP.forward
            "n_inner": model.blocks[0].mlp.fc.out_features, "activation_function": "gelu_pytorch_tanh",
            "layer_norm_epsilon": eps.pop(), "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "resid_pdrop": c.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "use_cache": True, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            "torch_dtype": str(model.token_embedding.weight.dtype).removeprefix("torch.")}


def export_hf(args):
    """`export-hf CKPT --out DIR`: a Hugging Face GPT-2 directory that transformers, evaluation
    harnesses and serving engines load: config.json, generation_config.json, pytorch_model.bin,
    tokenizer.json and tokenizer_config.json (with the chat template)."""
    from data.hf_tokenizer import write_hf_tokenizer, write_json
    from data.tokenizer import SPECIAL_TOKENS, load_tokenizer

    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.get("stage") == "reward":
        raise ConfigError(f"{args.checkpoint}: a reward model (scalar head, no LM head); export-hf takes a "
                          f"language model: a pretrained, SFT, PPO or DPO checkpoint")
    for name, value in checkpoint["config"].items():
        if name not in GPT2_CONFIG_FIELDS:
            raise ConfigError(f"{args.checkpoint}: config field {name}={value!r} has no counterpart in GPT-2's "
                              f"architecture; cannot export it")
    model = GPT(GPTConfig.from_dict(checkpoint["config"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ConfigError(f"{args.checkpoint}: weights do not match its config ({str(e).splitlines()[0]})") from None
    tokenizer_ref = args.tokenizer or checkpoint.get("tokenizer")
    if not tokenizer_ref:
        raise ConfigError(f"{args.checkpoint}: the checkpoint names no tokenizer; pass --tokenizer")
    enc = load_tokenizer(tokenizer_ref)
    if enc.n_vocab > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_ref} has {enc.n_vocab} tokens but the model only "
                          f"{model.config.vocab_size} embeddings: not this model's tokenizer (see --tokenizer)")
    end_of_text, pad, _, _, _, end = SPECIAL_TOKENS
    specials = enc._special_tokens
    if end_of_text not in specials:
        raise ConfigError(f"tokenizer {tokenizer_ref} has no {end_of_text} token (GPT-2's bos/eos)")
    # A fine-tuned policy ends its turn with <|end|>; a pretrained model ends a document with <|endoftext|>.
    eos = end if checkpoint.get("stage") and end in specials else end_of_text
    stop_ids = list(dict.fromkeys(specials[t] for t in (eos, end_of_text)))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "config.json"),
               gpt2_hf_config(model, specials[end_of_text], specials[eos], specials.get(pad)))
    write_json(os.path.join(args.out, "generation_config.json"),
               {"bos_token_id": specials[end_of_text], "eos_token_id": stop_ids, "pad_token_id": specials.get(pad)})
    atomic_save(gpt2_to_hf_state_dict(model), os.path.join(args.out, "pytorch_model.bin"))
    write_hf_tokenizer(args.out, enc, model.config.block_size, eos)
    print(f"{args.checkpoint} → {args.out}/: GPT-2 config ({count_params(model, non_embedding=False):,} "
          f"parameters), pytorch_model.bin, tokenizer.json ({enc.n_vocab} tokens), tokenizer_config.json")
    if args.verify:
        verify_hf_export(args.out, model.eval(), enc)


def verify_hf_export(out_dir, model, enc):
    """Load the export with Hugging Face's packages, where installed, and compare it with ours:
    token ids on tricky texts (`tokenizers`) and logits on the same texts (`transformers`)."""
    from data.hf_tokenizer import verify_hf_tokenizer
    from data.tokenizer import SAMPLE_CORPUS, TRICKY_TEXTS

    texts = [*SAMPLE_CORPUS, *TRICKY_TEXTS, "<|endoftext|> typed as text <|end|><|user|>, then real specials"]
    failures = []
    try:
        import tokenizers  # noqa: F401 — only to know whether it is installed
    except ImportError:
        print("verify tokenizer: skipped, the `tokenizers` package is not installed (pip install tokenizers)")
    else:
        mismatches = verify_hf_tokenizer(out_dir, enc, texts)
        print(f"verify tokenizer: {len(texts)} texts, {len(mismatches)} mismatches with tiktoken"
              + "".join(f"\n  {m}" for m in mismatches))
        failures += mismatches
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("verify model: skipped, the `transformers` package is not installed (pip install transformers)")
    else:
        hf = GPT2LMHeadModel.from_pretrained(out_dir).float().eval()
        ours, worst = model.float(), 0.0
        for text in texts:
            ids = torch.tensor([[enc.eot_token, *enc.encode_ordinary(text)][:model.config.block_size]])
            with torch.no_grad():
                worst = max(worst, (ours(ids)[0] - hf(ids).logits).abs().max().item())
        print(f"verify model: transformers' logits on {len(texts)} texts, max |difference| {worst:.2e}")
        if worst > 1e-4:
            failures.append(f"logits differ by {worst:.2e}")
    if failures:
        sys.exit(f"error: export-hf --verify: {out_dir} differs from the checkpoint ({failures[0]})")
