"""The scale study (a spec whose ``[experiment]`` has ``kind = "scale"``): which variance technique
lets GLR train a CNN, measured side by side with the forward-only alternatives and back-propagation.

Every *technique* is a set of training options (:class:`~glrnet.train.TrainConfig`) over the spec's
``[defaults]``: the estimator's parts (baseline, sampler, injection), the perturbation site
(``weight_noise``), scale-aware noise (``relative_noise``), normalisation (``norm``), or another
gradient producer (``method = "es" | "spsa" | "forward" | "bp"``); ``like = "<earlier technique>"``
starts from that technique's options instead (a variant states only what it changes). Two measurements:

1. ``[quality]`` — gradient quality per noisy layer at an equal budget of noisy forward passes per
   input (K = ``budget``): on one fixed batch and the initial weights, ``samples`` independent
   estimates of each technique; per layer the noise-to-signal ratio

       NSR = √(tr Cov ĝ) / ‖E ĝ‖,   ‖E ĝ‖² estimated by ‖ḡ‖² − tr Cov ĝ / n (unbiased),

   and the cosine of one estimate with the true gradient of the technique's own objective,
   E cos ≈ 1/√(1 + NSR²) (exact to first order in 1/n); plus, where back-propagation applies
   (smooth units, cross-entropy), the cosine of the mean estimate with the BP gradient of the
   noise-free network. Each technique's own objective: E[L] of the noisy network (GLR), E[L with
   noise in layer l only] (layer-wise), E[L(θ + e)] (weight site, ES), L (SPSA, forward gradient, BP).
2. ``[training]`` — accuracy after a fixed training time (``seconds``) per (technique, unit, loss),
   with the validation accuracy every ``eval_every`` steps (time to accuracy against BP). A spec may
   have several: ``[[training]]`` tables, each but one with a ``name`` (its outputs go into
   ``out/<name>/``) and optionally ``datasets`` (the [[datasets]] names it runs on); a technique's own
   ``epochs`` wins over the section's (a cosine schedule spans the technique's epochs).
   ``final_quality = [K, ...]``: after the runs, the per-layer NSR at each run's trained weights at
   those budgets (what limits a run at its end, and how it scales with K).
3. ``[[robustness]]`` — the adaptive-attack protocol (docs/robustness.md) on trained runs, after all
   the training: ``runs = [[section, technique, unit, loss], ...]`` (``section`` "" for the unnamed
   [training]), optionally a transfer ``source`` run named the same way, ``eps``, ``headline``,
   ``images`` and ``settings`` (:class:`~glrnet.attack_settings.AttackSettings` fields); outputs in
   ``out/robustness-cnn/<name>/``, every attack journaled, so an interrupted reproduce resumes it.

``glrnet reproduce --spec scale --data-dir ../shared/data --out results/scale`` writes
``quality.csv`` / ``quality.md``, ``training.csv`` / ``training.md``, ``progress_<dataset>.png`` and,
per [[robustness]], ``robustness-cnn/<name>/robustness.md`` (with its CSV, checks and figure).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .activations import is_smooth
from .checkpoint import atomic_write_csv, atomic_write_text, write_index
from .data import load_dataset
from .distributed import stream_seed
from .estimators import Backprop, glr_parameters
from .layers import noisy_layers, rescale_noise_
from .losses import DIFFERENTIABLE
from .train import TrainConfig, build_model, build_producer, train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SECTIONS = ("experiment", "datasets", "defaults", "techniques", "quality", "training", "robustness")
QUALITY_KEYS = ("dataset", "units", "losses", "budget", "samples", "batch", "techniques")
TRAINING_KEYS = ("name", "datasets", "seconds", "clock", "eval_every", "runs", "thresholds", "epochs",
                 "final_quality", "final_samples")
ROBUSTNESS_KEYS = ("name", "dataset", "runs", "source", "eps", "headline", "images", "settings")


def is_scale_spec(path: Path) -> bool:
    try:
        return tomllib.loads(Path(path).read_text()).get("experiment", {}).get("kind") == "scale"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def applicable(cfg: TrainConfig) -> str | None:
    """Why a technique cannot run on this (unit, loss), or None."""
    if cfg.method in ("bp", "forward") and not is_smooth(cfg.activation):
        return f"{cfg.method} needs differentiable units"
    if cfg.method in ("bp", "forward") and cfg.loss not in DIFFERENTIABLE:
        return f"{cfg.method} needs a differentiable loss"
    return None


def load_scale_spec(path: str | Path) -> dict:
    """Read and check a scale spec (every technique × unit × loss validated before anything runs)."""
    from .certification import _data_options
    path = Path(path)
    raw = tomllib.loads(path.read_text())

    def check(table, valid, where):
        bad = sorted(set(table) - set(valid))
        if bad:
            raise ValueError(f"spec {path}: unknown key(s) {', '.join(bad)} in {where}; valid: {', '.join(valid)}")

    check(raw, SECTIONS, "the file (sections)")
    check(raw.get("quality", {}), QUALITY_KEYS, "[quality]")
    trainings = raw.get("training", [])
    trainings = [trainings] if isinstance(trainings, dict) else list(trainings)   # [training] or [[training]]
    names = [t.get("name", "") for t in trainings]
    for t in trainings:
        check(t, TRAINING_KEYS, "[training]" + (f" {t['name']!r}" if t.get("name") else ""))
    if len(set(names)) != len(names):
        raise ValueError(f"spec {path}: every [[training]] needs its own name (at most one without), got {names}")
    datasets = raw.get("datasets", [])
    if not datasets:
        raise ValueError(f"spec {path}: a scale spec needs at least one [[datasets]]")
    techniques = {}
    for t in raw.get("techniques", []):
        t = dict(t)
        if "name" not in t:
            raise ValueError(f"spec {path}: every [[techniques]] needs a name")
        name, label, like = t.pop("name"), t.pop("label", None), t.pop("like", None)
        if like is not None and like not in techniques:
            raise ValueError(f"spec {path}, technique {name!r}: like = {like!r} names no earlier [[techniques]] entry")
        opts = {**raw.get("defaults", {}), **(techniques[like][1] if like else {}), **t}   # like: its options, then these
        try:
            TrainConfig.from_dict({**opts, **_data_options(datasets[0], None)}).validate()
        except ValueError as e:
            raise ValueError(f"spec {path}, technique {name!r}: {e}") from None
        techniques[name] = (label or name, opts)
    q = raw.get("quality", {})
    for name in q.get("techniques", list(techniques)):
        if name not in techniques:
            raise ValueError(f"spec {path}: [quality] technique {name!r} is not a [[techniques]] entry")
    for tr in trainings:
        for dname in tr.get("datasets", []):
            if dname not in [d.get("name") for d in datasets]:
                raise ValueError(f"spec {path}: [training] datasets name {dname!r}, which is not a [[datasets]] name")
        for run in tr.get("runs", []):
            if len(run) != 3 or run[0] not in techniques:
                raise ValueError(f"spec {path}: [training] runs take [technique, unit, loss], got {run!r}")
    robustness = raw.get("robustness", [])
    for rb in [robustness] if isinstance(robustness, dict) else robustness:
        _check_robustness(path, rb, trainings, datasets, check)
    return {"name": raw.get("experiment", {}).get("name", path.stem), "notes": raw.get("experiment", {}).get("notes", ""),
            "datasets": datasets, "techniques": techniques, "quality": q, "training": trainings,
            "robustness": [robustness] if isinstance(robustness, dict) else list(robustness)}


def _check_robustness(path: Path, rb: dict, trainings: list[dict], datasets: list[dict], check) -> None:
    """A [[robustness]] table names trained runs of this spec and valid attack settings (before anything runs)."""
    where = "[[robustness]]" + (f" {rb['name']!r}" if rb.get("name") else "")
    check(rb, ROBUSTNESS_KEYS, where)
    for key in ("name", "dataset", "runs"):
        if not rb.get(key):
            raise ValueError(f"spec {path}: {where} needs {key}")
    if rb["dataset"] not in [d.get("name") for d in datasets]:
        raise ValueError(f"spec {path}: {where} dataset {rb['dataset']!r} is not a [[datasets]] name")
    for run in list(rb["runs"]) + ([rb["source"]] if rb.get("source") else []):
        section = next((t for t in trainings if t.get("name", "") == (run[0] if run else None)), None)
        if len(run) != 4 or section is None or list(run[1:]) not in [list(r) for r in section.get("runs", [])] \
                or rb["dataset"] not in section.get("datasets", [rb["dataset"]]):
            raise ValueError(f"spec {path}: {where} runs and source take [section, technique, unit, loss] of a "
                             f"[[training]] run on {rb['dataset']!r}, got {run!r}")
    try:
        _settings(rb)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {path}: {where} settings: {e}") from None


def run_name(tech: str, unit: str, loss: str) -> str:
    """A run's folder: ``<technique>-<unit>-<loss>``, a unit's ':' as '_' (``centered_threshold``)."""
    return f"{tech}-{unit.replace(':', '_')}-{loss}"


def _config(opts: dict, data_opts: dict, **over) -> TrainConfig:
    """The technique's config on a dataset, unvalidated (``applicable`` first, then ``validate``)."""
    return TrainConfig.from_dict({**opts, **data_opts, **over})


