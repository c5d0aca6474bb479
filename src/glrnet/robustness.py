"""Adaptive attacks on noisy (GLR-trained) networks, and the evaluation protocol.

Threat model (white box): the attacker knows the architecture, the weights, the noise
family and σ, the defence's prediction rule (OT, or LAP with its K) — everything but the
noise the defender draws at prediction time, which is fresh and secret. L∞ budget ε on
images in [0, 1]. A defended model is attacked through the predictor it is deployed
with: LAP for networks trained with noise, OT for the BP baseline; every adversarial
image is then scored by both OT and LAP.

Attacks (Athalye et al. 2018; Croce & Hein 2020; Tramèr et al. 2020):

``transfer-fgsm``        FGSM from the first source network (the seed's setting).
``fgsm``                 one white-box step through the default surrogate.
``apgd-<loss>[<s>]``     APGD (torchattacks), loss ``ce`` or ``dlr``, on :class:`LAPClassifier`:
                         log p̄ with p̄ the mean softmax over S fresh noise samples (expectation
                         over transformation), its gradient through φ by surrogate ``s``
                         (:func:`surrogates_for`: exact, Gaussian-smoothed BPDA, sigmoid slopes,
                         straight-through, or the likelihood-ratio input gradient
                         ∇ₓ E[p] = W⁽⁰⁾ᵀ E[p s(r⁽⁰⁾)], which differentiates nothing).
``apgd-ce[ot]``          APGD on the noise-free network, transferred to the noisy predictor.
``spsa``                 gradient-free: SPSA estimates of the margin of the defended predictor's own
                         probabilities (Uesato et al. 2018).
``random``               the worst of R random corners x ± ε.

The per-example worst case counts an image as robust only if every attack fails on it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from .activations import activation_name, is_smooth
from .attacks import fgsm, pgd
from .checkpoint import atomic_write_csv, atomic_write_text
from .model import NoisySequential, predict, predict_proba
from .noise import score


@dataclass
class AttackSettings:
    steps: int = 100                 # APGD iterations per restart
    restarts: int = 1                # APGD restarts
    eot_samples: int = 32            # noise samples inside one gradient of a LAP predictor
    lr_samples: int = 512            # samples of the likelihood-ratio input gradient
    losses: tuple = ("ce", "dlr")    # APGD losses
    spsa_samples: int = 64
    spsa_steps: int = 40
    spsa_queries_k: int = 32        # noisy passes per SPSA query of a LAP predictor
    spsa_delta: float = 0.01
    random_draws: int = 16
    lap_replications: int = 1000
    seed: int = 0
    max_doublings: int = 3           # convergence check: double at most this many times (2×, 4×, 8×)

    def __post_init__(self):
        for f in ("steps", "restarts", "eot_samples", "lr_samples", "spsa_samples", "spsa_steps", "spsa_queries_k",
                  "random_draws", "lap_replications", "max_doublings"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"attack setting {f} must be ≥ 1, got {getattr(self, f)!r}")

    def doubled(self) -> "AttackSettings":
        """Twice the steps, restarts and samples: the protocol's convergence check."""
        return replace(self, steps=2 * self.steps, restarts=2 * self.restarts, eot_samples=2 * self.eot_samples,
                       lr_samples=2 * self.lr_samples, spsa_samples=2 * self.spsa_samples,
                       spsa_steps=2 * self.spsa_steps, random_draws=2 * self.random_draws, seed=self.seed + 1)


# ------------------------------------------------------------------------- BPDA surrogates
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


def surrogates_for(model: NoisySequential) -> list[str]:
    """The backward passes an attacker tries through φ (the forward is always exact).

    ``exact``: autograd (smooth φ only). ``gauss``: the derivative of the Gaussian-smoothed
    activation at the unit's pre-activation without its own noise, d/dz E[φ(z + r)] (exact in
    expectation for one threshold layer). ``sigmoid:s``: the derivative of sigmoid(s·v) at the
    noisy pre-activation v (threshold units). ``ste``: straight-through, derivative 1.
    ``lr``: no derivative of φ at all: the likelihood-ratio estimate of ∇ₓ E[softmax].
    """
    acts = {a for a in model.activations() if a is not None}
    if all(is_smooth(a) for a in acts):
        return ["exact", "lr"]
    if "threshold" in acts:
        return ["gauss", "sigmoid:1", "sigmoid:4", "ste", "lr"]
    return ["gauss", "ste", "lr"]


