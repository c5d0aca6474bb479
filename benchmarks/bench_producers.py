"""Step time of every gradient producer on the same LeNet and batch, measured side by side.

    python benchmarks/bench_producers.py [--replications 96] [--batch 32] [--repeats 5] [--threads 1]
                                         [--out benchmarks/results_producers_cpu.json]

GLR with activity noise (the seed's estimator, and with the baseline), GLR with weight noise on
the convolutions (all layers noisy in every replication, and layer-wise), layer-wise injection, local
losses, ES (population K), SPSA (K/2 directions), forward gradients (K tangents) and back-propagation: the same budget of K forward passes per
input. Round-robin over the producers, ``--repeats`` rounds; the median per producer and its ratio
to one noise-free forward pass of the batch replicated K times (the machine's floor for K noisy
passes) and to the BP step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from glrnet.train import TrainConfig, build_model, build_producer

PRODUCERS = {
    "glr (activity, plain)": dict(baseline=False),
    "glr + baseline": dict(baseline=True),
    "glr weight-noise convs + baseline": dict(baseline=True, perturb="conv=weight"),
    "glr weight-noise convs + layer-wise + baseline": dict(baseline=True, perturb="conv=weight", injection="layerwise"),
    "glr layer-wise + baseline": dict(baseline=True, injection="layerwise"),
    "glr local losses + baseline": dict(baseline=True, local_losses=True),
    "es": dict(method="es", sigma=0.02),
    "spsa": dict(method="spsa", sigma=1e-3),
    "forward gradient": dict(method="forward"),
    "bp": dict(method="bp"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replications", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for this benchmark (set here, reported)")
    ap.add_argument("--activation", default="sigmoid")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)   # a benchmark script's own process: reported in the output
    torch.manual_seed(0)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    setups = {}
    for name, opts in PRODUCERS.items():
        cfg = TrainConfig(arch="lenet", hidden=[], activation=args.activation, replications=args.replications,
                          **opts).validate()
        model = build_model(cfg, (28, 28), 10)
        producer = build_producer(cfg, torch.Generator().manual_seed(1))
        producer.backward(model, x, y)   # warm-up: buffers, first-call costs
        setups[name] = (model, producer)
    floor_model = build_model(TrainConfig(arch="lenet", hidden=[], activation=args.activation).validate(), (28, 28), 10)
    xr = x.repeat(args.replications, 1, 1, 1)
    times = {name: [] for name in setups} | {"floor: K noise-free forward passes": []}
    for _ in range(args.repeats):
        for name, (model, producer) in setups.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            producer.backward(model, x, y)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            floor_model(xr)
        times["floor: K noise-free forward passes"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor, bp = med["floor: K noise-free forward passes"], med["bp"]
    rows = [{"producer": k, "median_ms": 1000 * v, "ratio_to_floor": v / floor, "ratio_to_bp": v / bp}
            for k, v in med.items()]
    print(f"LeNet ({args.activation}), batch {args.batch}, K = {args.replications}, {args.threads} thread(s), "
          f"median of {args.repeats} round-robin rounds")
    print(f"{'producer':40s} {'ms':>9s} {'/ floor':>8s} {'/ BP':>8s}")
    for r in rows:
        print(f"{r['producer']:40s} {r['median_ms']:9.1f} {r['ratio_to_floor']:8.2f} {r['ratio_to_bp']:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
