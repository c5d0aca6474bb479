"""The command line's options: one group per part of :class:`~glrnet.train.TrainConfig` (data, model,
perturbation and estimator, optimisation, evaluation, run), and one flag per attack setting. Every
training option has a flag of the same name (``lr`` ↔ ``--lr``); a test checks it."""

from __future__ import annotations

import argparse

from ..data import DATASETS, SPLITS
from ..estimators import CONTROL_VARIATES, SAMPLERS
from ..estimators.glr import INJECTIONS
from ..nn.activations import ACTIVATIONS, get_activation
from ..nn.losses import LOSSES
from ..nn.noise import kinds
from ..nn.perturbations import PERTURBATIONS
from ..robustness.settings import HELP, NORMS, AttackSettings, settings_fields
from ..train import METHODS, NORMS as MODEL_NORMS, OPTIMIZERS, PERTURB_LAYERS, PROJECTIONS, SCHEDULES, TrainConfig

DEFAULTS = TrainConfig()
LEGACY_FLAGS = ("weight_noise", "weight_noise_std", "flipout", "channelwise")   # read as --perturb


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" once, and only where there is a default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _ints(flag: str, example: str, allow_empty: bool = False):
    def parse(text: str) -> list[int]:
        if allow_empty and text.strip().lower() in ("none", "0", ""):
            return []
        try:
            values = [int(w) for w in text.split(",") if w.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers like {example}, "
                                             f"got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag} needs positive integers, got {text!r}")
        return values
    return parse


def seeds(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers like 0,1,2, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return values


def _activation(text: str) -> str:
    try:
        get_activation(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_data_options(p: argparse.ArgumentParser, required_dataset: bool = False) -> None:
    """The data flags; ``required_dataset``: a command on saved runs (evaluate, certify, robustness), whose
    dataset comes from the run and whose ``--subset`` is a number of test images."""
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None if required_dataset else d.dataset,
                   help="dataset name")
    g.add_argument("--data-dir", default=None, help="the dataset's folder of four MNIST-format IDX files, or a "
                   "folder holding <dataset>/ (checked against its SHA256SUMS and the known checksums; default: "
                   "download into the cache)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to N×N by area averaging "
                   "(14 = the seed's 2×2 pooling of MNIST)")
    g.add_argument("--subset", type=int, default=None,
                   help="use only the first N test images" if required_dataset else
                   "use only N training images (and N/4 test images, at least 10), a seeded random choice")
    g.add_argument("--split", choices=SPLITS, default=None if required_dataset else d.split,
                   help="standard: the dataset's own train/test; seed: all images pooled, stratified 60/40 "
                        "(MNIST 42,000 / 28,000, the seed paper's scale)")
    if not required_dataset:
        g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                       help="hold out this stratified fraction of training for validation curves (0: the curves "
                            "use the test set, and say so)")


def add_train_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    _model_options(p.add_argument_group("model"))
    _estimator_options(p.add_argument_group("perturbation and estimator"))
    _optim_options(p.add_argument_group("optimisation"))
    _evaluation_options(p.add_argument_group("evaluation"))
    d = DEFAULTS
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same run)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("older spellings (read as --perturb / --sigma)")
    g.add_argument("--weight-noise", default=argparse.SUPPRESS, metavar="WHICH[=PERTURBATION]",
                   help="WHICH (none, first, conv, all) with --weight-noise-std S: --perturb WHICH=weight:S")
    g.add_argument("--weight-noise-std", type=float, default=argparse.SUPPRESS,
                   help="the std of --weight-noise; with --method es or spsa: --sigma")
    g.add_argument("--flipout", action="store_true", default=argparse.SUPPRESS, help="--perturb WHICH=flipout")
    g.add_argument("--channelwise", action="store_true", default=argparse.SUPPRESS, help="--perturb WHICH=channel")


