"""Noisy layers, containers, and how noise reaches them during a noisy forward pass.

A *noisy layer* (:class:`NoisyLinear`, :class:`NoisyConv2d`; subclasses of the torch layers,
same parameters, same ``state_dict``) maps its input h to z = layer(h), then — inside a
noisy forward pass — to v = z + r with r ~ f i.i.d. per output unit (``layer.noise``), and
finally to φ(v) (``activation=None``: identity). Called on its own, outside a noisy pass,
it is the noise-free layer φ(z): the OT network. Noisy layers may sit at any depth of any
``nn.Module`` (inside an ``nn.Sequential``, a :class:`Residual` block, a user's module).

A noisy forward pass of k replications of a batch of B inputs is the ordinary ``forward``
run inside an :class:`Injection` context: each noisy layer it reaches takes its noise
(k, B, *units) from the context, and the batch grows from B to k·B rows (replication-major)
at the first noisy layer, so everything before it is computed once per input. Where that
is not safe (a noisy layer inside a branch, e.g. a residual block, whose skip connection
would still carry B rows), the input of the outermost such module is repeated k times
instead (:func:`noisy_forward` decides; the result is the same).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from .activations import ActivationLike, activation_name, get_activation
from .noise import describe, is_symmetric, make_noise, same_noise, score, validate_noise

DEFAULT_NOISE_STD = 2.0
SITES = ("activity", "weight", "flipout", "channel")   # where a noisy layer's noise enters: its output units,
#   or its parameters (one perturbation per replication, shared by the batch; flipout: that perturbation with
#   per-input random signs on its rows and columns, so that the inputs of a batch see decorrelated noise;
#   channel: the parameters of one output channel per replication, the channel drawn uniformly)
WEIGHT_SITES = ("weight", "channel")   # one parameter perturbation per replication, shared by the batch


def default_noise() -> Distribution:
    """Normal(0, 2): the seed's neuron noise (σ = 2 as the standard deviation)."""
    return Normal(0.0, DEFAULT_NOISE_STD)


