"""How large is the neurons' noise next to their signal? (per layer, on real inputs)

GLR trains the network *with* noise r ~ f of fixed scale σ. Training is free to grow the
weights until σ hardly matters: a first layer with spectral norm ~100 on [0, 1] images
makes pre-activations of tens to hundreds, against σ = 2. This module measures, per
layer t, the RMS of the noise-free pre-activation z⁽ᵗ⁾ = W⁽ᵗ⁾x⁽ᵗ⁾ + b⁽ᵗ⁾ over a batch,
the noise's standard deviation σ and their ratio, plus the spectral norm of W⁽ᵗ⁾ and the
fraction of units whose |z| < σ (where the noise can still flip a threshold unit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch import nn

from .nn.injection import bind
from .nn.intercept import record_preactivations
from .nn.modules import noisy_layers

NOISE_FIELDS = ["layer", "shape", "spectral_norm", "preact_rms", "noise_std", "rms_over_std", "frac_within_std"]


@torch.no_grad()
def noise_scale(model: nn.Module, x: Tensor) -> list[dict]:
    """One row per noisy layer (execution order): spectral norm of its weight (a convolution's
    reshaped to (out, in·kh·kw)), RMS of its noise-free pre-activation on ``x``, σ, RMS/σ, and the
    fraction of (unit, input) pairs with |z| < σ."""
    rows = []
    for t, (m, z) in enumerate(record_preactivations(model, bind(model, x)).preactivations.items()):
        std = float(m.noise.stddev)
        w = m.weight.double().reshape(m.weight.shape[0], -1)
        rms = z.double().pow(2).mean().sqrt().item()
        rows.append({"layer": t, "shape": f"{w.shape[1]}→{w.shape[0]}" if isinstance(m, torch.nn.Linear)
                     else f"conv {tuple(m.weight.shape)}",
                     "spectral_norm": torch.linalg.matrix_norm(w, ord=2).item(), "preact_rms": rms,
                     "noise_std": std, "rms_over_std": rms / std,
                     "frac_within_std": (z.abs() < std).double().mean().item()})
    return rows


def noise_scale_table(per_model: dict[str, list[dict]]) -> str:
    """Markdown: one line per (model, layer)."""
    lines = ["| model | layer | shape | ‖W‖₂ | RMS of z (noise-free) | σ | RMS/σ | share of \\|z\\| < σ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in per_model.items():
        for r in rows:
            lines.append(f"| {name} | {r['layer']} | {r['shape']} | {r['spectral_norm']:.1f} | {r['preact_rms']:.2f} | "
                         f"{r['noise_std']:g} | {r['rms_over_std']:.2f} | {r['frac_within_std']:.3f} |")
    return "\n".join(lines) + "\n"


GRADIENT_FIELDS = ["layer", "parameter", "mean_norm", "single_estimate_std", "noise_to_signal"]


def gradient_noise(model: nn.Module, x: Tensor, y: Tensor, estimator) -> list[dict]:
    """How noisy is one gradient estimate, per noisy layer and parameter? From one call of
    ``estimator.estimate(..., return_variance=True)``: the norm of the expected gradient
    (√(‖ĝ‖² − Σ var), unbiased for its square), √(Σ var) (the spread of the estimate) and their ratio. A ratio ≫ 1 means a step is mostly noise for that layer: raise K,
    use the baseline, or lower that layer's learning rate."""
    grads, stats = estimator.estimate(model, x, y, return_variance=True)
    rows, i = [], 0
    for t, layer in enumerate(noisy_layers(model)):
        for name, p in layer.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            var = stats.variance[i].double().sum().item()
            # ‖E ĝ‖² = E‖ĝ‖² − Σ var: the signal's norm without the noise's share of ‖ĝ‖
            mean, std = max(grads[i].double().pow(2).sum().item() - var, 0.0) ** 0.5, var ** 0.5
            rows.append({"layer": t, "parameter": name, "mean_norm": mean, "single_estimate_std": std,
                         "noise_to_signal": std / max(mean, 1e-300)})
            i += 1
    return rows
