"""Certified L2 robustness of noisy networks: the seed's thesis as a claim proven per image.

A glrnet network whose first noisy layer is affine in the input (linear or convolutional,
nothing before it) with Gaussian noise N(0, σ²) is, as a function of u = W₁x + b₁, a Gaussian
smoothing: for every class c

    p_c(u) = E_r[ h_c(u + r) ],   r ~ N(0, σ² I),   h_c ∈ [0, 1],

whatever the later layers, activations and noise are (h_c averages them out: h_c = P[the rest
votes c] for the majority vote, E[softmax_c] for LAP). For any such smoothing Φ⁻¹(p_c(u)) is
1/σ-Lipschitz in u (Cohen, Rosenfeld & Kolter 2019, Thm 1; Salman et al. 2019, Lemma 2), and
‖W₁δ‖₂ ≤ ‖W₁‖₂ ‖δ‖₂. So if p_A ≥ p̲_A and max_{c≠A} p_c ≤ p̄_B at x, the prediction A holds on

    ‖δ‖₂ < R = σ / (2‖W₁‖₂) · (Φ⁻¹(p̲_A) − Φ⁻¹(p̄_B)),

and with p̄_B = 1 − p̲_A (majority vote, two-sided in one bound) R = σ/‖W₁‖₂ · Φ⁻¹(p̲_A).
‖W₁‖₂ is the exact operator norm of the first layer's linear map (SVD of its dense matrix,
in float64). Only noise on the first layer's *units* (activity site) makes u + r a Gaussian
smoothing of u; noise on its weights (sites weight, flipout, channel) is refused.

The bounds are Monte Carlo confidence bounds, every certificate at level 1 − α overall: CERTIFY
(Cohen et al.) draws ``n0`` samples to select A and ``n`` fresh ones to bound its probability.

* vote: p̲_A by Clopper–Pearson at level α, and p̄_B = 1 − p̲_A.
* lap: the averages of the softmax over the ``n`` passes, each class's in [0, 1], by Hoeffding
  (P[mean − p ≥ t] ≤ exp(−2nt²)). α is split over the bounds that a certificate rests on: α/2 for
  p̲_A = mean_A − √(ln(2/α) / 2n), and α/(2(C − 1)) for each of the C − 1 other classes,
  p_c ≤ mean_c + √(ln(2(C − 1)/α) / 2n); so with probability ≥ 1 − α (union bound) all C bounds
  hold at once. On that event two upper bounds of the runner-up hold, the max over the other
  classes and 1 − p̲_A (the averaged probabilities sum to 1), and the smaller is taken:
  p̄_B = min(max_{c≠A} (mean_c + t_B), 1 − p̲_A), still at level α.

An image whose bound does not clear p̄_B (vote: 1/2) abstains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from .estimators.samplers import IID
from .nn.injection import Layout, check_batch, noisy_forward, probe
from .nn.intercept import record_preactivations
from .nn.layers import NoisyLayer


@dataclass
class Certificate:
    """Per image: the prediction (−1: abstain), the certified L2 radius (0 if abstaining), the
    bound(s) it rests on."""

    prediction: Tensor        # (N,) long
    radius: Tensor            # (N,) float64
    p_lower: Tensor           # (N,) lower bound of p_A
    p_upper_other: Tensor     # (N,) upper bound of the runner-up (1 − p_lower for the vote)
    sigma: float
    first_layer_norm: float
    predictor: str
    alpha: float
    samples: int


def noise_site(layer: NoisyLayer) -> str:
    """Where a noisy layer's noise enters: ``"activity"`` (its units), or ``"weight"``, ``"flipout"``,
    ``"channel"`` (its parameters): its perturbation's name, the one place that reads it."""
    return layer.perturbation.name


