"""Figures (matplotlib, headless): training curves and the paper's figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> None:
    from .checkpoint import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(history: list[dict], path, title: str = "") -> None:
    """Training and validation loss per epoch (the seed's Figure 5), with validation accuracy."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    ax.plot(epochs, [h["val_loss"] for h in history], "s--", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_acc_ot"] for h in history], color="gray", alpha=0.6, label="validation accuracy (OT)")
    ax2.set_ylabel("accuracy", color="gray")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _activation_panel(ax, names, title):
    import torch

    from .activations import get_activation
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
    ax.legend(fontsize=8)


def figure_sigmoid_slopes(path) -> None:
    """Seed Figure 2: sigmoid at several slopes approaches the threshold step."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _activation_panel(ax, ["sigmoid", "sigmoid:2", "sigmoid:5", "sigmoid:20", "threshold"],
                      "sigmoid with slope s → threshold")
    ax.set_ylim(-0.1, 1.1)
    _save(fig, path)


def figure_extra_activations(path) -> None:
    """Seed Figure 7: the three further activations."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, name in zip(axes, ["abs", "arctan_inv", "log_abs_minus_x"]):
        _activation_panel(ax, [name], name)
    axes[2].set_ylim(-6, 4)
    _save(fig, path)


def figure_training_curves(path, histories: dict[str, list[dict]]) -> None:
    """Seed Figure 5: training and validation loss per epoch, one panel per model."""
    n = len(histories)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, hist) in zip(axes.flat, histories.items()):
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], "o-", ms=3, label="train")
        ax.plot(ep, [h["val_loss"] for h in hist], "s--", ms=3, label="validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def figure_adversarial_examples(path, x, sets: dict, eps: float, image_shape, count: int = 6) -> None:
    """Seed Figure 6: original test images and their FGSM versions from each source."""
    sources = sorted({s for s, e in sets if e == eps})
    fig, axes = plt.subplots(1 + len(sources), count, figsize=(1.4 * count, 1.5 * (1 + len(sources))))
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


def figure_robustness_curves(path, rows: list[dict], sources: list[str], models: list[str]) -> None:
    """Accuracy vs ε per model under each transferred source, OT (solid) and LAP (dashed)."""
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, src in zip(axes.flat, sources):
        for i, m in enumerate(models):
            rs = sorted((r for r in rows if r["model"] == m and r["source"] == src), key=lambda r: r["eps"])
            eps = [0.0] + [r["eps"] for r in rs]
            ax.plot(eps, [rs[0]["acc_orig"]] + [r["acc_ot"] for r in rs], "-", color=cmap(i % 10), label=m)
            if rs and rs[0]["acc_lap"] == rs[0]["acc_lap"]:  # not NaN
                ax.plot(eps[1:], [r["acc_lap"] for r in rs], "--", color=cmap(i % 10))
        ax.set_title(f"FGSM transferred from {src} (solid OT, dashed LAP)", fontsize=9)
        ax.set_xlabel("ε")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def paper_figures(out, spec, metrics, rows, sets, x, y, headline, image_shape) -> None:
    import csv as _csv
    out = Path(out)
    figure_sigmoid_slopes(out / "fig2_sigmoid_slopes.png")
    figure_extra_activations(out / "fig7_activations.png")
    histories = {}
    for m in spec.models:
        with open(out / "models" / m.name / "history.csv") as f:
            histories[m.name] = [{k: float(v) for k, v in r.items()} for r in _csv.DictReader(f)]
    figure_training_curves(out / "fig5_training_curves.png", histories)
    figure_adversarial_examples(out / "fig6_adversarial_examples.png", x, sets, headline, image_shape)
    figure_robustness_curves(out / "robustness_curves.png", rows, [s.name for s in spec.sources],
                             [m.name for m in spec.models])
