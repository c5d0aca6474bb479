"""The one runner behind ``glrnet reproduce``: a spec's runs, then its analyses, one dataset at a time.

For every ``[[datasets]]`` entry (``--dataset``: only that one's):

1. ``[quality]`` (on its dataset): gradient quality at the initial weights, nothing trained;
2. the model runs the analyses need, each once per seed (``models/<run>/``; finished runs reused,
   interrupted ones resumed), then ``[transfer]`` and ``[replications]``;
3. ``[certify]``: certificates of its models' runs;
4. every ``[[time_to_accuracy]]`` group on this dataset (``<out>/<group>/``);
5. every ``[robustness]`` table on this dataset (with the certificates' soundness check where a table
   attacks certified runs in the L2 ball), then the certified-radii table.

Outputs: a one-dataset spec writes its dataset's files into ``--out`` itself, a spec of several into
``<out>/<dataset name>/``; ``spec.toml`` (the spec as run), ``summary.json`` (``summary-<dataset>.json``
for a ``--dataset`` run) and an index ``README.md``. Rerunning the same spec into the same ``--out``
reuses what is finished and resumes the rest; a folder that holds anything else is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..checkpoint import atomic_write_text, write_index
from ..train import resolve_device
from .certified import record_attacks, run_certify, soundness_hook, write_overview, write_report
from .protocol import folder_of, run_robustness
from .study import run_group, run_quality
from .transfer import run_replications, run_transfer
from .runs import Site, data_folder, load_entry
from .schema import Spec, find_spec, spec_name, spec_path
from .spec import load_spec

REPORT_SUFFIXES = (".md", ".csv", ".png", ".json", ".toml")
RUN_FILES = ("metrics.json", "checkpoint.safetensors", "model.safetensors")   # what a `glrnet train` folder holds


def resolve_spec(spec: str | Path | None, quick: bool) -> Path:
    """The spec file to run: ``--spec`` (a file or a packaged name; default paper), or the packaged quick
    spec for ``--quick``, which resizes no other spec."""
    if not quick:
        return find_spec(spec if spec is not None else "paper")
    quick_file = spec_path("quick")
    if spec is not None and find_spec(spec).resolve() != quick_file.resolve():
        raise ValueError(f"--quick runs the packaged quick spec (digits, small sizes) and cannot shrink --spec {spec}: "
                         f"drop --quick to run {spec} as written, or drop --spec")
    return quick_file


def output_folder(out: str | Path, spec: Spec) -> Path:
    """``out`` created for ``spec``'s results: refused (one line) if it is a file, holds a ``glrnet train``
    run, another spec's results, or anything else; a folder of this spec's own earlier run is resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    if out.is_dir():
        run = [f for f in RUN_FILES if (out / f).is_file()]
        if run:
            raise ValueError(f"--out {out} holds a glrnet train run ({run[0]}), not a spec's results: "
                             "choose another --out")
        if (out / "spec.toml").is_file():
            other = spec_name(out / "spec.toml")
            if other != spec.name:
                raise ValueError(f"--out {out} holds the results of spec {other!r} ({out / 'spec.toml'}), "
                                 f"not of {spec.name!r}: choose another --out")
        elif any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no spec's results (no spec.toml): "
                             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "spec.toml", spec.path.read_text())
    return out


