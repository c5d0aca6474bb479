"""The ``glrnet`` command: a thin layer over the library (train, evaluate, datasets, reproduce, robustness)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import fields

from .data import DATASETS, SPLITS, DataError, describe_datasets
from .estimators import CONTROL_VARIATES, SAMPLERS
from .estimators import distributed
from .estimators.glr import INJECTIONS
from .nn.activations import ACTIVATIONS, get_activation
from .nn.perturbations import PERTURBATIONS
from .nn.losses import LOSSES
from .nn.noise import kinds
from .robustness.settings import DEFAULT_EPS, HELP, NORMS, AttackSettings, settings_fields
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


def _counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer-replications takes comma-separated counts like 32,512,32, "
                                         f"got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--layer-replications needs positive counts, got {text!r}")
    return counts


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
    """The data flags; ``required_dataset``: a command on saved runs (evaluate, certify, robustness), whose
    dataset comes from the run and whose ``--subset`` is a number of test images."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=None if required_dataset else DEFAULTS.dataset,
                   help="dataset name")
    g.add_argument("--data-dir", default=None, help="the dataset's folder of four MNIST-format IDX files, or a "
                   "folder holding <dataset>/ (checked against its SHA256SUMS and the known checksums; default: "
                   "download into the cache)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to N×N by area averaging "
                   "(14 = the seed's 2×2 pooling of MNIST)")
    g.add_argument("--subset", type=int, default=None,
                   help="use only the first N test images" if required_dataset else
                   "use only N training images (and N/4 test images, at least 10), a seeded random choice")
    g.add_argument("--split", choices=SPLITS, default=None if required_dataset else DEFAULTS.split,
                   help="standard: the dataset's own train/test; seed: all images pooled, stratified 60/40 "
                        "(MNIST 42,000 / 28,000, the seed paper's scale)")


