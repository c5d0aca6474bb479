"""Gradient oracles for attacking noisy networks: the defended predictor as an ordinary
classifier (expectation over the noise inside each gradient), the likelihood-ratio input
gradient (GLR applied to the input: φ never differentiated), and SPSA (no gradient at all).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.injection import bind, forward_with_flat_noise, probe, sample_noise
from ..nn.intercept import record_preactivations
from ..nn.noise import score
from ..nn.perturbations import Activity
from .moments import mean_field_forward, moment_logits
from .surrogates import attack_forward, default_surrogate, noisy_attack_forward, through_time


class _LRLogProb(torch.autograd.Function):
    """log p̄(x) forward; backward the likelihood-ratio Jacobian of p̄ (φ never differentiated)."""

    @staticmethod
    def forward(ctx, x, model, samples, gen):
        jac, pbar = lr_input_jacobian(model, x.detach(), lambda out: torch.softmax(out, -1), samples, gen)
        pbar = pbar.clamp_min(1e-12)
        ctx.save_for_backward(jac, pbar)
        ctx.shape = x.shape
        return pbar.log()

    @staticmethod
    def backward(ctx, grad):
        jac, pbar = ctx.saved_tensors
        return torch.einsum("nc,ncd->nd", grad / pbar, jac).reshape(ctx.shape), None, None, None


class LAPClassifier(nn.Module):
    """A glrnet model as an ordinary classifier for attack libraries (torchattacks, AutoAttack, ...).

    ``forward(x)`` returns "logits" log p̄(x), p̄ the mean softmax over ``samples`` fresh noisy
    passes (``predictor="lap"``; expectation over transformation inside one call), or the
    noise-free network's log-softmax (``predictor="ot"``). Its gradient goes through φ by
    ``surrogate`` (see :func:`surrogates_for`). Inputs may be flat (N, D) or images (N, C, H, W);
    outputs are (N, classes), so cross-entropy and DLR losses apply unchanged. ``surrogate="mean"`` or
    ``"moments"``: the log-softmax of a deterministic surrogate of the noisy predictor instead
    (:mod:`glrnet.robustness.moments`; ``samples`` and ``predictor`` unused). ``model``: any ``nn.Module``
    with noisy layers; ``input_shape``: the shape of one of its inputs, which every input is reshaped to
    (default: flat inputs, which a :class:`~glrnet.NoisySequential` reshapes itself; other inputs as given).
    """

    def __init__(self, model: nn.Module, samples: int = 32, surrogate: str | None = None, predictor: str = "lap",
                 generator: torch.Generator | None = None, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        if predictor not in ("lap", "ot"):
            raise ValueError(f"unknown predictor {predictor!r}; valid: lap, ot")
        if surrogate == "lr" and predictor == "ot":
            raise ValueError("the likelihood-ratio gradient needs the noisy (lap) predictor")
        if samples < 2 and predictor == "lap":
            raise ValueError(f"samples must be ≥ 2 for the lap predictor, got {samples}")
        self.model, self.samples, self.predictor, self.generator = model, samples, predictor, generator
        self.surrogate = surrogate or default_surrogate(model)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.repeated = None   # whether a noisy layer runs at every time step: probed at the first noisy pass

    def shaped(self, x: Tensor) -> Tensor:
        """``x`` (images, flat or as given) as a batch of the model's inputs."""
        if self.input_shape is not None:
            return x.reshape(len(x), *self.input_shape)
        return x.reshape(len(x), -1) if hasattr(self.model, "bind") else x

    def forward(self, x: Tensor) -> Tensor:
        x = self.shaped(x)
        if self.surrogate in ("mean", "moments"):  # deterministic surrogate networks: no noise to average over
            out = mean_field_forward(self.model, x) if self.surrogate == "mean" else moment_logits(self.model, x)
            return torch.log_softmax(out, -1)
        if self.predictor == "ot":
            return torch.log_softmax(attack_forward(self.model, x, None, self.surrogate), -1)
        if self.surrogate == "lr":
            return _LRLogProb.apply(x, self.model, self.samples, self.generator)
        if self.repeated is None:
            self.repeated = through_time(self.model, x)
        out = noisy_attack_forward(self.model, x, self.samples, self.surrogate, self.generator, self.repeated)
        return torch.softmax(out, -1).mean(0).clamp_min(1e-12).log()


