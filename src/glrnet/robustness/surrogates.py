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
from torch import Tensor, nn
from torch.distributions import Normal

from ..estimators.samplers import get_sampler
from ..estimators.through_time import PassNoise
from ..nn.activations import Centered, activation_name, is_smooth, is_step
from ..nn.injection import Injection, Layout, bind, forward_with_flat_noise, noisy_forward, probe, sample_noise
from ..nn.layers import act_name
from ..nn.modules import noisy_layers
from ..nn.perturbations import Activity
from ..nn.through_time import TimeInjection

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


def example_input(model: nn.Module, x: Tensor | None = None) -> Tensor:
    """One input of ``model``: ``x[:1]`` shaped as its inputs, else the model's own ``example_input()``; a
    ``ValueError`` when neither is known (a plain module does not know its input's shape)."""
    if x is not None:
        return bind(model, x[:1])
    if callable(getattr(model, "example_input", None)):
        return model.example_input()
    raise ValueError(f"{type(model).__name__} does not know its input's shape: pass an input x")


def through_time(model: nn.Module, x: Tensor) -> bool:
    """Whether a noisy layer of ``model`` is applied several times in one pass (e.g. once per step of a TimeLoop)."""
    return probe(model, example_input(model, x)).repeated


def activation_names(model: nn.Module) -> set[str]:
    """The names of the noisy layers' activations (identity left out)."""
    return {act_name(m.activation) for m in noisy_layers(model) if m.activation is not None}


def choose_surrogates(model: nn.Module, x: Tensor | None = None) -> tuple[list[str], dict[str, str]]:
    """(the BPDA surrogates an attacker tries on ``model``, {surrogate: why it does not apply}); ``x``: an
    input (default: the model's example input). See :func:`surrogates_for`."""
    acts, skipped = activation_names(model), {}
    pr = probe(model, example_input(model, x))
    if pr.repeated:
        skipped["lr"] = ("the likelihood-ratio input gradient takes one draw of the first layer's noise per pass; "
                         "a noisy layer applied at every time step draws one per step")
    elif not isinstance(pr.perturbations[pr.order[0]], Activity):
        skipped["lr"] = "the likelihood-ratio input gradient needs activity noise on the first noisy layer"
    lr = [] if "lr" in skipped else ["lr"]
    if all(is_smooth(a) for a in acts):
        return ["exact"] + lr, skipped
    names = ["gauss", "sigmoid:1", "sigmoid:4", "sigmoid:8", "ste"] if any(is_step(a) for a in acts) \
        else ["gauss", "ste"]   # slope 8: docs/robustness.md
    if not all(isinstance(m.noise, Normal) for m in noisy_layers(model)):
        names.remove("gauss")
        skipped["gauss"] = "the Gaussian-smoothed derivative assumes Gaussian noise"
    return names + lr, skipped


def surrogates_for(model: nn.Module, x: Tensor | None = None) -> list[str]:
    """The backward passes an attacker tries through φ (the forward is always exact).

    ``exact``: autograd (smooth φ only). ``gauss``: the derivative of the Gaussian-smoothed
    activation at the unit's pre-activation without its own noise, d/dz E[φ(z + r)] (exact in
    expectation for one threshold layer). ``sigmoid:s``: the derivative of sigmoid(s·v) at the
    noisy pre-activation v (threshold units). ``ste``: straight-through, derivative 1.
    ``lr``: no derivative of φ at all: the likelihood-ratio estimate of ∇ₓ E[softmax]. ``mean`` and
    ``moments`` (:mod:`glrnet.robustness.moments`: deterministic surrogate networks, no EOT) are not BPDA
    surrogates: :func:`glrnet.robustness.attack_plan` appends them after these,
    :class:`glrnet.robustness.LAPClassifier` takes them. ``x``: an input of the model (default: its example
    input); :func:`choose_surrogates` also says why the others do not apply.
    """
    return choose_surrogates(model, x)[0]


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


def derivative(model: nn.Module, surrogate: str):
    """surrogate → (layer → (v, z) → the backward derivative used in place of φ'(v))."""
    if surrogate == "gauss":
        if not all(isinstance(m.noise, Normal) for m in noisy_layers(model)):
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