def add_train_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    d = DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=d.arch, help="mlp; lenet (conv 6@5×5, max-pool 2, conv 16@5×5, max-pool 2); "
                   "resnet (conv 8@3×3 stride 2, three residual blocks of two noisy 8@3×3 convolutions, "
                   "avg-pool 2); or comma-separated conv:C:K[:stride[:padding]], res:C:K, maxpool:K, avgpool:K. "
                   "Convolutional stacks are followed by the --hidden layers and the output layer")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden widths, e.g. 20 or 100,100 "
                   "(none: no hidden fully connected layer)")
    g.add_argument("--activation", type=_activation, default=d.activation,
                   help=f"hidden activation: {', '.join(ACTIVATIONS)}, or sigmoid:<slope>")
    g.add_argument("--output-activation", type=_activation, default=None,
                   help="activation on the output layer too (default: none, the authors' code)")
    g.add_argument("--loss", choices=list(LOSSES), default=d.loss, help="per-sample loss")
    g.add_argument("--warmup-loss", choices=list(LOSSES), default=None, help="the loss of the first --warmup-epochs "
                   "epochs (cross_entropy before the 0-1 loss keeps every class alive: docs/results/seeds)")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="epochs trained with --warmup-loss")
    g.add_argument("--noise", choices=kinds(), default=d.noise, help="neuron noise distribution")
    g.add_argument("--noise-std", type=float, default=d.noise_std, help="noise standard deviation σ")
    g = p.add_argument_group("estimator")
    g.add_argument("--method", choices=METHODS, default=d.method, help="glr; bp (back-propagation); or a "
                   "forward-only alternative: es (antithetic evolution strategies), spsa (two-point, MeZO), forward "
                   "(forward gradients, activity perturbation; smooth units)")
    g.add_argument("--replications", type=int, default=d.replications, help="K noisy replications per input (es, "
                   "spsa, forward: forward passes per input and step)")
    g.add_argument("--weight-noise", default=d.weight_noise, metavar="WHICH[=PERTURBATION]",
                   help="where the noise sits: which noisy layers (none, first, conv, all) carry it on their "
                        "parameters instead of their units, and the registered perturbation they take: "
                        + ", ".join(p for p in PERTURBATIONS if p != "activity") + " (default weight: one draw per "
                        "replication), e.g. conv=flipout")
    g.add_argument("--flipout", action="store_true", help="weight site with flipout: each input of a batch sees "
                   "the replication's parameter noise with its own random signs on rows and columns (Wen et al. "
                   "2018), so the noise averages over the batch; needs --weight-noise and symmetric noise")
    g.add_argument("--channelwise", action="store_true", help="weight site, one output channel per replication: "
                   "each replication perturbs the parameters of one output channel (drawn uniformly), its likelihood "
                   "ratio × the channel count; where the layer's input is shared (--injection layerwise) far cheaper "
                   "per replication than perturbing every channel; needs --weight-noise")
    g.add_argument("--weight-noise-std", type=float, default=d.weight_noise_std,
                   help="σ of the parameter noise (weight site; also ES's σ and SPSA's ε)")
    g.add_argument("--relative-noise", type=float, default=None, help="scale-aware noise: before every step, σ of "
                   "each activity-noise layer = this × the RMS of its noise-free pre-activation on the batch")
    g.add_argument("--relative-weight-noise", type=float, default=None, help="scale-aware weight noise: before "
                   "every step, σ of each weight-noise layer = this × the RMS of its weight")
    g.add_argument("--local-losses", action="store_true", help="convolutional archs: a linear head per block, "
                   "each block trained by GLR from its own head's loss with noise in that block only (Ren et al. "
                   "2023; changes the objective)")
    g.add_argument("--norm", choices=["none", "layer"], default=d.norm, help="parameter-free normalisation "
                   "(LayerNorm / GroupNorm(1) without affine) after every hidden noisy layer")
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
    g.add_argument("--layer-replications", type=_counts, default=None, help="with --injection layerwise: "
                   "replications per noisy layer in execution order, e.g. 32,512,32 (instead of --replications "
                   "split evenly)")
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
    g.add_argument("--max-first-norm", type=float, default=None, help="after each step, scale the first noisy "
                   "layer so that its operator norm ‖W₁‖₂ is at most this (keeps σ/‖W₁‖₂, the certified radius "
                   "per unit of Φ⁻¹(p), from shrinking; see glrnet certify)")
    g.add_argument("--first-norm-projection", choices=["spectral", "stiefel"], default=d.first_norm_projection,
                   help="with --max-first-norm c: spectral (‖W₁‖₂ ≤ c) or stiefel (every singular value of W₁ = c, "
                        "so the first layer's noise is input noise of σ/c in its row space)")
    g.add_argument("--input-noise-std", type=float, default=None, help="input-space randomized smoothing: a frozen "
                   "identity first layer whose noise is input noise of this std (train it with --method bp --bp-noise, "
                   "or GLR; the later layers keep --noise-std); certified the same way")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same run)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")


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
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args) -> int:
    from .train import resolve_device, train
    resolve_device(args.device)
    distributed.init_from_env(args.device)
    from pathlib import Path
    out = Path(args.out)
    cfg = config_from_args(args)
    from .train import unused_options
    unused = unused_options(cfg, getattr(args, "given", set()))   # typed on the command line, and ignored
    if unused:
        raise ValueError(next(iter(unused.values())))
    if args.resume and not (out / "checkpoint.safetensors").exists() and not (out / "metrics.json").exists():
        print(f"glrnet train: --resume: {out} holds no run yet; starting a new one", file=sys.stderr)
    train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    return 0


def _first_test_images(data, n: int | None, flag: str = "--subset"):
    """The first ``n`` test images (all for ``None``) and their labels."""
    if n is not None and n < 1:
        raise ValueError(f"{flag} must be ≥ 1 test image, got {n}")
    return data.x_test[:n], data.y_test[:n]