def _initial_model(cfg: TrainConfig, data):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, 0))
        return build_model(cfg, data.image_shape, data.num_classes)


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
    model = _initial_model(cfg, data) if model is None else model
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


def run_scale(spec_file: str | Path, out: str | Path, data_dir: str | None = None, device: str = "cpu",
              quiet: bool = False, only: str | None = None, export: str | Path | None = None) -> dict:
    """Run a scale spec into ``out`` (module docstring); ``only``: the [[datasets]] of that dataset."""
    from .certification import _data_options
    from .experiments import export_results, output_folder
    t_start = time.perf_counter()
    spec = load_scale_spec(spec_file)
    out = output_folder(out, spec_file)
    techniques, q, tr = spec["techniques"], spec["quality"], spec["training"]
    datasets = {d["name"]: d for d in spec["datasets"]}
    loaded = {}

    def data_of(name):
        if name not in loaded:
            d = datasets[name]
            o = _data_options(d, data_dir)
            loaded[name] = (o, load_dataset(o["dataset"], o["data_dir"], o["image_size"], o["val_fraction"],
                                            subset=o["subset"], split=o["split"]).to(device))
        return loaded[name]

    summary = {"spec": spec["name"]}
    # ---- 1. gradient quality at equal budget
    qname = q.get("dataset", spec["datasets"][0]["name"])
    if q and (only is None or only in (qname, datasets[qname]["dataset"])):
        o, data = data_of(qname)
        B = int(q.get("batch", 32))
        x, y = data.x_train[:B], data.y_train[:B]
        rows = []
        cache_file = out / "quality_cache.json"      # finished combinations, keyed by everything they depend on
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        for unit in q.get("units", ["threshold", "sigmoid"]):
            for loss in q.get("losses", ["cross_entropy"]):
                for name in q.get("techniques", list(techniques)):
                    label, opts = techniques[name]
                    cfg = _config(opts, o, activation=unit, loss=loss, replications=int(q.get("budget", 100)),
                                  layer_replications=None, device=device)    # equal budget: K split evenly
                    if applicable(cfg) is not None:
                        continue
                    cfg.validate()
                    t0 = time.perf_counter()
                    setting = {k: v for k, v in q.items() if k != "techniques"}   # what this estimate depends on
                    key = json.dumps([setting, opts, o, unit, loss], sort_keys=True, default=str)
                    res = cache.get(key) or gradient_quality(cfg, data, x, y, int(q.get("samples", 60)))
                    cache[key] = res
                    atomic_write_text(cache_file, json.dumps(cache))
                    for r in res["layers"]:
                        rows.append({"technique": name, "unit": unit, "loss": loss, **r,
                                     "seconds_per_estimate": res["seconds_per_estimate"]})
                    if not quiet:
                        print(f"[quality] {name} {unit} {loss}: NSR "
                              + ", ".join(f"{r['layer']} {r['nsr']:.3g}" for r in res["layers"])
                              + f" ({res['seconds_per_estimate'] * 1000:.0f} ms/estimate, "
                                f"{time.perf_counter() - t0:.0f}s)", flush=True)
                    atomic_write_csv(out / "quality.csv", rows, list(rows[0]))
        atomic_write_text(out / "quality.md", _quality_table(spec, rows, qname, B))
        summary["quality_rows"] = len(rows)
    # ---- 2. accuracy after a fixed training time (each [[training]]: a named one into out/<name>/)
    for tr in spec["training"]:
        for dname, d in datasets.items():
            if (only is None or only in (dname, d["dataset"])) and tr.get("runs") \
                    and dname in tr.get("datasets", [dname]):
                _train_section(spec, tr, out / tr["name"] if tr.get("name") else out, dname, *data_of(dname),
                               device, quiet)
    # ---- 3. the adaptive-attack protocol on trained runs
    for rb in spec["robustness"]:
        if only is None or only in (rb["dataset"], datasets[rb["dataset"]]["dataset"]):
            _robustness(rb, out, data_of(rb["dataset"])[1], device, quiet)
    summary["seconds"] = time.perf_counter() - t_start
    atomic_write_text(out / ("summary.json" if only is None else f"summary-{only}.json"),
                      json.dumps(summary, indent=1))
    write_index(out, f"glrnet reproduce: spec {spec['name']}")
    if export is not None:
        export_results(out, export)
    if not quiet:
        print(f"[scale] done in {summary['seconds']:.0f}s; outputs in {out}")
    return summary


