"""The GLR estimate by its definition: a few lines for readers, and the reference the fast path is tested
equal to (``tests/test_estimator.py``, ``tests/test_sites.py``, ``tests/test_extensions.py``).

With K replications of each of B inputs, loss weights w = L − b from a control variate, and each noisy
layer l's perturbation giving its noise r and score s(r),

    Ĝₗ = 1/(K·B) Σₖ Σᵢ wₖᵢ · J_θₗ(v)ᵀ s(rₖᵢ),

the autograd gradient of Σₗ termₗ / (K·B), where each perturbation writes its own term
(activity noise: ⟨stop_grad(w ⊙ s(r)), layer(stop_grad(h))⟩; weight noise: ⟨Σᵢ wₖᵢ s(eₖ), θ⟩).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.injection import Injection, probe
from ..nn.modules import noisy_layers
from ..nn.perturbations import Perturbation


def trainable(layer: nn.Module) -> list[nn.Parameter]:
    """A noisy layer's parameters that train (``requires_grad``), in ``parameters()`` order."""
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def reference_estimate(model: nn.Module, x: Tensor, y: Tensor, loss, noise: dict[int, Tensor], groups: Tensor,
                       group_size: int, control_variate, perturbation: Perturbation | None = None
                       ) -> dict[int, list[Tensor]]:
    """The GLR estimate by its definition (slow: no chunking, no sharing). ``noise[i]`` (K, B, width): the
    noise of noisy layer i (index into ``noisy_layers(model)``); layers without an entry are noise-free.
    ``groups`` (K,): the sampler's dependence groups. ``perturbation``: used in every layer instead of its
    own. Returns, per layer with noise, the gradients of its trainable parameters."""
    layers, perts = noisy_layers(model), probe(model, x, perturbation).perturbations
    K, B = next(iter(noise.values())).shape[:2]
    with torch.no_grad(), Injection(layers, K, B, noise, record=True, perturbations=perts) as inj:
        out = model(x.repeat(K, *[1] * (x.dim() - 1)))                   # K·B full noisy passes
    w = control_variate.weights(loss(out, y.repeat(K)).reshape(K, B), groups, group_size)
    with torch.enable_grad():
        total = sum(perts[i].reference_term(layers[i], inj.inputs[i], r, w) for i, r in noise.items())
        params = {i: trainable(layers[i]) for i in noise}
        grads = iter(torch.autograd.grad(total / (K * B), [p for ps in params.values() for p in ps]))
    return {i: [next(grads) for _ in ps] for i, ps in params.items()}
