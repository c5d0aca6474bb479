"""What defines a training run, in five parts, each validated where it lives.

=============  =====================================================================================
``data``       which images: dataset, folder, size, subset, split, validation fraction
``model``      the network: architecture, widths, activations, normalisation, input smoothing, and for
               a network through time its input encoding
``estimator``  where the noise sits and how the gradient is estimated: method, noise, ``perturb``,
               replications, control variate, sampler, injection, ES's σ / SPSA's ε, memory, parallelism
``optim``      the objective and its optimisation: loss (and a warm-up loss), optimizer, schedule,
               epochs, batch size, the first layer's norm constraint, a time budget
``evaluation`` LAP replications, the noisy passes behind the loss curves, mid-epoch validation
=============  =====================================================================================

``TrainConfig(data=DataConfig(...), model=..., ...)`` composes them; ``TrainConfig(lr=0.01, arch="lenet")``
takes any option by its own name and routes it to its part, and ``cfg.lr`` reads ``cfg.optim.lr``. Runs are
saved flat (:meth:`TrainConfig.to_dict`), as the command line and the spec files name them, and read back
with :meth:`TrainConfig.from_saved`, which also reads the options of older releases (``weight_noise``,
``weight_noise_std``, ``flipout``, ``channelwise``, ``antithetic``).

Where the noise sits is one option, ``perturb``: ``activity`` (every noisy layer's units, the paper's
setting) or ``WHICH=PERTURBATION[:STD]``: the noisy layers ``first`` (the first trainable one), ``conv``
(the convolutions) or ``all`` carry the registered perturbation (:mod:`glrnet.nn.perturbations`:
``weight``, ``flipout``, ``channel``, or a plug-in's) on their parameters with noise of that std
(default 0.05), e.g. ``conv=flipout:0.02``.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..data import SPLITS, DataError, digits_folder_message
from ..estimators import CONTROL_VARIATES, SAMPLERS, Backprop
from ..estimators.glr import INJECTIONS
from ..nn.activations import get_activation, is_smooth
from ..nn.losses import get_loss
from ..nn.noise import kinds
from ..sequences import parse_encoding
from .grammar import DEFAULT_WEIGHT_STD, legacy_options, parse_arch, parse_perturb, parse_time_arch, unit_name

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")
METHODS = ("glr", "bp", "es", "spsa", "forward")   # forward-only alternatives: glrnet.estimators.alternatives
PROJECTIONS = ("spectral", "stiefel")   # how max_first_norm c constrains W₁ (glrnet.certify)
NORMS = ("none", "layer")   # "layer": LayerNorm / GroupNorm(1) without affine after hidden layers


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


def _check(checks) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class DataConfig:
    """Which images (:func:`glrnet.data.load_dataset`)."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    subset: int | None = None
    split: str = "standard"
    val_fraction: float = 0.1      # a stratified share of training held out for the curves (0: they use the test set)

    def validate(self) -> "DataConfig":
        """Also makes ``data_dir`` absolute, so that a saved run is evaluated or resumed from anywhere."""
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())
        _check([(self.split in SPLITS, f"unknown split {self.split!r}; valid: {', '.join(SPLITS)}"),
                (0 <= self.val_fraction < 1, f"val fraction must be in [0, 1), got {self.val_fraction}")])
        if self.dataset == "digits" and self.data_dir is not None:
            raise DataError(digits_folder_message(self.data_dir))
        return self


