"""Deterministic building blocks that compose with noisy layers: residual blocks, local-loss blocks, a
fast max-pooling; and :func:`noisy_layers`, the one way to find a model's noisy layers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .layers import NoisyLayer


def noisy_layers(model: nn.Module) -> list[NoisyLayer]:
    """Every noisy layer of ``model`` at any depth, in module-registration order."""
    return [m for m in model.modules() if isinstance(m, NoisyLayer)]


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
