"""NoisyMLP: a feed-forward network whose neurons may carry noise, and its two predictors.

Layer t maps its input x⁽ᵗ⁾ to v⁽ᵗ⁾ = W⁽ᵗ⁾ x⁽ᵗ⁾ + b⁽ᵗ⁾ + r⁽ᵗ⁾ with r⁽ᵗ⁾ ~ f i.i.d. per neuron,
then x⁽ᵗ⁺¹⁾ = φ(v⁽ᵗ⁾). The output layer's v goes straight to the loss
(``output_activation=None``, as the seed's authors' code does) or through φ_out
(as the seed's text does).

``model(x)`` is the noise-free network. Noise enters only through the ``noise``
argument of :meth:`NoisyMLP.forward`, used by the GLR estimator, the LAP predictor,
noisy back-propagation and the attacks: one tensor of shape (..., batch, Σ widths)
whose last axis is split across the layers in order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from .activations import ActivationLike, activation_name, get_activation
from .noise import PREFETCH_CHUNK_MB, NoiseStream, fill_noise_, validate_noise


class NoisyMLP(nn.Module):
    """Multilayer perceptron with per-neuron additive noise.

    Args:
        sizes: layer widths including input and output, e.g. ``[196, 20, 10]``.
        activation: φ for the hidden layers, a registered name or any callable.
        noise: zero-centred scalar ``torch.distributions`` object; default Normal(0, 2).
        output_activation: ``None`` (the output's noisy pre-activation is the output)
            or a name / callable applied to the output layer too.

    The parameters are exactly ``self.layers`` (``nn.Linear``, weight (out, in) + bias).
    """

    def __init__(self, sizes: Sequence[int], activation: ActivationLike = "sigmoid",
                 noise: Distribution | None = None, output_activation: ActivationLike = None):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"sizes must be ≥ 2 positive integers (input, ..., output), got {sizes}")
        self.sizes = sizes
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = get_activation(activation)
        self.output_activation = None if output_activation is None else get_activation(output_activation)
        self.noise = validate_noise(Normal(0.0, 2.0) if noise is None else noise)

    @property
    def in_features(self) -> int:
        return self.sizes[0]

    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

    @property
    def widths(self) -> list[int]:
        """Noisy neurons per layer; the noise tensor's last axis has ``sum(widths)`` entries."""
        return self.sizes[1:]

    def forward(self, x: Tensor, noise: Tensor | None = None, return_inputs: bool = False,
                hidden_activation=None):
        """Outputs for inputs ``x`` (..., in); with ``noise`` (..., B, Σ widths) the noisy network.

        The first layer's clean pre-activation W x + b is computed once and broadcast over
        the noise's leading (replication) axes. With ``return_inputs`` also returns the
        list of each layer's input x⁽ᵗ⁾ (what the GLR gradient of W⁽ᵗ⁾ multiplies).
        ``hidden_activation(v, z)``, if given, replaces φ(v) on hidden layers; it also gets
        the layer's pre-activation without its own noise, z (used by the BPDA attacks).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}), "
                             f"the network expects {self.in_features}")
        if noise is not None and noise.shape[-1] != sum(self.widths):
            raise ValueError(f"noise has {noise.shape[-1]} entries per sample, expected "
                             f"Σ widths = {sum(self.widths)}")
        h, inputs, offset, last = x, [], 0, len(self.layers) - 1
        for t, layer in enumerate(self.layers):
            inputs.append(h)
            v = z = layer(h)
            if noise is not None:
                r = noise[..., offset:offset + layer.out_features]
                offset += layer.out_features
                # t = 0: broadcast the shared W x + b; z kept intact for the override
                v = r + z if t == 0 or hidden_activation is not None else v.add_(r)
            if t < last:
                h = self.activation(v) if hidden_activation is None else hidden_activation(v, z)
            else:
                h = v if self.output_activation is None else self.output_activation(v)
        return (h, inputs) if return_inputs else h

    def sample_noise(self, *shape: int, generator: torch.Generator | None = None,
                     antithetic: bool = False) -> Tensor:
        """Noise of shape (*shape, Σ widths); ``antithetic`` negates the second half of axis 0."""
        p = self.layers[0].weight
        r = torch.empty(*shape, sum(self.widths), dtype=p.dtype, device=p.device)
        return fill_noise_(self.noise, r, generator, antithetic)

    def config(self) -> dict:
        """JSON-able architecture (see :func:`glrnet.checkpoint` for the round trip)."""
        from .noise import describe
        out = self.output_activation
        return {"sizes": self.sizes, "activation": activation_name(self.activation),
                "output_activation": None if out is None else activation_name(out),
                "noise": describe(self.noise)}

    def extra_repr(self) -> str:
        out = self.output_activation
        return (f"activation={activation_name(self.activation)}, noise={self.noise}, "
                f"output_activation={None if out is None else activation_name(out)}")


def check_batch(model: NoisyMLP, x: Tensor, y: Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the problem for a malformed batch (shape, NaN/inf, labels)."""
    if x.dim() != 2 or x.shape[1] != model.in_features:
        raise ValueError(f"inputs must have shape (batch, {model.in_features}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"inputs contain NaN or inf (rows {bad}...)")
    if y is None:
        return
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match the inputs, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    if y.numel() and (y.min() < 0 or y.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes - 1}], got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def _rows_per_chunk(budget_mb: float, row_bytes: int, multiple: int = 1) -> int:
    rows = max(1, int(budget_mb * 2**20) // max(1, row_bytes))
    return max(multiple, rows // multiple * multiple)


@torch.no_grad()
def predict_proba(model: NoisyMLP, x: Tensor, mode: str = "ot", replications: int = 10000,
                  generator: torch.Generator | None = None, antithetic: bool = False,
                  memory_budget_mb: float = 256.0, prefetch: bool = True, progress: bool = False) -> Tensor:
    """Class probabilities (N, C).

    ``mode="ot"`` (one time): softmax of the noise-free network.
    ``mode="lap"`` (largest average probability): (1/K) Σₖ softmax(noisy output k),
    K = ``replications``, chunked over replications and images so that the working
    set stays under ``memory_budget_mb``. ``progress`` shows a bar (noisy passes done, ETA).
    """
    check_batch(model, x)
    if mode == "ot":
        return torch.softmax(model(x), dim=-1)
    if mode != "lap":
        raise ValueError(f"unknown prediction mode {mode!r}; valid: ot, lap")
    if replications < 1 or (antithetic and replications % 2):
        raise ValueError(f"LAP needs replications ≥ 1 (even with antithetic), got {replications}")
    n, width = x.shape[0], sum(model.widths)
    row_bytes = 4 * width * x.element_size()  # noise + activations + softmax, roughly
    images = min(n, _rows_per_chunk(memory_budget_mb, row_bytes * min(replications, 64)))
    reps = min(replications, _rows_per_chunk(min(memory_budget_mb, PREFETCH_CHUNK_MB), row_bytes * images, 2 if antithetic else 1))
    sizes = [min(reps, replications - k0) for k0 in range(0, replications, reps)]
    total = torch.zeros(n, model.num_classes, dtype=x.dtype, device=x.device)
    stream = NoiseStream(prefetch)
    from tqdm.auto import tqdm
    bar = tqdm(total=n * replications, desc="LAP", unit="pass", unit_scale=True, disable=not progress, leave=False,
               dynamic_ncols=True)
    for i in range(0, n, images):
        xi = x[i:i + images]
        for r in stream.chunks(model.noise, sizes, xi.shape[0], width, x, generator, antithetic):
            out = model(xi, noise=r)
            # softmax as exp(o − logsumexp o): several times faster than torch.softmax over 10 classes on a CPU
            total[i:i + images] += torch.exp(out - torch.logsumexp(out, -1, keepdim=True)).sum(0)
            bar.update(r.shape[0] * xi.shape[0])
    bar.close()
    return total / replications


def predict(model: NoisyMLP, x: Tensor, mode: str = "ot", replications: int = 10000, **kwargs) -> Tensor:
    """Predicted classes (N,): OT = argmax of the noise-free output, LAP = argmax of the averaged softmax."""
    if mode == "ot":
        check_batch(model, x)
        with torch.no_grad():
            return model(x).argmax(dim=-1)
    return predict_proba(model, x, mode, replications, **kwargs).argmax(dim=-1)
