"""Certified L2 radii of a row-sequential spiking network whose first layer carries Gaussian membrane noise.

    OMP_NUM_THREADS=1 python docs/results/snn/certify_rows.py --run /tmp/snn/runs/rows-glr --out /tmp/snn/certify \
        [--images 500] [--n0 100] [--n 1000] [--alpha 0.001]

The argument (README.md, "Certificate"): at step t the first layer's membrane receives
v_t = W x_t + r_t (plus terms that depend on the input only through v_1 … v_{t−1}: the leak, the reset, the
recurrent spikes, the bias), r_t ~ N(0, σ² I) i.i.d. over steps and units. The network is therefore a function
of u + r, u = (W x_1, …, W x_T) ∈ R^{T·H}, r ~ N(0, σ² I_{TH}), and the rest of its noise; the majority vote of
noisy passes is a Gaussian smoothing in u (Cohen et al. 2019; Salman et al. 2019), so Φ⁻¹(p_A(u)) is
1/σ-Lipschitz in u. A perturbation δ = (δ_1, …, δ_T) of the rows moves u by (W δ_t)_t, of norm at most
‖W‖₂ ‖δ‖₂ (the image's L2 norm: each row is seen once), so the vote is certified on
‖δ‖₂ < σ/‖W‖₂ · Φ⁻¹(p̲_A), p̲_A the Clopper–Pearson lower bound of the top class's vote share (level α),
as :func:`glrnet.certify.certify` does for a feed-forward first layer (which refuses a TimeLoop: its first layer
sees one row per step, not the whole input).

Writes certify.json: clean vote accuracy, abstentions, σ/‖W‖₂, certified accuracy at several radii.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import glrnet
from glrnet.certify import clopper_pearson_lower

sys.path.insert(0, str(Path(__file__).parent))
from train_snn import build, sequences  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data-dir", default="/work/shared/data/mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run = Path(args.run)
    targs = SimpleNamespace(**json.loads((run / "args.json").read_text()))
    if targs.task not in ("rows", "pixels"):
        raise ValueError("the Gaussian certificate is for currents (rows, pixels); rate coding is Bernoulli")
    model = build(targs)
    model.load_state_dict(torch.load(run / "ckpt.pt", weights_only=False)["model"])
    first = glrnet.noisy_layers(model)[0]
    if not isinstance(first.noise, torch.distributions.Normal) or first.perturbation.name != "activity":
        raise ValueError("the first layer must carry Gaussian noise on its membrane")
    sigma = float(first.noise.stddev)
    norm = torch.linalg.matrix_norm(first.input_weight.detach().double(), ord=2).item()   # W of x_t only
    ds = glrnet.load_dataset("mnist", data_dir=args.data_dir)
    x, y = sequences(targs.task, ds.x_test[:args.images]), ds.y_test[:args.images]
    g = torch.Generator().manual_seed(0)
    top = glrnet.predict_proba(model, x, "vote", args.n0, generator=g).argmax(-1)
    share = glrnet.predict_proba(model, x, "vote", args.n, generator=g).gather(1, top[:, None]).squeeze(1)
    counts = (share * args.n).round()
    p_lower = clopper_pearson_lower(counts, args.n, args.alpha)
    ok = p_lower > 0.5
    icdf = torch.distributions.Normal(0.0, 1.0).icdf(p_lower.clamp(1e-300, 1 - 1e-16))
    radius = torch.where(ok, sigma / norm * icdf, torch.zeros_like(icdf))
    correct = ok & (top == y)
    out = {"run": run.name, "images": len(x), "sigma": sigma, "first_layer_norm": norm, "sigma_over_norm": sigma / norm,
           "n0": args.n0, "n": args.n, "alpha": args.alpha,
           "max_radius_at_n": sigma / norm * torch.distributions.Normal(0.0, 1.0).icdf(
               clopper_pearson_lower(torch.tensor([float(args.n)]), args.n, args.alpha)).item(),
           "vote_accuracy_uncertified": (top == y).double().mean().item(),
           "abstain": (~ok).double().mean().item(),
           "certified_accuracy": {str(r): (correct & (radius >= r) if r > 0 else correct).double().mean().item()
                                  for r in args.radii},
           "median_radius_of_correct": radius[correct].median().item() if correct.any() else 0.0,
           "wall_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "certify.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