def _image_count(args) -> int:
    """``--images``, capped by ``--subset`` (both a number of test images), each checked."""
    for flag, n in (("--images", args.images), ("--subset", args.subset)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be ≥ 1 test image, got {n}")
    return args.images if args.subset is None else min(args.images, args.subset)


def _check_inputs(data, model, run) -> None:
    if data.in_features != model.in_features:
        raise ValueError(f"{data.name} images have {data.in_features} pixels, the model of {run} expects "
                         f"{model.in_features} (set --image-size, or --dataset to the run's)")


def cmd_certify(args) -> int:
    from pathlib import Path

    import torch

    from .certify import certified_accuracy, certify
    from .checkpoint import atomic_write_csv, atomic_write_text, load_model, write_index
    from .data import load_run_dataset
    from .train import resolve_device
    from .train import TrainConfig
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        radii = [float(r) for r in args.radii.split(",")]
    except ValueError:
        raise ValueError(f"--radii takes comma-separated numbers like 0.25,0.5,1, got {args.radii!r}") from None
    _image_count(args)
    path = Path(args.run)
    model, extra = load_model(path / "model.safetensors" if path.is_dir() else path, device)
    cfg = extra.get("config", {})
    if cfg and not TrainConfig.from_saved(cfg).noisy:
        raise ValueError(f"--run {args.run} was trained without noise (method {cfg.get('method')}"
                         f"{', no --bp-noise' if cfg.get('method') == 'bp' else ''}): certifying it would certify a "
                         "noisy network it never was; certify a run trained with noise (glr, or bp --bp-noise)")
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, None, args.split)
    _check_inputs(data, model, args.run)
    x, y = _first_test_images(data, _image_count(args))
    n_img = len(x)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    cert = certify(model, x, n0=args.n0, n=args.samples, alpha=args.alpha, predictor=args.predictor, generator=gen)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"image": i, "label": int(y[i]), "prediction": int(cert.prediction[i]), "radius": float(cert.radius[i]),
             "p_lower": float(cert.p_lower[i]), "p_upper_other": float(cert.p_upper_other[i])} for i in range(n_img)]
    atomic_write_csv(out / "certify.csv", rows, list(rows[0]))
    acc = certified_accuracy(cert, y, radii)
    lines = [f"# Certified L2 accuracy: {path.name} on {data.name}", "",
             f"{n_img} test images; predictor {cert.predictor}; σ = {cert.sigma:g} (first noisy layer), "
             f"‖W₁‖₂ = {cert.first_layer_norm:.4g}, so one unit of Φ⁻¹(p) is {cert.sigma / cert.first_layer_norm:.4g} "
             f"in input L2; n0 = {args.n0}, n = {args.samples}, α = {args.alpha:g} (CERTIFY, Cohen et al. 2019). "
             f"Abstained: {int((cert.prediction < 0).sum())}.", "",
             "| radius | " + " | ".join(f"{r:g}" for r in radii) + " |", "|---|" + "---|" * len(radii),
             "| certified accuracy | " + " | ".join(f"{acc[r]:.3f}" for r in radii) + " |"]
    atomic_write_text(out / "certify.md", "\n".join(lines) + "\n")
    from .plots import figure_certified
    figure_certified(out / "certified_accuracy.png", {path.name: cert}, y, title=data.name)
    write_index(out, f"glrnet certify: {path.name} on {data.name}")
    print("\n".join(lines))
    return 0


