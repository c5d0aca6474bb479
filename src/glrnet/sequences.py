"""Images as input sequences for networks through time (spiking and recurrent layers in a
:class:`~glrnet.TimeLoop`): flat images (B, H·W) with pixels in [0, 1] → (B, T, features).

=============  ======================================================================================
``rate:T``     rate coding: each pixel a Bernoulli spike train of T steps with rate the pixel's value
               (the snntorch tutorials' setting, T = 25); a fresh draw every time it is encoded
``rows``       one image row per step: T = H steps of W currents (sequential MNIST by rows)
``pixels``     one pixel per step: T = H·W steps of one current (e.g. 14×14 images: T = 196)
=============  ======================================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor

ENCODINGS = ("none", "rate:T", "rows", "pixels")


def parse_encoding(text: str) -> tuple[str, int]:
    """(kind, T) of an encoding name; T = 0 where the image decides it (rows, pixels) and for none."""
    kind, _, steps = str(text).partition(":")
    usage = (f"--encoding: cannot read {text!r}; use none, rate:T (Bernoulli spike trains of T ≥ 1 steps), rows "
             "or pixels")
    if kind == "rate":
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(usage)
        return kind, int(steps)
    if kind not in ("none", "rows", "pixels") or steps:
        raise ValueError(usage)
    return kind, 0


def sequence_shape(encoding: str, image_shape: tuple[int, int]) -> tuple[int, int]:
    """(T, features per step) of ``encoding`` on images of ``image_shape``."""
    kind, steps = parse_encoding(encoding)
    h, w = image_shape
    return {"rate": (steps, h * w), "rows": (h, w), "pixels": (h * w, 1)}[kind]


def encode(x: Tensor, encoding: str, image_shape: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """Flat images (B, H·W) as sequences (B, T, features); ``generator`` draws the rate code's spikes."""
    kind, steps = parse_encoding(encoding)
    if kind == "none":
        return x
    x = x.reshape(len(x), -1)
    if kind == "rate":
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"rate coding needs pixel values in [0, 1] (spike probabilities), got "
                             f"[{x.min().item():.3g}, {x.max().item():.3g}]")
        return torch.bernoulli(x[:, None, :].expand(len(x), steps, x.shape[1]), generator=generator)
    return x.reshape(len(x), *sequence_shape(encoding, image_shape))
