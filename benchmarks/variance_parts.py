"""Variance of the GLR estimate for every sampler × control variate × injection, side by side.

    python benchmarks/variance_parts.py [--estimates 200] [--out benchmarks/variance_parts.json]

Problems: a small sigmoid MLP (10-6-3, batch 8) and the seed's 196-20-10 sigmoid network with
weights ×3 (batch 25), both at K = 64 and 256, cross-entropy, N(0, 2). For each setting: the
total variance of one estimate (trace of the covariance over independent estimates, same
batch), and its ratio to the seed's plain i.i.d. estimator. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import glrnet


def problems():
    torch.manual_seed(4)
    small = glrnet.NoisyMLP([10, 6, 3])
    yield "10-6-3, B = 8", small, torch.rand(8, 10), torch.randint(0, 3, (8,))
    torch.manual_seed(0)
    paper = glrnet.NoisyMLP([196, 20, 10])
    with torch.no_grad():
        for layer in paper:
            layer.weight.mul_(3.0)
    yield "196-20-10 (weights ×3), B = 25", paper, torch.rand(25, 196), torch.randint(0, 10, (25,))


SETTINGS = [("iid", False, "all"), ("antithetic", False, "all"), ("qmc", False, "all"),
            ("iid", True, "all"), ("antithetic", True, "all"), ("qmc", True, "all"),
            ("iid", True, "layerwise")]


def total_variance(model, x, y, n, **kw) -> float:
    est = glrnet.GLR(generator=torch.Generator().manual_seed(1), **kw)
    g = torch.stack([torch.cat([t.flatten() for t in est.estimate(model, x, y)[0]]) for _ in range(n)]).double()
    return g.var(0).sum().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimates", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/variance_parts.json")
    args = ap.parse_args()
    rows = []
    for name, model, x, y in problems():
        for K in (64, 256):
            plain = None
            for sampler, baseline, injection in SETTINGS:
                K_used = K - K % len(model) if injection == "layerwise" else K
                v = total_variance(model, x, y, args.estimates, replications=K_used, sampler=sampler,
                                   baseline=baseline, injection=injection)
                plain = plain or v
                rows.append({"problem": name, "K": K_used, "sampler": sampler, "baseline": baseline,
                             "injection": injection, "total_variance": v, "plain_over_this": plain / v})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| problem | K | sampler | baseline | injection | total variance | i.i.d. plain ÷ this |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['K']} | {r['sampler']} | {'leave-one-out' if r['baseline'] else 'none'} | "
              f"{r['injection']} | {r['total_variance']:.4g} | {r['plain_over_this']:.2f}× |")
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "estimates": args.estimates, "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
