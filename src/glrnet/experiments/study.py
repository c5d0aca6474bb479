"""The technique study: which variance technique lets GLR train a CNN, measured side by side with the
forward-only alternatives and back-propagation. Every technique is a ``[[models]]`` entry (training
options over ``[defaults]``: the estimator's parts, the perturbation site, scale-aware noise,
normalisation, or another gradient producer: ``method = "es" | "spsa" | "forward" | "bp"``).

``[quality]`` — gradient quality per noisy layer at an equal budget of noisy forward passes per input
(K = ``budget``): on one fixed batch and the initial weights, ``samples`` independent estimates of each
technique, for each unit and loss; per layer the noise-to-signal ratio

    NSR = √(tr Cov ĝ) / ‖E ĝ‖,   ‖E ĝ‖² estimated by ‖ḡ‖² − tr Cov ĝ / n (unbiased),

and the cosine of one estimate with the true gradient of the technique's own objective,
E cos ≈ 1/√(1 + NSR²) (exact to first order in 1/n); plus, where back-propagation applies (smooth
units, cross-entropy), the cosine of the mean estimate with the BP gradient of the noise-free network.
Writes ``quality.md`` / ``quality.csv`` (finished combinations cached in ``quality_cache.json``).

``[[time_to_accuracy]]`` — accuracy after a fixed training time: each run of the group trained to the
group's budget (``seconds`` of ``clock`` time) with the validation accuracy every ``eval_every`` steps,
into ``<out>/<group>/<dataset>/runs/<run>/``; ``<out>/<group>/training_<dataset>.md`` / ``.csv``
(test accuracy, steps, seconds to each threshold) and ``progress_<dataset>.png``. ``final_quality =
[K, ...]``: the per-layer NSR at each run's trained weights at those budgets
(``quality_final_<dataset>.md``: what limits a run at its end, and how it scales with K).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import plots
from ..nn.activations import is_smooth
from ..utils.files import atomic_write_csv, atomic_write_text
from ..utils.seeding import stream_seed
from ..estimators import Backprop, glr_parameters
from ..nn import noisy_layers, rescale_noise_
from ..nn.losses import DIFFERENTIABLE
from ..train import TrainConfig, build_producer
from .runs import Site, initial_model
from .spec import Spec


def applicable(cfg: TrainConfig) -> str | None:
    """Why a technique cannot run on this (unit, loss), or None."""
    if cfg.method in ("bp", "forward") and not is_smooth(cfg.activation):
        return f"{cfg.method} needs differentiable units"
    if cfg.method in ("bp", "forward") and cfg.loss not in DIFFERENTIABLE:
        return f"{cfg.method} needs a differentiable loss"
    return None


def _one_estimate(producer, model, x, y) -> list[torch.Tensor]:
    """One gradient estimate per noisy layer, flattened: [(P_l,)] in glr_parameters order."""
    if isinstance(producer, Backprop):
        model.zero_grad(set_to_none=True)
        producer.backward(model, x, y)
        flat = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()   # e.g. a local-loss head
                for group in glr_parameters(model) for p in group]
    else:
        flat, _ = producer.estimate(model, x, y)
    out, it = [], iter(flat)
    for group in glr_parameters(model):
        out.append(torch.cat([next(it).reshape(-1) for _ in group]) if group else torch.zeros(0))
    return out


def gradient_quality(cfg: TrainConfig, data, x, y, samples: int, model=None) -> dict:
    """Per noisy layer: NSR, implied cosine, seconds per estimate (and cos to BP where BP applies);
    at the initial weights of ``cfg``, or at ``model``'s (e.g. a trained network)."""
    model = initial_model(cfg, data) if model is None else model
    if cfg.relative_noise is not None or cfg.relative_weight_noise is not None:
        rescale_noise_(model, x, cfg.relative_noise, cfg.relative_weight_noise)
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 4))
    producer = build_producer(cfg, gen)
    _one_estimate(producer, model, x, y)            # warm-up (buffers), not timed
    t0 = time.perf_counter()
    draws = [_one_estimate(producer, model, x, y) for _ in range(samples)]
    seconds = (time.perf_counter() - t0) / samples
    bp = None
    if is_smooth(cfg.activation) and cfg.loss in DIFFERENTIABLE:
        bp = _one_estimate(Backprop(cfg.loss), model, x, y)
    layers = []
    names = [f"{type(m).__name__.replace('Noisy', '')}{i}" for i, m in enumerate(noisy_layers(model))]
    for li in range(len(draws[0])):
        g = torch.stack([d[li] for d in draws]).double()
        if g.shape[1] == 0:
            continue
        mean, trace = g.mean(0), g.var(0).sum().item() if samples > 1 else 0.0
        signal2 = max(mean.pow(2).sum().item() - trace / samples, 0.0)
        nsr = math.sqrt(trace) / math.sqrt(signal2) if signal2 > 0 else math.inf
        row = {"layer": names[li], "params": g.shape[1], "nsr": nsr,
               "cos_true": 1 / math.sqrt(1 + nsr**2) if math.isfinite(nsr) else 0.0,
               "cos_bp": math.nan}
        if bp is not None:
            row["cos_bp"] = torch.nn.functional.cosine_similarity(mean, bp[li].double(), dim=0).item()
        layers.append(row)
    return {"layers": layers, "seconds_per_estimate": seconds}


