"""Noisy layers: ``torch.nn.Linear`` / ``Conv2d`` whose noise is given by a perturbation object.

A noisy layer (same parameters, same ``state_dict`` as the torch layer) maps its input h to the
pre-activation z = layer(h) and then to φ(z) (``activation=None``: identity). Called on its own
it is that noise-free layer, in ``train()`` and ``eval()`` mode alike: the OT network. Noise is
never implicit. It enters only inside an explicit noisy pass (the GLR estimator's, LAP
prediction's: :mod:`glrnet.nn.injection`), where the layer's :class:`~glrnet.nn.perturbations.Perturbation`
turns z into the noisy pre-activation v (activity noise: v = z + r) and the pass draws r. Unlike
``nn.Dropout``, ``train()`` / ``eval()`` do not switch the noise on and off: the estimator needs the
noise it drew (its score), so noise that a plain forward drew by itself would be noise no estimator
could use, and prediction names its rule (OT or LAP) explicitly.

The GLR estimate of a noisy layer's parameters is that layer's own parameter gradient under the
cotangent g = w ⊙ s(r): :meth:`NoisyLayer.glr_grads` (closed forms, one layer) and the other
geometry primitives here are what the perturbation objects build on.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from .activations import ActivationLike, activation_name, get_activation
from .intercept import current_handler
from .noise import validate_noise
from .perturbations import PERTURBATIONS, Activity, Perturbation, get_perturbation

DEFAULT_NOISE_STD = 2.0
PerturbationLike = "str | Perturbation | None"


def default_noise() -> Distribution:
    """Normal(0, 2): the seed's neuron noise (σ = 2 as the standard deviation)."""
    return Normal(0.0, DEFAULT_NOISE_STD)


def act_name(act) -> str | None:
    """The registered name of an activation (None: identity)."""
    return None if act is None else activation_name(act)


