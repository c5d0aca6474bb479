"""The certified-radii experiment (a spec whose ``[experiment]`` has ``kind = "certified"``).

For every dataset of the spec, and every model:

1. train it with :func:`glrnet.train.train` (finished runs reused, interrupted ones resumed):
   GLR networks whose first layer is held at a fixed scale (``max_first_norm`` with the
   ``spectral`` or ``stiefel`` projection), and input-space randomized smoothing (``input_noise_std``:
   the same architecture behind a frozen a·I layer carrying Gaussian input noise, trained by BP);
2. certify it (:func:`glrnet.certify.certify`, CERTIFY with separate selection and estimation
   samples) for the majority vote and for LAP, on the first ``[certify] images`` test images;
3. attack it with the adaptive protocol of :mod:`glrnet.protocol` in the L2 ball (APGD-L2 through
   every surrogate gradient with EOT, SPSA, random directions; the escalation to convergence),
   every image scored by OT, LAP and the majority vote (``[robustness] models``: the models attacked;
   default all);
4. check soundness (a line of every robustness report): no image certified at radius ≥ ε for a
   predictor is broken by that predictor's L2 worst case at ε;
5. write ``<dataset>/certified.md`` / ``.csv`` / ``certified_accuracy.png``, the protocol's
   ``<dataset>/robustness.md``, and ``certified.md`` over all datasets.

``glrnet reproduce --spec certified --data-dir ../shared/data --out results/certified``: with a
``--data-dir`` that holds one folder per dataset (``mnist/``, ``fashion-mnist/``) each dataset reads its own.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attack_settings import AttackSettings
from .certify import Certificate, certified_accuracy, certify
from .checkpoint import atomic_write_csv, atomic_write_text, load_model, write_index
from .data import load_dataset
from .distributed import stream_seed
from .train import TrainConfig, train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SECTIONS = ("experiment", "datasets", "defaults", "models", "certify", "robustness")
EXPERIMENT_KEYS = ("name", "kind", "radii", "notes")
DATASET_KEYS = ("name", "dataset", "data_dir", "split", "image_size", "subset", "val_fraction")
CERTIFY_KEYS = ("n0", "samples", "alpha", "images", "predictors", "seed")
PREDICTORS = ("vote", "lap")


@dataclass
class CertifiedSpec:
    name: str
    radii: list[float]
    datasets: list[dict]
    models: list[tuple[str, str, dict]]        # (name, label, training options before the dataset's)
    certify: dict = field(default_factory=lambda: {"n0": 100, "samples": 10000, "alpha": 0.001, "images": 500,
                                                   "predictors": ["vote", "lap"], "seed": 0})
    robustness: dict = field(default_factory=dict)
    notes: str = ""


def is_certified_spec(path: Path) -> bool:
    """Whether the TOML file at ``path`` is a certified-radii spec (``kind = "certified"``)."""
    try:
        return tomllib.loads(Path(path).read_text()).get("experiment", {}).get("kind") == "certified"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def load_certified_spec(path: str | Path) -> CertifiedSpec:
    """Read and check a certified-radii spec: every unknown key, bad option or bad model is one
    ``ValueError`` naming the file and the key, before anything is trained."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())

    def check_keys(table: dict, valid, where: str):
        bad = sorted(set(table) - set(valid))
        if bad:
            raise ValueError(f"spec {path}: unknown key(s) {', '.join(bad)} in {where}; valid: {', '.join(valid)}")

    check_keys(raw, SECTIONS, "the file (sections)")
    exp = raw.get("experiment", {})
    check_keys(exp, EXPERIMENT_KEYS, "[experiment]")
    datasets = raw.get("datasets", [])
    if not datasets:
        raise ValueError(f"spec {path}: a certified spec needs at least one [[datasets]]")
    for d in datasets:
        check_keys(d, DATASET_KEYS, "[[datasets]]")
        if "name" not in d or "dataset" not in d:
            raise ValueError(f"spec {path}: every [[datasets]] needs a name and a dataset")
    cert = {**CertifiedSpec.__dataclass_fields__["certify"].default_factory(), **raw.get("certify", {})}
    check_keys(cert, CERTIFY_KEYS, "[certify]")
    bad = [p for p in cert["predictors"] if p not in PREDICTORS]
    if bad:
        raise ValueError(f"spec {path}: [certify] predictors {bad}; valid: {', '.join(PREDICTORS)}")
    radii = [float(r) for r in exp.get("radii", [0.25, 0.5, 1.0, 1.5])]
    if not radii or min(radii) <= 0:
        raise ValueError(f"spec {path}: [experiment] radii must be positive numbers, got {radii}")
    defaults = raw.get("defaults", {})
    models = []
    for m in raw.get("models", []):
        m = dict(m)
        if "name" not in m:
            raise ValueError(f"spec {path}: every [[models]] needs a name")
        name, label = m.pop("name"), m.pop("label", None)
        opts = {**defaults, **m}
        for d in datasets:       # every model must be a valid run on every dataset, checked now
            try:
                TrainConfig.from_dict({**opts, **_data_options(d, None)}).validate()
            except ValueError as e:
                raise ValueError(f"spec {path}, model {name!r} on {d['name']}: {e}") from None
        models.append((name, label or name, opts))
    if not models:
        raise ValueError(f"spec {path}: a certified spec needs at least one [[models]]")
    names = [m[0] for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"spec {path}: model names must be unique, got {names}")
    rb = dict(raw.get("robustness", {}))
    _settings(rb, path)  # checked now, not after the training
    unknown = [m for m in rb.get("models", []) if m not in names]
    if unknown:
        raise ValueError(f"spec {path}: [robustness] models {unknown} are not models of the spec")
    return CertifiedSpec(exp.get("name", path.stem), radii, datasets, models, cert, rb, exp.get("notes", ""))


