"""Certified L2 radii (``[certify]``): CERTIFY for the majority vote and for LAP on every model's runs,
and, where a ``[robustness]`` table attacks them in the L2 ball, the soundness check.

On one dataset of the spec, for every model of ``[certify]`` (every seed's run):

1. train it (finished runs reused, interrupted ones resumed): e.g. GLR networks whose first layer is
   held at a fixed scale (``max_first_norm`` with the ``spectral`` or ``stiefel`` projection), and
   input-space randomized smoothing (``input_noise_std``: the same architecture behind a frozen a·I
   layer carrying Gaussian input noise, trained by BP);
2. certify it (:func:`glrnet.certify.certify`, CERTIFY with separate selection and estimation samples)
   for each predictor, on the first ``images`` test images (cached per weights and settings in
   ``certificates/``);
3. with an L2 ``[robustness]`` table over the same runs (:mod:`glrnet.experiments.protocol`): check
   soundness in every robustness report — no image certified at radius ≥ ε for a predictor is broken
   by that predictor's L2 worst case at ε;
4. write ``certified.md`` / ``.csv`` / ``certified_accuracy.png`` in the dataset's folder, and, for a spec
   of several datasets, ``certified.md`` over all of them in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import plots
from ..certify import Certificate, certified_accuracy, certify
from ..utils.files import atomic_write_csv, atomic_write_text
from ..utils.seeding import stream_seed
from .runs import Site


@dataclass
class Certified:
    """One dataset's certificates: per run, per predictor."""

    rows: list[dict]
    certs: dict[str, dict[str, Certificate]]
    y: torch.Tensor
    timings: dict
    empirical: dict = field(default_factory=dict)      # (run, predictor, ε) → L2 worst case
    checks: list[dict] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)   # what the empirical columns come from


def run_certify(site: Site) -> Certified:
    """Train and certify every run of the [certify] models on ``site``."""
    c, out = site.spec.certify, site.folder
    settings = {"n0": c.n0, "samples": c.samples, "alpha": c.alpha, "images": c.images,
                "predictors": c.predictors, "seed": c.seed}
    n_cert = min(c.images, len(site.data.x_test))
    x, y = site.data.x_test[:n_cert], site.data.y_test[:n_cert]
    rows, certs, timings = [], {}, {}
    runs = [(name, seed, run) for name in c.models for seed, run in site.runs_of(name)]
    for mi, (name, seed, run) in enumerate(runs):
        t1 = time.perf_counter()
        metrics = site.model_run(name, seed, run)
        cfg = site.config(name, seed)
        model = site.model(run)
        t2 = time.perf_counter()
        cache = out / "certificates" / f"{run}.json"
        per = _cached_certificates(cache, out / "models" / run, settings, mi, n_cert)
        if per is None:
            per = {}
            for pi, predictor in enumerate(c.predictors):
                gen = torch.Generator(device=site.device).manual_seed(stream_seed(c.seed, 30, mi, pi))
                per[predictor] = certify(model, x, n0=c.n0, n=c.samples, alpha=c.alpha, predictor=predictor,
                                         generator=gen)
            _save_certificates(cache, out / "models" / run, settings, mi, n_cert, per)
        certs[run] = per
        timings[run] = {"train_s": metrics["train_seconds"], "certify_s": time.perf_counter() - t2}
        for predictor, cert in per.items():
            acc = certified_accuracy(cert, y, [0.0] + c.radii)
            rows.append({"dataset": site.entry.name, "model": run, "label": site.spec.models[name].label,
                         "predictor": predictor, "method": cfg.method, "activation": cfg.activation, "loss": cfg.loss,
                         "clean_ot": metrics["test_accuracy_ot"], "clean_lap": metrics["test_accuracy_lap"],
                         "sigma": cert.sigma, "first_layer_norm": cert.first_layer_norm,
                         "sigma_over_norm": cert.sigma / cert.first_layer_norm,
                         "abstain": (cert.prediction < 0).double().mean().item(),
                         **{f"certified_{r:g}": acc[r] for r in [0.0] + c.radii},
                         "train_s": metrics["train_seconds"], "certify_s": timings[run]["certify_s"]})
        _write_certificates(out / "certificates" / f"{run}.csv", per, y)
        vote = next((r for r in rows[::-1] if r["model"] == run and r["predictor"] == "vote"), rows[-1])
        site.say(f"[certify] {site.entry.name}/{run}: clean LAP {metrics['test_accuracy_lap']}, σ/‖W₁‖₂ "
                 f"{vote['sigma_over_norm']:.3g}, certified at "
                 + ", ".join(f"{r:g}: {vote[f'certified_{r:g}']:.3f}" for r in c.radii)
                 + f" ({t2 - t1:.0f}s train, {time.perf_counter() - t2:.0f}s certify)")
        atomic_write_csv(out / "certified.csv", rows, list(rows[0]))
    return Certified(rows, certs, y, timings)


