"""L∞ and L2 attacks: FGSM and PGD on plain autograd, APGD, and the registry of attacks the
robustness protocol runs on a defended model (:data:`ATTACKS`). Images stay in [0, 1]; ``norm``
("Linf" or "L2") names the ball of radius ε (L2 over the flattened image).

An attack takes ``logits_fn``: any differentiable callable x → logits (a source
network, or a surrogate of a defended model, see :mod:`glrnet.surrogates`), or a
``grad_fn`` (x, y) → ∇ₓ loss for attacks that estimate the gradient otherwise.

Adversarial sets are generated once per (source, ε) and saved with their metadata
(:func:`save_adversarial`), so every model is evaluated on identical images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ..nn.losses import cross_entropy
from ..predict import predict, predict_proba
from ..utils.files import save_tensors_atomic
from ..utils.seeding import stream_seed
from .moments import choose_deterministic
from .oracles import LAPClassifier, spsa_gradient
from .surrogates import choose_surrogates

LogitsFn = Callable[[Tensor], Tensor]
GradFn = Callable[[Tensor, Tensor], Tensor]


def input_gradient(logits_fn: LogitsFn, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ Σᵢ CE(logits_fn(x)ᵢ, yᵢ) by autograd."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = cross_entropy(logits_fn(x), y).sum()
        (g,) = torch.autograd.grad(loss, x)
    return g


def steepest(g: Tensor, norm: str) -> Tensor:
    """The unit-norm steepest-ascent direction for gradient ``g`` (per image): sign(g) for L∞, g/‖g‖₂ for L2."""
    if norm == "Linf":
        return g.sign()
    flat = g.reshape(len(g), -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(g.shape)


def project(z: Tensor, x: Tensor, eps: float | Tensor, norm: str) -> Tensor:
    """``z`` projected onto the ε-ball around ``x`` (L∞ or L2), then onto [0, 1] (clamping only shortens δ)."""
    if norm == "Linf":
        return torch.min(torch.max(z, x - eps), x + eps).clamp_(0, 1)
    d = (z - x).reshape(len(x), -1)
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, 1)
    d = d * (eps / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return (x + d.reshape(x.shape)).clamp_(0, 1)


def distance(a: Tensor, b: Tensor, norm: str) -> Tensor:
    """Per-image L∞ or L2 distance."""
    d = (a - b).reshape(len(a), -1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def fgsm(logits_fn: LogitsFn | None, x: Tensor, y: Tensor, eps: float, grad_fn: GradFn | None = None,
         norm: str = "Linf") -> Tensor:
    """Fast gradient method: x + ε · sign(∇ₓ L) (L∞, Goodfellow et al. 2015) or x + ε ∇ₓL/‖∇ₓL‖₂ (L2),
    clipped to [0, 1]."""
    g = grad_fn(x, y) if grad_fn is not None else input_gradient(logits_fn, x, y)
    return (x + eps * steepest(g, norm)).clamp_(0, 1).detach()


def pgd(logits_fn: LogitsFn | None, x: Tensor, y: Tensor, eps: float, steps: int = 40,
        step_size: float | None = None, random_start: bool = True, restarts: int = 1,
        grad_fn: GradFn | None = None, generator: torch.Generator | None = None,
        success_fn: Callable[[Tensor, Tensor], Tensor] | None = None, norm: str = "Linf") -> Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L∞ or L2 ball, with random starts and restarts.

    Over restarts, keeps for each image the first adversarial found (``success_fn(x_adv, y)``
    → bool (N,), default: ``logits_fn`` misclassifies), else the last iterate.
    """
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    grad = grad_fn if grad_fn is not None else (lambda z, t: input_gradient(logits_fn, z, t))
    success = success_fn or (lambda z, t: logits_fn(z).argmax(-1) != t)
    best = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        if random_start:
            if norm == "Linf":
                delta = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
            else:   # a uniformly random direction, at a uniformly random fraction of ε
                delta = steepest(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device), norm)
                delta = delta * torch.rand(len(x), *[1] * (x.dim() - 1), generator=generator, dtype=x.dtype,
                                           device=x.device)
            z = (x + eps * delta).clamp(0, 1)
        else:
            z = x.clone()
        for _ in range(steps):
            z = z + step_size * steepest(grad(z, y), norm)
            z = project(z, x, eps, norm).detach()
        with torch.no_grad():
            hit = success(z, y) & ~found
        best[hit] = z[hit]
        best[~found & ~hit] = z[~found & ~hit]
        found |= hit
        if found.all():
            break
    return best.detach()


