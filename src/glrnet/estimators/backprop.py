"""Back-propagation through the same network, for the baselines (same interface as :class:`~glrnet.GLR`)."""

from __future__ import annotations

import torch
from torch import nn, Tensor

from ..nn.activations import is_step
from ..nn.injection import Layout, check_batch, noisy_forward, probe
from ..nn.losses import DIFFERENTIABLE, LossLike, get_loss, loss_name
from ..nn.modules import noisy_layers
from .glr import GradStats
from .samplers import IID
from .through_time import sampled_pass


class Backprop:
    """Back-propagation through the same network, for the baselines (same interface as GLR).

    ``noise=False``: the noise-free network (the seed's BP baseline). ``noise=True``: the
    pathwise gradient through K noisy replications — unbiased for smooth φ and L, and the
    reference the GLR tests compare against. Requires a differentiable loss. Works for any
    ``nn.Module`` with noisy layers at any depth.
    """

    def __init__(self, loss: LossLike = "cross_entropy", noise: bool = False, replications: int = 1,
                 generator: torch.Generator | None = None):
        if isinstance(loss, str) and loss not in DIFFERENTIABLE:
            get_loss(loss)  # unknown names get the listing error first
            raise ValueError(f"back-propagation needs a differentiable loss; {loss!r} is not "
                             f"(use GLR, or one of {sorted(DIFFERENTIABLE)})")
        if replications < 1:
            raise ValueError(f"replications must be ≥ 1, got {replications}")
        self.loss = get_loss(loss)
        self.noise, self.replications, self.generator = noise, replications, generator

    def __repr__(self) -> str:
        return f"Backprop(loss={loss_name(self.loss)}, noise={self.noise}, replications={self.replications})"

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        x = check_batch(model, x, y)
        if any(m.activation is not None and is_step(m.activation)
               for m in noisy_layers(model)):
            raise ValueError("back-propagation through the 'threshold' activation gives zero gradients; use GLR")
        if self.noise:
            layout, K = Layout(probe(model, x)), self.replications
            p = next(model.parameters())
            if layout.probe.repeated:   # through time: fresh noise at every step, drawn as the pass goes
                out = sampled_pass(model, x, layout, K, IID(), self.generator)
            else:
                r = layout.fill_(IID(), torch.empty(K, x.shape[0], layout.width, dtype=p.dtype, device=p.device),
                                 self.generator)
                out = noisy_forward(model, x, layout.injection(K, x.shape[0], r), layout.first)
            loss = self.loss(out.reshape(-1, out.shape[-1]), y.repeat(K)).mean()
        else:
            loss = self.loss(model(x), y).mean()
        loss.backward()
        return GradStats(loss=loss.detach(), replications=self.replications if self.noise else 1)
