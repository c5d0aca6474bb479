"""BPDA surrogates: the backward passes an attacker uses through discontinuous activations.

The forward is always exact; only the gradient through φ is replaced (Athalye et al. 2018).
A surrogate is applied by :class:`SurrogateInjection`, a noisy pass (:class:`glrnet.nn.injection.Injection`)
whose layers' activation is wrapped for the duration of the pass: the model's own forward knows nothing
about attacks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from ..nn.activations import Centered, activation_name, is_smooth, is_step
from ..nn.containers import NoisySequential
from ..nn.injection import Injection, forward_with_flat_noise, probe
from ..nn.perturbations import Activity

_GH = np.polynomial.hermite.hermgauss(64)


def gauss_expectation(g, sigma: float | Tensor, like: Tensor) -> Tensor:
    """E[g(r)], r ~ N(0, σ²) (σ a number or a tensor broadcasting with ``like``): Gauss–Hermite
    quadrature with 64 nodes, in ``like``'s dtype and device."""
    t, w = (torch.as_tensor(a, dtype=like.dtype, device=like.device) for a in _GH)
    return sum(wi * g(math.sqrt(2) * sigma * ti) for ti, wi in zip(t, w)) / math.sqrt(math.pi)


def smoothed_derivative(phi, z: Tensor, sigma: float) -> Tensor:
    """d/dz E[φ(z + r)], r ~ N(0, σ²), = E[φ(z + r) r/σ²]: Gauss–Hermite quadrature (64 nodes)
    of the likelihood-ratio form, valid for discontinuous φ; closed form for the threshold."""
    if activation_name(phi) == "threshold":
        return torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return gauss_expectation(lambda r: phi(z + r) * (r / sigma**2), sigma, z)


def surrogates_for(model: NoisySequential) -> list[str]:
    """The backward passes an attacker tries through φ (the forward is always exact).

    ``exact``: autograd (smooth φ only). ``gauss``: the derivative of the Gaussian-smoothed
    activation at the unit's pre-activation without its own noise, d/dz E[φ(z + r)] (exact in
    expectation for one threshold layer). ``sigmoid:s``: the derivative of sigmoid(s·v) at the
    noisy pre-activation v (threshold units). ``ste``: straight-through, derivative 1.
    ``lr``: no derivative of φ at all: the likelihood-ratio estimate of ∇ₓ E[softmax]. ``mean`` and
    ``moments`` (:mod:`glrnet.moments`: deterministic surrogate networks, no EOT) are not BPDA surrogates:
    :func:`glrnet.attacks.attack_plan` appends them after these, :class:`glrnet.oracles.LAPClassifier` takes them.
    """
    acts = {a for a in model.activations() if a is not None}
    pr = probe(model, model.example_input()) if getattr(model, "input_shape", None) else None
    lr = [] if pr is not None and not isinstance(pr.perturbations[pr.order[0]], Activity) else ["lr"]   # unit noise first
    if all(is_smooth(a) for a in acts):
        return ["exact"] + lr
    if any(is_step(a) for a in acts):
        return ["gauss", "sigmoid:1", "sigmoid:4", "sigmoid:8", "ste"] + lr   # slope 8: docs/robustness.md
    return ["gauss", "ste"] + lr


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


def _perturbed_rms(d: Tensor) -> Tensor:
    """The root mean square of the nonzero entries of ``d`` (the entries a weight-site noise moved)."""
    d = d.detach()
    return (d.pow(2).sum() / d.ne(0).sum().clamp_min(1)).sqrt().clamp_min(1e-12)


def _derivative(model: NoisySequential, surrogate: str):
    """surrogate → (layer → (v, z) → the backward derivative used in place of φ'(v))."""
    if surrogate == "gauss":
        if not all(isinstance(m.noise, Normal) for m in model.noisy_layers):
            raise ValueError("the Gaussian-smoothed surrogate assumes Gaussian noise")
        def gauss(layer):
            inner = getattr(layer.activation, "inner", layer.activation)
            if isinstance(layer.perturbation, Activity):
                return lambda v, z: smoothed_derivative(inner, z, float(layer.noise.stddev))
            # weight sites: the pre-activation's noise is the weights' effect v − z, of std σ_w·‖patch, 1‖ (not
            # σ_w): smoothed with its root mean square over the perturbed entries, measured on the attack's own
            # noise draws (a channel site perturbs one output channel per replication: v − z is 0 elsewhere, and
            # the mean over the whole layer would shrink the scale by about √C)
            return lambda v, z: smoothed_derivative(inner, z, _perturbed_rms(v - z))
        return gauss
    if surrogate == "ste":
        return lambda layer: (lambda v, z: torch.ones_like(v))
    if surrogate.startswith("sigmoid:"):
        slope = float(surrogate.split(":", 1)[1])
        return lambda layer: (lambda v, z: slope * torch.sigmoid(slope * v) * (1 - torch.sigmoid(slope * v)))
    raise ValueError(f"unknown surrogate {surrogate!r}; valid: exact, gauss, sigmoid:<slope>, ste, lr")


def attack_forward(model: NoisySequential, x: Tensor, noise: Tensor | None = None, surrogate: str | None = None) -> Tensor:
    """The network's forward for attacks: exact values, the ``surrogate``'s gradient through φ
    (default: ``exact`` for smooth φ, ``gauss`` otherwise)."""
    surrogate = surrogate or default_surrogate(model)
    x = model.bind(x)
    if surrogate == "exact":
        return model(x) if noise is None else forward_with_flat_noise(model, x, noise)
    d = _derivative(model, surrogate)

    class Pass(SurrogateInjection):
        derivative = staticmethod(d)
    if noise is None:
        with Pass(model.noisy_layers, 1, x.shape[0]):
            return model(x)
    return forward_with_flat_noise(model, x, noise, injection=Pass)


class SurrogateInjection(Injection):
    """A noisy pass whose units output φ(v) exactly but back-propagate ``derivative(layer)(v, z)`` in place of
    φ'(v), z the pre-activation without noise (BPDA). Subclasses set ``derivative``: layer → (v, z) → φ'."""

    derivative = None

    def activate(self, i, layer, v, h):
        phi = layer.activation
        if phi is None:
            return v
        z = v if i not in self.noise else layer.affine(h)
        if z.shape[0] != v.shape[0]:   # the batch grew at this layer: z once per input
            z = z.unsqueeze(0).expand(v.shape[0] // z.shape[0], *z.shape).reshape(v.shape)
        if isinstance(phi, Centered):   # centre by autograd (the chain rule through the mean), then the inner φ's surrogate
            v, z, phi = phi.center(v), phi.center(z), phi.inner
        return _Surrogate.apply(v, z, phi, self.derivative(layer))


def default_surrogate(model: NoisySequential) -> str:
    return "exact" if all(is_smooth(a) for a in model.activations() if a is not None) else "gauss"