def pgd_l2(logits_fn: LogitsFn, x: Tensor, y: Tensor, eps: float | Tensor, steps: int = 40,
           step_size: float | Tensor | None = None) -> Tensor:
    """L2 projected gradient ascent on the cross-entropy: normalised gradient steps, projection onto
    the L2 ball of radius ``eps`` (a number, or one per image) and onto [0, 1]. ``x`` flat (N, D)."""
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(len(x), 1)
    step = 2.5 * eps / steps if step_size is None else torch.as_tensor(step_size, dtype=x.dtype).reshape(-1, 1)
    z = x.clone()
    for _ in range(steps):
        z = project(z + step * steepest(input_gradient(logits_fn, z, y), "L2"), x, eps, "L2").detach()
    return z


def save_adversarial(path: str | Path, x_adv: Tensor, indices: Tensor, meta: dict) -> None:
    """Adversarial images (N, D) with the test-set indices they came from and their metadata."""
    save_tensors_atomic({"x_adv": x_adv.float(), "indices": indices.long()}, Path(path),
                         {"glrnet_adversarial": json.dumps(meta)})


def load_adversarial(path: str | Path) -> tuple[Tensor, Tensor, dict]:
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["glrnet_adversarial"])
    return t["x_adv"], t["indices"], meta


# ------------------------------------------------------------------------- the attacks on a defended model
# every random stream of the protocol is stream_seed(settings.seed, purpose, ...): independent, and
# the same on every run
DEFENDER, ATTACKER, APGD, RANDOM = 10, 11, 12, 13

def correct(model: nn.Module, x_adv: Tensor, y: Tensor, noisy: bool, k: int, seed: int,
            vote: bool = False) -> dict[str, Tensor]:
    """Per-image correctness of OT and (for a model trained with noise) LAP on ``x_adv``; with ``vote``
    also of the majority vote of K noisy passes (the predictor CERTIFY certifies)."""
    out = {"ot": predict(model, x_adv, "ot") == y}
    if noisy:
        gen = torch.Generator(device=x_adv.device).manual_seed(stream_seed(seed, DEFENDER))  # the defender's noise
        out["lap"] = predict(model, x_adv, "lap", k, generator=gen, antithetic=k % 2 == 0) == y
        if vote:
            gen = torch.Generator(device=x_adv.device).manual_seed(stream_seed(seed, DEFENDER, 1))
            out["vote"] = predict(model, x_adv, "vote", k, generator=gen) == y
    return out


def apgd(classifier: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, loss: str,
         seed: int, norm: str = "Linf", targeted: bool = False) -> Tensor:
    """APGD (Croce & Hein 2020; AutoAttack's step-size schedule, momentum, restarts) from
    torchattacks on any classifier; ``x`` flat (N, D). ``targeted``: AutoAttack's APGD-T instead (the
    targeted DLR loss, each wrong class in turn as the target; ``loss`` must be "dlr"). Installed
    separately, without its torchvision requirement: ``pip install --no-deps --no-warn-conflicts torchattacks==3.5.1``."""
    try:
        import torchattacks
    except ImportError:
        raise ImportError("the adaptive attacks use torchattacks' APGD: pip install --no-deps --no-warn-conflicts torchattacks==3.5.1") from None
    if targeted:
        if loss != "dlr":
            raise ValueError(f"targeted APGD uses the targeted DLR loss: apgdt-dlr[<surrogate>], got loss {loss!r}")
        classes = classifier(x[:1]).shape[-1]
        atk = torchattacks.APGDT(classifier, norm=norm, eps=eps, steps=steps, n_restarts=restarts, seed=seed,
                                 n_classes=classes)
    else:
        atk = torchattacks.APGD(classifier, norm=norm, eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss=loss)
    return atk(x.reshape(len(x), 1, 1, -1), y).reshape(x.shape).detach()


