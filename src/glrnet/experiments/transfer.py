"""The seed's Tables 1 and 2 as a declarative spec, and the runner behind ``glrnet reproduce``.

A spec (TOML; ``specs/paper.toml`` and ``specs/quick.toml`` ship with the package) names
the dataset, the ε sweep, the adversarial source networks, the models to attack and, for
each, the seed's reported figures. :func:`reproduce` then

1. trains every source and model with :func:`glrnet.train.train` (reusing finished runs in
   ``out/models``, resuming interrupted ones);
2. calibrates the headline ε: bisection for the ε at which the calibration model (the BP
   baseline) under FGSM from the first source falls to the seed's figure;
3. generates FGSM sets once per (source, ε) into ``out/adversarial`` (safetensors + metadata);
4. evaluates every model on identical images: Acc_Orig, Acc_OT, Acc_LAP;
5. writes ``results.csv``, ``table1.md``, ``table2.md``, the figures, the replications study
   and (optionally) the adaptive-attack evaluation of :mod:`glrnet.protocol`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .attack_settings import DEFAULT_EPS
from .attacks import fgsm, load_adversarial, save_adversarial
from .checkpoint import atomic_write_csv, atomic_write_text, load_model, write_index
from .data import load_dataset
from .distributed import stream_seed
from .model import NoisySequential, predict
from .train import TrainConfig, train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class ModelSpec:
    name: str
    label: str
    config: TrainConfig
    seed_figures: dict | None = None       # {"orig": .., "ot": [per source], "lap": [per source]}


@dataclass
class Spec:
    name: str
    dataset: str
    data_dir: str | None
    image_size: int | None
    subset: int | None
    split: str
    val_fraction: float
    eps: list[float]
    headline_target: float
    calibrate_model: str
    attack_images: int | None
    lap_replications: int
    sources: list[ModelSpec]
    models: list[ModelSpec]
    study: dict = field(default_factory=dict)
    robustness: dict = field(default_factory=dict)
    notes: str = ""
    seeds: list[int] | None = None         # train and evaluate every model once per seed (None: its own seed)

    def runs(self) -> list[tuple[ModelSpec, int, str]]:
        """(model, seed, run name) for every model and seed; the model's own seed keeps its plain name,
        so a spec that gains seeds reuses the runs it already has."""
        out = []
        for m in self.models:
            for s in self.seeds or [m.config.seed]:
                out.append((m, s, m.name if s == m.config.seed else f"{m.name}-seed{s}"))
        return out


SECTIONS = ("experiment", "defaults", "sources", "models", "study", "robustness")
EXPERIMENT_KEYS = ("name", "dataset", "data_dir", "image_size", "subset", "split", "val_fraction", "eps",
                   "headline_target", "calibrate_model", "attack_images", "lap_replications", "notes", "seeds")


def spec_path(name: str) -> Path:
    return Path(str(resources.files("glrnet") / "specs" / f"{name}.toml"))


def load_spec(path: str | Path | None = None, quick: bool = False, dataset: str | None = None,
              data_dir: str | None = None) -> Spec:
    """Read a spec file (default: the packaged paper.toml, or quick.toml with ``quick``)."""
    path = Path(path) if path is not None else spec_path("quick" if quick else "paper")
    if not path.is_file() and path.suffix == "" and spec_path(str(path)).is_file():
        path = spec_path(str(path))       # a packaged spec by name
    if not path.is_file():
        packaged = sorted(p.stem for p in spec_path("paper").parent.glob("*.toml"))
        raise FileNotFoundError(f"spec file {path} not found (packaged specs: {', '.join(packaged)})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"spec {path}: {e}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"spec {path}: unknown section(s) {', '.join(f'[{u}]' for u in unknown)}; "
                         f"valid: {', '.join(f'[{v}]' for v in SECTIONS)}")
    exp = raw.get("experiment", {})
    bad = sorted(set(exp) - set(EXPERIMENT_KEYS))
    if bad:
        raise ValueError(f"spec {path}: unknown key(s) {', '.join(bad)} in [experiment]; valid: "
                         f"{', '.join(EXPERIMENT_KEYS)}")
    bad = sorted(set(raw.get("study", {})) - {"models", "replications", "variants"})
    if bad:
        raise ValueError(f"spec {path}: unknown key(s) {', '.join(bad)} in [study]; valid: models, replications, "
                         "variants")
    defaults = raw.get("defaults", {})
    data = {"dataset": dataset or exp.get("dataset", "digits"),
            "data_dir": data_dir if data_dir is not None else exp.get("data_dir"),
            "image_size": exp.get("image_size"), "subset": exp.get("subset"),
            "split": exp.get("split", "standard"), "val_fraction": float(exp.get("val_fraction", 0.1))}
    if dataset and dataset != exp.get("dataset"):
        data["image_size"] = None if dataset == "digits" else exp.get("image_size") or 14

    def entry(d: dict, kind: str) -> ModelSpec:
        d = dict(d)
        if "name" not in d:
            raise ValueError(f"spec {path}: every [[{kind}]] needs a name")
        name, label, seed = d.pop("name"), d.pop("label", None), d.pop("seed_figures", None)
        base = dict(defaults) if kind == "models" else {}
        try:
            cfg = TrainConfig.from_dict({**base, **data, **d}).validate()
        except ValueError as e:
            raise ValueError(f"spec {path}, {kind} {name!r}: {e}") from None
        return ModelSpec(name, label or name, cfg, seed)

    sources = [entry(s, "sources") for s in raw.get("sources", [])]
    models = [entry(m, "models") for m in raw.get("models", [])]
    if len(sources) < 1 or not models:
        raise ValueError(f"spec {path} needs at least one [[sources]] and one [[models]]")
    names = [m.name for m in sources + models]
    if len(set(names)) != len(names):
        raise ValueError(f"spec {path}: model names must be unique, got {names}")
    calibrate = exp.get("calibrate_model", models[0].name)
    if calibrate not in names:
        raise ValueError(f"spec {path}: calibrate_model {calibrate!r} is not a model of the spec")
    return Spec(name=exp.get("name", path.stem), eps=[float(e) for e in exp.get("eps", DEFAULT_EPS)],
                headline_target=float(exp.get("headline_target", 0.28)), calibrate_model=calibrate,
                attack_images=exp.get("attack_images"), lap_replications=int(exp.get("lap_replications", 1000)),
                sources=sources, models=models, study=raw.get("study", {}), robustness=raw.get("robustness", {}),
                notes=exp.get("notes", ""), seeds=_seeds(exp.get("seeds"), path), **data)


def _seeds(value, path) -> list[int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and len(set(value)) == len(value)):
        raise ValueError(f"spec {path}: seeds must be a list of distinct integers, e.g. [0, 1, 2], got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- steps
def train_all(spec: Spec, out: Path, device: str, quiet: bool, data) -> dict[str, dict]:
    """Train (or reuse / resume) every source and model; returns their metrics by name."""
    metrics = {}
    jobs = [(m, m.config.seed, m.name) for m in spec.sources] + spec.runs()
    for m, seed, run in jobs:
        cfg = TrainConfig(**{**asdict(m.config), "device": device, "seed": seed})
        t0 = time.perf_counter()
        if not quiet:
            print(f"[train] {run}: {cfg.method} {cfg.activation} {cfg.loss} hidden={cfg.hidden} "
                  f"K={cfg.replications} epochs={cfg.epochs} seed={seed}", flush=True)
        metrics[run] = train(cfg, out / "models" / run, resume=True, quiet=True, data=data,
                             progress=not quiet, desc=run)
        metrics[run]["wall_seconds_this_call"] = time.perf_counter() - t0
        if not quiet:
            lap = metrics[run]["test_accuracy_lap"]
            lap = f" LAP {lap:.4f}" if lap is not None else ""
            print(f"        test acc OT {metrics[run]['test_accuracy_ot']:.4f}{lap} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return metrics


def accuracy(model: NoisySequential, x, y, mode="ot", replications=1000, seed: tuple[int, ...] = (0,)) -> float:
    """OT or LAP accuracy; LAP noise from the stream ``stream_seed(20, *seed)`` (antithetic pairs when K is even)."""
    gen = torch.Generator(device=x.device).manual_seed(stream_seed(20, *seed))
    pred = predict(model, x, mode, replications, generator=gen, antithetic=replications % 2 == 0)
    return (pred == y).double().mean().item()


def calibrate_eps(source: NoisySequential, target_model: NoisySequential, x, y, target_acc: float,
                  lo: float = 0.0, hi: float = 0.5, iters: int = 14) -> float:
    """Smallest ε (to ~1e-4) at which ``target_model``'s OT accuracy on FGSM(source, ε) ≤ target."""
    if accuracy(target_model, fgsm(source, x, y, hi), y) > target_acc:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if accuracy(target_model, fgsm(source, x, y, mid), y) > target_acc:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)


