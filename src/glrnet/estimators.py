"""Gradient producers: the GLR estimator, and back-propagation for the baselines.

Both write ``param.grad`` (adding to it, as autograd does) and leave the step to any
``torch.optim`` optimizer::

    est = glrnet.GLR(loss="zero_one", replications=1000)
    opt.zero_grad(); stats = est.backward(model, x, y); opt.step()

The generalized likelihood ratio (Xiao, Peng, Hong & Ke). A noisy layer l maps its input h
to v = layer(h) + r, r ~ f i.i.d. per unit, with score s(r) = −d log f(r)/dr. Then

    ∇θₗ E[L] = E[ L · J_θₗ(layer(h))ᵀ s(r) ],

the layer's own parameter gradient under the cotangent L · s(r) (for a linear layer
∂/∂Wₐᵦ = E[L · s(rₐ) · hᵦ]). Neither φ nor L is differentiated: only f. With K
replications of each of the B inputs, and loss weights w = L − b from a control variate,

    Ĝₗ = 1/(K·B) Σₖ Σᵢ J_θₗ(layer(hₖᵢ))ᵀ (wₖᵢ · s(rₖᵢ)),

which is exactly the autograd gradient of Σₗ ⟨stop_grad(w ⊙ s(rₗ)), layerₗ(stop_grad(hₗ))⟩ / (K·B):
:func:`reference_estimate`, a few lines. :class:`GLR` computes the same numbers fast — in
chunks of replications under a memory budget, the first noisy layer's input shared by all
replications, closed-form layer gradients, the Normal score reusing the noise buffer — and
is tested equal to the reference on the same noise. The parts it composes:

* a sampler (samplers.py): i.i.d., antithetic pairs, randomized QMC;
* a control variate (control_variates.py): none, leave-one-out (leave-group-out);
* a perturbation site per layer (``layer.site``): ``"activity"`` (noise on the output units, the
  seed's neurons) or ``"weight"`` (noise eₖ on the layer's parameters, one draw per replication
  shared by the batch: ∇θ E[L(θ + e)] = E[L · s(e)], the evolution-strategies likelihood ratio;
  valid for any φ, and its dimension is the parameter count, not the unit count), or ``"flipout"``
  (that perturbation with per-input random signs on rows and columns, Wen et al. 2018: each input's
  noise is again i.i.d. f, but different inputs' are uncorrelated, so the noise averages over the batch);
* an injection: ``"all"`` (every noisy layer noisy in every replication: the seed's
  estimator, unbiased for ∇E[L]) or ``"layerwise"`` (each replication noisy in one layer only:
  K/n replications per layer, unbiased for layer l's parameters for ∇E[L with noise in l only]).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .activations import is_step
from .control_variates import ControlVariate, get_control_variate
from .layers import WEIGHT_SITES, Injection, Layout, Probe, noisy_forward, noisy_layers, probe
from .losses import DIFFERENTIABLE, LossLike, get_loss, loss_name
from .model import bind, check_batch
from .noise import PREFETCH_CHUNK_MB, Buffers, NoiseStream, linear_score_scale, score
from .samplers import Sampler, get_sampler

INJECTIONS = ("all", "layerwise")
CHUNK_MB = 64.0   # working set of one chunk when the replications do not all fit the memory budget
PREFETCH_FLOPS_PER_NOISE = 16   # prefetch="auto": below this compute per noise value, noise is the bottleneck


class NonFiniteLossError(FloatingPointError):
    """The loss (or the estimate) became NaN/inf; nothing was written to ``.grad``."""


@dataclass
class GradStats:
    """What a gradient producer reports for one batch (tensors: no host synchronisation)."""

    loss: Tensor                      # mean loss over the K·B (replication, input) pairs
    replications: int = 1
    chunks: int = 1
    variance: list[Tensor] | None = None   # per parameter: variance of the estimate (return_variance)
    extra: dict = field(default_factory=dict)


def trainable(layer: nn.Module) -> list[nn.Parameter]:
    """A noisy layer's parameters that train (``requires_grad``), in ``parameters()`` order."""
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def glr_parameters(model: nn.Module) -> list[list[nn.Parameter]]:
    """Each noisy layer's trainable parameters (module order); a ``ValueError`` naming any trainable
    parameter outside a noisy layer (GLR estimates a parameter through the noise it feeds)."""
    layers = noisy_layers(model)
    owned = {id(p) for layer in layers for p in layer.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if id(p) not in owned and p.requires_grad:
            raise ValueError(f"parameter {name!r} {tuple(p.shape)} is not in a noisy layer, so GLR cannot estimate "
                             "its gradient: make its module a NoisyLinear / NoisyConv2d, or freeze it "
                             "(requires_grad=False)")
    return [trainable(layer) for layer in layers]


# ---------------------------------------------------------------------------- the definition
def reference_estimate(model: nn.Module, x: Tensor, y: Tensor, loss, noise: dict[int, Tensor], groups: Tensor,
                       group_size: int, control_variate: ControlVariate) -> dict[int, list[Tensor]]:
    """The GLR estimate by its definition, for readers and tests (slow: no chunking, no sharing).

    ``noise[i]`` (K, B, *units): the noise of noisy layer i (index into ``noisy_layers(model)``);
    layers without an entry are noise-free. ``groups`` (K,): the sampler's dependence groups.
    Returns, per layer with noise, the gradients of its trainable parameters.
    """
    layers = noisy_layers(model)
    K, B = next(iter(noise.values())).shape[:2]
    with torch.no_grad(), Injection(layers, K, B, noise, record=True) as inj:
        out = model(x.repeat(K, *[1] * (x.dim() - 1)))                   # K·B full noisy passes
    w = control_variate.weights(loss(out, y.repeat(K)).reshape(K, B), groups, group_size)
    with torch.enable_grad():
        surrogate = 0.0
        for i, r in noise.items():
            layer = layers[i]
            theta = torch.cat([p.reshape(-1) for p in layer.parameters(recurse=False)])
            if layer.site in WEIGHT_SITES:   # θ + eₖ: ∇θ E[L] = E[L s(e)], eₖ shared by replication k's inputs
                s = layer.weight_score(r)                    # (K, P); channel site: O·s(eₖ) on channel cₖ
                surrogate = surrogate + (w.sum(1) @ s * theta).sum()
                continue
            if layer.site == "flipout":   # θ + eₖ ⊙ Mₖₙ for input n: its score s(eₖ) ⊙ Mₖₙ
                e, rho, vs = layer.flip_split(r)
                s = score(layer.noise, e).unsqueeze(1) * layer.flip_mask(rho, vs)       # (K, B, P)
                surrogate = surrogate + (torch.einsum("kb,kbp->p", w, s) * theta).sum()
                continue
            cotangent = w.reshape(K, B, *[1] * (r.dim() - 2)) * score(layer.noise, r)   # w ⊙ s(r)
            z = layer.affine(inj.inputs[i].detach())                      # layer(stop_grad(h))
            surrogate = surrogate + (cotangent.reshape(z.shape) * z).sum()
        params = {i: trainable(layers[i]) for i in noise}
        grads = iter(torch.autograd.grad(surrogate / (K * B), [p for ps in params.values() for p in ps]))
    return {i: [next(grads) for _ in ps] for i, ps in params.items()}


# ---------------------------------------------------------------------------- the fast path
@dataclass
class _Sums:
    """Running sums of one sub-estimate (one set of noisy layers, one batch of replications)."""

    grads: dict[int, list[Tensor]]          # Σ a · (layer gradient under s)
    loss_per_input: Tensor                  # Sᵢ = Σₖ Lₖᵢ, (B,)
    c: float = 0.0                          # w = a − c·Sᵢ
    score_per_input: dict = field(default_factory=dict)   # layer → Σₖ sₖᵢ (B, *units) [chunked baseline]
    grads_per_input: dict = field(default_factory=dict)   # layer → Σₖ per-input gradients [chunked baseline]
    shared_inputs: dict = field(default_factory=dict)     # layer → its input (B, *in), if shared
    nonfinite: Tensor | None = None


class GLR:
    """Generalized likelihood ratio estimator of ∇θ E[mean batch loss] for any ``nn.Module`` whose
    trainable parameters live in noisy layers (:class:`~glrnet.NoisyLinear`,
    :class:`~glrnet.NoisyConv2d`) at any depth. Frozen parameters are skipped.

    Requires: each layer's noise density f differentiable (Normal, Laplace, Logistic, ...).
    No requirement on the activations or the loss: only loss *values* are used.

    Args:
        loss: registered name (``cross_entropy``, ``zero_one``) or callable
            ``(outputs (N, C), targets (N,)) → (N,)``.
        replications: K, noisy replications of every input (the budget of noisy forward passes
            per input; with ``injection="layerwise"`` split evenly over the n noisy layers, K/n each);
            with ``injection="layerwise"`` also a sequence, one count per noisy layer in execution order
            (per layer of each block for a local-losses model), K their sum: spend replications where a
            layer's estimate needs them and its replications are cheap.
        baseline: the leave-one-out control variate (leave-group-out for antithetic / QMC
            groups); ``False``: the seed's plain estimator; or a name / ControlVariate.
        sampler: ``"iid"``, ``"antithetic"`` (pairs r, −r), ``"qmc"`` (randomized Sobol nets),
            or a :class:`~glrnet.samplers.Sampler`.
        injection: ``"all"`` (every noisy layer noisy in every replication) or ``"layerwise"``
            (each replication noisy in one layer only: layer l's estimate comes from its own K/n
            replications, with its own baseline, and is unbiased for ∇ of E[L with noise in layer
            l only]; the layers before l run once per input, so its passes are cheaper).
        memory_budget_mb: bound on the working set; replications are processed in chunks.
        generator: ``torch.Generator`` for the noise (on the model's device). Default: one
            seeded from the global RNG at first use, so ``torch.manual_seed`` governs it.
        check_finite: raise :class:`NonFiniteLossError` if a loss is NaN/inf (one host
            synchronisation per call; turn off for CUDA-graph style training).
        prefetch: on a CPU, draw the next chunk's noise on a helper thread while the current
            chunk is processed (torch's intra-op threads lowered by one for the call, then
            restored). ``"auto"`` (default): only where drawing the noise dominates the work —
            fewer than ``PREFETCH_FLOPS_PER_NOISE`` multiply-adds per noise value after the first
            noisy layer (the seed's 196-20-10 MLP: yes; a LeNet or a 784-256-256-10 MLP: no);
            benchmarks/bench_glr.py and bench_cnn.py measure what it buys.
        variance_batches: R, the independent sub-estimates ``estimate(..., return_variance=True)``
            splits the replications into.
    """

    def __init__(self, loss: LossLike = "cross_entropy", replications: int = 1000,
                 baseline: bool | str | ControlVariate = True, sampler: str | Sampler = "iid",
                 injection: str = "all", memory_budget_mb: float = 256.0,
                 generator: torch.Generator | None = None, check_finite: bool = True, prefetch: bool | str = "auto",
                 variance_batches: int = 10):
        self.loss = get_loss(loss)
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; valid: {', '.join(INJECTIONS)}")
        self.layer_replications = None
        if isinstance(replications, (list, tuple)):
            if injection != "layerwise":
                raise ValueError(f"replications per layer ({list(replications)}) need injection='layerwise'")
            if not replications or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                           for k in replications):
                raise ValueError(f"replications per layer must be positive integers, got {list(replications)!r}")
            self.layer_replications = tuple(replications)
            replications = sum(replications)
        if not isinstance(replications, int) or isinstance(replications, bool) or replications < 1:
            raise ValueError(f"replications must be a positive integer, got {replications!r}")
        if not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        if prefetch not in (True, False, "auto"):
            raise ValueError(f"prefetch must be True, False or 'auto', got {prefetch!r}")
        if not isinstance(variance_batches, int) or variance_batches < 2:
            raise ValueError(f"variance_batches must be an integer ≥ 2, got {variance_batches!r}")
        self.replications, self.injection = replications, injection
        self.sampler, self.control_variate = get_sampler(sampler), get_control_variate(baseline)
        if injection == "all":
            self._check_split(self._local_replications(), "replications")
        self.memory_budget_mb = float(memory_budget_mb)
        self.generator, self.check_finite, self.prefetch = generator, check_finite, prefetch
        self.variance_batches = variance_batches
        self._buffers = Buffers()

    @property
    def baseline(self) -> bool:
        return self.control_variate.name != "none"

    def __repr__(self) -> str:
        k = self.replications if self.layer_replications is None else list(self.layer_replications)
        return (f"GLR(loss={loss_name(self.loss)}, replications={k}, "
                f"baseline={self.control_variate}, sampler={self.sampler}, injection={self.injection})")

    def _check_split(self, k: int, what: str) -> None:
        """``k`` replications must form whole sampler groups, enough for the control variate."""
        self.sampler.check(k)
        groups = k // self.sampler.group_size
        if groups < self.control_variate.min_groups:
            raise ValueError(f"the {self.control_variate} baseline needs ≥ {self.control_variate.min_groups} "
                             f"groups of {self.sampler.group_size} replication(s) ({self.sampler} sampler); "
                             f"{what} = {k} gives {groups}")

    # ------------------------------------------------------------------ public API
    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        """Add the GLR estimate of ∇θ (1/B) Σᵢ E[L(xᵢ, yᵢ)] to every trainable parameter's ``.grad``."""
        grads, stats = self.estimate(model, x, y)
        for p, g in zip((p for group in glr_parameters(model) for p in group), grads):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return stats

    @torch.no_grad()
    def estimate(self, model: nn.Module, x: Tensor, y: Tensor, return_variance: bool = False
                 ) -> tuple[list[Tensor], GradStats]:
        """The estimate as a list aligned with ``glr_parameters(model)`` flattened (for a model whose
        trainable parameters are all in noisy layers, the trainable ``model.parameters()``), without
        touching ``.grad``. ``return_variance``: the replications are split into R =
        ``variance_batches`` independent sub-estimates (each with its own baseline); the estimate is
        their mean and ``stats.variance`` its per-element variance, their sample variance / R."""
        glr_parameters(model)
        pr = probe(model, bind(model, x))
        x = check_batch(model, x, y, classes=pr.classes)   # one pass over the inputs, labels checked too
        sets = self._layer_sets(model, x, pr)       # [(module run, its probe, active layers, → model's index)]
        per_sets = self._per_set(len(sets))
        batches = self.variance_batches if return_variance else 1
        if any(k % batches for k in per_sets):
            raise ValueError(f"return_variance splits {per_sets[0] if len(set(per_sets)) == 1 else per_sets} "
                             f"replications per estimate into variance_batches = {batches}: make replications "
                             "a multiple of it")
        for k in per_sets:
            self._check_split(k // batches, "replications per layer set and variance batch" if batches > 1 or
                              len(sets) > 1 else "replications")
        subs, loss_sum, nonfinite, chunks, n_pairs = [], 0.0, 0, 0, 0
        for (run, run_pr, active, to_model), per_set in zip(sets, per_sets):
            layout = Layout(run_pr, active)
            per_batch = per_set // batches
            count = self._ranks() * per_batch * self._global_batch(x)   # (replication, input) pairs per sub-estimate
            for _ in range(batches):
                sums, n = self._accumulate(run, x, y, layout, per_batch)
                subs.append((count, {to_model[i]: g for i, g in self._finalize(sums, run_pr).items()}))
                loss_sum = loss_sum + sums.loss_per_input.sum()
                nonfinite = nonfinite + sums.nonfinite
                chunks += n
                n_pairs += count
        flat = [g for _, sub in subs for i in sorted(sub) for g in sub[i]]
        totals = torch.stack([torch.as_tensor(loss_sum, dtype=x.dtype, device=x.device),
                              torch.as_tensor(nonfinite, device=x.device).to(x.dtype)])
        self._all_reduce(flat + [totals])
        per_layer: dict[int, list[list[Tensor]]] = {}
        for count, sub in subs:
            for i in sub:
                per_layer.setdefault(i, []).append([g / count for g in sub[i]])
        grads, variance = [], []
        for i in range(len(pr.layers)):       # module order: aligned with glr_parameters(model)
            for j in range(len(per_layer[i][0])):
                stack = torch.stack([b[j] for b in per_layer[i]])
                grads.append(stack.mean(0))
                if return_variance:
                    variance.append(stack.var(0) / stack.shape[0])
        if self.check_finite:
            bad = int(totals[1])
            if bad or not all(torch.isfinite(g).all() for g in grads):
                raise NonFiniteLossError(
                    f"loss {loss_name(self.loss)!r} gave {bad} non-finite values among {n_pairs} "
                    f"(replication, input) pairs during GLR estimation; parameters and their .grad are untouched")
        return grads, GradStats(loss=totals[0] / n_pairs, replications=self.replications, chunks=chunks,
                                variance=variance if return_variance else None)

    def _per_set(self, n: int) -> list[int]:
        """Local replications of each of the n sub-estimates (layer sets)."""
        R = self._ranks()
        if self.layer_replications is not None:
            if len(self.layer_replications) != n:
                raise ValueError(f"replications per layer {list(self.layer_replications)} has "
                                 f"{len(self.layer_replications)} entries for {n} noisy layers (execution order)")
            if any(k % R for k in self.layer_replications):
                raise ValueError(f"replications per layer {list(self.layer_replications)} must each divide "
                                 f"over the {R} replication ranks")
            return [k // R for k in self.layer_replications]
        local = self._local_replications()
        if local % n:
            raise ValueError(f"layerwise injection spends replications = {self.replications} evenly over "
                             f"{n} noisy layers: make it a multiple of {n * R}")
        return [local // n] * n

    def _layer_sets(self, model: nn.Module, x: Tensor, pr: Probe) -> list:
        """The sub-estimates: (module to run, its probe, its noisy layers that carry noise, their index in
        ``pr``). ``injection="all"``: one, the whole model; ``"layerwise"``: one per noisy layer. A
        :class:`~glrnet.layers.LocalLosses` model: one per block (or per layer of it, layerwise), each run
        on the network truncated at that block's head, so that its loss is the head's (Ren et al. 2023)."""
        from .layers import LocalLosses
        local = model
        if isinstance(model, nn.Sequential) and len(model) == 1:      # e.g. NoisySequential(LocalLosses(...))
            local = model[0]
        if not isinstance(local, LocalLosses):
            ident = {i: i for i in pr.order}
            groups = [pr.order] if self.injection == "all" else [[i] for i in pr.order]
            return [(model, pr, g, ident) for g in groups]
        index = {id(m): i for i, m in enumerate(pr.layers)}
        sets = []
        for b in range(len(local.blocks)):
            run = local.truncated(b)
            run_pr = probe(run, x)
            mine = {id(m) for m in local.block_layers(b)}
            active = [i for i in run_pr.order if id(run_pr.layers[i]) in mine]
            to_model = {i: index[id(run_pr.layers[i])] for i in active}
            for g in [active] if self.injection == "all" else [[i] for i in active]:
                sets.append((run, run_pr, g, to_model))
        return sets

    # ------------------------------------------------------------------ one sub-estimate
    def _accumulate(self, model: nn.Module, x: Tensor, y: Tensor, layout: Layout, replications: int):
        """Σ over ``replications`` local replications, noisy in ``layout.active`` (see _Sums)."""
        pr, B, m = layout.probe, x.shape[0], self.sampler.group_size
        K = replications * self._ranks()            # the sub-estimate's replications over all ranks
        prefetch = self._prefetch(layout, x)
        sizes = self._chunk_sizes(layout, B, x.element_size(), replications, m, prefetch)
        direct = len(sizes) == 1 and self._ranks() == 1   # all K at hand: w formed directly
        if not direct and not hasattr(self.control_variate, "split"):
            raise ValueError(f"control variate {self.control_variate} needs all replications in one chunk")
        y_rep = y.repeat(sizes[0])
        sums = _Sums(grads={i: [torch.zeros_like(p) for p in trainable(pr.layers[i])] for i in layout.active},
                     loss_per_input=torch.zeros(B, dtype=x.dtype, device=x.device),
                     nonfinite=torch.zeros((), dtype=torch.long, device=x.device))
        gen = self._generator(x.device)
        draw = lambda k, slot: layout.fill_(self.sampler, self._buffers.get(k, B, layout.width, x, slot), gen)  # noqa: E731
        linear = None if layout.shared is None else linear_score_scale(layout.shared)
        for noise in NoiseStream(prefetch).chunks(draw, sizes, x.device):
            k = noise.shape[0]
            inj = Injection(pr.layers, k, B, layout.views(noise), record=True)
            out = noisy_forward(model, x, inj, layout.first)
            losses = self.loss(out.reshape(k * B, -1), y_rep[:k * B]).reshape(k, B)
            sums.nonfinite += (~torch.isfinite(losses)).sum()
            sums.loss_per_input += losses.sum(0)
            groups = self.sampler.group_ids(k, x.device)
            if direct:
                a, c = self.control_variate.weights(losses, groups, m), 0.0
            else:
                a, c = self.control_variate.split(losses, groups, m, K)
            sums.c = c
            score_scale = 1.0
            if linear is not None:      # Normal noise: s(r) = r/σ², so the noise buffer is the score
                a, score_scale = a * linear, linear
            for i, r in layout.views(noise).items():
                layer, unit, h = pr.layers[i], pr.shapes[i], inj.inputs[i]
                keep = _trainable_mask(layer)
                if layer.site != "activity":
                    g = self._weight_site_sums(layer, i, r, a, c, score_scale, linear is not None, sums)
                    for acc, gi in zip(sums.grads[i], (g for g, kp in zip(g, keep) if kp)):
                        acc.add_(gi)
                    continue
                s = (r if linear is not None else score(layer.noise, r)).reshape(k, B, *unit)
                # the input is computed once per input and no noise reached it: shared by the replications
                # and the chunks (a chunk of k = 1 has B rows everywhere: rows alone do not tell)
                shared = h.shape[0] == B and i in inj.noise_free_inputs
                if c:
                    if i not in sums.score_per_input:
                        sums.score_per_input[i] = torch.zeros(B, *unit, dtype=x.dtype, device=x.device)
                    sums.score_per_input[i].add_(s.sum(0), alpha=score_scale)
                    if shared:
                        sums.shared_inputs[i] = h
                    else:
                        g_in = layer.glr_grads_per_input(h.reshape(k, B, *h.shape[1:]), s)
                        acc = sums.grads_per_input.setdefault(i, [torch.zeros_like(g) for g in g_in])
                        for t, g in zip(acc, g_in):
                            t.add_(g, alpha=score_scale)
                if shared:   # the input is the same for all replications: Σₖ a s first (one bmm per input)
                    if linear is not None:   # reads the noise slice in place
                        sa = torch.bmm(a.t().unsqueeze(1), r.transpose(0, 1)).reshape(B, *unit)
                    else:
                        sa = torch.einsum("kb,kb...->b...", a, s)
                    g = layer.glr_grads(h, sa)
                else:
                    aw = a.reshape(k, B, *[1] * len(unit))
                    g = layer.glr_grads(h, (s * aw).reshape(k * B, *unit))
                for acc, gi in zip(sums.grads[i], (g for g, kp in zip(g, keep) if kp)):
                    acc.add_(gi)
        if sums.c:
            sums.loss_per_input = self._combine_loss_sums(sums.loss_per_input, x)
        return sums, len(sizes)

    @staticmethod
    def _weight_site_sums(layer, i: int, r: Tensor, a: Tensor, c: float, score_scale: float, linear: bool,
                          sums: _Sums) -> list[Tensor]:
        """A weight-site layer's Σₖ (Σᵢ aₖᵢ) s(eₖ) (flipout: Σₖ s(eₖ) ⊙ Σᵢ aₖᵢ Mₖᵢ), per parameter; with the
        chunked baseline (c ≠ 0) it also accumulates the score sums its correction needs."""
        if layer.site in WEIGHT_SITES:     # one perturbation per replication
            s = layer.weight_score(r, (lambda e: e) if linear else None)                # (k, P)
            if c:
                acc = sums.score_per_input.setdefault(i, torch.zeros(s.shape[1], dtype=s.dtype, device=s.device))
                acc.add_(s.sum(0), alpha=score_scale)
            return layer.split_parameters(a.sum(1) @ s)
        e, rho, vs = layer.flip_split(r)
        s = e if linear else score(layer.noise, e)
        if c:                          # per input: Σₖ s(eₖ) ⊙ Mₖᵢ, (B, P)
            acc = sums.score_per_input.setdefault(i, torch.zeros(r.shape[1], s.shape[1], dtype=s.dtype,
                                                                 device=s.device))
            acc.add_(torch.einsum("kp,kbp->bp", s, layer.flip_mask(rho, vs)), alpha=score_scale)
        return layer.split_parameters((s * layer.flip_sum(a, rho, vs)).sum(0))

    def _finalize(self, sums: _Sums, pr: Probe) -> dict[int, list[Tensor]]:
        """Σ w · (layer gradient under s) per layer: subtract the c·Sᵢ part of w (chunked baseline)."""
        if not sums.c:
            return sums.grads
        out, S = {}, sums.loss_per_input
        for i, gs in sums.grads.items():
            layer = pr.layers[i]
            if layer.site in WEIGHT_SITES:    # Σₖ Σᵢ c Sᵢ s(eₖ) = c (Σᵢ Sᵢ) Σₖ s(eₖ)
                correction = layer.split_parameters(S.sum() * sums.score_per_input[i])
            elif layer.site == "flipout":     # Σᵢ c Sᵢ Σₖ s(eₖ) ⊙ Mₖᵢ
                correction = layer.split_parameters(S @ sums.score_per_input[i])
            elif i in sums.shared_inputs:
                sw = S.reshape(-1, *[1] * (sums.score_per_input[i].dim() - 1)) * sums.score_per_input[i]
                correction = layer.glr_grads(sums.shared_inputs[i], sw)
            else:
                correction = [torch.einsum("b,b...->...", S, g) for g in sums.grads_per_input[i]]
            keep = _trainable_mask(layer)
            correction = [c for c, kp in zip(correction, keep) if kp]
            out[i] = [g - sums.c * corr for g, corr in zip(gs, correction)]
        return out

    def _prefetch(self, layout: Layout, x: Tensor) -> bool:
        """Whether to draw noise on a helper thread (``prefetch="auto"``: where noise dominates)."""
        if self.prefetch != "auto":
            return bool(self.prefetch)
        if x.device.type != "cpu" or (torch.get_num_threads() < 2 and (os.cpu_count() or 1) < 2):
            return False
        pr, flops = layout.probe, 0
        if any(pr.layers[i].site in WEIGHT_SITES for i in layout.active):
            return False                     # one row of noise per replication: never the bottleneck
        for i in layout.active[1:]:          # the first noisy layer runs once per input
            layer, unit = pr.layers[i], pr.shapes[i]
            flops += layer.weight.numel() * (math.prod(unit[1:]) if isinstance(layer, nn.Conv2d) else 1)
        return flops < PREFETCH_FLOPS_PER_NOISE * layout.width

    def _chunk_sizes(self, layout: Layout, B: int, itemsize: int, replications: int, m: int,
                     prefetch: bool) -> list[int]:
        """Replications per chunk so that the working set stays under the memory budget."""
        extra = 0  # per-input gradients of convolutions under the chunked baseline unfold their inputs
        for i in layout.active:
            layer = layout.probe.layers[i]
            if self.baseline and isinstance(layer, torch.nn.Conv2d) and layer.site == "activity":
                extra += layer.weight[0].numel() * math.prod(layout.probe.shapes[i][1:])
            if layer.site == "channel":   # a narrow slice whose layer's outputs are still per replication
                extra += 4 * math.prod(layout.probe.shapes[i])
        per_replication = max(B, 1) * (6 * layout.width + extra + 8) * itemsize  # noise, scores, v, φ(v), loss
        if prefetch:                            # two chunks in flight, each cache-sized
            budget = min(self.memory_budget_mb / 2, PREFETCH_CHUNK_MB)
        elif per_replication * replications <= self.memory_budget_mb * 2**20:
            budget = self.memory_budget_mb      # everything in one chunk: fewest passes, direct baseline
        else:                                   # measured (benchmarks/): ~64 MB chunks beat larger ones
            budget = min(self.memory_budget_mb, CHUNK_MB)
        k = int(budget * 2**20) // per_replication
        # whole groups, each generator call a multiple of 16 values (torch's CPU normal_ draws in blocks of
        # 16, so the same stream gives the same noise however the replications are chunked)
        align = m * (16 // math.gcd(self.sampler.drawn_per_group * B * layout.width, 16))
        k = min(max(align, k // align * align), replications)
        return [min(k, replications - s) for s in range(0, replications, k)]

    def _generator(self, device) -> torch.Generator:
        if self.generator is None:
            seed = int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        return self.generator

    # ------------------------------------------------------------------ distribution hooks
    def _ranks(self) -> int:
        """Replication ranks sharing each estimate (DistributedGLR: R)."""
        return 1

    def _local_replications(self) -> int:
        return self.replications // self._ranks()

    def _global_batch(self, x: Tensor) -> int:
        return x.shape[0]

    def _combine_loss_sums(self, S: Tensor, x: Tensor) -> Tensor:
        """Sᵢ over all K replications (distributed: over every rank's share)."""
        return S

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum across processes (single process: nothing to do)."""


def _trainable_mask(layer: nn.Module) -> list[bool]:
    return [p.requires_grad for p in layer.parameters(recurse=False)]


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
            from .model import forward_replications, noise_draw
            layout, r = noise_draw(model, x, self.replications, self.generator)
            out = forward_replications(model, x, layout, r)
            loss = self.loss(out.reshape(-1, out.shape[-1]), y.repeat(self.replications)).mean()
        else:
            loss = self.loss(model(x), y).mean()
        loss.backward()
        return GradStats(loss=loss.detach(), replications=self.replications if self.noise else 1)
