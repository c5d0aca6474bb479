"""The ``glrnet`` command: a thin layer over the library (train, evaluate, datasets, reproduce, robustness)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from . import distributed
from .activations import ACTIVATIONS, get_activation
from .data import DATASETS, SPLITS, DataError, describe_datasets
from .losses import LOSSES
from .estimators import INJECTIONS
from .noise import KINDS
from .samplers import SAMPLERS
from .train import METHODS, OPTIMIZERS, SCHEDULES, TrainConfig

DEFAULTS = TrainConfig()


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" once, and only where there is a default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _hidden(text: str) -> list[int]:
    if text.strip().lower() in ("none", "0", ""):
        return []
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated widths like 20 or 100,100, got {text!r}")
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--hidden needs positive widths, got {text!r}")
    return widths


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def _activation(text: str) -> str:
    try:
        get_activation(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_data_options(p: argparse.ArgumentParser, required_dataset: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None if required_dataset else DEFAULTS.dataset,
                   help="dataset name")
    g.add_argument("--data-dir", default=None, help="folder with the four MNIST-format IDX files "
                   "(default: download into the cache)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to N×N by area averaging "
                   "(14 = the seed's 2×2 pooling of MNIST)")
    g.add_argument("--subset", type=int, default=None, help="use only this many training images")
    g.add_argument("--split", choices=SPLITS, default=None if required_dataset else DEFAULTS.split,
                   help="standard: the dataset's own train/test; seed: all images pooled, stratified 60/40 "
                        "(MNIST 42,000 / 28,000, the seed paper's scale)")


def add_train_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    d = DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=d.arch, help="mlp; lenet (conv 6@5×5, max-pool 2, conv 16@5×5, max-pool 2); "
                   "or comma-separated conv:C:K[:stride[:padding]], maxpool:K, avgpool:K. Convolutional "
                   "stacks are followed by the --hidden layers and the output layer")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden widths, e.g. 20 or 100,100 "
                   "(none: no hidden fully connected layer)")
    g.add_argument("--activation", type=_activation, default=d.activation,
                   help=f"hidden activation: {', '.join(ACTIVATIONS)}, or sigmoid:<slope>")
    g.add_argument("--output-activation", type=_activation, default=None,
                   help="activation on the output layer too (default: none, the authors' code)")
    g.add_argument("--loss", choices=list(LOSSES), default=d.loss, help="per-sample loss")
    g.add_argument("--noise", choices=KINDS, default=d.noise, help="neuron noise distribution")
    g.add_argument("--noise-std", type=float, default=d.noise_std, help="noise standard deviation σ")
    g = p.add_argument_group("estimator")
    g.add_argument("--method", choices=METHODS, default=d.method, help="glr, or bp (back-propagation)")
    g.add_argument("--replications", type=int, default=d.replications, help="K noisy replications per input")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=d.baseline,
                   help="leave-one-out baseline (control variate); --no-baseline: the seed's plain estimator")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=d.sampler,
                   help="noise sampler: iid, antithetic (pairs r, −r), qmc (randomized Sobol nets)")
    g.add_argument("--injection", choices=list(INJECTIONS), default=d.injection,
                   help="all: every noisy layer noisy in every replication; layerwise: each replication noisy "
                        "in one layer (K split evenly over the layers)")
    g.add_argument("--bp-noise", action="store_true", help="with --method bp: back-propagate through noisy "
                   "replications (smooth activations only)")
    g.add_argument("--memory-budget-mb", type=float, default=d.memory_budget_mb, help="working-set bound (MB)")
    g.add_argument("--parallel", default=d.parallel, help="under torchrun: replications, data, or a number of "
                   "data groups")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=d.optimizer, help="torch.optim optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="momentum (sgd, rmsprop)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold out this stratified fraction of training for validation curves (0: the curves use "
                        "the test set, and say so)")
    g.add_argument("--lap-replications", type=int, default=d.lap_replications, help="K for the LAP predictor")
    g.add_argument("--eval-replications", type=int, default=d.eval_replications,
                   help="noisy passes per image for the per-epoch loss curves")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same run)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args) -> int:
    from .train import resolve_device, train
    resolve_device(args.device)
    distributed.init_from_env(args.device)
    train(config_from_args(args), args.out, resume=args.resume, quiet=args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import load_model
    from .model import predict
    from .train import TrainConfig, resolve_device
    device = resolve_device(args.device)
    path = Path(args.run)
    path = path / "model.safetensors" if path.is_dir() else path
    model, extra = load_model(path, device)
    cfg = extra.get("config", {})
    from .data import load_run_dataset
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, args.subset, args.split)
    if data.in_features != model.in_features:
        raise ValueError(f"{data.name} images have {data.in_features} pixels, the model expects {model.in_features} "
                         "(set --image-size)")
    x, y = data.x_test.to(device), data.y_test.to(device)
    noisy = TrainConfig.from_saved(cfg).noisy if cfg else True
    result = {"run": str(path), "dataset": data.summary(),
              "accuracy_ot": (predict(model, x, "ot") == y).double().mean().item()}
    if noisy:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        pred = predict(model, x, "lap", args.lap_replications, generator=gen, progress=not args.quiet)
        result["accuracy_lap"] = (pred == y).double().mean().item()
        result["lap_replications"] = args.lap_replications
    else:
        result["accuracy_lap"] = None
        result["note"] = "trained without noise: no LAP predictor"
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def cmd_datasets(args) -> int:
    for row in describe_datasets(args.cache_dir):
        mark = "available" if row["available"] else "not cached"
        print(f"{row['name']:<14} {mark:<11} {row['source']}")
    return 0


def cmd_reproduce(args) -> int:
    from .experiments import reproduce
    reproduce(args.spec, args.out, dataset=args.dataset, data_dir=args.data_dir, quick=args.quick,
              device=args.device, quiet=args.quiet, robustness=not args.no_robustness, export=args.export,
              seeds=args.seeds)
    return 0


def cmd_robustness(args) -> int:
    from .robustness import robustness_command
    robustness_command(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glrnet", formatter_class=_Formatter,
                                description="Train noisy networks by the generalized likelihood ratio method "
                                            "and measure their adversarial robustness.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one model", formatter_class=_Formatter,
                       description="Train one noisy network (an MLP, or a CNN with --arch) by GLR or back-propagation; writes metrics.json, "
                                   "model.safetensors, history.csv, curves.png and a checkpoint per epoch.")
    add_train_options(t)
    t.add_argument("--out", default="runs/train", help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="OT and LAP accuracy of a trained run", formatter_class=_Formatter,
                       description="Test accuracy of a saved run: OT (noise off) and, for a model trained with "
                                   "noise, LAP (the average of K noisy passes). Prints JSON.")
    e.add_argument("--run", required=True, help="a run folder (or its model.safetensors)")
    add_data_options(e, required_dataset=True)
    e.add_argument("--lap-replications", type=int, default=1000, help="K for LAP")
    e.add_argument("--seed", type=int, default=0, help="seed of the LAP noise")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("datasets", help="list the datasets and where each is looked for", formatter_class=_Formatter,
                       description="List the datasets glrnet reads, where each is looked for, and whether it is "
                                   "available now.")
    d.add_argument("--cache-dir", default=None, help="download cache (default: $GLRNET_CACHE or ~/.cache/glrnet)")
    d.set_defaults(func=cmd_datasets)

    r = sub.add_parser("reproduce", help="the seed's Tables 1 and 2 (and robustness) from a spec file",
                       formatter_class=_Formatter,
                       description="Run an experiment spec end to end: train every model (finished runs are "
                                   "reused, interrupted ones resumed), calibrate ε, transfer FGSM, write tables, "
                                   "CSV and figures, then the adaptive-attack protocol.")
    r.add_argument("--spec", default=None, help="experiment spec: a TOML file, or the name of a packaged one "
                   "(paper, paper-seeds, fashion, fashion-seeds, mnist-10k, quick); default: paper")
    r.add_argument("--seeds", type=_seeds, default=None, help="train and evaluate every model once per seed, "
                   "e.g. 0,1,2 (tables show mean and min–max); default: the spec's seeds, else each model's own")
    r.add_argument("--dataset", choices=DATASETS, default=None, help="override the spec's dataset")
    r.add_argument("--data-dir", default=None, help="IDX folder for mnist / fashion-mnist")
    r.add_argument("--quick", action="store_true", help="the whole pipeline on digits (about 30 s on 2 CPU cores without the attacks)")
    r.add_argument("--no-robustness", action="store_true", help="skip the adaptive-attack evaluation")
    r.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    r.add_argument("--out", required=True, help="output folder (models already trained there are reused)")
    r.add_argument("--export", default=None, help="also copy the reports (tables, CSV, figures, spec; no weights) "
                   "to this folder, e.g. docs/results/mnist")
    r.add_argument("--quiet", action="store_true", help="less output")
    r.set_defaults(func=cmd_reproduce)

    b = sub.add_parser("robustness", help="adaptive attacks on trained runs", formatter_class=_Formatter,
                       description="White-box adaptive attacks (APGD through several surrogate gradients, EOT, "
                                   "SPSA, transfer) on saved runs; writes robustness.md/.csv/_checks.json and a "
                                   "figure.")
    b.add_argument("--run", required=True, nargs="+", help="run folder(s) to attack")
    add_data_options(b, required_dataset=True)
    b.add_argument("--eps", default="0.05,0.1,0.15,0.2,0.25,0.3", help="comma-separated L∞ budgets")
    b.add_argument("--headline", type=float, default=None, help="ε of the transfer and convergence checks "
                   "(default: the middle of --eps)")
    b.add_argument("--source", default=None, help="a run folder of a network to transfer FGSM from")
    b.add_argument("--images", type=int, default=500, help="test images attacked")
    b.add_argument("--eot-samples", type=int, default=32, help="noise samples per EOT gradient")
    b.add_argument("--steps", type=int, default=100, help="APGD steps per restart")
    b.add_argument("--restarts", type=int, default=1, help="APGD restarts")
    b.add_argument("--lap-replications", type=int, default=1000, help="K of the defended LAP predictor")
    b.add_argument("--lr-samples", type=int, default=512, help="samples of the likelihood-ratio input gradient")
    b.add_argument("--spsa-samples", type=int, default=64, help="SPSA perturbations per step")
    b.add_argument("--spsa-steps", type=int, default=40, help="SPSA steps")
    b.add_argument("--max-doublings", type=int, default=3, help="convergence check: at most this many doublings "
                   "of steps, restarts and samples on the surviving images")
    b.add_argument("--seed", type=int, default=0, help="seed")
    b.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_robustness)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, DataError, FileNotFoundError, ImportError) as e:
        print(f"glrnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the step was refused, nothing was written
        print(f"glrnet {args.command}: error: {e}; the last checkpoint and outputs are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glrnet {args.command}: interrupted; the last checkpoint is kept (rerun with --resume)",
              file=sys.stderr)
        return 130
