"""L∞ attacks on plain autograd: FGSM and PGD. Images stay in [0, 1].

An attack takes ``logits_fn``: any differentiable callable x → logits (a source
network, or a surrogate of a defended model, see :mod:`glrnet.robustness`), or a
``grad_fn`` (x, y) → ∇ₓ loss for attacks that estimate the gradient otherwise.

Adversarial sets are generated once per (source, ε) and saved with their metadata
(:func:`save_adversarial`), so every model is evaluated on identical images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from .checkpoint import save_tensors_atomic
from .losses import cross_entropy

LogitsFn = Callable[[Tensor], Tensor]
GradFn = Callable[[Tensor, Tensor], Tensor]


def input_gradient(logits_fn: LogitsFn, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ Σᵢ CE(logits_fn(x)ᵢ, yᵢ) by autograd."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = cross_entropy(logits_fn(x), y).sum()
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(logits_fn: LogitsFn | None, x: Tensor, y: Tensor, eps: float, grad_fn: GradFn | None = None) -> Tensor:
    """Fast gradient sign method: x + ε · sign(∇ₓ L), clipped to [0, 1] (Goodfellow et al. 2015)."""
    g = grad_fn(x, y) if grad_fn is not None else input_gradient(logits_fn, x, y)
    return (x + eps * g.sign()).clamp_(0, 1).detach()


def pgd(logits_fn: LogitsFn | None, x: Tensor, y: Tensor, eps: float, steps: int = 40,
        step_size: float | None = None, random_start: bool = True, restarts: int = 1,
        grad_fn: GradFn | None = None, generator: torch.Generator | None = None,
        success_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """L∞ projected gradient descent (Madry et al. 2018), with random starts and restarts.

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
            delta = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * 2 - 1
            z = (x + eps * delta).clamp(0, 1)
        else:
            z = x.clone()
        for _ in range(steps):
            z = z + step_size * grad(z, y).sign()
            z = torch.min(torch.max(z, x - eps), x + eps).clamp_(0, 1).detach()
        with torch.no_grad():
            hit = success(z, y) & ~found
        best[hit] = z[hit]
        best[~found & ~hit] = z[~found & ~hit]
        found |= hit
        if found.all():
            break
    return best.detach()


def save_adversarial(path: str | Path, x_adv: Tensor, indices: Tensor, meta: dict) -> None:
    """Adversarial images (N, D) with the test-set indices they came from and their metadata."""
    save_tensors_atomic({"x_adv": x_adv.float(), "indices": indices.long()}, Path(path),
                         {"glrnet_adversarial": json.dumps(meta)})


def load_adversarial(path: str | Path) -> tuple[Tensor, Tensor, dict]:
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["glrnet_adversarial"])
    return t["x_adv"], t["indices"], meta