def export_results(out: str | Path, dest: str | Path) -> list[Path]:
    """Copy what a run reports (tables, CSV, figures, summary, the spec; each run's metrics,
    history and curves) from ``out`` to ``dest`` — no weights, no adversarial images."""
    out, dest = Path(out), Path(dest)
    copied = []
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out)
        if not f.is_file() or f.suffix not in REPORT_SUFFIXES or "adversarial" in rel.parts \
                or f.name.startswith("checkpoint"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        copied.append(target)
    return copied


def reproduce(spec: str | Path | None, out: str | Path, dataset: str | None = None, data_dir: str | None = None,
              quick: bool = False, device: str = "cpu", quiet: bool = False, robustness: bool = True,
              export: str | Path | None = None, seeds: list[int] | None = None) -> dict:
    """Run a spec end to end into ``out`` (see the module docstring); ``dataset``: only that [[datasets]]
    entry's analyses (e.g. one process per dataset into one ``out``); ``robustness=False`` skips the
    protocol; ``export``: copy the reports there (e.g. ``docs/results/mnist``). Returns the summary."""
    t_start = time.perf_counter()
    resolve_device(device)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    spec_obj = load_spec(resolve_spec(spec, quick)).with_seeds(seeds)
    chosen = spec_obj.datasets_named(dataset)
    for entry in chosen:               # every data folder found before anything is written
        data_folder(entry, data_dir)
    out = output_folder(out, spec_obj)
    summary = {"spec": spec_obj.name, "seeds": spec_obj.seeds, "datasets": {}}
    for entry in chosen:
        summary["datasets"][entry.name] = run_dataset(spec_obj, entry, out, data_dir, device, quiet, robustness)
    if spec_obj.certify is not None and len(spec_obj.datasets) > 1:
        write_overview(out, spec_obj)
    summary["seconds"] = time.perf_counter() - t_start
    atomic_write_text(out / ("summary.json" if dataset is None else f"summary-{dataset}.json"),
                      json.dumps(summary, indent=1, ensure_ascii=False))
    write_index(out, f"glrnet reproduce: spec {spec_obj.name}")
    if export is not None:
        export_results(out, export)
    if not quiet:
        for d in summary["datasets"].values():
            for t in d.get("transfer", {}).get("tables", []):
                print(Path(t).read_text())
        if spec_obj.certify is not None:
            print((out / "certified.md").read_text())
        print(f"[reproduce] done in {summary['seconds']:.0f}s; outputs in {out}")
    return summary


def run_dataset(spec: Spec, entry, out: Path, data_dir: str | None, device: str, quiet: bool,
                robustness: bool) -> dict:
    """Every analysis of ``spec`` on one of its datasets; this dataset's summary."""
    t0 = time.perf_counter()
    data = load_entry(entry, data_dir)
    folder = out if len(spec.datasets) == 1 else out / entry.name
    site = Site(spec, entry, out, folder, data.to(device), data_folder(entry, data_dir), device, quiet)
    site.say(f"[reproduce] spec {spec.name}: {data.summary()}")
    summary, timings = {}, {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - t
        return result

    if spec.quality is not None and spec.quality.dataset == entry.name:
        summary["quality_rows"] = timed("quality", run_quality, site)
    headline = None
    if spec.transfer is not None:
        summary["transfer"] = timed("transfer", run_transfer, site)
        headline = summary["transfer"]["headline_eps"]
        if spec.replications is not None:
            summary["replications_rows"] = len(timed("replications", run_replications, site, headline))
    certs = timed("certify", run_certify, site) if spec.certify is not None else None
    for group in spec.time_to_accuracy:
        if entry.name in group.datasets:
            summary.setdefault("time_to_accuracy", {})[group.name] = len(
                timed(f"time_to_accuracy {group.name}", run_group, site, group))
    if robustness:
        for table in spec.robustness:
            if entry.name not in table.datasets:
                continue
            l2 = certs is not None and table.settings.norm == "L2"
            y = site.data.y_test[:table.images]
            rows, checks = timed(f"robustness {table.name}".strip(), run_robustness, site, table, headline,
                                 soundness_hook(certs, y) if l2 else None)
            if l2:
                where = folder_of(site, table)
                record_attacks(certs, rows, checks, f"{where.relative_to(out) / 'robustness.md'}, the first "
                                         f"{len(y)} images, EOT {table.settings.eot_samples}")
            summary.setdefault("robustness", {})[table.name or "robustness"] = {
                "rows": len(rows), "checks_passed": sum(c["pass"] for c in checks), "checks": len(checks)}
    if certs is not None:
        summary["certify"] = {}
        write_report(site, certs, summary["certify"])
    if folder != out:
        write_index(folder, f"glrnet reproduce: spec {spec.name} on {entry.name}")
    summary["timings_seconds"] = {**timings, "total": time.perf_counter() - t0}
    return summary
