"""The GLR estimator: the fast path of :func:`~glrnet.estimators.reference.reference_estimate`.

It writes ``param.grad`` (adding to it, as autograd does) and leaves the step to any ``torch.optim``
optimizer::

    est = glrnet.GLR(loss="zero_one", replications=1000)
    opt.zero_grad(); stats = est.backward(model, x, y); opt.step()

The generalized likelihood ratio (Xiao, Peng, Hong & Ke). A noisy layer l maps its input h to
v = layer(h) + r, r ~ f i.i.d. per unit, with score s(r) = −d log f(r)/dr. Then

    ∇θₗ E[L] = E[ L · J_θₗ(layer(h))ᵀ s(r) ],

the layer's own parameter gradient under the cotangent L · s(r). Neither φ nor L is differentiated:
only f. :class:`GLR` computes the reference's numbers fast — in chunks of replications under a memory
budget, the first noisy layer's input shared by all replications, closed-form layer gradients, the
Normal score reusing the noise buffer — and is tested equal to it on the same noise. It composes:

* a sampler (:mod:`.samplers`): i.i.d., antithetic pairs, randomized QMC, or any registered one;
* a control variate (:mod:`.control_variates`): none, leave-one-out (leave-group-out), or any registered one;
* each layer's perturbation object (:mod:`glrnet.nn.perturbations`: activity, weight, flipout, channel),
  or one ``perturbation`` given to the estimator for every layer (ES is GLR with weight perturbation);
* an injection: ``"all"`` (every noisy layer noisy in every replication: the seed's estimator,
  unbiased for ∇E[L]) or ``"layerwise"`` (each replication noisy in one layer only: K/n replications
  per layer, unbiased for layer l's parameters for ∇E[L with noise in l only]).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn.injection import Layout, Probe, check_batch, noisy_forward, probe
from ..nn.losses import LossLike, get_loss, loss_name
from ..nn.modules import LocalLosses, noisy_layers
from ..nn.noise import linear_score_scale
from ..nn.perturbations import Perturbation
from .control_variates import ControlVariate, get_control_variate
from .reference import trainable
from .samplers import Sampler, get_sampler
from .streams import PREFETCH_CHUNK_MB, Buffers, NoiseStream
from .through_time import accumulate_through_time

INJECTIONS = ("all", "layerwise")
CHUNK_MB = 64.0   # working set of one chunk when the replications do not all fit the memory budget
PREFETCH_FLOPS_PER_NOISE = 16   # prefetch="auto": below this compute per noise value, noise is the bottleneck


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of sums over replications: the inputs' own, at least float32."""
    return torch.promote_types(dtype, torch.float32)


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


def fill_grads(model: nn.Module, grads: list[Tensor]) -> None:
    """Add ``grads`` (aligned with ``glr_parameters(model)`` flattened) to the parameters' ``.grad``."""
    for p, g in zip((p for group in glr_parameters(model) for p in group), grads):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


@dataclass
class _Sums:
    """Running sums of one sub-estimate (one set of noisy layers, one batch of replications)."""

    grads: dict[int, list[Tensor]]          # Σ a · (layer gradient under s), every parameter of the layer
    loss_per_input: Tensor                  # Sᵢ = Σₖ Lₖᵢ, (B,)
    c: float = 0.0                          # w = a − c·Sᵢ
    state: dict = field(default_factory=dict)   # layer → what its perturbation keeps for the correction
    nonfinite: Tensor | None = None


