"""The pilot behind the hour-long runs' choice of technique (pilots.md): per-layer NSR at the initial
weights for variants of `combined` (LeNet, MNIST) and of `resnet-combined` (Fashion-MNIST), with the
study's own measurement (glrnet.experiments.gradient_quality; K = 96, one batch of 32).

    OMP_NUM_THREADS=1 python docs/results/scale/pilot_quality.py ../shared/data
"""
import sys

from glrnet.data import load_dataset
from glrnet.experiments import gradient_quality
from glrnet.train import TrainConfig

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
lenet = dict(dataset="mnist", arch="lenet", hidden=[], activation="threshold", replications=96, baseline=True,
             injection="layerwise", norm="layer", relative_noise=0.5, weight_noise_std=0.05)
resnet = dict(dataset="fashion-mnist", arch="resnet", hidden=[], activation="threshold", replications=96,
              baseline=True, norm="layer", relative_noise=0.5, weight_noise_std=0.05, local_losses=True)
cases = [("mnist", lenet, 40, [("combined (weight noise: conv)", dict(weight_noise="conv")),
                                ("weight noise: first conv only", dict(weight_noise="first")),
                                ("no weight noise", dict(weight_noise="none")),
                                ("conv, σ_w = 1.0 × RMS(W)", dict(weight_noise="conv", relative_weight_noise=1.0)),
                                ("first, relative σ 0.125", dict(weight_noise="first", relative_noise=0.125))]),
         ("fashion-mnist", resnet, 20, [("resnet-combined (weight noise: conv)", dict(weight_noise="conv")),
                                        ("weight noise: first conv only", dict(weight_noise="first"))])]
for dataset, base, samples, variants in cases:
    data = load_dataset(dataset, f"{root}/{dataset}", None, 0.1)
    x, y = data.x_train[:32], data.y_train[:32]
    for name, over in variants:
        cfg = TrainConfig(**{**base, **over, "data_dir": f"{root}/{dataset}"}).validate()
        r = gradient_quality(cfg, data, x, y, samples)
        print(f"{dataset} | {name} | " + ", ".join(f"{l['layer']} {l['nsr']:.3g}" for l in r["layers"])
              + f" | {r['seconds_per_estimate'] * 1000:.0f} ms", flush=True)
