"""Certified L2 accuracy of GLR noisy networks beside input-space randomized smoothing, on digits.

    python benchmarks/certified_digits.py [--out docs/results/certified-digits] [--epochs 10]

A small-scale version of the comparison a robustness reviewer asks for (the seed split and
Fashion-MNIST versions are not run yet): 64-20-10 networks on scikit-learn's 8×8 digits
(pixels in [0, 1], so an L2 radius of 1 is large here: the images' L2 norm is about 4.5).

* GLR, σ = 0.5 neuron noise, threshold + 0-1 loss / threshold + CE / sigmoid + CE, each with the
  first layer's operator norm bounded by projection after every step (‖W₁‖₂ ≤ c, c = 2 and 4);
  certified radius σ/‖W₁‖₂ · Φ⁻¹(p_A).
* Input smoothing (Cohen et al.): the same sigmoid architecture behind a frozen identity layer
  whose noise is the input noise σ_in = 0.25 / 0.5 (‖W₁‖₂ = 1: the radius is σ_in Φ⁻¹(p_A)),
  trained by back-propagation through that noise (Gaussian data augmentation).

Every model is certified the same way (CERTIFY, majority vote, n0 = 100, n = 2000, α = 0.001,
all 450 test images), trained once per seed (``--seeds``, default 0,1,2): the table gives the mean
and min–max over seeds. Writes certified.csv (one row per model and seed), certified.md and
certified_accuracy.png (seed 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import glrnet
from glrnet.certify import certified_accuracy, certify, project_spectral_norm_
from glrnet.plots import figure_certified

RADII = [0.0, 0.25, 0.5, 1.0, 1.5]


def glr_model(activation: str, sigma: float) -> glrnet.NoisyMLP:
    return glrnet.NoisyMLP([64, 20, 10], activation=activation, noise=torch.distributions.Normal(0.0, sigma))


def input_smoothing_model(sigma_in: float) -> torch.nn.Sequential:
    """x ↦ x + r (a frozen identity NoisyLinear carrying the input noise), then 64-20-10 sigmoid with
    negligible neuron noise (σ = 1e-3): Cohen et al.'s smoothed classifier, in glrnet's terms."""
    eye = glrnet.NoisyLinear(64, 64, noise=torch.distributions.Normal(0.0, sigma_in))
    with torch.no_grad():
        eye.weight.copy_(torch.eye(64))
        eye.bias.zero_()
    eye.requires_grad_(False)
    tiny = torch.distributions.Normal(0.0, 1e-3)
    return glrnet.NoisySequential(eye, glrnet.NoisyLinear(64, 20, activation="sigmoid", noise=tiny),
                                  glrnet.NoisyLinear(20, 10, noise=tiny))


def train(model, producer, data, epochs: int, max_norm: float | None, seed: int = 0) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05 if max_norm else 0.01)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            producer.backward(model, data.x_train[idx], data.y_train[idx])
            opt.step()
            if max_norm is not None:
                project_spectral_norm_(model[0], max_norm)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/certified-digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = glrnet.load_dataset("digits", val_fraction=0.0)
    x, y = data.x_test, data.y_test
    seeds = [int(v) for v in args.seeds.split(",")]

    def runs():
        out = {}
        for act, loss in (("threshold", "zero_one"), ("threshold", "cross_entropy"), ("sigmoid", "cross_entropy")):
            for c in (2.0, 4.0):
                out[f"GLR {act}, {loss}, ‖W₁‖₂ ≤ {c:g}"] = (glr_model(act, 0.5), glrnet.GLR(loss=loss, replications=200),
                                                            c)
        for s in (0.25, 0.5):
            out[f"input smoothing σ_in = {s:g} (BP)"] = (input_smoothing_model(s),
                                                        glrnet.Backprop(noise=True, replications=8), None)
        return out

    rows, certs = [], {}
    t_all = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        for name, (model, producer, c) in runs().items():
            if hasattr(producer, "generator"):
                producer.generator = torch.Generator().manual_seed(seed)
            seconds = train(model, producer, data, args.epochs, c, seed)
            t0 = time.perf_counter()
            cert = certify(model, x, n0=100, n=args.samples, alpha=0.001,
                           generator=torch.Generator().manual_seed(1000 + seed))
            acc = certified_accuracy(cert, y, RADII)
            clean = glrnet.predict(model, x, "lap", 1000, generator=torch.Generator().manual_seed(2)) == y
            rows.append({"model": name, "seed": seed, "clean_lap": clean.double().mean().item(),
                         "first_layer_norm": cert.first_layer_norm, "sigma": cert.sigma,
                         "abstain": (cert.prediction < 0).double().mean().item(),
                         **{f"certified_{r:g}": acc[r] for r in RADII}, "train_s": seconds,
                         "certify_s": time.perf_counter() - t0})
            if seed == seeds[0]:
                certs[name] = cert
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)

    def spread(name, key):
        v = [r[key] for r in rows if r["model"] == name]
        return f"{sum(v) / len(v):.3f}" + (f" ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else "")

    lines = ["# Certified L2 accuracy on digits (450 test images)", "",
             "CERTIFY (Cohen et al. 2019): majority vote, n0 = 100, n = " + str(args.samples) + ", α = 0.001. "
             "Radius σ/‖W₁‖₂ · Φ⁻¹(p̲_A) (docs/robustness.md). Digits pixels are in [0, 1] (image L2 norm ≈ 4.5). "
             f"Mean (min–max) over seeds {seeds}; {args.epochs} epochs each. Command: "
             f"`python benchmarks/certified_digits.py --out {args.out}`; wall time "
             f"{time.perf_counter() - t_all:.0f} s.", "",
             "| model | clean (LAP) | σ | ‖W₁‖₂ | abstain | " + " | ".join(f"r = {r:g}" for r in RADII) + " |",
             "|---|---|---|---|---|" + "---|" * len(RADII)]
    for name in dict.fromkeys(r["model"] for r in rows):
        first = next(r for r in rows if r["model"] == name)
        lines.append(f"| {name} | {spread(name, 'clean_lap')} | {first['sigma']:g} | {first['first_layer_norm']:.3g} | "
                     f"{spread(name, 'abstain')} | " + " | ".join(spread(name, f"certified_{q:g}") for q in RADII) + " |")
    (out / "certified.md").write_text("\n".join(lines) + "\n")
    with open(out / "certified.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else f'"{v}"' if isinstance(v, str) else str(v)
                             for v in r.values()) + "\n")
    figure_certified(out / "certified_accuracy.png", certs, y, title="digits")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
