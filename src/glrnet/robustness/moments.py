"""Deterministic surrogates of a noisy network's expected output, for attacks that need no expectation
over transformation (EOT): one differentiable pass where the noisy network needs many.

* :func:`mean_field_forward` — each noisy unit replaced by its expectation over its own noise given a
  noise-free input, E[φ(z + r)]: Φ(z/s) for a threshold unit, s the standard deviation of the noise on
  its pre-activation (σ for activity noise, σ‖(patch, 1)‖ for parameter noise). Any module.
* :func:`moment_forward` — moment propagation (assumed-density filtering: Wang & Manning 2013, Gast & Roth
  2018): each layer's output carried as a mean and a variance, inputs of a unit independent, its
  pre-activation Gaussian; threshold units are Bernoulli(Φ(μ/s)), and the maximum over a pooling window of
  independent Bernoulli units is Bernoulli(1 − Π(1 − pᵢ)). The noise of earlier layers reaches later
  ones, which the mean field averages away. Sequential networks of noisy linear / convolutional layers,
  max- and average-pooling and flattening; anything else is a ``ValueError`` naming the module.

Both are attack surrogates, not predictors: the defended predictor is always evaluated on its own noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.activations import Centered, activation_name
from ..nn.injection import bind
from ..nn.intercept import intercept
from ..nn.layers import NoisyLayer
from .surrogates import example_input, gauss_expectation, through_time


def smoothed(phi, z: Tensor, sigma: float | Tensor) -> Tensor:
    """E[φ(z + r)], r ~ N(0, σ²): Φ(z/σ) for the threshold, Gauss–Hermite quadrature (64 nodes) otherwise."""
    if activation_name(phi) == "threshold":
        return torch.special.ndtr(z / sigma)
    return gauss_expectation(lambda r: phi(z + r), sigma, z)


def _noise_variance(layer: NoisyLayer, h2: Tensor) -> Tensor | float:
    """The variance of ``layer``'s own noise on each pre-activation unit, given E[h²] of its input: σ² for
    activity noise; for parameter noise (i.i.d., variance σ², on every weight and bias) σ²·layer(E[h²];
    weights 1) — the channel site's while its channel is the one drawn."""
    try:
        return layer.perturbation.preactivation_variance(layer, h2)
    except NotImplementedError:
        raise ValueError(f"moment surrogates have no rule for perturbation {layer.perturbation.name!r}") from None


def _unit(layer: NoisyLayer, mean: Tensor, var: Tensor | float) -> tuple[Tensor, Tensor, bool]:
    """(mean, variance, binary) of φ(v), v ~ N(mean, var) (elementwise); the channel site moves one of the O
    output channels per replication, so its units see the noise with probability 1/O."""
    phi = layer.activation
    if phi is None:
        return mean, torch.as_tensor(var, dtype=mean.dtype).expand_as(mean), False
    if isinstance(phi, Centered):   # centre the mean (the centred noise r − r̄ ≈ r over many positions)
        mean, phi = phi.center(mean), phi.inner
    s = torch.as_tensor(var, dtype=mean.dtype).clamp_min(1e-24).sqrt()
    m = smoothed(phi, mean, s)
    binary = activation_name(phi) == "threshold"
    m2 = m if binary else smoothed(lambda u: phi(u) ** 2, mean, s)
    q = layer.perturbation.perturbed_fraction(layer)
    if q < 1:
        fixed = phi(mean).detach()
        m, m2 = m * q + fixed * (1 - q), m2 * q + fixed ** 2 * (1 - q)
    return m, (m2 - m * m).clamp_min(0), binary


class _MeanField:
    """The handler (:mod:`glrnet.nn.intercept`) of the mean-field network."""

    def apply(self, layer: NoisyLayer, h: Tensor) -> Tensor:
        return _unit(layer, layer.affine(h), _noise_variance(layer, h * h))[0]


def mean_field_forward(model: nn.Module, x: Tensor) -> Tensor:
    """The mean-field network's output on ``x`` (deterministic, differentiable for any φ)."""
    with intercept(_MeanField()):
        return model(bind(model, x))