def cmd_evaluate(args) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import load_model
    from .predict import predict
    from .train import TrainConfig, resolve_device
    device = resolve_device(args.device)
    path = Path(args.run)
    path = path / "model.safetensors" if path.is_dir() else path
    model, extra = load_model(path, device)
    cfg = extra.get("config", {})
    from .data import load_run_dataset
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, None, args.split)
    if data.in_features != model.in_features:
        raise ValueError(f"{data.name} images have {data.in_features} pixels, the model expects {model.in_features} "
                         "(set --image-size)")
    x, y = _first_test_images(data, args.subset)
    x, y = x.to(device), y.to(device)
    noisy = TrainConfig.from_saved(cfg).noisy if cfg else True
    result = {"run": str(path), "dataset": data.summary(), "test_images": len(x),
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
    """``glrnet robustness --run DIR [DIR ...]``: the protocol on trained runs."""
    from pathlib import Path

    from .checkpoint import load_model, write_index
    from .data import load_run_dataset
    from .robustness.protocol import attack_and_report
    from .robustness.settings import validate_eps
    from .train import TrainConfig, resolve_device
    resolve_device(args.device)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder: choose another --out")
    _image_count(args)
    models, cfg, trained = {}, None, {}
    for run in args.run:
        path = Path(run)
        model, extra = load_model(path / "model.safetensors" if path.is_dir() else path, args.device)
        cfg = extra.get("config", {})
        noisy = TrainConfig.from_saved(cfg).noisy
        name = path.name if path.is_dir() else path.stem
        if name in models:
            raise ValueError(f"--run: two runs are named {name!r} ({trained[name][0]} and {run}); the reports "
                             "name each model by its folder: give them folders of different names")
        models[name] = (model, noisy)
        size = cfg.get("image_size")
        trained[name] = (run, f"{cfg.get('dataset', 'digits')}{f' at {size}×{size}' if size else ''}, split "
                              f"{cfg.get('split', 'standard')}")
    if len({data for _, data in trained.values()}) > 1:
        raise ValueError("--run: the runs were trained on different data ("
                         + "; ".join(f"{run}: {data}" for run, data in trained.values())
                         + "); attack the runs of one dataset at a time")
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, None, args.split)
    for name, (model, _) in models.items():
        _check_inputs(data, model, trained[name][0])
    n_img = _image_count(args)
    if n_img > len(data.x_test):
        print(f"glrnet robustness: --images {n_img}: {data.name} has {len(data.x_test)} test images; "
              f"attacking all {len(data.x_test)}", file=sys.stderr)
    x, y = _first_test_images(data, n_img)
    x, y = x.to(args.device), y.to(args.device)
    try:
        eps = [float(e) for e in args.eps.split(",")]
    except ValueError:
        raise ValueError(f"--eps takes comma-separated numbers like 0.05,0.1, got {args.eps!r}") from None
    st = settings_from_args(args)
    validate_eps(eps + ([] if args.headline is None else [args.headline]), st.norm, data.in_features)
    source = None
    if args.source:
        src = Path(args.source)
        source = load_model(src / "model.safetensors" if src.is_dir() else src, args.device)[0]
        _check_inputs(data, source, args.source)
    headline = args.headline if args.headline is not None else eps[len(eps) // 2]
    eps = sorted(set(eps) | {headline})
    out = Path(args.out)
    attack_and_report(out, models, x, y, eps, st, source, headline, title=f"{data.name}, {', '.join(models)}",
                      quiet=args.quiet, resume=args.resume)
    write_index(out, f"glrnet robustness: {', '.join(models)} on {data.name}")
    print((out / "robustness.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glrnet", formatter_class=_Formatter,
                                description="Train noisy networks by the generalized likelihood ratio method "
                                            "and measure their adversarial robustness.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"glrnet {__version__}")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): the samplers, control variates, noise families, "
                        "perturbations, activations and losses it registers become choices of every command")
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

    r = sub.add_parser("reproduce", help="run an experiment spec: the paper's tables, certified radii, the technique "
                       "study", formatter_class=_Formatter,
                       description="Run an experiment spec end to end: train its runs (finished runs are reused, "
                                   "interrupted ones resumed), then its analyses: the transfer tables (ε calibrated, "
                                   "FGSM transferred, tables, CSV and figures), certified radii, the technique study, "
                                   "and the adaptive-attack protocol.")
    r.add_argument("--spec", default=None, help="experiment spec: a TOML file, or the name of a packaged one "
                   "(paper, paper-seeds, fashion, fashion-seeds, mnist-10k, certified, scale, quick); default: paper")
    r.add_argument("--seeds", type=_seeds, default=None, help="train and evaluate every model once per seed, "
                   "e.g. 0,1,2 (tables show mean and min–max); default: the spec's seeds, else each model's own")
    r.add_argument("--dataset", default=None, help="run only this [[datasets]] entry of the spec (its name or "
                   "dataset), e.g. one process per dataset into one --out")
    r.add_argument("--data-dir", default=None, help="the folder that holds one folder per dataset (mnist/, "
                   "fashion-mnist/, ...), e.g. ../shared/data (default: download into the cache)")
    r.add_argument("--quick", action="store_true", help="the packaged quick spec: the whole pipeline on digits "
                   "(about half a minute on 2 idle cores; --no-robustness skips the attacks); not with another --spec")
    r.add_argument("--no-robustness", action="store_true", help="skip the adaptive-attack evaluation")
    r.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    r.add_argument("--out", required=True, help="output folder of this spec's results (a rerun into it reuses "
                   "what is finished); a folder that holds anything else is refused")
    r.add_argument("--export", default=None, help="also copy the reports (tables, CSV, figures, spec; no weights) "
                   "to this folder, e.g. docs/results/mnist")
    r.add_argument("--quiet", action="store_true", help="less output")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser("certify", help="certified L2 radii of a trained noisy network", formatter_class=_Formatter,
                       description="CERTIFY (Cohen et al. 2019) for a run whose first noisy layer is linear or "
                                   "convolutional with Gaussian noise: per image the prediction or abstention and "
                                   "the certified L2 radius σ/‖W₁‖₂ · Φ⁻¹(p_A); certified accuracy at --radii; "
                                   "writes certify.csv, certify.md and certified_accuracy.png.")
    c.add_argument("--run", required=True, help="a run folder (or its model.safetensors)")
    add_data_options(c, required_dataset=True)
    c.add_argument("--images", type=int, default=500, help="test images certified")
    c.add_argument("--n0", type=int, default=100, help="noisy passes that select the class")
    c.add_argument("--samples", type=int, default=10000, help="noisy passes that bound its probability")
    c.add_argument("--alpha", type=float, default=0.001, help="1 − confidence of each bound")
    c.add_argument("--predictor", choices=["vote", "lap"], default="vote", help="majority vote or LAP")
    c.add_argument("--radii", default="0,0.25,0.5,1,1.5", help="L2 radii of the certified-accuracy table")
    c.add_argument("--seed", type=int, default=0, help="seed of the noise")
    c.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_certify)

    b = sub.add_parser("robustness", help="adaptive attacks on trained runs", formatter_class=_Formatter,
                       description="White-box adaptive attacks (APGD through several surrogate gradients, EOT, "
                                   "SPSA, transfer) on saved runs; writes robustness.md/.csv/_checks.json and a "
                                   "figure.")
    b.add_argument("--run", required=True, nargs="+", help="run folder(s) to attack")
    add_data_options(b, required_dataset=True)
    b.add_argument("--eps", default=",".join(f"{e:g}" for e in DEFAULT_EPS), help="comma-separated budgets ε (L∞, or L2 with --norm L2)")
    b.add_argument("--headline", type=float, default=None, help="ε of the transfer and convergence checks "
                   "(default: the middle of --eps)")
    b.add_argument("--source", default=None, help="a run folder of a network to transfer FGSM from")
    b.add_argument("--images", type=int, default=500, help="test images attacked")
    add_attack_options(b)
    b.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.add_argument("--resume", action="store_true", help="continue an interrupted run in --out: attacks recorded "
                   "in its robustness_journal.safetensors are replayed, the rest run")
    b.set_defaults(func=cmd_robustness)
    return p


def given_options(argv: list[str], command: str) -> set[str]:
    """The option names (dests) typed on the command line of ``command``, as argparse reads them
    (abbreviations included), as opposed to those left at their defaults."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


_PROGRESS_FOR_LOGS = False


def _progress_for_logs() -> None:
    """Progress bars redraw with a carriage return at every refresh: into a log file (stderr not a
    terminal) that is thousands of lines; there, they refresh once a minute."""
    global _PROGRESS_FOR_LOGS
    if _PROGRESS_FOR_LOGS or sys.stderr.isatty():
        return
    from functools import partialmethod

    from tqdm import std
    std.tqdm.__init__ = partialmethod(std.tqdm.__init__, mininterval=60.0)
    _PROGRESS_FOR_LOGS = True


def load_plugins(argv: list[str]) -> None:
    """Import the modules named by ``--plugin`` before the parser is built, so that what they register is
    among its choices."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
    names += [b for a, b in zip(argv, argv[1:]) if a == "--plugin"]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SystemExit(f"glrnet: error: --plugin {name}: cannot import it ({e})") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    load_plugins(argv)
    args = build_parser().parse_args(argv)
    _progress_for_logs()
    try:
        if args.command == "train":
            args.given = given_options(argv, "train")
        if args.command in ("certify", "robustness"):   # train takes its own lock (the library's)
            from .checkpoint import output_lock
            with output_lock(args.out):
                return args.func(args)
        return args.func(args)
    except (ValueError, DataError, FileNotFoundError, ImportError) as e:
        print(f"glrnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError: the step was refused, nothing was written
        print(f"glrnet {args.command}: error: {e}; the last checkpoint and outputs are kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = {"train": "rerun with --resume", "robustness": "rerun with --resume: finished attacks are replayed",
                 "reproduce": "rerun the same command: finished models and attacks are reused and the interrupted "
                 "one resumes"}.get(args.command, "rerun the same command")
        print(f"glrnet {args.command}: interrupted; the last checkpoint and the results so far are kept ({again})",
              file=sys.stderr)
        return 130