def quality_key(cfg: TrainConfig, samples: int, batch: int) -> str:
    """What one [quality] estimate depends on: the whole run configuration (but where it runs and
    where its data lie), the number of estimates and the batch."""
    setting = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "data_dir")}
    return json.dumps([setting, samples, batch], sort_keys=True, default=str)


def quality_config(spec: Spec, model: str, unit: str, loss: str, data_dir: str | None = None,
                   device: str = "cpu") -> TrainConfig:
    """The [quality] estimate's configuration: the model on ``unit`` and ``loss`` at the budget K,
    split evenly over the layers where it injects layer by layer (unvalidated)."""
    dataset = next(d for d in spec.datasets if d.name == spec.quality.dataset)
    return spec.config(model, dataset, data_dir, activation=unit, loss=loss, replications=spec.quality.budget,
                       layer_replications=None, device=device)


def run_quality(site: Site) -> int:
    """The [quality] analysis on ``site``'s data; the rows written."""
    q, out = site.spec.quality, site.out
    x, y = site.data.x_train[:q.batch], site.data.y_train[:q.batch]
    rows = []
    cache_file = out / "quality_cache.json"      # finished combinations, keyed by everything they depend on
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for unit in q.units:
        for loss in q.losses:
            for name in q.models:
                cfg = quality_config(site.spec, name, unit, loss, site.data_dir, site.device)
                if applicable(cfg) is not None:
                    continue
                cfg.validate()
                t0 = time.perf_counter()
                key = quality_key(cfg, q.samples, q.batch)
                res = cache.get(key) or gradient_quality(cfg, site.data, x, y, q.samples)
                cache[key] = res
                atomic_write_text(cache_file, json.dumps(cache))
                rows += [{"technique": name, "unit": unit, "loss": loss, **r,
                          "seconds_per_estimate": res["seconds_per_estimate"]} for r in res["layers"]]
                site.say(f"[quality] {name} {unit} {loss}: NSR "
                         + ", ".join(f"{r['layer']} {r['nsr']:.3g}" for r in res["layers"])
                         + f" ({res['seconds_per_estimate'] * 1000:.0f} ms/estimate, {time.perf_counter() - t0:.0f}s)")
                atomic_write_csv(out / "quality.csv", rows, list(rows[0]))
    atomic_write_text(out / "quality.md", _quality_table(site, rows))
    return len(rows)


