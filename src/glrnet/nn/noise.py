"""Neuron noise r ~ f and its score s(r) = −d log f(r) / dr.

The GLR estimator needs two things from the noise distribution: samples, drawn in place
into preallocated buffers from an explicit ``torch.Generator`` (fast and reproducible),
and the score s. Noise is described by a ``torch.distributions`` object. A family is
*registered* (like ``torch.distributions.kl.register_kl``) with its in-place sampler, its
score and how to rebuild it from its standard deviation; dispatch follows the class's
method resolution order, so a subclass of ``Normal`` uses ``Normal``'s closed forms:

==========================  ====================  ============================
noise f                     score s(r)            in-place sampler
==========================  ====================  ============================
Normal(0, σ)                r / σ²                ``normal_``
Laplace(0, b)               sign(r) / b           inverse CDF of ``uniform_``
Logistic(0, s) (below)      tanh(r / 2s) / s      logit of ``uniform_``
==========================  ====================  ============================

Each closed form is tested against the autograd derivative of ``log_prob``. Any other
zero-centred distribution on the real line with a differentiable density and an
``icdf`` also trains (inverse-CDF sampling, autograd score), more slowly; it can be
saved only once registered with a ``kind`` (:func:`register_noise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.distributions import (AffineTransform, Distribution, Laplace, Normal, SigmoidTransform,
                                 TransformedDistribution, Uniform, constraints)


class Logistic(TransformedDistribution):
    """Logistic(loc, scale): density e^{−z} / (scale (1 + e^{−z})²), z = (x − loc)/scale.

    ``torch.distributions`` has none; this is the standard construction
    loc + scale · logit(U), U ~ Uniform(0, 1). Standard deviation: scale · π / √3.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __init__(self, loc, scale, validate_args=None):
        loc, scale = torch.as_tensor(loc, dtype=torch.get_default_dtype()), torch.as_tensor(
            scale, dtype=torch.get_default_dtype())
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        base = Uniform(torch.zeros_like(self.loc), torch.ones_like(self.loc), validate_args=validate_args)
        super().__init__(base, [SigmoidTransform().inv, AffineTransform(self.loc, self.scale)],
                         validate_args=validate_args)

    @property
    def mean(self):
        return self.loc

    @property
    def stddev(self):
        return self.scale * math.pi / math.sqrt(3)

    def __repr__(self):
        return f"Logistic(loc: {self.loc}, scale: {self.scale})"


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class NoiseFamily:
    """What glrnet knows about a registered noise family (all functions optional but ``kind``)."""

    kind: str                                             # name in configs and on the command line
    from_std: Callable[[float], Distribution]             # the zero-centred member of standard deviation std
    sample_: Callable[[Distribution, Tensor, torch.Generator | None], Tensor] | None = None
    score: Callable[[Distribution, Tensor, Tensor | None], Tensor] | None = None
    linear_score: Callable[[Distribution], float] | None = None   # c with s(r) = c·r, if the score is linear


_FAMILIES: dict[type, NoiseFamily] = {}


def register_noise(cls: type, family: NoiseFamily) -> None:
    """Register a noise family for ``cls`` and its subclasses (later registrations win)."""
    if not (isinstance(cls, type) and issubclass(cls, Distribution)):
        raise TypeError(f"register_noise needs a torch.distributions.Distribution subclass, got {cls!r}")
    _FAMILIES[cls] = family


def family(dist: Distribution) -> NoiseFamily | None:
    """The registered family of ``dist``: the nearest registered class in its MRO, or None."""
    for cls in type(dist).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def _scale(dist: Distribution) -> float:
    return float(dist.scale)


register_noise(Normal, NoiseFamily(
    "gaussian", lambda std: Normal(0.0, float(std)),
    sample_=lambda d, out, g: out.normal_(0.0, _scale(d), generator=g),
    score=lambda d, r, out: torch.mul(r, 1.0 / _scale(d) ** 2, out=out),
    linear_score=lambda d: 1.0 / _scale(d) ** 2))


def _laplace_sample_(d, out, g):
    # torch's Laplace.rsample: −b · sign(u) · log1p(−|u|),  u ~ U(−1, 1)
    out.uniform_(-1.0 + torch.finfo(out.dtype).eps, 1.0, generator=g)
    sign = torch.sign(out)
    return out.abs_().neg_().log1p_().mul_(sign).mul_(-_scale(d))


register_noise(Laplace, NoiseFamily(
    "laplace", lambda std: Laplace(0.0, float(std) / math.sqrt(2)), sample_=_laplace_sample_,
    score=lambda d, r, out: torch.sign(r, out=out).mul_(1.0 / _scale(d))))

register_noise(Logistic, NoiseFamily(
    "logistic", lambda std: Logistic(0.0, float(std) * math.sqrt(3) / math.pi),
    sample_=lambda d, out, g: out.uniform_(torch.finfo(out.dtype).tiny, 1.0, generator=g).logit_().mul_(_scale(d)),
    score=lambda d, r, out: torch.mul(r, 0.5 / _scale(d), out=out).tanh_().mul_(1.0 / _scale(d))))


