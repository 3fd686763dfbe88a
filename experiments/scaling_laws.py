"""experiments/scaling_laws.py — Chinchilla's compute-optimal rule, measured: IsoFLOP profiles on a laptop.

Seed sections 1.5–1.6 state two rules that train_gpt.py computes (`training_flops`: C ≈ 6·N·D;
`chinchilla_optimal`: D* ≈ 20·N*, N* ∝ C^0.5). Hoffmann et al. (2022) found them by experiment; this
script repeats the experiment at toy scale:

    1. Pick a few compute budgets C and a ladder of model shapes (depth L, width d).
    2. For each budget, train every shape whose run is neither absurdly short nor absurdly long for
       D = C / (6·N) tokens, with the learning-rate schedule (warmup + cosine, `get_lr`) stretched to
       exactly that many steps, and record the final validation loss.
    3. Approach 2 (IsoFLOP profiles): per budget, fit a parabola in ln N → N*(C), D*(C) = C / (6·N*);
       then fit N* ∝ C^a and D* ∝ C^b across budgets (Chinchilla: a ≈ b ≈ 0.5, D*/N* ≈ 20).
    4. Approach 3 (parametric): fit L(N, D) = E + A/N^α + B/D^β to every run; its compute-optimal
       frontier has a = β/(α+β), b = α/(α+β).

How N is counted. N here is *every* parameter, embeddings included (Chinchilla's choice:
`count_params(model, non_embedding=False)`), not the non-embedding count train_gpt.py prints
(Kaplan et al.'s). At these sizes the difference is not a detail: with a 4,102-token vocabulary
the tied embedding is 4,102·d weights, most of a d = 16 model, and as the LM head it is the largest
matmul of every forward pass — leaving it out would undercount the smallest model's compute ~20×.
(Counting only non-embedding parameters at small scale is what Pearce & Song (2024) found pushes
Kaplan's exponent from ~0.5 to ~0.73.)

How C is counted. C = 6·N·D, the project's `training_flops`, without attention's 12·L·T·d FLOPs per
token (`flops_per_token`). The fit reports how much they would add at each optimum and the exponent
a recomputed with them, so the choice is checked, not assumed.

Each run is one `train_gpt.py train` — the project's pretraining loop, called in-process with its
own flags — in <run-dir>/C<budget>/L<l>_d<d>/: cached by its stage.json (a finished run is skipped)
and resumed from its last checkpoint after an interrupt, like every stage. The fits are redone from
the runs each time (seconds).

Usage:
    python -m experiments.scaling_laws --data-dir runs/default/data --run-dir runs/scaling
    python -m experiments.scaling_laws ... --plan                       # the runs and their cost, no training
    python -m experiments.scaling_laws ... --budgets 1e11,3e11 --sizes 1:8:1,1:16:2,1:24:2
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import train_gpt
from data.errors import DataError
from data.hf_tokenizer import write_json
from data.shards import ShardError
from data.stages import read_stage
from train_gpt import GPT, ConfigError, GPTConfig, chinchilla_optimal, count_params, read_meta, training_flops

# A ladder of shapes (n_layer:n_embd:n_head), each 1.3–2.2× the parameters of the one before with a 512-token
# vocabulary (README, "Scaling laws, measured"): each budget trains the 5–6 of them whose D/N falls in the window
# below. The window sits above Chinchilla's 20 because a first sweep at D/N 1.5–40 found the smallest size best
# at every budget: at a few hundred steps the optimum lies at many more tokens per parameter.
DEFAULT_SIZES = "1:8:1,1:12:1,1:16:2,1:24:2,2:24:2,2:32:2,2:40:2,2:48:3,2:56:4,3:64:4"
DEFAULT_BUDGETS = "3e10,1e11,3e11"
CHINCHILLA_EXPONENT = 0.5       # Hoffmann et al. 2022, approach 2: a = 0.49, b = 0.51; approach 3: 0.46 / 0.54
CHINCHILLA_TOKENS_PER_PARAM = 20


# =============================================================================
# 1. The fits (numpy only)
# =============================================================================

# classroom: begin isoflop_minimum
def isoflop_minimum(n_params, losses):
    """The best model size on one IsoFLOP curve (Hoffmann et al. 2022, approach 2; seed 1.6).

    At a fixed compute budget, loss against x = ln N is close to a parabola near its minimum. Fit
        L(x) ≈ c₂·x² + c₁·x + c₀        (least squares over the budget's runs)
    and return its vertex: N* = exp(−c₁ / (2·c₂)) and the loss there, L* = c₀ − c₁² / (4·c₂).
    Needs at least 3 runs; raises ValueError when the parabola opens downward (c₂ ≤ 0), i.e. the
    runs do not bracket a minimum.
    """
    x = np.log(np.asarray(n_params, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if len(x) < 3:
        raise ValueError(f"an IsoFLOP parabola needs at least 3 runs, got {len(x)}")
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        raise ValueError("the losses do not curve upward in ln N: no minimum inside these sizes")
    return float(np.exp(-c1 / (2 * c2))), float(c0 - c1 * c1 / (4 * c2))
# classroom: end isoflop_minimum


def fit_power_law(x, y):
    """y ≈ k · x^a by least squares on ln y = a · ln x + ln k; returns (a, k). Needs ≥ 2 distinct x."""
    log_x, log_y = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(log_x) < 2 or np.ptp(log_x) == 0:
        raise ValueError("a power law needs at least 2 distinct x values")
    a, log_k = np.polyfit(log_x, log_y, 1)
    return float(a), float(np.exp(log_k))


def parametric_loss(n_params, n_tokens, fit):
    """L(N, D) = E + A / N^α + B / D^β  (Hoffmann et al. 2022, eq. 2; approach 3)."""
    return fit["E"] + fit["A"] / np.asarray(n_params, float) ** fit["alpha"] + \
        fit["B"] / np.asarray(n_tokens, float) ** fit["beta"]


def fit_parametric_loss(n_params, n_tokens, losses, exponents=np.arange(0.02, 2.0001, 0.02)):
    """Fit L(N, D) = E + A/N^α + B/D^β to measured runs; a dict E, A, B, alpha, beta, rmse, r2 (or None).

    For fixed (α, β) the model is linear in (E, A, B): solve those by least squares, and search
    (α, β) on a grid, then on a 10× finer grid around the best (variable projection). Only fits with
    E, A, B ≥ 0 count. Hoffmann et al. minimise a Huber loss on ln L with L-BFGS from a grid of
    starts instead; with a dozen points, plain squared error on L is the honest, simple choice.
    """
    n = np.asarray(n_params, dtype=np.float64)
    d = np.asarray(n_tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(y) < 6:
        return None  # 5 parameters: with fewer than 6 points any curve fits

    def search(alphas, betas):
        best = None
        for alpha in alphas:  # every β at once: a stack of (points × 3) design matrices, solved by pseudo-inverse
            X = np.stack([np.ones((len(betas), len(y))), np.broadcast_to(n ** -alpha, (len(betas), len(y))),
                          d[None, :] ** -np.asarray(betas)[:, None]], axis=2)
            coef = np.einsum("kij,j->ki", np.linalg.pinv(X), y)
            sse = ((np.einsum("kij,kj->ki", X, coef) - y) ** 2).sum(axis=1)
            sse[(coef < 0).any(axis=1)] = np.inf
            k = int(np.argmin(sse))
            if np.isfinite(sse[k]) and (best is None or sse[k] < best[0]):
                best = (float(sse[k]), float(alpha), float(betas[k]), coef[k])
        return best

    best = search(exponents, exponents)
    if best is None:
        return None
    step = (exponents[1] - exponents[0]) / 10
    fine = lambda centre: np.clip(centre + step * np.arange(-10, 11), step, None)  # noqa: E731
    best = search(fine(best[1]), fine(best[2])) or best
    sse, alpha, beta, (E, A, B) = best
    return {"E": float(E), "A": float(A), "B": float(B), "alpha": float(alpha), "beta": float(beta),
            "rmse": math.sqrt(sse / len(y)), "r2": 1 - sse / float(((y - y.mean()) ** 2).sum())}


def parametric_optimum(fit, compute):
    """The compute-optimal (N*, D*) of a fitted L(N, D) under C = 6·N·D (Hoffmann et al. 2022, eq. 4):

        N* = G · (C/6)^a,   D* = (C/6)^b / G,   G = (α·A / (β·B))^(1/(α+β)),   a = β/(α+β),  b = α/(α+β)
    """
    alpha, beta = fit["alpha"], fit["beta"]
    G = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    return G * (compute / 6) ** a, (compute / 6) ** b / G


# =============================================================================
# 2. The sweep: which runs, and running them with train_gpt.py's loop
# =============================================================================

def parse_budgets(text):
    try:
        budgets = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--budgets {text!r}: give FLOPs separated by commas, e.g. 1e11,3e11,1e12") from None
    if not budgets or min(budgets) <= 0:
        raise ConfigError(f"--budgets {text!r}: at least one budget, all > 0")
    return budgets


def parse_sizes(text):
    """'L:d:h,…' → [(n_layer, n_embd, n_head)], each with d divisible by h."""
    shapes = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            n_layer, n_embd, n_head = (int(v) for v in item.split(":"))
        except ValueError:
            raise ConfigError(f"--sizes: {item!r} is not n_layer:n_embd:n_head (e.g. 2:32:2)") from None
        if min(n_layer, n_embd, n_head) <= 0 or n_embd % n_head:
            raise ConfigError(f"--sizes: {item!r} needs positive values and n_embd divisible by n_head")
        shapes.append((n_layer, n_embd, n_head))
    if len(shapes) < 3:
        raise ConfigError(f"--sizes {text!r}: at least 3 shapes (an IsoFLOP parabola needs 3 points)")
    return shapes


def shape_params(shape, vocab_size, block_size):
    """(N with embeddings, N without) of the GPT of this shape: counted on the real module."""
    n_layer, n_embd, n_head = shape
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    return count_params(model, non_embedding=False), count_params(model)


def attention_flops_per_token(shape, block_size):
    """Attention's 12·L·T·d FLOPs per training token: the part of `flops_per_token` not in 6·N."""
    n_layer, n_embd, _ = shape
    return 12 * n_layer * block_size * n_embd


def plan_runs(budgets, shapes, vocab_size, block_size, batch_size, min_ratio, max_ratio):
    """Every (budget, shape) run whose tokens per parameter D/N lies in [min_ratio, max_ratio], with its
    step count: D = C / (6·N) rounded to whole steps of batch_size × block_size tokens."""
    tokens_per_step = batch_size * block_size
    params = {shape: shape_params(shape, vocab_size, block_size) for shape in shapes}
    runs = []
    for budget in budgets:
        for shape in shapes:
            n_all, n_non_embedding = params[shape]
            steps = round(budget / (6 * n_all) / tokens_per_step)
            tokens = steps * tokens_per_step
            if steps < 1 or not min_ratio <= tokens / n_all <= max_ratio:
                continue
            runs.append({"budget": budget, "n_layer": shape[0], "n_embd": shape[1], "n_head": shape[2],
                         "params": n_all, "non_embedding_params": n_non_embedding, "steps": steps,
                         "tokens": tokens, "flops": training_flops(n_all, tokens),
                         "attention_flops": attention_flops_per_token(shape, block_size) * tokens})
    return runs


def budget_label(budget):
    return f"C{budget:.0e}".replace("+", "")  # C1e11, C3e11


def run_dir(root, run):
    return os.path.join(root, budget_label(run["budget"]), f"L{run['n_layer']}_d{run['n_embd']}")


def train_argv(run, args):
    """The `train_gpt.py train` flags of one run: its shape, its step count, the schedule fitted to it."""
    warmup = max(1, round(args.warmup_fraction * run["steps"]))
    return ["train", "--data", args.data_dir, "--out", run_dir(args.run_dir, run),
            "--n-layer", str(run["n_layer"]), "--n-embd", str(run["n_embd"]), "--n-head", str(run["n_head"]),
            "--block-size", str(args.block_size), "--micro-batch-size", str(args.batch_size),
            "--global-batch-size", str(args.batch_size), "--max-steps", str(run["steps"]),
            "--warmup-steps", str(min(warmup, run["steps"])), "--lr", str(args.lr),
            "--eval-every", str(run["steps"]), "--eval-windows", str(args.eval_windows),
            "--checkpoint-every", str(args.checkpoint_every), "--keep-checkpoints", "1",
            "--spike-sigmas", str(args.spike_sigmas), "--log-every", str(max(1, run["steps"] // 4)),
            "--device", args.device, "--seed", str(args.seed)]


def train_run(run, args):
    """Train one run with train_gpt.py's own loop (skipped if finished, resumed if interrupted); its final
    validation loss and the seconds it took (0 when it was cached)."""
    started = time.time()
    cached = (read_stage(run_dir(args.run_dir, run)) or {}).get("complete", False)
    val_loss = train_gpt.train(train_gpt.build_parser().parse_args(train_argv(run, args)))
    return val_loss, 0.0 if cached else time.time() - started


# =============================================================================
# 3. Fitting the sweep
# =============================================================================

def fit_sweep(runs):
    """Approach 2 per budget and across budgets, approach 3 on every run, and the attention-FLOPs check."""
    budgets = sorted({r["budget"] for r in runs})
    optima, notes = [], []
    for budget in budgets:
        here = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
        try:
            n_opt, loss_opt = isoflop_minimum([r["params"] for r in here], [r["val_loss"] for r in here])
        except ValueError as e:
            notes.append(f"{budget_label(budget)}: no optimum ({e})")
            continue
        best = min(range(len(here)), key=lambda i: here[i]["val_loss"])
        bracketed = 0 < best < len(here) - 1
        if not bracketed:
            notes.append(f"{budget_label(budget)}: the lowest loss is at the {'smallest' if best == 0 else 'largest'} "
                         f"size: the optimum is extrapolated, add sizes beyond it")
        # Attention's FLOPs per token at N*, interpolated in ln N between this budget's shapes.
        attention_share = float(np.interp(np.log(n_opt), [math.log(r["params"]) for r in here],
                                          [r["attention_flops"] / r["flops"] for r in here]))
        optima.append({"budget": budget, "n_opt": n_opt, "d_opt": budget / (6 * n_opt), "loss_opt": loss_opt,
                       "tokens_per_param": budget / (6 * n_opt ** 2), "bracketed": bracketed, "runs": len(here),
                       "attention_share": attention_share, "chinchilla_n_opt": chinchilla_optimal(budget)[0]})
    fit = {"optima": optima, "notes": notes}
    if len(optima) >= 2:
        compute = [o["budget"] for o in optima]
        fit["a"], fit["a_coef"] = fit_power_law(compute, [o["n_opt"] for o in optima])
        fit["b"], fit["b_coef"] = fit_power_law(compute, [o["d_opt"] for o in optima])
        # The same optima with attention's FLOPs counted: each budget's true compute at its optimum.
        fit["a_with_attention"], _ = fit_power_law([o["budget"] * (1 + o["attention_share"]) for o in optima],
                                                   [o["n_opt"] for o in optima])
    else:
        notes.append("fewer than 2 budgets with an optimum: no exponents")
    parametric = fit_parametric_loss([r["params"] for r in runs], [r["tokens"] for r in runs],
                                     [r["val_loss"] for r in runs])
    if parametric is None:
        notes.append("approach 3: too few runs (≥ 6) or no fit with E, A, B ≥ 0")
    else:
        alpha, beta = parametric["alpha"], parametric["beta"]
        parametric.update(a=beta / (alpha + beta), b=alpha / (alpha + beta))
        parametric["optima"] = [{"budget": c, "n_opt": n, "d_opt": d, "tokens_per_param": d / n}
                                for c in budgets for n, d in [parametric_optimum(parametric, c)]]
    fit["parametric"] = parametric
    return fit


# =============================================================================
# 4. Plots and report
# =============================================================================

def plot_isoflops(runs, fit, png_path):
    """Loss against N per budget (log x), the fitted parabolas and their minima (stars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({r["budget"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    optima = {o["budget"]: o for o in fit["optima"]}
    for budget, colour in zip(budgets, colours):
        here = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
        n = np.array([r["params"] for r in here], float)
        loss = np.array([r["val_loss"] for r in here])
        ax.plot(n, loss, "o", color=colour, label=f"C = {budget:.0e} FLOPs")
        if len(here) >= 3:
            coef = np.polyfit(np.log(n), loss, 2)
            grid = np.linspace(np.log(n.min()), np.log(n.max()), 100)
            ax.plot(np.exp(grid), np.polyval(coef, grid), "-", color=colour, lw=1)
        if budget in optima:
            o = optima[budget]
            ax.plot(o["n_opt"], o["loss_opt"], "*", color=colour, ms=14, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (embeddings included)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP profiles: each curve one budget, ★ its fitted optimum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_optima(fit, png_path):
    """N* and D* against C (log–log): measured optima, the fitted power laws, Chinchilla's rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    optima = fit["optima"]
    compute = np.array([o["budget"] for o in optima], float)
    grid = np.geomspace(compute.min() / 2, compute.max() * 2, 50) if len(compute) else np.array([])
    for ax, key, exponent, coef, name in [(axes[0], "n_opt", "a", "a_coef", "N*"),
                                          (axes[1], "d_opt", "b", "b_coef", "D*")]:
        if not optima:
            ax.text(0.5, 0.5, "no budget has an optimum (scaling.md says why)", ha="center", transform=ax.transAxes)
            continue
        ax.plot(compute, [o[key] for o in optima], "o", color="C0", label=f"measured {name} (IsoFLOP minima)")
        if exponent in fit:
            ax.plot(grid, fit[coef] * grid ** fit[exponent], "-", color="C0",
                    label=f"fit: {name} ∝ C^{fit[exponent]:.2f}")
        chinchilla = [chinchilla_optimal(c)[0 if key == "n_opt" else 1] for c in grid]
        ax.plot(grid, chinchilla, "--", color="C3", label=f"Chinchilla: {name} ∝ C^0.5, D* = 20·N*")
        if fit.get("parametric"):
            p = fit["parametric"]
            ax.plot(grid, [parametric_optimum(p, c)[0 if key == "n_opt" else 1] for c in grid], ":", color="C2",
                    label=f"approach 3: {name} ∝ C^{p['a' if key == 'n_opt' else 'b']:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap within a decade
        ax.set_xlabel("compute C = 6ND (FLOPs)")
        ax.set_ylabel(f"{name} ({'parameters' if key == 'n_opt' else 'tokens'})")
        ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal model size and data against compute")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def report_lines(runs, fit):
    """The sweep's runs and its fit as Markdown (what the command prints and writes to scaling.md)."""
    lines = ["| budget C | L | d | N (all) | N (non-emb.) | steps | D | D/N | attention FLOPs | val loss | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["budget"], r["params"])):
        lines.append(f"| {r['budget']:.0e} | {r['n_layer']} | {r['n_embd']} | {r['params']:,} | "
                     f"{r['non_embedding_params']:,} | {r['steps']} | {r['tokens']:,} | {r['tokens'] / r['params']:.1f} | "
                     f"+{100 * r['attention_flops'] / r['flops']:.1f}% | {r['val_loss']:.4f} | {r['seconds']:.0f} |")
    lines += ["", "| budget C | runs | N* | D* | D*/N* | loss at N* | bracketed | attention at N* | Chinchilla N* |",
              "|---|---|---|---|---|---|---|---|---|"]
    for o in fit["optima"]:
        lines.append(f"| {o['budget']:.0e} | {o['runs']} | {o['n_opt']:,.0f} | {o['d_opt']:,.0f} | "
                     f"{o['tokens_per_param']:.1f} | {o['loss_opt']:.4f} | {'yes' if o['bracketed'] else 'no'} | "
                     f"+{100 * o['attention_share']:.1f}% | {o['chinchilla_n_opt']:,.0f} |")
    lines.append("")
    if "a" in fit:
        ratios = ", ".join(f"{o['tokens_per_param']:.1f}" for o in fit["optima"])
        lines.append(f"approach 2 (IsoFLOP): N* ∝ C^{fit['a']:.3f}, D* ∝ C^{fit['b']:.3f}; D*/N* = {ratios} "
                     f"(Chinchilla: a ≈ b ≈ {CHINCHILLA_EXPONENT}, ~{CHINCHILLA_TOKENS_PER_PARAM} tokens/parameter)")
        lines.append(f"with attention FLOPs in C: N* ∝ C^{fit['a_with_attention']:.3f}")
    p = fit.get("parametric")
    if p:
        ratios = ", ".join(f"{o['tokens_per_param']:.1f}" for o in p["optima"])
        lines.append(f"approach 3 (parametric, {len(runs)} runs): L = {p['E']:.3f} + {p['A']:.4g}/N^{p['alpha']:.3f} + "
                     f"{p['B']:.4g}/D^{p['beta']:.3f}; RMSE {p['rmse']:.4f} nats, R² {p['r2']:.3f}; "
                     f"N* ∝ C^{p['a']:.3f}, D* ∝ C^{p['b']:.3f}, D*/N* = {ratios}")
    lines += [f"note: {note}" for note in fit["notes"]]
    return lines


# =============================================================================
# 5. Command line
# =============================================================================

def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments.scaling_laws", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="runs/default/data",
                        help="prepared token shards (`python -m data.prepare`), only read")
    parser.add_argument("--run-dir", default="runs/scaling", help="where the runs, the fit and the plots go")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="compute budgets C in FLOPs (6·N·D), comma-separated")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="model shapes n_layer:n_embd:n_head, comma-separated")
    parser.add_argument("--min-tokens-per-param", type=float, default=4.0,
                        help="skip a (budget, shape) run with fewer training tokens per parameter D/N")
    parser.add_argument("--max-tokens-per-param", type=float, default=300.0,
                        help="skip a (budget, shape) run with more training tokens per parameter D/N")
    parser.add_argument("--block-size", type=int, default=128, help="context length T of every run")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step of every run")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of every run (cosine to lr/10)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warmup, as a fraction of each run's steps")
    parser.add_argument("--eval-windows", type=int, default=256, help="validation windows for each run's final loss")
    parser.add_argument("--spike-sigmas", type=float, default=6.0,
                        help="train_gpt.py's loss-spike rollback threshold; higher than its 3: on the loss plateaus of "
                             "these tiny models 3σ fires on noise and rolls back to step 0")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (resume points)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda if available)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of every run (init and batches)")
    parser.add_argument("--plan", action="store_true", help="print the runs and their FLOPs, train nothing")
    return parser


