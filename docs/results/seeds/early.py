"""The first steps of a glr-threshold-01 run, step by step: when does a class die?

Rebuilds ``glrnet.train.train``'s run from the same named random streams (initial weights: stream
(seed, 0); data order: (seed, 1, epoch); the estimator's noise: (seed, 4)) with the same public pieces
(build_model, build_producer, build_optimizer), so its first steps are train()'s, and every ``--every``
steps records per class on the validation images: share of noise-free predictions, median own margin
(z_c − max_{j≠c} z_j)/σ on the class's images, and the output bias.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 docs/results/seeds/early.py --seed 1 --steps 400 --every 10
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import PAPER  # noqa: E402

import glrnet  # noqa: E402
from glrnet.data import load_dataset  # noqa: E402
from glrnet.train import TrainConfig, build_model, build_optimizer, build_producer  # noqa: E402
from glrnet.utils.seeding import stream_seed  # noqa: E402


@torch.no_grad()
def class_state(model, x, y, sigma):
    out = model(x)
    pred = out.argmax(1)
    rows = []
    for c in range(out.shape[1]):
        o = out.clone()
        o[:, c] = -math.inf
        margin = (out[:, c] - o.max(1).values) / sigma
        rows.append(((pred == c).double().mean().item(), margin[y == c].median().item(), margin.max().item()))
    return (pred == y).double().mean().item(), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--setting", default="paper")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--out", default="/tmp/seeds/early.csv")
    a = ap.parse_args()
    cfg = TrainConfig(**{**PAPER, "seed": a.seed, **({"lr": a.lr} if a.lr else {})}).validate()
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.val_fraction, None, cfg.seed, split=cfg.split)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, 0))
        model = build_model(cfg, data.image_shape, data.num_classes)
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 4))
    producer = build_producer(cfg, gen)
    opt, _ = build_optimizer(cfg, model)
    out_layer = glrnet.noisy_layers(model)[-1]
    sigma = cfg.noise_std
    n = len(data.x_train)
    path = Path(a.out)
    new = not path.exists()
    f = path.open("a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["setting", "seed", "step", "val_acc_ot", "class", "pred_share", "median_own_margin_sigma",
                    "max_margin_sigma", "bias"])
    step, epoch = 0, 1
    while step < a.steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(cfg.seed, 1, epoch)))
        for start in range(0, n, cfg.batch_size):
            if step % a.every == 0:
                acc, rows = class_state(model, data.x_val, data.y_val, sigma)
                for c, (share, med, mx) in enumerate(rows):
                    w.writerow([a.setting, a.seed, step, f"{acc:.4f}", c, f"{share:.4f}", f"{med:.2f}", f"{mx:.2f}",
                                f"{out_layer.bias[c].item():.3f}"])
                dead = [c for c, r in enumerate(rows) if r[0] == 0]
                print(f"step {step:4d} acc {acc:.3f} no-prediction classes {dead} shares "
                      + " ".join(f"{r[0]:.2f}" for r in rows), flush=True)
            if step >= a.steps:
                break
            idx = order[start:start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            producer.backward(model, data.x_train[idx], data.y_train[idx])
            opt.step()
            step += 1
        epoch += 1
    f.close()


if __name__ == "__main__":
    main()
