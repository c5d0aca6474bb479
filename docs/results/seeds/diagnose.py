"""Per-class and per-hidden-unit diagnostics of a saved glrnet MLP (public API only).

For a model and a data set (x, y), noise-free pre-activations z of every noisy layer:

* per output class c: share of OT predictions that are c, recall of c, the share of K noisy
  passes (vote) whose argmax is c over all images, the mean noisy win probability of c on images of
  class c, the median margin (z_c − max_{j≠c} z_j)/σ on images of class c, the class's bias and ‖w_c‖;
* per hidden unit: firing rate P(z > 0), median |z|/σ, share of inputs with |z| < σ (where noise can
  flip the unit), mean flip probability Φ(−|z|/σ) (how much signal the unit's score can carry).

    PYTHONPATH=src python3 docs/results/seeds/diagnose.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import glrnet
from glrnet.checkpoint import load_model
from glrnet.nn.injection import bind
from glrnet.nn.intercept import record_preactivations

CLASS_FIELDS = ["class", "pred_share", "recall", "vote_share", "own_win_prob", "median_margin_sigma", "max_margin_sigma",
                "bias", "w_norm", "row_grad_norm", "row_grad_std", "row_nsr"]
UNIT_FIELDS = ["unit", "fire_rate", "median_absz_sigma", "share_within_sigma", "mean_flip_prob"]


@torch.no_grad()
def row_signal(model, x, y, loss: str = "zero_one", replications: int = 1000, seed: int = 0) -> list[tuple]:
    """Per output class c: the GLR estimate's signal ‖E ĝ‖ and spread √Σvar for the output row (w_c, b_c) on
    (x, y), from ``GLR.estimate(return_variance=True)`` (10 independent sub-estimates); their ratio is the
    row's noise-to-signal ratio (≫ 1: the class's parameters get only noise)."""
    est = glrnet.GLR(loss, replications=replications, baseline=True,
                     generator=torch.Generator().manual_seed(seed), variance_batches=10)
    grads, stats = est.estimate(model, x, y, return_variance=True)
    gw, gb = grads[-2].double(), grads[-1].double()          # the output layer's weight and bias
    vw, vb = stats.variance[-2].double(), stats.variance[-1].double()
    rows = []
    for c in range(gw.shape[0]):
        sq = gw[c].pow(2).sum() + gb[c].pow(2)
        var = vw[c].sum() + vb[c]
        mean = max(sq.item() - var.item(), 0.0) ** 0.5
        rows.append((mean, var.item() ** 0.5, var.item() ** 0.5 / mean if mean > 0 else float("inf")))
    return rows


def diagnose(model, x, y, vote_images: int = 3000, vote_reps: int = 100, seed: int = 0, signal_images: int = 500,
             loss: str = "zero_one") -> dict:
    layers = glrnet.noisy_layers(model)
    rec = record_preactivations(model, bind(model, x))
    zs = [rec.preactivations[m] for m in layers]
    sigma = float(layers[0].noise.stddev)
    out = zs[-1]
    classes = out.shape[1]
    pred = out.argmax(1)
    g = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(x), generator=g)[:vote_images]
    vote = glrnet.predict_proba(model, x[sub], "vote", vote_reps, generator=g)   # (n, C) share of passes
    sig = row_signal(model, x[sub[:signal_images]], y[sub[:signal_images]], loss, seed=seed)
    rows = []
    normal = torch.distributions.Normal(0.0, 1.0)
    for c in range(classes):
        mine = y == c
        others = out.clone()
        others[:, c] = -math.inf
        margin = (out[:, c] - others.max(1).values) / sigma
        rows.append({"class": c, "pred_share": (pred == c).double().mean().item(),
                     "recall": (pred[mine] == c).double().mean().item(),
                     "vote_share": vote[:, c].double().mean().item(),
                     "own_win_prob": vote[y[sub] == c, c].double().mean().item(),
                     "median_margin_sigma": margin[mine].median().item(), "max_margin_sigma": margin.max().item(),
                     "row_grad_norm": sig[c][0], "row_grad_std": sig[c][1], "row_nsr": sig[c][2],
                     "bias": layers[-1].bias[c].item(), "w_norm": layers[-1].weight[c].norm().item()})
    units = []
    for t, z in enumerate(zs[:-1]):
        a = z.abs() / float(layers[t].noise.stddev)
        flip = normal.cdf(-a)
        for u in range(z.shape[1]):
            units.append({"layer": t, "unit": u, "fire_rate": (z[:, u] > 0).double().mean().item(),
                          "median_absz_sigma": a[:, u].median().item(),
                          "share_within_sigma": (a[:, u] < 1).double().mean().item(),
                          "mean_flip_prob": flip[:, u].double().mean().item()})
    acc = (pred == y).double().mean().item()
    return {"acc_ot": acc, "classes": rows, "units": units,
            "dead_classes": [r["class"] for r in rows if r["vote_share"] < 0.005],
            "dead_units": [u["unit"] for u in units if u["share_within_sigma"] < 0.01],
            "noise_scale": glrnet.diagnostics.noise_scale(model, x[sub]) if hasattr(glrnet, "diagnostics") else None}


def summary_line(d: dict) -> str:
    cls = " ".join(f"{r['class']}:{r['pred_share']:.3f}/{r['median_margin_sigma']:+.1f}/{r['row_nsr']:.1f}"
                   for r in d["classes"])
    return (f"acc {d['acc_ot']:.4f}  dead classes {d['dead_classes']}  dead units {d['dead_units']} of "
            f"{len(d['units'])}\n  class:pred_share/median own margin σ/output-row NSR  {cls}")


if __name__ == "__main__":
    from glrnet.data import load_dataset
    for run in sys.argv[1:]:
        model, extra = load_model(Path(run) / "model.safetensors")
        cfg = extra["config"]
        data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["image_size"], cfg["val_fraction"], None,
                            cfg["seed"], split=cfg["split"])
        d = diagnose(model, data.x_train, data.y_train)
        print(run, summary_line(d))
        for u in d["units"]:
            print(f"  unit {u['unit']:2d} fire {u['fire_rate']:.3f} med|z|/σ {u['median_absz_sigma']:6.2f} "
                  f"|z|<σ {u['share_within_sigma']:.3f} flip {u['mean_flip_prob']:.3f}")