class NoisyLayer:
    """Mixin of a torch layer whose noise is described by ``self.perturbation`` (and whose output
    then goes through ``activation``).

    Args (of the concrete layers, after the torch layer's own):
        activation: φ, a registered name or any callable; None: identity.
        noise: the density f of the noise (a zero-centred scalar ``torch.distributions`` object;
            default Normal(0, 2)).
        perturbation: where the noise enters: a :class:`~glrnet.nn.perturbations.Perturbation` or a
            registered name (``"activity"``, the default; ``"weight"``, ``"flipout"``, ``"channel"``).
            The layer keeps its own copy.
        site: the same as a name (the older spelling, kept for saved models and scripts).
    """

    activation = None
    perturbation: Perturbation

    def _setup(self, activation: ActivationLike, noise: Distribution | None, perturbation=None,
               site: str | None = None) -> None:
        self.activation = None if activation is None else get_activation(activation)
        if perturbation is not None and site is not None:
            raise ValueError("give the perturbation or its name as site=, not both")
        p = perturbation if perturbation is not None else (site or "activity")
        if isinstance(p, Perturbation):
            p = copy.copy(p)
            if noise is not None or p.noise is None:
                p.noise = validate_noise(default_noise() if noise is None else noise)
        else:
            p = get_perturbation(p, validate_noise(default_noise() if noise is None else noise))
        p.check(self)
        self.perturbation = p

    @property
    def noise(self) -> Distribution:
        """The density f of this layer's noise (its perturbation's)."""
        return self.perturbation.noise

    @noise.setter
    def noise(self, dist: Distribution) -> None:
        p = self.perturbation.with_noise(dist)
        p.check(self)
        self.perturbation = p

    @property
    def site(self) -> str:
        """The perturbation's registered name."""
        return self.perturbation.name

    @site.setter
    def site(self, name: str) -> None:
        self.perturbation = get_perturbation(name, self.noise)
        self.perturbation.check(self)

    @property
    def parameter_count(self) -> int:
        """P: the layer's parameters (weight, then bias), flattened."""
        return sum(p.numel() for p in self.parameters(recurse=False))

    def split_parameters(self, flat: Tensor) -> list[Tensor]:
        """A (..., P) tensor as [(..., *weight.shape), (..., *bias.shape)] in ``parameters()`` order."""
        out, o = [], 0
        for p in self.parameters(recurse=False):
            out.append(flat[..., o:o + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            o += p.numel()
        return out

    def weight_effect(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor:
        """layer(h; eₖ) for parameters e (k, P), one set per replication, (k, B, *units): what a parameter
        perturbation eₖ adds to the pre-activation (the layer is affine in θ). ``h``: (B, *in) (shared by
        all replications) or (k·B, *in)."""
        raise NotImplementedError

    def channel_effect(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor | None:
        """What parameters e (k, P/O) of one output channel add to that channel's pre-activation for a shared
        input h (B, *in): (k, B, *spatial); None where only the whole-layer path applies."""
        raise NotImplementedError

    def perturbed(self, h: Tensor, e: Tensor, k: int, batch: int) -> Tensor:
        """layer(h; θ + eₖ) for each replication k, (k, B, *units), in one pass."""
        theta = torch.cat([p.reshape(-1) for p in self.parameters(recurse=False)])
        return self.weight_effect(h, e + theta, k, batch)

    def affine(self, h: Tensor) -> Tensor:
        """z = layer(h): the torch layer's own forward, without noise or activation."""
        return super().forward(h)  # the torch base class (nn.Linear / nn.Conv2d) after this mixin

    def act(self, v: Tensor) -> Tensor:
        return v if self.activation is None else self.activation(v)

    def forward(self, h: Tensor) -> Tensor:
        handler = current_handler()
        return self.act(self.affine(h)) if handler is None else handler.apply(self, h)

    def glr_grads(self, h: Tensor, g: Tensor) -> list[Tensor]:
        """[∂/∂weight, ∂/∂bias] of Σₙ ⟨gₙ, layer(hₙ)⟩ for inputs h (N, *in), cotangents g (N, *out)."""
        raise NotImplementedError

    def glr_grads_per_input(self, h: Tensor, g: Tensor) -> list[Tensor]:
        """The same summed over the replication axis only: h (K, B, *in), g (K, B, *out) → (B, *param)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        p = "" if isinstance(self.perturbation, Activity) else f", perturbation={self.perturbation.name}"
        return f"{super().extra_repr()}, activation={act_name(self.activation)}, noise={self.noise}{p}"

    def _perturbation_config(self) -> dict:
        name = self.perturbation.name
        if PERTURBATIONS.get(name) is not type(self.perturbation):
            raise ValueError(f"perturbation {self.perturbation!r} is not registered under its name {name!r}, so a "
                             "saved model could not rebuild it: register_perturbation(...) it")
        return {} if name == "activity" else {"site": name}


class NoisyLinear(NoisyLayer, nn.Linear):
    """``torch.nn.Linear`` whose outputs carry noise (default Normal(0, 2)), then ``activation``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: ActivationLike = None,
                 noise: Distribution | None = None, perturbation: PerturbationLike = None, site: str | None = None,
                 device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._setup(activation, noise, perturbation, site)

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
                "bias": self.bias is not None, "activation": act_name(self.activation), **self._perturbation_config()}


class NoisyConv2d(NoisyLayer, nn.Conv2d):
    """``torch.nn.Conv2d`` whose output units (channel × position) carry noise, then ``activation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, activation: ActivationLike = None,
                 noise: Distribution | None = None, perturbation: PerturbationLike = None, site: str | None = None,
                 device=None, dtype=None):
        if isinstance(padding, str):
            raise ValueError(f"NoisyConv2d needs numeric padding, got {padding!r}")
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           "zeros", device, dtype)
        self._setup(activation, noise, perturbation, site)

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
                "activation": act_name(self.activation), **self._perturbation_config()}
