"""Where a noisy layer's noise enters: one class per perturbation, each holding everything the noisy
forward pass and the GLR estimator need from it.

A noisy layer carries a perturbation object (``NoisyLinear(..., perturbation=Weight())``), as a
spiking neuron carries its surrogate gradient: no other file asks "which kind is this?". A
perturbation draws its noise r ~ f (``noise``, a ``torch.distributions`` object) and says

* how wide its noise is per (replication, input) and how to draw it (:meth:`width`, :meth:`fill_`);
* how it changes the layer's pre-activation (:meth:`forward`);
* its term in the reference estimator (:meth:`reference_term`): a scalar whose autograd gradient in
  the layer's parameters is Σₖᵢ wₖᵢ · J_θ(layer)ᵀ s(rₖᵢ) — the definition, for readers and tests;
* its running sums in the fast path (:meth:`accumulate`, :meth:`correction`), tested equal to it;
* for a layer applied several times in one pass (through time, :mod:`glrnet.nn.through_time`), whether its
  noise is drawn afresh at every application (activity) or once per pass and ``held`` (parameter noise).

Built in (``PERTURBATIONS``):

``activity``  noise on the output units, v = layer(h) + r (the seed's neurons);
              ∇θ E[L] = E[L · J_θ(layer(h))ᵀ s(r)].
``weight``    noise on the parameters, one draw eₖ per replication shared by the batch, v = layer(h; θ + eₖ);
              ∇θ E[L(θ + e)] = E[L · s(e)] (the evolution-strategies likelihood ratio; any φ).
``flipout``   that draw with per-input random signs on rows and columns (Wen et al. 2018): each input's noise
              is again i.i.d. f, different inputs' are uncorrelated (needs f symmetric).
``channel``   the parameters of one output channel per replication, the channel uniform: O·1[cₖ = c] s(eₖ)
              is unbiased for channel c's gradient of E[L with noise in channel c only].

To add one: subclass :class:`Perturbation` in one file and :func:`register_perturbation` it
(``tests/test_extensions.py`` does this for a new perturbation and runs it through the same checks).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from .noise import is_symmetric, score, validate_noise


def add_noise(z: Tensor, r: Tensor, k: int, batch: int, grad: bool) -> Tensor:
    """v = z + r as (k·B, *unit) rows, replication-major; z (B or k·B, *unit), r (k, B, *unit). Where the
    batch grows (z has B rows) z is computed once per input; without autograd in place where it can."""
    unit = tuple(z.shape[1:])
    r = r.reshape(k, batch, *unit)
    grad = grad or z.requires_grad
    if z.shape[0] == batch and k > 1:
        if grad:
            return (z.unsqueeze(0) + r).reshape(k * batch, *unit)
        return torch.add(z.unsqueeze(0), r, out=z.new_empty((k, batch, *unit))).reshape(k * batch, *unit)
    if grad:
        return z + r.reshape(z.shape)
    return z.reshape(k, batch, *unit).add_(r).reshape(z.shape)


class Perturbation:
    """Base class. ``noise``: the density f of the noise (None: the layer's default, Normal(0, 2),
    filled in when a layer takes the object). ``per_input``: draws noise for every input of a batch
    (False: one draw per replication, shared by the batch)."""

    name = "perturbation"
    per_input = True
    held = False   # a layer applied several times per pass (through time): one draw held over every application

    def __init__(self, noise: Distribution | None = None):
        self.noise = None if noise is None else validate_noise(noise)

    def with_noise(self, noise: Distribution) -> "Perturbation":
        """A copy with ``noise`` (the original is untouched)."""
        new = copy.copy(self)
        new.noise = validate_noise(noise)
        return new

    def check(self, layer: nn.Module) -> None:
        """A ``ValueError`` if this perturbation cannot be used on ``layer``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.noise})"

    # ------------------------------------------------------------------ drawing
    def width(self, layer: nn.Module, unit: tuple[int, ...]) -> int:
        """Noise values per (replication, input) for a layer whose output per input has shape ``unit``."""
        raise NotImplementedError

    def fill_(self, layer: nn.Module, sampler, out: Tensor, generator) -> Tensor:
        """Fill ``out`` (k, rows, width): rows = B (``per_input``) or 1."""
        return sampler.fill_(self.noise, out, generator)

    # ------------------------------------------------------------------ the noisy forward pass
    def forward(self, layer: nn.Module, h: Tensor, r: Tensor, k: int, batch: int, grad: bool) -> Tensor:
        """The noisy pre-activation (k·B, *unit) for the input h (B or k·B rows) and this layer's noise r
        (k, B, width)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the estimator: definition
    def reference_term(self, layer: nn.Module, h: Tensor, r: Tensor, w: Tensor) -> Tensor:
        """A scalar whose gradient in the layer's parameters is Σₖᵢ wₖᵢ · J_θ(layer(hₖᵢ))ᵀ s(rₖᵢ); h (K·B, *in),
        r (K, B, width), w (K, B) the loss weights (held fixed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the estimator: fast path
    def accumulate(self, layer: nn.Module, state: dict, h: Tensor, r: Tensor, a: Tensor, *, unit: tuple[int, ...],
                   shared: bool, linear: bool, scale: float, chunked: bool) -> list[Tensor]:
        """Σₖᵢ aₖᵢ · J_θ(layer)ᵀ s(rₖᵢ) over one chunk of k replications, per parameter (``parameters()``
        order). ``linear``: r is the score up to the factor ``scale`` (Normal noise: s(r) = r/σ², folded
        into a). ``shared``: h (B, *in) is the same for every replication. ``chunked``: the control variate
        is split (w = a − c·Sᵢ, Sᵢ over all chunks): keep in ``state`` what :meth:`correction` needs."""
        raise NotImplementedError

    def correction(self, layer: nn.Module, state: dict, S: Tensor) -> list[Tensor]:
        """Σᵢ Sᵢ Σₖ J_θ(layer(hₖᵢ))ᵀ s(rₖᵢ) from what :meth:`accumulate` kept (chunked control variates)."""
        raise NotImplementedError

    def chunk_extra(self, layer: nn.Module, unit: tuple[int, ...], chunked: bool) -> int:
        """Working-set values per (replication, input) beyond the noise and the activations."""
        return 0

    # ------------------------------------------------------------------ for deterministic surrogates
    def preactivation_variance(self, layer: nn.Module, h2: Tensor) -> Tensor | float:
        """The variance this noise adds to each pre-activation unit, given E[h²] of the input (B, *in)."""
        raise NotImplementedError

    def perturbed_fraction(self, layer: nn.Module) -> float:
        """The probability that a given unit sees this noise in a replication."""
        return 1.0


class Activity(Perturbation):
    """Noise on the output units: v = layer(h) + r, r ~ f i.i.d. per unit."""

    name = "activity"

    def width(self, layer, unit):
        return math.prod(unit)

    def forward(self, layer, h, r, k, batch, grad):
        return add_noise(layer.affine(h), r, k, batch, grad)

    def reference_term(self, layer, h, r, w):
        cotangent = w.reshape(*w.shape, *[1] * (r.dim() - 2)) * score(self.noise, r)       # w ⊙ s(r)
        z = layer.affine(h.detach())                                                     # layer(stop_grad(h))
        return (cotangent.reshape(z.shape) * z).sum()

    def accumulate(self, layer, state, h, r, a, *, unit, shared, linear, scale, chunked):
        k, B = a.shape
        s = (r if linear else score(self.noise, r)).reshape(k, B, *unit)
        if chunked:
            if "score" not in state:
                state["score"] = torch.zeros(B, *unit, dtype=a.dtype, device=a.device)
            state["score"].add_(s.sum(0), alpha=scale)
            if shared:
                state["input"] = h
            else:
                g_in = layer.glr_grads_per_input(h.reshape(k, B, *h.shape[1:]), s)
                acc = state.setdefault("per_input", [torch.zeros_like(g) for g in g_in])
                for t, g in zip(acc, g_in):
                    t.add_(g, alpha=scale)
        if shared:   # the input is the same for all replications: Σₖ a s first (one bmm per input)
            if linear:   # reads the noise slice in place
                sa = torch.bmm(a.t().unsqueeze(1), r.transpose(0, 1)).reshape(B, *unit)
            else:
                sa = torch.einsum("kb,kb...->b...", a, s)
            return layer.glr_grads(h, sa)
        return layer.glr_grads(h, (s * a.reshape(k, B, *[1] * len(unit))).reshape(k * B, *unit))

    def correction(self, layer, state, S):
        if "input" in state:
            sw = S.reshape(-1, *[1] * (state["score"].dim() - 1)) * state["score"]
            return layer.glr_grads(state["input"], sw)
        return [torch.einsum("b,b...->...", S, g) for g in state["per_input"]]

    def chunk_extra(self, layer, unit, chunked):
        # per-input gradients of a convolution under the chunked baseline unfold its input
        return layer.weight[0].numel() * math.prod(unit[1:]) if chunked and isinstance(layer, nn.Conv2d) else 0

    def preactivation_variance(self, layer, h2):
        if not isinstance(self.noise, Normal):
            raise ValueError(f"moment surrogates assume Gaussian unit noise; {type(layer).__name__} has {self.noise!r}")
        return float(self.noise.variance)


class Weight(Perturbation):
    """Noise on the parameters: replication k runs layer(h; θ + eₖ), eₖ ~ f i.i.d. on each of the P
    parameters, shared by the batch. The slice is P wide; only row 0 is drawn and read."""

    name = "weight"
    per_input = False
    held = True

    def width(self, layer, unit):
        return layer.parameter_count

    def draw(self, layer: nn.Module, r: Tensor) -> Tensor:
        """eₖ (k, P) from the noise slice (k, B or 1, width)."""
        return r.reshape(r.shape[0], -1, r.shape[-1])[:, 0]

    def parameter_score(self, layer: nn.Module, r: Tensor, linear: bool = False) -> Tensor:
        """The likelihood ratio of the parameter noise, (k, P) (``linear``: the noise itself)."""
        e = self.draw(layer, r)
        return e if linear else score(self.noise, e)

    def forward(self, layer, h, r, k, batch, grad):
        e = self.draw(layer, r)
        if h.shape[0] == k * batch and not grad:   # each replication's own input through θ + eₖ: one pass
            v = layer.perturbed(h, e, k, batch)
            return v.reshape(k * batch, *v.shape[2:])
        return add_noise(layer.affine(h), layer.weight_effect(h, e, k, batch), k, batch, grad)

    def reference_term(self, layer, h, r, w):
        theta = torch.cat([p.reshape(-1) for p in layer.parameters(recurse=False)])
        return (w.sum(1) @ self.parameter_score(layer, r) * theta).sum()

    def accumulate(self, layer, state, h, r, a, *, unit, shared, linear, scale, chunked):
        s = self.parameter_score(layer, r, linear)                                     # (k, P)
        if chunked:
            acc = state.setdefault("score", torch.zeros(s.shape[1], dtype=s.dtype, device=s.device))
            acc.add_(s.sum(0), alpha=scale)
        return layer.split_parameters(a.sum(1) @ s)

    def correction(self, layer, state, S):     # Σₖ Σᵢ Sᵢ s(eₖ) = (Σᵢ Sᵢ) Σₖ s(eₖ)
        return layer.split_parameters(S.sum() * state["score"])

    def preactivation_variance(self, layer, h2):
        # i.i.d. variance σ² on every weight and bias: σ²·layer(E[h²]; weights 1), a sum of many terms
        ones = h2.new_full((1, layer.parameter_count), float(self.noise.variance))
        return layer.weight_effect(h2, ones, 1, h2.shape[0])[0]


class Channel(Weight):
    """The parameters of one output channel per replication: channel cₖ uniform over the O channels, eₖ ~ f
    on its P/O values (its kernel or row, and its bias). The slice is P/O + 1 wide: eₖ in row 0's first P/O
    values, cₖ (as a float) in its last. Cheaper than :class:`Weight` where the input is shared: z once, plus
    one channel's effect per replication."""

    name = "channel"

    def width(self, layer, unit):
        return layer.weight[0].numel() + (1 if layer.bias is not None else 0) + 1

    def fill_(self, layer, sampler, out, generator):
        # each of the k/m sampler groups (antithetic pairs, QMC nets) one channel, the groups' channels consecutive
        # from a uniform random start: each uniform, and the channels evenly covered within a chunk
        k, O, m = out.shape[0], layer.weight.shape[0], sampler.group_size
        start = torch.randint(0, O, (1,), generator=generator, device=out.device)
        c = (start + torch.arange(k // m, device=out.device)) % O
        out[:, :1, -1] = c.repeat_interleave(m).unsqueeze(1).to(out.dtype)
        part = torch.empty_like(out[:, :, :-1])
        out[:, :, :-1] = sampler.fill_(self.noise, part, generator)
        return out

    def split(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """eₖ (k, P/O) and cₖ (k,), long."""
        row = r.reshape(r.shape[0], -1, r.shape[-1])[:, 0]
        return row[:, :-1], row[:, -1].long()

    @staticmethod
    def scatter(layer: nn.Module, e: Tensor, c: Tensor) -> Tensor:
        """(k, P): eₖ (k, P/O) at channel cₖ's parameters, zero elsewhere (``parameters()`` order)."""
        k, O, W = e.shape[0], layer.weight.shape[0], layer.weight[0].numel()
        full = e.new_zeros(k, O, e.shape[1])
        full[torch.arange(k, device=e.device), c] = e
        parts = [full[..., :W].reshape(k, -1)] + ([full[..., W]] if layer.bias is not None else [])
        return torch.cat(parts, -1)

    def draw(self, layer, r):
        return self.scatter(layer, *self.split(r))

    def parameter_score(self, layer, r, linear=False):      # O·s(eₖ) on channel cₖ's parameters, 0 elsewhere
        e, c = self.split(r)
        return self.scatter(layer, (e if linear else score(self.noise, e)) * layer.weight.shape[0], c)

    def forward(self, layer, h, r, k, batch, grad):
        if h.shape[0] == batch and not grad:   # the input is shared: z once, then each replication's channel
            e, c = self.split(r)
            d = layer.channel_effect(h, e, k, batch)
            if d is not None:
                z = layer.affine(h)
                v = z.unsqueeze(0).expand(k, *z.shape).contiguous()
                v[torch.arange(k, device=v.device), :, c] += d
                return v.reshape(k * batch, *z.shape[1:])
        return super().forward(layer, h, r, k, batch, grad)

    def chunk_extra(self, layer, unit, chunked):   # a narrow slice whose layer's outputs are still per replication
        return 4 * math.prod(unit)

    def perturbed_fraction(self, layer):
        return 1.0 / layer.weight.shape[0]


class Flipout(Perturbation):
    """Input n of replication k sees the parameter noise eₖ ⊙ Mₖₙ, Mₖₙ[o, c] = ρₖₙ[o] ςₖₙ[c] for random signs ρ
    (per output unit or channel) and ς (per input unit or channel); the bias gets eₖ ⊙ ρₖₙ. For a symmetric f,
    eₖ ⊙ Mₖₙ is again i.i.d. f, so each input's likelihood ratio is s(eₖ) ⊙ Mₖₙ, while different inputs' noise
    is uncorrelated. Its effect is two cheap products, layer(h ⊙ ς; eₖ) ⊙ ρ. The slice is P + O + C wide: eₖ in
    row 0's first P values, the signs of the other O + C values of each row."""

    name = "flipout"
    held = True

    def check(self, layer):
        if not is_symmetric(self.noise):
            raise ValueError(f"perturbation 'flipout' needs noise symmetric about 0 (a sign flip must keep its law); "
                             f"got {self.noise}")

    def width(self, layer, unit):
        w = layer.weight
        return layer.parameter_count + w.shape[0] + w.shape[1] * getattr(layer, "groups", 1)

    @staticmethod
    def split(layer: nn.Module, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """eₖ (k, P), ρ (k, B, O) and ς (k, B, C) in {−1, +1}."""
        P, O = layer.parameter_count, layer.weight.shape[0]
        signs = r[..., P:].ge(0).to(r.dtype).mul_(2).sub_(1)
        return r[:, 0, :P], signs[..., :O], signs[..., O:]

    @staticmethod
    def mask(layer: nn.Module, rho: Tensor, vs: Tensor) -> Tensor:
        """Mₖₙ (..., P): the sign of each parameter's noise for that input (a grouped convolution's weight [o, j]
        reads input channel j of o's group)."""
        w, g = layer.weight, getattr(layer, "groups", 1)
        lead, O, Cg = rho.shape[:-1], w.shape[0], w.shape[1]
        m = rho.reshape(*lead, g, O // g, 1) * vs.reshape(*lead, g, 1, Cg)           # (..., g, O/g, C/g)
        m = m.reshape(*lead, O, Cg, *[1] * (w.dim() - 2)).expand(*lead, *w.shape).reshape(*lead, -1)
        return torch.cat([m, rho], -1) if layer.bias is not None else m

    @staticmethod
    def mask_sum(layer: nn.Module, a: Tensor, rho: Tensor, vs: Tensor) -> Tensor:
        """Σₙ aₖₙ Mₖₙ (k, P) for weights a (k, B), without forming the masks."""
        w, g = layer.weight, getattr(layer, "groups", 1)
        k, B, O, Cg = a.shape[0], a.shape[1], w.shape[0], w.shape[1]
        m = torch.einsum("kb,kbgo,kbgc->kgoc", a, rho.reshape(k, B, g, O // g), vs.reshape(k, B, g, Cg))
        m = m.reshape(k, O, Cg, *[1] * (w.dim() - 2)).expand(k, *w.shape).reshape(k, -1)
        return torch.cat([m, torch.einsum("kb,kbo->ko", a, rho)], -1) if layer.bias is not None else m

    def forward(self, layer, h, r, k, batch, grad):
        e, rho, vs = self.split(layer, r.reshape(k, batch, r.shape[-1]))
        hk = h.reshape(-1, batch, *h.shape[1:])                                  # (1 or k, B, *in)
        hs = (hk * vs.reshape(k, batch, -1, *[1] * (h.dim() - 2))).reshape(k * batch, *h.shape[1:])
        d = layer.weight_effect(hs, e, k, batch)
        d = d * rho.reshape(k, batch, -1, *[1] * (d.dim() - 3))
        return add_noise(layer.affine(h), d, k, batch, grad)

    def reference_term(self, layer, h, r, w):
        e, rho, vs = self.split(layer, r)
        s = score(self.noise, e).unsqueeze(1) * self.mask(layer, rho, vs)          # (K, B, P)
        theta = torch.cat([p.reshape(-1) for p in layer.parameters(recurse=False)])
        return (torch.einsum("kb,kbp->p", w, s) * theta).sum()

    def accumulate(self, layer, state, h, r, a, *, unit, shared, linear, scale, chunked):
        e, rho, vs = self.split(layer, r)
        s = e if linear else score(self.noise, e)
        if chunked:                          # per input: Σₖ s(eₖ) ⊙ Mₖᵢ, (B, P)
            acc = state.setdefault("score", torch.zeros(r.shape[1], s.shape[1], dtype=s.dtype, device=s.device))
            acc.add_(torch.einsum("kp,kbp->bp", s, self.mask(layer, rho, vs)), alpha=scale)
        return layer.split_parameters((s * self.mask_sum(layer, a, rho, vs)).sum(0))

    def correction(self, layer, state, S):   # Σᵢ Sᵢ Σₖ s(eₖ) ⊙ Mₖᵢ
        return layer.split_parameters(S @ state["score"])

    def preactivation_variance(self, layer, h2):   # each input's noise has the weight perturbation's marginals
        return Weight.preactivation_variance(self, layer, h2)


PERTURBATIONS: dict[str, type[Perturbation]] = {}


def register_perturbation(cls: type[Perturbation]) -> type[Perturbation]:
    """Make ``cls`` available by its ``name`` (layers' ``perturbation=``, the CLI, specs, saved models)."""
    PERTURBATIONS[cls.name] = cls
    return cls


for _cls in (Activity, Weight, Flipout, Channel):
    register_perturbation(_cls)


def get_perturbation(p: "str | Perturbation", noise: Distribution | None = None) -> Perturbation:
    """A perturbation object from a registered name (with ``noise``) or an instance (returned as is)."""
    if isinstance(p, Perturbation):
        return p
    if p not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {p!r}; valid: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[p](noise)