def _model_options(g) -> None:
    d = DEFAULTS
    g.add_argument("--arch", default=d.arch, help="mlp; lenet (conv 6@5×5, max-pool 2, conv 16@5×5, max-pool 2); "
                   "resnet (conv 8@3×3 stride 2, three residual blocks of two noisy 8@3×3 convolutions, "
                   "avg-pool 2); or comma-separated conv:C:K[:stride[:padding]], res:C:K, maxpool:K, avgpool:K. "
                   "Convolutional stacks are followed by the --hidden layers and the output layer. Through time "
                   "(with --encoding): comma-separated lif:H (leaky integrate-and-fire), lif:H:rec (recurrent), "
                   "rnn:H[:ACTIVATION] (recurrent, tanh by default), read out by a leaky integrator (lif) or a "
                   "noisy linear layer at the last step (rnn)")
    g.add_argument("--hidden", type=_ints("--hidden", "20 or 100,100", allow_empty=True), default=d.hidden,
                   help="hidden widths, e.g. 20 or 100,100 (none: no hidden fully connected layer)")
    g.add_argument("--activation", type=_activation, default=d.activation,
                   help=f"hidden activation: {', '.join(ACTIVATIONS)}, or sigmoid:<slope>")
    g.add_argument("--output-activation", type=_activation, default=None,
                   help="activation on the output layer too (default: none, the authors' code)")
    g.add_argument("--encoding", default=d.encoding, help="networks through time (--arch lif:H or rnn:H): how an "
                   "image becomes a sequence: rate:T (Bernoulli spike trains of T steps), rows (one row per step) "
                   "or pixels (one pixel per step)")
    g.add_argument("--norm", choices=MODEL_NORMS, default=d.norm, help="parameter-free normalisation "
                   "(LayerNorm / GroupNorm(1) without affine) after every hidden noisy layer")
    g.add_argument("--local-losses", action="store_true", help="convolutional archs: a linear head per block, "
                   "each block trained by GLR from its own head's loss with noise in that block only (Ren et al. "
                   "2023; changes the objective)")
    g.add_argument("--input-noise-std", type=float, default=None, help="input-space randomized smoothing: a frozen "
                   "identity first layer whose noise is input noise of this std (train it with --method bp --bp-noise, "
                   "or GLR; the later layers keep --noise-std); certified the same way")


def _estimator_options(g) -> None:
    d = DEFAULTS
    g.add_argument("--method", choices=METHODS, default=d.method, help="glr; bp (back-propagation); or a "
                   "forward-only alternative: es (antithetic evolution strategies), spsa (two-point, MeZO), forward "
                   "(forward gradients, activity perturbation; smooth units)")
    g.add_argument("--noise", choices=kinds(), default=d.noise, help="noise distribution of every noisy layer")
    g.add_argument("--noise-std", type=float, default=d.noise_std, help="σ of the noise on the units")
    weighty = ", ".join(p for p in PERTURBATIONS if p != "activity")
    g.add_argument("--perturb", default=d.perturb, metavar="activity|WHICH=PERTURBATION[:STD]",
                   help=f"where the noise sits: activity (every noisy layer's units), or the layers WHICH "
                        f"({', '.join(PERTURB_LAYERS)}) carry the registered PERTURBATION ({weighty}) on their "
                        "parameters with noise of that std (default 0.05), e.g. conv=weight, all=flipout:0.02. "
                        "weight: one draw per replication; flipout: with random signs per input (Wen et al. 2018); "
                        "channel: one output channel per replication")
    g.add_argument("--relative-noise", type=float, default=None, help="scale-aware noise: before every step, σ of "
                   "each activity-noise layer = this × the RMS of its noise-free pre-activation on the batch")
    g.add_argument("--relative-weight-noise", type=float, default=None, help="scale-aware weight noise: before "
                   "every step, σ of each weight-noise layer = this × the RMS of its weight")
    g.add_argument("--replications", type=int, default=d.replications, help="K noisy replications per input (es, "
                   "spsa, forward: forward passes per input and step)")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=d.baseline,
                   help="leave-one-out baseline (control variate); --no-baseline: the seed's plain estimator")
    g.add_argument("--control-variate", dest="baseline", choices=list(CONTROL_VARIATES), default=argparse.SUPPRESS,
                   help="a registered control variate by name (--baseline: leave-one-out; --no-baseline: none)")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=d.sampler,
                   help="noise sampler: " + ", ".join(SAMPLERS) + " (iid; antithetic: pairs r, −r; qmc: randomized "
                        "Sobol nets; any registered by a --plugin)")
    g.add_argument("--injection", choices=list(INJECTIONS), default=d.injection,
                   help="all: every noisy layer noisy in every replication; layerwise: each replication noisy "
                        "in one layer (K split evenly over the layers)")
    g.add_argument("--layer-replications", type=_ints("--layer-replications", "32,512,32"), default=None,
                   help="with --injection layerwise: replications per noisy layer in execution order, e.g. "
                        "32,512,32 (instead of --replications split evenly)")
    g.add_argument("--sigma", type=float, default=d.sigma, help="ES's σ and SPSA's ε: the std of their own "
                   "perturbation of every parameter")
    g.add_argument("--bp-noise", action="store_true", help="with --method bp: back-propagate through noisy "
                   "replications (smooth activations only)")
    g.add_argument("--memory-budget-mb", type=float, default=d.memory_budget_mb, help="working-set bound (MB)")
    g.add_argument("--parallel", default=d.parallel, help="under torchrun: replications, data, or a number of "
                   "data groups")


