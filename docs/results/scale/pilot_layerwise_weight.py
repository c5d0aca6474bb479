"""Why conv weight noise wants layer-wise injection (pilots.md, "Weight noise, one layer at a time"):
per-layer NSR at the initial weights of the threshold LeNet (MNIST) and residual network
(Fashion-MNIST), conv weight noise σ_w = 0.05 with the leave-one-out baseline, every noisy layer
perturbed in every replication ("all", the `weight-conv` technique) against one layer per replication
("layerwise"), with and without antithetic pairs; the study's own measurement
(glrnet.experiments.gradient_quality: one batch of 32, K noisy passes per input).

    OMP_NUM_THREADS=1 python docs/results/scale/pilot_layerwise_weight.py ../shared/data
"""
import sys

from quality_rows import print_rows

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
base = dict(arch="lenet", hidden=[], activation="threshold", replications=96, baseline=True,
            weight_noise="conv", weight_noise_std=0.05)
cases = [("mnist", dict(base), 100, [("all (weight-conv)", {}), ("layerwise (weight-layerwise)", dict(injection="layerwise")),
                                     ("all + antithetic", dict(sampler="antithetic")),
                                     ("layerwise + antithetic", dict(injection="layerwise", sampler="antithetic"))]),
         ("fashion-mnist", dict(base, arch="resnet"), 30, [("all, K = 96", {}), ("layerwise, K = 96", dict(injection="layerwise")),
                                                           ("layerwise, K = 192", dict(injection="layerwise", replications=192))])]
print_rows(cases, root)