class _Surrogate(torch.autograd.Function):
    """Forward φ(v) exactly; backward ``derivative(v, z)``."""

    @staticmethod
    def forward(ctx, v, z, phi, derivative):
        ctx.save_for_backward(v, z)
        ctx.derivative = derivative
        return phi(v)

    @staticmethod
    def backward(ctx, grad):
        v, z = ctx.saved_tensors
        return grad * ctx.derivative(v, z), None, None, None


def _derivative(model: NoisySequential, surrogate: str):
    """surrogate → (φ → (v, z) → the backward derivative used in place of φ'(v))."""
    if surrogate == "gauss":
        if not isinstance(model.noise, Normal):
            raise ValueError("the Gaussian-smoothed surrogate assumes Gaussian noise")
        sigma = float(model.noise.stddev)
        return lambda phi: (lambda v, z: smoothed_derivative(phi, z, sigma))
    if surrogate == "ste":
        return lambda phi: (lambda v, z: torch.ones_like(v))
    if surrogate.startswith("sigmoid:"):
        slope = float(surrogate.split(":", 1)[1])
        return lambda phi: (lambda v, z: slope * torch.sigmoid(slope * v) * (1 - torch.sigmoid(slope * v)))
    raise ValueError(f"unknown surrogate {surrogate!r}; valid: exact, gauss, sigmoid:<slope>, ste, lr")


def attack_forward(model: NoisySequential, x: Tensor, noise: Tensor | None = None, surrogate: str | None = None) -> Tensor:
    """The network's forward for attacks: exact values, the ``surrogate``'s gradient through φ
    (default: ``exact`` for smooth φ, ``gauss`` otherwise)."""
    surrogate = surrogate or default_surrogate(model)
    if surrogate == "exact":
        return model(x, noise=noise)
    d = _derivative(model, surrogate)
    return model(x, noise=noise, surrogate=lambda v, z, phi: _Surrogate.apply(v, z, phi, d(phi)))


def default_surrogate(model: NoisySequential) -> str:
    return "exact" if all(is_smooth(a) for a in model.activations() if a is not None) else "gauss"


class _LRLogProb(torch.autograd.Function):
    """log p̄(x) forward; backward the likelihood-ratio Jacobian of p̄ (φ never differentiated)."""

    @staticmethod
    def forward(ctx, x, model, samples, gen):
        jac, pbar = lr_input_jacobian(model, x.detach(), lambda out: torch.softmax(out, -1), samples, gen)
        pbar = pbar.clamp_min(1e-12)
        ctx.save_for_backward(jac, pbar)
        return pbar.log()

    @staticmethod
    def backward(ctx, grad):
        jac, pbar = ctx.saved_tensors
        return torch.einsum("nc,ncd->nd", grad / pbar, jac), None, None, None


class LAPClassifier(nn.Module):
    """A glrnet model as an ordinary classifier for attack libraries (torchattacks, AutoAttack, ...).

    ``forward(x)`` returns "logits" log p̄(x), p̄ the mean softmax over ``samples`` fresh noisy
    passes (``predictor="lap"``; expectation over transformation inside one call), or the
    noise-free network's log-softmax (``predictor="ot"``). Its gradient goes through φ by
    ``surrogate`` (see :func:`surrogates_for`). Inputs may be flat (N, D) or images (N, C, H, W);
    outputs are (N, classes), so cross-entropy and DLR losses apply unchanged.
    """

    def __init__(self, model: NoisySequential, samples: int = 32, surrogate: str | None = None, predictor: str = "lap",
                 generator: torch.Generator | None = None):
        super().__init__()
        if predictor not in ("lap", "ot"):
            raise ValueError(f"unknown predictor {predictor!r}; valid: lap, ot")
        if surrogate == "lr" and predictor == "ot":
            raise ValueError("the likelihood-ratio gradient needs the noisy (lap) predictor")
        if samples < 2 and predictor == "lap":
            raise ValueError(f"samples must be ≥ 2 for the lap predictor, got {samples}")
        self.model, self.samples, self.predictor, self.generator = model, samples, predictor, generator
        self.surrogate = surrogate or default_surrogate(model)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(len(x), -1)  # images or flat: the model reshapes to its input shape
        if self.predictor == "ot":
            return torch.log_softmax(attack_forward(self.model, flat, None, self.surrogate), -1)
        if self.surrogate == "lr":
            return _LRLogProb.apply(flat, self.model, self.samples, self.generator)
        noise = self.model.sample_noise(self.samples, len(flat), generator=self.generator)
        p = torch.softmax(attack_forward(self.model, flat, noise, self.surrogate), -1).mean(0)
        return p.clamp_min(1e-12).log()