def _quality_table(site: Site, rows: list[dict]) -> str:
    q = site.spec.quality
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [f"# Gradient quality per layer at an equal budget ({q.dataset}, one batch of {q.batch}, initial weights)",
             "", f"K = {q.budget} noisy forward passes per input for every technique (ES: population K; SPSA: "
             f"K/2 directions × 2; forward gradient: K tangents); {q.samples} independent estimates each. "
             "NSR = √(tr Cov ĝ)/‖E ĝ‖ per layer (signal corrected for the finite sample); cos = 1/√(1 + NSR²), "
             "the expected cosine of one estimate with the true gradient of the technique's own objective "
             "(\"> √n\": the mean of the n estimates does not resolve the signal, ‖ḡ‖² ≤ tr Cov/n); "
             "cos BP: the mean estimate against the BP gradient of the noise-free network (smooth units, CE only).", "",
             "| technique | unit | loss | " + " | ".join(f"{l} NSR / cos" for l in layers)
             + " | cos BP (last layer) | ms / estimate |",
             "|---|---|---|" + "---|" * (len(layers) + 2)]
    bound = math.sqrt(q.samples)   # a signal below the noise of the mean: NSR ≳ √n
    for tech, unit, loss in dict.fromkeys((r["technique"], r["unit"], r["loss"]) for r in rows):
        rs = {r["layer"]: r for r in rows if (r["technique"], r["unit"], r["loss"]) == (tech, unit, loss)}
        cells = ["–" if l not in rs else f"{rs[l]['nsr']:.3g} / {rs[l]['cos_true']:.3f}" if math.isfinite(rs[l]["nsr"])
                 else f"> {bound:.1f} / < {1 / math.sqrt(1 + bound**2):.2f}" for l in layers]
        last = rs.get(layers[-1])
        cos_bp = "–" if last is None or last["cos_bp"] != last["cos_bp"] else f"{last['cos_bp']:.3f}"
        ms = next(iter(rs.values()))["seconds_per_estimate"] * 1000
        lines.append(f"| {site.spec.models[tech].label} | {unit} | {loss} | " + " | ".join(cells)
                     + f" | {cos_bp} | {ms:.0f} |")
    return "\n".join(lines) + "\n"


def run_group(site: Site, group) -> list[dict]:
    """One [[time_to_accuracy]] group on ``site``: each run to its time budget (resumable), then the tables."""
    spec, dname, folder = site.spec, site.entry.name, site.out / group.name
    rows = []
    for run in group.runs:
        cfg = spec.timed_config(group, run, site.entry, site.data_dir, device=site.device)
        run_dir = site.timed_dir(group.name, run.name)
        m = site.train(cfg, run_dir, f"{dname}/{group.name}/{run.name}")
        progress = read_progress(run_dir / "progress.csv")
        row = {"dataset": dname, "run": run.name, "technique": run.model, "unit": cfg.activation, "loss": cfg.loss,
               "test_ot": m["test_accuracy_ot"], "test_lap": m["test_accuracy_lap"],
               "steps": m.get("steps"), "train_s": m["train_seconds"], "budget_s": m.get("budget_seconds"),
               "best_val_ot": max((p["val_acc_ot"] for p in progress), default=math.nan)}
        for thr in group.thresholds:
            hit = next((p["budget_seconds"] for p in progress if p["val_acc_ot"] >= thr), None)
            row[f"s_to_{thr:g}"] = math.nan if hit is None else hit
        rows.append(row)
        site.say(f"[{group.name}] {dname} {run.name}: test OT {row['test_ot']:.4f}"
                 + (f" LAP {row['test_lap']:.4f}" if row["test_lap"] is not None else "")
                 + f" after {row['train_s']:.0f}s ({row['steps']} steps)")
        atomic_write_csv(folder / f"training_{dname}.csv", rows, list(rows[0]))
    atomic_write_text(folder / f"training_{dname}.md", _training_table(site, group, rows))
    series = progress_series(folder / dname / "runs", [r.name for r in group.runs])
    plots.figure_progress(folder / f"progress_{dname}.png", series, f"{dname}: accuracy against training time")
    if group.final_quality:
        final_quality(site, group)
    return rows