def _train_section(spec: dict, tr: dict, out: Path, dname: str, o: dict, data, device: str, quiet: bool) -> None:
    """One [training] section on one dataset: each run to its time budget (resumable), then the tables."""
    rows = []
    for tech, unit, loss in tr.get("runs", []):
        label, opts = spec["techniques"][tech]
        cfg = _config(opts, o, activation=unit, loss=loss, max_seconds=float(tr.get("seconds", 300)),
                      budget_clock=tr.get("clock", "cpu"), eval_every=int(tr.get("eval_every", 100)),
                      epochs=int(opts.get("epochs", tr.get("epochs", 100))), device=device)   # a technique's own wins
        if applicable(cfg) is not None:
            continue
        cfg.validate()
        run_dir = out / dname / "runs" / run_name(tech, unit, loss)
        m = train(cfg, run_dir, resume=True, quiet=True, data=data, progress=not quiet,
                  desc=f"{dname}/{tech}-{unit}-{loss}")
        progress = _read_progress(run_dir / "progress.csv")
        row = {"dataset": dname, "technique": tech, "unit": unit, "loss": loss,
               "test_ot": m["test_accuracy_ot"], "test_lap": m["test_accuracy_lap"],
               "steps": m.get("steps"), "train_s": m["train_seconds"], "budget_s": m.get("budget_seconds"),
               "best_val_ot": max((p["val_acc_ot"] for p in progress), default=math.nan)}
        for thr in tr.get("thresholds", [0.5, 0.8, 0.9]):
            hit = next((p["budget_seconds"] for p in progress if p["val_acc_ot"] >= thr), None)
            row[f"s_to_{thr:g}"] = math.nan if hit is None else hit
        rows.append(row)
        if not quiet:
            print(f"[training] {dname} {tech} {unit} {loss}: test OT {row['test_ot']:.4f}"
                  + (f" LAP {row['test_lap']:.4f}" if row["test_lap"] is not None else "")
                  + f" after {row['train_s']:.0f}s ({row['steps']} steps)", flush=True)
        atomic_write_csv(out / f"training_{dname}.csv", rows, list(rows[0]))
    if rows:
        atomic_write_text(out / f"training_{dname}.md", _training_table(spec, rows, dname, tr))
        _figure_progress(out / f"progress_{dname}.png", out / dname / "runs", rows, dname)
    if rows and tr.get("final_quality"):
        _final_quality(spec, tr, out, dname, o, data, device, quiet)


