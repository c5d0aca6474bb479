"""Activation functions φ, including the discontinuous ones GLR can train.

GLR never differentiates φ, so any tensor → tensor function works. The registered
names are the seed's five activations plus ``relu`` and ``identity``. Every one is
defined finitely everywhere, including its singular point (probability zero under
continuous noise, but a value must exist):

============================  ==============================  =====================
name                          φ(x)                            at the singular point
============================  ==============================  =====================
``sigmoid`` / ``sigmoid:s``   1 / (1 + exp(−s·x)), s = 1      —
``threshold``                 1[x > 0]                        φ(0) = 0
``abs``                       |x|                             —
``arctan_inv``                arctan(1 / x)                   φ(0) = π/2 (right limit)
``log_abs_minus_x``           ln|x| − x                       |x| clamped at the dtype's
                                                              smallest normal: ln(tiny)
``relu``                      max(x, 0)                       —
``identity``                  x                               —
============================  ==============================  =====================
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

Activation = Callable[[Tensor], Tensor]
ActivationLike = Union[str, Activation, None]


class Sigmoid:
    """Logistic sigmoid with slope ``s``: φ(x) = 1 / (1 + exp(−s·x)). Large s → threshold."""

    def __init__(self, slope: float = 1.0):
        if not slope > 0:
            raise ValueError(f"sigmoid slope must be > 0, got {slope}")
        self.slope = float(slope)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x if self.slope == 1.0 else self.slope * x)

    def __repr__(self) -> str:
        return "sigmoid" if self.slope == 1.0 else f"sigmoid:{self.slope:g}"


class Centered:
    """φ(v − v̄): each input's pre-activation centred on its own mean before φ — over the positions of each
    channel for a convolution's (N, C, H, W) map (instance-norm centring), over the units for a dense
    layer's (N, F) — a parameter-free normalisation of the pre-activation: a channel cannot fall silent
    (fire for no input) or stay always on. Not elementwise; the likelihood ratio needs nothing of φ, so
    GLR's activity and weight sites apply unchanged. Name: ``centered:<activation>``."""

    def __init__(self, inner: "ActivationLike"):
        self.inner = get_activation(inner)

    def mean(self, v: Tensor) -> Tensor:
        return v.mean(tuple(range(2, v.dim())) if v.dim() > 2 else -1, keepdim=True)

    def center(self, v: Tensor) -> Tensor:
        return v - self.mean(v)

    def __call__(self, v: Tensor) -> Tensor:
        if self.inner is threshold:      # 1[v − v̄ > 0] = 1[v > v̄] exactly in floating point: no centred copy
            return torch.gt(v, self.mean(v), out=torch.empty_like(v))
        return self.inner(self.center(v))

    def __repr__(self) -> str:
        return f"centered:{activation_name(self.inner)}"


def threshold(x: Tensor) -> Tensor:
    """Heaviside step 1[x > 0] (φ(0) = 0), in x's dtype.

    Written straight into a float tensor: ``(x > 0).to(x.dtype)`` goes through a bool tensor
    and a conversion, about 10× slower on a CPU (it is a large part of a threshold CNN's forward)."""
    return torch.gt(x, 0, out=torch.empty_like(x))


def abs_(x: Tensor) -> Tensor:
    return x.abs()


def arctan_inv(x: Tensor) -> Tensor:
    """arctan(1/x); jumps from −π/2 to π/2 at 0, where it is defined as π/2."""
    return torch.where(x == 0, torch.full_like(x, math.pi / 2), torch.atan(1.0 / x))


def log_abs_minus_x(x: Tensor) -> Tensor:
    """ln|x| − x, with |x| clamped below at the dtype's smallest normal number."""
    return torch.log(x.abs().clamp_min(torch.finfo(x.dtype).tiny)) - x


def relu(x: Tensor) -> Tensor:
    return torch.relu(x)


def identity(x: Tensor) -> Tensor:
    return x


for _f, _name in [(threshold, "threshold"), (abs_, "abs"), (arctan_inv, "arctan_inv"),
                  (log_abs_minus_x, "log_abs_minus_x"), (relu, "relu"), (identity, "identity")]:
    _f.__name__ = _name

ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Sigmoid(1.0),
    "threshold": threshold,
    "abs": abs_,
    "arctan_inv": arctan_inv,
    "log_abs_minus_x": log_abs_minus_x,
    "relu": relu,
    "identity": identity,
}

#: activations for which back-propagation through noise gives the right gradient
SMOOTH = {"sigmoid", "relu", "identity", "abs"}


def get_activation(spec: ActivationLike) -> Activation:
    """Resolve a registered name (``"sigmoid:4"`` gives slope 4) or pass a callable through."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"activation must be a name or a callable, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name == "centered" and arg:
        return Centered(arg)
    if name == "sigmoid" and arg:
        try:
            return Sigmoid(float(arg))
        except ValueError as e:
            raise ValueError(f"bad sigmoid slope in activation {spec!r}: {e}") from None
    if arg or name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {spec!r}; valid: {', '.join(ACTIVATIONS)} (or 'sigmoid:<slope>', "
            "'centered:<activation>')")
    return ACTIVATIONS[name]


def activation_name(act: Activation) -> str:
    """The registry name of an activation (its repr for Sigmoid, __name__ otherwise)."""
    return repr(act) if isinstance(act, (Sigmoid, Centered)) else getattr(act, "__name__", repr(act))


def is_step(act: ActivationLike) -> bool:
    """True for the threshold, centred or not (back-propagation through it gives zero gradients)."""
    name = act if isinstance(act, str) else activation_name(act)
    return name.split(":")[-1] == "threshold"


def is_smooth(act: ActivationLike) -> bool:
    """True for the registered activations (any sigmoid slope included) that autograd differentiates correctly."""
    name = act if isinstance(act, str) else activation_name(act)
    return name.partition(":")[0] in SMOOTH