def _margin_of_probs(p: Tensor, y: Tensor) -> Tensor:
    """log max_{j≠y} p_j − log p_y (> 0 ⇔ misclassified), per example; the attacker maximises it."""
    logp = p.clamp_min(1e-12).log()
    true = logp.gather(-1, y[:, None]).squeeze(-1)
    other = logp.masked_fill(torch.nn.functional.one_hot(y, p.shape[-1]).bool(), -math.inf).amax(-1)
    return other - true


# ------------------------------------------------------------------------- gradient oracles
@torch.no_grad()
def lr_input_jacobian(model: nn.Module, x: Tensor, fn, samples: int, gen: torch.Generator | None = None):
    """Likelihood-ratio estimate of ∇ₓ E[fn(noisy output)] — GLR applied to the input.

    The first layer's pre-activation v = W⁽⁰⁾x + b + r has density f(v − W⁽⁰⁾x − b), so
    ∇ₓ E[g] = W⁽⁰⁾ᵀ E[(g − b) s(r⁽⁰⁾)] with b the leave-one-out mean of g (unbiased, S ≥ 2).
    Neither φ nor ``fn`` is differentiated. ``fn``: (S, N, C) → (S, N, M).
    Returns (jacobian (N, M, D), mean of fn (N, M)), D the values of one input.
    """
    x = bind(model, x)
    pr = probe(model, x)
    first = pr.layers[pr.order[0]]
    if pr.repeated:
        raise ValueError("the likelihood-ratio input gradient takes one draw of the first layer's noise per pass; "
                         "a noisy layer applied at every time step draws one per step")
    if not isinstance(pr.perturbations[pr.order[0]], Activity):
        raise ValueError("the likelihood-ratio input gradient needs activity noise on the first noisy layer")
    r = sample_noise(model, samples, len(x), x=x, generator=gen)
    g = fn(forward_with_flat_noise(model, x, r))
    centred = g - (g.sum(0, keepdim=True) - g) / (samples - 1)
    s0 = score(first.noise, r[..., :pr.width(pr.order[0])])
    cot = torch.einsum("snm,snw->nmw", centred, s0) / samples       # E[(g − b) s(r⁽⁰⁾)], (N, M, units)
    with torch.enable_grad():  # W⁽⁰⁾ᵀ cot: the first layer's transpose (a convolution's: transposed), by one batched vjp
        xr = x.detach().requires_grad_(True)
        z0 = first_preactivation(model, xr).reshape(len(x), -1)
        (jac,) = torch.autograd.grad(z0, xr, cot.transpose(0, 1), is_grads_batched=True)
    jac = jac.reshape(jac.shape[0], len(x), -1).transpose(0, 1)
    return jac, g.mean(0)


def first_preactivation(model: nn.Module, x: Tensor) -> Tensor:
    """The first noisy layer's pre-activation without noise, (B, *units): a deterministic, differentiable
    function of the input (the likelihood-ratio input gradient goes through it)."""
    rec = record_preactivations(model, bind(model, x))
    return next(iter(rec.preactivations.values()))


def spsa_gradient(prob_fn, samples: int, delta: float, gen: torch.Generator):
    """SPSA: mean over Rademacher u of (m(x + δu) − m(x − δu)) / (2δ) · u; m the margin of ``prob_fn``."""
    @torch.no_grad()
    def grad(x: Tensor, y: Tensor) -> Tensor:
        half = max(1, samples // 2)
        u = torch.randint(0, 2, (half, *x.shape), generator=gen, device=x.device).to(x.dtype) * 2 - 1
        batch = torch.cat([(x + delta * u), (x - delta * u)]).clamp(0, 1).reshape(-1, *x.shape[1:])
        m = _margin_of_probs(prob_fn(batch), y.repeat(2 * half)).reshape(2, half, len(x), *[1] * (x.dim() - 1))
        return ((m[0] - m[1]) * u).mean(0) / (2 * delta)
    return grad