@dataclass
class ModelConfig:
    """The network (:func:`glrnet.train.build_model`); its noise comes from the estimator part."""

    arch: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [20])
    activation: str = "sigmoid"
    output_activation: str | None = None
    norm: str = "none"                    # parameter-free normalisation after every hidden noisy layer
    local_losses: bool = False            # conv archs: a linear head per block, each block trained on its own loss
    input_noise_std: float | None = None  # input-space smoothing: a frozen identity first layer with noise σ_in
    encoding: str = "none"                # networks through time: images as sequences (glrnet.sequences)
    init_scale: float = 1.0               # every trainable noisy layer's initial weights × this

    def validate(self) -> "ModelConfig":
        time = parse_time_arch(self.arch)
        if self.arch != "mlp" and time is None:
            parse_arch(self.arch)
        parse_encoding(self.encoding)
        get_activation(self.activation)
        if self.output_activation is not None:
            get_activation(self.output_activation)
        _check([(all(h >= 1 for h in self.hidden), f"hidden widths must be ≥ 1, got {self.hidden}"),
                (self.norm in NORMS, f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}"),
                (self.init_scale > 0, f"init scale must be > 0, got {self.init_scale}"),
                (not self.local_losses or (self.arch != "mlp" and time is None),
                 "local losses need a convolutional --arch"),
                ((time is None) == (self.encoding == "none"),
                 f"--arch {self.arch} " + ("takes sequences: give --encoding rate:T, rows or pixels" if time else
                                           "takes images: --encoding is for networks through time (lif:H, rnn:H)")),
                (self.input_noise_std is None or self.input_noise_std > 0,
                 f"input noise std must be > 0, got {self.input_noise_std}"),
                (self.input_noise_std is None or self.arch == "mlp",
                 f"input noise std (input-space smoothing) is for arch mlp, got arch {self.arch!r}")])
        return self


@dataclass
class EstimatorConfig:
    """Where the noise sits and how the gradient is estimated (:func:`glrnet.train.build_producer`)."""

    method: str = "glr"
    noise: str = "gaussian"               # the noise density of every noisy layer (a registered family)
    noise_std: float = 2.0                # its σ on the units (activity perturbation)
    perturb: str = "activity"             # activity, or WHICH=PERTURBATION[:STD] (module docstring)
    relative_noise: float | None = None   # σ of every activity-noise layer = this × RMS of its noise-free pre-activation
    relative_weight_noise: float | None = None   # σ of every weight-noise layer = this × RMS of its weight
    replications: int = 1000
    baseline: bool | str = True           # the control variate: True (leave-one-out), False (none), or a registered name
    sampler: str = "iid"
    injection: str = "all"
    layer_replications: list[int] | None = None   # layer-wise injection: replications per noisy layer
    sigma: float = DEFAULT_WEIGHT_STD     # ES's σ and SPSA's ε: the scale of their own parameter perturbation
    bp_noise: bool = False                # back-propagation through noisy replications (smooth units)
    memory_budget_mb: float = 256.0
    parallel: str = "replications"        # under torchrun: replications, data, or a number of data groups

    def __post_init__(self):
        try:   # one spelling per setting: "conv=weight" is stored as "conv=weight:0.05"
            which, name, std = parse_perturb(self.perturb)
            self.perturb = "activity" if name == "activity" else f"{which}={name}:{std:g}"
        except ValueError:
            pass   # validate() says why

    @property
    def noisy(self) -> bool:
        """Trained with noise (GLR, or BP through noise): its objective and its LAP predictor are noisy."""
        return self.method == "glr" or self.bp_noise

    def validate(self) -> "EstimatorConfig":
        which = parse_perturb(self.perturb)[0]
        glr = self.method == "glr"
        lr = self.layer_replications
        _check([(self.method in METHODS, f"unknown method {self.method!r}; valid: {', '.join(METHODS)}"),
                (self.noise in kinds(), f"unknown noise {self.noise!r}; valid: {', '.join(kinds())}"),
                (self.noise_std > 0, f"noise std must be > 0, got {self.noise_std}"),
                (self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}"),
                (isinstance(self.baseline, bool) or self.baseline in CONTROL_VARIATES,
                 f"unknown control variate {self.baseline!r}; valid: {', '.join(CONTROL_VARIATES)}"),
                (self.injection in INJECTIONS, f"unknown injection {self.injection!r}; valid: {', '.join(INJECTIONS)}"),
                (self.parallel in ("replications", "data") or self.parallel.isdigit() and int(self.parallel) >= 1,
                 f"unknown parallel mode {self.parallel!r}; valid: replications, data, or a number of data groups"),
                (self.replications >= 1, f"replications must be ≥ 1, got {self.replications}"),
                (self.method not in ("es", "spsa") or self.replications >= 2,
                 f"method {self.method} spends replications = {self.replications} forward passes per input in "
                 "pairs: use ≥ 2"),
                (self.sigma > 0, f"sigma must be > 0, got {self.sigma}"),
                (self.memory_budget_mb > 0, f"memory budget must be > 0 MB, got {self.memory_budget_mb}"),
                (self.relative_noise is None or self.relative_noise > 0,
                 f"relative noise must be > 0, got {self.relative_noise}"),
                (self.relative_weight_noise is None or self.relative_weight_noise > 0,
                 f"relative weight noise must be > 0, got {self.relative_weight_noise}"),
                (self.relative_weight_noise is None or (glr and which != "none"),
                 "relative weight noise needs GLR with the noise on parameters (--perturb first|conv|all=...)"),
                (lr is None or (glr and self.injection == "layerwise"),
                 "layer replications need GLR with --injection layerwise"),
                (lr is None or (isinstance(lr, list) and len(lr) > 0 and
                                all(isinstance(k, int) and k >= 1 for k in lr)),
                 f"layer replications must be positive integers, got {lr!r}"),
                (not self.bp_noise or self.method == "bp", f"bp noise is for --method bp, got {self.method}")])
        return self


