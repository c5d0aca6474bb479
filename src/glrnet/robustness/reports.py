"""Reports of the robustness protocol: robustness.csv / .md, the checks as JSON, the worst-case
figure, and the spread over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .settings import CONVERGENCE_TOLERANCE, AttackSettings
from ..utils.figures import save_figure, styles, subplots
from ..utils.files import atomic_write_csv, atomic_write_text

ROBUST_FIELDS = ["model", "attack", "eps", "acc_ot", "acc_lap", "acc_vote", "images"]


def write_reports(out: Path, rows: list[dict], checks: list[dict], headline: float,
                  st: AttackSettings, images: int, title: str = "", skipped: dict | None = None) -> None:
    """robustness.csv (every model × attack × ε), robustness.md, robustness_checks.json and
    robustness_worst_case.png (adaptive worst case against ε per model, transfer dashed). ``skipped``: per
    model, the surrogates its attack plan left out and why (a section of robustness.md)."""
    atomic_write_csv(out / "robustness.csv", rows, ROBUST_FIELDS)
    models = list(dict.fromkeys(r["model"] for r in rows))
    show = sorted({r["eps"] for r in rows if r["eps"] > 0 and r["attack"] == "worst-case"})   # every attacked ε

    def get(m, a, e, key):
        r = next((r for r in rows if r["model"] == m and r["attack"] == a and r["eps"] == e), None)
        v = None if r is None else r.get(key, math.nan)
        return "–" if v is None or v != v else f"{v:.3f}"

    def key_of(m):
        return "acc_lap" if any(r["model"] == m and r["acc_lap"] == r["acc_lap"] for r in rows) else "acc_ot"

    lines = [f"# Robustness under adaptive attacks{': ' + title if title else ''}", "",
             f"White box: weights, σ, noise family, K and the prediction rule known; the defender's noise is fresh "
             f"and secret. {'L∞' if st.norm == 'Linf' else 'L2'} ball of radius ε, images in [0, 1], {images} test images. APGD (torchattacks 3.5.1; CE and DLR losses, "
             f"{st.steps} steps, {st.restarts} restart(s)) on the defended predictor through every surrogate gradient "
             f"(`exact` autograd for smooth φ; for discontinuous φ: `gauss` the Gaussian-smoothed derivative, "
             f"`sigmoid:s` a sigmoid of slope s, `ste` straight-through, `lr` the likelihood-ratio input gradient "
             f"with {st.lr_samples} samples); EOT over {st.eot_samples} noise samples inside each gradient; "
             f"`apgd-ce[ot]` attacks the noise-free network; `[mean]` and `[moments]`: APGD without EOT on deterministic "
             f"surrogates of the noisy predictor (the mean-field network; moment propagation); FGSM; SPSA ({st.spsa_steps} steps × {st.spsa_samples} "
             f"perturbations, LAP queries with K = {st.spsa_queries_k}); {st.random_draws} random "
             f"{'corners' if st.norm == 'Linf' else 'points on the ε-sphere'}. "
             f"Every adversarial image is scored by OT and by LAP with K = {st.lap_replications}"
             + (" and by the majority vote of as many noisy passes" if st.score_vote else "") + ".", "",
             "**Worst case**: an image counts as correct only if every attack fails on it (per-image union). "
             "The defended predictor is LAP for models trained with noise, OT for the BP baseline.", "",
             "**Escalated**: the convergence check doubles steps, restarts and samples on the images that "
             "survived every attack, until one doubling breaks at most "
             f"{CONVERGENCE_TOLERANCE:g} of the images (at most {st.max_doublings} times); the last level is the "
             "protocol's claim.", "",
             "| model | predictor | " + " | ".join(f"transfer-FGSM ε={e:g}" for e in show) + " | "
             + " | ".join(f"worst case ε={e:g}" for e in show) + " | escalated (ε, level) | converged |",
             "|---|---|" + "---|" * (2 * len(show) + 2)]
    for m in models:
        conv = next((c for c in checks if c["model"] == m and "escalated" in c), None)
        for key, label in (("acc_ot", "OT"), ("acc_lap", "LAP"), ("acc_vote", "vote")):
            if all(get(m, "worst-case", e, key) == "–" for e in show):
                continue
            esc = "– | –"
            if conv is not None and conv["predictor"] == key:
                esc = (f"{conv['escalated']:.3f} (ε={conv['eps']:g}, {conv['multiplier']}×) | "
                       f"{'yes' if conv['pass'] else 'NO'}")
            lines.append(f"| {m} | {label} | " + " | ".join(get(m, "transfer-fgsm", e, key) for e in show) + " | "
                         + " | ".join(get(m, "worst-case", e, key) for e in show) + f" | {esc} |")
    lines += ["", "## Per attack (the defended predictor)", ""]
    eps_all = sorted({r["eps"] for r in rows if r["eps"] > 0})
    lines += ["| model | attack | " + " | ".join(f"ε={e:g}" for e in eps_all) + " |", "|---|---|" + "---|" * len(eps_all)]
    for m in models:
        for a in dict.fromkeys(r["attack"] for r in rows if r["model"] == m and r["attack"] != "none"):
            lines.append(f"| {m} | {a} | " + " | ".join(get(m, a, e, key_of(m)) for e in eps_all) + " |")
    left_out = [(m, what, why) for m, reasons in (skipped or {}).items() for what, why in reasons.items()]
    if left_out:
        lines += ["", "## Surrogates that do not apply", "", "| model | surrogate | why |", "|---|---|---|"]
        lines += [f"| {m} | {what} | {why} |" for m, what, why in left_out]
    lines += ["", "## Sanity checks", "", "| model | check | measured | pass |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['check']} | {c['value']} | {'yes' if c['pass'] else 'NO'} |")
    atomic_write_text(out / "robustness.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "robustness_checks.json", json.dumps(checks, indent=1, ensure_ascii=False))
    figure_worst_case(out / "robustness_worst_case.png", rows, models, {m: key_of(m) for m in models}, title)


def write_seed_spread(out: Path, rows: list[dict], checks: list[dict], base: dict, chosen: dict,
                      headline: float) -> None:
    """robustness_seeds.md: per model, the clean and the escalated worst-case accuracy at the headline ε on its
    defended predictor, mean and min–max over the seeds' runs."""
    groups: dict = {}
    for run, name in base.items():
        key = "acc_lap" if chosen[run][1] else "acc_ot"
        clean = next((r[key] for r in rows if r["model"] == run and r["attack"] == "none"), math.nan)
        esc = next((c["escalated"] for c in checks if c["model"] == run and "escalated" in c
                    and abs(c["eps"] - headline) < 1e-12), None)
        if esc is None:
            esc = next((r[key] for r in rows if r["model"] == run and r["attack"] == "worst-case"
                        and abs(r["eps"] - headline) < 1e-12), math.nan)
        groups.setdefault(name, []).append((float(clean), float(esc)))
    lines = [f"# Adaptive worst case over seeds (ε = {headline:.4f}, escalated)", "",
             "| model | seeds | clean (mean, min–max) | worst case (mean, min–max) |", "|---|---|---|---|"]
    for name, vals in groups.items():
        cells = []
        for j in (0, 1):
            v = [t[j] for t in vals]
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        lines.append(f"| {name} | {len(vals)} | {cells[0]} | {cells[1]} |")
    atomic_write_text(out / "robustness_seeds.md", "\n".join(lines) + "\n")


def figure_worst_case(path, rows: list[dict], models: list[str], keys: dict, title: str = "") -> None:
    """Adaptive worst case (solid) and transfer FGSM (dashed) against ε, one line pair per model,
    each on its defended predictor (``keys[m]``: acc_lap or acc_ot)."""
    fig, ax = subplots(figsize=(6.5, 4))
    for (color, marker), m in zip(styles(len(models)), models):
        key = keys[m]
        clean = next((r[key] for r in rows if r["model"] == m and r["attack"] == "none"), None)
        for attack, style in (("worst-case", "-"), ("transfer-fgsm", "--")):
            rs = sorted((r for r in rows if r["model"] == m and r["attack"] == attack), key=lambda r: r["eps"])
            if rs:
                ax.plot([0.0] + [r["eps"] for r in rs], [clean] + [r[key] for r in rs], style, marker=marker, ms=4,
                        color=color, label=f"{m} ({'LAP' if key == 'acc_lap' else 'OT'})" if attack == "worst-case"
                        else None)
    ax.set_xlabel("ε (L∞)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title + ': ' if title else ''}adaptive worst case (solid) vs transfer FGSM (dashed)", fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)
