"""The ``glrnet`` subcommands: each reads its arguments, calls the library, and writes its outputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..certify import certified_accuracy, certify
from ..checkpoint import atomic_write_csv, atomic_write_text, load_model, write_index
from ..data import describe_datasets, load_run_dataset
from ..estimators import distributed
from .. import experiments
from ..plots import figure_certified
from ..predict import predict
from ..robustness import ProtocolSettings
from ..robustness.protocol import attack_and_report
from ..robustness.settings import validate_eps
from ..sequences import encode, sequence_shape
from ..train import TrainConfig, resolve_device, train, unused_options
from .options import config_from_args, settings_from_args


def cmd_train(args) -> int:
    resolve_device(args.device)
    distributed.init_from_env(args.device)
    out = Path(args.out)
    cfg = config_from_args(args)
    given = set(getattr(args, "given", set()))   # typed on the command line (older spellings by today's name)
    if given & {"weight_noise", "flipout", "channelwise"} or ("weight_noise_std" in given and cfg.perturb != "activity"):
        given.add("perturb")
    if "weight_noise_std" in given and cfg.perturb == "activity":
        given.add("sigma")
    unused = unused_options(cfg, given)   # typed, and it would be ignored
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


def _check_inputs(data, model, run, cfg: dict | None = None) -> None:
    if (cfg or {}).get("encoding", "none") != "none":
        raise ValueError(f"{run} is a network through time (encoding {cfg['encoding']}): this command takes "
                         "networks of images; attack or certify it from Python (docs/results/snn)")
    if data.in_features != model.in_features:
        raise ValueError(f"{data.name} images have {data.in_features} pixels, the model of {run} expects "
                         f"{model.in_features} (set --image-size, or --dataset to the run's)")


def cmd_certify(args) -> int:


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
    _check_inputs(data, model, args.run, cfg)
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
    figure_certified(out / "certified_accuracy.png", {path.name: cert}, y, title=data.name)
    write_index(out, f"glrnet certify: {path.name} on {data.name}")
    print("\n".join(lines))
    return 0


def cmd_evaluate(args) -> int:
    device = resolve_device(args.device)
    path = Path(args.run)
    path = path / "model.safetensors" if path.is_dir() else path
    model, extra = load_model(path, device)
    cfg = extra.get("config", {})
    data = load_run_dataset(cfg, args.dataset, args.data_dir, args.image_size, None, args.split)
    encoding = cfg.get("encoding", "none")
    expected = data.in_features if encoding == "none" else math.prod(sequence_shape(encoding, data.image_shape))
    if expected != model.in_features:
        raise ValueError(f"{data.name} images have {data.in_features} pixels, the model expects {model.in_features} "
                         "(set --image-size)")
    x, y = _first_test_images(data, args.subset)
    x, y = x.to(device), y.to(device)
    if encoding != "none":   # a network through time: the test images as its sequences (spikes from --seed)
        x = encode(x, encoding, data.image_shape, torch.Generator(device=device).manual_seed(args.seed))
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
    experiments.reproduce(args.spec, args.out, dataset=args.dataset, data_dir=args.data_dir, quick=args.quick,
              device=args.device, quiet=args.quiet, robustness=not args.no_robustness, export=args.export,
              seeds=args.seeds)
    return 0


def cmd_robustness(args) -> int:
    """``glrnet robustness --run DIR [DIR ...]``: the protocol on trained runs."""

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
        if cfg.get("encoding", "none") != "none":
            _check_inputs(None, model, run, cfg)
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
    attack_and_report(out, models, x, y, ProtocolSettings(tuple(eps), headline, None, st), source,
                      title=f"{data.name}, {', '.join(models)}", quiet=args.quiet, resume=args.resume)
    write_index(out, f"glrnet robustness: {', '.join(models)} on {data.name}")
    print((out / "robustness.md").read_text())
    return 0


