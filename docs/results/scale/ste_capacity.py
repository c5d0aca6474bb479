"""What the threshold LeNet itself can reach: the same network (6c5-pool-16c5-pool-10, threshold units, the
study's initial weights) trained by back-propagation with a surrogate derivative through the threshold
(forward exact, 1[v > 0]; backward the derivative of sigmoid(s·v), the straight-through family), Adam,
noise-free. Not a forward-only method: a reference for the capacity GLR's goals ask of this network.

    OMP_NUM_THREADS=1 python docs/results/scale/ste_capacity.py ../shared/data [epochs] [slope] [datasets] [activation] [arch]

datasets: comma-separated (default mnist,fashion-mnist); activation: threshold (default) or centered:threshold;
arch: lenet (default), resnet, or any --arch string.
"""
import sys
import time

import torch

from glrnet.nn.activations import Centered
from glrnet.data import load_dataset
from glrnet.nn import intercept, noisy_layers
from glrnet.train import TrainConfig, build_model

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
slope = float(sys.argv[3]) if len(sys.argv) > 3 else 4.0
datasets = sys.argv[4].split(",") if len(sys.argv) > 4 else ["mnist", "fashion-mnist"]
activation = sys.argv[5] if len(sys.argv) > 5 else "threshold"
arch = sys.argv[6] if len(sys.argv) > 6 else "lenet"


class Surrogate:
    """A noisy pass's handler (glrnet.nn.intercept): the exact threshold forward, sigmoid(slope·v)' backward."""

    @staticmethod
    def apply(layer, h):
        v = layer.affine(h)
        if layer.activation is None:
            return v
        if isinstance(layer.activation, Centered):     # centred before the step, differentiably
            v = layer.activation.center(v)
        soft = torch.sigmoid(slope * v)
        return soft + ((v > 0).to(v.dtype) - soft).detach()


for dataset in datasets:
    data = load_dataset(dataset, f"{root}/{dataset}", None, 0.1)
    torch.manual_seed(0)
    model = build_model(TrainConfig(arch=arch, hidden=[], activation=activation), data.image_shape,
                        data.num_classes)
    x_all = model.bind(data.x_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g, t0, layers = torch.Generator().manual_seed(0), time.process_time(), noisy_layers(model)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x_all), generator=g).split(32):
            with intercept(Surrogate()):
                loss = torch.nn.functional.cross_entropy(model(x_all[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = lambda x, y: (model(model.bind(x)).argmax(1) == y).double().mean().item()  # noqa: E731
            print(f"{dataset} epoch {epoch + 1}: val {acc(data.x_val, data.y_val):.4f} test "
                  f"{acc(data.x_test, data.y_test):.4f} ({time.process_time() - t0:.0f} CPU s)", flush=True)