def attack_forward(model: nn.Module, x: Tensor, noise: Tensor | None = None, surrogate: str | None = None) -> Tensor:
    """The network's forward for attacks: exact values, the ``surrogate``'s gradient through φ
    (default: ``exact`` for smooth φ, ``gauss`` otherwise). ``noise`` (..., B, Σ widths): the flat noise of
    :func:`glrnet.nn.sample_noise` (a model whose layers run once per pass; :func:`noisy_attack_forward`
    serves every model)."""
    surrogate = surrogate or default_surrogate(model)
    x = bind(model, x)
    if surrogate == "exact":
        return model(x) if noise is None else forward_with_flat_noise(model, x, noise)
    pass_cls = surrogate_pass(model, surrogate)
    if noise is None:
        with pass_cls(noisy_layers(model), 1, x.shape[0]):
            return model(x)
    return forward_with_flat_noise(model, x, noise, injection=pass_cls)


def noisy_attack_forward(model: nn.Module, x: Tensor, samples: int, surrogate: str | None = None,
                         generator: torch.Generator | None = None, repeated: bool | None = None) -> Tensor:
    """``samples`` noisy passes of ``model`` on ``x`` (B, ...) for attacks, output (samples, B, C), the gradient
    through φ by ``surrogate``: flat noise (:func:`attack_forward`) for a model whose noisy layers run once per
    pass; for one whose layers run at every time step (a TimeLoop), noise drawn step by step. ``repeated``:
    which of the two the model is, if known (default: found by a probe, :func:`through_time`)."""
    surrogate = surrogate or default_surrogate(model)
    x = bind(model, x)
    if not (through_time(model, x) if repeated is None else repeated):
        noise = sample_noise(model, samples, len(x), x=x, generator=generator)
        return attack_forward(model, x, noise, surrogate)
    layout = Layout(probe(model, x))
    device = x.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
    draw = PassNoise(layout, get_sampler("iid").for_replications(samples), seed, samples, x)
    cls = TimeInjection if surrogate == "exact" else surrogate_pass(model, surrogate, TimeInjection)
    pr = layout.probe
    injection = cls(pr.layers, samples, len(x), draw, pr.perturbations, layout.active)
    out = noisy_forward(model, x, injection, layout.first)
    return out.reshape(samples, len(x), *out.shape[1:])


def surrogate_pass(model: nn.Module, surrogate: str, base: type = Injection) -> type:
    """The handler class of a noisy pass (``base``: :class:`~glrnet.nn.Injection`, or
    :class:`~glrnet.nn.TimeInjection` through time) whose units back-propagate ``surrogate``'s derivative."""
    return type("SurrogatePass", (SurrogateInjection, base), {"derivative": staticmethod(derivative(model, surrogate))})


class SurrogateInjection(Injection):
    """A noisy pass whose units output φ(v) exactly but back-propagate ``derivative(layer)(v, z)`` in place of
    φ'(v), z the pre-activation without noise (BPDA). Subclasses set ``derivative``: layer → (v, z) → φ'."""

    derivative = None

    def activate(self, i, layer, v, h):
        phi = layer.activation
        if phi is None:
            return v
        carries = self.active if isinstance(self, TimeInjection) else self.noise   # the layers with noise
        z = v if i not in carries else layer.affine(h)
        if z.shape[0] != v.shape[0]:   # the batch grew at this layer: z once per input
            z = z.unsqueeze(0).expand(v.shape[0] // z.shape[0], *z.shape).reshape(v.shape)
        if isinstance(phi, Centered):   # centre by autograd (the chain rule through the mean), then the inner φ's surrogate
            v, z, phi = phi.center(v), phi.center(z), phi.inner
        return _Surrogate.apply(v, z, phi, self.derivative(layer))


def default_surrogate(model: nn.Module) -> str:
    """``exact`` for a model whose activations are all smooth, ``gauss`` otherwise."""
    return "exact" if all(is_smooth(a) for a in activation_names(model)) else "gauss"
