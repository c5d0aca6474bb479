"""The adaptive-attack protocol (``[robustness]`` / ``[[robustness]]``) on a spec's runs: the tables of
:mod:`glrnet.protocol` (APGD through every surrogate gradient, EOT, SPSA, transfer, random corners;
the per-image worst case; the escalation to convergence; the sanity checks), every attack journaled,
so an interrupted reproduce resumes where it stopped.

Reports go in the dataset's folder for the one unnamed table, in ``<out>/robustness/<name>/`` for a
named one (``/<dataset>/`` below it when the table runs on several datasets). Every seed's run of a
model is attacked, and ``robustness_seeds.md`` gives each figure's spread over the seeds."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import write_index
from ..robustness.protocol import attack_and_report
from ..robustness.reports import write_seed_spread
from ..robustness.settings import ProtocolSettings
from .runs import Site
from .spec import Robustness


def folder_of(site: Site, table: Robustness) -> Path:
    if not table.name:
        return site.folder
    folder = site.out / "robustness" / table.name
    return folder / site.entry.name if len(table.datasets) > 1 else folder


def run_robustness(site: Site, table: Robustness, transfer_eps: float | None = None,
                   after_model=None) -> tuple[list[dict], list[dict]]:
    """One protocol table on ``site``: its rows and checks. ``transfer_eps``: the [transfer] analysis's
    headline ε on this dataset (the table's headline unless it sets one); ``after_model`` (optional):
    more checks per model, as :func:`glrnet.protocol.attack_and_report` takes them."""
    resolved = {ref: site.resolve(ref) for ref in table.models}
    chosen, seed_of, base = {}, {}, {}
    for ref, runs in resolved.items():           # each model's own run first, then its other seeds
        run, (model, noisy, seed) = next(iter(runs.items()))
        chosen[run], seed_of[run], base[run] = (model, noisy), seed, ref
    for ref, runs in resolved.items():
        for run, (model, noisy, seed) in list(runs.items())[1:]:
            chosen[run], seed_of[run], base[run] = (model, noisy), seed, ref
    source = None
    if table.source is not None:
        source = next(iter(site.resolve(table.source, model_seeds=False).values()))[0]
    headline = table.headline if table.headline is not None else transfer_eps if transfer_eps is not None \
        else table.eps[len(table.eps) // 2]
    settings = ProtocolSettings(tuple(table.eps), headline, None if table.check_eps is None else tuple(table.check_eps),
                                table.settings)
    x, y = site.data.x_test[:table.images], site.data.y_test[:table.images]
    folder = folder_of(site, table)
    title = f"{site.spec.name} / {site.entry.name}" + (f" / {table.name}" if table.name else "") \
        + (f" ({table.settings.norm})" if table.settings.norm != "Linf" else "")
    result = attack_and_report(folder, chosen, x, y, settings, source, title=title, quiet=site.quiet,
                               extra_checks=after_model, resume=True)
    if len(set(seed_of.values())) > 1:
        write_seed_spread(folder, result.rows, result.checks, base, chosen, headline)
    if table.name:
        write_index(folder, f"glrnet reproduce: spec {site.spec.name}, [[robustness]] {table.name}")
    return result.rows, result.checks
