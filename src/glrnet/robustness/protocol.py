"""The adaptive-attack protocol on noisy (GLR-trained) networks: attacks at every ε, the
per-image worst case, the escalation to convergence and the sanity checks.

Threat model (white box): the attacker knows the architecture, the weights, the noise
family and σ, the defence's prediction rule (OT, or LAP with its K) — everything but the
noise the defender draws at prediction time, which is fresh and secret. L∞ budget ε on
images in [0, 1]. A defended model is attacked through the predictor it is deployed
with: LAP for networks trained with noise, OT for the BP baseline; every adversarial
image is then scored by both OT and LAP.

Attacks (Athalye et al. 2018; Croce & Hein 2020; Tramèr et al. 2020):

``transfer-fgsm``        FGSM from the first source network (the seed's setting).
``fgsm``                 one white-box step through the default surrogate.
``apgd-<loss>[<s>]``     APGD (torchattacks), loss ``ce`` or ``dlr``, on :class:`LAPClassifier`:
                         log p̄ with p̄ the mean softmax over S fresh noise samples (expectation
                         over transformation), its gradient through φ by surrogate ``s``
                         (:func:`surrogates_for`: exact, Gaussian-smoothed BPDA, sigmoid slopes,
                         straight-through, or the likelihood-ratio input gradient
                         ∇ₓ E[p] = W⁽⁰⁾ᵀ E[p s(r⁽⁰⁾)], which differentiates nothing).
``pgd-ce[<s>]``          (L2 only) PGD with a fixed step and a random start on the same classifier:
                         APGD's step-size rule halves its steps when noisy EOT losses fail to
                         improve, which in the L2 ball left it weaker than one FGSM step.
``apgd-ce[ot]``          APGD on the noise-free network, transferred to the noisy predictor.
``spsa``                 gradient-free: SPSA estimates of the margin of the defended predictor's own
                         probabilities (Uesato et al. 2018).
``random``               the worst of R random corners x ± ε.

The per-example worst case counts an image as robust only if every attack fails on it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from ..nn.modules import noisy_layers
from ..utils.seeding import stream_seed
from .attacks import attack_model, attack_plan, correct, plan_attacks
from .journal import JOURNAL, AttackJournal, fingerprint
from .reports import write_reports
from .settings import CONVERGENCE_TOLERANCE, AttackSettings, ProtocolSettings, validate_eps

#: the models attacked, by name: a module with noisy layers (defended by LAP), or (module, noisy) where
#: ``noisy`` says whether it was trained with noise (LAP) or is a noise-free baseline (OT)
Models = dict[str, "nn.Module | tuple[nn.Module, bool]"]


@dataclass
class RobustnessResult:
    """What :func:`evaluate_robustness` measured. ``rows``: (model, attack, ε, acc_ot, acc_lap, acc_vote,
    images); ``masks[model, ε]``: every predictor's per-image worst case {"ot", "lap", "vote"} (ε = 0.0: the
    clean correctness); ``defended[model]``: the predictor the model is deployed with ("lap" or "ot");
    ``skipped[model]``: the surrogates its attack plan left out, each with the reason."""

    rows: list[dict] = field(default_factory=list)
    masks: dict[tuple[str, float], dict[str, Tensor]] = field(default_factory=dict)
    defended: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    def survivors(self, name: str, eps: float) -> Tensor:
        """The images on which every attack on ``name`` at ``eps`` failed, for its defended predictor."""
        return self.masks[name, eps][self.defended[name]]


@dataclass
class Escalation:
    """The convergence check at one ε: [(effort multiplier, worst case after it)], e.g. [(2, 0.043), (4, 0.030)],
    and the per-image mask of the images that survived every level."""

    levels: list[tuple[int, float]]
    alive: Tensor


@dataclass
class ChecksResult:
    """What :func:`sanity_checks` found: the checks (each a measured pass / fail), the rows of the escalation
    levels (attacks ``worst-case 2×``, ``4×``, …) and per (model, ε) the escalated mask of the defended
    predictor."""

    checks: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    escalated: dict[tuple[str, float], Tensor] = field(default_factory=dict)


@dataclass
class ProtocolResult:
    """The whole protocol's results: the rows and checks of the reports, every predictor's worst-case masks
    per (model, ε) (ε = 0.0: clean), the defended predictor's escalated masks, the surrogates left out."""

    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    masks: dict[tuple[str, float], dict[str, Tensor]] = field(default_factory=dict)
    escalated: dict[tuple[str, float], Tensor] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, robust: RobustnessResult, checked: ChecksResult) -> "ProtocolResult":
        return cls(robust.rows + checked.rows, list(checked.checks), dict(robust.masks), dict(checked.escalated),
                   dict(robust.skipped))

    def add(self, other: "ProtocolResult") -> None:
        """Another model's results appended to these."""
        self.rows += other.rows
        self.checks += other.checks
        self.masks.update(other.masks)
        self.escalated.update(other.escalated)
        self.skipped.update(other.skipped)