class GLR:
    """Generalized likelihood ratio estimator of ∇θ E[mean batch loss] for any ``nn.Module`` whose
    trainable parameters live in noisy layers (:class:`~glrnet.NoisyLinear`,
    :class:`~glrnet.NoisyConv2d`) at any depth. Frozen parameters stay frozen.

    Requires: each layer's noise density f differentiable (Normal, Laplace, Logistic, ...).
    No requirement on the activations or the loss: only loss *values* are used.

    Args:
        loss: registered name (``cross_entropy``, ``zero_one``) or callable
            ``(outputs (N, C), targets (N,)) → (N,)``.
        replications: K, noisy replications of every input (with ``injection="layerwise"`` split
            evenly over the n noisy layers, K/n each; or a sequence, one count per noisy layer in
            execution order (per layer of each block for a local-losses model), K their sum).
        baseline: the control variate: ``True`` (leave-one-out: leave-group-out for antithetic / QMC
            groups), ``False`` (none: the seed's plain estimator), a registered name or an instance.
        sampler: a registered name (``"iid"``, ``"antithetic"``, ``"qmc"``, ...) or a
            :class:`~glrnet.estimators.samplers.Sampler`.
        injection: ``"all"`` or ``"layerwise"`` (module docstring).
        perturbation: a :class:`~glrnet.nn.perturbations.Perturbation` used in every noisy layer
            instead of its own (with its noise, or each layer's where it has none); the model is untouched.
        memory_budget_mb: bound on the working set; replications are processed in chunks.
        generator: ``torch.Generator`` for the noise (on the model's device). Default: one
            seeded from the global RNG at first use, so ``torch.manual_seed`` governs it.
        check_finite: raise :class:`NonFiniteLossError` if a loss is NaN/inf, and check the inputs'
            values and labels (host synchronisations); ``False``: none on the estimator's path.
        prefetch: on a CPU, draw the next chunk's noise on a helper thread while the current
            chunk is processed (torch's intra-op threads lowered by one for the call, then
            restored). ``"auto"`` (default): only where drawing the noise dominates the work —
            fewer than ``PREFETCH_FLOPS_PER_NOISE`` multiply-adds per noise value after the first
            noisy layer (the seed's 196-20-10 MLP: yes; a LeNet or a 784-256-256-10 MLP: no).
        variance_batches: R, the independent sub-estimates ``estimate(..., return_variance=True)``
            splits the replications into.
    """

    def __init__(self, loss: LossLike = "cross_entropy", replications: int = 1000,
                 baseline: bool | str | ControlVariate = True, sampler: str | Sampler = "iid",
                 injection: str = "all", perturbation: Perturbation | None = None, memory_budget_mb: float = 256.0,
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
        if perturbation is not None and not isinstance(perturbation, Perturbation):
            raise ValueError(f"perturbation must be a Perturbation object, got {type(perturbation).__name__}")
        self.replications, self.injection, self.perturbation = replications, injection, perturbation
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
        extra = "" if self.perturbation is None else f", perturbation={self.perturbation}"
        return (f"GLR(loss={loss_name(self.loss)}, replications={k}, "
                f"baseline={self.control_variate}, sampler={self.sampler}, injection={self.injection}{extra})")

    def _check_split(self, k: int, what: str) -> None:
        """``k`` replications must form whole sampler groups, enough for the control variate."""
        sampler = self.sampler.for_replications(k, self.control_variate.min_groups)
        groups = k // sampler.group_size
        if groups < self.control_variate.min_groups:
            raise ValueError(f"the {self.control_variate} baseline needs ≥ {self.control_variate.min_groups} "
                             f"groups of {sampler.group_size} replication(s) ({sampler} sampler); "
                             f"{what} = {k} gives {groups}")

    # ------------------------------------------------------------------ public API
    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> GradStats:
        """Add the GLR estimate of ∇θ (1/B) Σᵢ E[L(xᵢ, yᵢ)] to every trainable parameter's ``.grad``."""
        grads, stats = self.estimate(model, x, y)
        fill_grads(model, grads)
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
        x = check_batch(model, x, y, values=False)
        pr = probe(model, x, self.perturbation)
        if self.check_finite:   # one pass over the inputs' values, labels checked too
            check_batch(model, x, y, classes=pr.classes)
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
                subs.append((count, {to_model[i]: g for i, g in self._finalize(sums, layout).items()}))
                loss_sum = loss_sum + sums.loss_per_input.sum()
                nonfinite = nonfinite + sums.nonfinite
                chunks += n
                n_pairs += count
        flat = [g for _, sub in subs for i in sorted(sub) for g in sub[i]]
        acc = _accumulation_dtype(x.dtype)
        totals = torch.stack([torch.as_tensor(loss_sum, dtype=acc, device=x.device),
                              torch.as_tensor(nonfinite, device=x.device).to(acc)])
        self._all_reduce(flat + [totals])
        per_layer: dict[int, list[list[Tensor]]] = {}
        for count, sub in subs:
            for i in sub:
                per_layer.setdefault(i, []).append([g / count for g in sub[i]])
        grads, variance = [], []
        for i in range(len(pr.layers)):       # module order: aligned with glr_parameters(model)
            params = trainable(pr.layers[i])    # none: a frozen layer (its noise drawn, no sums kept)
            for j, p in enumerate(params):
                stack = torch.stack([b[j] for b in per_layer[i]])
                grads.append(stack.mean(0).to(p.dtype))
                if return_variance:
                    variance.append(stack.var(0) / stack.shape[0])
        if self.check_finite:   # one host synchronisation: the non-finite losses and gradient entries together
            counts = torch.stack([totals[1]] + [(~torch.isfinite(g)).sum().to(totals.dtype) for g in grads]).tolist()
            bad, bad_grads = int(counts[0]), int(sum(counts[1:]))
            if bad or bad_grads:
                raise NonFiniteLossError(
                    f"loss {loss_name(self.loss)!r} gave {bad} non-finite values among {n_pairs} "
                    f"(replication, input) pairs during GLR estimation (the estimate: {bad_grads} non-finite entries); "
                    "parameters and their .grad are untouched")
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
        :class:`~glrnet.nn.modules.LocalLosses` model: one per block (or per layer of it, layerwise), each run
        on the network truncated at that block's head, so that its loss is the head's (Ren et al. 2023)."""
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
            run_pr = probe(run, x, self.perturbation)
            mine = {id(m) for m in local.block_layers(b)}
            active = [i for i in run_pr.order if id(run_pr.layers[i]) in mine]
            to_model = {i: index[id(run_pr.layers[i])] for i in active}
            for g in [active] if self.injection == "all" else [[i] for i in active]:
                sets.append((run, run_pr, g, to_model))
        return sets

    # ------------------------------------------------------------------ one sub-estimate
    def _accumulate(self, model: nn.Module, x: Tensor, y: Tensor, layout: Layout, replications: int):
        """Σ over ``replications`` local replications, noisy in ``layout.active`` (see _Sums)."""
        if layout.probe.repeated:   # noisy layers applied once per time step: two passes, memory flat in T
            grads, S, nonfinite, chunks = accumulate_through_time(self, model, x, y, layout, replications)
            return _Sums(grads=grads, loss_per_input=S, nonfinite=nonfinite), chunks
        pr, B = layout.probe, x.shape[0]
        sampler = self.sampler.for_replications(replications, self.control_variate.min_groups)
        m = sampler.group_size
        K = replications * self._ranks()            # the sub-estimate's replications over all ranks
        prefetch = self._prefetch(layout, x)
        sizes = self._chunk_sizes(layout, B, x.element_size(), replications, sampler, prefetch)
        direct = len(sizes) == 1 and self._ranks() == 1   # all K at hand: w formed directly
        if not direct and not self.control_variate.chunkable:
            raise ValueError(f"control variate {self.control_variate} needs all {replications} replications in one "
                             f"chunk: raise memory_budget_mb (now {self.memory_budget_mb:g}) or lower replications")
        y_rep = y.repeat(sizes[0])
        learn = [i for i in layout.active if trainable(pr.layers[i])]       # frozen layers: noise, no sums
        acc = _accumulation_dtype(x.dtype)     # sums of K·B terms: at least float32 (float16 overflows)
        sums = _Sums(grads={i: [torch.zeros_like(p, dtype=acc) for p in pr.layers[i].parameters(recurse=False)]
                            for i in learn},
                     loss_per_input=torch.zeros(B, dtype=acc, device=x.device),
                     nonfinite=torch.zeros((), dtype=torch.long, device=x.device))
        gen = self._generator(x.device)
        draw = lambda k, slot: layout.fill_(sampler, self._buffers.get(k, B, layout.width, x, slot), gen)  # noqa: E731
        linear = None if layout.shared is None else linear_score_scale(layout.shared)
        for noise in NoiseStream(prefetch).chunks(draw, sizes, x.device):
            k = noise.shape[0]
            inj = layout.injection(k, B, noise, record=True)
            out = noisy_forward(model, x, inj, layout.first)
            losses = self.loss(out.reshape(k * B, -1), y_rep[:k * B]).reshape(k, B).to(acc)
            if self.check_finite:
                sums.nonfinite += (~torch.isfinite(losses)).sum()
            sums.loss_per_input += losses.sum(0)
            groups = sampler.group_ids(k, x.device)
            if direct:
                a, c = self.control_variate.weights(losses, groups, m), 0.0
            else:
                a, c = self.control_variate.split(losses, groups, m, K)
            sums.c, a = c, a.to(x.dtype)
            scale = 1.0
            if linear is not None:      # Normal noise: s(r) = r/σ², so the noise buffer is the score
                a, scale = a * linear, linear
            views = layout.views(noise)
            for i in learn:
                h = inj.inputs[i]
                # the input is computed once per input and no noise reached it: shared by the replications
                # and the chunks (a chunk of k = 1 has B rows everywhere: rows alone do not tell)
                shared = h.shape[0] == B and i in inj.noise_free_inputs
                g = layout.perturbations[i].accumulate(
                    pr.layers[i], sums.state.setdefault(i, {}), h, views[i], a, unit=pr.shapes[i], shared=shared,
                    linear=linear is not None, scale=scale, chunked=bool(c))
                for acc, gi in zip(sums.grads[i], g):
                    acc.add_(gi)
        if sums.c:
            sums.loss_per_input = self._combine_loss_sums(sums.loss_per_input, x)
        return sums, len(sizes)

    def _finalize(self, sums: _Sums, layout: Layout) -> dict[int, list[Tensor]]:
        """Σ w · (layer gradient under s) per layer, trainable parameters only: subtract the c·Sᵢ part of w
        (chunked control variate)."""
        out = {}
        for i, gs in sums.grads.items():
            layer = layout.probe.layers[i]
            if sums.c:
                corr = layout.perturbations[i].correction(layer, sums.state[i], sums.loss_per_input)
                gs = [g - sums.c * c for g, c in zip(gs, corr)]
            out[i] = [g for g, p in zip(gs, layer.parameters(recurse=False)) if p.requires_grad]
        return out

    def _prefetch(self, layout: Layout, x: Tensor) -> bool:
        """Whether to draw noise on a helper thread (``prefetch="auto"``: where noise dominates)."""
        if self.prefetch != "auto":
            return bool(self.prefetch)
        if x.device.type != "cpu" or (torch.get_num_threads() < 2 and (os.cpu_count() or 1) < 2):
            return False
        if not layout.per_input:
            return False                     # one row of noise per replication: never the bottleneck
        pr, flops = layout.probe, 0
        for i in layout.active[1:]:          # the first noisy layer runs once per input
            layer, unit = pr.layers[i], pr.shapes[i]
            flops += layer.weight.numel() * (math.prod(unit[1:]) if isinstance(layer, nn.Conv2d) else 1)
        return flops < PREFETCH_FLOPS_PER_NOISE * layout.width

    def _chunk_sizes(self, layout: Layout, B: int, itemsize: int, replications: int, sampler: Sampler,
                     prefetch: bool) -> list[int]:
        """Replications per chunk so that the working set stays under the memory budget."""
        extra = sum(layout.perturbations[i].chunk_extra(layout.probe.layers[i], layout.probe.shapes[i], self.baseline)
                    for i in layout.active)
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
        m = sampler.group_size
        align = m * (16 // math.gcd(sampler.drawn_per_group * B * layout.width, 16))
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