def soundness_hook(result: Certified, y):
    """``extra_checks`` for the protocol: each attacked run's soundness checks from its
    :class:`~glrnet.robustness.ProtocolResult` (none for a run without certificates); ``y``: the attacked
    images' labels."""
    def after(name, attacked):
        if name not in result.certs:
            return []
        eps = sorted({e for (m, e) in attacked.masks if m == name and e > 0})
        return soundness_checks(name, result.certs[name], y, attacked.masks, attacked.escalated, eps)
    return after


def record_attacks(result: Certified, rows: list[dict], checks: list[dict], what: str) -> None:
    """The L2 worst cases (escalated where the protocol escalated) of a protocol table, for the table."""
    result.empirical.update(_empirical(rows, checks))
    result.checks += checks
    result.attacks.append(what)


def write_report(site: Site, result: Certified, summary: dict) -> None:
    """certified.md and certified_accuracy.png in the dataset's folder."""
    text = _dataset_table(site, result)
    atomic_write_text(site.folder / "certified.md", text)
    plots.figure_certified(site.folder / "certified_accuracy.png",
                           {n: c["vote"] for n, c in result.certs.items() if "vote" in c}
                           or {n: next(iter(c.values())) for n, c in result.certs.items()}, result.y,
                           title=site.entry.name)
    sound = [c for c in result.checks if c["check"].startswith("sound")]
    summary.update({"rows": len(result.rows), "sound": all(c["pass"] for c in sound) if sound else None})


def write_overview(out: Path, spec) -> None:
    """certified.md over every dataset of a spec of several (those not run yet named)."""
    done = [d for d in spec.datasets if (out / d.name / "certified.md").is_file()]
    missing = [d.name for d in spec.datasets if d not in done]
    atomic_write_text(out / "certified.md", f"# Certified L2 radii: spec `{spec.name}`\n\n{spec.notes}\n\n"
                      + (f"Not run yet: {', '.join(missing)}.\n\n" if missing else "")
                      + "\n".join((out / d.name / "certified.md").read_text() for d in done))


# ---------------------------------------------------------------------------------------- checks
def soundness_checks(name: str, certs: dict[str, Certificate], y, masks: dict, escalated: dict,
                     eps_list: list[float]) -> list[dict]:
    """One check per (predictor, ε): of the attacked images certified for that predictor at radius ≥ ε
    (and correct), how many the predictor's L2 worst case at ε breaks (the escalated one where the
    protocol escalated). Any is a contradiction: a wrong certificate, or an attack that left its ball."""
    checks = []
    for predictor, cert in certs.items():
        n = min(len(y), len(cert.prediction))        # the attacked images that were certified
        for eps in eps_list:
            alive = escalated.get((name, eps)) if predictor == "lap" else None
            if alive is None:
                alive = masks[name, eps].get(predictor)
            if alive is None:
                continue
            sure = ((cert.prediction[:n] == y[:n].cpu()) & (cert.radius[:n] >= eps)).to(alive.device)
            broken = int((sure & ~alive[:n]).sum())
            checks.append({"model": name, "check": f"sound: no image certified at radius ≥ ε ({predictor}) is broken "
                                                   f"by the {predictor} worst case (ε={eps:g})",
                           "value": f"{broken} of {int(sure.sum())} certified broken", "pass": broken == 0,
                           "certified": int(sure.sum()), "broken": broken})
    return checks


def _certificate_key(run: Path, settings: dict, index: int, images: int) -> str:
    """What a model's certificates depend on: its weights (digest), the [certify] settings, its stream."""
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    return json.dumps([digest, settings, index, images], sort_keys=True)