class NoisyLayer:
    """Mixin of a layer whose output units carry noise ``self.noise`` before ``activation``.

    The GLR estimate of a noisy layer's parameters is that layer's own parameter gradient
    under the cotangent g = w ⊙ s(r) (loss weight times noise score): :meth:`glr_grads`
    (summed over samples) and :meth:`glr_grads_per_input` (summed over replications, kept
    per input; the chunked leave-one-out baseline needs it). Closed forms, inside one layer;
    the reference estimator gets the same by autograd through :meth:`affine`.
    """

    activation = None
    noise: Distribution
    site: str = "activity"

    def _setup(self, activation: ActivationLike, noise: Distribution | None, site: str = "activity") -> None:
        self.activation = None if activation is None else get_activation(activation)
        self.noise = validate_noise(default_noise() if noise is None else noise)
        if site not in SITES:
            raise ValueError(f"unknown perturbation site {site!r}; valid: {', '.join(SITES)}")
        self.site = site

    @property
    def parameter_count(self) -> int:
        """P: how many numbers the weight site perturbs (weight, then bias, flattened)."""
        return sum(p.numel() for p in self.parameters(recurse=False))

    def split_parameters(self, flat: Tensor) -> list[Tensor]:
        """A (..., P) tensor as [(..., *weight.shape), (..., *bias.shape)] in ``parameters()`` order."""
        out, o = [], 0
        for p in self.parameters(recurse=False):
            out.append(flat[..., o:o + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            o += p.numel()
        return out

    def weight_effect(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor:
        """Weight site: what the parameter noise e (k, P) of replication k adds to the pre-activation,
        layer(h; θ + eₖ) − layer(h; θ) = layer(h; eₖ) (the layer is affine in θ); (k, B, *units). ``h``:
        (B, *in) (shared by all replications) or (k·B, *in)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ flipout site
    # Flipout (Wen, Vicol, Ba, Tran, Grosse, ICLR 2018): input n of replication k sees the parameter
    # noise eₖ ⊙ Mₖₙ, with Mₖₙ[o, c] = ρₖₙ[o] ςₖₙ[c] for random signs ρ (per output unit or channel) and
    # ς (per input unit or channel); the bias gets eₖ ⊙ ρₖₙ. For a symmetric f, eₖ ⊙ Mₖₙ is again i.i.d.
    # f, so each input's loss has the weight-site likelihood ratio s(eₖ ⊙ Mₖₙ) = s(eₖ) ⊙ Mₖₙ, while
    # different inputs' perturbations are uncorrelated: the estimate's noise now averages over the batch.
    # Its effect is two cheap products, layer(h ⊙ ς; eₖ) ⊙ ρ. A flipout layer's noise slice is
    # P + O + C wide: eₖ in row 0's first P values, the signs of the other O + C values of each row.
    @property
    def flip_width(self) -> int:
        """O + C: output units (channels) plus input units (channels) of the flipout signs."""
        w = self.weight
        return w.shape[0] + w.shape[1] * getattr(self, "groups", 1)

    def flip_split(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A flipout slice (k, B, P + O + C) as eₖ (k, P), ρ (k, B, O) and ς (k, B, C) in {−1, +1}."""
        P, O = self.parameter_count, self.weight.shape[0]
        signs = r[..., P:].ge(0).to(r.dtype).mul_(2).sub_(1)
        return r[:, 0, :P], signs[..., :O], signs[..., O:]

    def flip_mask(self, rho: Tensor, vs: Tensor) -> Tensor:
        """Mₖₙ (..., P) for signs ρ (..., O), ς (..., C): the sign of each parameter's noise for that input
        (a grouped convolution's weight [o, j] reads input channel j of o's group)."""
        w, g = self.weight, getattr(self, "groups", 1)
        lead, O, Cg = rho.shape[:-1], w.shape[0], w.shape[1]
        m = rho.reshape(*lead, g, O // g, 1) * vs.reshape(*lead, g, 1, Cg)           # (..., g, O/g, C/g)
        m = m.reshape(*lead, O, Cg, *[1] * (w.dim() - 2)).expand(*lead, *w.shape).reshape(*lead, -1)
        return torch.cat([m, rho], -1) if self.bias is not None else m

    def flip_sum(self, a: Tensor, rho: Tensor, vs: Tensor) -> Tensor:
        """Σₙ aₖₙ Mₖₙ (k, P) for weights a (k, B): ``flip_mask`` contracted over the batch without forming it."""
        w, g = self.weight, getattr(self, "groups", 1)
        k, B, O, Cg = a.shape[0], a.shape[1], w.shape[0], w.shape[1]
        m = torch.einsum("kb,kbgo,kbgc->kgoc", a, rho.reshape(k, B, g, O // g), vs.reshape(k, B, g, Cg))
        m = m.reshape(k, O, Cg, *[1] * (w.dim() - 2)).expand(k, *w.shape).reshape(k, -1)
        return torch.cat([m, torch.einsum("kb,kbo->ko", a, rho)], -1) if self.bias is not None else m

    def flip_effect(self, h: Tensor, e: Tensor, rho: Tensor, vs: Tensor, k: int, batch: int) -> Tensor:
        """Flipout site: layer(hₙ; eₖ ⊙ Mₖₙ) = layer(hₙ ⊙ ς; eₖ) ⊙ ρ, (k, B, *units); ``h`` as in ``weight_effect``."""
        hk = h.reshape(-1, batch, *h.shape[1:])                                  # (1 or k, B, *in)
        extra = [1] * (h.dim() - 2)
        hs = (hk * vs.reshape(k, batch, -1, *extra)).reshape(k * batch, *h.shape[1:])
        out = self.weight_effect(hs, e, k, batch)
        return out * rho.reshape(k, batch, -1, *[1] * (out.dim() - 3))

    # ------------------------------------------------------------------ channel site
    # Each replication k perturbs the parameters of one output channel cₖ (a conv's kernel cₖ and its bias;
    # a linear layer's row cₖ), cₖ uniform over the O channels and eₖ ~ f on that channel's P/O values.
    # Channel c's likelihood ratio then comes from the replications that perturbed it: the estimate
    # Σₖ O·1[cₖ = c] wₖ s(eₖ) / K is unbiased for ∇θ_c E[L with noise in channel c only] (as layer-wise
    # injection is per layer). Same noise per replication as the weight site's, to first order, at a
    # fraction of its cost where the input is shared: z once, plus one channel's effect per replication.
    # The slice is P/O + 1 wide: eₖ in row 0's first P/O values, cₖ (as a float) in its last.
    @property
    def channel_width(self) -> int:
        """P/O: the parameters of one output channel (its kernel or row, and its bias)."""
        return self.weight[0].numel() + (1 if self.bias is not None else 0)

    def channel_split(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """A channel slice (k, B, P/O + 1) as eₖ (k, P/O) and cₖ (k,), long."""
        row = r.reshape(r.shape[0], -1, r.shape[-1])[:, 0]
        return row[:, :-1], row[:, -1].long()

    def channel_scatter(self, e: Tensor, c: Tensor) -> Tensor:
        """(k, P): eₖ (k, P/O) at channel cₖ's parameters, zero elsewhere (``parameters()`` order)."""
        k, O, W = e.shape[0], self.weight.shape[0], self.weight[0].numel()
        full = e.new_zeros(k, O, e.shape[1])
        full[torch.arange(k, device=e.device), c] = e
        parts = [full[..., :W].reshape(k, -1)] + ([full[..., W]] if self.bias is not None else [])
        return torch.cat(parts, -1)

    def channel_effect(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor | None:
        """What eₖ on its channel adds to that channel's pre-activation for a shared input h (B, *in):
        (k, B, *spatial); None where only the whole-layer path applies (grouped convolutions)."""
        raise NotImplementedError

    def affine(self, h: Tensor) -> Tensor:
        """z = layer(h): the torch layer's own forward, without noise or activation."""
        return super().forward(h)  # the torch base class (nn.Linear / nn.Conv2d) after this mixin

    def act(self, v: Tensor) -> Tensor:
        return v if self.activation is None else self.activation(v)

    def forward(self, h: Tensor) -> Tensor:
        injection = _ACTIVE.get()
        return self.act(self.affine(h)) if injection is None else injection.apply(self, h)

    def weight_noise(self, r: Tensor) -> Tensor:
        """Weight (channel) site: the parameter noise eₖ (k, P) of each replication, from its noise slice
        (k, B, width) (row 0: one perturbation per replication, shared by the batch)."""
        if self.site == "channel":
            return self.channel_scatter(*self.channel_split(r))
        return r.reshape(r.shape[0], -1, r.shape[-1])[:, 0]

    def weight_score(self, r: Tensor, score_of=None) -> Tensor:
        """The likelihood ratio of the parameter noise, (k, P): s(eₖ) (weight site), or O·s(eₖ) on channel
        cₖ's parameters and 0 elsewhere (channel site). ``score_of``: e ↦ s(e) (default: the noise's
        score; the Normal fast path passes the identity and scales by 1/σ² later)."""
        score_of = score_of or (lambda e: score(self.noise, e))
        if self.site == "channel":
            e, c = self.channel_split(r)
            return self.channel_scatter(score_of(e) * self.weight.shape[0], c)
        return score_of(self.weight_noise(r))

    def perturbed(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor:
        """layer(h; θ + eₖ) for each replication k, (k, B, *units): ``weight_effect`` at θ + e (the layer
        is affine in θ), one pass where the noise-free output and the effect would take two."""
        theta = torch.cat([p.reshape(-1) for p in self.parameters(recurse=False)])
        return self.weight_effect(h, e + theta, k, batch)

    def glr_grads(self, h: Tensor, g: Tensor) -> list[Tensor]:
        """[∂/∂weight, ∂/∂bias] of Σₙ ⟨gₙ, layer(hₙ)⟩ for inputs h (N, *in), cotangents g (N, *out)."""
        raise NotImplementedError

    def glr_grads_per_input(self, h: Tensor, g: Tensor) -> list[Tensor]:
        """The same summed over the replication axis only: h (K, B, *in), g (K, B, *out) → (B, *param)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        site = "" if self.site == "activity" else f", site={self.site}"
        return f"{super().extra_repr()}, activation={_act_name(self.activation)}, noise={self.noise}{site}"

    def _site_config(self) -> dict:
        return {} if self.site == "activity" else {"site": self.site}


class NoisyLinear(NoisyLayer, nn.Linear):
    """``torch.nn.Linear`` whose outputs carry noise (default Normal(0, 2)), then ``activation``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: ActivationLike = None,
                 noise: Distribution | None = None, site: str = "activity", device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup(activation, noise, site)

    def weight_effect(self, h, e, k, batch):
        dw, *db = self.split_parameters(e)
        hk = h if h.shape[0] == batch else h.reshape(k, batch, self.in_features)
        out = torch.matmul(hk, dw.transpose(1, 2))                         # (k, B, out)
        return out + db[0].unsqueeze(1) if db else out

    def channel_effect(self, h, e, k, batch):
        out = e[:, :self.in_features] @ h.T                                   # (k, B)
        return out + e[:, -1:] if self.bias is not None else out

    def glr_grads(self, h, g):
        g2, h2 = g.reshape(-1, self.out_features), h.reshape(-1, self.in_features)
        return [g2.T @ h2] + ([g2.sum(0)] if self.bias is not None else [])

    def glr_grads_per_input(self, h, g):
        return [torch.einsum("kbo,kbi->boi", g, h)] + ([g.sum(0)] if self.bias is not None else [])

    def config(self) -> dict:
        return {"type": "NoisyLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activation": _act_name(self.activation), **self._site_config()}


class NoisyConv2d(NoisyLayer, nn.Conv2d):
    """``torch.nn.Conv2d`` whose output units (channel × position) carry noise, then ``activation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, activation: ActivationLike = None,
                 noise: Distribution | None = None, site: str = "activity", device=None, dtype=None):
        if isinstance(padding, str):
            raise ValueError(f"NoisyConv2d needs numeric padding, got {padding!r}")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           "zeros", device, dtype)
        self._setup(activation, noise, site)

    def weight_effect(self, h, e, k, batch):
        dw, *db = self.split_parameters(e)
        kernels, bias = dw.reshape(k * self.out_channels, -1), db[0].reshape(-1, 1) if db else None
        F = torch.nn.functional
        if h.shape[0] == batch and self.groups == 1:
            # the input is shared: its patches (C·kh·kw, B·L) once, then one matrix product with all k·O
            # kernels (an ordinary convolution with k·O output channels is several times slower on a CPU)
            cols = F.unfold(h, self.kernel_size, self.dilation, self.padding, self.stride)     # (B, C·kh·kw, L)
            out = kernels @ cols.transpose(0, 1).reshape(cols.shape[1], -1)                  # (k·O, B·L)
            if bias is not None:
                out += bias
            H, W = (self._out_size(h.shape[-2 + d], d) for d in (0, 1))
            return out.reshape(k, self.out_channels, batch, H, W).transpose(1, 2)          # (k, B, O, H', W'), a view
        # the k kernels as the groups of one grouped convolution: replication k's channels see kernel eₖ
        if h.shape[0] == batch:
            hk = h.repeat(1, k, 1, 1)                                                          # (B, k·C, H, W)
        else:
            hk = h.reshape(k, batch, *h.shape[1:]).transpose(0, 1).reshape(batch, k * self.in_channels, *h.shape[2:])
        out = F.conv2d(hk, kernels.reshape(k * self.out_channels, *dw.shape[2:]),
                       None if bias is None else bias.reshape(-1), self.stride, self.padding, self.dilation,
                       k * self.groups)
        return out.reshape(batch, k, self.out_channels, *out.shape[2:]).transpose(0, 1)   # (k, B, O, H', W'), a view

    def channel_effect(self, h, e, k, batch):
        if self.groups != 1:
            return None
        cols = torch.nn.functional.unfold(h, self.kernel_size, self.dilation, self.padding, self.stride)
        W = self.weight[0].numel()
        out = torch.matmul(e[:, :W], cols.transpose(0, 1).reshape(W, -1))            # (k, B·L)
        if self.bias is not None:
            out += e[:, W:]
        H, Wd = (self._out_size(h.shape[-2 + d], d) for d in (0, 1))
        return out.reshape(k, batch, H, Wd)

    def _out_size(self, n: int, d: int) -> int:
        return (n + 2 * self.padding[d] - self.dilation[d] * (self.kernel_size[d] - 1) - 1) // self.stride[d] + 1

    def glr_grads(self, h, g):
        gw = torch.nn.grad.conv2d_weight(h, self.weight.shape, g, self.stride, self.padding, self.dilation,
                                         self.groups)
        return [gw] + ([g.sum((0, 2, 3))] if self.bias is not None else [])

    def glr_grads_per_input(self, h, g):
        if self.groups != 1:
            raise ValueError("the chunked leave-one-out baseline supports NoisyConv2d with groups=1 only")
        # the B inputs as B groups of one grouped convolution over the K replications: its weight
        # gradient is the per-input weight gradient, summed over replications
        K, B = h.shape[:2]
        gw = torch.nn.grad.conv2d_weight(h.reshape(K, B * self.in_channels, *h.shape[3:]),
                                         (B * self.out_channels, self.in_channels, *self.kernel_size),
                                         g.reshape(K, B * self.out_channels, *g.shape[3:]),
                                         self.stride, self.padding, self.dilation, groups=B)
        return [gw.reshape(B, *self.weight.shape)] + ([g.sum(0).sum((-2, -1))] if self.bias is not None else [])

    def config(self) -> dict:
        return {"type": "NoisyConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "activation": _act_name(self.activation), **self._site_config()}


def _act_name(act) -> str | None:
    return None if act is None else activation_name(act)


def noisy_layers(model: nn.Module) -> list[NoisyLayer]:
    """Every noisy layer of ``model`` at any depth, in module-registration order."""
    return [m for m in model.modules() if isinstance(m, NoisyLayer)]


# ---------------------------------------------------------------------------- injection
_ACTIVE: ContextVar["Injection | None"] = ContextVar("glrnet_injection", default=None)


class Injection:
    """The noise of one noisy forward pass: k replications of a batch of B inputs.

    ``noise[i]`` (k, B, *units) is added in noisy layer ``layers[i]`` (layers without an entry
    stay noise-free). With ``record``, the input h each noisy layer saw is kept in
    ``inputs[i]`` — (B, *in) if it came before the batch grew, else (k·B, *in) — and the
    execution order and unit shapes in ``order`` / ``shapes``, and in ``noise_free_inputs`` the layers
    whose input no noise had reached (the same for every replication and every chunk of them).
    ``surrogate(v, z, layer)``, if given,
    replaces φ(v) (the attacks' BPDA gradients; z: the pre-activation without noise).
    """

    def __init__(self, layers: Sequence[NoisyLayer], k: int, batch: int, noise: dict[int, Tensor] | None = None,
                 record: bool = False, surrogate: Callable | None = None):
        self.index = {id(m): i for i, m in enumerate(layers)}
        self.k, self.batch, self.noise = k, batch, noise or {}
        self.record, self.surrogate = record, surrogate
        self.inputs: dict[int, Tensor] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.order: list[int] = []
        self.preactivations: dict[int, Tensor] = {}
        self.noise_free_inputs: set[int] = set()   # layers whose input no noise had reached yet

    def __enter__(self):
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)

    def apply(self, layer: NoisyLayer, h: Tensor) -> Tensor:
        """φ(layer(h) + r) for ``layer``'s noise r (weight site: layer(h; θ + eₖ)), recording what was asked."""
        i = self.index.get(id(layer))
        if i is None:  # a noisy layer of another model
            return layer.act(layer.affine(h))
        if i in self.shapes:
            raise RuntimeError(f"noisy layer {i} ({type(layer).__name__}) ran twice in one forward pass; "
                               "a noisy layer may be applied once per pass (use two layers)")
        k, B = self.k, self.batch
        rows = h.shape[0]
        if rows not in (B, k * B):
            raise RuntimeError(f"noisy layer {i} got a batch of {rows} rows; expected {B} inputs or "
                               f"{k}·{B} replications")
        r = self.noise.get(i)
        if self.record:
            self.inputs[i] = h
        if not any(j in self.noise for j in self.order):   # no noisy layer ran before this one
            self.noise_free_inputs.add(i)
        self.order.append(i)
        grad = torch.is_grad_enabled()
        if r is not None and layer.site == "channel" and rows == B and not grad and self.surrogate is None:
            # the input is shared: z once, then each replication's channel cₖ gets its effect
            e, c = layer.channel_split(r)
            d = layer.channel_effect(h, e, k, B)
            if d is not None:
                z = layer.affine(h)
                self.shapes[i] = unit = tuple(z.shape[1:])
                v = z.unsqueeze(0).expand(k, B, *unit).contiguous()
                v[torch.arange(k, device=v.device), :, c] += d
                return layer.act(v.reshape(k * B, *unit))
        if r is not None and layer.site in WEIGHT_SITES and rows == k * B and not grad and self.surrogate is None:
            # each replication's own input through its own parameters θ + eₖ: one pass, no noise-free z
            v = layer.perturbed(h, layer.weight_noise(r), k, B)
            self.shapes[i] = unit = tuple(v.shape[2:])
            return layer.act(v.reshape(rows, *unit))
        z = layer.affine(h)
        self.shapes[i] = unit = tuple(z.shape[1:])
        if r is None:
            if self.record:
                self.preactivations[i] = z
            v = z
        else:
            if layer.site in WEIGHT_SITES:   # parameter noise eₖ, as its effect layer(h; eₖ) on v
                r = layer.weight_effect(h, layer.weight_noise(r), k, B)
            elif layer.site == "flipout":
                r = layer.flip_effect(h, *layer.flip_split(r.reshape(k, B, r.shape[-1])), k, B)
            r = r.reshape(k, B, *unit)
            if rows == B and k > 1:   # the batch grows here: z is computed once per input
                if grad or self.surrogate is not None:
                    v = (z.unsqueeze(0) + r).reshape(k * B, *unit)
                else:                 # one pass into replication-major rows, whatever r's memory order
                    v = torch.add(z.unsqueeze(0), r, out=z.new_empty((k, B, *unit))).reshape(k * B, *unit)
                if self.surrogate is not None:
                    z = z.unsqueeze(0).expand(k, B, *unit).reshape(k * B, *unit)
            elif self.surrogate is not None or z.requires_grad:
                v = z + r.reshape(rows, *unit)
            else:
                v = z.reshape(k, B, *unit).add_(r).reshape(rows, *unit)
        if self.surrogate is not None and layer.activation is not None:
            return self.surrogate(v, z, layer)
        return layer.act(v)


@dataclass
class Probe:
    """What one noise-free pass over one input tells about a model's noisy layers."""

    layers: list[NoisyLayer]          # noisy_layers(model)
    order: list[int]                  # indices into ``layers``, in execution order
    shapes: dict[int, tuple[int, ...]]
    classes: int                      # width of the output

    def width(self, i: int) -> int:
        """Noise values per (replication, input) of layer i: its units, or (weight site) its P parameters
        (flipout: P + O + C, the parameters and the signs)."""
        layer = self.layers[i]
        if layer.site == "activity":
            return math.prod(self.shapes[i])
        if layer.site == "channel":
            return layer.channel_width + 1
        return layer.parameter_count + (layer.flip_width if layer.site == "flipout" else 0)


@torch.no_grad()
def probe(model: nn.Module, x: Tensor) -> Probe:
    """Execution order and unit shapes of ``model``'s noisy layers, from a noise-free pass on x[:1]."""
    layers = noisy_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no noisy layer (NoisyLinear, NoisyConv2d): "
                         "GLR needs at least one")
    with Injection(layers, 1, 1) as inj:
        out = model(x[:1])
    unused = [i for i in range(len(layers)) if i not in inj.shapes]
    if unused:
        raise ValueError(f"noisy layers {unused} of {type(model).__name__} are not used by its forward pass")
    return Probe(layers, inj.order, inj.shapes, math.prod(out.shape[1:]))


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


class Layout:
    """Where each noisy layer's noise lies in one flat buffer (k, B, W) for the ``active`` layers
    (indices into ``probe.layers``, in execution order), and how to fill it with a sampler.

    A weight-site layer's slice is P wide (its parameters) and only its row b = 0 is used: one
    perturbation of the parameters per replication, shared by the batch (as in evolution
    strategies). Only that row is drawn (the sampler fills a (k, 1, P) buffer, so antithetic pairs
    and QMC nets over the replications are built as for any slice); the other B − 1 rows are
    never read. A flipout layer's
    slice is P + O + C wide: the signs of the last O + C values of every row are that input's flips
    (under the antithetic sampler a pair flips them too, so its weights stay antithetic, its bias not)."""

    def __init__(self, pr: Probe, active: Sequence[int] | None = None):
        self.probe = pr
        self.active = [i for i in pr.order if active is None or i in set(active)]
        self.offsets, offset = {}, 0
        for i in self.active:
            self.offsets[i] = offset
            offset += pr.width(i)
        self.width = offset
        self.shared = layer_noise([pr.layers[i] for i in self.active])
        for i in self.active:
            if pr.layers[i].site == "flipout" and not is_symmetric(pr.layers[i].noise):
                raise ValueError(f"noisy layer {i} has site 'flipout', which needs noise symmetric about 0 "
                                 f"(a sign flip must keep its law); got {pr.layers[i].noise}")

    @property
    def first(self) -> NoisyLayer:
        return self.probe.layers[self.active[0]]

    def fill_(self, sampler, out: Tensor, generator) -> Tensor:
        """Fill ``out`` (k, B, W): one draw when every active layer has the same noise and none is a weight
        site, else per layer (a weight-site layer: its row 0 only)."""
        layers = self.probe.layers
        if self.shared is not None and all(layers[i].site not in WEIGHT_SITES for i in self.active):
            return sampler.fill_(self.shared, out, generator)
        for i in self.active:
            o, w = self.offsets[i], self.probe.width(i)
            rows = 1 if layers[i].site in WEIGHT_SITES else out.shape[1]
            if layers[i].site == "channel":       # the noise on P/O values, then the channel of each replication
                out[:, :1, o + w - 1] = self.channels(layers[i], sampler, out.shape[0], generator, out.device)
                w -= 1
            part = torch.empty_like(out[:, :rows, o:o + w])
            out[:, :rows, o:o + w] = sampler.fill_(layers[i].noise, part, generator)
        return out

    @staticmethod
    def channels(layer: NoisyLayer, sampler, k: int, generator, device) -> Tensor:
        """cₖ (k, 1) for a channel-site layer: each of the k/m sampler groups (antithetic pairs, QMC nets)
        one channel, the groups' channels consecutive from a uniform random start (each uniform, and the
        channels evenly covered within a chunk)."""
        O, m = layer.weight.shape[0], sampler.group_size
        start = torch.randint(0, O, (1,), generator=generator, device=device)
        c = (start + torch.arange(k // m, device=device)) % O
        return c.repeat_interleave(m).unsqueeze(1).to(layer.weight.dtype)

    def views(self, flat: Tensor) -> dict[int, Tensor]:
        """Per active layer, its (k, B, width) slice of ``flat``."""
        return {i: flat[..., o:o + self.probe.width(i)] for i, o in self.offsets.items()}


@torch.no_grad()
def rescale_noise_(model: nn.Module, x: Tensor | None, ratio: float | None = None,
                   weight_ratio: float | None = None) -> dict[int, float]:
    """Scale-aware noise. ``ratio``: give every activity-site noisy layer the noise of its family with
    standard deviation ``ratio`` × the RMS of its noise-free pre-activation on the batch ``x``;
    ``weight_ratio``: every weight-site layer σ = ``weight_ratio`` × the RMS of its weight (kernel), so
    that the parameter noise keeps its size relative to weights that grow (a threshold unit is
    invariant to the scale of its weights; an absolute σ would shrink relative to them). Called before
    each estimate, σ is then a function of (θ, batch) alone, held fixed during the estimate: the GLR
    estimate stays unbiased for ∇θ E[L] at that σ. Returns {layer index: new σ}."""
    from .noise import family
    layers = noisy_layers(model)
    targets = {}
    if weight_ratio is not None:
        for i, layer in enumerate(layers):
            if layer.site != "activity":
                targets[i] = weight_ratio * layer.weight.double().pow(2).mean().sqrt().item()
    if ratio is not None:
        x = model.bind(x) if hasattr(model, "bind") else x
        with Injection(layers, 1, x.shape[0], record=True) as inj:
            model(x)
        for i, z in inj.preactivations.items():
            if layers[i].site == "activity":
                targets[i] = ratio * z.double().pow(2).mean().sqrt().item()
    out = {}
    for i, std in sorted(targets.items()):
        fam = family(layers[i].noise)
        if fam is None:
            raise ValueError(f"relative noise: noise {layers[i].noise} has no registered family to rebuild at a new σ")
        layers[i].noise = fam.from_std(max(std, 1e-6))
        out[i] = max(std, 1e-6)
    return out


def layer_noise(layers: Sequence[NoisyLayer]) -> Distribution | None:
    """The one noise distribution shared by ``layers``, or None if they differ."""
    first = layers[0].noise
    return first if all(same_noise(first, m.noise) for m in layers[1:]) else None


# ---------------------------------------------------------------------------- containers
class Residual(nn.Module):
    """x ↦ x + body(x) (an ordinary module; its noisy layers train by GLR like any other)."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LocalLosses(nn.Module):
    """Blocks, each with an auxiliary head (Ren, Kornblith, Liao & Hinton 2023): the output is the last
    head on the last block; GLR trains block b (and head b) from head b's loss alone, with noise in
    block b only (:class:`~glrnet.GLR` runs one sub-estimate per block on :meth:`truncated`). This
    changes the objective — Σ_b E[L(head_b) | noise in block b] instead of E[L] — and is labelled so.
    ``forward`` evaluates every head (the intermediate outputs are discarded), so a noisy pass reaches
    every noisy layer."""

    def __init__(self, blocks: Sequence[nn.Module], heads: Sequence[nn.Module]):
        super().__init__()
        if len(blocks) != len(heads) or not blocks:
            raise ValueError(f"LocalLosses needs one head per block, got {len(blocks)} blocks and {len(heads)} heads")
        self.blocks, self.heads = nn.ModuleList(blocks), nn.ModuleList(heads)

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            out = head(x)
        return out

    def truncated(self, b: int) -> nn.Sequential:
        """Blocks 0..b then head b: the network whose loss trains block b."""
        return nn.Sequential(*self.blocks[:b + 1], self.heads[b])

    def block_layers(self, b: int) -> list[NoisyLayer]:
        """The noisy layers block b's loss trains: those of block b and of its head."""
        return noisy_layers(self.blocks[b]) + noisy_layers(self.heads[b])


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` (same arguments, same outputs) that, for non-overlapping windows without padding
    and no autograd through it, takes the elementwise maximum of the kh·kw strided views of its input: on a
    CPU several times faster than torch's kernel on the many small maps of K noisy replications
    (benchmarks/bench_cnn.py). Anything else is the torch layer's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        k, s = nn.modules.utils._pair(self.kernel_size), nn.modules.utils._pair(self.stride)
        if (k != s or k == (1, 1) or nn.modules.utils._pair(self.padding) != (0, 0) or self.return_indices
                or nn.modules.utils._pair(self.dilation) != (1, 1) or self.ceil_mode or x.dim() != 4
                or (x.requires_grad and torch.is_grad_enabled()) or x.shape[-2] < k[0] or x.shape[-1] < k[1]
                or _differentiated(x)):
            return super().forward(x)
        H, W = x.shape[-2] // k[0], x.shape[-1] // k[1]
        v = x[..., :H * k[0], :W * k[1]].unflatten(-1, (W, k[1])).unflatten(-3, (H, k[0]))   # (N, C, H, kh, W, kw)
        views = [v[:, :, :, i, :, j] for i in range(k[0]) for j in range(k[1])]
        out = torch.maximum(views[0], views[1])
        for t in views[2:]:
            torch.maximum(out, t, out=out)
        return out


def _differentiated(x: Tensor) -> bool:
    """Whether x carries a forward-mode tangent (``torch.func.jvp``, ``torch.autograd.forward_ad``), so that a
    layer should run torch's own kernels (their derivative rules, ties included)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return (wrapped is not None and wrapped(x)) or torch.autograd.forward_ad.unpack_dual(x).tangent is not None


# deterministic modules a saved model may contain: name → (class, the constructor arguments kept); a saved
# MaxPool2d loads as glrnet's (the same layer, faster)
_DETERMINISTIC = {"MaxPool2d": (MaxPool2d, ("kernel_size", "stride", "padding", "dilation")),
                  "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding")),
                  "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
                  "Identity": (nn.Identity, ()),
                  "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
                  "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine"))}


def module_config(m: nn.Module, noise: bool = False) -> dict:
    """JSON-able description of one module of a saved model (recursive for containers); ``noise``:
    each noisy layer's own noise too (a model whose layers do not share one)."""
    if isinstance(m, NoisyLayer):
        return {**m.config(), **({"noise": describe(m.noise)} if noise else {})}
    if type(m) is Residual:
        return {"type": "Residual", "body": [module_config(c, noise) for c in m.body]}
    if type(m) is nn.Sequential:
        return {"type": "Sequential", "modules": [module_config(c, noise) for c in m]}
    if type(m) is LocalLosses:
        return {"type": "LocalLosses", "blocks": [module_config(c, noise) for c in m.blocks],
                "heads": [module_config(c, noise) for c in m.heads]}
    name = type(m).__name__
    if name not in _DETERMINISTIC or type(m) not in (_DETERMINISTIC[name][0], getattr(nn, name)):
        raise ValueError(f"cannot describe module {name} for saving; supported: NoisyLinear, NoisyConv2d, "
                         f"Residual, Sequential, {', '.join(_DETERMINISTIC)} (save the state_dict yourself)")
    return {"type": name, **{k: _jsonable(getattr(m, k)) for k in _DETERMINISTIC[name][1]}}


def module_from_config(d: dict) -> nn.Module:
    d = dict(d)
    kind = d.pop("type")
    if "noise" in d:
        d["noise"] = make_noise(d["noise"]["kind"], d["noise"]["std"])
    if kind == "NoisyLinear":
        return NoisyLinear(**d)
    if kind == "NoisyConv2d":
        return NoisyConv2d(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    if kind == "Residual":
        return Residual(*(module_from_config(c) for c in d["body"]))
    if kind == "Sequential":
        return nn.Sequential(*(module_from_config(c) for c in d["modules"]))
    if kind == "LocalLosses":
        return LocalLosses([module_from_config(c) for c in d["blocks"]], [module_from_config(c) for c in d["heads"]])
    if kind in _DETERMINISTIC:
        return _DETERMINISTIC[kind][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    raise ValueError(f"unknown module type {kind!r} in a saved model")


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


class NoisySequential(nn.Sequential):
    """An ``nn.Sequential`` of noisy layers and deterministic modules (pooling, ``Flatten``,
    :class:`Residual` blocks, nested ``nn.Sequential`` s): indexable, iterable, ``len``-able.

    Args:
        *modules: the modules, applied in order. GLR estimates the parameters of the noisy
            layers at any depth; any other trainable parameter is refused by it, by name.
        noise: zero-centred scalar ``torch.distributions`` object given to every noisy layer
            (default: each layer keeps its own, Normal(0, 2) unless set).
        input_shape: shape of one input, e.g. (1, 28, 28); a flat batch (B, prod(input_shape))
            is reshaped to it. Needed by ``widths`` / ``unit_shapes``; never inferred.
    """

    def __init__(self, *modules: nn.Module, noise: Distribution | None = None,
                 input_shape: Sequence[int] | None = None):
        for m in modules:
            if not isinstance(m, nn.Module):
                raise ValueError(f"NoisySequential takes torch modules, got {type(m).__name__}")
        super().__init__(*modules)
        if not noisy_layers(self):
            raise ValueError("a NoisySequential needs at least one noisy layer (NoisyLinear, NoisyConv2d)")
        if noise is not None:
            noise = validate_noise(noise)
            for m in noisy_layers(self):
                m.noise = noise
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            return super().__getitem__(idx)
        mods = list(self._modules.values())[idx]
        if not any(isinstance(m, NoisyLayer) or noisy_layers(m) for m in mods):
            return nn.Sequential(*mods)
        return NoisySequential(*mods, input_shape=self.input_shape if idx.start in (None, 0) else None)

    @property
    def layers(self) -> "NoisySequential":
        """The modules (this container itself: ``model.layers[0] is model[0]``)."""
        return self

    @property
    def noisy_layers(self) -> list[NoisyLayer]:
        return noisy_layers(self)

    @property
    def noise(self) -> Distribution:
        """The noise every noisy layer shares (a ``ValueError`` if they differ)."""
        shared = layer_noise(self.noisy_layers)
        if shared is None:
            raise ValueError("the noisy layers of this model have different noise; read layer.noise")
        return shared

    def _example(self) -> Tensor:
        if self.input_shape is None:
            raise ValueError("the input shape is not known: pass input_shape=... to the model")
        p = next(self.parameters())
        return torch.zeros(1, *self.input_shape, dtype=p.dtype, device=p.device)

    @property
    def in_features(self) -> int:
        return math.prod(self._example().shape[1:])

    @property
    def unit_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample output shape of every noisy layer, in execution order."""
        pr = probe(self, self._example())
        return [pr.shapes[i] for i in pr.order]

    @property
    def widths(self) -> list[int]:
        """Noise values per sample of each noisy layer (execution order: its units, or its parameters for
        a weight-site layer); a noise tensor has ``sum(widths)``."""
        pr = probe(self, self._example())
        return [pr.width(i) for i in pr.order]

    @property
    def num_classes(self) -> int:
        return probe(self, self._example()).classes

    def bind(self, x: Tensor) -> Tensor:
        """``x`` as a batch of inputs of ``input_shape`` (flat batches reshaped); changes no state."""
        if self.input_shape is None:
            if x.dim() < 2:
                raise ValueError(f"inputs must have a batch axis, got shape {tuple(x.shape)}")
            return x
        if tuple(x.shape[1:]) == self.input_shape:
            return x
        if x.dim() == 2 and x.shape[1] == math.prod(self.input_shape):
            return x.reshape(x.shape[0], *self.input_shape)
        if len(self.input_shape) == 1:
            raise ValueError(f"inputs must have shape (batch, {self.input_shape[0]}), got {tuple(x.shape)}")
        raise ValueError(f"inputs must have shape (batch, {', '.join(map(str, self.input_shape))}) or (batch, "
                         f"{math.prod(self.input_shape)}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Outputs for inputs ``x`` (B, ...); with ``noise`` (..., B, Σ widths) the noisy network,
        output (..., B, C), the last axis of ``noise`` split across the noisy layers in execution order."""
        x = self.bind(x)
        if noise is None:
            return super().forward(x)
        return forward_with_flat_noise(self, x, noise)

    def sample_noise(self, *shape: int, generator: torch.Generator | None = None,
                     antithetic: bool = False) -> Tensor:
        """Noise of shape (*shape, Σ widths); ``antithetic`` negates the second half of axis 0."""
        from .samplers import IID, Antithetic
        p = next(self.parameters())
        layout = Layout(probe(self, self._example()))
        r = torch.empty(*shape, layout.width, dtype=p.dtype, device=p.device)
        flat = r.reshape(shape[0] if shape else 1, -1, r.shape[-1])
        layout.fill_(Antithetic() if antithetic else IID(), flat, generator)   # each layer its own noise
        for i, part in layout.views(flat).items():    # a weight site's row 0 for every input (only it is read)
            if layout.probe.layers[i].site in WEIGHT_SITES:
                part[:, 1:] = part[:, :1]
        return r

    def first_preactivation(self, x: Tensor) -> Tensor:
        """The first noisy layer's pre-activation without noise, (B, *units): a deterministic,
        differentiable function of the input (the likelihood-ratio input gradient goes through it)."""
        x = self.bind(x)
        layers = self.noisy_layers
        with Injection(layers, 1, x.shape[0], record=True) as inj:
            super().forward(x)
        return inj.preactivations[inj.order[0]]

    def activations(self) -> list[str]:
        """Names of the noisy layers' activations (None: identity)."""
        return [_act_name(m.activation) for m in self.noisy_layers]

    def config(self) -> dict:
        """JSON-able architecture (see :mod:`glrnet.checkpoint` for the round trip); a ``ValueError``
        for a module or a noise that cannot be rebuilt."""
        shared = layer_noise(self.noisy_layers)     # None: each layer's noise is written with it
        return {"modules": [module_config(m, shared is None) for m in self],
                "noise": None if shared is None else describe(shared),
                "input_shape": list(self.input_shape) if self.input_shape else None}

    @staticmethod
    def from_config(cfg: dict, noise: Distribution | None = None) -> "NoisySequential":
        if noise is None and cfg.get("noise") is not None:
            noise = make_noise(cfg["noise"]["kind"], cfg["noise"]["std"])
        return NoisySequential(*(module_from_config(d) for d in cfg["modules"]), noise=noise,
                               input_shape=cfg.get("input_shape"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before NoisySequential became an nn.Sequential kept their modules under "layers."
        old = prefix + "layers."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def forward_with_flat_noise(model: nn.Module, x: Tensor, noise: Tensor, surrogate=None) -> Tensor:
    """``model`` on ``x`` (B, ...) with noise (..., B, Σ widths) split across its noisy layers in
    execution order; output (..., B, C)."""
    pr = probe(model, x)
    B, W = x.shape[0], sum(pr.width(i) for i in pr.order)
    if noise.dim() < 2 or noise.shape[-1] != W or noise.shape[-2] != B:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (..., {B}, Σ widths = {W})")
    lead = tuple(noise.shape[:-2])
    k = math.prod(lead)
    flat = noise.reshape(k, B, W)
    views, offset = {}, 0
    for i in pr.order:
        views[i] = flat[..., offset:offset + pr.width(i)]
        offset += pr.width(i)
    inj = Injection(pr.layers, k, B, views, surrogate=surrogate)
    out = noisy_forward(model, x, inj, pr.layers[pr.order[0]])
    return out.reshape(*lead, B, *out.shape[1:])


class NoisyMLP(NoisySequential):
    """Multilayer perceptron with per-neuron additive noise: the all-linear NoisySequential.

    Args:
        sizes: layer widths including input and output, e.g. ``[196, 20, 10]``.
        activation: φ for the hidden layers, a registered name or any callable.
        noise: zero-centred scalar ``torch.distributions`` object; default Normal(0, 2).
        output_activation: ``None`` (the output's noisy pre-activation is the output, as
            the seed's authors' code does) or a name / callable applied to the output layer.

    The modules are ``nn.Linear`` subclasses (weight (out, in) + bias): ``model[0]`` is the first.
    """

    def __init__(self, sizes: Sequence[int], activation: ActivationLike = "sigmoid",
                 noise: Distribution | None = None, output_activation: ActivationLike = None):
        sizes = list(sizes)
        if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"sizes must be ≥ 2 positive integers (input, ..., output), got {sizes}")
        act = get_activation(activation)
        out = None if output_activation is None else get_activation(output_activation)
        noise = default_noise() if noise is None else noise
        last = len(sizes) - 2
        super().__init__(*(NoisyLinear(a, b, activation=act if t < last else out)
                           for t, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))),
                         noise=noise, input_shape=(sizes[0],))
        self.sizes, self.activation, self.output_activation = sizes, act, out

    @property
    def widths(self) -> list[int]:
        return self.sizes[1:]

    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

    def config(self) -> dict:
        return {"sizes": self.sizes, "activation": activation_name(self.activation),
                "output_activation": _act_name(self.output_activation), "noise": describe(self.noise)}

    def extra_repr(self) -> str:
        return (f"activation={activation_name(self.activation)}, noise={self.noise}, "
                f"output_activation={_act_name(self.output_activation)}")
