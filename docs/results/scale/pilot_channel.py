"""Channel-wise weight noise (site "channel"; pilots.md, "One channel per replication"): per-layer NSR and
cost per estimate at the initial weights of the threshold LeNet (MNIST) and the residual network
(Fashion-MNIST), conv weight noise σ_w = 0.05, layer-wise injection, leave-one-out baseline: every
channel of the layer perturbed in each replication (`weight-layerwise`) against one channel per
replication, at equal replications per layer and with the replications moved to where they are cheap
(the study's own measurement, glrnet.experiments.gradient_quality: one batch of 32).

    OMP_NUM_THREADS=1 python docs/results/scale/pilot_channel.py ../shared/data [samples]
"""
import sys

from quality_rows import print_rows

root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
samples = int(sys.argv[2]) if len(sys.argv) > 2 else 60
base = dict(arch="lenet", hidden=[], activation="threshold", replications=96, baseline=True,
            weight_noise="conv", weight_noise_std=0.05, injection="layerwise")
lenet = [("every channel, 32 / 32 / 32 (weight-layerwise)", {}),
         ("every channel, 32 / 256 / 32", dict(layer_replications=[32, 256, 32])),
         ("one channel, 32 / 256 / 32", dict(channelwise=True, layer_replications=[32, 256, 32])),
         ("one channel, 32 / 32 / 32", dict(channelwise=True)),
         ("one channel, 96 / 96 / 96", dict(channelwise=True, replications=288)),
         ("one channel, 32 / 512 / 32", dict(channelwise=True, layer_replications=[32, 512, 32])),
         ("one channel, 96 / 1536 / 96", dict(channelwise=True, layer_replications=[96, 1536, 96]))]
resnet = [("every channel, K = 96 (8 × 12)", {}), ("one channel, K = 96", dict(channelwise=True)),
          ("one channel, 12 / 96 × 6 / 12", dict(channelwise=True, layer_replications=[12] + [96] * 6 + [12]))]
print_rows([("mnist", dict(base), samples, lenet), ("fashion-mnist", dict(base, arch="resnet"), samples, resnet)],
           root, sys.argv[3] if len(sys.argv) > 3 else None)