def _margin_of_probs(p: Tensor, y: Tensor) -> Tensor:
    """log max_{j≠y} p_j − log p_y (> 0 ⇔ misclassified), per example; the attacker maximises it."""
    logp = p.clamp_min(1e-12).log()
    true = logp.gather(-1, y[:, None]).squeeze(-1)
    other = logp.masked_fill(torch.nn.functional.one_hot(y, p.shape[-1]).bool(), -math.inf).amax(-1)
    return other - true


# ------------------------------------------------------------------------- gradient oracles
@torch.no_grad()
def lr_input_jacobian(model: NoisySequential, x: Tensor, fn, samples: int, gen: torch.Generator | None = None):
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
    cot = torch.einsum("snm,snw->nmw", centred, s0) / samples       # E[(g − b) s(r⁽⁰⁾)], (N, M, units)
    with torch.enable_grad():  # W⁽⁰⁾ᵀ cot: the first layer's transpose (a convolution's: transposed), by one batched vjp
        xr = x.detach().reshape(len(x), -1).requires_grad_(True)
        z0 = model.first_preactivation(xr).reshape(len(x), -1)
        (jac,) = torch.autograd.grad(z0, xr, cot.transpose(0, 1), is_grads_batched=True)
    jac = jac.transpose(0, 1)
    return jac, g.mean(0)


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
def _correct(model: NoisySequential, x_adv: Tensor, y: Tensor, noisy: bool, k: int, seed: int) -> dict[str, Tensor]:
    out = {"ot": predict(model, x_adv, "ot") == y}
    if noisy:
        gen = torch.Generator(device=x_adv.device).manual_seed(10_000 + seed)  # the defender's own noise
        out["lap"] = predict(model, x_adv, "lap", k, generator=gen, antithetic=k % 2 == 0) == y
    return out


def apgd(classifier: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, loss: str,
         seed: int) -> Tensor:
    """APGD (Croce & Hein 2020; AutoAttack's step-size schedule, momentum, restarts) from
    torchattacks on any classifier; ``x`` flat (N, D). Installed separately, without its
    torchvision requirement: ``pip install --no-deps torchattacks==3.5.1``."""
    try:
        import torchattacks
    except ImportError:
        raise ImportError("the adaptive attacks use torchattacks' APGD: pip install --no-deps torchattacks==3.5.1") from None
    atk = torchattacks.APGD(classifier, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss=loss)
    return atk(x.reshape(len(x), 1, 1, -1), y).reshape(x.shape).detach()


def attack_plan(model: NoisySequential, noisy: bool, st: AttackSettings) -> list[str]:
    """The attacks run on a model (besides transfer-fgsm): names ``apgd-<loss>[<surrogate>]``."""
    if not noisy:
        return ["fgsm"] + [f"apgd-{loss}[exact]" for loss in st.losses] + ["spsa", "random"]
    names = ["fgsm"] + [f"apgd-{loss}[{s}]" for s in surrogates_for(model) for loss in st.losses]
    return names + ["apgd-ce[ot]", "spsa", "random"]