def pair(v) -> tuple[int, int]:
    """A pooling size as (height, width)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_moments(pool: nn.Module, m: Tensor, v: Tensor, binary: bool) -> tuple[Tensor, Tensor, bool]:
    if isinstance(pool, nn.AvgPool2d):   # a linear map (variances through its squared weights); not binary
        area = math.prod(pair(pool.kernel_size))
        return pool(m), pool(v) / area, False
    if not binary:
        raise ValueError("moment propagation through max-pooling needs binary (threshold) inputs; "
                         "use the 'mean' surrogate")
    k = pair(pool.kernel_size)
    if pair(pool.stride) != k or pool.padding not in (0, (0, 0)) or pool.ceil_mode:
        raise ValueError(f"moment propagation needs non-overlapping max-pooling without padding, got {pool}")
    # the maximum of independent Bernoulli(pᵢ) is Bernoulli(1 − Π(1 − pᵢ))
    log_q = torch.nn.functional.avg_pool2d(torch.log1p(-m.clamp(max=1 - 1e-7)), k) * (k[0] * k[1])
    p = -torch.expm1(log_q)
    return p, p * (1 - p), True


def moment_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of each output unit by moment propagation (see the module's docstring); a
    ``ValueError`` for a model that is not an ``nn.Sequential`` (its forward is not a walk over its modules)."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"moment propagation walks the modules of an nn.Sequential; {type(model).__name__} "
                         "computes its own forward")
    m = bind(model, x)
    m, v, _ = _propagate(model, m, torch.zeros_like(m), False)
    return m, v


def _propagate(modules: nn.Sequential, m: Tensor, v: Tensor, binary: bool) -> tuple[Tensor, Tensor, bool]:
    for module in modules:
        if isinstance(module, NoisyLayer):
            # Var[θᵀh] = Σ θ² Var[h] for independent inputs: the layer with squared weights and no bias
            sq = [p.reshape(-1) ** 2 for p in module.parameters(recurse=False)]
            if module.bias is not None:
                sq[-1] = torch.zeros_like(sq[-1])
            var = module.weight_effect(v, torch.cat(sq)[None], 1, len(v))[0]
            m, v, binary = _unit(module, module.affine(m), var + _noise_variance(module, m * m + v))
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):   # glrnet.layers.MaxPool2d is an nn.MaxPool2d
            m, v, binary = _pool_moments(module, m, v, binary)
        elif isinstance(module, nn.Flatten):
            m, v = module(m), module(v)
        elif type(module) is nn.Sequential:
            m, v, binary = _propagate(module, m, v, binary)
        elif not isinstance(module, nn.Identity):
            raise ValueError(f"moment propagation has no rule for {type(module).__name__}; use the 'mean' surrogate")
    return m, v, binary


def moment_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits for the moment surrogate: the output mean scaled by 1/√(1 + π v/8), the probit approximation
    of E[softmax(μ + √v ε)] (MacKay 1992), so that a class whose score is uncertain counts for less."""
    m, v = moment_forward(model, x)
    return m / torch.sqrt(1 + math.pi * v / 8)


def choose_deterministic(model: nn.Module, x: Tensor | None = None) -> tuple[list[str], dict[str, str]]:
    """(the deterministic surrogates that apply to ``model``, {surrogate: why not}): ``mean`` and ``moments``,
    each tried on one input (``x[:1]``, default the model's example input)."""
    x = example_input(model, x)
    if through_time(model, x):
        why = ("the {} surrogate treats each noisy layer as applied once per pass; a layer applied at every "
               "time step carries a state between its applications")
        return [], {"mean": why.format("mean-field"), "moments": why.format("moment")}
    out, skipped = [], {}
    for name, forward in (("mean", mean_field_forward), ("moments", moment_forward)):
        try:
            with torch.no_grad():
                forward(model, x)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        out.append(name)
    return out, skipped


def deterministic_surrogates(model: nn.Module, x: Tensor | None = None) -> list[str]:
    """The deterministic surrogates that apply to ``model``: ``mean`` (Gaussian unit noise) and ``moments``
    (the modules :func:`moment_forward` has rules for), tried on ``x[:1]`` (default: the model's example
    input); :func:`choose_deterministic` also says why the others do not."""
    return choose_deterministic(model, x)[0]
