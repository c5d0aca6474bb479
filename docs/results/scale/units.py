"""Silent units: how often each convolution's threshold units fire in a trained LeNet, over 2,000 validation
inputs, noise off (the OT network). A unit that fires for no input (or for every input) passes nothing on,
and under a small absolute σ_w its parameters' noise no longer flips it, so its likelihood-ratio estimate
is noise alone.

    python docs/results/scale/units.py ../shared/data mnist=init mnist=<run>/model.safetensors fashion-mnist=<run>/checkpoint.safetensors
"""
import sys

import torch

from glrnet.checkpoint import load_model, read_checkpoint_meta
from glrnet.data import load_dataset
from glrnet.nn import Injection, noisy_layers
from glrnet.train import TrainConfig, build_model


def load(path: str, data):
    if path == "init":                       # the study's initial weights
        from glrnet.experiments import initial_model
        return initial_model(TrainConfig(arch="lenet", hidden=[], activation="threshold"), data)
    if not path.endswith("checkpoint.safetensors"):
        return load_model(path)[0]
    from safetensors.torch import load_file
    model = build_model(TrainConfig.from_saved(read_checkpoint_meta(path)["config"]), (28, 28), 10)
    model.load_state_dict({k[6:]: v for k, v in load_file(path).items() if k.startswith("model.")})
    return model


root = sys.argv[1]
print("| run | layer | units silent or always on | firing < 2 % or > 98 % | channels firing < 2 % | per-channel firing rate | kernel norms |")
print("|---|---|---|---|---|---|---|")
for arg in sys.argv[2:]:
    dataset, path = arg.split("=", 1)
    data = load_dataset(dataset, f"{root}/{dataset}", None, 0.1)
    model = load(path, data)
    x = model.bind(data.x_val[:2000])
    layers = noisy_layers(model)
    with torch.no_grad(), Injection(layers, 1, len(x), record=True) as inj:
        model(x)
    for i, z in inj.preactivations.items():
        if z.dim() != 4:
            continue
        on = (z > 0).double()
        rate = on.mean(0)                                   # per unit (channel, position)
        per_channel = on.mean((0, 2, 3))
        norms = layers[i].weight.flatten(1).norm(dim=1)
        print(f"| {dataset} `{path.split('/')[-2] if '/' in path else path}` | conv {i} | {((rate == 0) | (rate == 1)).double().mean():.3f} | "
              f"{((rate < 0.02) | (rate > 0.98)).double().mean():.3f} | {int((per_channel < 0.02).sum())} of "
              f"{len(per_channel)} | {' '.join(f'{v:.2f}' for v in per_channel.tolist())} | "
              f"{' '.join(f'{v:.1f}' for v in norms.tolist())} |", flush=True)