def attack_model(model: NoisySequential, noisy: bool, x: Tensor, y: Tensor, eps: float, st: AttackSettings,
                 source: NoisySequential | None = None, attacks: list[str] | None = None,
                 progress=None) -> dict[str, dict[str, Tensor]]:
    """Per-example correctness {attack: {"ot": bool (N,), "lap": bool (N,)}} at budget ε, and the
    per-example worst case over all of them (``"worst-case"``)."""
    gen = torch.Generator(device=x.device).manual_seed(st.seed)
    predictor = "lap" if noisy else "ot"

    def classifier(surrogate=None, pred=predictor):
        samples = st.lr_samples if surrogate == "lr" else st.eot_samples
        return LAPClassifier(model, samples, surrogate, pred, generator=gen)

    names = (["transfer-fgsm"] if source is not None else []) + attack_plan(model, noisy, st)
    results = {}
    for i, name in enumerate(names):
        if attacks is not None and name not in attacks:
            continue
        if progress is not None:
            progress.set_postfix_str(name, refresh=True)
        if name == "transfer-fgsm":
            x_adv = fgsm(source, x, y, eps)
        elif name == "fgsm":
            x_adv = fgsm(classifier(), x, y, eps)
        elif name.startswith("apgd-"):
            loss, surrogate = name[5:].rstrip("]").split("[")
            clf = classifier(None, "ot") if surrogate == "ot" else classifier(surrogate)
            x_adv = apgd(clf, x, y, eps, st.steps, st.restarts, loss, st.seed + i)
        elif name == "spsa":
            lap = lambda z: predict_proba(model, z, "lap", st.spsa_queries_k, generator=gen, antithetic=True)  # noqa: E731
            probs = lap if noisy else (lambda z: torch.softmax(model(z), -1))
            x_adv = pgd(None, x, y, eps, st.spsa_steps, random_start=False, generator=gen,
                        success_fn=lambda z, t: probs(z).argmax(-1) != t,
                        grad_fn=spsa_gradient(probs, st.spsa_samples, st.spsa_delta, gen))
        elif name == "random":
            acc = {"ot": torch.ones_like(y, dtype=torch.bool)}
            if noisy:
                acc["lap"] = torch.ones_like(y, dtype=torch.bool)
            for d in range(st.random_draws):
                u = torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1
                c = _correct(model, (x + eps * u).clamp(0, 1), y, noisy, max(100, st.lap_replications // 10),
                             st.seed + d)
                for k in acc:
                    acc[k] &= c[k]
            results[name] = acc
            continue
        else:
            raise ValueError(f"unknown attack {name!r}")
        if (x_adv - x).abs().max() > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"attack {name} left the ε-ball or [0, 1]")  # a bug, never a result
        results[name] = _correct(model, x_adv, y, noisy, st.lap_replications, st.seed)
    worst = {k: torch.ones_like(y, dtype=torch.bool) for k in ("ot", "lap") if k == "ot" or noisy}
    for res in results.values():
        for k in worst:
            worst[k] &= res[k]
    results["worst-case"] = worst
    return results


ROBUST_FIELDS = ["model", "attack", "eps", "acc_ot", "acc_lap", "images"]


