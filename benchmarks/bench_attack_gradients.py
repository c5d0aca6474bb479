"""One attack gradient on a noisy threshold LeNet: EOT through a BPDA surrogate against the deterministic surrogates.

    python benchmarks/bench_attack_gradients.py [--device cpu|cuda] [--repeats 7] [--B 32] [--out FILE]

What one APGD step on the defended predictor costs for each kind of surrogate: the input gradient of the
cross-entropy of ``glrnet.robustness.LAPClassifier`` on B images of the LeNet of ``--arch lenet`` (threshold units,
σ = 2 activity noise; and conv weight noise, σ_w = 0.05), through

* ``gauss``, EOT over 8 and over 128 noise samples (the protocol's first stage and its 16× stage);
* ``mean`` — the mean-field network, one pass (``glrnet.robustness.moments.mean_field_forward``);
* ``moments`` — moment propagation, one pass carrying means and variances.

Medians measured round-robin in one process; prints each and its ratio to ``mean``, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cnn import lenet, median_times  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from glrnet.robustness import LAPClassifier

    torch.manual_seed(0)
    x = torch.rand(args.B, 784, device=args.device)
    y = torch.randint(0, 10, (args.B,), device=args.device)
    rows = {}
    for site in ("activity", "weight"):
        model = lenet("threshold").to(args.device)
        if site == "weight":
            for m in (model[0], model[2]):
                m.site, m.noise = "weight", torch.distributions.Normal(0.0, 0.05)
        gen = torch.Generator(device=args.device).manual_seed(0)

        def grad(clf):
            def fn():
                z = x.clone().requires_grad_(True)
                torch.nn.functional.nll_loss(clf(z), y).backward()
            return fn
        fns = {"gauss EOT 8": grad(LAPClassifier(model, 8, "gauss", generator=gen)),
               "gauss EOT 128": grad(LAPClassifier(model, 128, "gauss", generator=gen)),
               "mean": grad(LAPClassifier(model, 8, "mean")),
               "moments": grad(LAPClassifier(model, 8, "moments"))}
        t = median_times(fns, args.repeats, args.device)
        rows[site] = {name: {"seconds": s, "ratio_to_mean": s / t["mean"]} for name, s in t.items()}
        for name, r in rows[site].items():
            print(f"{site:8s} {name:14s} {1e3 * r['seconds']:9.2f} ms   {r['ratio_to_mean']:7.1f}× mean", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__, "B": args.B,
                                              "threads": torch.get_num_threads(), "machine": platform.processor(),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
