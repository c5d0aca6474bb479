"""One GLR step of two glrnet source trees, measured in alternating processes (A, B, A, B, ...).

    git worktree add /tmp/prev HEAD~1
    python benchmarks/compare_commits.py --previous /tmp/prev/src [--rounds 4] [--repeats 15]

On this project's shared 2-core machine the same measurement drifts by 20-30 % between
processes, so a one-shot comparison of two commits says little; alternating processes and
taking the median of each side's per-process medians does. Each process times the default
``glrnet.GLR(replications=K, baseline=False)`` and ``baseline=True`` estimates of the seed's
196-20-10 MLP (K = 10000, B = 25), the 784-256-256-10 MLP (K = 1000, B = 64) and of LeNet (K = 100, B = 32), sigmoid units, and of the
threshold LeNet with weight noise (σ_w = 0.05) on both convolutions (K = 96, B = 32: the scale
study's ``weight-conv`` runs), and the threshold LeNet each tree's ``--arch lenet`` builds with that weight noise
and layer-wise injection (the ``weight-layerwise`` runs), with threshold and ``centered:threshold`` units;
wall and CPU time (a helper thread's counts).
``--only TEXT``: the cases whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, statistics, sys, time, torch, glrnet
def lenet(act="sigmoid", site="activity"):
    w = dict(site=site, noise=torch.distributions.Normal(0.0, 0.05)) if site != "activity" else {}
    return glrnet.NoisySequential(
        glrnet.NoisyConv2d(1, 6, 5, activation=act, **w), torch.nn.MaxPool2d(2),
        glrnet.NoisyConv2d(6, 16, 5, activation=act, **w), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        glrnet.NoisyLinear(256, 10), noise=torch.distributions.Normal(0.0, 2.0), input_shape=(1, 28, 28))
torch.manual_seed(0)
cases = {"mlp 196-20-10 K=10000 B=25": (lambda: glrnet.NoisyMLP([196, 20, 10]), (25, 196), 10000),
         "mlp 784-256-256-10 K=1000 B=64": (lambda: glrnet.NoisyMLP([784, 256, 256, 10]), (64, 784), 1000),
         "lenet K=100 B=32": (lenet, (32, 1, 28, 28), 100),
         "lenet threshold weight-site K=96 B=32": (lambda: lenet("threshold", "weight"), (32, 1, 28, 28), 96)}
def built(activation="threshold", **kw):   # the LeNet each tree's own `--arch lenet` builds (its pooling modules included)
    from glrnet.train import TrainConfig, build_model
    return build_model(TrainConfig(arch="lenet", hidden=[], activation=activation, **kw), (28, 28), 10)
cases["built lenet threshold weight-layerwise K=96 B=32"] = (
    lambda: built(weight_noise="conv", weight_noise_std=0.05), (32, 1, 28, 28), 96, dict(injection="layerwise"))
cases["built lenet centered:threshold weight-layerwise K=96 B=32"] = (
    lambda: built("centered:threshold", weight_noise="conv", weight_noise_std=0.05), (32, 1, 28, 28), 96,
    dict(injection="layerwise"))
out = {}
for name, (make, shape, K, *kw) in cases.items():
    if ONLY not in name:
        continue
    model, x = make(), torch.rand(*shape)
    y = torch.randint(0, 10, (x.shape[0],))
    for baseline in (False, True):
        est = glrnet.GLR(replications=K, baseline=baseline, **(kw[0] if kw else {}))
        for _ in range(2):
            est.estimate(model, x, y)
        ts, cpu = [], []
        for _ in range(REPEATS):
            t, c = time.perf_counter(), time.process_time()
            est.estimate(model, x, y)
            ts.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
        out[f"{name}, baseline={baseline}"] = statistics.median(ts)
        out[f"{name}, baseline={baseline}, CPU time"] = statistics.median(cpu)
print(json.dumps(out))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", required=True, help="the other glrnet source folder (…/src)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="only the cases whose name contains this text")
    args = ap.parse_args()
    this = str(Path(__file__).resolve().parents[1] / "src")
    runs = {"previous": [], "this": []}
    for _ in range(args.rounds):
        for side, src in (("previous", args.previous), ("this", this)):
            child = CHILD.replace("REPEATS", str(args.repeats)).replace("ONLY", repr(args.only))
            res = subprocess.run([sys.executable, "-c", child], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = []
    for case in runs["this"][0]:
        prev = statistics.median(r[case] for r in runs["previous"])
        now = statistics.median(r[case] for r in runs["this"])
        spread = [round(1000 * r[case], 1) for r in runs["this"]]
        rows.append({"case": case, "previous_ms": 1000 * prev, "this_ms": 1000 * now, "this_over_previous": now / prev,
                     "this_per_process_ms": spread,
                     "previous_per_process_ms": [round(1000 * r[case], 1) for r in runs["previous"]]})
        print(f"{case:45s} previous {1000 * prev:7.1f} ms   this {1000 * now:7.1f} ms   this/previous "
              f"{now / prev:.2f}   (this, per process: {spread})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": args.rounds, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
