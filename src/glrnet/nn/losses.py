"""Per-sample losses L(outputs, targets) → (N,). GLR needs only their values.

A loss is any callable ``(outputs (N, C), targets (N,) int64) → (N,)``; it may be
discontinuous (``zero_one``). Back-propagation additionally needs it differentiable.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

Loss = Callable[[Tensor, Tensor], Tensor]
LossLike = Union[str, Loss]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """−log softmax(outputs)[target] = logsumexp(outputs) − outputs[target], per sample.

    Same values as ``F.cross_entropy(..., reduction="none")``, about 4× faster on a CPU
    for the few classes of these networks (log_softmax vectorises along the class axis).
    """
    return torch.logsumexp(outputs, dim=-1) - outputs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def zero_one(outputs: Tensor, targets: Tensor) -> Tensor:
    """1[argmax outputs ≠ target] per sample (in the outputs' dtype)."""
    return (outputs.argmax(dim=-1) != targets).to(outputs.dtype)


LOSSES: dict[str, Loss] = {"cross_entropy": cross_entropy, "zero_one": zero_one}
DIFFERENTIABLE = {"cross_entropy"}


def get_loss(spec: LossLike) -> Loss:
    """Resolve a registered loss name, or pass a callable through."""
    if callable(spec):
        return spec
    if spec not in LOSSES:
        raise ValueError(f"unknown loss {spec!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[spec]


def loss_name(loss: Loss) -> str:
    return getattr(loss, "__name__", repr(loss))
