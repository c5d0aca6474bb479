"""GLR through time: the estimate for models whose noisy layers are applied several times per pass (spiking
and recurrent layers, one application per time step), with memory that does not grow with T.

The estimate (DESIGN §10; :mod:`glrnet.nn.through_time`): with K replications of B inputs, loss weights
w = L − b from the control variate, and each noisy layer's n-th application seeing input h_n and noise r_n,

    Ĝ = 1/(K·B) Σₖ Σᵢ wₖᵢ · Σₙ J_θ(layer(hₖᵢₙ))ᵀ s(rₖᵢₙ)          (fresh noise per application: activity)
    Ĝ = 1/(K·B) Σₖ Σᵢ wₖᵢ · s(eₖ)                                   (one draw held over the pass: weight)

:func:`reference_through_time` computes it by its definition: every step's input and noise kept, one
autograd call on the perturbations' own ``reference_term`` s. Memory linear in T.

:func:`accumulate_through_time` is the fast path :class:`~glrnet.GLR` takes for such models. w is known only
after the last step, so it makes two passes over each chunk of replications:

1. the noisy forward pass, drawing each application's noise from a generator seeded per chunk
   (:class:`PassNoise`) and keeping only the losses (K, B); then w = L − b over all K at once (any
   control variate, chunked or not: its definition, no split needed);
2. the same pass again from the same seeds — the same noise, hence the same path — accumulating at each
   application its term J_θᵀ(w ⊙ s(r_n)) with the perturbation's own ``accumulate`` (the closed forms the
   one-step estimator uses), then dropping it.

Its memory is one step's activations and noise (K·B × units) plus the losses (K × B), whatever T; the
cost is two forward passes. A held perturbation needs no second forward pass: its term involves only its
draw, which step 2 draws again without running the network (weight-noise GLR, ES: one forward pass). Nor
does a noisy layer whose every input came before any noise (pass 1 sees it: B rows, not k·B — a
feed-forward stack noisy in one layer, as layer-wise injection makes it): step 2 is then one noise-free
pass of B rows that yields those inputs, with the noise drawn again beside it (:func:`replay_noise_free`).
Back-propagation through time, by contrast, keeps every step's activations: memory linear in T
(``benchmarks/bench_through_time.py`` measures both).

:func:`forward_gradient_through_time` is :class:`~glrnet.ForwardGradient` for such models, also in two passes
(forward mode with a tangent on every application's pre-activation, then the tangents drawn again).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from ..nn.injection import Layout, Probe, noisy_forward, probe
from ..nn.intercept import intercept
from ..nn.modules import noisy_layers
from ..nn.noise import linear_score_scale
from ..nn.through_time import TimeInjection
from .reference import trainable


class PassNoise:
    """The noise of one pass of k replications (``draw`` of a :class:`~glrnet.nn.through_time.TimeInjection`):
    layer i's noise for each application, (k, B, width) ((k, 1, width) for a perturbation drawn once per
    replication), drawn by ``sampler`` from a generator seeded with ``seed``. A second object with the same
    seed, asked in the same order, draws the same noise."""

    def __init__(self, layout: Layout, sampler, seed: int, k: int, like: Tensor):
        self.probe, self.active, self.sampler, self.seed, self.k, self.like = \
            layout.probe, layout.active, sampler, seed, k, like
        self.generator = torch.Generator(device=like.device).manual_seed(seed)

    def __call__(self, i: int, n: int) -> Tensor:
        p, layer = self.probe.perturbations[i], self.probe.layers[i]
        rows = self.like.shape[0] if p.per_input else 1
        out = torch.empty(self.k, rows, self.probe.width(i), dtype=self.like.dtype, device=self.like.device)
        return p.fill_(layer, self.sampler, out, self.generator)


def run_pass(model: nn.Module, x: Tensor, layout: Layout, k: int, draw, record: bool = False,
             on_apply=None) -> tuple[Tensor, TimeInjection]:
    """``model`` on x (B, ...) with k noisy replications, noise from ``draw`` in ``layout.active``: output
    (k·B, C), replication-major; autograd flows through it where enabled."""
    pr = layout.probe
    inj = TimeInjection(pr.layers, k, x.shape[0], draw, pr.perturbations, layout.active, record, on_apply)
    return noisy_forward(model, x, inj, layout.first), inj


def _seed(generator: torch.Generator | None, device) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator, device=device if generator is not None else "cpu"))


def sampled_pass(model: nn.Module, x: Tensor, layout: Layout, k: int, sampler, generator=None) -> Tensor:
    """One noisy pass with noise drawn step by step (LAP prediction, back-propagation through noise)."""
    return run_pass(model, x, layout, k, PassNoise(layout, sampler, _seed(generator, x.device), k, x))[0]


def chunk_sizes(layout: Layout, batch: int, itemsize: int, replications: int, group_size: int,
                budget_mb: float) -> list[int]:
    """Replications per chunk so that one step's working set stays under ``budget_mb``: per replication and input
    a few copies of every layer's units (activations, states, noise, scores), and per replication a few copies
    of each held draw (a weight perturbation's P values: one row per replication, not per input)."""
    pr = layout.probe
    units = sum(math.prod(pr.shapes[i]) for i in pr.order)
    fresh = sum(pr.width(i) for i in layout.active if not pr.perturbations[i].held)
    held = sum(pr.width(i) * (batch if pr.perturbations[i].per_input else 1)
               for i in layout.active if pr.perturbations[i].held)
    per_replication = itemsize * (batch * (6 * units + 4 * fresh) + 3 * held)
    k = int(budget_mb * 2**20) // max(1, per_replication) // group_size * group_size
    k = min(max(k, group_size), replications)
    return [min(k, replications - s) for s in range(0, replications, k)]


# ---------------------------------------------------------------------------------------------- the definition
def reference_through_time(model: nn.Module, x: Tensor, y: Tensor, loss, noise: dict[int, list[Tensor]],
                           groups: Tensor, group_size: int, control_variate, perturbation=None
                           ) -> dict[int, list[Tensor]]:
    """The GLR estimate through time by its definition (slow; every step kept). ``noise[i]``: layer i's noise,
    one (K, B, width) tensor per application (a held perturbation: one for the pass); layers without an
    entry are noise-free. ``groups`` (K,): the sampler's dependence groups. Returns, per layer with noise,
    the gradients of its trainable parameters."""
    layers, perts = noisy_layers(model), probe(model, x, perturbation).perturbations
    K, B = next(iter(noise.values()))[0].shape[0], x.shape[0]
    with torch.no_grad(), TimeInjection(layers, K, B, lambda i, n: noise[i][n], perts, noise, record=True) as inj:
        out = model(x.repeat(K, *[1] * (x.dim() - 1)))                   # K·B full noisy passes
    w = control_variate.weights(loss(out, y.repeat(K)).reshape(K, B), groups, group_size)
    with torch.enable_grad():
        total = sum(perts[i].reference_term(layers[i], inj.inputs[i][n], r[n], w)
                    for i, r in noise.items() for n in (range(1) if perts[i].held else range(len(r))))
        params = {i: trainable(layers[i]) for i in noise}
        grads = iter(torch.autograd.grad(total / (K * B), [p for ps in params.values() for p in ps]))
    return {i: [next(grads) for _ in ps] for i, ps in params.items()}


# ---------------------------------------------------------------------------------------------- the fast path
def accumulate_through_time(est, model: nn.Module, x: Tensor, y: Tensor, layout: Layout, replications: int):
    """The sums of one sub-estimate of :class:`~glrnet.GLR` (``est``) for a model whose noisy layers are applied
    several times per pass (module docstring): (Σ w · J_θᵀ s per layer with noise, every parameter;
    Sᵢ = Σₖ Lₖᵢ (B,); the number of non-finite losses; the number of chunks)."""
    if est._ranks() > 1:
        raise ValueError("GLR through time runs in one process (its control variate needs every replication's loss)")
    pr, B = layout.probe, x.shape[0]
    sampler = est.sampler.for_replications(replications, est.control_variate.min_groups)
    sizes = chunk_sizes(layout, B, x.element_size(), replications, sampler.group_size, est.memory_budget_mb)
    gen = est._generator(x.device)
    seeds = [_seed(gen, x.device) for _ in sizes]
    y_rep = y.repeat(sizes[0])

    # pass 1: the losses of every replication, nothing else kept; and whether each chunk's noisy layers saw,
    # at every application, an input of B rows: one computed before the batch grew, so free of the noise
    losses, groups, offset, shared = [], [], 0, []
    for k, seed in zip(sizes, seeds):
        rows = set()
        out, _ = run_pass(model, x, layout, k, PassNoise(layout, sampler, seed, k, x),
                          on_apply=lambda i, n, h, r: rows.add(h.shape[0]))
        shared.append(k > 1 and rows <= {B})
        losses.append(est.loss(out.reshape(k * B, -1), y_rep[:k * B]).reshape(k, B))
        groups.append(sampler.group_ids(k, x.device) + offset)
        offset += k // sampler.group_size
    L = torch.cat(losses)
    w = est.control_variate.weights(L, torch.cat(groups), sampler.group_size)
    nonfinite = (~torch.isfinite(L)).sum()

    # pass 2: the same noise again, each application's term accumulated and dropped
    learn = [i for i in layout.active if trainable(pr.layers[i])]
    grads = {i: [torch.zeros_like(p) for p in pr.layers[i].parameters(recurse=False)] for i in learn}
    scale = {i: linear_score_scale(pr.perturbations[i].noise) for i in learn}
    held_only = all(pr.perturbations[i].held for i in layout.active)
    start = 0
    for k, seed, L_chunk, shared_inputs in zip(sizes, seeds, losses, shared):
        a = w[start:start + k]
        start += k
        # Normal noise: s(r) = r/σ², so the noise itself is the score and 1/σ² goes into the weights
        weights = {i: a if scale[i] is None else a * scale[i] for i in learn}

        def on_apply(i, n, h, r):
            p = pr.perturbations[i]
            if i not in grads or (p.held and n > 0):
                return
            g = p.accumulate(pr.layers[i], {}, h, r, weights[i], unit=pr.shapes[i],
                             shared=h is not None and h.shape[0] == B, linear=scale[i] is not None,
                             scale=scale[i] or 1.0, chunked=False)
            for acc, gi in zip(grads[i], g):
                acc.add_(gi)

        noise = PassNoise(layout, sampler, seed, k, x)
        if held_only:    # the draws alone, in the order pass 1 made them (each layer's first application)
            for i in layout.active:
                on_apply(i, 0, None, noise(i, 0))
            continue
        if shared_inputs:   # the inputs do not depend on the noise: a noise-free pass of B rows gives them
            replay_noise_free(model, x, layout, noise, on_apply)
            continue
        out, _ = run_pass(model, x, layout, k, noise, on_apply=on_apply)
        if est.check_finite:
            again = est.loss(out.reshape(k * B, -1), y_rep[:k * B]).reshape(k, B)
            if not torch.equal(again.nan_to_num(), L_chunk.nan_to_num()):
                raise RuntimeError("the second pass of GLR through time did not reproduce the first one's losses: "
                                   "the model's forward pass must be a deterministic function of its noise")
    return grads, L.sum(0), nonfinite, len(sizes)


def replay_noise_free(model: nn.Module, x: Tensor, layout: Layout, noise: PassNoise, on_apply) -> None:
    """Pass 2 for a chunk whose noisy layers saw only inputs shared by the replications (computed before any
    noise: a feed-forward stack noisy in one layer, layer-wise injection): one noise-free pass of B rows yields
    those inputs, and ``noise`` draws the chunk's noise again in pass 1's order (each application's, a held
    draw at the first), handing each application's input and noise to ``on_apply``. The same terms as the
    noisy second pass, without running the k·B noisy rows again (so without its check that the losses repeat:
    the model must be a deterministic function of its noise, as for the noisy second pass)."""
    pr = layout.probe
    zero = {i: torch.zeros(1, x.shape[0] if pr.perturbations[i].per_input else 1, pr.width(i), dtype=x.dtype,
                           device=x.device) for i in layout.active}

    def replay(i, n, h, _):
        if not (pr.perturbations[i].held and n > 0):
            on_apply(i, n, h, noise(i, n))

    run_pass(model, x, layout, 1, lambda i, n: zero[i], on_apply=replay)


# ---------------------------------------------------------------------------------------------- forward gradients
class _Tangents:
    """Handler of a noise-free pass in which every application of a noisy layer in ``active`` draws a tangent
    u ~ N(0, I) on its pre-activation from a generator seeded with ``seed``; with ``d`` None, u enters as a
    forward-mode tangent; with ``d`` (B,) given, Σ J_θᵀ(d ⊙ u) is accumulated in ``grads`` instead."""

    def __init__(self, pr: Probe, active, seed: int, like: Tensor, d: Tensor | None = None):
        self.index = {id(m): i for i, m in enumerate(pr.layers)}
        self.active, self.d = set(active), d
        self.generator = torch.Generator(device=like.device).manual_seed(seed)
        self.grads = {i: [torch.zeros_like(p) for p in pr.layers[i].parameters(recurse=False)] for i in self.active}

    def apply(self, layer, h: Tensor) -> Tensor:
        z = layer.affine(h)
        i = self.index.get(id(layer))
        if i in self.active:
            u = torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
            if self.d is None:
                z = z + forward_ad.make_dual(torch.zeros_like(u), u)
            else:
                cot = self.d.reshape(-1, *[1] * (u.dim() - 1)) * u
                for acc, g in zip(self.grads[i], layer.glr_grads(h, cot)):
                    acc.add_(g)
        return layer.act(z)


@torch.no_grad()
def forward_gradient_through_time(model: nn.Module, x: Tensor, y: Tensor, loss, directions: int, per_layer: bool,
                                  generator: torch.Generator, pr: Probe) -> tuple[list[Tensor], Tensor]:
    """Forward gradients with activity tangents on every application (every step) of every noisy layer:
    d = Σₙ ∇_{vₙ}L · uₙ by one forward-mode pass, then ĝ = Σₙ J_θᵀ(d uₙ) with the uₙ drawn again in a
    noise-free second pass. Unbiased for the noise-free network's back-propagated gradient (through a
    spiking layer: its surrogate derivative, the same one back-propagation through time uses). Returns
    the estimate (aligned with ``glr_parameters``) and the noise-free loss."""
    B = x.shape[0]
    groups = [[i] for i in pr.order] if per_layer else [pr.order]
    total = {i: [torch.zeros_like(p) for p in layer.parameters(recurse=False)] for i, layer in enumerate(pr.layers)}
    loss0 = None
    for _ in range(directions):
        for active in groups:
            seed = _seed(generator, x.device)
            with forward_ad.dual_level(), intercept(_Tangents(pr, active, seed, x)):
                per_input = loss(model(x), y)
                primal, d = forward_ad.unpack_dual(per_input)
            loss0 = primal.mean() if loss0 is None else loss0
            second = _Tangents(pr, active, seed, x, d=torch.zeros_like(primal) if d is None else d)
            with intercept(second):
                model(x)
            for i in active:
                for acc, g in zip(total[i], second.grads[i]):
                    acc.add_(g)
    grads = []
    for i, layer in enumerate(pr.layers):
        grads += [g / (directions * B) for g, p in zip(total[i], layer.parameters(recurse=False)) if p.requires_grad]
    return grads, loss0
