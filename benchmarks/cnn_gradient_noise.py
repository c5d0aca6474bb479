"""How noisy is a GLR gradient of a noisy CNN, per layer? (what limits GLR-trained CNNs)

    python benchmarks/cnn_gradient_noise.py [--data-dir ../shared/data/mnist] [--run RUN_DIR]

On one batch of 32 MNIST training images, for the LeNet-style CNN (at initialisation, or a
trained run's weights with ``--run``), sigmoid units, cross-entropy, σ = 2: the norm of the
expected gradient and the spread of one estimate for every parameter (one call of
``estimate(..., return_variance=True)``: 10 independent sub-estimates), for K = 20, 100, 1000 with
the leave-one-out baseline, and the back-propagation (pathwise, K = 100) estimate beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import glrnet
from glrnet.diagnostics import gradient_noise

sys.path.insert(0, str(Path(__file__).parent))
from bench_cnn import lenet  # noqa: E402


class _Pathwise:
    def __init__(self, replications):
        self.bp = glrnet.Backprop(noise=True, replications=replications)

    def estimate(self, model, x, y, return_variance=True, batches=10):
        samples = []
        for _ in range(batches):
            model.zero_grad(set_to_none=True)
            self.bp.backward(model, x, y)
            samples.append([p.grad.clone() for p in model.parameters()])
        stacked = [torch.stack(g) for g in zip(*samples)]
        return [g.mean(0) for g in stacked], glrnet.GradStats(loss=torch.zeros(()),
                                                              variance=[g.var(0) / batches for g in stacked])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--run", default=None, help="a trained run whose weights to use (default: initialisation)")
    args = ap.parse_args()
    data = glrnet.load_dataset("mnist", args.data_dir)
    x, y = data.x_train[:32], data.y_train[:32]
    torch.manual_seed(0)
    if args.run:
        from glrnet.checkpoint import load_model
        model = load_model(Path(args.run) / "model.safetensors")[0]
    else:
        model = lenet("sigmoid")
    rows = {}
    for k in (20, 100, 1000):
        est = glrnet.GLR(replications=k, baseline=True, generator=torch.Generator().manual_seed(k))
        rows[f"GLR K={k}"] = gradient_noise(model, x, y, est)
    rows["pathwise K=100"] = gradient_noise(model, x, y, _Pathwise(100))
    names = [f"{r['layer']}.{r['parameter']}" for r in next(iter(rows.values()))]
    print("noise-to-signal (spread of one estimate / norm of the expected gradient), per parameter:")
    print(f"{'estimator':16s} " + " ".join(f"{n:>10s}" for n in names))
    for label, rs in rows.items():
        print(f"{label:16s} " + " ".join(f"{r['noise_to_signal']:10.2f}" for r in rs))


if __name__ == "__main__":
    main()