def adversarial_sets(spec: Spec, out: Path, sources: dict[str, NoisySequential], x, y, idx, eps_list) -> dict:
    """FGSM sets per (source, ε), generated once and saved; reused when their metadata matches."""
    sets = {}
    for name, src in sources.items():
        for eps in eps_list:
            path = out / "adversarial" / name / f"fgsm_eps{eps:.4f}.safetensors"
            meta = {"source": name, "attack": "fgsm", "eps": eps, "images": len(idx), "dataset": spec.dataset}
            if path.exists():
                x_adv, saved_idx, saved = load_adversarial(path)
                if saved == meta and torch.equal(saved_idx, idx.cpu()):
                    sets[name, eps] = x_adv.to(x.device)
                    continue
            path.parent.mkdir(parents=True, exist_ok=True)
            x_adv = fgsm(src, x, y, eps)
            save_adversarial(path, x_adv, idx.cpu(), meta)
            sets[name, eps] = x_adv
    return sets


RESULT_FIELDS = ["model", "seed", "activation", "loss", "method", "source", "eps", "acc_orig", "acc_orig_lap",
                 "acc_ot", "acc_lap"]
SPREAD = ("acc_orig", "acc_orig_lap", "acc_ot", "acc_lap")


def evaluate_all(spec: Spec, models: dict[str, tuple[ModelSpec, NoisySequential, int]], sources, sets, x, y,
                 eps_list, quiet: bool) -> list[dict]:
    """One row per (run, source, ε); ``models``: run name → (model spec, model, seed)."""
    rows = []
    bar = tqdm(total=len(models) * len(sources) * len(eps_list), desc="evaluate", unit="set", disable=quiet,
               leave=False, dynamic_ncols=True)
    for mi, (run, (ms, model, seed)) in enumerate(models.items()):
        name = ms.name
        noisy = ms.config.noisy
        acc_orig = accuracy(model, x, y)
        acc_orig_lap = accuracy(model, x, y, "lap", spec.lap_replications, seed=(mi, 999)) if noisy else math.nan
        for si, src_name in enumerate(sources):
            for eps in eps_list:
                xa = sets[src_name, eps]
                row = {"model": name, "seed": seed, "activation": ms.config.activation, "loss": ms.config.loss,
                       "method": ms.config.method, "source": src_name, "eps": eps, "acc_orig": acc_orig,
                       "acc_orig_lap": acc_orig_lap,
                       "acc_ot": accuracy(model, xa, y),
                       "acc_lap": accuracy(model, xa, y, "lap", spec.lap_replications, seed=(mi, si))
                       if noisy else math.nan}
                rows.append(row)
                bar.update()
    bar.close()
    return rows


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def aggregate_seeds(rows: list[dict], keys=("model", "source", "eps"), fields=SPREAD) -> list[dict]:
    """Rows of several seeds → one row per ``keys`` with each field's mean, and ``<field>_min`` /
    ``<field>_max`` / ``<field>_sd`` over the seeds, plus ``seeds`` (how many)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        agg = {**rs[0], "seeds": len(rs)}
        agg.pop("seed", None)
        for f in fields:
            vals = [float(r[f]) for r in rs]
            if any(math.isnan(v) for v in vals):
                agg.update({f: math.nan, f"{f}_min": math.nan, f"{f}_max": math.nan, f"{f}_sd": math.nan})
                continue
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            agg.update({f: mean, f"{f}_min": min(vals), f"{f}_max": max(vals), f"{f}_sd": sd})
        out.append(agg)
    return out


def _fmt_spread(r: dict, f: str) -> str:
    """"0.94 (0.93–0.95)": the mean and the min–max over seeds (the mean alone for one seed)."""
    v = r.get(f)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if r.get("seeds", 1) < 2:
        return f"{v:.2f}"
    return f"{v:.3f} ({r[f + '_min']:.3f}–{r[f + '_max']:.3f})"


def write_tables(spec: Spec, out: Path, rows: list[dict], headline: float, source_metrics: dict) -> list[str]:
    """table1.md / table2.md: the seed's layout, the seed's figures beside ours at the headline ε,
    and ours at ε = 0.1, 0.2, 0.3 (OT / LAP) where they were evaluated."""
    paths = []
    extra = [e for e in (0.1, 0.2, 0.3) if e != headline and any(r["eps"] == e for r in rows)]
    for si, src in enumerate(spec.sources):
        lines = [f"# Table {si + 1}: FGSM examples transferred from `{src.name}` ({src.label})", "",
                 f"Dataset: {spec.dataset} ({spec.split} split, image size {spec.image_size or 'native'}). "
                 f"Headline ε = {headline:.4f}: where the BP baseline `{spec.calibrate_model}` under the first source "
                 f"falls to the seed's {spec.headline_target:.2f} (the seed does not state its ε). Source clean test "
                 f"accuracy: {source_metrics[src.name]['test_accuracy_ot']:.4f}. LAP: K = {spec.lap_replications}. "
                 "\"–\": no figure (the seed gives none, or the model has no noisy predictor)."
                 + (f" Ours: mean (min–max) over seeds {spec.seeds}." if spec.seeds and len(spec.seeds) > 1 else ""),
                 "",
                 "| model | seed Acc_Orig | seed Acc_OT | seed Acc_LAP | ours Acc_Orig | ours Acc_OT | ours Acc_LAP | "
                 + " | ".join(f"ours ε={e:g} OT / LAP" for e in extra) + (" |" if extra else ""),
                 "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
        for ms in spec.models:
            r = next(r for r in rows if r["model"] == ms.name and r["source"] == src.name and r["eps"] == headline)
            seed = ms.seed_figures or {}
            ot, lap = (seed[k][si] if k in seed and si < len(seed[k]) else None for k in ("ot", "lap"))
            cells = []
            for e in extra:
                re_ = next(q for q in rows if q["model"] == ms.name and q["source"] == src.name and q["eps"] == e)
                cells.append(f"{_fmt_spread(re_, 'acc_ot')} / {_fmt_spread(re_, 'acc_lap')}")
            lines.append(f"| {ms.label} | {_fmt(seed.get('orig'))} | {_fmt(ot)} | {_fmt(lap)} | "
                         f"{_fmt_spread(r, 'acc_orig')} | {_fmt_spread(r, 'acc_ot')} | {_fmt_spread(r, 'acc_lap')} | "
                         + " | ".join(cells) + (" |" if cells else ""))
        path = out / f"table{si + 1}.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def run_study(spec: Spec, out: Path, data, device, quiet, source: NoisySequential, headline: float, x, y) -> list[dict]:
    """Test and adversarial accuracy against K, with and without variance reduction."""
    st = spec.study
    if not st:
        return []
    rows = []
    x_adv = fgsm(source, x, y, headline)
    base = {m.name: m for m in spec.models}
    for model_name in st.get("models", []):
        if model_name not in base:
            raise ValueError(f"study model {model_name!r} is not a model of the spec")
        own = base[model_name].config
        own_variant = {(False, "iid"): "plain", (True, "iid"): "baseline", (False, "antithetic"): "antithetic",
                       (True, "antithetic"): "baseline+antithetic"}.get((own.baseline, own.sampler),
                                                                          f"{own.sampler}+baseline={own.baseline}")
        reference = (own.replications, own_variant)  # the spec's own model, reused as it is
        combos = [(k, v) for k in st.get("replications", [10, 100, 1000]) for v in st.get("variants", ["plain", "baseline"])]
        for k, variant in combos + ([reference] if reference not in combos else []):
            vr = {"plain": {}, "baseline": {"baseline": True}, "antithetic": {"sampler": "antithetic"},
                  "baseline+antithetic": {"baseline": True, "sampler": "antithetic"}}.get(variant, {})
            cfg = TrainConfig(**{**asdict(own), "replications": k, "device": device,
                                 **({} if (k, variant) == reference else {"baseline": False, "sampler": "iid"}), **vr})
            run_dir = out / "models" / (model_name if (k, variant) == reference else f"{model_name}-K{k}-{variant}")
            t0 = time.perf_counter()
            m = train(cfg, run_dir, resume=True, quiet=True, data=data)
            model, _ = load_model(run_dir / "model.safetensors", device)
            rows.append({"model": model_name, "replications": k, "variant": variant,
                         "test_acc_ot": m["test_accuracy_ot"], "test_acc_lap": m["test_accuracy_lap"],
                         "adv_acc_ot": accuracy(model, x_adv, y),
                         "adv_acc_lap": accuracy(model, x_adv, y, "lap", spec.lap_replications, seed=(7,)),
                         "train_seconds": m["train_seconds"]})
            if not quiet:
                r = rows[-1]
                print(f"[study] {model_name} K={k} {variant}: test OT {r['test_acc_ot']:.4f}, adv OT "
                      f"{r['adv_acc_ot']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    fields = ["model", "replications", "variant", "test_acc_ot", "test_acc_lap", "adv_acc_ot", "adv_acc_lap",
              "train_seconds"]
    atomic_write_csv(out / "study.csv", rows, fields)
    lines = [f"# Replications study (adversarial: FGSM from `{spec.sources[0].name}` at ε = {headline:.4f})", "",
             "| model | K | variance reduction | test Acc_OT | test Acc_LAP | adv Acc_OT | adv Acc_LAP | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['replications']} | {r['variant']} | {r['test_acc_ot']:.4f} | "
                     f"{r['test_acc_lap']:.4f} | {r['adv_acc_ot']:.4f} | {r['adv_acc_lap']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    atomic_write_text(out / "study.md", "\n".join(lines) + "\n")
    return rows


# ---------------------------------------------------------------------------------------- runner
REPORT_SUFFIXES = (".md", ".csv", ".png", ".json", ".toml")


def export_results(out: str | Path, dest: str | Path) -> list[Path]:
    """Copy what a run reports (tables, CSV, figures, summary, the spec; each model's metrics,
    history and curves) from ``out`` to ``dest`` — no weights, no adversarial images."""
    import shutil
    out, dest = Path(out), Path(dest)
    copied = []
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out)
        if not f.is_file() or f.suffix not in REPORT_SUFFIXES or rel.parts[0] == "adversarial" \
                or f.name.startswith("checkpoint"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        copied.append(target)
    return copied


def output_folder(out: str | Path, spec_file: str | Path | None = None) -> Path:
    """``out`` created (a clear ``ValueError`` if it names a file), with a copy of the spec it runs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if spec_file is not None:
        atomic_write_text(out / "spec.toml", Path(spec_file).read_text())
    return out


