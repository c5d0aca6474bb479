"""The noisy forward pass: k replications of a batch of B inputs through any ``nn.Module`` with noisy layers.

An :class:`Injection` is the handler (:mod:`glrnet.nn.intercept`) of one noisy pass: each noisy layer
it reaches takes its noise (k, B, width) from it, and its perturbation object turns the layer's input
into the noisy pre-activation. The batch grows from B to k·B rows (replication-major) at the first
noisy layer, so everything before it is computed once per input. Where that is not safe (a noisy layer
inside a branch, e.g. a residual block, whose skip connection would still carry B rows), the input of
the outermost such module is repeated k times instead (:func:`noisy_forward` decides; the result is the
same).

:func:`probe` finds a model's noisy layers in execution order and their unit shapes with one noise-free
pass on one input; :class:`Layout` places every layer's noise in one flat buffer (k, B, W) and fills it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .intercept import intercept
from .layers import NoisyLayer
from .modules import noisy_layers
from .noise import same_noise, sample_
from .perturbations import Perturbation

# modules whose output in training mode depends on the other rows of the batch: in a noisy pass those rows
# are the other replications, whose noise would then reach every replication's loss
BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm,)


class Injection:
    """The noise of one noisy forward pass: k replications of a batch of B inputs.

    ``noise[i]`` (k, B, width) enters noisy layer ``layers[i]`` through ``perturbations[i]`` (default:
    the layer's own); layers without an entry stay noise-free. With ``record``, the input h each noisy
    layer saw is kept in ``inputs[i]`` — (B, *in) if it came before the batch grew, else (k·B, *in).
    Always: the execution order and unit shapes (``order`` / ``shapes``), and in ``noise_free_inputs``
    the layers whose input no noise had reached (the same for every replication and chunk).
    Subclasses change what a layer outputs from its noisy pre-activation by overriding :meth:`activate`.
    """

    def __init__(self, layers: Sequence[NoisyLayer], k: int, batch: int, noise: dict[int, Tensor] | None = None,
                 record: bool = False, perturbations: Sequence[Perturbation] | None = None):
        self.layers = list(layers)
        self.index = {id(m): i for i, m in enumerate(layers)}
        self.perturbations = list(perturbations) if perturbations is not None else [m.perturbation for m in layers]
        self.k, self.batch, self.noise, self.record = k, batch, noise or {}, record
        self.inputs: dict[int, Tensor] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.order: list[int] = []
        self.noise_free_inputs: set[int] = set()
        self.applications: dict[int, int] | None = None   # probe(): applications per layer, counted

    def __enter__(self):
        self._cm = intercept(self)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def apply(self, layer: NoisyLayer, h: Tensor) -> Tensor:
        i = self.index.get(id(layer))
        if i is None:  # a noisy layer of another model
            return layer.act(layer.affine(h))
        if i in self.shapes:
            if self.applications is not None:   # probing: count the applications (a layer through time)
                self.applications[i] += 1
                return layer.act(layer.affine(h))
            raise RuntimeError(f"noisy layer {i} ({type(layer).__name__}) ran twice in one forward pass; "
                               "this pass applies a noisy layer once (the GLR estimator, Backprop(noise=True), "
                               "ForwardGradient and LAP prediction apply it once per time step)")
        k, B = self.k, self.batch
        if h.shape[0] not in (B, k * B):
            raise RuntimeError(f"noisy layer {i} got a batch of {h.shape[0]} rows; expected {B} inputs or "
                               f"{k}·{B} replications")
        if self.record:
            self.inputs[i] = h
        if not any(j in self.noise for j in self.order):   # no noisy layer ran before this one
            self.noise_free_inputs.add(i)
        self.order.append(i)
        if self.applications is not None:
            self.applications[i] = 1
        r = self.noise.get(i)
        if r is None:
            v = layer.affine(h)
        else:
            v = self.perturbations[i].forward(layer, h, r, k, B, torch.is_grad_enabled())
        self.shapes[i] = tuple(v.shape[1:])
        return self.activate(i, layer, v, h)

    def activate(self, i: int, layer: NoisyLayer, v: Tensor, h: Tensor) -> Tensor:
        """φ(v): the layer's output from its noisy pre-activation v (h: its input)."""
        return layer.act(v)


@dataclass
class Probe:
    """What one noise-free pass over one input tells about a model's noisy layers."""

    layers: list[NoisyLayer]          # noisy_layers(model)
    order: list[int]                  # indices into ``layers``, in execution order
    shapes: dict[int, tuple[int, ...]]
    classes: int                      # width of the output
    perturbations: list[Perturbation]
    applications: dict[int, int] = field(default_factory=dict)   # per layer per pass: T for a layer through time

    @property
    def repeated(self) -> bool:
        """Whether some noisy layer is applied several times per pass (through time: glrnet.nn.through_time)."""
        return any(n > 1 for n in self.applications.values())

    def width(self, i: int) -> int:
        """Noise values per (replication, input) of layer i."""
        return self.perturbations[i].width(self.layers[i], self.shapes[i])


def check_batch_statistics(model: nn.Module) -> None:
    """A ``ValueError`` naming a module that normalises over the batch in training mode."""
    for name, m in model.named_modules():
        if isinstance(m, BATCH_STATISTICS) and m.training:
            raise ValueError(f"{type(m).__name__} {name!r} is in training mode: it normalises over the batch, whose "
                             "rows in a noisy pass are the K replications, so each replication's output would "
                             "depend on the others' noise (and its running statistics would move): call .eval() on "
                             "it, or use GroupNorm / LayerNorm")


@torch.no_grad()
def probe(model: nn.Module, x: Tensor, perturbation: Perturbation | None = None) -> Probe:
    """Execution order and unit shapes of ``model``'s noisy layers, from a noise-free pass on x[:1] that
    changes no state. ``perturbation``: used in every noisy layer instead of its own (with its noise, or
    the layer's where it has none)."""
    layers = noisy_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no noisy layer (NoisyLinear, NoisyConv2d): "
                         "GLR needs at least one")
    check_batch_statistics(model)
    perts = [m.perturbation for m in layers]
    if perturbation is not None:
        perts = [perturbation if perturbation.noise is not None else perturbation.with_noise(m.noise) for m in layers]
        for m, p in zip(layers, perts):
            p.check(m)
    inj = Injection(layers, 1, 1, perturbations=perts)
    inj.applications = {}
    with inj:
        out = model(x[:1])
    unused = [i for i in range(len(layers)) if i not in inj.shapes]
    if unused:
        raise ValueError(f"noisy layers {unused} of {type(model).__name__} are not used by its forward pass")
    return Probe(layers, inj.order, inj.shapes, math.prod(out.shape[1:]), perts, inj.applications)


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def _expansion_point(model: nn.Module, first: NoisyLayer) -> nn.Module | None:
    """None if the batch may grow lazily at ``first`` (it lies on a chain of ``nn.Sequential`` s
    from the root); else the outermost module off that chain that contains it."""
    m = model
    while m is not first:
        if not isinstance(m, nn.Sequential):
            return m
        m = next(c for c in m if _contains(c, first))
    return None


