"""Gradient producers: the GLR estimator, and back-propagation for the baselines.

Both write ``param.grad`` (adding to it, as autograd does) and leave the step to any
``torch.optim`` optimizer::

    est = glrnet.GLR(loss="zero_one", replications=1000)
    opt.zero_grad(); stats = est.backward(model, x, y); opt.step()

The GLR estimator (Xiao, Peng, Hong & Ke) of ∇θ E[L] for a network whose neuron a of
layer l has pre-activation v = (W x + b)ₐ + rₐ, r ~ f i.i.d., with score
s(r) = −d log f(r)/dr:

    ∂E[L]/∂W⁽ˡ⁾ₐ,ᵦ = E[ L · s(r⁽ˡ⁾ₐ) · x⁽ˡ⁾ᵦ ],      ∂E[L]/∂b⁽ˡ⁾ₐ = E[ L · s(r⁽ˡ⁾ₐ) ].

It needs neither φ nor L to be differentiable (only f). With K replications of each
of the B inputs of a batch, the estimate of ∇θ (1/B) Σᵢ E[L(xᵢ, yᵢ)] is

    Ĝ⁽ˡ⁾ = 1/(K·B) Σₖ Σᵢ wₖᵢ · s(r⁽ˡ⁾ₖᵢ) x⁽ˡ⁾ₖᵢᵀ,

one matrix product per layer over the flattened (k, i) axis — for any noisy layer (a
convolution too), that layer's own parameter gradient under the cotangent w ⊙ s(r),
summed over (k, i); see :class:`glrnet.model.NoisyLayer` — where w = L for the
plain estimator, and with a control variate (baseline) that does not depend on
replication k's own noise, so the estimate stays exactly unbiased:

    leave-one-out    wₖᵢ = Lₖᵢ − (Sᵢ − Lₖᵢ)/(K − 1),            Sᵢ = Σⱼ Lⱼᵢ
    antithetic pairs  r and −r (all layers at once) for k and its partner k';
                      each replication is still marginally ~ f, so w = L is unbiased
    both              leave-pair-out: wₖᵢ = Lₖᵢ − (Sᵢ − Lₖᵢ − Lₖ'ᵢ)/(K − 2)

Sᵢ is known only after all chunks of replications (and, distributed, all ranks)
are done. We therefore split w into a part known within the chunk and one that is
not: wₖᵢ = aₖᵢ − Sᵢ/(K − m), with aₖᵢ = Lₖᵢ K/(K−1) (m = 1) or Lₖᵢ + Pₖᵢ/(K−2)
(m = 2, P the pair sum), and accumulate Σ a s xᵀ plus, per input, Σₖ s xᵀ. The
result is the same for any chunking (exactly, for the same random stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .losses import DIFFERENTIABLE, LossLike, get_loss, loss_name
from .model import NoisySequential, check_batch
from .noise import PREFETCH_CHUNK_MB, NoiseStream, linear_score_scale, score


class NonFiniteLossError(FloatingPointError):
    """The loss (or the estimate) became NaN/inf; nothing was written to ``.grad``."""


@dataclass
class GradStats:
    """What a gradient producer reports for one batch (tensors: no host synchronisation)."""

    loss: Tensor                      # mean loss over the K·B (replication, input) pairs
    replications: int = 1
    chunks: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class _Accumulator:
    """Per-noisy-layer running sums of one GLR estimate (see the module docstring)."""

    grads: list[list[Tensor]]         # Σ a · (layer gradient under cotangent s), per parameter of each layer
    loss_per_input: Tensor            # Sᵢ = Σₖ Lₖᵢ, (B,)
    score_per_input: list[Tensor]     # Σₖ sₖᵢ, (B, *units)                [baseline only]
    grads_per_input: list             # Σₖ layer gradient of (sₖᵢ, hₖᵢ), (B, *param) [baseline; None for the first]
    nonfinite: Tensor                 # count of non-finite losses
    direct: bool = False              # baseline weights formed directly (all K in one chunk, one process)


def glr_parameters(model: NoisySequential) -> list[list[torch.nn.Parameter]]:
    """Each noisy layer's parameters; a ``ValueError`` naming any parameter GLR cannot estimate
    (one outside a noisy layer: GLR estimates a parameter through the noise it feeds)."""
    owned = {id(p) for layer in model.noisy_layers for p in layer.parameters()}
    for name, p in model.named_parameters():
        if id(p) not in owned and p.requires_grad:
            raise ValueError(f"parameter {name!r} {tuple(p.shape)} is not in a noisy layer, so GLR cannot estimate "
                             "its gradient: make its module a NoisyLinear / NoisyConv2d, or freeze it "
                             "(requires_grad=False)")
    return [list(layer.parameters()) for layer in model.noisy_layers]


class GLR:
    """Generalized likelihood ratio estimator of ∇θ E[mean batch loss] for a :class:`NoisySequential`
    (a :class:`NoisyMLP`, a noisy CNN, ...): the parameters of every noisy layer.

    Requires: the noise density f differentiable (Normal, Laplace, Logistic, ...).
    No requirement on the activations or the loss: only loss *values* are used.

    Args:
        loss: registered name (``cross_entropy``, ``zero_one``) or callable
            ``(outputs (N, C), targets (N,)) → (N,)``.
        replications: K, noisy replications of every input.
        baseline: leave-one-out control variate (K ≥ 2; leave-pair-out with antithetic).
        antithetic: replications in pairs r, −r (K even); halves the random numbers drawn.
        memory_budget_mb: bound on the working set; replications are processed in chunks.
        generator: ``torch.Generator`` for the noise (on the model's device). Default: one
            seeded from the global RNG at first use, so ``torch.manual_seed`` governs it.
        check_finite: raise :class:`NonFiniteLossError` if a loss is NaN/inf (one host
            synchronisation per call; turn off for CUDA-graph style training).
        prefetch: on a CPU, draw the next chunk's noise on a helper thread while the current
            chunk is processed (random numbers are the serial bottleneck; see benchmarks/).
            The first such call dedicates one core to it: torch's intra-op threads are
            lowered by one for the process (:func:`glrnet.noise.reserve_core_for_noise`).
    """

    def __init__(self, loss: LossLike = "cross_entropy", replications: int = 1000, baseline: bool = False,
                 antithetic: bool = False, memory_budget_mb: float = 256.0,
                 generator: torch.Generator | None = None, check_finite: bool = True, prefetch: bool = True):
        self.loss = get_loss(loss)
        if not isinstance(replications, int) or replications < 1:
            raise ValueError(f"replications must be a positive integer, got {replications!r}")
        if antithetic and replications % 2:
            raise ValueError(f"antithetic pairs need an even number of replications, got {replications}")
        if baseline and replications < (4 if antithetic else 2):
            raise ValueError(f"a baseline needs replications ≥ {4 if antithetic else 2} "
                             f"({'two pairs' if antithetic else 'two'}), got {replications}")
        if not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        self.replications = replications
        self.baseline, self.antithetic = bool(baseline), bool(antithetic)
        self.memory_budget_mb = float(memory_budget_mb)
        self.generator = generator
        self.check_finite = check_finite
        self.prefetch = prefetch
        self._stream = NoiseStream(prefetch)
        self._score_buffer: Tensor | None = None

    def __repr__(self) -> str:
        return (f"GLR(loss={loss_name(self.loss)}, replications={self.replications}, "
                f"baseline={self.baseline}, antithetic={self.antithetic})")

    # ------------------------------------------------------------------ public API
    def backward(self, model: NoisySequential, x: Tensor, y: Tensor) -> GradStats:
        """Add the GLR estimate of ∇θ (1/B) Σᵢ E[L(xᵢ, yᵢ)] to every parameter's ``.grad``."""
        grads, stats = self.estimate(model, x, y)
        for p, g in zip((p for group in glr_parameters(model) for p in group), grads):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return stats

    @torch.no_grad()
    def estimate(self, model: NoisySequential, x: Tensor, y: Tensor) -> tuple[list[Tensor], GradStats]:
        """The estimate as a list aligned with the noisy layers' parameters (for a model whose
        parameters are all in noisy layers, ``model.parameters()``), without touching ``.grad``."""
        x = check_batch(model, x, y)
        glr_parameters(model)
        acc, chunks = self._accumulate(model, x, y, self._local_replications())
        loss_sum = acc.loss_per_input.sum()
        if self.baseline:
            self._combine_loss_sums(acc, x)
        grads = self._finalize(acc, model, x)
        totals = torch.stack([loss_sum, acc.nonfinite.to(loss_sum.dtype)])
        self._all_reduce(grads + [totals])
        count = self.replications * self._global_batch(x)
        for g in grads:
            g.div_(count)
        if self.check_finite:
            nonfinite = int(totals[1])
            if nonfinite or not all(torch.isfinite(g).all() for g in grads):
                raise NonFiniteLossError(
                    f"loss {loss_name(self.loss)!r} gave {nonfinite} non-finite values among "
                    f"{count} (replication, input) pairs during GLR estimation (activations "
                    f"{model.activations()}); parameters and their .grad are untouched")
        return grads, GradStats(loss=totals[0] / count, replications=self.replications, chunks=chunks)

    # ------------------------------------------------------------------ the estimator
    def _accumulate(self, model: NoisySequential, x: Tensor, y: Tensor, replications: int):
        K, B = self.replications, x.shape[0]
        layers, shapes, widths = model.noisy_layers, model.unit_shapes, model.widths
        m = 2 if self.antithetic else 1
        chunk = self._chunk_size(model, B, x.element_size(), replications, m)
        y_rep = y.repeat(chunk)
        zeros = lambda *s: torch.zeros(*s, dtype=x.dtype, device=x.device)  # noqa: E731
        sizes = [min(chunk, replications - s) for s in range(0, replications, chunk)]
        # all K replications in one chunk of one process: Sᵢ is known after the forward pass, so the
        # baseline weights are formed directly and no per-input sums are needed (same estimate)
        direct = self.baseline and len(sizes) == 1 and self._single_process
        per_input = self.baseline and not direct
        acc = _Accumulator(
            grads=[[torch.zeros_like(p) for p in layer.parameters()] for layer in layers],
            loss_per_input=zeros(B),
            score_per_input=[zeros(B, *u) for u in shapes] if per_input else [],
            grads_per_input=[None] + [[zeros(B, *p.shape) for p in layer.parameters()] for layer in layers[1:]]
            if per_input else [],
            nonfinite=torch.zeros((), dtype=torch.long, device=x.device), direct=direct)
        for noise, scores, score_scale in self._noise_and_scores(model, sizes, B, x):
            k = noise.shape[0]
            out, inputs = model(x, noise=noise, return_inputs=True)
            losses = self.loss(out.reshape(k * B, -1), y_rep[:k * B]).reshape(k, B)
            acc.nonfinite += (~torch.isfinite(losses)).sum()
            acc.loss_per_input += losses.sum(0)
            # a: the part of the weight w known within this chunk (module docstring)
            if not self.baseline:
                a = losses
            elif acc.direct:
                S = losses.sum(0)
                others = S - losses
                if self.antithetic:
                    half = k // 2
                    others = others - torch.cat([losses[half:], losses[:half]])
                a = losses - others / (K - (2 if self.antithetic else 1))
            elif self.antithetic:
                half = k // 2
                pair = losses[:half] + losses[half:]
                a = losses + torch.cat([pair, pair]) / (K - 2)
            else:
                a = losses * (K / (K - 1))
            if score_scale != 1.0:
                a = a * score_scale
            offset = 0
            for t, (layer, unit) in enumerate(zip(layers, shapes)):
                s_flat = scores[..., offset:offset + widths[t]]           # (k, B, units), a view
                s = s_flat.reshape(k, B, *unit)
                offset += widths[t]
                if self.baseline and not acc.direct:
                    acc.score_per_input[t].add_(s.sum(0), alpha=score_scale)
                    if t > 0:
                        for g_acc, g in zip(acc.grads_per_input[t], layer.glr_grads_per_input(inputs[t], s)):
                            g_acc.add_(g, alpha=score_scale)
                aw = a.reshape(k, B, *[1] * len(unit))
                if t == 0:  # the first noisy layer's input is the same for all replications: Σₖ a s first
                    # (one batched (1 × k)·(k × units) product per input, reading s in place)
                    sa = torch.bmm(a.t().unsqueeze(1), s_flat.transpose(0, 1)).reshape(B, *unit)
                    g = layer.glr_grads(inputs[0], sa)
                else:
                    g = layer.glr_grads(inputs[t].reshape(k * B, *inputs[t].shape[2:]),
                                        (s * aw).reshape(k * B, *unit))
                for g_acc, gi in zip(acc.grads[t], g):
                    g_acc.add_(gi)
        return acc, len(sizes)

    def _finalize(self, acc: _Accumulator, model: NoisySequential, x: Tensor) -> list[Tensor]:
        """Σ w · (layer gradient under s) per parameter, subtracting the Sᵢ/(K − m) part."""
        grads = []
        c = 1.0 / (self.replications - (2 if self.antithetic else 1)) if self.baseline else 0.0
        S = acc.loss_per_input
        for t, layer in enumerate(model.noisy_layers):
            gs = acc.grads[t]
            if self.baseline and not acc.direct:
                if t == 0:
                    sw = S.reshape(-1, *[1] * (acc.score_per_input[0].dim() - 1)) * acc.score_per_input[0]
                    correction = layer.glr_grads(model.bind(x), sw)
                else:
                    correction = [torch.einsum("b,b...->...", S, g) for g in acc.grads_per_input[t]]
                gs = [g - c * corr for g, corr in zip(gs, correction)]
            grads += gs
        return grads

    def _noise_and_scores(self, model: NoisySequential, sizes: list[int], B: int, x: Tensor):
        """Yield (noise r, s̃, c) per chunk, with the score s(r) = c · s̃.

        For Normal noise s(r) = r/σ², so s̃ is r itself and c = 1/σ² (no extra pass).
        """
        width = sum(model.widths)
        scale = linear_score_scale(model.noise)
        stream = self._stream.chunks(model.noise, sizes, B, width, x, self._generator(x.device), self.antithetic)
        for noise in stream:
            if scale is not None:
                yield noise, noise, scale
                continue
            if self._score_buffer is None or self._score_buffer.shape[0] < noise.shape[0] \
                    or self._score_buffer.shape[1:] != noise.shape[1:] or self._score_buffer.dtype != noise.dtype:
                self._score_buffer = torch.empty_like(noise)
            yield noise, score(model.noise, noise, out=self._score_buffer[:noise.shape[0]]), 1.0

    def _chunk_size(self, model: NoisySequential, B: int, itemsize: int, replications: int, m: int) -> int:
        """Replications per chunk: fits the memory budget, a multiple of m, and draws a
        multiple of 16 random numbers so that the random stream does not depend on it."""
        width = sum(model.widths)
        extra = 0  # per-input gradients of convolutions under the baseline unfold their inputs
        if self.baseline:
            for layer, unit in zip(model.noisy_layers[1:], model.unit_shapes[1:]):
                if isinstance(layer, torch.nn.Conv2d):
                    extra += layer.weight[0].numel() * math.prod(unit[1:])
        per_replication = max(B, 1) * (6 * width + extra + 8) * itemsize   # noise, scores, v, φ(v), loss temps
        budget = self.memory_budget_mb
        if self.prefetch:  # double-buffered noise: two chunks in flight, each cache-sized
            budget = min(budget / 2, PREFETCH_CHUNK_MB)
        k = int(budget * 2**20) // per_replication
        align = m * (16 // math.gcd(B * width, 16))
        k = max(align, k // align * align)
        return min(k, replications)

    def _generator(self, device) -> torch.Generator:
        if self.generator is None:
            seed = int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        return self.generator

    # ------------------------------------------------------------------ distribution hooks
    _single_process = True  # DistributedGLR: False (Sᵢ needs every rank's losses)

    def _local_replications(self) -> int:
        return self.replications

    def _global_batch(self, x: Tensor) -> int:
        return x.shape[0]

    def _combine_loss_sums(self, acc: _Accumulator, x: Tensor) -> None:
        """Make Sᵢ the sum over all K replications (distributed: over every rank's share)."""

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        """Sum across processes (single process: nothing to do)."""


class Backprop:
    """Back-propagation through the same network, for the baselines (same interface as GLR).

    ``noise=False``: the noise-free network (the seed's BP baseline). ``noise=True``: the
    pathwise gradient through K noisy replications — unbiased for smooth φ and L, and the
    reference the GLR tests compare against. Requires a differentiable loss.
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

    def backward(self, model: NoisySequential, x: Tensor, y: Tensor) -> GradStats:
        x = check_batch(model, x, y)
        if "threshold" in model.activations():
            raise ValueError("back-propagation through the 'threshold' activation gives zero gradients; use GLR")
        if self.noise:
            r = model.sample_noise(self.replications, x.shape[0], generator=self.generator)
            out = model(x, noise=r)
            loss = self.loss(out.reshape(-1, out.shape[-1]), y.repeat(self.replications)).mean()
        else:
            loss = self.loss(model(x), y).mean()
        loss.backward()
        return GradStats(loss=loss.detach(), replications=self.replications if self.noise else 1)