def reproduce(spec: str | Path | None, out: str | Path, dataset: str | None = None, data_dir: str | None = None,
              quick: bool = False, device: str = "cpu", quiet: bool = False, robustness: bool = True,
              export: str | Path | None = None, seeds: list[int] | None = None) -> dict:
    """Run a spec end to end into ``out`` (see the module docstring); with ``export`` copy the
    reports to that folder (e.g. ``docs/results/mnist``). Returns the summary dict."""
    from .train import resolve_device
    t_start = time.perf_counter()
    resolve_device(device)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    spec_file = Path(spec) if spec is not None else spec_path("quick" if quick else "paper")
    if not spec_file.is_file() and spec_path(str(spec_file)).is_file():
        spec_file = spec_path(str(spec_file))
    from .certification import is_certified_spec, run_certified
    from .scale import is_scale_spec, run_scale
    if spec_file.is_file() and is_scale_spec(spec_file):   # the scale study: techniques of its own
        if seeds is not None:
            raise ValueError(f"spec {spec_file} is a scale-study spec: it is run for its own seed (no --seeds)")
        return run_scale(spec_file, out, data_dir=data_dir, device=device, quiet=quiet, only=dataset, export=export)
    if spec_file.is_file() and is_certified_spec(spec_file):   # certified radii: datasets and models of its own
        if seeds is not None:
            raise ValueError(f"spec {spec_file} is a certified-radii spec: it is run for its models' own seeds "
                             "(no --seeds)")
        return run_certified(spec_file, out, data_dir=data_dir, device=device, quiet=quiet, robustness=robustness,
                             export=export, only=dataset)
    spec = load_spec(spec, quick=quick, dataset=dataset, data_dir=data_dir)
    if seeds is not None:
        spec.seeds = _seeds(list(seeds), "--seeds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "spec.toml", spec_file.read_text())
    data = load_dataset(spec.dataset, spec.data_dir, spec.image_size, spec.val_fraction, subset=spec.subset,
                        split=spec.split)
    if not quiet:
        print(f"[reproduce] spec {spec.name}: {data.summary()}", flush=True)
    data = data.to(device)
    timings = {}
    t0 = time.perf_counter()
    metrics = train_all(spec, out, device, quiet, data)
    timings["train"] = time.perf_counter() - t0

    loaded = {m.name: (m, load_model(out / "models" / m.name / "model.safetensors", device)[0])
              for m in spec.sources + spec.models}
    sources = {m.name: loaded[m.name][1] for m in spec.sources}
    models = {m.name: loaded[m.name] for m in spec.models}     # each model's own seed
    runs = {run: (m, loaded[run][1] if run in loaded else
                  load_model(out / "models" / run / "model.safetensors", device)[0], seed)
            for m, seed, run in spec.runs()}
    n = len(data.x_test) if spec.attack_images is None else min(spec.attack_images, len(data.x_test))
    idx = torch.arange(n, device=device)
    x, y = data.x_test[idx], data.y_test[idx]

    t0 = time.perf_counter()
    first = spec.sources[0].name
    # the headline ε is chosen on held-out training data where there is some: the test set only reports
    x_cal, y_cal = (data.x_val, data.y_val) if data.x_val is not None and len(data.x_val) else (x, y)
    headline = calibrate_eps(sources[first], loaded[spec.calibrate_model][1], x_cal, y_cal, spec.headline_target)
    eps_list = sorted(set(spec.eps) | {headline})
    sets = adversarial_sets(spec, out, sources, x, y, idx, eps_list)
    timings["attacks"] = time.perf_counter() - t0
    if not quiet:
        print(f"[attacks] headline ε = {headline:.4f}; {len(sets)} FGSM sets", flush=True)

    t0 = time.perf_counter()
    rows = evaluate_all(spec, {**{s: (loaded[s][0], sources[s], loaded[s][0].config.seed) for s in sources}, **runs},
                        sources, sets, x, y, eps_list, quiet)
    timings["evaluate"] = time.perf_counter() - t0
    atomic_write_csv(out / "results.csv", rows, RESULT_FIELDS)
    agg = aggregate_seeds(rows)
    if spec.seeds and len(spec.seeds) > 1:
        atomic_write_csv(out / "results_seeds.csv", agg, ["model", "source", "eps", "seeds"] + [
            f"{f}{suffix}" for f in SPREAD for suffix in ("", "_sd", "_min", "_max")])
    tables = write_tables(spec, out, [r for r in agg if r["model"] in models], headline, metrics)

    from .diagnostics import NOISE_FIELDS, noise_scale, noise_scale_table
    scales = {name: noise_scale(model, data.x_test[:2000]) for name, (ms, model) in models.items()}
    atomic_write_csv(out / "noise_scale.csv", [{"model": n, **r} for n, rows in scales.items() for r in rows],
                     ["model", *NOISE_FIELDS])
    atomic_write_text(out / "noise_scale.md", "# Noise against signal, per layer (2000 test images)\n\n"
                      "σ is the neurons' noise standard deviation; z the noise-free pre-activation W x + b.\n\n"
                      + noise_scale_table(scales))

    t0 = time.perf_counter()
    from . import plots
    plots.paper_figures(out, spec, metrics, agg, sets, x, y, headline, data.image_shape)
    timings["figures"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    study = run_study(spec, out, data, device, quiet, sources[first], headline, x, y)
    timings["study"] = time.perf_counter() - t0

    robust = None
    if robustness and spec.robustness:
        from .protocol import run_protocol
        t0 = time.perf_counter()
        robust = run_protocol(out, spec, models, sources, data, headline, device, quiet, runs=runs)
        timings["robustness"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_start
    summary = {"spec": spec.name, "dataset": spec.dataset, "seeds": spec.seeds, "headline_eps": headline, "eps": eps_list,
               "attack_images": n, "timings_seconds": timings, "tables": tables, "study_rows": len(study),
               "robustness": robust is not None,
               "models": {k: {kk: v[kk] for kk in ("test_accuracy_ot", "test_accuracy_lap", "train_seconds")}
                          for k, v in metrics.items()}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    write_index(out, f"glrnet reproduce: spec {spec.name}")
    if export is not None:
        export_results(out, export)
    if not quiet:
        for t in tables:
            print(Path(t).read_text())
        print(f"[reproduce] done in {timings['total']:.0f}s; outputs in {out}")
    return summary
