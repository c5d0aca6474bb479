"""What the threshold LeNet's convolutions contribute: the same network at the hour runs' initial
weights with its two convolutions frozen, the output layer trained by exact back-propagation
(noise-free logistic regression on the fixed random threshold features), against the GLR runs,
which train every layer. With ``--run DIR`` (a finished GLR run, weights kept), also that run's
trained convolutions frozen under a freshly trained output layer, and how far they moved:
‖W − W₀‖ / ‖W₀‖ per convolution.

    OMP_NUM_THREADS=1 python docs/results/scale/frozen_features.py ../shared/data [--epochs 3] \
        [--run mnist=<run dir>] [--run fashion-mnist=<run dir>]
"""
import argparse

import torch

from glrnet.checkpoint import load_model
from glrnet.data import load_dataset
from glrnet.experiments import initial_model
from glrnet.train import TrainConfig

ap = argparse.ArgumentParser()
ap.add_argument("root", nargs="?", default="../shared/data")
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--run", action="append", default=[], help="DATASET=RUN_DIR of a finished GLR run")
args = ap.parse_args()
runs = dict(r.split("=", 1) for r in args.run)


def fit_output_layer(model, data, epochs, seed=0):
    """Train only the last layer (convolutions frozen) by BP on noise-free outputs; test accuracy."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.noisy_layers[-1]
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():       # the frozen part once: the features the output layer sees
        feats = lambda x: torch.cat([model[:-1](model.bind(x[i:i + 1000])) for i in range(0, len(x), 1000)])  # noqa: E731
        f_train, f_test = feats(data.x_train), feats(data.x_test)
    for _ in range(epochs):
        for idx in torch.randperm(len(f_train), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head.affine(f_train[idx]), data.y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (head.affine(f_test).argmax(1) == data.y_test).float().mean().item()


for dataset in ("mnist", "fashion-mnist"):
    cfg = TrainConfig(dataset=dataset, data_dir=f"{args.root}/{dataset}", arch="lenet", hidden=[],
                      activation="threshold", replications=96, baseline=True, injection="layerwise",
                      weight_noise="conv", weight_noise_std=0.05).validate()
    data = load_dataset(dataset, cfg.data_dir, None, 0.1)
    init = initial_model(cfg, data)
    w0 = [m.weight.detach().clone() for m in init.noisy_layers[:-1]]
    acc = fit_output_layer(init, data, args.epochs)
    print(f"| {dataset} | initial (random) convolutions, frozen | {acc:.4f} | – |", flush=True)
    if dataset in runs:
        trained, _ = load_model(f"{runs[dataset]}/model.safetensors")
        moved = ", ".join(f"{(m.weight - w).norm() / w.norm():.2f}" for m, w in zip(trained.noisy_layers[:-1], w0))
        acc = fit_output_layer(trained, data, args.epochs)
        print(f"| {dataset} | the GLR run's trained convolutions, frozen | {acc:.4f} | {moved} |", flush=True)
