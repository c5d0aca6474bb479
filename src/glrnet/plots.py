"""Figures (matplotlib, headless): training curves and the paper's figures.

Figures are built as ``matplotlib.figure.Figure`` objects and saved directly: no pyplot, so no backend
is chosen or changed and a user's interactive session is left as it was."""

from __future__ import annotations

import math
import csv as _csv
from pathlib import Path

import torch

from .nn.activations import get_activation
from .utils.figures import save_figure as _save, styles as _styles, subplots


def plot_curves(history: list[dict], path, title: str = "", val_name: str = "validation") -> None:
    """Training and held-out loss per epoch (the seed's Figure 5), with held-out accuracy.

    ``val_name`` says what the held-out curve is: "validation", or "test" for a run trained
    without a validation split."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    ax.plot(epochs, [h["val_loss"] for h in history], "s--", label=f"{val_name} loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_acc_ot"] for h in history], color="gray", alpha=0.6, label=f"{val_name} accuracy (OT)")
    ax2.set_ylabel("accuracy", color="gray")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)  # below the axes: never over the data
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _activation_panel(ax, names, title):

    x = torch.linspace(-4, 4, 2001)
    for name in names:
        y = get_activation(name)(x)
        if name in ("threshold", "arctan_inv"):  # break the line at the jump
            y = y.clone()
            y[(x.abs() < 4e-3)] = float("nan")
        ax.plot(x.numpy(), y.numpy(), label=name)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("pre-activation v")
    ax.set_ylabel("φ(v)")
    ax.legend(fontsize=8, loc="best")


def figure_sigmoid_slopes(path) -> None:
    """Seed Figure 2: sigmoid at several slopes approaches the threshold step."""
    fig, ax = subplots(figsize=(5, 3.4))
    _activation_panel(ax, ["sigmoid", "sigmoid:2", "sigmoid:5", "sigmoid:20", "threshold"],
                      "sigmoid with slope s → threshold")
    ax.set_ylim(-0.1, 1.1)
    _save(fig, path)


def figure_extra_activations(path) -> None:
    """Seed Figure 7: the three further activations."""
    fig, axes = subplots(1, 3, figsize=(10, 3))
    for ax, name in zip(axes, ["abs", "arctan_inv", "log_abs_minus_x"]):
        _activation_panel(ax, [name], name)
    axes[2].set_ylim(-6, 4)
    _save(fig, path)


def figure_training_curves(path, histories: dict[str, list[dict]], val_name: str = "validation") -> None:
    """Seed Figure 5: training and validation loss per epoch, one panel per model."""
    n = len(histories)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, hist) in zip(axes.flat, histories.items()):
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], "o-", ms=3, label="train")
        ax.plot(ep, [h["val_loss"] for h in hist], "s--", ms=3, label=val_name)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def figure_adversarial_examples(path, x, sets: dict, eps: float, image_shape, count: int = 6) -> None:
    """Seed Figure 6: original test images and their FGSM versions from each source."""
    sources = sorted({s for s, e in sets if e == eps})
    fig, axes = subplots(1 + len(sources), count, figsize=(1.4 * count, 1.5 * (1 + len(sources))))
    rows = [("original", x)] + [(f"{s}\nε={eps:.3f}", sets[s, eps]) for s in sources]
    for r, (label, imgs) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(imgs[c].detach().cpu().reshape(image_shape).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    _save(fig, path)


def figure_transfer(path, rows: list[dict], source: str, models: list[str], title: str = "") -> None:
    """Accuracy vs ε under FGSM transferred from ``source``: OT (left) and LAP (right) panels."""
    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    for (color, marker), m in zip(_styles(len(models)), models):
        rs = sorted((r for r in rows if r["model"] == m and r["source"] == source), key=lambda r: r["eps"])
        if not rs:
            continue
        eps = [0.0] + [r["eps"] for r in rs]
        axes[0].plot(eps, [rs[0]["acc_orig"]] + [r["acc_ot"] for r in rs], "-", marker=marker, ms=4, color=color,
                     label=m)
        spread = rs[0].get("seeds", 1) > 1   # several seeds: the band is their min–max
        if spread:
            axes[0].fill_between(eps, [rs[0]["acc_orig_min"]] + [r["acc_ot_min"] for r in rs],
                                 [rs[0]["acc_orig_max"]] + [r["acc_ot_max"] for r in rs], color=color, alpha=0.15)
        if rs[0]["acc_lap"] == rs[0]["acc_lap"]:  # not NaN: trained with noise
            clean = rs[0].get("acc_orig_lap", math.nan)   # ε = 0: LAP on the clean images (older runs lack it)
            xs = eps if clean == clean else eps[1:]
            lead = (lambda f: [rs[0][f"acc_orig_lap{f[7:]}"]]) if clean == clean else (lambda f: [])
            axes[1].plot(xs, lead("acc_lap") + [r["acc_lap"] for r in rs], "-", marker=marker, ms=4, color=color,
                         label=m)
            if spread:
                axes[1].fill_between(xs, lead("acc_lap_min") + [r["acc_lap_min"] for r in rs],
                                     lead("acc_lap_max") + [r["acc_lap_max"] for r in rs], color=color, alpha=0.15)
    for ax, pred in zip(axes, ("OT (noise off)", "LAP (average of K noisy passes)")):
        ax.set_title(pred, fontsize=9)
        ax.set_xlabel("ε (L∞)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    seeds = max((r.get("seeds", 1) for r in rows), default=1)
    fig.suptitle(f"{title + ': ' if title else ''}FGSM transferred from {source}"
                 + (f" (mean over {seeds} seeds; band: min–max)" if seeds > 1 else ""), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def paper_figures(out, spec, metrics, rows, sets, x, y, headline, image_shape) -> None:
    out = Path(out)
    figure_sigmoid_slopes(out / "fig2_sigmoid_slopes.png")
    figure_extra_activations(out / "fig7_activations.png")
    histories = {}
    for m in spec.models:
        with open(out / "models" / m.name / "history.csv") as f:
            histories[m.name] = [{k: float(v) for k, v in r.items()} for r in _csv.DictReader(f)]
    figure_training_curves(out / "fig5_training_curves.png", histories,
                           "validation" if spec.val_fraction > 0 else "test")
    figure_adversarial_examples(out / "fig6_adversarial_examples.png", x, sets, headline, image_shape)
    for src in spec.sources:
        figure_transfer(out / f"transfer_{src.name}.png", rows, src.name, [m.name for m in spec.models], spec.name)


def figure_certified(path, certs: dict, y, title: str = "") -> None:
    """Certified accuracy against the L2 radius, one line per model (``certs``: name → Certificate)."""
    fig, ax = subplots(figsize=(6, 4))
    y = y.cpu()
    for (color, marker), (name, cert) in zip(_styles(len(certs)), certs.items()):
        radii = sorted({0.0, *cert.radius[(cert.prediction == y)].tolist()})
        acc = [((cert.prediction == y) & (cert.radius >= r)).double().mean().item() for r in radii]
        ax.step(radii, acc, where="post", color=color, label=f"{name} ({cert.predictor})")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title + ': ' if title else ''}certified accuracy (CERTIFY, α = "
                 f"{next(iter(certs.values())).alpha:g})", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _save(fig, path)


def figure_progress(path, series: dict[str, tuple[list[float], list[float]]], title: str = "") -> None:
    """Validation accuracy (OT) against training seconds, one line per run (``series``: label → (seconds, accuracy))."""
    fig, ax = subplots(figsize=(7, 4.5))
    for (color, _), (label, (s, acc)) in zip(_styles(len(series)), series.items()):
        ax.plot(s, acc, color=color, lw=1.2, label=label)
    ax.set_xlabel("training seconds (budget clock)")
    ax.set_ylabel("validation accuracy (OT)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    if series:        # no run evaluated on the way (a budget shorter than eval_every): no legend to draw
        ax.legend(fontsize=6, frameon=False, ncol=2)
    _save(fig, path)