def _data_options(d: dict, data_dir: str | None) -> dict:
    """The training options of a [[datasets]] entry; ``data_dir`` (the command line's) is the folder itself,
    or its ``<dataset>/`` subfolder when that exists."""
    own = d.get("data_dir")
    if data_dir is not None:
        sub = Path(data_dir) / d["dataset"]
        own = str(sub) if sub.is_dir() else data_dir
    return {"dataset": d["dataset"], "data_dir": own, "split": d.get("split", "standard"),
            "image_size": d.get("image_size"), "subset": d.get("subset"),
            "val_fraction": float(d.get("val_fraction", 0.1))}


def _settings(rb: dict, path) -> tuple[AttackSettings, list[float], int, list[float] | None]:
    rb = dict(rb)
    rb.pop("models", None)        # which models are attacked: checked against [[models]] by the loader
    eps = [float(e) for e in rb.pop("eps", [0.25, 0.5, 1.0, 1.5, 3.0])]
    images = int(rb.pop("images", 200))
    check_eps = rb.pop("check_eps", None)
    if "losses" in rb:
        rb["losses"] = tuple(rb["losses"])
    rb.setdefault("norm", "L2")
    rb.setdefault("score_vote", True)
    try:
        st = AttackSettings(**rb)
    except TypeError as e:
        raise ValueError(f"spec {path} [robustness]: {e}") from None
    if st.norm != "L2":
        raise ValueError(f"spec {path} [robustness]: the certificates are L2 radii; norm must be L2, got {st.norm}")
    return st, eps, images, check_eps


# ---------------------------------------------------------------------------------------- checks
def soundness_checks(name: str, certs: dict[str, Certificate], y, masks: dict, escalated: dict,
                     eps_list: list[float]) -> list[dict]:
    """One check per (predictor, ε): of the attacked images certified for that predictor at radius ≥ ε
    (and correct), how many the predictor's L2 worst case at ε breaks (the escalated one where the
    protocol escalated). Any is a contradiction: a wrong certificate, or an attack that left its ball."""
    checks = []
    n = len(y)
    for predictor, cert in certs.items():
        for eps in eps_list:
            alive = escalated.get((name, eps)) if predictor == "lap" else None
            if alive is None:
                alive = masks[name, eps].get(predictor)
            if alive is None:
                continue
            sure = ((cert.prediction[:n] == y.cpu()) & (cert.radius[:n] >= eps)).to(alive.device)
            broken = int((sure & ~alive).sum())
            checks.append({"model": name, "check": f"sound: no image certified at radius ≥ ε ({predictor}) is broken "
                                                   f"by the {predictor} worst case (ε={eps:g})",
                           "value": f"{broken} of {int(sure.sum())} certified broken", "pass": broken == 0,
                           "certified": int(sure.sum()), "broken": broken})
    return checks


