"""Gradient quality of GLR through time on one batch: per-layer noise-to-signal ratio of the estimate and its
cosine with back-propagation through time's surrogate gradient, for several estimator settings.

    OMP_NUM_THREADS=1 python docs/results/snn/quality.py --run /tmp/snn/runs/rate-glr [--estimates 16]
        [--batch 100] [--configs NAME ...] [--out quality.md]

The network and task are the run's (``args.json``; its checkpoint's weights, or the initial ones with
``--init``). For each setting, ``--estimates`` independent estimates on the same batch (the same rate-code
draw): NSR = (total variance of one estimate) / ‖mean estimate‖², per layer (1/NSR is the squared
signal-to-noise ratio of one step's gradient; the mean's own noise is NSR/estimates, reported as
"resolved" when below 1), and the mean of the cosines between single estimates and the BPTT gradient of
the noise-free network (a different quantity: the surrogate's gradient, not ∇E[L]; read as a guide).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributions import Normal

import glrnet

sys.path.insert(0, str(Path(__file__).parent))
from train_snn import build, sequences  # noqa: E402

CONFIGS = {
    "K64-layerwise": dict(replications=64, injection="layerwise"),
    "K64-all": dict(replications=64, injection="all"),
    "K64-layerwise-antithetic": dict(replications=64, injection="layerwise", sampler="antithetic"),
    "K64-layerwise-qmc": dict(replications=64, injection="layerwise", sampler="qmc"),
    "K256-layerwise": dict(replications=256, injection="layerwise"),
    "K64-layerwise-sigma0.25": dict(replications=64, injection="layerwise", sigma=0.25),
    "K64-layerwise-sigma1": dict(replications=64, injection="layerwise", sigma=1.0),
    "K64-layerwise-weight": dict(replications=64, injection="layerwise", perturbation="weight", sigma=0.01),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--init", action="store_true", help="the initial weights instead of the checkpoint's")
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--estimates", type=int, default=16)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    targs = SimpleNamespace(**json.loads((run / "args.json").read_text()))
    torch.manual_seed(targs.seed)
    model = build(targs)
    if not args.init:
        model.load_state_dict(torch.load(run / "ckpt.pt", weights_only=False)["model"])
    ds = glrnet.load_dataset("mnist", data_dir=args.data_dir)
    x = sequences(targs.task, ds.x_train[:args.batch], torch.Generator().manual_seed(0))
    y = ds.y_train[:args.batch]
    layers = glrnet.noisy_layers(model)
    model.zero_grad()
    glrnet.Backprop().backward(model, x, y)
    bptt = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    sizes = [sum(p.numel() for p in m.parameters()) for m in layers]
    lines = [f"run {run.name} ({'initial' if args.init else 'checkpoint'} weights, step "
             f"{torch.load(run / 'ckpt.pt', weights_only=False)['state']['step'] if not args.init else 0}), "
             f"batch {args.batch}, {args.estimates} estimates per setting", "",
             "| setting | NSR hidden / readout | cos with BPTT | s per estimate |", "|---|---|---|---|"]
    for name in args.configs:
        cfg = dict(CONFIGS[name])
        sigma, pert = cfg.pop("sigma", targs.sigma), cfg.pop("perturbation", None)
        saved = [(m.perturbation, m.noise) for m in layers]
        for m, s in zip(layers, [sigma, targs.readout_sigma if pert is None else sigma]):
            if pert is not None:
                m.site = pert
            m.noise = Normal(0.0, s)
        est = glrnet.GLR(baseline=True, prefetch=False, generator=torch.Generator().manual_seed(1), **cfg)
        t0 = time.perf_counter()
        samples = torch.stack([torch.cat([g.reshape(-1) for g in est.estimate(model, x, y)[0]])
                               for _ in range(args.estimates)])
        seconds = (time.perf_counter() - t0) / args.estimates
        for m, (p, n) in zip(layers, saved):
            m.perturbation, m.noise = p, n
        nsr = []
        for part in torch.split(samples, sizes, dim=1):
            mean = part.mean(0)
            var = ((part - mean) ** 2).sum(1).mean() * args.estimates / (args.estimates - 1)
            ratio = (var / mean.pow(2).sum().clamp_min(1e-30)).item()
            nsr.append(f"{ratio:.3g}" if ratio / args.estimates < 1 else "not resolved")
        cos = torch.nn.functional.cosine_similarity(samples, bptt[None], dim=1).mean().item()
        lines.append(f"| {name} | {' / '.join(nsr)} | {cos:.3f} | {seconds:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