def first_layer(model: nn.Module, x: Tensor) -> NoisyLayer:
    """The first noisy layer in execution order, checked to see the input itself (so that
    u = W₁x + b₁) and to carry Gaussian noise on its units (activity site); a ``ValueError``
    naming what fails."""
    pr = probe(model, x)
    if pr.repeated:
        raise ValueError("certify: the model applies its noisy layers at every step of a sequence (a network through "
                         "time); its radius is σ/‖W_in‖₂ · Φ⁻¹(p) when each input is seen once and σ/(√T‖W_in‖₂) · "
                         "Φ⁻¹(p) when the same input repeats (docs/results/snn: the argument and certify_rows.py); "
                         "glrnet.certify covers networks whose noisy layers run once per input")
    layer = pr.layers[pr.order[0]]
    with torch.no_grad():
        h = record_preactivations(model, x[:1]).inputs[layer]
    if h.numel() != x[:1].numel() or not torch.equal(h.reshape(-1), x[:1].reshape(-1)):
        raise ValueError("certify: the first noisy layer must see the input itself (no module before it), so that "
                         "its pre-activation is W₁x + b₁")
    if type(layer.noise) is not Normal and not isinstance(layer.noise, Normal):
        raise ValueError(f"certify: the first noisy layer's noise must be Gaussian, got {layer.noise}")
    if noise_site(layer) != "activity":
        raise ValueError(f"certify: the first noisy layer carries its noise on its weights (site "
                         f"{noise_site(layer)!r}); the certified radius σ/‖W₁‖₂ · Φ⁻¹(p) holds only for Gaussian "
                         "noise on its units (activity site): certify a network trained without weight noise on its "
                         "first layer")
    return layer


