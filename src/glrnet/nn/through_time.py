"""The noisy pass through time: noisy layers applied several times in one forward pass (once per time step).

A layer through time is applied T times per pass, with fresh noise at each application:
u_t = μ_t(θ; past) + r_t, r_t ~ f i.i.d. over steps and units. Given the past, the map from (r_1, …, r_T)
to the membranes (u_1, …, u_T) is triangular with unit diagonal, so the path's density is Π_t f(u_t − μ_t)
and

    ∇θ E[L] = E[ L · Σ_t J_θ μ_t(θ; past)ᵀ s(r_t) ]        (DESIGN §10)

— each application's one-step GLR term, against the input that application saw, summed. A perturbation
with ``held = True`` (weight, flipout, channel) draws once per pass and holds its draw over every
application: ∇θ E[L(θ + e)] = E[L · s(e)], one term. Nothing here depends on what the layer is: any noisy
layer applied several times (a layer through time, a noisy layer inside a :class:`~glrnet.TimeLoop`, a
weight-tied layer) gets this pass.

:class:`TimeInjection` is the handler of one such pass. It asks ``draw(i, n)`` for layer i's noise at its
n-th application (held: n = 0 only) — so the estimator can draw it step by step from a generator and
draw the same noise again in a second pass, or a test can replay recorded noise — and calls
``on_apply(i, n, h, r)`` after each noisy application, where the estimator accumulates its term.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .injection import Injection
from .layers import NoisyLayer
from .perturbations import Perturbation


class TimeInjection(Injection):
    """One noisy pass of k replications of a batch of B inputs in which noisy layers may be applied several
    times (module docstring). ``active``: the layers that carry noise (the others run noise-free). With
    ``record``, ``inputs[i]`` is the list of the inputs layer i saw, one per application."""

    def __init__(self, layers: Sequence[NoisyLayer], k: int, batch: int, draw: Callable[[int, int], Tensor],
                 perturbations: Sequence[Perturbation], active: Iterable[int], record: bool = False,
                 on_apply: Callable[[int, int, Tensor, Tensor], None] | None = None):
        super().__init__(layers, k, batch, None, record, perturbations)
        self.draw, self.active, self.on_apply = draw, set(active), on_apply
        self.applications: dict[int, int] = {}
        self.held: dict[int, Tensor] = {}
        self.inputs: dict[int, list[Tensor]] = {}

    def apply(self, layer: NoisyLayer, h: Tensor) -> Tensor:
        i = self.index.get(id(layer))
        if i is None:  # a noisy layer of another model
            return layer.act(layer.affine(h))
        k, B = self.k, self.batch
        if h.shape[0] not in (B, k * B):
            raise RuntimeError(f"noisy layer {i} got a batch of {h.shape[0]} rows; expected {B} inputs or "
                               f"{k}·{B} replications")
        n = self.applications.get(i, 0)
        self.applications[i] = n + 1
        if n == 0:
            self.order.append(i)
        if self.record:
            self.inputs.setdefault(i, []).append(h)
        if i not in self.active:
            v = layer.affine(h)
        else:
            p = self.perturbations[i]
            if p.held:
                if i not in self.held:
                    self.held[i] = self.draw(i, 0)
                r = self.held[i]
            else:
                r = self.draw(i, n)
            v = p.forward(layer, h, r, k, B, torch.is_grad_enabled())
            if self.on_apply is not None:
                self.on_apply(i, n, h, r)
        self.shapes[i] = tuple(v.shape[1:])
        return self.activate(i, layer, v, h)