@dataclass
class AttackContext:
    """What every attack of the protocol is given besides (x, y, ε)."""

    model: nn.Module
    noisy: bool                       # trained with noise: the defended predictor is LAP
    st: object                        # AttackSettings
    source: nn.Module | None          # the transfer source, if any
    generator: torch.Generator
    index: int                        # the attack's position in the plan (its APGD seed offset)
    input_shape: tuple[int, ...] | None = None   # one input's shape (None: flat, the model reshapes it)

    def classifier(self, surrogate: str | None = None, predictor: str | None = None) -> LAPClassifier:
        samples = self.st.lr_samples if surrogate == "lr" else self.st.eot_samples
        return LAPClassifier(self.model, samples, surrogate, predictor or ("lap" if self.noisy else "ot"),
                             generator=self.generator, input_shape=self.input_shape)


def _transfer_fgsm(ctx: AttackContext, x, y, eps, arg):
    return fgsm(ctx.source, x, y, eps, norm=ctx.st.norm)


def _fgsm(ctx: AttackContext, x, y, eps, arg):
    return fgsm(ctx.classifier(), x, y, eps, norm=ctx.st.norm)


def _apgd(ctx: AttackContext, x, y, eps, arg, targeted: bool = False):
    loss, surrogate = arg.rstrip("]").split("[")
    clf = ctx.classifier(None, "ot") if surrogate == "ot" else ctx.classifier(surrogate)
    return apgd(clf, x, y, eps, ctx.st.steps, ctx.st.restarts, loss, stream_seed(ctx.st.seed, APGD, ctx.index),
                ctx.st.norm, targeted)


def _apgdt(ctx: AttackContext, x, y, eps, arg):
    """AutoAttack's APGD-T on a surrogate, outside the plan: e.g. ``apgdt-dlr[moments]`` on a run's survivors."""
    return _apgd(ctx, x, y, eps, arg, targeted=True)


def _pgd(ctx: AttackContext, x, y, eps, arg):
    """PGD with a fixed step (2.5 ε / steps) and a random start on the EOT classifier: no step-size
    adaptation, so the noise of EOT estimates cannot shrink its steps (APGD's can, in the L2 ball)."""
    loss, surrogate = arg.rstrip("]").split("[")
    clf = ctx.classifier(surrogate)
    st = ctx.st
    return pgd(clf, x, y, eps, st.steps, restarts=st.restarts, generator=ctx.generator, norm=st.norm,
               success_fn=lambda z, t: clf(z).argmax(-1) != t)


def _spsa(ctx: AttackContext, x, y, eps, arg):
    model, st, gen = ctx.model, ctx.st, ctx.generator
    lap = lambda z: predict_proba(model, z, "lap", st.spsa_queries_k, generator=gen, antithetic=True)  # noqa: E731
    probs = lap if ctx.noisy else (lambda z: torch.softmax(model(z), -1))
    return pgd(None, x, y, eps, st.spsa_steps, random_start=False, generator=gen,
               success_fn=lambda z, t: probs(z).argmax(-1) != t,
               grad_fn=spsa_gradient(probs, st.spsa_samples, st.spsa_delta, gen), norm=st.norm)


