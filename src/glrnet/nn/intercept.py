"""How a forward pass reaches its noisy layers: one *handler* per pass, installed from outside.

A noisy layer called on its own is the noise-free layer φ(layer(h)). Inside ``with
intercept(handler):`` every noisy layer the forward pass reaches calls
``handler.apply(layer, h)`` instead, and returns what the handler returns. That one hook is all
the model knows: the GLR estimator's noisy passes (:class:`~glrnet.nn.injection.Injection`), the
attacks' surrogate passes and the deterministic mean-field network are handlers that wrap the
model from outside; nothing about them lives in the layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Protocol

from torch import Tensor, nn

_HANDLER: ContextVar["Handler | None"] = ContextVar("glrnet_noisy_pass", default=None)


class Handler(Protocol):
    def apply(self, layer: nn.Module, h: Tensor) -> Tensor:
        """What the noisy ``layer`` outputs for its input ``h`` during this pass."""


def current_handler() -> Handler | None:
    """The handler of the pass in progress (None: noise-free layers)."""
    return _HANDLER.get()


@contextmanager
def intercept(handler: Handler) -> Iterator[Handler]:
    """Route every noisy layer reached inside the block through ``handler.apply``."""
    token = _HANDLER.set(handler)
    try:
        yield handler
    finally:
        _HANDLER.reset(token)


class PreactivationRecorder:
    """A handler that runs the noise-free network and records, per noisy layer in execution order, its
    input h and its noise-free pre-activation z = layer(h)."""

    def __init__(self):
        self.inputs: dict[nn.Module, Tensor] = {}
        self.preactivations: dict[nn.Module, Tensor] = {}

    def apply(self, layer, h: Tensor) -> Tensor:
        z = layer.affine(h)
        self.inputs[layer], self.preactivations[layer] = h, z
        return layer.act(z)


def record_preactivations(model: nn.Module, x: Tensor) -> PreactivationRecorder:
    """One noise-free pass of ``model`` on ``x``, recording every noisy layer's input and pre-activation."""
    rec = PreactivationRecorder()
    with intercept(rec):
        model(x)
    return rec