def validate(args):
    for name in ["block_size", "batch_size", "lr", "eval_windows", "checkpoint_every", "min_tokens_per_param"]:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    if args.max_tokens_per_param < args.min_tokens_per_param:
        raise ConfigError("--max-tokens-per-param must be ≥ --min-tokens-per-param")
    if not 0 <= args.warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction must be in [0, 1) (got {args.warmup_fraction})")
    if args.threads < 0:
        raise ConfigError(f"--threads must be ≥ 0 (got {args.threads})")


def sweep(args):
    validate(args)
    budgets, shapes = parse_budgets(args.budgets), parse_sizes(args.sizes)
    meta = read_meta(args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = plan_runs(budgets, shapes, meta["vocab_size"], args.block_size, args.batch_size,
                     args.min_tokens_per_param, args.max_tokens_per_param)
    if not runs:
        raise ConfigError("no run fits --min/--max-tokens-per-param at these --budgets and --sizes")
    for budget in budgets:
        here = [r for r in runs if r["budget"] == budget]
        print(f"[scaling] {budget_label(budget)}: {len(here)} runs: "
              + ", ".join(f"L{r['n_layer']}_d{r['n_embd']} (N={r['params']:,}, {r['steps']} steps, "
                          f"D/N={r['tokens'] / r['params']:.1f})" for r in here))
    total_tokens = sum(r["tokens"] for r in runs)
    print(f"[scaling] {len(runs)} runs, {total_tokens:,} training tokens, {sum(r['flops'] for r in runs):.3g} FLOPs (6ND)")
    if args.plan:
        return None
    os.makedirs(args.run_dir, exist_ok=True)
    for i, run in enumerate(runs, start=1):
        print(f"[scaling] run {i}/{len(runs)}: {run_dir(args.run_dir, run)}")
        run["val_loss"], run["seconds"] = train_run(run, args)
    fit = fit_sweep(runs)
    write_json(os.path.join(args.run_dir, "results.json"), {"runs": runs, "fit": fit, "flags": {
        k: v for k, v in vars(args).items() if k != "plan"}})
    plot_isoflops(runs, fit, os.path.join(args.run_dir, "isoflop.png"))
    plot_optima(fit, os.path.join(args.run_dir, "optima.png"))
    lines = report_lines(runs, fit)
    report = os.path.join(args.run_dir, "scaling.md")
    with open(report + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(report + ".tmp", report)
    print("\n".join(lines))
    print(f"[scaling] wrote {report}, results.json, isoflop.png, optima.png in {args.run_dir}")
    return fit


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return sweep(args)
    except (ConfigError, ShardError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
