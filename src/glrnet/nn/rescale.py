"""Scale-aware noise: σ set relative to the signal it perturbs, so that it keeps its meaning as weights grow."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .injection import bind
from .intercept import record_preactivations
from .modules import noisy_layers
from .noise import family
from .perturbations import Activity


@torch.no_grad()
def rescale_noise_(model: nn.Module, x: Tensor | None, ratio: float | None = None,
                   weight_ratio: float | None = None) -> dict[int, float]:
    """``ratio``: give every activity-noise layer the noise of its family with standard deviation ``ratio``
    × the RMS of its noise-free pre-activation on the batch ``x``; ``weight_ratio``: every parameter-noise
    layer σ = ``weight_ratio`` × the RMS of its weight (kernel), so that the parameter noise keeps its size
    relative to weights that grow (a threshold unit is invariant to the scale of its weights; an absolute
    σ would shrink relative to them). Called before each estimate, σ is then a function of (θ, batch)
    alone, held fixed during the estimate: the GLR estimate stays unbiased for ∇θ E[L] at that σ.
    Returns {layer index (into ``noisy_layers(model)``): new σ}."""
    layers = noisy_layers(model)
    targets = {}
    if weight_ratio is not None:
        for i, layer in enumerate(layers):
            if not isinstance(layer.perturbation, Activity):
                targets[i] = weight_ratio * layer.weight.double().pow(2).mean().sqrt().item()
    if ratio is not None:
        pre = record_preactivations(model, bind(model, x)).preactivations
        for i, layer in enumerate(layers):
            if isinstance(layer.perturbation, Activity) and layer in pre:
                targets[i] = ratio * pre[layer].double().pow(2).mean().sqrt().item()
    out = {}
    for i, std in sorted(targets.items()):
        fam = family(layers[i].noise)
        if fam is None:
            raise ValueError(f"relative noise: noise {layers[i].noise} has no registered family to rebuild at a new σ")
        layers[i].noise = fam.from_std(max(std, 1e-6))
        out[i] = max(std, 1e-6)
    return out
