"""Noisy spiking layers: leaky integrate-and-fire neurons and a non-spiking leaky integrator readout.

Named as snntorch names them (``Leaky(beta, threshold, reset_mechanism)``, ``spike_grad=``), batch first.
Inside a noisy pass each step's membrane carries fresh noise r_t ~ f, and the spike is a hard threshold:

    u_t = β·u_{t−1} − θ·s_{t−1} + W_in x_t + W_rec s_{t−1} + b + r_t      (reset_mechanism="subtract")
    u_t = β·u_{t−1}·(1 − s_{t−1}) + W_in x_t + W_rec s_{t−1} + b + r_t   (reset_mechanism="zero")
    s_t = 1[u_t > θ],    u_0 = 0, s_0 = 0.

GLR differentiates none of it: given the past, u_t is an affine map of [x_t; s_{t−1}] plus noise, and the
estimator needs only that map and the noise's score (DESIGN §10). ``spike_grad`` is used by
back-propagation through time and forward gradients only: the surrogate derivative of the step
(default :class:`FastSigmoid`, 1/(1 + k|u − θ|)², k = 25, snntorch's default); as in snntorch the reset
is detached from the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from .layers import PerturbationLike
from .containers import register_saved_type
from .recurrent import StepLayer, match_rows

RESET_MECHANISMS = ("subtract", "zero", "none")


class _FastSigmoidStep(torch.autograd.Function):
    """Heaviside 1[u > 0] forward; 1/(1 + k|u|)² as its derivative, backward and forward mode."""

    @staticmethod
    def forward(u, slope):
        return torch.gt(u, 0).to(u.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, slope = inputs
        ctx.save_for_backward(u)
        ctx.save_for_forward(u)
        ctx.slope = slope

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad / (ctx.slope * u.abs() + 1) ** 2, None

    @staticmethod
    def jvp(ctx, tangent, _):
        (u,) = ctx.saved_tensors
        return tangent / (ctx.slope * u.abs() + 1) ** 2


def _differentiated(u: Tensor) -> bool:
    return (torch.is_grad_enabled() and u.requires_grad) or torch.autograd.forward_ad.unpack_dual(u).tangent is not None


class FastSigmoid:
    """Surrogate spike: the step 1[u > 0] forward, derivative 1/(1 + k|u|)² (Zenke & Ganguli 2018; snntorch's
    ``surrogate.fast_sigmoid``, default slope k = 25) for back-propagation and forward-mode derivatives."""

    def __init__(self, slope: float = 25.0):
        if not slope > 0:
            raise ValueError(f"surrogate slope must be > 0, got {slope}")
        self.slope = float(slope)

    def __call__(self, u: Tensor) -> Tensor:
        if _differentiated(u):
            return _FastSigmoidStep.apply(u, self.slope)
        return torch.gt(u, 0, out=torch.empty_like(u))     # written straight into u's dtype (no bool tensor)

    def __repr__(self) -> str:
        return f"FastSigmoid(slope={self.slope:g})"


class Leaky(StepLayer):
    """Noisy leaky integrate-and-fire neurons (module docstring): (B, T, in) → spikes (B, T, out) alone, one
    step at a time in a :class:`~glrnet.nn.recurrent.TimeLoop`.

    Args:
        in_features, out_features: inputs per step and neurons.
        beta: membrane decay per step, in [0, 1].
        threshold: θ > 0.
        reset_mechanism: ``"subtract"`` (snntorch's default), ``"zero"`` or ``"none"``.
        recurrent: the previous step's spikes are an input (``recurrent_weight``; snntorch's ``RLeaky``).
        noise: the density of the membrane noise r_t (default Normal(0, 2), glrnet's; choose σ relative to θ).
        perturbation: where the noise enters (activity: the membrane; ``"weight"``: one draw of the
            parameters per replication, held over the sequence; any registered perturbation).
        spike_grad: the surrogate derivative for back-propagation through time (default FastSigmoid(25)).
    """

    def __init__(self, in_features: int, out_features: int, beta: float = 0.9, threshold: float = 1.0,
                 reset_mechanism: str = "subtract", recurrent: bool = False, bias: bool = True,
                 noise: Distribution | None = None, perturbation: PerturbationLike = None, spike_grad=None,
                 site: str | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, recurrent, bias, None, noise, perturbation, site, device, dtype)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if reset_mechanism not in RESET_MECHANISMS:
            raise ValueError(f"unknown reset_mechanism {reset_mechanism!r}; valid: {', '.join(RESET_MECHANISMS)}")
        self.beta, self.threshold, self.reset_mechanism = float(beta), float(threshold), reset_mechanism
        self.spike_grad = spike_grad if spike_grad is not None else FastSigmoid()

    def leak(self, u: Tensor, s: Tensor) -> Tensor:
        """What the membrane keeps from step t − 1: β·u − θ·s, β·u·(1 − s) or β·u (s detached)."""
        s = s.detach()
        if self.reset_mechanism == "subtract":
            return self.beta * u - self.threshold * s
        if self.reset_mechanism == "zero":
            return self.beta * u * (1 - s)
        return self.beta * u

    def step(self, x, state):
        u, s = state if state is not None else (None, None)
        v = self.preactivation(self.step_input(x, s))         # W [x_t; s_{t−1}] + b (+ r_t)
        if u is not None:
            rows = max(u.shape[0], v.shape[0])
            v = self.leak(match_rows(u, rows), match_rows(s, rows)) + match_rows(v, rows)
        s = self.spike_grad(v - self.threshold)
        return s, (v, s)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta={self.beta:g}, threshold={self.threshold:g}, "
                f"reset_mechanism={self.reset_mechanism!r}")

    def config(self) -> dict:
        return {**super().config(), "beta": self.beta, "threshold": self.threshold,
                "reset_mechanism": self.reset_mechanism}


class LeakyIntegrator(StepLayer):
    """Non-spiking leaky integrator, the usual readout of a spiking network: u_t = β·u_{t−1} + W x_t + b + r_t,
    u_0 = 0; its output at every step is the membrane u_t (read out by the mean over steps or the last)."""

    def __init__(self, in_features: int, out_features: int, beta: float = 0.9, bias: bool = True,
                 noise: Distribution | None = None, perturbation: PerturbationLike = None, site: str | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, False, bias, None, noise, perturbation, site, device, dtype)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def step(self, x, state):
        v = self.preactivation(x)
        if state is not None:
            rows = max(state.shape[0], v.shape[0])
            v = self.beta * match_rows(state, rows) + match_rows(v, rows)
        return v, v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta:g}"

    def config(self) -> dict:
        return {**super().config(), "beta": self.beta}


register_saved_type("Leaky", Leaky)
register_saved_type("LeakyIntegrator", lambda recurrent=False, **kw: LeakyIntegrator(**kw))