# ---------------------------------------------------------------------------------------- runner
def run_certified(spec_file: str | Path, out: str | Path, data_dir: str | None = None, device: str = "cpu",
                  quiet: bool = False, robustness: bool = True, export: str | Path | None = None,
                  only: str | None = None) -> dict:
    """Run a certified-radii spec end to end into ``out`` (see the module docstring). ``only``: run just
    the [[datasets]] entries of that dataset (e.g. two processes, one per dataset, into one ``out``);
    ``out/certified.md`` gathers every dataset's section found in ``out``."""
    from .experiments import export_results, output_folder
    t_start = time.perf_counter()
    spec = load_certified_spec(spec_file)
    out = output_folder(out, spec_file)
    st, eps, attack_images, check_eps = _settings(spec.robustness, spec_file)
    summary = {"spec": spec.name, "datasets": {}}
    chosen = [d for d in spec.datasets if only is None or only in (d["dataset"], d["name"])]
    if not chosen:
        raise ValueError(f"--dataset {only}: spec {spec_file} has no such dataset; it has "
                         + ", ".join(d["dataset"] for d in spec.datasets))
    for d in chosen:
        t0 = time.perf_counter()
        opts = _data_options(d, data_dir)
        data = load_dataset(opts["dataset"], opts["data_dir"], opts["image_size"], opts["val_fraction"],
                            subset=opts["subset"], split=opts["split"])
        if not quiet:
            print(f"[certified] {d['name']}: {data.summary()}", flush=True)
        data = data.to(device)
        folder = out / d["name"]
        rows, certs, models, timings = [], {}, {}, {}
        n_cert = min(int(spec.certify["images"]), len(data.x_test))
        x, y = data.x_test[:n_cert], data.y_test[:n_cert]
        for mi, (name, label, options) in enumerate(spec.models):
            cfg = TrainConfig.from_dict({**options, **opts, "device": device})
            t1 = time.perf_counter()
            metrics = train(cfg, folder / "models" / name, resume=True, quiet=True, data=data, progress=not quiet,
                            desc=f"{d['name']}/{name}")
            model, _ = load_model(folder / "models" / name / "model.safetensors", device)
            models[name] = (model, cfg.noisy)
            t2 = time.perf_counter()
            per = _cached_certificates(folder / "certificates" / f"{name}.json", folder / "models" / name,
                                       spec.certify, mi, n_cert)
            if per is None:
                per = {}
                for pi, predictor in enumerate(spec.certify["predictors"]):
                    gen = torch.Generator(device=device).manual_seed(stream_seed(int(spec.certify["seed"]), 30, mi, pi))
                    per[predictor] = certify(model, x, n0=int(spec.certify["n0"]), n=int(spec.certify["samples"]),
                                             alpha=float(spec.certify["alpha"]), predictor=predictor, generator=gen)
                _save_certificates(folder / "certificates" / f"{name}.json", folder / "models" / name, spec.certify,
                                   mi, n_cert, per)
            certs[name] = per
            timings[name] = {"train_s": metrics["train_seconds"], "certify_s": time.perf_counter() - t2}
            for predictor, cert in per.items():
                acc = certified_accuracy(cert, y, [0.0] + spec.radii)
                rows.append({"dataset": d["name"], "model": name, "label": label, "predictor": predictor,
                             "method": cfg.method, "activation": cfg.activation, "loss": cfg.loss,
                             "clean_ot": metrics["test_accuracy_ot"], "clean_lap": metrics["test_accuracy_lap"],
                             "sigma": cert.sigma, "first_layer_norm": cert.first_layer_norm,
                             "sigma_over_norm": cert.sigma / cert.first_layer_norm,
                             "abstain": (cert.prediction < 0).double().mean().item(),
                             **{f"certified_{r:g}": acc[r] for r in [0.0] + spec.radii},
                             "train_s": metrics["train_seconds"], "certify_s": timings[name]["certify_s"]})
            _write_certificates(folder / "certificates" / f"{name}.csv", per, y)
            if not quiet:
                vote = next((r for r in rows[::-1] if r["model"] == name and r["predictor"] == "vote"), rows[-1])
                print(f"[certified] {d['name']}/{name}: clean LAP {metrics['test_accuracy_lap']}, σ/‖W₁‖₂ "
                      f"{vote['sigma_over_norm']:.3g}, certified at "
                      + ", ".join(f"{r:g}: {vote[f'certified_{r:g}']:.3f}" for r in spec.radii)
                      + f" ({t1 - t0 if mi == 0 else 0:.0f}s data, {t2 - t1:.0f}s train, "
                        f"{time.perf_counter() - t2:.0f}s certify)", flush=True)
            atomic_write_csv(folder / "certified.csv", rows, list(rows[0]))
        empirical, checks = {}, []
        if robustness:
            from .protocol import attack_and_report
            n_att = min(attack_images, n_cert)
            xa, ya = x[:n_att], y[:n_att]
            attacked = spec.robustness.get("models")
            models = {n: v for n, v in models.items() if attacked is None or n in attacked}
            t3 = time.perf_counter()

            def after(name, masks, escalated):
                return soundness_checks(name, certs[name], ya, masks, escalated, eps)

            robust_rows, checks = attack_and_report(folder, models, xa, ya, eps, st, None, max(spec.radii),
                                                    check_eps if check_eps is not None else list(spec.radii),
                                                    f"{spec.name} / {d['name']} (L2)", quiet, after_model=after)
            timings["attacks_s"] = time.perf_counter() - t3
            empirical = _empirical(robust_rows, checks, models)
        section = _dataset_table(spec, d, rows, empirical, checks, data, n_cert, attack_images, st, timings,
                                 check_eps if check_eps is not None else list(spec.radii))
        atomic_write_text(folder / "certified.md", section)
        from .plots import figure_certified
        figure_certified(folder / "certified_accuracy.png", {n: c["vote"] for n, c in certs.items() if "vote" in c}
                         or {n: next(iter(c.values())) for n, c in certs.items()}, y, title=d["name"])
        write_index(folder, f"glrnet reproduce: certified radii on {d['name']}")
        summary["datasets"][d["name"]] = {"seconds": time.perf_counter() - t0, "timings": timings,
                                          "sound": all(c["pass"] for c in checks if c["check"].startswith("sound"))}
    total = time.perf_counter() - t_start
    summary["seconds"] = total
    sections = [(out / d["name"] / "certified.md").read_text() for d in spec.datasets
                if (out / d["name"] / "certified.md").is_file()]
    missing = [d["name"] for d in spec.datasets if not (out / d["name"] / "certified.md").is_file()]
    atomic_write_text(out / "certified.md", f"# Certified L2 radii: spec `{spec.name}`\n\n{spec.notes}\n\n"
                      + (f"Not run yet: {', '.join(missing)}.\n\n" if missing else "") + "\n".join(sections))
    name = "summary.json" if only is None else f"summary-{only}.json"
    atomic_write_text(out / name, json.dumps(summary, indent=1, ensure_ascii=False))
    write_index(out, f"glrnet reproduce: spec {spec.name}")
    if export is not None:
        export_results(out, export)
    if not quiet:
        print((out / "certified.md").read_text())
        print(f"[certified] done in {total:.0f}s; outputs in {out}")
    return summary