def _settings(rb: dict):
    from .attack_settings import AttackSettings
    return AttackSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in rb.get("settings", {}).items()})


def _run_dir(out: Path, dname: str, section: str, tech: str, unit: str, loss: str) -> Path:
    return (out / section if section else out) / dname / "runs" / run_name(tech, unit, loss)


def _robustness(rb: dict, out: Path, data, device: str, quiet: bool) -> None:
    """One [[robustness]] table: the protocol on its runs into out/robustness-cnn/<name>/ (resumable)."""
    from .checkpoint import load_model
    from .protocol import attack_and_report

    def load(run):
        path = _run_dir(out, rb["dataset"], *run) / "model.safetensors"
        if not path.is_file():
            raise ValueError(f"[[robustness]] {rb['name']!r}: {path} does not exist (its [[training]] run comes first)")
        return load_model(path, device)

    models = {}
    for run in rb["runs"]:
        model, extra = load(run)
        models[run_name(*run[1:])] = (model, TrainConfig.from_saved(extra.get("config", {})).noisy)
    source = load(rb["source"])[0] if rb.get("source") else None
    eps = [float(e) for e in rb.get("eps", [0.1, 0.3])]
    headline = float(rb.get("headline", eps[len(eps) // 2]))
    images = int(rb.get("images", 100))
    x, y = data.x_test[:images], data.y_test[:images]
    folder = out / "robustness-cnn" / rb["name"]
    attack_and_report(folder, models, x, y, sorted(set(eps) | {headline}), _settings(rb),
                      source, headline, title=f"{rb['dataset']}, {', '.join(models)}", quiet=quiet, resume=True)
    write_index(folder, f"glrnet reproduce: [[robustness]] {rb['name']}")


def _final_quality(spec: dict, tr: dict, out: Path, dname: str, o: dict, data, device: str, quiet: bool) -> None:
    """What limits a trained run: per-layer NSR at its final weights, at each budget K of
    ``final_quality`` (NSR ∝ 1/√K tells how many noisy passes a useful step would need). Cached per
    (run, K) beside the run, since a run's weights do not change once it is finished."""
    from .checkpoint import load_model
    samples = int(tr.get("final_samples", 32))
    x, y = data.x_train[:32], data.y_train[:32]
    rows = []
    for tech, unit, loss in tr.get("runs", []):
        label, opts = spec["techniques"][tech]
        run_dir = out / dname / "runs" / run_name(tech, unit, loss)
        if opts.get("method", "glr") == "bp" or not (run_dir / "model.safetensors").is_file():
            continue
        model = None                  # loaded once per run, only if some K is not cached
        for K in tr["final_quality"]:
            cache = run_dir / f"quality_final_K{K}.json"
            if cache.is_file():
                res = json.loads(cache.read_text())
            else:
                cfg = _config(opts, o, activation=unit, loss=loss, replications=int(K), layer_replications=None,
                              device=device).validate()
                if model is None:
                    model, _ = load_model(run_dir / "model.safetensors", device)
                res = gradient_quality(cfg, data, x, y, samples, model=model)
                atomic_write_text(cache, json.dumps(res))
            rows += [{"technique": tech, "unit": unit, "loss": loss, "K": K, **r,
                      "seconds_per_estimate": res["seconds_per_estimate"]} for r in res["layers"]]
            if not quiet:
                print(f"[final quality] {dname} {tech} K={K}: NSR "
                      + ", ".join(f"{r['layer']} {r['nsr']:.3g}" for r in res["layers"]), flush=True)
    if not rows:
        return
    atomic_write_csv(out / f"quality_final_{dname}.csv", rows, list(rows[0]))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [f"# Gradient quality at the trained weights ({dname}; one batch of 32, {samples} estimates each)", "",
             "Per noisy layer NSR = √(tr Cov ĝ)/‖E ĝ‖ and cos = 1/√(1 + NSR²) at the end of each run, for each "
             "budget K of noisy forward passes per input (the run trained at the K of its technique).", "",
             "| technique | unit | loss | K | " + " | ".join(f"{l} NSR / cos" for l in layers) + " | ms / estimate |",
             "|---|---|---|---|" + "---|" * (len(layers) + 1)]
    for key in dict.fromkeys((r["technique"], r["unit"], r["loss"], r["K"]) for r in rows):
        rs = {r["layer"]: r for r in rows if (r["technique"], r["unit"], r["loss"], r["K"]) == key}
        cells = ["–" if l not in rs else f"{rs[l]['nsr']:.3g} / {rs[l]['cos_true']:.3f}" for l in layers]
        ms = next(iter(rs.values()))["seconds_per_estimate"] * 1000
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {ms:.0f} |")
    atomic_write_text(out / f"quality_final_{dname}.md", "\n".join(lines) + "\n")


def _read_progress(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [{k: float(v) for k, v in zip(keys, line.split(","))} for line in lines[1:]]


def _quality_table(spec, rows, dname, batch) -> str:
    q = spec["quality"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [f"# Gradient quality per layer at an equal budget ({dname}, one batch of {batch}, initial weights)", "",
             f"K = {q.get('budget', 100)} noisy forward passes per input for every technique (ES: population K; SPSA: "
             f"K/2 directions × 2; forward gradient: K tangents); {q.get('samples', 60)} independent estimates each. "
             "NSR = √(tr Cov ĝ)/‖E ĝ‖ per layer (signal corrected for the finite sample); cos = 1/√(1 + NSR²), "
             "the expected cosine of one estimate with the true gradient of the technique's own objective "
             "(\"> √n\": the mean of the n estimates does not resolve the signal, ‖ḡ‖² ≤ tr Cov/n); "
             "cos BP: the mean estimate against the BP gradient of the noise-free network (smooth units, CE only).", "",
             "| technique | unit | loss | " + " | ".join(f"{l} NSR / cos" for l in layers) + " | cos BP (last layer) | ms / estimate |",
             "|---|---|---|" + "---|" * (len(layers) + 2)]
    combos = list(dict.fromkeys((r["technique"], r["unit"], r["loss"]) for r in rows))
    for tech, unit, loss in combos:
        rs = {r["layer"]: r for r in rows if (r["technique"], r["unit"], r["loss"]) == (tech, unit, loss)}
        bound = math.sqrt(int(q.get("samples", 60)))   # a signal below the noise of the mean: NSR ≳ √n
        cells = ["–" if l not in rs else f"{rs[l]['nsr']:.3g} / {rs[l]['cos_true']:.3f}" if math.isfinite(rs[l]["nsr"])
                 else f"> {bound:.1f} / < {1 / math.sqrt(1 + bound**2):.2f}" for l in layers]
        last = rs[layers[-1]] if layers[-1] in rs else None
        cos_bp = "–" if last is None or last["cos_bp"] != last["cos_bp"] else f"{last['cos_bp']:.3f}"
        ms = next(iter(rs.values()))["seconds_per_estimate"] * 1000
        lines.append(f"| {spec['techniques'][tech][0]} | {unit} | {loss} | " + " | ".join(cells)
                     + f" | {cos_bp} | {ms:.0f} |")
    return "\n".join(lines) + "\n"


def _training_table(spec, rows, dname, tr) -> str:
    thr = tr.get("thresholds", [0.5, 0.8, 0.9])
    clock = tr.get("clock", "cpu")
    lines = [f"# Accuracy after {tr.get('seconds', 300):g} s of training ({dname}; {clock} time)", "",
             "One process and one torch thread per run on this 2-core CPU; the budget is "
             + ("the process's CPU time (other jobs shared the machine; the wall time of each run is beside it)"
                if clock == "cpu" else "wall time") + ". Validation accuracy (OT) every "
             f"{tr.get('eval_every', 100)} steps; budget seconds until it first reaches each threshold.", "",
             "| technique | unit | loss | test OT | test LAP | best val OT | steps | wall s | "
             + " | ".join(f"s to {t:g}" for t in thr) + " |", "|---|---|---|---|---|---|---|---|" + "---|" * len(thr)]
    for r in rows:
        lap = "–" if r["test_lap"] is None else f"{r['test_lap']:.3f}"
        lines.append(f"| {spec['techniques'][r['technique']][0]} | {r['unit']} | {r['loss']} | {r['test_ot']:.3f} | "
                     f"{lap} | {r['best_val_ot']:.3f} | {r['steps']} | {r['train_s']:.0f} | "
                     + " | ".join("–" if r[f"s_to_{t:g}"] != r[f"s_to_{t:g}"] else f"{r[f's_to_{t:g}']:.0f}"
                                  for t in thr) + " |")
    return "\n".join(lines) + "\n"


def progress_series(runs: Path, rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Each run's (budget seconds, validation accuracy OT) from its progress.csv, by label; runs without one left out."""
    out = {}
    for r in rows:
        p = _read_progress(runs / run_name(r["technique"], r["unit"], r["loss"]) / "progress.csv")
        if p:
            out[f"{r['technique']} · {r['unit']} · {r['loss']}"] = ([q["budget_seconds"] for q in p],
                                                                    [q["val_acc_ot"] for q in p])
    return out


def _figure_progress(path: Path, runs: Path, rows: list[dict], dname: str) -> None:
    from .plots import _save, _styles, plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = progress_series(runs, rows)
    for (color, marker), (label, (s, acc)) in zip(_styles(len(series)), series.items()):
        ax.plot(s, acc, color=color, lw=1.2, label=label)
    ax.set_xlabel("training seconds (budget clock)")
    ax.set_ylabel("validation accuracy (OT)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{dname}: accuracy against training time", fontsize=9)
    if series:        # no run evaluated on the way (a budget shorter than eval_every): no legend to draw
        ax.legend(fontsize=6, frameon=False, ncol=2)
    _save(fig, path)