def defended_models(models: Models) -> dict[str, tuple[nn.Module, bool]]:
    """Every entry as (module, noisy); a bare module is noisy when it has noisy layers."""
    return {name: (entry, bool(noisy_layers(entry))) if isinstance(entry, nn.Module) else tuple(entry)
            for name, entry in models.items()}


def describe_attack(attack: str) -> str:
    """An attack's registry name in words: ``apgd-dlr[sigmoid:8]`` → APGD (DLR loss) through the sigmoid:8
    surrogate."""
    base, _, arg = attack.partition("[")
    arg = arg.rstrip("]")
    words = {"transfer-fgsm": "FGSM transferred from the source network", "fgsm": "FGSM", "pgd": "PGD",
             "apgd-ce": "APGD (cross-entropy)", "apgd-dlr": "APGD (DLR loss)", "apgdt-dlr": "targeted APGD (DLR loss)",
             "spsa": "SPSA (no gradient)", "random": "random directions"}.get(base, base)
    return words + (f" through the {arg} surrogate" if arg else "")


def failed_check_line(c: dict, report) -> str:
    """The console line of a failed sanity check; a check that fails only because the ε grid stops short says so."""
    if c["check"].startswith("reaches chance"):
        return (f"glrnet robustness: note for {c['model']}: accuracy is still {c['value']} at the largest ε of the grid, "
                f"so the check '{c['check']}' cannot pass: the grid stops short of where the attacks reach chance "
                f"(add a larger --eps to run it); see {report}")
    return (f"glrnet robustness: sanity check FAILED for {c['model']}: {c['check']} (measured {c['value']}); "
            f"see {report}")


def _pixels(x) -> int | None:
    return math.prod(x.shape[1:]) if hasattr(x, "shape") else None


def _accuracies(correct: dict) -> dict:
    """acc_ot / acc_lap / acc_vote of per-image correctness masks (NaN for a predictor not scored)."""
    return {f"acc_{k}": correct[k].double().mean().item() if k in correct else math.nan for k in ("ot", "lap", "vote")}