@contextmanager
def _repeat_input(module: nn.Module, k: int, batch: int):
    """While active, ``module``'s first input of ``batch`` rows is repeated k times (replication-major)."""
    def hook(mod, args):
        h = args[0]
        if h.shape[0] == batch:
            return (h.repeat(k, *[1] * (h.dim() - 1)), *args[1:])
        return None
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def noisy_forward(model: nn.Module, x: Tensor, injection: Injection, first: NoisyLayer | None) -> Tensor:
    """``model(x)`` inside ``injection``: output (k·B, ...) (replication-major). ``first``: the
    first noisy layer (in execution order) that has noise; the batch grows there."""
    k, B = injection.k, injection.batch
    point = None if first is None or k == 1 else _expansion_point(model, first)
    with injection:
        if point is None:
            out = model(x)
        elif point is model:
            out = model(x.repeat(k, *[1] * (x.dim() - 1)))
        else:
            with _repeat_input(point, k, B):
                out = model(x)
    if out.shape[0] == B and k > 1:  # no noise reached the output (every layer quiet)
        out = out.unsqueeze(0).expand(k, *out.shape).reshape(k * B, *out.shape[1:])
    return out


def layer_noise(layers: Sequence[NoisyLayer], perturbations: Sequence[Perturbation] | None = None
                ) -> Distribution | None:
    """The one noise distribution shared by ``layers`` (or by their ``perturbations``), or None if they differ."""
    noises = [p.noise for p in perturbations] if perturbations is not None else [m.noise for m in layers]
    return noises[0] if all(same_noise(noises[0], n) for n in noises[1:]) else None


