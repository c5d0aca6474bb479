"""The experiment spec's validator and loader: :func:`load_spec` reads a TOML file against the one schema
(:mod:`glrnet.experiments.schema`, which documents every section and key) and returns a checked
:class:`~glrnet.experiments.schema.Spec`; every mistake is one line naming the file, section and key."""

from __future__ import annotations

import difflib
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..data import DATASETS, SPLITS
from ..nn.activations import get_activation
from ..nn.losses import LOSSES
from ..robustness.settings import DEFAULT_EPS, AttackSettings
from ..train import TrainConfig
from ..train.config import LEGACY
from .schema import (ANALYSES, ATTACK_KEYS, CLOCKS, Certify, DATA_KEYS, DatasetSpec, ModelSpec, PREDICTORS,
                     Quality, REFERENCE_KEYS, RUN_KEYS, Replications, Robustness, SECTIONS, Spec,
                     TRAINING_OPTIONS, TimeToAccuracy, TimedRun, Transfer, VARIANTS, find_spec,
                     check_seeds)

# ---------------------------------------------------------------------------------------- the validator
class _Checker:
    """Reads one spec file; every error is one line that starts with the file."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str):
        raise ValueError(f"spec {self.path}: {where}: {message}" if where else f"spec {self.path}: {message}")

    def keys(self, table, valid: tuple[str, ...], where: str) -> dict:
        """``table`` as a dict whose keys are all in ``valid``: else one line naming the first unknown key."""
        if not isinstance(table, dict):
            self.fail(where, f"expected a table of keys, got {_show(table)}")
        for key in table:
            if key not in valid:
                self.fail(where, _unknown(key, valid))
        return table

    def get(self, table: dict, key: str, kind: str, where: str, default=None, required: bool = False):
        """``table[key]`` checked against ``kind``: str, int, number, bool, strs, ints, numbers."""
        if key not in table:
            if required:
                self.fail(where, f"{key} is required")
            return default
        v = table[key]
        ok = {"str": lambda v: isinstance(v, str) and v != "",
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool)}
        if kind in ok:
            if not ok[kind](v):
                self.fail(where, f"{key} must be {_KINDS[kind]}, got {_show(v)}")
            return float(v) if kind == "number" else v
        item = {"strs": "str", "ints": "int", "numbers": "number"}[kind]
        if not isinstance(v, list) or not v or not all(ok[item](x) for x in v):
            self.fail(where, f"{key} must be a non-empty list of {_KINDS[item]}s, got {_show(v)}")
        return [float(x) for x in v] if item == "number" else list(v)

    def names(self, table: dict, key: str, valid, where: str, what: str, default=None,
              required: bool = False) -> list[str]:
        """``table[key]``: a list of names, each one of ``valid``."""
        got = self.get(table, key, "strs", where, default, required)
        for n in got:
            if n not in valid:
                self.fail(where, f"{key}: {n!r} is not {what}; valid: {', '.join(valid) or 'none'}")
        return got


_KINDS = {"str": "a non-empty string", "int": "an integer", "number": "a number", "bool": "true or false"}


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(key: str, valid: tuple[str, ...]) -> str:
    """An unknown key and the valid ones; where those include the ~50 training options, the others and the
    closest training options."""
    training = set(TRAINING_OPTIONS) <= set(valid)
    if training and key in DATA_KEYS:
        return f"{key!r} is a [[datasets]] key (each dataset's own), not a training option"
    if training and key in LEGACY:
        return (f"{key!r} is an older spelling: where the noise sits is now one option, perturb = \"activity\" or "
                "\"WHICH=PERTURBATION:STD\" (e.g. \"conv=flipout:0.05\"); ES's σ and SPSA's ε are sigma")
    if training and key == "device":
        return "'device' is the command line's (--device), not the spec's"
    if not training:
        return f"unknown key {key!r}; valid: {', '.join(valid)}"
    own = [k for k in valid if k not in TRAINING_OPTIONS]
    close = difflib.get_close_matches(key, TRAINING_OPTIONS, n=3, cutoff=0.6)
    return (f"unknown key {key!r}; valid: " + (", ".join(own) + ", or " if own else "")
            + "a training option of `glrnet train` (a TrainConfig field)" + (f"; closest: {', '.join(close)}" if close else ""))


def _where(section: str, entry: dict, index: int) -> str:
    name = entry.get("name", entry.get("dataset")) if isinstance(entry, dict) else None
    return f"[[{section}]] {name!r}" if isinstance(name, str) else f"[[{section}]] #{index + 1}"


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file (a path, or the name of a packaged spec): the whole spec is checked —
    every section, key and value, every model as a run on every dataset it is trained on — before
    anything runs."""
    path = find_spec(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"spec {path}: {e}") from None
    c = _Checker(path)
    for section, value in raw.items():
        if section not in SECTIONS:
            c.fail("", f"unknown section [{section}]; valid: {', '.join(f'[{s}]' for s in SECTIONS)}")
        keys, array = SECTIONS[section]
        entries = value if isinstance(value, list) else [value]
        if array is True and not isinstance(value, list):
            c.fail(f"[{section}]", f"write it as [[{section}]] (one table per entry)")
        if array is False and isinstance(value, list):
            c.fail(f"[[{section}]]", f"write it as [{section}] (one table)")
        for i, entry in enumerate(entries):
            c.keys(entry, keys, _where(section, entry, i) if isinstance(value, list) else f"[{section}]")

    exp = raw.get("experiment", {})
    name = c.get(exp, "name", "str", "[experiment]", path.stem)
    notes = c.get(exp, "notes", "str", "[experiment]", "")
    seeds = check_seeds(exp["seeds"], f"spec {path}: [experiment]") if "seeds" in exp else None

    datasets = [_dataset(c, d, i) for i, d in enumerate(raw.get("datasets", []))]
    if not datasets:
        c.fail("", "a spec needs at least one [[datasets]] entry (name, dataset, ...)")
    _unique(c, [d.name for d in datasets], "[[datasets]]")
    dnames = [d.name for d in datasets]

    defaults = raw.get("defaults", {})
    models: dict[str, ModelSpec] = {}
    for i, m in enumerate(raw.get("models", [])):
        where = _where("models", m, i)
        mname = c.get(m, "name", "str", where, required=True)
        if mname in models:
            c.fail(where, "model names must be unique")
        like = c.get(m, "like", "str", where)
        if like is not None and like not in models:
            c.fail(where, f"like = {like!r} names no earlier [[models]] entry")
        own = {k: v for k, v in m.items() if k not in ("name", "label", "like")}
        models[mname] = ModelSpec(mname, c.get(m, "label", "str", where, mname),
                                  {**(models[like].options if like else defaults), **own})
    if not models:
        c.fail("", "a spec needs at least one [[models]] entry")
    if not any(a in raw for a in ANALYSES):
        c.fail("", f"a spec needs at least one analysis: {', '.join(f'[{a}]' for a in ANALYSES)}")
    spec = Spec(path, name, notes, seeds, datasets, models)
    mnames = list(models)

    if "transfer" in raw:
        t, w = raw["transfer"], "[transfer]"
        sources = c.names(t, "sources", mnames, w, "a [[models]] name", required=True)
        attacked = c.names(t, "models", mnames, w, "a [[models]] name", [m for m in mnames if m not in sources])
        if not attacked:
            c.fail(w, "no model left to attack: every [[models]] entry is a source (set models)")
        calibrate = c.get(t, "calibrate_model", "str", w, attacked[0])
        if calibrate not in sources + attacked:
            c.fail(w, f"calibrate_model {calibrate!r} is not a source or model of [transfer]")
        reference = t.get("reference", {})
        c.keys(reference, tuple(attacked), "[transfer.reference]")
        for m, figures in reference.items():
            c.keys(figures, REFERENCE_KEYS, f"[transfer.reference] {m}")
        spec.transfer = Transfer(sources, attacked, c.get(t, "eps", "numbers", w, list(DEFAULT_EPS)),
                                 c.get(t, "headline_target", "number", w, 0.28), calibrate,
                                 _positive(c, t, "attack_images", w, None), _positive(c, t, "lap_replications", w, 1000),
                                 reference)
    if "replications" in raw:
        r, w = raw["replications"], "[replications]"
        if spec.transfer is None:
            c.fail(w, "needs [transfer] (its first source's FGSM examples at the headline ε)")
        study = Replications(c.names(r, "models", spec.transfer.models, w, "a model of [transfer]", required=True),
                             c.get(r, "replications", "ints", w, [10, 100, 1000]),
                             c.names(r, "variants", VARIANTS, w, "a variant", ["plain", "baseline"]))
        if min(study.replications) < 1:
            c.fail(w, f"replications must be ≥ 1, got {study.replications}")
        spec.replications = study
    if "certify" in raw:
        r, w = raw["certify"], "[certify]"
        cert = Certify(c.names(r, "models", mnames, w, "a [[models]] name", _not_sources(spec)),
                       c.get(r, "radii", "numbers", w, [0.25, 0.5, 1.0, 1.5]),
                       _positive(c, r, "n0", w, 100), _positive(c, r, "samples", w, 10000),
                       c.get(r, "alpha", "number", w, 0.001), _positive(c, r, "images", w, 500),
                       c.names(r, "predictors", PREDICTORS, w, "a predictor", list(PREDICTORS)),
                       c.get(r, "seed", "int", w, 0))
        if min(cert.radii) <= 0 or not 0 < cert.alpha < 1:
            c.fail(w, f"radii must be positive and alpha in (0, 1), got radii {cert.radii}, alpha {cert.alpha}")
        spec.certify = cert
    if "quality" in raw:
        q, w = raw["quality"], "[quality]"
        units = c.get(q, "units", "strs", w, ["threshold", "sigmoid"])
        for u in units:
            try:
                get_activation(u)
            except ValueError as e:
                c.fail(w, f"units: {e}")
        spec.quality = Quality(c.names(q, "models", mnames, w, "a [[models]] name", mnames),
                               _one_of(c, q, "dataset", dnames, w, dnames[0]),
                               units, c.names(q, "losses", tuple(LOSSES), w, "a loss", ["cross_entropy"]),
                               _positive(c, q, "budget", w, 100), _positive(c, q, "samples", w, 60),
                               _positive(c, q, "batch", w, 32))
    for i, g in enumerate(raw.get("time_to_accuracy", [])):
        spec.time_to_accuracy.append(_group(c, spec, g, i, dnames))
    _unique(c, [g.name for g in spec.time_to_accuracy], "[[time_to_accuracy]]")
    rb = raw.get("robustness", [])
    tables = rb if isinstance(rb, list) else [rb]
    for i, r in enumerate(tables):
        spec.robustness.append(_robustness(c, spec, r, i, len(tables), dnames, isinstance(rb, list)))
    _unique(c, [r.name for r in spec.robustness], "[[robustness]]")

    _check_runs(c, spec)
    return spec