@dataclass
class OptimConfig:
    """The objective and how it is optimised (:func:`glrnet.train.build_optimizer`, the loop)."""

    loss: str = "cross_entropy"
    warmup_loss: str | None = None       # the loss of the first warmup_epochs epochs (cross-entropy before 0-1)
    warmup_epochs: int = 0
    optimizer: str = "adam"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    epochs: int = 5
    batch_size: int = 32
    max_first_norm: float | None = None   # after each step: the first noisy layer's operator norm ≤ this
    first_norm_projection: str = "spectral"   # "spectral": ‖W₁‖₂ ≤ c; "stiefel": every singular value = c
    max_seconds: float | None = None      # stop training after this much training time (checkpoint kept)
    budget_clock: str = "wall"            # max_seconds in wall time, or "cpu": this process's CPU time

    def validate(self) -> "OptimConfig":
        get_loss(self.loss)
        if self.warmup_loss is not None:
            get_loss(self.warmup_loss)
        _check([(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
                (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}"),
                (self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
                (self.batch_size >= 1, f"batch size must be ≥ 1, got {self.batch_size}"),
                (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                (0 <= self.warmup_epochs < self.epochs,
                 f"warmup epochs must be in [0, epochs = {self.epochs}), got {self.warmup_epochs}"),
                ((self.warmup_loss is None) == (self.warmup_epochs == 0),
                 "give --warmup-loss and --warmup-epochs together (a loss for the first epochs, and how many)"),
                (self.max_first_norm is None or self.max_first_norm > 0,
                 f"max first norm must be > 0, got {self.max_first_norm}"),
                (self.first_norm_projection in PROJECTIONS,
                 f"unknown first norm projection {self.first_norm_projection!r}; valid: {', '.join(PROJECTIONS)}"),
                (self.first_norm_projection == "spectral" or self.max_first_norm is not None,
                 "first norm projection 'stiefel' needs max first norm (the common singular value c)"),
                (self.max_seconds is None or self.max_seconds > 0, f"max seconds must be > 0, got {self.max_seconds}"),
                (self.budget_clock in ("wall", "cpu"), f"budget clock must be wall or cpu, got {self.budget_clock!r}")])
        return self


@dataclass
class EvalConfig:
    """What the run measures besides training."""

    lap_replications: int = 1000      # K of the LAP predictor on the test set
    eval_replications: int = 100      # noisy passes per image behind the per-epoch loss curves
    eval_every: int = 0               # every this many steps, validation accuracy (OT) into progress.csv

    def validate(self) -> "EvalConfig":
        _check([(self.lap_replications >= 1, f"lap replications must be ≥ 1, got {self.lap_replications}"),
                (self.eval_replications >= 1, f"eval replications must be ≥ 1, got {self.eval_replications}"),
                (self.eval_every >= 0, f"eval every must be ≥ 0 steps, got {self.eval_every}")])
        return self


PARTS = {"data": DataConfig, "model": ModelConfig, "estimator": EstimatorConfig, "optim": OptimConfig,
         "evaluation": EvalConfig}
RUN_OPTIONS = ("seed", "device")
OWNER = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}   # option name → its part


@dataclass(init=False)
class TrainConfig:
    """Everything that defines a run: its five parts, its seed and its device (saved flat in checkpoints
    and metrics.json). ``TrainConfig(lr=0.01)`` routes an option to its part; ``cfg.lr`` reads it."""

    data: DataConfig
    model: ModelConfig
    estimator: EstimatorConfig
    optim: OptimConfig
    evaluation: EvalConfig
    seed: int = 0
    device: str = "cpu"

    def __init__(self, data: DataConfig | None = None, model: ModelConfig | None = None,
                 estimator: EstimatorConfig | None = None, optim: OptimConfig | None = None,
                 evaluation: EvalConfig | None = None, seed: int = 0, device: str = "cpu", **options):
        given = dict(data=data, model=model, estimator=estimator, optim=optim, evaluation=evaluation)
        for part, cls in PARTS.items():   # parts are copied: replace(cfg, lr=...) leaves cfg as it was
            value = given[part]
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"TrainConfig {part}= takes a {cls.__name__}, got {type(value).__name__}")
            object.__setattr__(self, part, copy.deepcopy(value) if value is not None else cls())
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "device", device)
        options = legacy_options(options)
        unknown = [k for k in options if k not in OWNER]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(OWNER) + list(RUN_OPTIONS), n=3)
            raise ValueError(f"unknown training option {unknown[0]!r}" + (f"; closest: {', '.join(close)}" if close
                             else f"; valid: {', '.join(self.option_names())}"))
        by_part = {}
        for k, v in options.items():
            by_part.setdefault(OWNER[k], {})[k] = v
        for part, values in by_part.items():   # through the part's constructor: its __post_init__ sees them
            current = getattr(self, part)
            object.__setattr__(self, part, type(current)(**{**_values(current), **values}))

    def __getattr__(self, name: str):
        part = OWNER.get(name)
        if part is None:
            raise AttributeError(f"{type(self).__name__} has no option {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def __setattr__(self, name: str, value) -> None:
        if name in OWNER:
            setattr(getattr(self, OWNER[name]), name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def noisy(self) -> bool:
        return self.estimator.noisy

    @property
    def unit(self) -> str:
        """The hidden units, for reports: the activation, or what a network through time's arch makes them."""
        return unit_name(self.arch, self.activation)

    @staticmethod
    def option_names() -> tuple[str, ...]:
        """Every option's flat name, part by part, then the run's own (seed, device)."""
        return tuple(OWNER) + RUN_OPTIONS

    def to_dict(self) -> dict:
        """The flat form of the run: the command line's and the spec files' names (saved with every run)."""
        out = {}
        for part in PARTS:
            out.update(_values(getattr(self, part)))
        return {**copy.deepcopy(out), "seed": self.seed, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From flat options (unknown ones refused with one line naming the closest)."""
        d = dict(d)
        run = {k: d.pop(k) for k in RUN_OPTIONS if k in d}
        return cls(**run, **d)

    @classmethod
    def from_saved(cls, d: dict) -> "TrainConfig":
        """A config stored by an older glrnet: options it lacks take the defaults *of that time*
        where they changed (``val_fraction`` was 0 before it became 0.1)."""
        legacy = {"val_fraction": 0.0, "baseline": False}
        return cls.from_dict({**{k: v for k, v in legacy.items() if k not in d}, **d})

    def validate(self) -> "TrainConfig":
        """Every part's own checks, then the rules between parts; a ``ValueError`` naming the option."""
        resolve_device(self.device)
        for part in PARTS:
            getattr(self, part).validate()
        m, e, o = self.model, self.estimator, self.optim
        time = parse_time_arch(m.arch) is not None
        _check([(m.input_noise_std is None or e.noise == "gaussian",
                 f"input noise std needs gaussian noise (the certificate's), got noise {e.noise!r}"),
                (not time or (e.relative_noise is None and e.relative_weight_noise is None and m.norm == "none"
                              and o.max_first_norm is None),
                 f"--arch {m.arch} (through time) takes none of --relative-noise, --relative-weight-noise, --norm, "
                 "--max-first-norm"),
                (not time or e.method in ("glr", "bp", "es", "forward"),
                 f"--arch {m.arch} (through time): method {e.method} is not defined for it; use glr, bp (through "
                 "time, surrogate derivative), es or forward"),
                (not (time and e.bp_noise), "--bp-noise is not defined through time: use --method glr")])
        unused = unused_options(self)
        if unused:
            raise ValueError(next(iter(unused.values())))
        if e.method == "forward" and not is_smooth(m.activation):
            raise ValueError(f"forward gradients need a smooth activation, not {m.activation!r} (use glr or es)")
        if e.method in ("forward", "bp"):
            Backprop(o.loss)   # a differentiable loss, or one line saying it is not
        if e.bp_noise and not is_smooth(m.activation):
            raise ValueError(f"back-propagation through noise needs a smooth activation, not {m.activation!r}")
        return self


def _values(part) -> dict:
    return {f.name: getattr(part, f.name) for f in fields(part)}


def unused_options(cfg: TrainConfig, given: set[str] | None = None) -> dict[str, str]:
    """The options of ``cfg`` that would take no effect (name → the line that says why), among ``given``
    (default: those that differ from their default), so that a run never records an option it ignored.
    ``baseline`` is judged only when ``given`` names it: ``baseline = false`` is the state of every
    method but GLR, and older runs and specs record it so."""
    default = TrainConfig()
    if given is None:
        given = {k for k in TrainConfig.option_names() if getattr(cfg, k) != getattr(default, k)} - {"baseline"}
    method, out = cfg.method, {}
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
    if "sigma" in given and method not in ("es", "spsa"):
        out["sigma"] = (f"sigma is ES's σ and SPSA's ε; method {method} does not use it (the noise of GLR's "
                        "perturbation is --noise-std, or the std in --perturb WHICH=PERTURBATION:STD): drop --sigma")
    if "activation" in given and parse_time_arch(cfg.arch) is not None:
        out["activation"] = (f"--arch {cfg.arch} sets its own units (lif: spikes; rnn:H:ACTIVATION): drop --activation")
    if "hidden" in given and parse_time_arch(cfg.arch) is not None:
        out["hidden"] = (f"--arch {cfg.arch} is a network through time whose widths are its own (lif:H, rnn:H); "
                         "it has no --hidden layers: drop --hidden")
    if "perturb" in given and cfg.perturb != "activity":
        which = parse_perturb(cfg.perturb)[0]
        if not (method == "glr" or (method == "bp" and cfg.bp_noise)):
            why = ("trains the noise-free network" if method == "bp"
                   else "perturbs every weight itself (σ = --sigma)")
            out["perturb"] = f"--perturb {cfg.perturb} sets GLR's perturbation; method {method} {why}: drop --perturb"
        elif which == "conv" and (cfg.arch == "mlp" or parse_time_arch(cfg.arch) is not None):
            out["perturb"] = (f"--perturb {cfg.perturb} puts noise on the convolutions, and arch {cfg.arch} has none: "
                              "use first or all, or a convolutional --arch")
    return out
