"""Training loop: any gradient producer (GLR or back-propagation) + any torch.optim optimizer.

``train(TrainConfig(...), out_dir)`` writes into ``out_dir``:

* ``checkpoint.safetensors`` (+ ``checkpoint.json``) after every epoch, atomically;
  ``resume=True`` continues from it and ends with the same weights as an
  uninterrupted run (every random stream is either saved or derived from the seed);
* ``history.csv`` after every epoch; at the end ``model.safetensors``,
  ``metrics.json`` and ``curves.png`` (training / validation loss per epoch, the
  seed's Figure 5).

Works unchanged under ``torchrun`` (see :mod:`glrnet.distributed`): each rank trains
on its shard or its share of the replications, only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .estimators import distributed as dist_utils
from .nn.activations import get_activation, is_smooth
from .checkpoint import (atomic_write_csv, atomic_write_text, load_checkpoint, output_lock, read_checkpoint_meta,
                         save_checkpoint, save_model)
from .data import SPLITS, DataError, Dataset, digits_folder_message, load_dataset
from .certify import first_layer, project_spectral_norm_, project_stiefel_
from .estimators import CONTROL_VARIATES, ES, GLR, SAMPLERS, SPSA, Backprop, ForwardGradient
from .estimators.glr import INJECTIONS
from .estimators.samplers import IID
from .nn import LocalLosses, MaxPool2d, NoisyConv2d, NoisyLinear, NoisyMLP, NoisySequential, Residual, get_loss
from .nn.injection import Layout, noisy_forward, probe
from .nn.noise import kinds, make_noise
from .nn.perturbations import PERTURBATIONS, get_perturbation
from .nn.rescale import rescale_noise_
from .plots import plot_curves
from .predict import predict_proba

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop}
SCHEDULES = ("constant", "cosine", "step")
METHODS = ("glr", "bp", "es", "spsa", "forward")   # forward-only alternatives: glrnet.alternatives
PROJECTIONS = ("spectral", "stiefel")   # how --max-first-norm c constrains W₁ (glrnet.certify)
WEIGHT_NOISE = ("none", "first", "conv", "all")   # which noisy layers perturb their parameters (site "weight")


def weight_noise_parts(value: str, flipout: bool = False, channelwise: bool = False) -> tuple[str, str]:
    """``--weight-noise WHICH[=PERTURBATION]`` as (which layers, the registered perturbation they take):
    ``conv`` → ("conv", "weight"), ``all=flipout`` → ("all", "flipout"); the ``flipout`` / ``channelwise``
    flags name the perturbation the older way."""
    which, _, name = value.partition("=")
    older = "flipout" if flipout else "channel" if channelwise else None
    if name and older and name != older:
        raise ValueError(f"weight noise {value!r} names perturbation {name!r}, and --{'flipout' if flipout else 'channelwise'}"
                         f" names {older!r}: give one")
    return which, name or older or "weight"
NORMS = ("none", "layer")                # "layer": LayerNorm / GroupNorm(1) without affine after hidden layers


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device, or a ``ValueError`` naming it when this machine cannot use it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) is {build}; use --device cpu "
                             "or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in checkpoints and metrics.json)."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    subset: int | None = None
    split: str = "standard"
    val_fraction: float = 0.1
    arch: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [20])
    activation: str = "sigmoid"
    output_activation: str | None = None
    loss: str = "cross_entropy"
    noise: str = "gaussian"
    noise_std: float = 2.0
    method: str = "glr"
    replications: int = 1000
    baseline: bool | str = True          # the control variate: True (leave-one-out), False (none), or a registered name
    sampler: str = "iid"
    injection: str = "all"
    bp_noise: bool = False
    memory_budget_mb: float = 256.0
    optimizer: str = "adam"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    epochs: int = 5
    batch_size: int = 32
    lap_replications: int = 1000
    eval_replications: int = 100
    warmup_loss: str | None = None       # the loss of the first warmup_epochs epochs (e.g. cross_entropy before the 0-1 loss)
    warmup_epochs: int = 0
    parallel: str = "replications"
    max_first_norm: float | None = None   # project the first noisy layer's operator norm onto ≤ this after each step
    first_norm_projection: str = "spectral"   # "spectral": ‖W₁‖₂ ≤ c; "stiefel": every singular value = c
    input_noise_std: float | None = None  # input-space smoothing: a frozen identity first layer with noise σ_in
    weight_noise: str = "none"            # which noisy layers carry their noise on their parameters: none, first, conv, all
    weight_noise_std: float = 0.05        # σ of that parameter noise; also ES's σ and SPSA's ε
    flipout: bool = False                 # those layers' parameter noise with per-input sign flips (site "flipout")
    channelwise: bool = False             # those layers' parameter noise on one output channel per replication (site "channel")
    layer_replications: list[int] | None = None   # layer-wise injection: replications per noisy layer (execution order)
    relative_noise: float | None = None   # σ of every activity-noise layer = this × RMS of its noise-free pre-activation
    relative_weight_noise: float | None = None   # σ of every weight-noise layer = this × RMS of its weight
    norm: str = "none"                    # parameter-free normalisation after every hidden noisy layer: none, layer
    local_losses: bool = False            # conv archs: a linear head per block, each block trained from its own loss
    max_seconds: float | None = None      # stop training after this much training time (checkpoint kept)
    budget_clock: str = "wall"            # max_seconds in wall time, or "cpu": this process's CPU time (a shared machine)
    eval_every: int = 0                   # every this many steps, validation accuracy (OT) into progress.csv
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "TrainConfig":
        """Check every option (a clear ``ValueError`` naming it); makes ``data_dir`` absolute, so a
        saved run can be evaluated or resumed from any working directory."""
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())
        resolve_device(self.device)
        if self.arch != "mlp":
            parse_arch(self.arch)
        get_activation(self.activation)
        if self.output_activation is not None:
            get_activation(self.output_activation)
        get_loss(self.loss)
        if self.warmup_loss is not None:
            get_loss(self.warmup_loss)
        checks = [(self.method in METHODS, f"unknown method {self.method!r}; valid: {', '.join(METHODS)}"),
                  (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
                  (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}"),
                  (self.noise in kinds(), f"unknown noise {self.noise!r}; valid: {', '.join(kinds())}"),
                  (self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}"),
                  (isinstance(self.baseline, bool) or self.baseline in CONTROL_VARIATES,
                   f"unknown control variate {self.baseline!r}; valid: {', '.join(CONTROL_VARIATES)}"),
                  (self.injection in INJECTIONS,
                   f"unknown injection {self.injection!r}; valid: {', '.join(INJECTIONS)}"),
                  (self.parallel in ("replications", "data") or self.parallel.isdigit() and int(self.parallel) >= 1,
                   f"unknown parallel mode {self.parallel!r}; valid: replications, data, or a number of data groups"),
                  (self.split in SPLITS, f"unknown split {self.split!r}; valid: {', '.join(SPLITS)}"),
                  (0 <= self.val_fraction < 1, f"val fraction must be in [0, 1), got {self.val_fraction}"),
                  (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
                  (self.batch_size >= 1, f"batch size must be ≥ 1, got {self.batch_size}"),
                  (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                  (all(h >= 1 for h in self.hidden), f"hidden widths must be ≥ 1, got {self.hidden}"),
                  (self.lap_replications >= 1, f"lap replications must be ≥ 1, got {self.lap_replications}"),
                  (self.max_first_norm is None or self.max_first_norm > 0,
                   f"max first norm must be > 0, got {self.max_first_norm}"),
                  (self.first_norm_projection in PROJECTIONS,
                   f"unknown first norm projection {self.first_norm_projection!r}; valid: {', '.join(PROJECTIONS)}"),
                  (self.first_norm_projection == "spectral" or self.max_first_norm is not None,
                   "first norm projection 'stiefel' needs max first norm (the common singular value c)"),
                  (self.input_noise_std is None or self.input_noise_std > 0,
                   f"input noise std must be > 0, got {self.input_noise_std}"),
                  (self.input_noise_std is None or self.arch == "mlp",
                   f"input noise std (input-space smoothing) is for arch mlp, got arch {self.arch!r}"),
                  (self.input_noise_std is None or self.noise == "gaussian",
                   f"input noise std needs gaussian noise (the certificate's), got noise {self.noise!r}"),
                  (weight_noise_parts(self.weight_noise)[0] in WEIGHT_NOISE,
                   f"unknown weight noise {self.weight_noise!r}; valid: {', '.join(WEIGHT_NOISE)}, each optionally "
                   f"=PERTURBATION ({', '.join(p for p in PERTURBATIONS if p != 'activity')})"),
                  (weight_noise_parts(self.weight_noise, self.flipout, self.channelwise)[1] in PERTURBATIONS,
                   f"unknown perturbation in weight noise {self.weight_noise!r}; valid: {', '.join(PERTURBATIONS)}"),
                  (self.weight_noise_std > 0, f"weight noise std must be > 0, got {self.weight_noise_std}"),
                  (self.relative_noise is None or self.relative_noise > 0,
                   f"relative noise must be > 0, got {self.relative_noise}"),
                  (self.relative_weight_noise is None or self.relative_weight_noise > 0,
                   f"relative weight noise must be > 0, got {self.relative_weight_noise}"),
                  (self.relative_weight_noise is None or (self.method == "glr" and self.weight_noise != "none"),
                   "relative weight noise needs GLR with weight-site layers (--weight-noise first, conv or all)"),
                  (not self.flipout or (self.method == "glr" and self.weight_noise != "none"),
                   "flipout needs GLR with weight-site layers (--weight-noise first, conv or all)"),
                  (not self.channelwise or (self.method == "glr" and self.weight_noise != "none"),
                   "channelwise needs GLR with weight-site layers (--weight-noise first, conv or all)"),
                  (not (self.channelwise and self.flipout), "choose one of flipout and channelwise"),
                  (self.layer_replications is None or (self.method == "glr" and self.injection == "layerwise"),
                   "layer replications need GLR with --injection layerwise"),
                  (self.layer_replications is None or (isinstance(self.layer_replications, list) and
                                                       len(self.layer_replications) > 0 and
                                                       all(isinstance(k, int) and k >= 1 for k in self.layer_replications)),
                   f"layer replications must be positive integers, got {self.layer_replications!r}"),
                  (self.norm in NORMS, f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}"),
                  (self.max_seconds is None or self.max_seconds > 0, f"max seconds must be > 0, got {self.max_seconds}"),
                  (self.eval_every >= 0, f"eval every must be ≥ 0 steps, got {self.eval_every}"),
                  (self.budget_clock in ("wall", "cpu"), f"budget clock must be wall or cpu, got {self.budget_clock!r}"),
                  (not self.local_losses or self.arch != "mlp", "local losses need a convolutional --arch"),
                  (self.eval_replications >= 1, f"eval replications must be ≥ 1, got {self.eval_replications}"),
                  (0 <= self.warmup_epochs < self.epochs,
                   f"warmup epochs must be in [0, epochs = {self.epochs}), got {self.warmup_epochs}"),
                  ((self.warmup_loss is None) == (self.warmup_epochs == 0),
                   "give --warmup-loss and --warmup-epochs together (a loss for the first epochs, and how many)"),
                  (self.replications >= 1, f"replications must be ≥ 1, got {self.replications}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.dataset == "digits" and self.data_dir is not None:
            raise DataError(digits_folder_message(self.data_dir))
        unused = unused_options(self)
        if unused:
            raise ValueError(next(iter(unused.values())))
        if self.method == "forward":
            ForwardGradient(self.loss)  # differentiable loss
            if not is_smooth(self.activation):
                raise ValueError(f"forward gradients need a smooth activation, not {self.activation!r} (use glr or es)")
        if self.method in ("es", "spsa") and self.replications < 2:
            raise ValueError(f"method {self.method} spends replications = {self.replications} forward passes per "
                             "input in pairs: use ≥ 2")
        if self.method == "bp":
            Backprop(self.loss)  # differentiable loss
            if self.bp_noise and not is_smooth(self.activation):
                raise ValueError(f"back-propagation through noise needs a smooth activation, not {self.activation!r}")
        return self

    @property
    def noisy(self) -> bool:
        """Trained with noise (GLR, or BP through noise): its objective and its LAP predictor are noisy."""
        return self.method == "glr" or self.bp_noise

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict) -> "TrainConfig":
        """A config stored by an older glrnet: options it lacks take the defaults *of that time*
        where they changed (``val_fraction`` was 0 before it became 0.1)."""
        legacy = {"val_fraction": 0.0, "baseline": False}
        d = dict(d)
        if "antithetic" in d:   # before samplers: a boolean
            d.setdefault("sampler", "antithetic" if d.pop("antithetic") else "iid")
        return cls.from_dict({**{k: v for k, v in legacy.items() if k not in d}, **d})


def unused_options(cfg: TrainConfig, given: set[str] | None = None) -> dict[str, str]:
    """The options of ``cfg`` that would take no effect (name → the line that says why), among ``given``
    (default: those that differ from their default), so that a run never records an option it ignored.
    ``baseline`` is judged only when ``given`` names it: ``baseline = false`` is the state of every
    method but GLR, and older runs and specs record it so."""
    default = TrainConfig()
    if given is None:
        given = {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)} - {"baseline"}
    method, out = cfg.method, {}
    weights_used = method == "glr" or (method == "bp" and cfg.bp_noise)
    if "sampler" in given and method != "glr":
        out["sampler"] = (f"sampler {cfg.sampler} draws GLR's noise; method {method} does not use it"
                          f"{' (ES draws its own antithetic pairs)' if method == 'es' else ''}: drop --sampler or "
                          "use --method glr")
    if "injection" in given and method not in ("glr", "forward"):
        out["injection"] = (f"injection {cfg.injection} is for GLR and forward gradients; method {method} does not use "
                            "it: drop --injection")
    if "baseline" in given and method != "glr":
        out["baseline"] = (f"the leave-one-out baseline is GLR's control variate; method {method} does not use it: "
                           "drop --baseline / --no-baseline")
    if "weight_noise" in given and cfg.weight_noise != "none":
        if not weights_used:
            why = ("trains the noise-free network" if method == "bp"
                   else "perturbs every weight itself (σ = --weight-noise-std)")
            out["weight_noise"] = (f"weight noise {cfg.weight_noise} sets GLR's perturbation site; method {method} "
                                   f"{why}: drop --weight-noise")
        elif weight_noise_parts(cfg.weight_noise)[0] == "conv" and cfg.arch == "mlp":
            out["weight_noise"] = ("weight noise conv puts noise on the convolutions, and arch mlp has none: use "
                                   "--weight-noise first or all, or a convolutional --arch")
    return out


ARCHS = {"lenet": "conv:6:5,maxpool:2,conv:16:5,maxpool:2",       # LeNet-style; + --hidden and the output layer
         "resnet": "conv:8:3:2:1,res:8:3,res:8:3,res:8:3,avgpool:2"}  # 3 residual blocks of 2 noisy convolutions


def parse_arch(arch: str) -> list[tuple[str, list[int]]]:
    """The convolutional part of ``arch`` as [(kind, numbers)], or a ``ValueError`` naming the bad token."""
    out = []
    for token in ARCHS.get(arch, arch).split(","):
        kind, *args = token.strip().split(":")
        try:
            nums = [int(a) for a in args]
        except ValueError:
            nums = []
        if not ((kind == "conv" and 2 <= len(nums) <= 4) or (kind == "res" and len(nums) == 2)
                or (kind in ("maxpool", "avgpool") and len(nums) == 1)) or min(nums, default=0) < 0:
            raise ValueError(f"--arch: cannot read {token!r}; use mlp, {', '.join(ARCHS)}, or comma-separated "
                             "conv:C:K[:stride[:padding]], res:C:K (x + conv(φ(conv(x))), C channels in and out), "
                             "maxpool:K, avgpool:K")
        out.append((kind, nums))
    return out


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """A ``ValueError`` naming the options in which ``cfg`` differs from the run saved in ``ckpt``
    (read from its metadata alone, before any weight is loaded); ``epochs`` may grow."""
    saved = dict(asdict(TrainConfig.from_saved(read_checkpoint_meta(ckpt)["config"])), epochs=cfg.epochs)
    if saved != dict(asdict(cfg), epochs=cfg.epochs):
        diff = sorted(k for k in saved if saved[k] != asdict(cfg).get(k))
        raise ValueError(f"{ckpt} was written with a different configuration (differs in "
                         + ", ".join(f"{k}: saved {saved[k]!r}, now {asdict(cfg).get(k)!r}" for k in diff)
                         + "); use another --out or the same options")


def build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> NoisySequential:
    """``arch="mlp"``: NoisyMLP [pixels, *hidden, classes]. Otherwise a convolutional stack —
    ``lenet`` or comma-separated ``conv:C:K[:stride[:padding]]``, ``maxpool:K``, ``avgpool:K`` —
    then flatten, noisy linear layers of widths ``hidden``, and the output layer. Every noisy
    layer but the output has φ = ``activation``."""
    model = _build_model(cfg, image_shape, num_classes)
    if cfg.weight_noise != "none":
        which, name = weight_noise_parts(cfg.weight_noise, cfg.flipout, cfg.channelwise)
        wnoise = make_noise(cfg.noise, cfg.weight_noise_std)
        trainable = [m for m in model.noisy_layers if m.weight.requires_grad]
        chosen = {"first": trainable[:1], "conv": [m for m in trainable if isinstance(m, NoisyConv2d)],
                  "all": trainable}[which]
        for m in chosen:   # "first": the first trainable layer only (few parameters: ES-style NSR ≈ √(P/K) stays small)
            m.perturbation = get_perturbation(name, wnoise)
            m.perturbation.check(m)
    return model


def _build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> NoisySequential:
    noise = make_noise(cfg.noise, cfg.noise_std)
    pixels = math.prod(image_shape)
    if cfg.arch == "mlp":
        if cfg.input_noise_std is None and cfg.norm == "none" and cfg.weight_noise == "none":
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


def build_producer(cfg: TrainConfig, generator: torch.Generator):
    """The gradient producer of a config: GLR (possibly distributed) or back-propagation."""
    if cfg.method in ("es", "spsa", "forward"):   # the same budget: replications forward passes per input
        if cfg.method == "es":
            return ES(cfg.loss, population=cfg.replications // 2 * 2, sigma=cfg.weight_noise_std,
                      memory_budget_mb=cfg.memory_budget_mb, generator=generator)
        if cfg.method == "spsa":
            return SPSA(cfg.loss, directions=cfg.replications // 2, eps=cfg.weight_noise_std, generator=generator)
        return ForwardGradient(cfg.loss, directions=cfg.replications, per_layer=cfg.injection == "layerwise",
                               generator=generator)
    if cfg.method == "bp":
        bp = Backprop(cfg.loss, noise=cfg.bp_noise, replications=cfg.replications if cfg.bp_noise else 1,
                      generator=generator)
        return dist_utils.DataParallelBackprop(bp) if dist_utils.world_size() > 1 else bp
    kwargs = dict(loss=cfg.loss, replications=cfg.layer_replications or cfg.replications, baseline=cfg.baseline,
                  sampler=cfg.sampler,
                  injection=cfg.injection, memory_budget_mb=cfg.memory_budget_mb, generator=generator)
    if dist_utils.world_size() > 1:
        return dist_utils.DistributedGLR(parallel=cfg.parallel, **kwargs)
    return GLR(**kwargs)


def build_optimizer(cfg: TrainConfig, model: NoisySequential):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = cfg.momentum
    opt = OPTIMIZERS[cfg.optimizer](model.parameters(), **kw)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    else:
        sched = None
    return opt, sched


@torch.no_grad()
def evaluate(model: NoisySequential, x, y, loss, noisy: bool, replications: int = 100,
             generator: torch.Generator | None = None, lap_replications: int = 0) -> dict:
    """Loss (expected under the noise if ``noisy``, else noise-free), OT accuracy, optional LAP accuracy."""
    loss_fn = get_loss(loss)
    out = model(x)
    result = {"acc_ot": (out.argmax(1) == y).double().mean().item()}
    if noisy:
        total = 0.0
        for i in range(0, len(x), 500):
            xi, yi = x[i:i + 500], y[i:i + 500]
            layout = Layout(probe(model, xi))
            r = layout.fill_(IID(), xi.new_empty(replications, xi.shape[0], layout.width), generator)
            o = noisy_forward(model, xi, layout.injection(replications, xi.shape[0], r), layout.first).reshape(
                replications, xi.shape[0], -1)
            total += loss_fn(o.reshape(-1, o.shape[-1]), yi.repeat(replications)).double().sum().item()
        result["loss"] = total / (len(x) * replications)
    else:
        result["loss"] = loss_fn(out, y).double().mean().item()
    if lap_replications:
        p = predict_proba(model, x, "lap", lap_replications, generator=generator)
        result["acc_lap"] = (p.argmax(1) == y).double().mean().item()
    return result


HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc_ot", "lr", "seconds", "samples_per_second",
                  "sample_replications_per_second"]


def _seeded(seed: int, *stream: int, device="cpu") -> torch.Generator:
    """A generator for one named stream of a run: a pure function of (seed, stream ids)."""
    return torch.Generator(device=device).manual_seed(dist_utils.stream_seed(seed, *stream))


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False,
          data: Dataset | None = None, progress: bool | None = None, desc: str | None = None) -> dict:
    """Train per ``cfg``; write outputs into ``out_dir`` (if given). Returns the metrics dict.

    ``quiet`` silences the per-epoch lines; ``progress`` (default: not ``quiet``) shows one
    bar over all batches of the run (rate, ETA), labelled ``desc``. ``out_dir`` is held by a
    lock file while the run writes there (:func:`~glrnet.checkpoint.output_lock`: a second
    process training into it is refused); a run that fails before its first checkpoint
    leaves no folder behind.
    """
    cfg.validate()
    if out_dir is None or dist_utils.rank() != 0:
        return _train(cfg, out_dir, resume, quiet, data, progress, desc)
    with output_lock(out_dir):
        return _train(cfg, out_dir, resume, quiet, data, progress, desc)


def _train(cfg: TrainConfig, out_dir: str | Path | None, resume: bool, quiet: bool, data: Dataset | None,
           progress: bool | None, desc: str | None) -> dict:
    progress = (not quiet) if progress is None else progress
    cfg.validate()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    writer = out_dir is not None and rank == 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
        done = out / "metrics.json"
        ckpt_meta = out / "checkpoint.safetensors"
        if resume and ckpt_meta.exists():   # before any weight is loaded: a clear line, not a size mismatch
            check_resumable(ckpt_meta, cfg)
        if done.exists() and resume:
            metrics = json.loads(done.read_text())
            if asdict(TrainConfig.from_saved(metrics.get("config", {}))) == asdict(cfg):
                return metrics
        if not resume and (out / "checkpoint.safetensors").exists():
            raise ValueError(f"{out} already holds a run (checkpoint.safetensors); pass --resume to continue it "
                             "or choose another --out")
    device = torch.device(cfg.device)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.val_fraction, cfg.subset, cfg.seed,
                            split=cfg.split)
    data = data.to(device)
    with torch.random.fork_rng(devices=[]):   # the initial weights from the run's own stream; the
        torch.manual_seed(dist_utils.stream_seed(cfg.seed, 0))   # caller's global RNG is left as it was
        model = build_model(cfg, data.image_shape, data.num_classes).to(device)
    gen = _seeded(cfg.seed, 4, device=device)   # the estimator's noise (or BP's, with --bp-noise)
    if cfg.method == "glr" and world > 1:
        gen = dist_utils.rank_generator(dist_utils.stream_seed(cfg.seed, 4), device)
    producer = build_producer(cfg, gen)
    warmup = None if cfg.warmup_loss is None else build_producer(replace(cfg, loss=cfg.warmup_loss), gen)
    opt, sched = build_optimizer(cfg, model)
    history, start_epoch, train_seconds = [], 1, 0.0
    ckpt = out / "checkpoint.safetensors" if out is not None else None
    if resume and ckpt is not None and ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt, {"estimator": gen})
        if sched is not None and meta.get("scheduler"):
            sched.load_state_dict(meta["scheduler"])
        history, start_epoch, train_seconds = meta["history"], meta["epoch"] + 1, meta["train_seconds"]
        if world > 1:  # each rank continues its own stream: stored per rank in the sidecar
            gen.set_state(torch.tensor(meta["rank_rng"][rank], dtype=torch.uint8))
    elif world > 1:
        dist_utils.broadcast_parameters(model)

    first_norm = None
    if cfg.max_first_norm is not None:   # keeps the noise meaningful: ‖W₁‖₂ ≤ c (docs/robustness.md, certified radii)
        layer, shape = first_layer(model, data.x_train[:1]), tuple(model.bind(data.x_train[:1]).shape[1:])
        project = project_stiefel_ if cfg.first_norm_projection == "stiefel" else project_spectral_norm_
        first_norm = lambda: project(layer, cfg.max_first_norm, shape)  # noqa: E731
        first_norm()
    has_val = data.x_val is not None and len(data.x_val) > 0
    x_val, y_val = (data.x_val, data.y_val) if has_val else (data.x_test, data.y_test)
    n = len(data.x_train)
    reps = getattr(producer, "forward_passes", cfg.replications if cfg.noisy else 1)
    val_name = "validation" if has_val else "test"
    batches = range(0, n, cfg.batch_size)
    bar = tqdm(total=len(batches) * (cfg.epochs - start_epoch + 1), desc=desc or cfg.method,
               disable=not progress or rank != 0, unit="batch", dynamic_ncols=True, leave=False)
    meta_progress = []
    if resume and ckpt is not None and ckpt.exists():
        meta_progress = read_checkpoint_meta(ckpt).get("progress", [])
    progress_rows = list(meta_progress)
    step = progress_rows[-1]["step"] if progress_rows else (start_epoch - 1) * len(batches)
    stopped = False
    clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
    budget_used = progress_rows[-1].get("budget_seconds", 0.0) if progress_rows else 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        model.train()
        t0, c0 = time.perf_counter(), clock()
        order = torch.randperm(n, generator=_seeded(cfg.seed, 1, epoch)).to(device)
        running = torch.zeros((), dtype=torch.float64, device=device)
        for i, start in enumerate(batches):
            idx = order[start:start + cfg.batch_size]
            xb, yb = dist_utils.shard_batch(data.x_train[idx], data.y_train[idx], cfg)
            opt.zero_grad(set_to_none=True)
            if cfg.relative_noise is not None or cfg.relative_weight_noise is not None:
                rescale_noise_(model, xb, cfg.relative_noise, cfg.relative_weight_noise)   # σ from (θ, batch) only
            stats = (warmup if epoch <= cfg.warmup_epochs else producer).backward(model, xb, yb)
            opt.step()
            if first_norm is not None:
                first_norm()
            running += stats.loss
            bar.update()
            step += 1
            if cfg.eval_every and step % cfg.eval_every == 0:
                with torch.no_grad():
                    acc = (model(x_val).argmax(1) == y_val).double().mean().item()
                progress_rows.append({"step": step, "epoch": epoch, "seconds": train_seconds + time.perf_counter() - t0,
                                      "budget_seconds": budget_used + clock() - c0, "val_acc_ot": acc})
            if progress and rank == 0 and (i % 20 == 19 or start + cfg.batch_size >= n):
                elapsed = time.perf_counter() - t0
                done = min(start + cfg.batch_size, n)
                bar.set_postfix(epoch=f"{epoch}/{cfg.epochs}", loss=f"{running.item() / (i + 1):.4f}",
                                rep_per_s=f"{done * reps / elapsed:.3g}", refresh=False)
            if cfg.max_seconds is not None and budget_used + clock() - c0 >= cfg.max_seconds:
                stopped = True     # a time budget: this epoch ends here, as if it were the last
                break
        budget_used += clock() - c0
        if sched is not None:
            sched.step()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        g_eval = _seeded(cfg.seed, 2, epoch, device=device)
        tr = evaluate(model, data.x_train, data.y_train, cfg.loss, cfg.noisy, cfg.eval_replications, g_eval)
        va = evaluate(model, x_val, y_val, cfg.loss, cfg.noisy, cfg.eval_replications, g_eval)
        row = {"epoch": epoch, "train_loss": tr["loss"], "val_loss": va["loss"], "val_acc_ot": va["acc_ot"],
               "lr": opt.param_groups[0]["lr"], "seconds": seconds, "samples_per_second": n / seconds,
               "sample_replications_per_second": n * reps / seconds}
        history.append(row)
        if not quiet and rank == 0:
            tqdm.write(f"epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f}  {val_name} loss {va['loss']:.4f}  "
                       f"{val_name} acc (OT) {va['acc_ot']:.4f}  {seconds:.1f}s  {n * reps / seconds:.3g} sample-rep/s")
        sidecar = {"config": asdict(cfg), "epoch": cfg.epochs if stopped else epoch, "history": history,
                   "train_seconds": train_seconds, "progress": progress_rows,
                   "scheduler": sched.state_dict() if sched is not None else None}
        if world > 1:
            sidecar["rank_rng"] = dist_utils.gather_generator_states(gen)
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, model, opt, {"estimator": gen}, sidecar)
            atomic_write_csv(out / "history.csv", history, HISTORY_FIELDS)
            if progress_rows:
                atomic_write_csv(out / "progress.csv", progress_rows, ["step", "epoch", "seconds", "budget_seconds",
                                                                       "val_acc_ot"])

    bar.close()
    model.eval()
    # LAP only for a model trained with noise: a noise-free BP network has no noisy predictor
    test = evaluate(model, data.x_test, data.y_test, cfg.loss, cfg.noisy, cfg.eval_replications,
                    _seeded(cfg.seed, 3, device=device), lap_replications=cfg.lap_replications if cfg.noisy else 0)
    metrics = {"test_accuracy_ot": test["acc_ot"], "test_accuracy_lap": test.get("acc_lap"), "test_loss": test["loss"],
               "curves_on": val_name,
               "epochs": cfg.epochs, "train_seconds": train_seconds, "steps": step,
               "budget_seconds": budget_used,
               "stopped_by_time": bool(cfg.max_seconds is not None and budget_used >= cfg.max_seconds),
               "final_train_loss": history[-1]["train_loss"] if history else math.nan,
               "dataset": data.summary(), "world_size": world, "config": asdict(cfg)}
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        save_model(out / "model.safetensors", model, {"config": asdict(cfg)})
        plot_curves(history, out / "curves.png", title=f"{desc or out.name}: {cfg.method.upper()} · {cfg.activation} · {cfg.loss}",
                    val_name=val_name)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, ensure_ascii=False))
    if not quiet and rank == 0:
        lap = f"  LAP(K={cfg.lap_replications}) {test['acc_lap']:.4f}" if cfg.noisy else ""
        print(f"test accuracy: OT {test['acc_ot']:.4f}{lap}  ({train_seconds:.1f}s training)")
    return metrics