def evaluate_robustness(models: dict[str, tuple[NoisySequential, bool]], x: Tensor, y: Tensor, eps_list: list[float],
                        st: AttackSettings, source: NoisySequential | None = None, quiet: bool = False,
                        survivors: dict | None = None) -> list[dict]:
    """Rows (model, attack, ε, acc_ot, acc_lap, images); ``survivors`` (if given) receives, per
    (model, ε), the per-image mask of the defended predictor's worst case (the convergence
    check attacks only those images again)."""
    from tqdm.auto import tqdm
    rows = []
    bar = tqdm(total=len(models) * len(eps_list), desc="attacks", unit="model·ε", disable=quiet, leave=False,
               dynamic_ncols=True)
    for name, (model, noisy) in models.items():
        clean = _correct(model, x, y, noisy, st.lap_replications, st.seed)
        rows.append({"model": name, "attack": "none", "eps": 0.0, "acc_ot": clean["ot"].double().mean().item(),
                     "acc_lap": clean["lap"].double().mean().item() if noisy else math.nan, "images": len(x)})
        for eps in eps_list:
            t0 = time.perf_counter()
            bar.set_description(f"attacks {name} ε={eps:g}")
            res = attack_model(model, noisy, x, y, eps, st, source, progress=bar)
            if survivors is not None:
                survivors[name, eps] = res["worst-case"]["lap" if noisy else "ot"]
            for attack, c in res.items():
                rows.append({"model": name, "attack": attack, "eps": eps, "acc_ot": c["ot"].double().mean().item(),
                             "acc_lap": c["lap"].double().mean().item() if "lap" in c else math.nan,
                             "images": len(x)})
            bar.update()
            if not quiet:
                w = res["worst-case"]
                tqdm.write(f"[robustness] {name} ε={eps:.3f}: worst-case OT {w['ot'].double().mean():.3f}"
                           + (f" LAP {w['lap'].double().mean():.3f}" if "lap" in w else "")
                           + f" ({time.perf_counter() - t0:.0f}s)")
    bar.close()
    return rows


CONVERGENCE_TOLERANCE = 0.01   # doubling steps, restarts and samples may move no worst case by more


def escalate(model: NoisySequential, noisy: bool, x: Tensor, y: Tensor, eps: float, st: AttackSettings,
             alive: Tensor, source: NoisySequential | None = None,
             tolerance: float = CONVERGENCE_TOLERANCE, progress: bool = False) -> list[tuple[int, float]]:
    """The convergence check: double the steps, restarts and samples (fresh seeds) and attack
    again only the images on which every earlier attack failed (``alive``), until one doubling
    breaks no more than ``tolerance`` of the images or ``st.max_doublings`` is reached.

    The worst case is a per-image union, so attacking only the survivors gives exactly the
    union "all earlier attacks ∪ the doubled ones" at a fraction of the cost. Returns
    [(multiplier, worst case after it)], e.g. [(2, 0.043), (4, 0.030)]."""
    key = "lap" if noisy else "ot"
    alive = alive.clone()
    levels = []
    for level in range(1, st.max_doublings + 1):
        st = st.doubled()
        before = alive.double().mean().item()
        idx = alive.nonzero().squeeze(1)
        if len(idx):
            alive[idx] = attack_model(model, noisy, x[idx], y[idx], eps, st, source)["worst-case"][key]
        after = alive.double().mean().item()
        levels.append((2 ** level, after))
        if progress:
            print(f"[robustness] ε={eps:g} {2 ** level}× on {len(idx)} surviving images: worst case "
                  f"{before:.3f} → {after:.3f}", flush=True)
        if before - after <= tolerance + 1e-9:
            break
    return levels