def _cached_certificates(path: Path, run: Path, settings: dict, index: int, images: int) -> dict | None:
    """The certificates computed before for exactly these weights and settings, else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != _certificate_key(run, settings, index, images):
        return None
    return {p: Certificate(torch.tensor(c["prediction"]), torch.tensor(c["radius"], dtype=torch.float64),
                           torch.tensor(c["p_lower"], dtype=torch.float64),
                           torch.tensor(c["p_upper_other"], dtype=torch.float64), c["sigma"], c["first_layer_norm"],
                           p, c["alpha"], c["samples"]) for p, c in saved["certificates"].items()}


def _save_certificates(path: Path, run: Path, settings: dict, index: int, images: int, per: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": _certificate_key(run, settings, index, images), "certificates": {
        p: {"prediction": c.prediction.tolist(), "radius": c.radius.tolist(), "p_lower": c.p_lower.tolist(),
            "p_upper_other": c.p_upper_other.tolist(), "sigma": c.sigma, "first_layer_norm": c.first_layer_norm,
            "alpha": c.alpha, "samples": c.samples} for p, c in per.items()}}))


def _write_certificates(path: Path, per: dict[str, Certificate], y) -> None:
    rows = []
    for i in range(len(y)):
        row = {"image": i, "label": int(y[i])}
        for p, c in per.items():
            row.update({f"{p}_prediction": int(c.prediction[i]), f"{p}_radius": float(c.radius[i]),
                        f"{p}_p_lower": float(c.p_lower[i])})
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(path, rows, list(rows[0]))


def _empirical(rows: list[dict], checks: list[dict]) -> dict:
    """(model, predictor, ε) → the worst case (escalated where it was) of the L2 protocol."""
    out = {}
    for r in rows:
        if r["attack"] == "worst-case":
            for p in ("ot", "lap", "vote"):
                v = r.get(f"acc_{p}", math.nan)
                if v == v:
                    out[r["model"], p, r["eps"]] = v
    for c in checks:
        if "escalated" in c:
            out[c["model"], c["predictor"].removeprefix("acc_"), c["eps"]] = c["escalated"]
    return out


def _dataset_table(site: Site, result: Certified) -> str:
    c = site.spec.certify
    radii = c.radii
    n_cert = len(result.y)
    lines = [f"## {site.entry.name}: {site.data.summary()}", "",
             f"CERTIFY (Cohen et al. 2019): n0 = {c.n0}, n = {c.samples}, α = {c.alpha:g}, on the first "
             f"{n_cert} test images; radius σ/‖W₁‖₂ · Φ⁻¹(p̲_A) (vote, Clopper–Pearson) or σ/‖W₁‖₂ · (Φ⁻¹(p̲_A) − "
             f"Φ⁻¹(p̄_B))/2 (LAP, Hoeffding). Clean accuracy: LAP (K from the run) on the whole test set. "
             + (f"Empirical: the L2 adaptive worst case ({'; '.join(result.attacks)}), escalated where the protocol "
                "escalated, for the same predictor." if result.attacks else "No L2 attacks were run."), "",
             "| model | predictor | clean (LAP) | σ/‖W₁‖₂ | abstain | "
             + " | ".join(f"certified r={r:g}" for r in radii) + " | "
             + " | ".join(f"empirical ε={r:g}" for r in radii) + " | train s |",
             "|---|---|---|---|---|" + "---|" * (2 * len(radii) + 1)]
    for r in result.rows:
        emp = [result.empirical.get((r["model"], r["predictor"], e)) for e in radii]
        clean = r["clean_lap"] if r["clean_lap"] is not None else r["clean_ot"]
        lines.append(f"| {r['label']} | {r['predictor']} | {clean:.3f} | {r['sigma_over_norm']:.3g} | "
                     f"{r['abstain']:.3f} | " + " | ".join(f"{r[f'certified_{q:g}']:.3f}" for q in radii) + " | "
                     + " | ".join("–" if v is None else f"{v:.3f}" for v in emp) + f" | {r['train_s']:.0f} |")
    sound = [x for x in result.checks if x["check"].startswith("sound")]
    if sound:
        broken = sum(x["broken"] for x in sound)
        certified = sum(x["certified"] for x in sound)
        lines += ["", f"Soundness: {broken} of {certified} (image, ε, predictor) certificates broken by the L2 "
                      f"worst case ({'sound' if broken == 0 else 'CONTRADICTION: see robustness.md'})."]
    train_s = sum(t["train_s"] for t in result.timings.values())
    cert_s = sum(t["certify_s"] for t in result.timings.values())
    lines += ["", f"Wall times: training {train_s:.0f} s (all models), certification {cert_s:.0f} s.", ""]
    return "\n".join(lines)
