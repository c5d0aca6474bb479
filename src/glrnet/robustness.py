"""Adaptive attacks on noisy (GLR-trained) networks, and the evaluation protocol.

Threat model (white box): the attacker knows the architecture, the weights, the noise
family and σ, the defence's prediction rule (OT, or LAP with its K) — everything but the
noise the defender draws at prediction time, which is fresh and secret. L∞ budget ε on
images in [0, 1]. A defended model is attacked through the predictor it is deployed
with: LAP for networks trained with noise, OT for the BP baseline; every adversarial
image is then scored by both OT and LAP.

Attacks (Athalye et al. 2018; Carlini et al. 2019; Tramèr et al. 2020):

``transfer-fgsm``  FGSM from the first source network (the seed's setting).
``fgsm``           one step of the white-box gradient below.
``pgd-eot``        PGD on the LAP statistic −log p̄_y + log max_{j≠y} p̄_j, p̄ the mean softmax
                   over S noise samples (expectation over transformation); discontinuous φ
                   are crossed by BPDA: exact forward, and backward the derivative of the
                   layer's Gaussian-smoothed activation d/dz E[φ(z + r)] (Φ(z/σ)' for the
                   threshold, Gauss–Hermite quadrature of the likelihood-ratio form otherwise).
``pgd-lr``         PGD with an unbiased likelihood-ratio estimate of ∇ₓ p̄ (GLR applied to the
                   input: ∇ₓ E[p_c] = W⁽⁰⁾ᵀ E[p_c s(r⁽⁰⁾)]), no differentiation of φ at all.
``pgd-ot``         PGD (BPDA where needed) on the noise-free network.
``spsa``           gradient-free: SPSA estimates of the margin of the defended predictor's own
                   probabilities (Uesato et al. 2018).
``random``         the worst of R random corners x ± ε.

The per-example worst case counts an image as robust only if every attack fails on it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from .activations import activation_name, is_smooth
from .attacks import fgsm, pgd
from .checkpoint import atomic_write_csv, atomic_write_text
from .model import NoisyMLP, predict, predict_proba
from .noise import score


@dataclass
class AttackSettings:
    steps: int = 40
    eot_samples: int = 32
    lr_samples: int = 256
    spsa_samples: int = 64
    spsa_steps: int = 40
    spsa_queries_k: int = 32        # noisy passes per SPSA query of a LAP predictor
    spsa_delta: float = 0.01
    random_draws: int = 16
    lap_replications: int = 1000
    seed: int = 0


# ------------------------------------------------------------------------- BPDA surrogate
_GH = np.polynomial.hermite.hermgauss(64)


def smoothed_derivative(phi, z: Tensor, sigma: float) -> Tensor:
    """d/dz E[φ(z + r)], r ~ N(0, σ²), = E[φ(z + r) r/σ²]: Gauss–Hermite quadrature (64 nodes)
    of the likelihood-ratio form, valid for discontinuous φ; closed form for the threshold."""
    if activation_name(phi) == "threshold":
        return torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    t = torch.as_tensor(_GH[0], dtype=z.dtype, device=z.device)
    w = torch.as_tensor(_GH[1], dtype=z.dtype, device=z.device)
    out = torch.zeros_like(z)
    for ti, wi in zip(t, w):
        r = math.sqrt(2) * sigma * ti
        out += wi * phi(z + r) * (r / sigma**2)
    return out / math.sqrt(math.pi)


class _BPDA(torch.autograd.Function):
    """Forward φ(v) exactly; backward the smoothed derivative at the layer's clean pre-activation z."""

    @staticmethod
    def forward(ctx, v, z, phi, sigma):
        ctx.save_for_backward(z)
        ctx.phi, ctx.sigma = phi, sigma
        return phi(v)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * smoothed_derivative(ctx.phi, z, ctx.sigma), None, None, None


def attack_forward(model: NoisyMLP, x: Tensor, noise: Tensor | None = None) -> Tensor:
    """The network's forward for attacks: exact values, BPDA gradients through non-smooth φ."""
    if is_smooth(model.activation):
        return model(x, noise=noise)
    if not isinstance(model.noise, Normal):
        raise ValueError("the BPDA surrogate assumes Gaussian noise")
    sigma = float(model.noise.stddev)
    return model(x, noise=noise, hidden_activation=lambda v, z: _BPDA.apply(v, z, model.activation, sigma))


