"""One GLR estimate of the weight-site threshold LeNet (both convolutions, injection all, K = 96, B = 32), one thread,
timed and profiled: run it under two source trees (PYTHONPATH=.../src) to compare them directly."""
import torch, glrnet, time, cProfile, pstats
torch.manual_seed(0); torch.set_num_threads(1)
w = dict(site="weight", noise=torch.distributions.Normal(0.0, 0.05))
m = glrnet.NoisySequential(glrnet.NoisyConv2d(1, 6, 5, activation="threshold", **w), torch.nn.MaxPool2d(2),
    glrnet.NoisyConv2d(6, 16, 5, activation="threshold", **w), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
    glrnet.NoisyLinear(256, 10), noise=torch.distributions.Normal(0.0, 2.0), input_shape=(1, 28, 28))
x = torch.rand(32, 1, 28, 28); y = torch.randint(0, 10, (32,))
est = glrnet.GLR(replications=96, baseline=False)
for _ in range(2): est.estimate(m, x, y)
pr = cProfile.Profile(); pr.enable()
t=time.perf_counter()
for _ in range(5): est.estimate(m, x, y)
print("ms", (time.perf_counter()-t)/5*1000)
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(8)
