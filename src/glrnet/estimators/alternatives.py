"""What a researcher would pick instead of GLR: forward-only gradient producers with GLR's interface.

Each has ``backward(model, x, y) → GradStats`` and fills ``param.grad`` of the trainable parameters
of the noisy layers, so the same model and the same ``torch.optim`` optimizer run under each; each
spends a stated budget of forward passes per input and step, so that they can be compared with
GLR's K replications at equal cost (``forward_passes``).

``ES``  evolution strategies with antithetic weight perturbation of every layer (Salimans et al.
        2017): ĝ = 1/(nσ) Σⱼ ½(L(θ + σεⱼ) − L(θ − σεⱼ)) εⱼ over n pairs, εⱼ ~ N(0, I), on the
        noise-free network. Unbiased for ∇θ E_ε[L(θ + σε)] (the Gaussian smoothing of the loss;
        any φ and L); it *is* GLR with a :class:`~glrnet.nn.perturbations.Weight` perturbation N(0, σ²)
        in every layer, antithetic noise and no baseline (the model is not touched). ``rank_shaping`` replaces the batch-mean
        losses by centred ranks (OpenAI-ES fitness shaping; changes the objective, labelled so).
``SPSA`` two-point simultaneous perturbation, MeZO's estimator (Malladi et al. 2023; Spall 1992):
        ĝ = 1/n Σⱼ (L(θ + εzⱼ) − L(θ − εzⱼ)) / (2ε) · zⱼ, zⱼ ~ N(0, I) (or Rademacher), ε small;
        the parameters are perturbed in place and each zⱼ regenerated from its seed (no copy of θ,
        MeZO's memory trick). For small ε an estimate of ∇θ L itself: needs L smooth in θ.
``ForwardGradient`` forward gradients with activity perturbation (Baydin et al. 2022; Ren, Kornblith,
        Liao & Hinton 2023): a tangent u ~ N(0, I) on every noisy layer's pre-activation, one
        forward-mode pass (torch.func.jvp) gives d = ∇ᵥL · u, then ĝᵥ = d u and each layer's weight
        gradient its own vjp of ĝᵥ. Unbiased for ∇θ L of the noise-free network; needs φ and L
        differentiable (not the threshold, not the 0-1 loss: the point of GLR). ``per_layer``: one
        tangent per layer at a time (n jvps per direction), lower variance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from ..nn.activations import activation_name, is_smooth
from ..nn.injection import Injection, Layout, check_batch, noisy_forward, probe
from ..nn.losses import DIFFERENTIABLE, LossLike, get_loss, loss_name
from ..nn.modules import noisy_layers
from ..nn.perturbations import Weight
from .control_variates import ControlVariate
from .glr import GLR, GradStats, fill_grads, glr_parameters
from .through_time import forward_gradient_through_time


class CenteredRanks(ControlVariate):
    """Fitness shaping: every replication's loss weight (for each of its B inputs) is the centred rank
    of its batch-mean loss, in [−½, ½]. Not a control variate in the unbiased sense: it changes the
    objective (rank-based ES), and says so."""

    name = "centered-ranks"
    min_groups = 2
    chunkable = False

    def weights(self, losses: Tensor, groups: Tensor, group_size: int) -> Tensor:
        k = losses.shape[0]
        ranks = losses.mean(1).argsort().argsort().to(losses.dtype)
        return (ranks / (k - 1) - 0.5)[:, None].expand_as(losses)


class ES:
    """Antithetic evolution strategies on the noise-free network (module docstring).

    Args:
        loss: registered name or callable (outputs, targets) → (N,); no differentiability needed.
        population: forward passes per input and step (n = population / 2 antithetic pairs).
        sigma: standard deviation of the parameter perturbation.
        rank_shaping: centred-rank fitness shaping (changes the objective).
        memory_budget_mb, generator: as for :class:`~glrnet.GLR`.
    """

    def __init__(self, loss: LossLike = "cross_entropy", population: int = 100, sigma: float = 0.05,
                 rank_shaping: bool = False, memory_budget_mb: float = 256.0,
                 generator: torch.Generator | None = None):
        if population < 2 or population % 2:
            raise ValueError(f"ES population must be an even number ≥ 2 (antithetic pairs), got {population}")
        if not sigma > 0:
            raise ValueError(f"ES sigma must be > 0, got {sigma}")
        self.population, self.sigma, self.rank_shaping = population, float(sigma), rank_shaping
        self._glr = GLR(loss, replications=population, baseline=CenteredRanks() if rank_shaping else False,
                        sampler="antithetic", perturbation=Weight(Normal(0.0, self.sigma)),
                        memory_budget_mb=memory_budget_mb, generator=generator, prefetch=False)
        self.loss = self._glr.loss

    @property
    def forward_passes(self) -> int:
        return self.population

    def __repr__(self) -> str:
        return (f"ES(loss={loss_name(self.loss)}, population={self.population}, sigma={self.sigma:g}, "
                f"rank_shaping={self.rank_shaping})")

    def estimate(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[Tensor], GradStats]:
        """The ES estimate (aligned with ``glr_parameters``), without touching ``.grad``."""
        return self._glr.estimate(model, x, y)

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        grads, stats = self.estimate(model, x, y)
        fill_grads(model, grads)
        return stats


class SPSA:
    """Two-point SPSA / MeZO on the noise-free network (module docstring).

    Args:
        loss: registered name or callable.
        directions: n perturbation directions per step (2n forward passes per input).
        eps: the perturbation size ε.
        distribution: ``"gaussian"`` (MeZO) or ``"rademacher"`` (Spall's SPSA).
        generator: ``torch.Generator`` whose draws seed each direction.
    """

    def __init__(self, loss: LossLike = "cross_entropy", directions: int = 1, eps: float = 1e-3,
                 distribution: str = "gaussian", generator: torch.Generator | None = None):
        if directions < 1:
            raise ValueError(f"SPSA directions must be ≥ 1, got {directions}")
        if not eps > 0:
            raise ValueError(f"SPSA eps must be > 0, got {eps}")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"SPSA distribution must be gaussian or rademacher, got {distribution!r}")
        self.loss = get_loss(loss)
        self.directions, self.eps, self.distribution, self.generator = directions, float(eps), distribution, generator

    @property
    def forward_passes(self) -> int:
        return 2 * self.directions

    def __repr__(self) -> str:
        return (f"SPSA(loss={loss_name(self.loss)}, directions={self.directions}, eps={self.eps:g}, "
                f"distribution={self.distribution})")

    def _direction(self, p: Tensor, gen: torch.Generator) -> Tensor:
        if self.distribution == "gaussian":
            return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        return torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype) * 2 - 1

    def _perturb_(self, params: list[Tensor], seed: int, scale: float) -> None:
        gen = torch.Generator(device=params[0].device).manual_seed(seed)
        for p in params:
            p.add_(self._direction(p, gen), alpha=scale)

    @torch.no_grad()
    def estimate(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[Tensor], GradStats]:
        x = check_batch(model, x, y)
        params = [p for group in glr_parameters(model) for p in group]
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, ())))
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        for _ in range(self.directions):
            seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=self.generator.device))
            self._perturb_(params, seed, +self.eps)                     # θ + εz
            plus = self.loss(model(x), y).mean()
            self._perturb_(params, seed, -2 * self.eps)                 # θ − εz
            minus = self.loss(model(x), y).mean()
            self._perturb_(params, seed, +self.eps)                     # θ (up to float rounding)
            coef = (plus - minus) / (2 * self.eps * self.directions)
            gen = torch.Generator(device=x.device).manual_seed(seed)
            for g, p in zip(grads, params):                             # z regenerated, never stored
                g.add_(self._direction(p, gen) * coef)
            total = total + plus + minus
        return grads, GradStats(loss=total / (2 * self.directions), replications=2 * self.directions)

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        grads, stats = self.estimate(model, x, y)
        fill_grads(model, grads)
        return stats


class ForwardGradient:
    """Forward gradients with activity perturbation (module docstring).

    Args:
        loss: a differentiable registered loss or callable.
        directions: tangents per step (each one forward-mode pass: ``forward_passes`` counts them).
        per_layer: one tangent per noisy layer at a time (the jvp count is directions × layers).
        generator: ``torch.Generator`` for the tangents.
    """

    def __init__(self, loss: LossLike = "cross_entropy", directions: int = 1, per_layer: bool = False,
                 generator: torch.Generator | None = None):
        if isinstance(loss, str) and loss not in DIFFERENTIABLE:
            get_loss(loss)
            raise ValueError(f"forward gradients need a differentiable loss; {loss!r} is not (use GLR or ES)")
        if directions < 1:
            raise ValueError(f"directions must be ≥ 1, got {directions}")
        self.loss = get_loss(loss)
        self.directions, self.per_layer, self.generator = directions, per_layer, generator

    @property
    def forward_passes(self) -> int:
        return self.directions

    def __repr__(self) -> str:
        return (f"ForwardGradient(loss={loss_name(self.loss)}, directions={self.directions}, "
                f"per_layer={self.per_layer})")

    def estimate(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[Tensor], GradStats]:
        glr_parameters(model)
        x = check_batch(model, x, y)
        layers = noisy_layers(model)
        for m in layers:
            if m.activation is not None and not is_smooth(m.activation):
                raise ValueError(f"forward gradients need differentiable units; {activation_name(m.activation)!r} "
                                 "is not (use GLR or ES)")
        pr = probe(model, x)
        for i in pr.order:
            if pr.perturbations[i].name != "activity":
                raise ValueError(f"forward gradients perturb the units' activity; noisy layer {i} has perturbation "
                                 f"{pr.perturbations[i].name!r} (use GLR or ES)")
        gen = self.generator
        if gen is None:
            gen = self.generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, ())))
        if pr.repeated:   # layers through time: a tangent on every step's pre-activation, two passes
            grads, loss0 = forward_gradient_through_time(model, x, y, self.loss, self.directions, self.per_layer,
                                                         gen, pr)
            return grads, GradStats(loss=loss0, replications=self.directions)
        layout, B = Layout(pr), x.shape[0]
        with torch.no_grad(), Injection(layers, 1, B, record=True) as inj:   # each layer's input h
            out0 = model(x)
        loss0 = self.loss(out0, y).mean()

        def per_sample_loss(delta):
            out = noisy_forward(model, x, layout.injection(1, B, delta), layout.first)
            return self.loss(out, y)

        cot = {i: torch.zeros(B, *pr.shapes[i], dtype=x.dtype, device=x.device) for i in pr.order}
        groups = [[i] for i in pr.order] if self.per_layer else [pr.order]
        zero = torch.zeros(1, B, layout.width, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for _ in range(self.directions):
                for active in groups:
                    u = torch.zeros_like(zero)
                    for i in active:
                        o = layout.offsets[i]
                        u[..., o:o + pr.width(i)] = torch.randn(1, B, pr.width(i), generator=gen, dtype=x.dtype,
                                                                device=x.device)
                    _, d = torch.func.jvp(per_sample_loss, (zero,), (u,))    # d = ∇ᵥLᵢ · uᵢ per input
                    for i in active:
                        o = layout.offsets[i]
                        cot[i] += (d[:, None] * u[0, :, o:o + pr.width(i)]).reshape(cot[i].shape)
        grads = []
        for i, layer in enumerate(layers):
            g = layer.glr_grads(inj.inputs[i], cot[i] / (self.directions * B))
            grads += [gi for gi, p in zip(g, layer.parameters(recurse=False)) if p.requires_grad]
        return grads, GradStats(loss=loss0.detach(), replications=self.directions)

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        grads, stats = self.estimate(model, x, y)
        fill_grads(model, grads)
        return stats