def _positive(c: _Checker, table: dict, key: str, where: str, default):
    v = c.get(table, key, "int", where, default)
    if v is not None and v < 1:
        c.fail(where, f"{key} must be ≥ 1, got {v}")
    return v


def _one_of(c: _Checker, table: dict, key: str, valid, where: str, default, required: bool = False):
    v = c.get(table, key, "str", where, default, required)
    if v not in valid:
        c.fail(where, f"{key}: {v!r} is not one of {', '.join(valid)}")
    return v


def _unique(c: _Checker, names: list[str], where: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        c.fail(where, f"names must be unique, got {', '.join(repr(d) for d in dup)} more than once")


def _not_sources(spec: Spec) -> list[str]:
    return [m for m in spec.models if spec.transfer is None or m not in spec.transfer.sources]


def _dataset(c: _Checker, d: dict, i: int) -> DatasetSpec:
    where = _where("datasets", d, i)
    dataset = _one_of(c, d, "dataset", DATASETS, where, None, required=True)
    val = c.get(d, "val_fraction", "number", where, 0.1)
    if not 0 <= val < 1:
        c.fail(where, f"val_fraction must be in [0, 1), got {val}")
    return DatasetSpec(c.get(d, "name", "str", where, dataset), dataset, c.get(d, "folder", "str", where, dataset),
                       _one_of(c, d, "split", SPLITS, where, "standard"), _positive(c, d, "image_size", where, None),
                       _positive(c, d, "subset", where, None), val)


def _group(c: _Checker, spec: Spec, g: dict, i: int, dnames: list[str]) -> TimeToAccuracy:
    where = _where("time_to_accuracy", g, i)
    name = c.get(g, "name", "str", where, required=True)
    runs = []
    if not isinstance(g.get("runs"), list) or not g["runs"]:
        c.fail(where, "runs is required: a list of model names, or of tables {model = ..., name = ..., <options>}")
    for j, r in enumerate(g["runs"]):
        rw = f"{where} runs #{j + 1}"
        r = c.keys({"model": r} if isinstance(r, str) else r, RUN_KEYS, rw)
        model = _one_of(c, r, "model", list(spec.models), rw, None, required=True)
        options = {k: v for k, v in r.items() if k not in ("model", "name")}
        opts = {**spec.models[model].options, **options}
        unit, loss = opts.get("activation", TrainConfig().activation), opts.get("loss", TrainConfig().loss)
        runs.append(TimedRun(c.get(r, "name", "str", rw, run_name(model, unit, loss)), model, options))
    _unique(c, [r.name for r in runs], f"{where} runs")
    clock = c.get(g, "clock", "str", where, "cpu")
    if clock not in CLOCKS:
        c.fail(where, f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    seconds = c.get(g, "seconds", "number", where, 300.0)
    if seconds <= 0:
        c.fail(where, f"seconds must be > 0, got {seconds}")
    return TimeToAccuracy(name, c.names(g, "datasets", dnames, where, "a [[datasets]] name", dnames), runs,
                          seconds, clock, _positive(c, g, "eval_every", where, 100), _positive(c, g, "epochs", where, 100),
                          c.get(g, "thresholds", "numbers", where, [0.5, 0.8, 0.9]),
                          c.get(g, "final_quality", "ints", where, []) if "final_quality" in g else [],
                          _positive(c, g, "final_samples", where, 32))


def run_name(model: str, unit: str, loss: str) -> str:
    """A timed run's default name: ``<model>-<unit>-<loss>``, a unit's ':' as '_' (``centered_threshold``)."""
    return f"{model}-{unit.replace(':', '_')}-{loss}"


def _robustness(c: _Checker, spec: Spec, r: dict, i: int, count: int, dnames: list[str], array: bool) -> Robustness:
    where = _where("robustness", r, i) if array else "[robustness]"
    name = c.get(r, "name", "str", where, "" if count == 1 else None)
    if name is None:
        c.fail(where, "several [[robustness]] tables: each needs a name (its reports go in robustness/<name>/)")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k in ATTACK_KEYS}
    try:
        st = AttackSettings(**settings)
    except (TypeError, ValueError) as e:
        c.fail(where, str(e))
    refs = c.get(r, "models", "strs", where, _not_sources(spec))
    source = c.get(r, "source", "str", where, spec.transfer.sources[0] if spec.transfer else None)
    eps = c.get(r, "eps", "numbers", where, list(DEFAULT_EPS))
    headline = c.get(r, "headline", "number", where, None)
    check_eps = c.get(r, "check_eps", "numbers", where, None)
    table = Robustness(name, refs, source, [], eps, headline, _positive(c, r, "images", where, 500), check_eps, st)
    groups = {g.name: g for g in spec.time_to_accuracy}
    possible = list(dnames)
    for ref in refs + ([source] if source else []):
        key = "source" if ref == source and ref not in refs else "models"
        if "/" in ref:
            gname, run = ref.split("/", 1)
            if gname not in groups or run not in [x.name for x in groups[gname].runs]:
                c.fail(where, f"{key}: {ref!r} is no run of a [[time_to_accuracy]] group (write \"<group>/<run>\"; "
                              f"runs: {', '.join(f'{g}/{x.name}' for g in groups for x in groups[g].runs) or 'none'})")
            possible = [d for d in possible if d in groups[gname].datasets]
        elif ref not in spec.models:
            c.fail(where, f"{key}: {ref!r} is not a [[models]] name (nor \"<group>/<run>\" of a "
                          f"[[time_to_accuracy]] group); valid: {', '.join(spec.models)}")
    table.datasets = c.names(r, "datasets", dnames, where, "a [[datasets]] name", possible)
    missing = [d for d in table.datasets if d not in possible]
    if missing:
        c.fail(where, f"datasets: {', '.join(missing)}: some of its runs are not trained there")
    return table


def _check_runs(c: _Checker, spec: Spec) -> None:
    """Every model run (each dataset it is trained on) and every timed run, as TrainConfig.validate sees it."""
    trained = set()
    if spec.transfer:
        trained |= set(spec.transfer.sources) | set(spec.transfer.models)
    if spec.certify:
        trained |= set(spec.certify.models)
    for r in spec.robustness:
        trained |= {m for m in r.models + ([r.source] if r.source else []) if "/" not in m}
    for name in spec.models:
        for d in spec.datasets if name in trained else spec.datasets[:1]:
            try:
                spec.config(name, d).validate()
            except ValueError as e:
                c.fail(f"[[models]] {name!r}" + (f" on {d.name}" if len(spec.datasets) > 1 else ""), str(e))
    for g in spec.time_to_accuracy:
        for run in g.runs:
            for dname in g.datasets:
                d = next(x for x in spec.datasets if x.name == dname)
                try:
                    spec.timed_config(g, run, d).validate()
                except ValueError as e:
                    c.fail(f"[[time_to_accuracy]] {g.name!r} run {run.name!r}"
                           + (f" on {dname}" if len(spec.datasets) > 1 else ""), str(e))
