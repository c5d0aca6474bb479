"""The library's adaptive-attack protocol (:func:`glrnet.robustness.attack_and_report`) on rate-coded spiking
networks: the encoding and the network as one module, attacked on the pixel intensities.

    OMP_NUM_THREADS=1 python docs/results/snn/protocol_snn.py --runs glr=/tmp/snn/runs/rate-glr \
        bptt=/tmp/snn/runs/rate-bptt --out /tmp/snn/protocol [--images 100] [--eps 0.05 0.1]

:class:`RateCoded` draws the Bernoulli spike trains inside its forward pass (straight-through: the gradient
w.r.t. p is that of E[s_t] = p) and runs the network on them. It is not an ``nn.Sequential``, so a noisy pass of
k replications repeats its input k times before the encoding: every replication has its own encoding draw,
and the encoding's noise is averaged exactly like the membrane noise, by LAP and inside every EOT gradient.
Both networks are attacked as noisy models (defended by LAP): the GLR-trained one with its membrane noise,
the BPTT-trained one with its membranes' noise set to σ = 10⁻⁶ (it was trained without noise), so that its
LAP averages the encoding draws only. OT: one encoding draw, membrane noise off. The protocol's attack plan,
escalation and sanity checks run as for any model; the effort is reduced (``--steps``, ``--eot``, SPSA and
LAP sizes below) to fit one CPU core, the same for both networks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.distributions import Normal

import glrnet
from glrnet.robustness import AttackSettings, ProtocolSettings, attack_and_report

sys.path.insert(0, str(Path(__file__).parent))
from train_snn import TASKS, build  # noqa: E402


class RateCoded(nn.Module):
    """p (N, 784) in [0, 1] → the network on Bernoulli(p) spike trains of T steps (straight-through in p)."""

    def __init__(self, net: nn.Module, steps: int):
        super().__init__()
        self.net, self.steps = net, steps

    def forward(self, p: Tensor) -> Tensor:
        p = p.reshape(len(p), -1)
        s = torch.bernoulli(p.detach()[:, None, :].expand(len(p), self.steps, p.shape[1]))
        return self.net(s + (p - p.detach())[:, None, :])


def load(run: Path) -> RateCoded:
    args = SimpleNamespace(**json.loads((run / "args.json").read_text()))
    if args.task != "rate":
        raise ValueError(f"{run}: a rate-coded run is needed, got task {args.task!r}")
    net = build(args)
    net.load_state_dict(torch.load(run / "ckpt.pt", weights_only=False)["model"])
    if args.method != "glr":   # trained without noise: LAP then averages the encoding draws only
        for m in glrnet.noisy_layers(net):
            m.noise = Normal(0.0, 1e-6)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return RateCoded(net, TASKS["rate"][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="name=run_dir")
    ap.add_argument("--data-dir", default="/work/shared/data/mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--headline", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eot", type=int, default=8)
    ap.add_argument("--lap", type=int, default=64)
    ap.add_argument("--spsa-samples", type=int, default=16)
    ap.add_argument("--spsa-steps", type=int, default=10)
    ap.add_argument("--spsa-k", type=int, default=4)
    ap.add_argument("--random", type=int, default=2)
    ap.add_argument("--doublings", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = glrnet.load_dataset("mnist", data_dir=args.data_dir)
    x, y = ds.x_test[:args.images].float(), ds.y_test[:args.images]
    models = {name: (load(Path(run)), True) for name, run in (s.split("=", 1) for s in args.runs)}
    st = AttackSettings(steps=args.steps, eot_samples=args.eot, lap_replications=args.lap,
                        spsa_samples=args.spsa_samples, spsa_steps=args.spsa_steps, spsa_queries_k=args.spsa_k,
                        random_draws=args.random, max_doublings=args.doublings)
    settings = ProtocolSettings(eps=tuple(args.eps), headline=args.headline, attacks=st)
    attack_and_report(Path(args.out), models, x, y, settings, title="rate-coded spiking networks (encoding + network)")


if __name__ == "__main__":
    main()