def _random(ctx: AttackContext, x, y, eps, arg):
    """The worst of R random points on the ε-sphere (L∞: the corners x ± ε; L2: uniformly random
    directions): returns per-image correctness, not one image set."""
    st, acc = ctx.st, {"ot": torch.ones_like(y, dtype=torch.bool)}
    if ctx.noisy:
        acc["lap"] = torch.ones_like(y, dtype=torch.bool)
        if st.score_vote:
            acc["vote"] = torch.ones_like(y, dtype=torch.bool)
    for d in range(st.random_draws):
        if st.norm == "Linf":
            u = torch.randint(0, 2, x.shape, generator=ctx.generator, device=x.device).to(x.dtype) * 2 - 1
        else:
            u = steepest(torch.randn(x.shape, generator=ctx.generator, dtype=x.dtype, device=x.device), "L2")
        c = correct(ctx.model, (x + eps * u).clamp(0, 1), y, ctx.noisy, max(100, st.lap_replications // 10),
                    stream_seed(st.seed, RANDOM, d), st.score_vote)
        for k in acc:
            acc[k] &= c[k]
    return acc


#: attack family → callable (context, x, y, ε, argument) → adversarial images, or per-image
#: correctness {"ot", "lap"} for attacks that score several candidates themselves. A plan entry
#: is "family" or "family-argument" (e.g. ``apgd-ce[gauss]``: APGD, CE loss, Gaussian surrogate).
ATTACKS = {"transfer-fgsm": _transfer_fgsm, "fgsm": _fgsm, "apgd": _apgd, "apgdt": _apgdt, "pgd": _pgd,
           "spsa": _spsa, "random": _random}


def resolve_attack(name: str):
    """(callable, argument) of a plan entry, or a ``ValueError`` listing the families."""
    if name in ATTACKS:
        return ATTACKS[name], ""
    family, _, arg = name.partition("-")
    if family in ATTACKS:
        return ATTACKS[family], arg
    raise ValueError(f"unknown attack {name!r}; families: {', '.join(ATTACKS)}")


@dataclass
class AttackPlan:
    """The attacks run on a model (besides transfer-fgsm), in order, and the surrogates left out, each with
    the reason it does not apply to this model."""

    attacks: list[str]
    skipped: dict[str, str]


def plan_attacks(model: nn.Module, noisy: bool, st, x: Tensor | None = None) -> AttackPlan:
    """The attacks run on ``model``: names ``apgd-<loss>[<surrogate>]``, …; ``x``: its inputs (only their
    shape is read; default: the model's example input)."""
    if not noisy:
        return AttackPlan(["fgsm"] + [f"apgd-{loss}[exact]" for loss in st.losses] + ["spsa", "random"], {})
    bpda, skipped = choose_surrogates(model, x)
    names = ["fgsm"] + [f"apgd-{loss}[{s}]" for s in bpda for loss in st.losses]
    if st.norm == "L2":   # APGD's step-size rule reacts to the EOT noise in the L2 ball: a fixed-step PGD too
        names += [f"pgd-ce[{s}]" for s in bpda]
    names += ["apgd-ce[ot]", "spsa", "random"]
    # the deterministic surrogate networks (glrnet.robustness.moments) come last, so that every attack before
    # them keeps its seed and a journal recorded before they joined the plan is resumed, not recomputed
    deterministic, more = choose_deterministic(model, x)
    names += [f"apgd-{loss}[{s}]" for s in deterministic for loss in st.losses]
    return AttackPlan(names, {**skipped, **more})


def attack_plan(model: nn.Module, noisy: bool, st, x: Tensor | None = None) -> list[str]:
    """The attacks run on a model (besides transfer-fgsm): :func:`plan_attacks`' names."""
    return plan_attacks(model, noisy, st, x).attacks


def attack_model(model: nn.Module, noisy: bool, x: Tensor, y: Tensor, eps: float, st,
                 source: nn.Module | None = None, attacks: list[str] | None = None,
                 progress=None, memo=None) -> dict[str, dict[str, Tensor]]:
    """Per-example correctness {attack: {"ot": bool (N,), "lap": bool (N,)}} at budget ε, and the
    per-example worst case over all of them (``"worst-case"``). ``memo(name, run, generator)``
    (optional, :class:`glrnet.journal.AttackJournal`) returns an attack's recorded result or
    runs it (``run()``) and records it."""
    gen = torch.Generator(device=x.device).manual_seed(stream_seed(st.seed, ATTACKER))
    names = (["transfer-fgsm"] if source is not None else []) + attack_plan(model, noisy, st, x)
    results = {}
    for i, name in enumerate(names):
        if attacks is not None and name not in attacks:
            continue
        if progress is not None:
            progress.set_postfix_str(name, refresh=True)

        def run(name=name, i=i):
            fn, arg = resolve_attack(name)
            out = fn(AttackContext(model, noisy, st, source, gen, i, tuple(x.shape[1:])), x, y, eps, arg)
            if isinstance(out, dict):
                return out
            if distance(out, x, st.norm).max() > eps * (1 + 1e-4) + 1e-5 or out.min() < 0 or out.max() > 1:
                raise RuntimeError(f"attack {name} left the {st.norm} ε-ball or [0, 1]")  # a bug, never a result
            return correct(model, out, y, noisy, st.lap_replications, st.seed, st.score_vote)
        results[name] = run() if memo is None else memo(name, run, gen)
    keys = ("ot",) + (("lap",) + (("vote",) if st.score_vote else ()) if noisy else ())
    worst = {k: torch.ones_like(y, dtype=torch.bool) for k in keys}
    for res in results.values():
        for k in worst:
            worst[k] &= res[k]
    results["worst-case"] = worst
    return results