@torch.no_grad()
def first_layer_norm(layer: NoisyLayer, input_shape: tuple[int, ...]) -> float:
    """‖W₁‖₂: the largest singular value of the layer's linear map on inputs of ``input_shape``
    (exact: the SVD of its dense matrix, built by applying the map to the identity basis)."""
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()
    d = math.prod(input_shape)
    eye = torch.eye(d, dtype=torch.float64, device=layer.weight.device).reshape(d, *input_shape)
    weight = layer.weight.detach().double()
    cols = torch.nn.functional.conv2d(eye, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return torch.linalg.matrix_norm(cols.reshape(d, -1), ord=2).item()


def clopper_pearson_lower(successes: Tensor, n: int, alpha: float) -> Tensor:
    """One-sided (1 − α) lower confidence bound of a binomial proportion (exact, Clopper–Pearson)."""
    from scipy.stats import beta
    k = successes.double().cpu().numpy()
    lower = beta.ppf(alpha, k, n - k + 1)
    lower[k == 0] = 0.0
    return torch.as_tensor(lower, dtype=torch.float64)


@torch.no_grad()
def _sample(model: nn.Module, x: Tensor, samples: int, predictor: str, generator, chunk: int) -> Tensor:
    """(N, C): per image, the vote counts (``vote``) or the summed softmax (``lap``) over ``samples``
    noisy passes (every noisy layer noisy)."""
    layout = Layout(probe(model, x))
    total = torch.zeros(len(x), layout.probe.classes, dtype=torch.float64, device=x.device)
    buf = torch.empty(chunk, len(x), layout.width, dtype=x.dtype, device=x.device)
    for k0 in range(0, samples, chunk):
        k = min(chunk, samples - k0)
        r = layout.fill_(IID(), buf[:k], generator)
        out = noisy_forward(model, x, layout.injection(k, len(x), r), layout.first)
        out = out.reshape(k, len(x), -1)
        if predictor == "vote":
            total += torch.nn.functional.one_hot(out.argmax(-1), out.shape[-1]).sum(0).double()
        else:
            total += torch.softmax(out.double(), -1).sum(0)
    return total


def certify(model: nn.Module, x: Tensor, n0: int = 100, n: int = 10000, alpha: float = 0.001,
            predictor: str = "vote", generator: torch.Generator | None = None,
            memory_budget_mb: float = 256.0) -> Certificate:
    """CERTIFY (Cohen et al. 2019) for every image of ``x``: select the class with ``n0`` noisy
    passes, bound its probability with ``n`` fresh ones at confidence 1 − ``alpha``, and give the
    certified L2 radius in input space (module docstring). ``predictor``: ``"vote"`` (the
    majority vote of noisy passes) or ``"lap"`` (the argmax of the averaged softmax)."""
    if predictor not in ("vote", "lap"):
        raise ValueError(f"unknown predictor {predictor!r}; valid: vote, lap")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be ≥ 1, got {n0} and {n}")
    x = check_batch(model, x)
    layer = first_layer(model, x)
    sigma = float(layer.noise.stddev)
    norm = first_layer_norm(layer, tuple(x.shape[1:]))
    width = Layout(probe(model, x)).width
    chunk = max(1, min(n, int(memory_budget_mb * 2**20) // max(1, 4 * len(x) * width * x.element_size())))
    selection = _sample(model, x, n0, predictor, generator, chunk)
    top = selection.argmax(1)
    estimate = _sample(model, x, n, predictor, generator, chunk)
    std_normal = torch.distributions.Normal(0.0, 1.0)
    if predictor == "vote":
        p_lower = clopper_pearson_lower(estimate.gather(1, top[:, None]).squeeze(1), n, alpha)
        p_other = 1.0 - p_lower
        ok = p_lower > 0.5
        gap = std_normal.icdf(p_lower.clamp(1e-300, 1 - 1e-16))
    else:
        p_lower, p_other = lap_bounds(estimate.cpu() / n, top.cpu(), n, alpha)
        ok = p_lower > p_other
        gap = (std_normal.icdf(p_lower.clamp(1e-300, 1 - 1e-16)) -
               std_normal.icdf(p_other.clamp(1e-300, 1 - 1e-16))) / 2
    radius = torch.where(ok, sigma / norm * gap, torch.zeros_like(gap))
    prediction = torch.where(ok, top.cpu(), torch.full_like(top.cpu(), -1))
    return Certificate(prediction, radius, p_lower, p_other, sigma, norm, predictor, alpha, n)


def lap_bounds(mean: Tensor, top: Tensor, n: int, alpha: float) -> tuple[Tensor, Tensor]:
    """LAP's bounds at level 1 − ``alpha`` overall (module docstring): from the (N, C) averages of ``n``
    softmax vectors and the selected classes ``top``, p̲_A (Hoeffding at α/2) and p̄_B = the smaller of
    max_{c≠A} (mean_c + Hoeffding at α/(2(C − 1)) each) and 1 − p̲_A."""
    classes = mean.shape[1]
    slack_a = math.sqrt(math.log(2.0 / alpha) / (2.0 * n))
    slack_b = math.sqrt(math.log(2.0 * max(1, classes - 1) / alpha) / (2.0 * n))
    p_lower = (mean.gather(1, top[:, None]).squeeze(1) - slack_a).clamp(0, 1)
    other = mean.scatter(1, top[:, None], -math.inf).amax(1)
    p_other = torch.minimum((other + slack_b).clamp(0, 1), 1 - p_lower)
    return p_lower, p_other


def certified_accuracy(cert: Certificate, y: Tensor, radii) -> dict[float, float]:
    """Fraction of images predicted correctly with a certified radius ≥ r, for each r."""
    y = y.cpu()
    return {float(r): ((cert.prediction == y) & (cert.radius >= r)).double().mean().item() for r in radii}


@torch.no_grad()
def project_spectral_norm_(layer: nn.Module, max_norm: float, input_shape: tuple[int, ...] | None = None) -> float:
    """Scale the layer's weight so that its operator norm is at most ``max_norm`` (after an optimizer
    step: a projection onto the constraint set). Returns the norm before."""
    norm = first_layer_norm(layer, input_shape or ())
    if norm > max_norm:
        layer.weight.mul_(max_norm / norm)
    return norm


@torch.no_grad()
def project_stiefel_(layer: nn.Module, scale: float, input_shape: tuple[int, ...] | None = None) -> float:
    """Replace a linear layer's weight W = U S Vᵀ by its nearest matrix (Frobenius) whose singular values
    all equal ``scale``: c·U Vᵀ (the polar factor; after an optimizer step, a projection onto the scaled
    Stiefel manifold). The certificate then loses nothing to ‖W₁‖₂: the noise N(0, σ²) on W₁x is, in
    the row space of W₁, input noise N(0, (σ/c)²) exactly (input-space smoothing). Returns ‖W‖₂ before."""
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"the stiefel projection needs a linear first layer, got {type(layer).__name__}; "
                         "use the spectral projection for convolutions")
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    layer.weight.copy_((scale * (u @ vh)).to(layer.weight.dtype))
    return s[0].item()
