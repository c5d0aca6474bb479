"""Adaptive attacks on rate-coded spiking networks (GLR-trained and BPTT-trained), one protocol for both.

    OMP_NUM_THREADS=1 python docs/results/snn/robustness_snn.py --runs glr=/tmp/snn/runs/rate-glr \
        bptt=/tmp/snn/runs/rate-bptt --out /tmp/snn/robust [--images 200] [--eps 0.05 0.1 0.15 0.2 0.3]

Threat model (white box, L∞ on the pixel intensities p ∈ [0, 1]^784). The defended model is the encoding and
the network together: p → spike trains s_t ~ Bernoulli(p) i.i.d. over the T = 25 steps and the pixels → the
network. The attacker knows the weights, the encoding, the noise and its σ and the prediction rule, and not
the draws the defender makes at prediction time (fresh, secret). The encoding's Bernoulli draws are treated
exactly like the network's membrane noise, for both networks:

* prediction (both networks): the mean softmax over K passes, each with its own encoding draw; in the
  GLR-trained network each pass also has its own membrane noise (LAP), the BPTT-trained network runs
  noise-free (it was trained without noise). ``ot``: the same mean over K encoding draws with the membrane
  noise off (for the BPTT network the two are one predictor).
* gradients (both networks): expectation over transformation: log of the mean softmax over S passes (fresh
  encoding draws, and for the GLR network fresh membrane noise), differentiated through the encoding by the
  straight-through estimator (d s_t / d p = 1 = d E[s_t] / d p) and through the spikes by the layers'
  surrogate derivative (fast sigmoid, slope 25: the derivative BPTT trains with).

Attacks at every ε (from :mod:`glrnet.robustness.attacks`, on that classifier): FGSM, APGD with the CE and the
DLR losses (``--steps``), and the worst of ``--random`` random corners p ± ε. The per-image worst case counts an
image robust only if every attack fails. Escalation at ``--headline``: on the images that survived every
attack, the steps and the EOT samples are doubled (fresh seeds) until one doubling breaks at most 1 % of the
images or ``--doublings`` is reached. Writes robustness.csv (model, attack, ε, acc, acc_ot) and robustness.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

import glrnet
from glrnet.nn import Layout, TimeInjection, noisy_forward, probe
from glrnet.robustness.attacks import apgd, fgsm

sys.path.insert(0, str(Path(__file__).parent))
from train_snn import TASKS, build  # noqa: E402


def load(run: Path) -> tuple[nn.Module, SimpleNamespace]:
    args = SimpleNamespace(**json.loads((run / "args.json").read_text()))
    if args.task != "rate":
        raise ValueError(f"{run}: this script attacks rate-coded networks, got task {args.task!r}")
    model = build(args)
    model.load_state_dict(torch.load(run / "ckpt.pt", weights_only=False)["model"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, args


def encode(p: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """Spike trains (N, T, D) ~ Bernoulli(p); straight-through: the gradient w.r.t. p is that of E[s] = p."""
    s = torch.bernoulli(p.detach()[:, None, :].expand(len(p), steps, p.shape[1]), generator=generator)
    return s + (p - p.detach())[:, None, :]


def network(model: nn.Module, s: Tensor, membrane_noise: bool, generator: torch.Generator) -> Tensor:
    """The network on spike trains (N, T, D): noise-free, or with fresh membrane noise on every row and step
    (one noisy replication per row: a :class:`glrnet.nn.TimeInjection` pass, differentiable)."""
    if not membrane_noise:
        return model(s)
    pr = probe(model, s[:1].detach())
    layout = Layout(pr)

    def draw(i, n):
        return torch.randn(1, len(s), pr.width(i), generator=generator) * float(pr.layers[i].noise.stddev)
    return noisy_forward(model, s, TimeInjection(pr.layers, 1, len(s), draw, pr.perturbations, layout.active),
                         layout.first)


class Defended(nn.Module):
    """p (N, 784) → log of the mean softmax over ``samples`` passes (encoding draws, membrane noise if
    ``membrane_noise``): the EOT classifier the attacks differentiate, an ordinary module for torchattacks."""

    def __init__(self, model, steps, samples, membrane_noise, generator):
        super().__init__()
        self.model, self.steps, self.samples, self.membrane_noise, self.generator = \
            model, steps, samples, membrane_noise, generator

    def forward(self, p: Tensor) -> Tensor:
        p = p.reshape(len(p), -1)
        rows = p.repeat(self.samples, 1)
        out = network(self.model, encode(rows, self.steps, self.generator), self.membrane_noise, self.generator)
        prob = torch.softmax(out, -1).reshape(self.samples, len(p), -1).mean(0)
        return prob.clamp_min(1e-12).log()


@torch.no_grad()
def predict(model, p, steps, k, membrane_noise, seed, chunk=2000) -> Tensor:
    """Classes (N,) by the mean softmax over k passes (fresh encoding draws; membrane noise if asked)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    per = max(1, chunk // len(p))
    for k0 in range(0, k, per):
        kk = min(per, k - k0)
        out = network(model, encode(p.repeat(kk, 1), steps, gen), membrane_noise, gen)
        total = total + torch.softmax(out, -1).reshape(kk, len(p), -1).sum(0)
    return total.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="name=run_dir (a train_snn.py run of --task rate)")
    ap.add_argument("--data-dir", default="/work/shared/data/mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=200, help="the first N test images")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--headline", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20, help="APGD iterations")
    ap.add_argument("--eot", type=int, default=8, help="passes averaged inside one gradient")
    ap.add_argument("--k", type=int, default=100, help="passes of the predictor that scores images")
    ap.add_argument("--random", type=int, default=4, help="random corners p ± ε tried")
    ap.add_argument("--doublings", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = glrnet.load_dataset("mnist", data_dir=args.data_dir)
    x, y = ds.x_test[:args.images].float(), ds.y_test[:args.images]
    rows, log = [], []

    def say(msg):
        print(msg, flush=True)
        log.append(msg)

    def write():
        with open(out / "robustness.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["model", "attack", "eps", "acc", "acc_ot", "images", "wall_s"])
            w.writeheader()
            w.writerows(rows)
        (out / "log.txt").write_text("\n".join(log) + "\n")

    for spec in args.runs:
        name, run = spec.split("=", 1)
        model, targs = load(Path(run))
        steps = TASKS["rate"][0]
        noisy = targs.method == "glr"        # trained with membrane noise: it predicts with it (LAP)
        seed = args.seed

        def score(p, sub_y, s=seed):
            c = predict(model, p, steps, args.k, noisy, s + 1) == sub_y
            c_ot = c if not noisy else predict(model, p, steps, args.k, False, s + 2) == sub_y
            return c, c_ot

        def clf(samples, s):
            return Defended(model, steps, samples, noisy, torch.Generator().manual_seed(s))

        t0 = time.perf_counter()
        c, c_ot = score(x, y)
        rows.append({"model": name, "attack": "none", "eps": 0.0, "acc": c.double().mean().item(),
                     "acc_ot": c_ot.double().mean().item(), "images": len(x), "wall_s": round(time.perf_counter() - t0, 1)})
        say(f"{name}: clean {rows[-1]['acc']:.3f} (ot {rows[-1]['acc_ot']:.3f})")
        write()
        for eps in args.eps:
            worst, worst_ot = c.clone(), c_ot.clone()
            attacks = {
                "fgsm": lambda p, t, e, m=1, s=seed: fgsm(clf(2 * args.eot * m, s + 10), p, t, e),
                "apgd-ce": lambda p, t, e, m=1, s=seed: apgd(clf(args.eot * m, s + 11), p, t, e, args.steps * m, 1,
                                                              "ce", s + 12),
                "apgd-dlr": lambda p, t, e, m=1, s=seed: apgd(clf(args.eot * m, s + 13), p, t, e, args.steps * m, 1,
                                                               "dlr", s + 14),
            }
            for aname, fn in attacks.items():
                t0 = time.perf_counter()
                adv = fn(x, y, eps)
                assert (adv - x).abs().max() <= eps + 1e-5 and adv.min() >= 0 and adv.max() <= 1
                a, a_ot = score(adv, y)
                worst &= a
                worst_ot &= a_ot
                rows.append({"model": name, "attack": aname, "eps": eps, "acc": a.double().mean().item(),
                             "acc_ot": a_ot.double().mean().item(), "images": len(x),
                             "wall_s": round(time.perf_counter() - t0, 1)})
                say(f"{name} ε={eps:g} {aname}: {rows[-1]['acc']:.3f} (ot {rows[-1]['acc_ot']:.3f}) "
                    f"{rows[-1]['wall_s']:.0f}s")
                write()
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(seed + 20)
            ra, ra_ot = torch.ones_like(c), torch.ones_like(c)
            for d in range(args.random):
                u = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
                a, a_ot = score((x + eps * u).clamp(0, 1), y, seed + 30 + d)
                ra &= a
                ra_ot &= a_ot
            worst &= ra
            worst_ot &= ra_ot
            rows.append({"model": name, "attack": "random", "eps": eps, "acc": ra.double().mean().item(),
                         "acc_ot": ra_ot.double().mean().item(), "images": len(x),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            rows.append({"model": name, "attack": "worst-case", "eps": eps, "acc": worst.double().mean().item(),
                         "acc_ot": worst_ot.double().mean().item(), "images": len(x), "wall_s": ""})
            say(f"{name} ε={eps:g} worst case: {worst.double().mean():.3f} (ot {worst_ot.double().mean():.3f})")
            write()
            if eps == args.headline:   # escalation: double steps and samples on the survivors
                alive = worst.clone()
                for level in range(1, args.doublings + 1):
                    m, t0 = 2 ** level, time.perf_counter()
                    before = alive.double().mean().item()
                    for aname, fn in attacks.items():
                        idx = alive.nonzero().squeeze(1)
                        if not len(idx):
                            break
                        adv = fn(x[idx], y[idx], eps, m, seed + 100 * level)
                        alive[idx] = score(adv, y[idx], seed + 100 * level)[0]
                    after = alive.double().mean().item()
                    rows.append({"model": name, "attack": f"worst-case {m}x", "eps": eps, "acc": after,
                                 "acc_ot": math.nan, "images": len(x), "wall_s": round(time.perf_counter() - t0, 1)})
                    say(f"{name} ε={eps:g} escalation {m}x: {before:.3f} → {after:.3f} "
                        f"({time.perf_counter() - t0:.0f}s)")
                    write()
                    if before - after <= 0.01 + 1e-9:
                        break
    write()


if __name__ == "__main__":
    main()
