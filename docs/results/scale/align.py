"""Per-input gradient alignment of a sigmoid LeNet at initialisation (noise-free BP, MNIST batch of 32):
A = Σₙ‖gₙ‖² / ‖Σₙ gₙ‖², to first order flipout's own-perturbation variance over the shared site's.

    python docs/results/scale/align.py [../shared/data/mnist]
"""
import sys

import torch
from glrnet.train import TrainConfig
from glrnet.data import load_dataset
from glrnet.experiments import initial_model
data = load_dataset("mnist", sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist", None, 0.1)
x, y = data.x_train[:32], data.y_train[:32]
for norm in ("none", "layer"):
    cfg = TrainConfig(arch="lenet", hidden=[], activation="sigmoid", norm=norm).validate()
    model = initial_model(cfg, data)
    layers = list(model.noisy_layers)
    per = []
    for n in range(32):
        out = model(x[n:n+1])
        loss = torch.nn.functional.cross_entropy(out, y[n:n+1])
        gs = torch.autograd.grad(loss, [m.weight for m in layers])
        per.append([g.flatten() for g in gs])
    row = []
    for li in range(len(layers)):
        G = torch.stack([p[li] for p in per])
        row.append(f"layer{li}: A = {G.pow(2).sum().item() / G.sum(0).pow(2).sum().item():.3f}")
    print("norm", norm, " ".join(row), "(1/B = 0.031, orthogonal = 1)")