class Layout:
    """Where each noisy layer's noise lies in one flat buffer (k, B, W) for the ``active`` layers
    (indices into ``probe.layers``, in execution order), and how to fill it with a sampler.

    A layer whose perturbation is not ``per_input`` (one draw per replication, shared by the batch) has
    only its row b = 0 drawn (the sampler fills a (k, 1, width) buffer, so antithetic pairs and QMC nets
    over the replications are built as for any slice); the other B − 1 rows are never read."""

    def __init__(self, pr: Probe, active: Sequence[int] | None = None):
        self.probe = pr
        self.active = [i for i in pr.order if active is None or i in set(active)]
        self.offsets, offset = {}, 0
        for i in self.active:
            self.offsets[i] = offset
            offset += pr.width(i)
        self.width = offset
        self.perturbations = {i: pr.perturbations[i] for i in self.active}
        self.shared = layer_noise([pr.layers[i] for i in self.active], list(self.perturbations.values()))
        self.per_input = all(p.per_input for p in self.perturbations.values())

    @property
    def first(self) -> NoisyLayer:
        return self.probe.layers[self.active[0]]

    def fill_(self, sampler, out: Tensor, generator) -> Tensor:
        """Fill ``out`` (k, B, W): one draw when every active layer has the same noise and draws it per input,
        else per layer (a layer that draws once per replication: its row 0 only)."""
        if self.shared is not None and self.per_input:
            return sampler.fill_(self.shared, out, generator)
        for i in self.active:
            o, w, p = self.offsets[i], self.probe.width(i), self.perturbations[i]
            rows = out.shape[1] if p.per_input else 1
            part = torch.empty_like(out[:, :rows, o:o + w])
            out[:, :rows, o:o + w] = p.fill_(self.probe.layers[i], sampler, part, generator)
        return out

    def views(self, flat: Tensor) -> dict[int, Tensor]:
        """Per active layer, its (k, B, width) slice of ``flat``."""
        return {i: flat[..., o:o + self.probe.width(i)] for i, o in self.offsets.items()}

    def injection(self, k: int, batch: int, flat: Tensor, record: bool = False, cls: type = Injection) -> Injection:
        """The injection that feeds ``flat`` (k, B, W) to the active layers."""
        return cls(self.probe.layers, k, batch, self.views(flat), record=record,
                   perturbations=self.probe.perturbations)


def forward_with_flat_noise(model: nn.Module, x: Tensor, noise: Tensor, injection: type = Injection) -> Tensor:
    """``model`` on ``x`` (B, ...) with noise (..., B, Σ widths) split across its noisy layers in
    execution order; output (..., B, C). ``injection``: the handler class (a subclass changes φ)."""
    layout = Layout(probe(model, x))
    B, W = x.shape[0], layout.width
    if noise.dim() < 2 or noise.shape[-1] != W or noise.shape[-2] != B:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (..., {B}, Σ widths = {W})")
    lead = tuple(noise.shape[:-2])
    k = math.prod(lead)
    out = noisy_forward(model, x, layout.injection(k, B, noise.reshape(k, B, W), cls=injection), layout.first)
    return out.reshape(*lead, B, *out.shape[1:])


def sample_noise(model: nn.Module, *shape: int, x: Tensor | None = None, sampler=None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Noise for :func:`forward_with_flat_noise`, shape (*shape, Σ widths) (the last axis of ``shape``: the
    inputs), drawn by ``sampler`` (default i.i.d.) over the first axis; a layer that draws once per
    replication has its row 0 copied to every input (only it is read). ``x``: an input to probe the model
    with (default ``model.example_input()``)."""
    if x is None:
        x = model.example_input()
    layout = Layout(probe(model, x))
    p = next(model.parameters())
    r = torch.empty(*shape, layout.width, dtype=p.dtype, device=p.device)
    flat = r.reshape(shape[0] if shape else 1, -1, layout.width)
    layout.fill_(sampler or _IID_SAMPLER, flat, generator)
    for i, part in layout.views(flat).items():
        if not layout.perturbations[i].per_input:
            part[:, 1:] = part[:, :1]
    return r


class _IIDSampler:
    """Independent draws (the estimators' i.i.d. sampler, without importing the estimators)."""

    group_size = 1

    def fill_(self, dist, out, generator):
        return sample_(dist, out, generator)


_IID_SAMPLER = _IIDSampler()


def bind(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` shaped as ``model``'s inputs (a NoisySequential reshapes flat batches)."""
    return model.bind(x) if hasattr(model, "bind") else x


def check_batch(model: nn.Module, x: Tensor, y: Tensor | None = None, classes: int | None = None,
                values: bool = True) -> Tensor:
    """``x`` shaped as the model's inputs, or a ``ValueError`` naming the problem (shape, NaN/inf, labels).
    ``values=False``: shapes and dtypes only, no look at the values (no host synchronisation)."""
    if not torch.is_tensor(x):
        raise ValueError(f"inputs must be a tensor, got {type(x).__name__}")
    x = bind(model, x)
    if x.dim() < 2:
        raise ValueError(f"inputs must have a batch axis, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {x.dtype}")
    if values and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(len(x), -1).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"inputs contain NaN or inf (rows {bad}...)")
    if y is None:
        return x
    if not torch.is_tensor(y) or y.shape != (x.shape[0],):
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match the inputs, got {shape}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    if values:
        if classes is None:
            classes = probe(model, x).classes
        if y.numel() and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"labels must lie in [0, {classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    return x
