"""From a :class:`~glrnet.train.TrainConfig` to the objects of a run: the model, the gradient producer
and the optimizer (with its schedule). Each reads the parts of the config it needs."""

from __future__ import annotations

import math

import torch

from ..estimators import ES, GLR, SPSA, Backprop, ForwardGradient
from ..estimators import distributed as dist_utils
from ..nn import (Leaky, LeakyIntegrator, LocalLosses, MaxPool2d, NoisyConv2d, NoisyLinear, NoisyMLP, NoisySequential,
                  Recurrent, Residual, TimeLoop, noisy_layers)
from ..nn.noise import make_noise
from ..nn.perturbations import get_perturbation
from ..sequences import sequence_shape
from .config import TrainConfig, parse_arch, parse_perturb, parse_time_arch

OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop}


def build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> NoisySequential:
    """``arch="mlp"``: NoisyMLP [pixels, *hidden, classes]. Otherwise a convolutional stack —
    ``lenet``, ``resnet`` or comma-separated ``conv:C:K[:stride[:padding]]``, ``res:C:K``, ``maxpool:K``,
    ``avgpool:K`` — then flatten, noisy linear layers of widths ``hidden``, and the output layer. Every
    noisy layer but the output has φ = ``activation``; ``perturb`` puts the noise of the chosen layers
    on their parameters."""
    time = parse_time_arch(cfg.arch)
    model = _build_model(cfg, image_shape, num_classes) if time is None else _time_model(cfg, time, image_shape,
                                                                                          num_classes)
    if cfg.init_scale != 1.0:   # e.g. a recurrent spiking network that is silent at the default scale
        with torch.no_grad():
            for m in noisy_layers(model):
                if m.weight.requires_grad:
                    m.weight.mul_(cfg.init_scale)
    which, name, std = parse_perturb(cfg.perturb)
    if which != "none":
        trainable = [m for m in noisy_layers(model) if m.weight.requires_grad]
        chosen = {"first": trainable[:1], "conv": [m for m in trainable if isinstance(m, NoisyConv2d)],
                  "all": trainable}[which]
        if not chosen:
            what, alt = ("convolutions", ", or a convolutional --arch") if which == "conv" else ("trainable noisy layer", "")
            raise ValueError(f"--perturb {cfg.perturb}: arch {cfg.arch} has no {what} to carry it; use first or all{alt}")
        for m in chosen:   # "first": the first trainable layer only (few parameters: ES-style NSR ≈ √(P/K) stays small)
            m.perturbation = get_perturbation(name, make_noise(cfg.noise, std))
            m.perturbation.check(m)
    return model