def evaluate_robustness(models: Models, x: Tensor, y: Tensor, settings: ProtocolSettings,
                        source: nn.Module | None = None, *, quiet: bool = False,
                        journal: AttackJournal | None = None) -> RobustnessResult:
    """Every attack of each model's plan at every ε of ``settings.grid``, each image scored by every predictor,
    and the per-image worst case. ``journal`` records each attack as it finishes and replays the recorded ones."""
    from tqdm.auto import tqdm
    settings.validate(_pixels(x))
    st, result = settings.attacks, RobustnessResult()
    bar = tqdm(total=len(models) * len(settings.grid), desc="attacks", unit="model·ε", disable=quiet, leave=False,
               dynamic_ncols=True)
    for name, (model, noisy) in defended_models(models).items():
        result.defended[name] = "lap" if noisy else "ot"
        result.skipped[name] = plan_attacks(model, noisy, st, x).skipped
        if not quiet:
            for what, why in result.skipped[name].items():
                tqdm.write(f"[robustness] {name}: no attack through the {what} surrogate: {why}")
        clean = result.masks[name, 0.0] = correct(model, x, y, noisy, st.lap_replications, st.seed, st.score_vote)
        result.rows.append({"model": name, "attack": "none", "eps": 0.0, **_accuracies(clean), "images": len(x)})
        for eps in settings.grid:
            t0 = time.perf_counter()
            bar.set_description(f"attacks {name} ε={eps:g}")
            res = attack_model(model, noisy, x, y, eps, st, source, progress=bar,
                               memo=None if journal is None else journal.memo(name, eps, "1×"))
            result.masks[name, eps] = dict(res["worst-case"])
            result.rows += [{"model": name, "attack": attack, "eps": eps, **_accuracies(c), "images": len(x)}
                            for attack, c in res.items()]
            bar.update()
            if not quiet:
                w = res["worst-case"]
                tqdm.write(f"[robustness] {name} ε={eps:.3f}: worst-case OT {w['ot'].double().mean():.3f}"
                           + (f" LAP {w['lap'].double().mean():.3f}" if "lap" in w else "")
                           + f" ({time.perf_counter() - t0:.0f}s)")
    bar.close()
    return result