def final_quality(site: Site, group) -> None:
    """What limits a trained run: per-layer NSR at its final weights, at each budget K of
    ``final_quality`` (NSR ∝ 1/√K tells how many noisy passes a useful step would need). Cached per
    (run, K) beside the run, since a run's weights do not change once it is finished."""
    dname, samples = site.entry.name, group.final_samples
    x, y = site.data.x_train[:32], site.data.y_train[:32]
    rows = []
    for run in group.runs:
        run_dir = site.timed_dir(group.name, run.name)
        base = site.spec.timed_config(group, run, site.entry, site.data_dir, device=site.device)
        if base.method == "bp":
            continue
        for K in group.final_quality:
            cache = run_dir / f"quality_final_K{K}.json"
            if cache.is_file():
                res = json.loads(cache.read_text())
            else:
                cfg = site.spec.timed_config(group, run, site.entry, site.data_dir, device=site.device,
                                             replications=int(K), layer_replications=None).validate()
                res = gradient_quality(cfg, site.data, x, y, samples, model=site.load(run_dir))
                atomic_write_text(cache, json.dumps(res))
            rows += [{"run": run.name, "unit": base.activation, "loss": base.loss, "K": K, **r,
                      "seconds_per_estimate": res["seconds_per_estimate"]} for r in res["layers"]]
            site.say(f"[final quality] {dname} {run.name} K={K}: NSR "
                     + ", ".join(f"{r['layer']} {r['nsr']:.3g}" for r in res["layers"]))
    if not rows:
        return
    folder = site.out / group.name
    atomic_write_csv(folder / f"quality_final_{dname}.csv", rows, list(rows[0]))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [f"# Gradient quality at the trained weights ({dname}; one batch of 32, {samples} estimates each)", "",
             "Per noisy layer NSR = √(tr Cov ĝ)/‖E ĝ‖ and cos = 1/√(1 + NSR²) at the end of each run, for each "
             "budget K of noisy forward passes per input (the run trained at its own K).", "",
             "| run | unit | loss | K | " + " | ".join(f"{l} NSR / cos" for l in layers) + " | ms / estimate |",
             "|---|---|---|---|" + "---|" * (len(layers) + 1)]
    for key in dict.fromkeys((r["run"], r["unit"], r["loss"], r["K"]) for r in rows):
        rs = {r["layer"]: r for r in rows if (r["run"], r["unit"], r["loss"], r["K"]) == key}
        cells = ["–" if l not in rs else f"{rs[l]['nsr']:.3g} / {rs[l]['cos_true']:.3f}" for l in layers]
        ms = next(iter(rs.values()))["seconds_per_estimate"] * 1000
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {ms:.0f} |")
    atomic_write_text(folder / f"quality_final_{dname}.md", "\n".join(lines) + "\n")


def read_progress(path: Path) -> list[dict]:
    """A run's progress.csv (validation accuracy along the way) as rows of floats; [] if it has none."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [{k: float(v) for k, v in zip(keys, line.split(","))} for line in lines[1:]]


def progress_series(runs: Path, names: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Each run's (budget seconds, validation accuracy OT) from ``runs/<name>/progress.csv``, by name;
    runs without one left out."""
    out = {}
    for name in names:
        p = read_progress(runs / name / "progress.csv")
        if p:
            out[name] = ([q["budget_seconds"] for q in p], [q["val_acc_ot"] for q in p])
    return out


def _training_table(site: Site, group, rows: list[dict]) -> str:
    thr = group.thresholds
    lines = [f"# Accuracy after {group.seconds:g} s of training ({site.entry.name}; {group.clock} time; "
             f"`[[time_to_accuracy]] {group.name}`)", "",
             "One process and one torch thread per run; the budget is "
             + ("the process's CPU time (other jobs may share the machine; the wall time of each run is beside it)"
                if group.clock == "cpu" else "wall time") + ". Validation accuracy (OT) every "
             f"{group.eval_every} steps; budget seconds until it first reaches each threshold.", "",
             "| run | technique | unit | loss | test OT | test LAP | best val OT | steps | wall s | "
             + " | ".join(f"s to {t:g}" for t in thr) + " |", "|---|---|---|---|---|---|---|---|---|" + "---|" * len(thr)]
    for r in rows:
        lap = "–" if r["test_lap"] is None else f"{r['test_lap']:.3f}"
        lines.append(f"| {r['run']} | {site.spec.models[r['technique']].label} | {r['unit']} | {r['loss']} | "
                     f"{r['test_ot']:.3f} | {lap} | {r['best_val_ot']:.3f} | {r['steps']} | {r['train_s']:.0f} | "
                     + " | ".join("–" if r[f"s_to_{t:g}"] != r[f"s_to_{t:g}"] else f"{r[f's_to_{t:g}']:.0f}"
                                  for t in thr) + " |")
    return "\n".join(lines) + "\n"