def kinds() -> tuple[str, ...]:
    """The registered families' names (``make_noise`` kinds), in registration order."""
    return tuple(dict.fromkeys(f.kind for f in _FAMILIES.values()))



def make_noise(kind: str = "gaussian", std: float = 2.0) -> Distribution:
    """Zero-centred noise of a registered family with standard deviation ``std``.

    ``std`` is the standard deviation for every family (Laplace scale std/√2, logistic
    scale std·√3/π), so that families are compared at equal variance.
    """
    if not std > 0:
        raise ValueError(f"noise standard deviation must be > 0, got {std}")
    for fam in _FAMILIES.values():
        if fam.kind == kind:
            return fam.from_std(std)
    raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(kinds())}")


def describe(dist: Distribution) -> dict:
    """A JSON-able description that :func:`make_noise` turns back into ``dist``; a ``ValueError``
    for a distribution no registered family can rebuild (refused at save time, not at load)."""
    fam = family(dist)
    desc = None if fam is None else {"kind": fam.kind, "std": float(dist.stddev)}
    if desc is None or type(fam.from_std(desc["std"])) is not type(dist):
        raise ValueError(f"noise {type(dist).__name__} cannot be saved: register it with "
                         "glrnet.noise.register_noise(cls, NoiseFamily(kind, from_std, ...)) first")
    return desc


def validate_noise(dist: Distribution) -> Distribution:
    """Check that ``dist`` is a scalar, zero-centred distribution on ℝ with a differentiable density."""
    if not isinstance(dist, Distribution):
        raise ValueError(f"noise must be a torch.distributions.Distribution, got {type(dist).__name__}")
    if dist.batch_shape != torch.Size() or dist.event_shape != torch.Size():
        raise ValueError(f"noise must be a scalar distribution (one draw per neuron), got batch shape "
                         f"{tuple(dist.batch_shape)} and event shape {tuple(dist.event_shape)}")
    if dist.support is not constraints.real:
        raise ValueError(
            f"noise {dist!r} has no differentiable density on the real line (support {dist.support}); "
            "GLR needs the score −d log f/dr, so use Normal, Laplace or Logistic noise")
    centre = getattr(dist, "loc", None)
    if centre is None:
        centre = dist.mean
    if not torch.all(torch.as_tensor(centre) == 0):
        raise ValueError(f"noise must be zero-centred, got location {float(centre):g} for {dist!r}")
    fam = family(dist)
    if (fam is None or fam.sample_ is None) and not _has_icdf(dist):
        raise ValueError(f"noise {type(dist).__name__} has no registered sampler and no icdf")
    return dist


def is_symmetric(dist: Distribution) -> bool:
    """Whether f(r) = f(−r), checked on a grid of ±(0.1 … 10) standard deviations."""
    t = torch.logspace(-1, 1, 9, dtype=torch.float64) * float(dist.stddev)
    return bool(torch.allclose(dist.log_prob(t.to(torch.get_default_dtype())).double(),
                               dist.log_prob(-t.to(torch.get_default_dtype())).double(), rtol=1e-5, atol=1e-6))


def _has_icdf(dist: Distribution) -> bool:
    try:
        dist.icdf(torch.tensor(0.5))
    except NotImplementedError:
        return False
    return True


def sample_(dist: Distribution, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``out`` in place with i.i.d. draws of ``dist`` from ``generator``; returns ``out``."""
    fam = family(dist)
    if fam is not None and fam.sample_ is not None:
        return fam.sample_(dist, out, generator)
    out.uniform_(torch.finfo(out.dtype).tiny, 1.0, generator=generator)
    return out.copy_(dist.icdf(out))


def icdf_(dist: Distribution, u: Tensor) -> Tensor:
    """Overwrite uniforms ``u`` in (0, 1) with F⁻¹(u) (quasi-Monte Carlo noise)."""
    return u.copy_(dist.icdf(u))


def score(dist: Distribution, r: Tensor, out: Tensor | None = None) -> Tensor:
    """s(r) = −d log f(r) / dr, elementwise (closed form where registered, autograd otherwise)."""
    fam = family(dist)
    if fam is not None and fam.score is not None:
        return fam.score(dist, r, out)
    return score_autograd(dist, r) if out is None else out.copy_(score_autograd(dist, r))


def linear_score_scale(dist: Distribution) -> float | None:
    """c if s(r) = c·r (Normal: 1/σ²), else None; the estimator then reuses r as its score."""
    fam = family(dist)
    return None if fam is None or fam.linear_score is None else fam.linear_score(dist)


def score_autograd(dist: Distribution, r: Tensor) -> Tensor:
    """−d log f(r)/dr by autograd on ``dist.log_prob``; the reference for the closed forms."""
    with torch.enable_grad():
        r = r.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(dist.log_prob(r).sum(), r)
    return -grad


def same_noise(a: Distribution, b: Distribution) -> bool:
    """Whether two noise objects are the same distribution (one draw can serve both)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    return float(a.stddev) == float(b.stddev) and float(a.mean) == float(b.mean)