def _certificate_key(run: Path, settings: dict, index: int, images: int) -> str:
    """What a model's certificates depend on: its weights (digest), the [certify] settings, its stream."""
    import hashlib
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


def _empirical(rows: list[dict], checks: list[dict], models: dict) -> dict:
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


def _dataset_table(spec: CertifiedSpec, d: dict, rows, empirical, checks, data, n_cert, attack_images, st,
                   timings, escalated_at) -> str:
    radii = spec.radii
    c = spec.certify
    lines = [f"## {d['name']}: {data.summary()}", "",
             f"CERTIFY (Cohen et al. 2019): n0 = {c['n0']}, n = {c['samples']}, α = {c['alpha']:g}, on the first "
             f"{n_cert} test images; radius σ/‖W₁‖₂ · Φ⁻¹(p̲_A) (vote, Clopper–Pearson) or σ/‖W₁‖₂ · (Φ⁻¹(p̲_A) − "
             f"Φ⁻¹(p̄_B))/2 (LAP, Hoeffding). Clean accuracy: LAP (K from the run) on the whole test set. "
             f"Empirical: the L2 adaptive worst case on the first {min(attack_images, n_cert)} of them "
             f"(robustness.md: APGD-L2 and PGD-L2 through every surrogate with EOT {st.eot_samples}, SPSA, "
             f"random directions; escalated at ε = {', '.join(f'{r:g}' for r in escalated_at)}), for the same "
             "predictor.", "",
             "| model | predictor | clean (LAP) | σ/‖W₁‖₂ | abstain | "
             + " | ".join(f"certified r={r:g}" for r in radii) + " | "
             + " | ".join(f"empirical ε={r:g}" for r in radii) + " | train s |",
             "|---|---|---|---|---|" + "---|" * (2 * len(radii) + 1)]
    for r in rows:
        emp = [empirical.get((r["model"], r["predictor"], e)) for e in radii]
        clean = r["clean_lap"] if r["clean_lap"] is not None else r["clean_ot"]
        lines.append(f"| {r['label']} | {r['predictor']} | {clean:.3f} | {r['sigma_over_norm']:.3g} | "
                     f"{r['abstain']:.3f} | " + " | ".join(f"{r[f'certified_{q:g}']:.3f}" for q in radii) + " | "
                     + " | ".join("–" if v is None else f"{v:.3f}" for v in emp) + f" | {r['train_s']:.0f} |")
    sound = [x for x in checks if x["check"].startswith("sound")]
    if sound:
        broken = sum(x["broken"] for x in sound)
        certified = sum(x["certified"] for x in sound)
        lines += ["", f"Soundness: {broken} of {certified} (image, ε, predictor) certificates broken by the L2 "
                      f"worst case ({'sound' if broken == 0 else 'CONTRADICTION: see robustness.md'})."]
    train_s = sum(t.get("train_s", 0) for t in timings.values() if isinstance(t, dict))
    cert_s = sum(t.get("certify_s", 0) for t in timings.values() if isinstance(t, dict))
    lines += ["", f"Wall times: training {train_s:.0f} s (all models), certification {cert_s:.0f} s, "
                  f"attacks {timings.get('attacks_s', 0):.0f} s.", ""]
    return "\n".join(lines)