def _margin_of_probs(p: Tensor, y: Tensor) -> Tensor:
    """log max_{j≠y} p_j − log p_y (> 0 ⇔ misclassified), per example; the attacker maximises it."""
    logp = p.clamp_min(1e-12).log()
    true = logp.gather(-1, y[:, None]).squeeze(-1)
    other = logp.masked_fill(torch.nn.functional.one_hot(y, p.shape[-1]).bool(), -math.inf).amax(-1)
    return other - true


# ------------------------------------------------------------------------- gradient oracles
def eot_gradient(model: NoisyMLP, noisy: bool, samples: int, gen: torch.Generator):
    """∇ₓ margin(p̄), p̄ = mean softmax over ``samples`` noise draws (EOT), BPDA through φ."""
    def grad(x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            if noisy:
                p = torch.softmax(attack_forward(model, x, model.sample_noise(samples, len(x), generator=gen)), -1).mean(0)
            else:
                p = torch.softmax(attack_forward(model, x), -1)
            (g,) = torch.autograd.grad(_margin_of_probs(p, y).sum(), x)
        return g
    return grad


@torch.no_grad()
def lr_input_jacobian(model: NoisyMLP, x: Tensor, fn, samples: int, gen: torch.Generator | None = None):
    """Likelihood-ratio estimate of ∇ₓ E[fn(noisy output)] — GLR applied to the input.

    The first layer's pre-activation v = W⁽⁰⁾x + b + r has density f(v − W⁽⁰⁾x − b), so
    ∇ₓ E[g] = W⁽⁰⁾ᵀ E[(g − b) s(r⁽⁰⁾)] with b the leave-one-out mean of g (unbiased, S ≥ 2).
    Neither φ nor ``fn`` is differentiated. ``fn``: (S, N, C) → (S, N, M).
    Returns (jacobian (N, M, D), mean of fn (N, M)).
    """
    r = model.sample_noise(samples, len(x), generator=gen)
    g = fn(model(x, noise=r))
    centred = g - (g.sum(0, keepdim=True) - g) / (samples - 1)
    s0 = score(model.noise, r[..., :model.widths[0]])
    jac = torch.einsum("snm,snw->nmw", centred, s0) / samples @ model.layers[0].weight
    return jac, g.mean(0)


def lr_gradient(model: NoisyMLP, samples: int, gen: torch.Generator):
    """∇ₓ margin(p̄) from the likelihood-ratio Jacobian of p̄ = E[softmax(noisy output)]."""
    @torch.no_grad()
    def grad(x: Tensor, y: Tensor) -> Tensor:
        jac, pbar = lr_input_jacobian(model, x, lambda out: torch.softmax(out, -1), samples, gen)
        j = pbar.masked_fill(torch.nn.functional.one_hot(y, pbar.shape[-1]).bool(), -1).argmax(-1)
        n = torch.arange(len(x), device=x.device)
        # ∇ (log p̄_j − log p̄_y)
        return jac[n, j] / pbar[n, j].clamp_min(1e-12)[:, None] - jac[n, y] / pbar[n, y].clamp_min(1e-12)[:, None]
    return grad


def spsa_gradient(prob_fn, samples: int, delta: float, gen: torch.Generator):
    """SPSA: mean over Rademacher u of (m(x + δu) − m(x − δu)) / (2δ) · u; m the margin of ``prob_fn``."""
    @torch.no_grad()
    def grad(x: Tensor, y: Tensor) -> Tensor:
        half = max(1, samples // 2)
        u = torch.randint(0, 2, (half, *x.shape), generator=gen, device=x.device).to(x.dtype) * 2 - 1
        batch = torch.cat([(x + delta * u), (x - delta * u)]).clamp(0, 1).reshape(-1, x.shape[-1])
        m = _margin_of_probs(prob_fn(batch), y.repeat(2 * half)).reshape(2, half, len(x))
        return ((m[0] - m[1])[..., None] * u).mean(0) / (2 * delta)
    return grad


# ------------------------------------------------------------------------- protocol
def _correct(model: NoisyMLP, x_adv: Tensor, y: Tensor, noisy: bool, k: int, seed: int) -> dict[str, Tensor]:
    out = {"ot": predict(model, x_adv, "ot") == y}
    if noisy:
        gen = torch.Generator(device=x_adv.device).manual_seed(10_000 + seed)  # the defender's own noise
        out["lap"] = predict(model, x_adv, "lap", k, generator=gen, antithetic=k % 2 == 0) == y
    return out


def attack_model(model: NoisyMLP, noisy: bool, x: Tensor, y: Tensor, eps: float, st: AttackSettings,
                 source: NoisyMLP | None = None, attacks: list[str] | None = None) -> dict[str, dict[str, Tensor]]:
    """Per-example correctness {attack: {"ot": bool (N,), "lap": bool (N,)}} at budget ε."""
    gen = torch.Generator(device=x.device).manual_seed(st.seed)
    lap = lambda z: predict_proba(model, z, "lap", st.spsa_queries_k, generator=gen, antithetic=True)  # noqa: E731
    ot = lambda z: torch.softmax(model(z), -1)  # noqa: E731
    target_probs = lap if noisy else ot
    eot = eot_gradient(model, noisy, st.eot_samples, gen)
    ot_grad = eot_gradient(model, False, 1, gen)
    success_ot = lambda z, t: model(z).argmax(-1) != t  # noqa: E731
    plan = {
        "transfer-fgsm": (lambda: fgsm(source, x, y, eps)) if source is not None else None,
        "fgsm": lambda: fgsm(None, x, y, eps, grad_fn=eot),
        "pgd-eot": lambda: pgd(None, x, y, eps, st.steps, grad_fn=eot, generator=gen, success_fn=success_ot),
        "pgd-lr": (lambda: pgd(None, x, y, eps, st.steps, grad_fn=lr_gradient(model, st.lr_samples, gen),
                               generator=gen, success_fn=success_ot)) if noisy else None,
        "pgd-ot": (lambda: pgd(None, x, y, eps, st.steps, grad_fn=ot_grad, generator=gen,
                               success_fn=success_ot)) if noisy else None,
        "spsa": lambda: pgd(None, x, y, eps, st.spsa_steps, random_start=False, generator=gen, success_fn=success_ot,
                            grad_fn=spsa_gradient(target_probs, st.spsa_samples, st.spsa_delta, gen)),
    }
    results = {}
    for name, make in plan.items():
        if make is None or (attacks is not None and name not in attacks):
            continue
        results[name] = _correct(model, make(), y, noisy, st.lap_replications, st.seed)
    if attacks is None or "random" in attacks:
        acc = {"ot": torch.ones_like(y, dtype=torch.bool)}
        if noisy:
            acc["lap"] = torch.ones_like(y, dtype=torch.bool)
        for d in range(st.random_draws):
            u = torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1
            c = _correct(model, (x + eps * u).clamp(0, 1), y, noisy, max(100, st.lap_replications // 10), st.seed + d)
            for k in acc:
                acc[k] &= c[k]
        results["random"] = acc
    worst = {k: torch.ones_like(y, dtype=torch.bool) for k in ("ot", "lap") if k == "ot" or noisy}
    for name, res in results.items():
        for k in worst:
            worst[k] &= res[k]
    results["worst-case"] = worst
    return results


ROBUST_FIELDS = ["model", "attack", "eps", "acc_ot", "acc_lap", "images"]


def evaluate_robustness(models: dict[str, tuple[NoisyMLP, bool]], x: Tensor, y: Tensor, eps_list: list[float],
                        st: AttackSettings, source: NoisyMLP | None = None, quiet: bool = False) -> list[dict]:
    rows = []
    for name, (model, noisy) in models.items():
        clean = _correct(model, x, y, noisy, st.lap_replications, st.seed)
        rows.append({"model": name, "attack": "none", "eps": 0.0, "acc_ot": clean["ot"].double().mean().item(),
                     "acc_lap": clean["lap"].double().mean().item() if noisy else math.nan, "images": len(x)})
        for eps in eps_list:
            t0 = time.perf_counter()
            res = attack_model(model, noisy, x, y, eps, st, source)
            for attack, c in res.items():
                rows.append({"model": name, "attack": attack, "eps": eps, "acc_ot": c["ot"].double().mean().item(),
                             "acc_lap": c["lap"].double().mean().item() if "lap" in c else math.nan,
                             "images": len(x)})
            if not quiet:
                w = res["worst-case"]
                print(f"[robustness] {name} ε={eps:.3f}: worst-case OT {w['ot'].double().mean():.3f}"
                      + (f" LAP {w['lap'].double().mean():.3f}" if "lap" in w else "")
                      + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def sanity_checks(models: dict[str, tuple[NoisyMLP, bool]], rows: list[dict], x, y, headline: float,
                  st: AttackSettings) -> list[dict]:
    """The protocol's self-checks (each a measured pass / fail with its numbers)."""
    def acc(model, attack, eps, key):
        r = next((r for r in rows if r["model"] == model and r["attack"] == attack and r["eps"] == eps), None)
        return None if r is None else r[key]

    checks = []
    eps_list = sorted({r["eps"] for r in rows if r["eps"] > 0})
    for name, (model, noisy) in models.items():
        key = "acc_lap" if noisy else "acc_ot"
        for eps in eps_list:
            one, it = acc(name, "fgsm", eps, key), acc(name, "pgd-eot", eps, key)
            checks.append({"model": name, "check": f"iterative ≤ one-step (ε={eps:g}, {key})",
                           "value": f"pgd-eot {it:.3f} vs fgsm {one:.3f}", "pass": it <= one + 0.02})
        worst = [acc(name, "worst-case", e, key) for e in eps_list]
        mono = all(b <= a + 0.02 for a, b in zip(worst, worst[1:]))
        checks.append({"model": name, "check": f"worst case falls monotonically with ε ({key})",
                       "value": " → ".join(f"{w:.3f}" for w in worst), "pass": mono})
        checks.append({"model": name, "check": f"reaches chance (≤ 0.15) at ε = {eps_list[-1]:g} ({key})",
                       "value": f"{worst[-1]:.3f}", "pass": worst[-1] <= 0.15})
        tr, wc = acc(name, "transfer-fgsm", headline, key), acc(name, "worst-case", headline, key)
        if tr is not None and wc is not None:
            checks.append({"model": name, "check": f"transfer weaker than white box (ε={headline:g}, {key})",
                           "value": f"transfer {tr:.3f} vs worst case {wc:.3f}", "pass": tr >= wc})
        # doubling iterations and EOT samples at the headline ε
        double = AttackSettings(**{**st.__dict__, "steps": 2 * st.steps, "eot_samples": 2 * st.eot_samples})
        res = attack_model(model, noisy, x, y, headline, double, attacks=["pgd-eot"])
        base_acc = acc(name, "pgd-eot", headline, key)
        new = res["pgd-eot"]["lap" if noisy else "ot"].double().mean().item()
        checks.append({"model": name, "check": f"2× steps and EOT samples change pgd-eot < 0.03 (ε={headline:g})",
                       "value": f"{base_acc:.3f} → {new:.3f}", "pass": abs(new - base_acc) < 0.03})
    return checks


def write_reports(out: Path, rows: list[dict], checks: list[dict], headline: float,
                  st: AttackSettings, images: int) -> None:
    atomic_write_csv(out / "robustness.csv", rows, ROBUST_FIELDS)
    models = list(dict.fromkeys(r["model"] for r in rows))
    show = [e for e in (headline, 0.1, 0.2) if any(r["eps"] == e for r in rows)]

    def get(m, a, e, key):
        r = next((r for r in rows if r["model"] == m and r["attack"] == a and r["eps"] == e), None)
        return "–" if r is None or r[key] != r[key] else f"{r[key]:.3f}"

    lines = ["# Robustness under adaptive attacks", "",
             f"White box: weights, σ, noise family, K and the prediction rule known; the defender's noise is fresh "
             f"and secret. L∞, images in [0, 1], {images} test images. PGD: {st.steps} steps, step 2.5ε/steps, "
             f"random start; EOT: {st.eot_samples} noise samples per gradient; LR gradient: {st.lr_samples} samples; "
             f"SPSA: {st.spsa_steps} steps × {st.spsa_samples} perturbations, LAP queries with K = {st.spsa_queries_k}; "
             f"random: {st.random_draws} corners; defended LAP: K = {st.lap_replications}.", "",
             "Worst case = an image counts as correct only if every attack fails on it.", "",
             "| model | predictor | " + " | ".join(f"transfer-FGSM ε={e:g}" for e in show) + " | "
             + " | ".join(f"worst case ε={e:g}" for e in show) + " |",
             "|---|---|" + "---|" * (2 * len(show))]
    for m in models:
        for key, label in (("acc_ot", "OT"), ("acc_lap", "LAP")):
            if all(get(m, "worst-case", e, key) == "–" for e in show):
                continue
            lines.append(f"| {m} | {label} | " + " | ".join(get(m, "transfer-fgsm", e, key) for e in show) + " | "
                         + " | ".join(get(m, "worst-case", e, key) for e in show) + " |")
    lines += ["", "## Per attack (LAP for noisy models, OT for the BP baseline)", ""]
    attacks = [a for a in dict.fromkeys(r["attack"] for r in rows) if a != "none"]
    eps_all = sorted({r["eps"] for r in rows if r["eps"] > 0})
    lines += ["| model | attack | " + " | ".join(f"ε={e:g}" for e in eps_all) + " |", "|---|---|" + "---|" * len(eps_all)]
    for m in models:
        noisy = any(r["model"] == m and r["acc_lap"] == r["acc_lap"] for r in rows)
        key = "acc_lap" if noisy else "acc_ot"
        for a in attacks:
            lines.append(f"| {m} | {a} | " + " | ".join(get(m, a, e, key) for e in eps_all) + " |")
    lines += ["", "## Sanity checks", "", "| model | check | measured | pass |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['check']} | {c['value']} | {'yes' if c['pass'] else 'NO'} |")
    atomic_write_text(out / "robustness.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "robustness_checks.json", json.dumps(checks, indent=1))


def run_protocol(out: Path, spec, models: dict, sources: dict, data, headline: float, device, quiet: bool) -> dict:
    """The protocol inside ``glrnet reproduce`` (settings from the spec's [robustness] table)."""
    rb = dict(spec.robustness)
    names = rb.pop("models", list(models))
    eps = sorted(set(rb.pop("eps", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3])) | {headline})
    images = rb.pop("images", 500)
    st = AttackSettings(**rb)
    chosen = {n: (models[n][1], models[n][0].config.noisy) for n in names}
    x, y = data.x_test[:images], data.y_test[:images]
    first = next(iter(sources.values()))
    rows = evaluate_robustness(chosen, x, y, eps, st, source=first, quiet=quiet)
    checks = sanity_checks(chosen, rows, x, y, headline, st)
    write_reports(out, rows, checks, headline, st, len(x))
    return {"rows": len(rows), "checks_passed": sum(c["pass"] for c in checks), "checks": len(checks)}


def robustness_command(args) -> None:
    """``glrnet robustness --run DIR [DIR ...]``: the protocol on trained runs."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .train import TrainConfig
    models, cfg = {}, None
    for run in args.run:
        path = Path(run)
        model, extra = load_model(path / "model.safetensors" if path.is_dir() else path, args.device)
        cfg = extra.get("config", {})
        noisy = TrainConfig.from_dict(cfg).noisy
        models[path.name if path.is_dir() else path.stem] = (model, noisy)
    dataset = args.dataset or cfg.get("dataset", "digits")
    data = load_dataset(dataset, args.data_dir or cfg.get("data_dir"), args.image_size or cfg.get("image_size"))
    x, y = data.x_test[:args.images].to(args.device), data.y_test[:args.images].to(args.device)
    eps = [float(e) for e in args.eps.split(",")]
    st = AttackSettings(steps=args.steps, eot_samples=args.eot_samples, lap_replications=args.lap_replications,
                        seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = None
    if args.source:
        src = Path(args.source)
        source = load_model(src / "model.safetensors" if src.is_dir() else src, args.device)[0]
    headline = args.headline if args.headline is not None else eps[len(eps) // 2]
    eps = sorted(set(eps) | {headline})
    rows = evaluate_robustness(models, x, y, eps, st, source=source)
    checks = sanity_checks(models, rows, x, y, headline, st)
    write_reports(out, rows, checks, headline, st, len(x))
    print((out / "robustness.md").read_text())