def _build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> NoisySequential:
    noise = make_noise(cfg.noise, cfg.noise_std)
    pixels = math.prod(image_shape)
    if cfg.arch == "mlp":
        if cfg.input_noise_std is None and cfg.norm == "none" and cfg.perturb == "activity":
            return NoisyMLP([pixels, *cfg.hidden, num_classes], activation=cfg.activation, noise=noise,
                            output_activation=cfg.output_activation)
        first = [] if cfg.input_noise_std is None else [input_smoothing_layer(pixels, cfg.input_noise_std, cfg.noise)]
        dense = _dense_layers(pixels, num_classes, cfg)      # built second: the initial weights' draw order
        for m in dense:
            if isinstance(m, NoisyLinear):
                m.noise = noise       # the input-smoothing layer keeps its own
        return NoisySequential(*first, *dense, input_shape=(pixels,))
    mods, channels = [], 1
    shape = (1, *image_shape)
    for kind, nums in parse_arch(cfg.arch):
        if kind == "conv":
            mods.append(NoisyConv2d(channels, *nums[:2], *nums[2:], activation=cfg.activation))
            channels = nums[0]
        elif kind == "res":
            c, k = nums
            if c != channels:
                raise ValueError(f"--arch: res:{c}:{k} needs {c} input channels, the layer before gives {channels}")
            mods.append(Residual(NoisyConv2d(c, c, k, padding=k // 2, activation=cfg.activation),
                                 NoisyConv2d(c, c, k, padding=k // 2, activation=cfg.activation)))
        else:
            mods.append((MaxPool2d if kind == "maxpool" else torch.nn.AvgPool2d)(nums[0]))
        if kind in ("conv", "res") and cfg.norm == "layer":   # over (C, H, W), no parameters
            mods.append(torch.nn.GroupNorm(1, channels, affine=False))
    mods.append(torch.nn.Flatten())
    with torch.no_grad():
        try:
            flat = torch.nn.Sequential(*mods)(torch.zeros(1, *shape)).shape[1]
        except RuntimeError as e:
            raise ValueError(f"--arch {cfg.arch}: its convolutions and pooling do not fit {cfg.dataset}'s "
                             f"{'×'.join(map(str, image_shape))} images ({str(e).splitlines()[0]}); use larger "
                             "images (--image-size), smaller kernels, or less pooling") from None
    mods += _dense_layers(flat, num_classes, cfg)
    if cfg.local_losses:
        return NoisySequential(_local_losses(mods, shape, num_classes, cfg), noise=noise, input_shape=shape)
    return NoisySequential(*mods, noise=noise, input_shape=shape)


def _time_model(cfg: TrainConfig, layers: list[tuple[str, int, bool]], image_shape: tuple[int, int],
                num_classes: int) -> TimeLoop:
    """A network through time on ``encoding``'s sequences: ``lif`` layers (β 0.9, θ 1, reset by subtraction)
    read out by a leaky integrator's mean membrane, or ``rnn`` layers read out by a noisy linear layer's
    output at the last step; every layer's noise N(0, noise_std²) (or the ``noise`` family) per step."""
    steps, width = sequence_shape(cfg.encoding, image_shape)
    mods = []
    for kind, units, recurrent, act in layers:
        if kind == "lif":
            mods.append(Leaky(width, units, recurrent=recurrent))
        else:
            mods.append(Recurrent(width, units, activation=act))
        width = units
    spiking = layers[-1][0] == "lif"
    head = LeakyIntegrator(width, num_classes) if spiking else NoisyLinear(width, num_classes)
    return TimeLoop(*mods, head, readout="mean" if spiking else "last", noise=make_noise(cfg.noise, cfg.noise_std),
                    input_shape=(steps, sequence_shape(cfg.encoding, image_shape)[1]))


def _dense_layers(width: int, num_classes: int, cfg: TrainConfig) -> list:
    """The noisy linear layers of widths ``cfg.hidden`` (each followed by a LayerNorm without affine
    with ``norm = "layer"``), then the output layer."""
    mods = []
    for h in cfg.hidden:
        mods.append(NoisyLinear(width, h, activation=cfg.activation))
        if cfg.norm == "layer":
            mods.append(torch.nn.LayerNorm(h, elementwise_affine=False))
        width = h
    return mods + [NoisyLinear(width, num_classes, activation=cfg.output_activation)]


def _local_losses(mods: list, shape: tuple[int, ...], num_classes: int, cfg: TrainConfig):
    """The stack as LocalLosses blocks: a block starts at every convolution or residual block; each but
    the last gets the head Flatten → NoisyLinear(·, classes); the last block's head is the classifier
    (flatten and the dense layers)."""
    flat_at = next(i for i, m in enumerate(mods) if isinstance(m, torch.nn.Flatten))
    starts = [i for i, m in enumerate(mods[:flat_at]) if isinstance(m, (NoisyConv2d, Residual))]
    blocks = [torch.nn.Sequential(*mods[a:b]) for a, b in zip(starts, starts[1:] + [flat_at])]
    heads, h = [], torch.zeros(1, *shape)
    with torch.no_grad():
        for block in blocks[:-1]:
            h = block(h)
            heads.append(torch.nn.Sequential(torch.nn.Flatten(), NoisyLinear(h[0].numel(), num_classes,
                                                                             activation=cfg.output_activation)))
    heads.append(torch.nn.Sequential(*mods[flat_at:]))
    return LocalLosses(blocks, heads)


def input_smoothing_layer(pixels: int, input_noise_std: float, kind: str = "gaussian") -> NoisyLinear:
    """Input-space randomized smoothing (Cohen et al. 2019) as a glrnet layer: a frozen identity with
    its own noise N(0, σ_in²) and no activation, so the next layer sees x + r and the certificate's
    σ/‖W₁‖₂ is σ_in. The later layers keep their own neuron noise (``noise_std``; tiny for Cohen's
    classifier, or the GLR networks' σ for the same noisy architecture)."""
    layer = NoisyLinear(pixels, pixels, noise=make_noise(kind, input_noise_std))
    with torch.no_grad():
        layer.weight.copy_(torch.eye(pixels))
        layer.bias.zero_()
    return layer.requires_grad_(False)


def build_producer(cfg: TrainConfig, generator: torch.Generator, loss: str | None = None):
    """The gradient producer of a config (of ``loss``, default ``cfg.loss``): GLR (possibly distributed),
    back-propagation, or a forward-only alternative with the same budget (replications forward passes
    per input)."""
    loss = loss or cfg.loss
    if cfg.method == "es":
        return ES(loss, population=cfg.replications // 2 * 2, sigma=cfg.sigma,
                  memory_budget_mb=cfg.memory_budget_mb, generator=generator)
    if cfg.method == "spsa":
        return SPSA(loss, directions=cfg.replications // 2, eps=cfg.sigma, generator=generator)
    if cfg.method == "forward":
        return ForwardGradient(loss, directions=cfg.replications, per_layer=cfg.injection == "layerwise",
                               generator=generator)
    if cfg.method == "bp":
        bp = Backprop(loss, noise=cfg.bp_noise, replications=cfg.replications if cfg.bp_noise else 1,
                      generator=generator)
        return dist_utils.DataParallelBackprop(bp) if dist_utils.world_size() > 1 else bp
    kwargs = dict(loss=loss, replications=cfg.layer_replications or cfg.replications, baseline=cfg.baseline,
                  sampler=cfg.sampler, injection=cfg.injection, memory_budget_mb=cfg.memory_budget_mb,
                  generator=generator)
    if dist_utils.world_size() > 1:
        return dist_utils.DistributedGLR(parallel=cfg.parallel, **kwargs)
    return GLR(**kwargs)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """The ``torch.optim`` optimizer of ``cfg.optimizer`` over the model's parameters, and its
    learning-rate schedule (``None`` for a constant rate), stepped once per epoch."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = cfg.momentum
    opt = OPTIMIZER_CLASSES[cfg.optimizer](model.parameters(), **kw)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    else:
        sched = None
    return opt, sched
