"""One training step of the rate-coded spiking study, side by side: GLR through time with its second pass
over noise-free inputs (one noise-free pass of B rows, the noise drawn again), the same estimate with the
k·B noisy rows run again (what the estimator did before), the floor, and back-propagation through time.

    OMP_NUM_THREADS=1 python benchmarks/bench_spiking_step.py [--replications 64] [--batch 100] [--repeats 7]

Network of docs/results/snn: rate-coded MNIST-sized input (784 Bernoulli spike trains of T = 25 steps),
784 → 256 LIF → 10 leaky integrators, membrane noise σ = 0.5, K replications split layer-wise, leave-one-out
baseline. The floor is the K·B noisy forward passes of the step and their noise (the estimator's first
pass: what any GLR step must do). Each case is timed in turn in every round (process CPU seconds of one
thread, so other load on the machine moves the figures little); the table gives the median per case and
its ratio to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.distributions import Normal

import glrnet
from glrnet.estimators import through_time
from glrnet.estimators.samplers import IID
from glrnet.nn import Layout, probe


def network(seed: int = 0):
    torch.manual_seed(seed)
    noise = Normal(0.0, 0.5)
    return glrnet.TimeLoop(glrnet.Leaky(784, 256, beta=0.9, threshold=1.0, noise=noise),
                           glrnet.LeakyIntegrator(256, 10, beta=0.9, noise=noise), readout="mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replications", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model = network()
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.rand(args.batch, 1, 784).expand(-1, args.steps, -1), generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    K = args.replications
    glr = glrnet.GLR(replications=K, injection="layerwise", baseline=True, generator=torch.Generator().manual_seed(0))
    bptt = glrnet.Backprop()
    pr = probe(model, x)
    sets = [(Layout(pr, [i]), K // len(pr.order)) for i in pr.order]

    replay = through_time.replay_noise_free

    def noisy_again(model, x, layout, noise, on_apply):   # the second pass as before: the k·B noisy rows again
        through_time.run_pass(model, x, layout, noise.k, noise, on_apply=on_apply)

    def step(producer):
        model.zero_grad(set_to_none=True)
        producer.backward(model, x, y)

    def glr_replay():
        through_time.replay_noise_free = replay
        step(glr)

    def glr_noisy_again():
        through_time.replay_noise_free = noisy_again
        try:
            step(glr)
        finally:
            through_time.replay_noise_free = replay

    @torch.no_grad()
    def floor():
        for layout, k in sets:
            out = through_time.sampled_pass(model, x, layout, k, IID(), g)
            torch.nn.functional.cross_entropy(out, y.repeat(k), reduction="none")

    cases = {"GLR, second pass over noise-free inputs": glr_replay,
             "GLR, the noisy rows run again": glr_noisy_again,
             "floor: K·B noisy forward passes and their noise": floor,
             "BPTT (surrogate gradient)": lambda: step(bptt)}
    for f in cases.values():
        f()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, f in cases.items():
            t = time.process_time()
            f()
            times[name].append(time.process_time() - t)
    base = statistics.median(times["floor: K·B noisy forward passes and their noise"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {K}, B = {args.batch}, "
          f"T = {args.steps}; median of {args.repeats} rounds, CPU seconds")
    print(f"{'case':<52} {'s/step':>8} {'/ floor':>8}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<52} {m:8.3f} {m / base:8.2f}")
    a, b = (statistics.median(times[n]) for n in list(cases)[:2])
    print(f"noise-free replay against the noisy rows again: {b / a:.2f}× faster")


if __name__ == "__main__":
    main()