def _optim_options(g) -> None:
    d = DEFAULTS
    g.add_argument("--loss", choices=list(LOSSES), default=d.loss, help="per-sample loss")
    g.add_argument("--warmup-loss", choices=list(LOSSES), default=None, help="the loss of the first --warmup-epochs "
                   "epochs (cross_entropy before the 0-1 loss keeps every class alive: docs/results/seeds)")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="epochs trained with --warmup-loss")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="torch.optim optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="momentum (sgd, rmsprop)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule (per epoch)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    g.add_argument("--max-first-norm", type=float, default=None, help="after each step, scale the first noisy "
                   "layer so that its operator norm ‖W₁‖₂ is at most this (keeps σ/‖W₁‖₂, the certified radius "
                   "per unit of Φ⁻¹(p), from shrinking; see glrnet certify)")
    g.add_argument("--first-norm-projection", choices=PROJECTIONS, default=d.first_norm_projection,
                   help="with --max-first-norm c: spectral (‖W₁‖₂ ≤ c) or stiefel (every singular value of W₁ = c, "
                        "so the first layer's noise is input noise of σ/c in its row space)")
    g.add_argument("--max-seconds", type=float, default=None, help="stop training after this much training time "
                   "(the epoch it falls in is the last; its checkpoint and results are written)")
    g.add_argument("--budget-clock", choices=["wall", "cpu"], default=d.budget_clock, help="--max-seconds in wall "
                   "time, or in this process's CPU time (fairer on a shared machine)")


def _evaluation_options(g) -> None:
    d = DEFAULTS
    g.add_argument("--lap-replications", type=int, default=d.lap_replications, help="K for the LAP predictor")
    g.add_argument("--eval-replications", type=int, default=d.eval_replications,
                   help="noisy passes per image for the per-epoch loss curves")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="every this many steps, the validation "
                   "accuracy (OT) into progress.csv (0: only per epoch)")


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """One flag per AttackSettings field, its default and help from there (one source of truth)."""
    g = p.add_argument_group("attacks")
    for name, default, kind in settings_fields():
        flag = "--" + name.replace("_", "-")
        if kind is tuple:
            g.add_argument(flag, type=lambda t: tuple(v for v in t.split(",") if v), default=default,
                           help=f"{HELP[name]} (default: {','.join(default)})")
        elif kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[name])
        elif name == "norm":
            g.add_argument(flag, choices=list(NORMS), default=default, help=HELP[name])
        else:
            g.add_argument(flag, type=kind, default=default, help=HELP[name])


def settings_from_args(args) -> AttackSettings:
    return AttackSettings(**{name: getattr(args, name) for name, _, _ in settings_fields()})


def config_from_args(args) -> TrainConfig:
    """The run's config: every training option by its flag; the older spellings read as today's."""
    names = set(TrainConfig.option_names()) | set(LEGACY_FLAGS)
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})