def sanity_checks(models: dict[str, tuple[NoisySequential, bool]], rows: list[dict], survivors: dict, x, y,
                  headline: float, st: AttackSettings, source: NoisySequential | None = None,
                  check_eps: list[float] | None = None, quiet: bool = False) -> list[dict]:
    """The protocol's self-checks (each a measured pass / fail with its numbers).

    The convergence check (``escalate``) doubles steps, restarts and samples on the images
    that survived every attack, at ``check_eps`` (default: the headline ε), until a doubling
    moves the worst case by at most ``CONVERGENCE_TOLERANCE``; it passes when the last one
    did. ``survivors`` are the per-image worst-case masks that ``evaluate_robustness`` filled.
    Its levels are appended to ``rows`` as attacks ``worst-case 2×``, ``4×``, …
    """
    def acc(model, attack, eps, key):
        r = next((r for r in rows if r["model"] == model and r["attack"] == attack and r["eps"] == eps), None)
        return None if r is None else r[key]

    checks = []
    eps_list = sorted({r["eps"] for r in rows if r["eps"] > 0})
    for name, (model, noisy) in models.items():
        key = "acc_lap" if noisy else "acc_ot"
        iterative = next(a for a in attack_plan(model, noisy, st) if a.startswith("apgd-ce"))
        for eps in eps_list:
            one, it = acc(name, "fgsm", eps, key), acc(name, iterative, eps, key)
            checks.append({"model": name, "check": f"iterative ≤ one-step (ε={eps:g}, {key})",
                           "value": f"{iterative} {it:.3f} vs fgsm {one:.3f}", "pass": it <= one + 0.02})
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
        for eps in check_eps or [headline]:
            t0 = time.perf_counter()
            base = acc(name, "worst-case", eps, key)
            levels = escalate(model, noisy, x, y, eps, st, survivors[name, eps], source, progress=not quiet)
            path = [base] + [a for _, a in levels]
            moved = path[-2] - path[-1]
            checks.append({"model": name, "check": f"doubling steps, restarts and samples (on the surviving images) "
                                                   f"moves the worst case ≤ {CONVERGENCE_TOLERANCE} (ε={eps:g}, {key})",
                           "value": " → ".join([f"{base:.3f}"] + [f"{a:.3f} ({m}×)" for m, a in levels]),
                           "pass": moved <= CONVERGENCE_TOLERANCE + 1e-9, "eps": eps, "predictor": key,
                           "escalated": path[-1], "multiplier": levels[-1][0]})
            for m, a in levels:
                rows.append({"model": name, "attack": f"worst-case {m}×", "eps": eps,
                             "acc_ot": a if key == "acc_ot" else math.nan,
                             "acc_lap": a if key == "acc_lap" else math.nan, "images": len(x)})
            if not quiet:
                print(f"[robustness] {name} ε={eps:g} escalation: {checks[-1]['value']} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return checks


def write_reports(out: Path, rows: list[dict], checks: list[dict], headline: float,
                  st: AttackSettings, images: int, title: str = "") -> None:
    """robustness.csv (every model × attack × ε), robustness.md, robustness_checks.json and
    robustness_worst_case.png (adaptive worst case against ε per model, transfer dashed)."""
    atomic_write_csv(out / "robustness.csv", rows, ROBUST_FIELDS)
    models = list(dict.fromkeys(r["model"] for r in rows))
    show = list(dict.fromkeys(e for e in (headline, 0.1, 0.2, 0.3) if any(r["eps"] == e for r in rows)))

    def get(m, a, e, key):
        r = next((r for r in rows if r["model"] == m and r["attack"] == a and r["eps"] == e), None)
        return "–" if r is None or r[key] != r[key] else f"{r[key]:.3f}"

    def key_of(m):
        return "acc_lap" if any(r["model"] == m and r["acc_lap"] == r["acc_lap"] for r in rows) else "acc_ot"

    lines = [f"# Robustness under adaptive attacks{': ' + title if title else ''}", "",
             f"White box: weights, σ, noise family, K and the prediction rule known; the defender's noise is fresh "
             f"and secret. L∞, images in [0, 1], {images} test images. APGD (torchattacks 3.5.1; CE and DLR losses, "
             f"{st.steps} steps, {st.restarts} restart(s)) on the defended predictor through every surrogate gradient "
             f"(`exact` autograd for smooth φ; for discontinuous φ: `gauss` the Gaussian-smoothed derivative, "
             f"`sigmoid:s` a sigmoid of slope s, `ste` straight-through, `lr` the likelihood-ratio input gradient "
             f"with {st.lr_samples} samples); EOT over {st.eot_samples} noise samples inside each gradient; "
             f"`apgd-ce[ot]` attacks the noise-free network; FGSM; SPSA ({st.spsa_steps} steps × {st.spsa_samples} "
             f"perturbations, LAP queries with K = {st.spsa_queries_k}); {st.random_draws} random corners. "
             f"Every adversarial image is scored by OT and by LAP with K = {st.lap_replications}.", "",
             "**Worst case**: an image counts as correct only if every attack fails on it (per-image union). "
             "The defended predictor is LAP for models trained with noise, OT for the BP baseline.", "",
             "**Escalated**: the convergence check doubles steps, restarts and samples on the images that "
             "survived every attack, until one doubling breaks at most "
             f"{CONVERGENCE_TOLERANCE:g} of the images (at most {st.max_doublings} times); the last level is the "
             "protocol's claim.", "",
             "| model | predictor | " + " | ".join(f"transfer-FGSM ε={e:g}" for e in show) + " | "
             + " | ".join(f"worst case ε={e:g}" for e in show) + " | escalated (ε, level) | converged |",
             "|---|---|" + "---|" * (2 * len(show) + 2)]
    for m in models:
        conv = next((c for c in checks if c["model"] == m and "escalated" in c), None)
        for key, label in (("acc_ot", "OT"), ("acc_lap", "LAP")):
            if all(get(m, "worst-case", e, key) == "–" for e in show):
                continue
            esc = "– | –"
            if conv is not None and conv["predictor"] == key:
                esc = (f"{conv['escalated']:.3f} (ε={conv['eps']:g}, {conv['multiplier']}×) | "
                       f"{'yes' if conv['pass'] else 'NO'}")
            lines.append(f"| {m} | {label} | " + " | ".join(get(m, "transfer-fgsm", e, key) for e in show) + " | "
                         + " | ".join(get(m, "worst-case", e, key) for e in show) + f" | {esc} |")
    lines += ["", "## Per attack (the defended predictor)", ""]
    eps_all = sorted({r["eps"] for r in rows if r["eps"] > 0})
    lines += ["| model | attack | " + " | ".join(f"ε={e:g}" for e in eps_all) + " |", "|---|---|" + "---|" * len(eps_all)]
    for m in models:
        for a in dict.fromkeys(r["attack"] for r in rows if r["model"] == m and r["attack"] != "none"):
            lines.append(f"| {m} | {a} | " + " | ".join(get(m, a, e, key_of(m)) for e in eps_all) + " |")
    lines += ["", "## Sanity checks", "", "| model | check | measured | pass |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['check']} | {c['value']} | {'yes' if c['pass'] else 'NO'} |")
    atomic_write_text(out / "robustness.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "robustness_checks.json", json.dumps(checks, indent=1, ensure_ascii=False))
    from .plots import figure_worst_case
    figure_worst_case(out / "robustness_worst_case.png", rows, models, {m: key_of(m) for m in models}, title)


def run_protocol(out: Path, spec, models: dict, sources: dict, data, headline: float, device, quiet: bool,
                 runs: dict | None = None) -> dict:
    """The protocol inside ``glrnet reproduce`` (settings from the spec's [robustness] table). ``runs``
    (run name → (model spec, model, seed)): every seed's run of the chosen models is attacked, and
    ``robustness_seeds.md`` gives each figure's mean and min–max over the seeds."""
    rb = dict(spec.robustness)
    names = rb.pop("models", list(models))
    eps = sorted(set(rb.pop("eps", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3])) | {headline})
    images = rb.pop("images", 500)
    check_eps = rb.pop("check_eps", None)
    if "losses" in rb:
        rb["losses"] = tuple(rb["losses"])
    try:
        st = AttackSettings(**rb)
    except TypeError as e:
        raise ValueError(f"spec [robustness]: {e}") from None
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ValueError(f"spec [robustness] models {unknown} are not models of the spec")
    chosen = {n: (models[n][1], models[n][0].config.noisy) for n in names}
    seed_of = {n: models[n][0].config.seed for n in names}
    for run, (ms, model, seed) in (runs or {}).items():
        if ms.name in names and run not in chosen:
            chosen[run], seed_of[run] = (model, ms.config.noisy), seed
    x, y = data.x_test[:images], data.y_test[:images]
    first = next(iter(sources.values()))
    rows, checks = attack_and_report(out, chosen, x, y, eps, st, first, headline, check_eps, spec.name, quiet)
    if len(set(seed_of.values())) > 1:
        base = {run: run if run in names else run.rsplit("-seed", 1)[0] for run in chosen}
        write_seed_spread(out, rows, checks, base, chosen, headline)
    return {"rows": len(rows), "checks_passed": sum(c["pass"] for c in checks), "checks": len(checks)}


def write_seed_spread(out: Path, rows: list[dict], checks: list[dict], base: dict, chosen: dict,
                      headline: float) -> None:
    """robustness_seeds.md: per model, the clean and the escalated worst-case accuracy at the headline ε on its
    defended predictor, mean and min–max over the seeds' runs."""
    groups: dict = {}
    for run, name in base.items():
        key = "acc_lap" if chosen[run][1] else "acc_ot"
        clean = next((r[key] for r in rows if r["model"] == run and r["attack"] == "none"), math.nan)
        esc = next((c["escalated"] for c in checks if c["model"] == run and "escalated" in c
                    and abs(c["eps"] - headline) < 1e-12), None)
        if esc is None:
            esc = next((r[key] for r in rows if r["model"] == run and r["attack"] == "worst-case"
                        and abs(r["eps"] - headline) < 1e-12), math.nan)
        groups.setdefault(name, []).append((float(clean), float(esc)))
    lines = [f"# Adaptive worst case over seeds (ε = {headline:.4f}, escalated)", "",
             "| model | seeds | clean (mean, min–max) | worst case (mean, min–max) |", "|---|---|---|---|"]
    for name, vals in groups.items():
        cells = []
        for j in (0, 1):
            v = [t[j] for t in vals]
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        lines.append(f"| {name} | {len(vals)} | {cells[0]} | {cells[1]} |")
    atomic_write_text(out / "robustness_seeds.md", "\n".join(lines) + "\n")


def attack_and_report(out: Path, models: dict[str, tuple[NoisySequential, bool]], x: Tensor, y: Tensor,
                      eps: list[float], st: AttackSettings, source: NoisySequential | None, headline: float,
                      check_eps: list[float] | None = None, title: str = "",
                      quiet: bool = False) -> tuple[list[dict], list[dict]]:
    """The whole protocol, one model at a time: attacks at every ε, the checks with the
    escalation, and the reports rewritten (atomically) after each model, so that a run
    stopped part-way keeps every finished model's results."""
    out.mkdir(parents=True, exist_ok=True)
    rows, checks = [], []
    for name, entry in models.items():
        survivors = {}
        one = {name: entry}
        model_rows = evaluate_robustness(one, x, y, eps, st, source=source, quiet=quiet, survivors=survivors)
        checks += sanity_checks(one, model_rows, survivors, x, y, headline, st, source,
                                [headline] if check_eps is None else check_eps, quiet)
        rows += model_rows
        write_reports(out, rows, checks, headline, st, len(x), title=title)
    return rows, checks


def robustness_command(args) -> None:
    """``glrnet robustness --run DIR [DIR ...]``: the protocol on trained runs."""
    from .checkpoint import load_model
    from .train import TrainConfig, resolve_device
    resolve_device(args.device)
    models, cfg = {}, None
    for run in args.run:
        path = Path(run)
        model, extra = load_model(path / "model.safetensors" if path.is_dir() else path, args.device)
        cfg = extra.get("config", {})
        noisy = TrainConfig.from_saved(cfg).noisy
        models[path.name if path.is_dir() else path.stem] = (model, noisy)
    from .data import load_run_dataset
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, args.subset, args.split)
    x, y = data.x_test[:args.images].to(args.device), data.y_test[:args.images].to(args.device)
    try:
        eps = [float(e) for e in args.eps.split(",")]
    except ValueError:
        raise ValueError(f"--eps takes comma-separated numbers like 0.05,0.1, got {args.eps!r}") from None
    st = AttackSettings(steps=args.steps, restarts=args.restarts, eot_samples=args.eot_samples,
                        lap_replications=args.lap_replications, seed=args.seed, max_doublings=args.max_doublings,
                        lr_samples=args.lr_samples, spsa_samples=args.spsa_samples, spsa_steps=args.spsa_steps)
    source = None
    if args.source:
        src = Path(args.source)
        source = load_model(src / "model.safetensors" if src.is_dir() else src, args.device)[0]
    headline = args.headline if args.headline is not None else eps[len(eps) // 2]
    eps = sorted(set(eps) | {headline})
    out = Path(args.out)
    attack_and_report(out, models, x, y, eps, st, source, headline, title=f"{data.name}, {', '.join(models)}",
                      quiet=args.quiet)
    print((out / "robustness.md").read_text())
