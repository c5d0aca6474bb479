"""Prediction with noisy networks (OT and LAP), and input checks; the layers live in layers.py.

``predict`` / ``predict_proba`` accept any ``nn.Module`` whose noise lives in noisy layers
(:class:`~glrnet.layers.NoisySequential`, a residual network, a user's module).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import (Injection, Layout, NoisyConv2d, NoisyLayer, NoisyLinear, NoisyMLP,  # noqa: F401 (re-exported)
                     NoisySequential, Residual, noisy_forward, noisy_layers, probe)
from .noise import PREFETCH_CHUNK_MB, Buffers, NoiseStream
from .samplers import Antithetic, IID


def bind(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` shaped as ``model``'s inputs (a NoisySequential reshapes flat batches)."""
    return model.bind(x) if hasattr(model, "bind") else x


def check_batch(model: nn.Module, x: Tensor, y: Tensor | None = None, classes: int | None = None) -> Tensor:
    """``x`` shaped as the model's inputs, or a ``ValueError`` naming the problem (shape, NaN/inf, labels)."""
    if not torch.is_tensor(x):
        raise ValueError(f"inputs must be a tensor, got {type(x).__name__}")
    x = bind(model, x)
    if x.dim() < 2:
        raise ValueError(f"inputs must have a batch axis, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(len(x), -1).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"inputs contain NaN or inf (rows {bad}...)")
    if y is None:
        return x
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match the inputs, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    if classes is None:
        classes = probe(model, x).classes
    if y.numel() and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    return x


def _rows_per_chunk(budget_mb: float, row_bytes: int, multiple: int = 1) -> int:
    rows = max(1, int(budget_mb * 2**20) // max(1, row_bytes))
    return max(multiple, rows // multiple * multiple)


@torch.no_grad()
def predict_proba(model: nn.Module, x: Tensor, mode: str = "ot", replications: int = 10000,
                  generator: torch.Generator | None = None, antithetic: bool = False,
                  memory_budget_mb: float = 256.0, prefetch: bool = False, progress: bool = False) -> Tensor:
    """Class probabilities (N, C).

    ``mode="ot"`` (one time): softmax of the noise-free network.
    ``mode="lap"`` (largest average probability): (1/K) Σₖ softmax(noisy output k),
    K = ``replications``, chunked over replications and images so that the working
    set stays under ``memory_budget_mb``. ``mode="vote"``: the fraction of the K noisy passes
    whose argmax is each class (the majority vote that CERTIFY certifies; ties go to the lower
    class). ``progress`` shows a bar (noisy passes done, ETA).
    """
    x = check_batch(model, x)
    if mode == "ot":
        return torch.softmax(model(x), dim=-1)
    if mode not in ("lap", "vote"):
        raise ValueError(f"unknown prediction mode {mode!r}; valid: ot, lap, vote")
    if replications < 1 or (antithetic and replications % 2):
        raise ValueError(f"LAP needs replications ≥ 1 (even with antithetic), got {replications}")
    layout = Layout(probe(model, x))
    n, width, classes = x.shape[0], layout.width, layout.probe.classes
    row_bytes = 4 * width * x.element_size()  # noise + activations + softmax, roughly
    images = min(n, _rows_per_chunk(memory_budget_mb, row_bytes * min(replications, 64)))
    reps = min(replications, _rows_per_chunk(min(memory_budget_mb, PREFETCH_CHUNK_MB), row_bytes * images,
                                             2 if antithetic else 1))
    sizes = [min(reps, replications - k0) for k0 in range(0, replications, reps)]
    total = torch.zeros(n, classes, dtype=x.dtype, device=x.device)
    sampler, buffers = (Antithetic() if antithetic else IID()), Buffers()
    from tqdm.auto import tqdm
    bar = tqdm(total=n * replications, desc="LAP", unit="pass", unit_scale=True, disable=not progress, leave=False,
               dynamic_ncols=True)
    for i in range(0, n, images):
        xi = x[i:i + images]
        B = xi.shape[0]
        draw = lambda k, slot: layout.fill_(sampler, buffers.get(k, B, width, x, slot), generator)  # noqa: E731
        for r in NoiseStream(prefetch).chunks(draw, sizes, x.device):
            k = r.shape[0]
            out = noisy_forward(model, xi, Injection(layout.probe.layers, k, B, layout.views(r)), layout.first)
            out = out.reshape(k, B, -1)
            if mode == "vote":
                total[i:i + B] += torch.nn.functional.one_hot(out.argmax(-1), classes).sum(0).to(total.dtype)
            else:   # softmax as exp(o − logsumexp o): several times faster than torch.softmax over 10 classes on a CPU
                total[i:i + B] += torch.exp(out - torch.logsumexp(out, -1, keepdim=True)).sum(0)
            bar.update(k * B)
    bar.close()
    return total / replications


def predict(model: nn.Module, x: Tensor, mode: str = "ot", replications: int = 10000, **kwargs) -> Tensor:
    """Predicted classes (N,): OT = argmax of the noise-free output, LAP = argmax of the averaged softmax,
    vote = the class most of K noisy passes predict."""
    if mode == "ot":
        x = check_batch(model, x)
        with torch.no_grad():
            return model(x).argmax(dim=-1)
    return predict_proba(model, x, mode, replications, **kwargs).argmax(dim=-1)


def noise_draw(model: nn.Module, x: Tensor, replications: int, generator: torch.Generator | None = None,
               antithetic: bool = False) -> tuple[Layout, Tensor]:
    """(layout, noise (K, B, W)) for K noisy replications of ``x`` through every noisy layer."""
    layout = Layout(probe(model, x))
    p = next(model.parameters())
    r = torch.empty(replications, x.shape[0], layout.width, dtype=p.dtype, device=p.device)
    return layout, layout.fill_(Antithetic() if antithetic else IID(), r, generator)


def forward_replications(model: nn.Module, x: Tensor, layout: Layout, noise: Tensor) -> Tensor:
    """Outputs (K, B, C) of the noisy network for noise (K, B, W) laid out by ``layout``."""
    K, B = noise.shape[:2]
    out = noisy_forward(model, x, Injection(layout.probe.layers, K, B, layout.views(noise)), layout.first)
    return out.reshape(K, B, *out.shape[1:])

