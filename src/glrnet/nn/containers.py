"""Containers of noisy layers: :class:`NoisySequential` (an indexable ``nn.Sequential``), :class:`NoisyMLP`,
and the JSON description of a model that a saved file carries (:func:`module_config` /
:func:`module_from_config`)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from .activations import ActivationLike, activation_name, get_activation
from .injection import forward_with_flat_noise, layer_noise, probe
from .layers import NoisyConv2d, NoisyLayer, NoisyLinear, act_name, default_noise
from .modules import LocalLosses, MaxPool2d, Residual, noisy_layers
from .noise import describe, make_noise, validate_noise


# deterministic modules a saved model may contain: name → (class, the constructor arguments kept); a saved
# MaxPool2d loads as glrnet's (the same layer, faster)
_DETERMINISTIC = {"MaxPool2d": (MaxPool2d, ("kernel_size", "stride", "padding", "dilation")),
                  "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding")),
                  "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
                  "Identity": (nn.Identity, ()),
                  "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
                  "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine"))}


# layers and containers defined in other modules of glrnet.nn (the layers through time): type name → builder
# from the saved keyword arguments; registered by their own module (:func:`register_saved_type`)
_SAVED_TYPES: dict[str, object] = {}


def register_saved_type(name: str, build) -> None:
    """Let saved models contain the type ``name``: ``build(**saved keywords)`` makes it again (a layer's
    ``config()`` gives the keywords; a container's ``config()`` also its ``modules``)."""
    _SAVED_TYPES[name] = build


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
    if kind in _SAVED_TYPES:
        return _SAVED_TYPES[kind](**d)
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

    def example_input(self) -> Tensor:
        """A zero input of ``input_shape`` (batch of one) on the parameters' device and dtype."""
        if self.input_shape is None:
            raise ValueError("the input shape is not known: pass input_shape=... to the model")
        p = next(self.parameters())
        return torch.zeros(1, *self.input_shape, dtype=p.dtype, device=p.device)

    @property
    def in_features(self) -> int:
        return math.prod(self.example_input().shape[1:])

    @property
    def unit_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample output shape of every noisy layer, in execution order."""
        pr = probe(self, self.example_input())
        return [pr.shapes[i] for i in pr.order]

    @property
    def widths(self) -> list[int]:
        """Noise values per sample of each noisy layer (execution order: its units, or its parameters for
        a weight-site layer); a noise tensor has ``sum(widths)``."""
        pr = probe(self, self.example_input())
        return [pr.width(i) for i in pr.order]

    @property
    def num_classes(self) -> int:
        return probe(self, self.example_input()).classes

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
        output (..., B, C), the last axis of ``noise`` split across the noisy layers in execution order
        (:func:`glrnet.nn.injection.sample_noise` draws it)."""
        x = self.bind(x)
        if noise is None:
            return super().forward(x)
        return forward_with_flat_noise(self, x, noise)

    def activations(self) -> list[str]:
        """Names of the noisy layers' activations (None: identity)."""
        return [act_name(m.activation) for m in self.noisy_layers]

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
        if cfg.get("type", "NoisySequential") != "NoisySequential":   # a registered container (TimeLoop)
            kind, rest = cfg["type"], {k: v for k, v in cfg.items() if k not in ("type", "modules", "noise")}
            if kind not in _SAVED_TYPES:
                raise ValueError(f"unknown model type {kind!r} in a saved model")
            return _SAVED_TYPES[kind](*(module_from_config(d) for d in cfg["modules"]), noise=noise, **rest)
        return NoisySequential(*(module_from_config(d) for d in cfg["modules"]), noise=noise,
                               input_shape=cfg.get("input_shape"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before NoisySequential became an nn.Sequential kept their modules under "layers."
        old = prefix + "layers."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
                "output_activation": act_name(self.output_activation), "noise": describe(self.noise)}

    def extra_repr(self) -> str:
        return (f"activation={activation_name(self.activation)}, noise={self.noise}, "
                f"output_activation={act_name(self.output_activation)}")