def escalate(model: nn.Module, noisy: bool, x: Tensor, y: Tensor, eps: float, st: AttackSettings, alive: Tensor,
             source: nn.Module | None = None, *, tolerance: float = CONVERGENCE_TOLERANCE, progress: bool = False,
             journal: AttackJournal | None = None, name: str = "") -> Escalation:
    """The convergence check: double the steps, restarts and samples (fresh seeds) and attack
    again only the images on which every earlier attack failed (``alive``), until one doubling
    breaks no more than ``tolerance`` of the images or ``st.max_doublings`` is reached.

    The worst case is a per-image union, so attacking only the survivors gives exactly the
    union "all earlier attacks ∪ the doubled ones" at a fraction of the cost; within a level
    each attack, too, attacks only the images every attack before it failed on. ``journal``
    records every attack of every level under the model's ``name``."""
    key = "lap" if noisy else "ot"
    alive = alive.clone()
    levels = []
    for level in range(1, st.max_doublings + 1):
        st, m = st.doubled(), 2 ** level
        before = alive.double().mean().item()
        names = (["transfer-fgsm"] if source is not None else []) + attack_plan(model, noisy, st, x)
        for i, attack in enumerate(names):
            idx = alive.nonzero().squeeze(1)
            if not len(idx):
                break
            t0 = time.perf_counter()
            memo = None if journal is None else partial(journal.memo(name, eps, f"{m}×"), idx=idx)
            held = attack_model(model, noisy, x[idx], y[idx], eps, replace(st, seed=stream_seed(st.seed, i)),
                                source, attacks=[attack], memo=memo)[attack][key]
            alive[idx] = held
            if progress:
                print(f"[robustness] {name}, ε = {eps:g}, effort ×{m}: {describe_attack(attack)} on the {len(idx)} "
                      f"images still classified correctly broke {int((~held).sum())} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        after = alive.double().mean().item()
        levels.append((m, after))
        if progress:
            print(f"[robustness] {name}, ε = {eps:g}: worst-case accuracy {before:.3f} → {after:.3f} at effort ×{m} "
                  f"(the attacks' steps, restarts and samples doubled until it moves by ≤ {tolerance:g})", flush=True)
        if before - after <= tolerance + 1e-9:
            break
    return Escalation(levels, alive)


def _accuracy(rows: list[dict], model: str, attack: str, eps: float, key: str) -> float | None:
    r = next((r for r in rows if r["model"] == model and r["attack"] == attack and r["eps"] == eps), None)
    return None if r is None else r[key]


def attack_checks(name: str, model: nn.Module, noisy: bool, rows: list[dict], settings: ProtocolSettings,
                  x: Tensor | None = None) -> list[dict]:
    """The checks on one model's rows: iterative ≤ one-step at every ε, the worst case falls monotonically with
    ε and reaches chance at the largest, transfer weaker than white box at the headline ε."""
    key = "acc_lap" if noisy else "acc_ot"
    acc = partial(_accuracy, rows, name)
    eps_list = sorted({r["eps"] for r in rows if r["model"] == name and r["eps"] > 0})
    iterative_attacks = [a for a in attack_plan(model, noisy, settings.attacks, x)
                         if a.startswith(("apgd-ce", "pgd-ce")) and not a.endswith("[ot]")]
    checks = []
    for eps in eps_list if iterative_attacks else ():   # the strongest iterative attack through the model's gradients
        iterative = min(iterative_attacks, key=lambda a: acc(a, eps, key))
        one, it = acc("fgsm", eps, key), acc(iterative, eps, key)
        checks.append({"model": name, "check": f"iterative ≤ one-step (ε={eps:g}, {key})",
                       "value": f"{iterative} {it:.3f} vs fgsm {one:.3f}", "pass": it <= one + 0.02})
    worst = [acc("worst-case", e, key) for e in eps_list]
    checks.append({"model": name, "check": f"worst case falls monotonically with ε ({key})",
                   "value": " → ".join(f"{w:.3f}" for w in worst),
                   "pass": all(b <= a + 0.02 for a, b in zip(worst, worst[1:]))})
    checks.append({"model": name, "check": f"reaches chance (≤ 0.15) at ε = {eps_list[-1]:g} ({key})",
                   "value": f"{worst[-1]:.3f}", "pass": worst[-1] <= 0.15})
    tr, wc = acc("transfer-fgsm", settings.headline, key), acc("worst-case", settings.headline, key)
    if tr is not None and wc is not None:
        checks.append({"model": name, "check": f"transfer weaker than white box (ε={settings.headline:g}, {key})",
                       "value": f"transfer {tr:.3f} vs worst case {wc:.3f}", "pass": tr >= wc})
    return checks


def convergence_check(name: str, eps: float, key: str, base: float, levels: list[tuple[int, float]]) -> dict:
    """The check of one escalation: it passes when the last doubling moved the worst case by ≤ the tolerance."""
    path = [base] + [a for _, a in levels]
    return {"model": name, "check": f"doubling steps, restarts and samples (on the surviving images) "
                                    f"moves the worst case ≤ {CONVERGENCE_TOLERANCE} (ε={eps:g}, {key})",
            "value": " → ".join([f"{base:.3f}"] + [f"{a:.3f} ({m}×)" for m, a in levels]),
            "pass": path[-2] - path[-1] <= CONVERGENCE_TOLERANCE + 1e-9, "eps": eps, "predictor": key,
            "escalated": path[-1], "multiplier": levels[-1][0]}


def sanity_checks(models: Models, robust: RobustnessResult, x: Tensor, y: Tensor, settings: ProtocolSettings,
                  source: nn.Module | None = None, *, quiet: bool = False,
                  journal: AttackJournal | None = None) -> ChecksResult:
    """The protocol's self-checks (each a measured pass / fail with its numbers) on what
    :func:`evaluate_robustness` measured (``robust``): :func:`attack_checks`, and the convergence check
    (:func:`escalate`), which doubles steps, restarts and samples on the images that survived every attack
    at ``settings.escalated_eps`` until a doubling moves the worst case by at most ``CONVERGENCE_TOLERANCE``;
    it passes when the last one did."""
    result = ChecksResult()
    for name, (model, noisy) in defended_models(models).items():
        key = "acc_lap" if noisy else "acc_ot"
        result.checks += attack_checks(name, model, noisy, robust.rows, settings, x)
        for eps in settings.escalated_eps:
            t0 = time.perf_counter()
            esc = escalate(model, noisy, x, y, eps, settings.attacks, robust.survivors(name, eps), source,
                           progress=not quiet, journal=journal, name=name)
            result.escalated[name, eps] = esc.alive
            result.checks.append(convergence_check(name, eps, key, _accuracy(robust.rows, name, "worst-case", eps, key),
                                                   esc.levels))
            result.rows += [{"model": name, "attack": f"worst-case {m}×", "eps": eps,
                             "acc_ot": a if key == "acc_ot" else math.nan,
                             "acc_lap": a if key == "acc_lap" else math.nan, "images": len(x)} for m, a in esc.levels]
            if not quiet:
                print(f"[robustness] {name} ε={eps:g} escalation: {result.checks[-1]['value']} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return result


def attack_and_report(out: Path, models: Models, x: Tensor, y: Tensor, settings: ProtocolSettings,
                      source: nn.Module | None = None, *earlier_form, title: str = "", quiet: bool = False,
                      extra_checks: Callable[[str, ProtocolResult], list[dict]] | None = None,
                      resume: bool | None = None) -> ProtocolResult:
    """The whole protocol, one model at a time: attacks at every ε, the checks with the
    escalation, and the reports rewritten (atomically) after each model, so that a run
    stopped part-way keeps every finished model's results. ``extra_checks(name, result)`` (optional)
    returns more checks for the model's report from its :class:`ProtocolResult` (e.g. the certified
    radii's soundness check reads its ``masks`` and ``escalated``).

    Every attack is recorded in ``out``'s journal (:mod:`glrnet.robustness.journal`) as it finishes;
    ``resume`` replays a journal left by an interrupted run of the same settings (``False``: a
    journal there is an error; ``None``: no journal). The earlier call form
    ``attack_and_report(out, models, x, y, eps, attack_settings, source, headline, check_eps)`` still works."""
    if not isinstance(settings, ProtocolSettings):
        settings, source = _from_earlier_form(x, settings, source, *earlier_form)
    settings.validate(_pixels(x))
    out.mkdir(parents=True, exist_ok=True)
    entries = defended_models(models)
    journal = None if resume is None else AttackJournal(
        out / JOURNAL, fingerprint(entries, x, y, settings.grid, settings.attacks, source), resume)
    if journal is not None and len(journal) and not quiet:
        print(f"[robustness] resuming: {len(journal)} attacks recorded in {out / JOURNAL}", flush=True)
    result = ProtocolResult()
    for name, entry in entries.items():
        one = {name: entry}
        robust = evaluate_robustness(one, x, y, settings, source, quiet=quiet, journal=journal)
        part = ProtocolResult.of(robust, sanity_checks(one, robust, x, y, settings, source, quiet=quiet,
                                                       journal=journal))
        if extra_checks is not None:
            part.checks += extra_checks(name, part)
        result.add(part)
        write_reports(out, result.rows, result.checks, settings.headline, settings.attacks, len(x), title=title,
                      skipped=result.skipped)
    for c in (c for c in result.checks if not c["pass"]):   # on the console whatever ``quiet`` says: a failed
        print(failed_check_line(c, out / "robustness.md"), file=sys.stderr)   # check qualifies every figure
    return result


def _from_earlier_form(x, eps, st: AttackSettings, source=None, headline=None, check_eps=None):
    """(ProtocolSettings, source) of the earlier call form (…, eps, attack settings, source, headline, check_eps),
    its budgets refused with the messages that named the command-line flag."""
    validate_eps([*eps, *([] if headline is None else [headline])], st.norm, _pixels(x))
    return ProtocolSettings(tuple(eps), headline, None if check_eps is None else tuple(check_eps), st), source
