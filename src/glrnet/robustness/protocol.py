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
from dataclasses import replace
from functools import partial
from pathlib import Path

from torch import Tensor

from .settings import CONVERGENCE_TOLERANCE, DEFAULT_EPS, AttackSettings, validate_eps
from .attacks import attack_model, attack_plan, correct
from ..utils.seeding import stream_seed
from .journal import JOURNAL, AttackJournal, fingerprint
from ..nn.containers import NoisySequential
from .reports import ROBUST_FIELDS, write_reports, write_seed_spread  # noqa: F401 (ROBUST_FIELDS re-exported)




def evaluate_robustness(models: dict[str, tuple[NoisySequential, bool]], x: Tensor, y: Tensor, eps_list: list[float],
                        st: AttackSettings, source: NoisySequential | None = None, quiet: bool = False,
                        survivors: dict | None = None, masks: dict | None = None,
                        journal: AttackJournal | None = None) -> list[dict]:
    """Rows (model, attack, ε, acc_ot, acc_lap, acc_vote, images); ``survivors`` (if given) receives, per
    (model, ε), the per-image mask of the defended predictor's worst case (the convergence
    check attacks only those images again); ``masks`` every predictor's worst-case mask
    {"ot", "lap", "vote"} per (model, ε), and per (model, 0.0) the clean correctness. ``journal``
    records each attack as it finishes and replays the recorded ones."""
    from tqdm.auto import tqdm
    rows = []
    bar = tqdm(total=len(models) * len(eps_list), desc="attacks", unit="model·ε", disable=quiet, leave=False,
               dynamic_ncols=True)
    for name, (model, noisy) in models.items():
        clean = correct(model, x, y, noisy, st.lap_replications, st.seed, st.score_vote)
        if masks is not None:
            masks[name, 0.0] = clean
        rows.append({"model": name, "attack": "none", "eps": 0.0, **_accuracies(clean), "images": len(x)})
        for eps in eps_list:
            t0 = time.perf_counter()
            bar.set_description(f"attacks {name} ε={eps:g}")
            res = attack_model(model, noisy, x, y, eps, st, source, progress=bar,
                               memo=None if journal is None else journal.memo(name, eps, "1×"))
            if survivors is not None:
                survivors[name, eps] = res["worst-case"]["lap" if noisy else "ot"]
            if masks is not None:
                masks[name, eps] = dict(res["worst-case"])
            for attack, c in res.items():
                rows.append({"model": name, "attack": attack, "eps": eps, **_accuracies(c), "images": len(x)})
            bar.update()
            if not quiet:
                w = res["worst-case"]
                tqdm.write(f"[robustness] {name} ε={eps:.3f}: worst-case OT {w['ot'].double().mean():.3f}"
                           + (f" LAP {w['lap'].double().mean():.3f}" if "lap" in w else "")
                           + f" ({time.perf_counter() - t0:.0f}s)")
    bar.close()
    return rows




def _accuracies(correct: dict) -> dict:
    """acc_ot / acc_lap / acc_vote of per-image correctness masks (NaN for a predictor not scored)."""
    return {f"acc_{k}": correct[k].double().mean().item() if k in correct else math.nan for k in ("ot", "lap", "vote")}


def escalate(model: NoisySequential, noisy: bool, x: Tensor, y: Tensor, eps: float, st: AttackSettings,
             alive: Tensor, source: NoisySequential | None = None,
             tolerance: float = CONVERGENCE_TOLERANCE, progress: bool = False,
             final: dict | None = None, journal: AttackJournal | None = None,
             name: str = "") -> list[tuple[int, float]]:
    """The convergence check: double the steps, restarts and samples (fresh seeds) and attack
    again only the images on which every earlier attack failed (``alive``), until one doubling
    breaks no more than ``tolerance`` of the images or ``st.max_doublings`` is reached.

    The worst case is a per-image union, so attacking only the survivors gives exactly the
    union "all earlier attacks ∪ the doubled ones" at a fraction of the cost; within a level
    each attack, too, attacks only the images every attack before it failed on. Returns
    [(multiplier, worst case after it)], e.g. [(2, 0.043), (4, 0.030)]; ``final["alive"]`` (if
    given) receives the escalated per-image mask. ``journal`` records every attack of every
    level under the model's ``name``."""
    key = "lap" if noisy else "ot"
    alive = alive.clone()
    levels = []
    for level in range(1, st.max_doublings + 1):
        st, m = st.doubled(), 2 ** level
        before = alive.double().mean().item()
        names = (["transfer-fgsm"] if source is not None else []) + attack_plan(model, noisy, st)
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
                print(f"[robustness] ε={eps:g} {m}×: {attack} on {len(idx)} images broke {int((~held).sum())} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        after = alive.double().mean().item()
        levels.append((m, after))
        if progress:
            print(f"[robustness] ε={eps:g} {m}× worst case {before:.3f} → {after:.3f}", flush=True)
        if before - after <= tolerance + 1e-9:
            break
    if final is not None:
        final["alive"] = alive
    return levels


def sanity_checks(models: dict[str, tuple[NoisySequential, bool]], rows: list[dict], survivors: dict, x, y,
                  headline: float, st: AttackSettings, source: NoisySequential | None = None,
                  check_eps: list[float] | None = None, quiet: bool = False,
                  escalated: dict | None = None, journal: AttackJournal | None = None) -> list[dict]:
    """The protocol's self-checks (each a measured pass / fail with its numbers).

    The convergence check (``escalate``) doubles steps, restarts and samples on the images
    that survived every attack, at ``check_eps`` (default: the headline ε), until a doubling
    moves the worst case by at most ``CONVERGENCE_TOLERANCE``; it passes when the last one
    did. ``survivors`` are the per-image worst-case masks that ``evaluate_robustness`` filled.
    Its levels are appended to ``rows`` as attacks ``worst-case 2×``, ``4×``, …; ``escalated`` (if
    given) receives the escalated per-image mask of the defended predictor per (model, ε).
    """
    def acc(model, attack, eps, key):
        r = next((r for r in rows if r["model"] == model and r["attack"] == attack and r["eps"] == eps), None)
        return None if r is None else r[key]

    checks = []
    eps_list = sorted({r["eps"] for r in rows if r["eps"] > 0})
    for name, (model, noisy) in models.items():
        key = "acc_lap" if noisy else "acc_ot"
        iterative_attacks = [a for a in attack_plan(model, noisy, st)
                             if a.startswith(("apgd-ce", "pgd-ce")) and not a.endswith("[ot]")]
        for eps in eps_list:   # the strongest iterative attack through the model's own gradients
            iterative = min(iterative_attacks, key=lambda a: acc(name, a, eps, key))
            one, it = acc(name, "fgsm", eps, key), acc(name, iterative, eps, key)
            checks.append({"model": name, "check": f"iterative ≤ one-step (ε={eps:g}, {key})",
                           "value": f"{iterative} {it:.3f} vs fgsm {one:.3f}", "pass": it <= one + 0.02})
        worst = [acc(name, "worst-case", e, key) for e in eps_list]
        mono = all(b <= a + 0.02 for a, b in zip(worst, worst[1:]))
        checks.append({"model": name, "check": f"worst case falls monotonically with ε ({key})",
                       "value": " → ".join(f"{w:.3f}" for w in worst), "pass": mono})
        checks.append({"model": name, "check": f"reaches chance (≤ 0.15) at ε = {eps_list[-1]:g} ({key})",
                       "value": f"{worst[-1]:.3f}", "pass": worst[-1] <= 0.15})
        tr, wc = acc(name, "transfer-fgsm", headline, key), acc(name, "worst-case", headline, key)
        if tr is not None and wc is not None:
            checks.append({"model": name, "check": f"transfer weaker than white box (ε={headline:g}, {key})",
                           "value": f"transfer {tr:.3f} vs worst case {wc:.3f}", "pass": tr >= wc})
        for eps in check_eps or [headline]:
            t0 = time.perf_counter()
            base = acc(name, "worst-case", eps, key)
            final = {}
            levels = escalate(model, noisy, x, y, eps, st, survivors[name, eps], source, progress=not quiet,
                              final=final, journal=journal, name=name)
            if escalated is not None:
                escalated[name, eps] = final["alive"]
            path = [base] + [a for _, a in levels]
            moved = path[-2] - path[-1]
            checks.append({"model": name, "check": f"doubling steps, restarts and samples (on the surviving images) "
                                                   f"moves the worst case ≤ {CONVERGENCE_TOLERANCE} (ε={eps:g}, {key})",
                           "value": " → ".join([f"{base:.3f}"] + [f"{a:.3f} ({m}×)" for m, a in levels]),
                           "pass": moved <= CONVERGENCE_TOLERANCE + 1e-9, "eps": eps, "predictor": key,
                           "escalated": path[-1], "multiplier": levels[-1][0]})
            for m, a in levels:
                rows.append({"model": name, "attack": f"worst-case {m}×", "eps": eps,
                             "acc_ot": a if key == "acc_ot" else math.nan,
                             "acc_lap": a if key == "acc_lap" else math.nan, "images": len(x)})
            if not quiet:
                print(f"[robustness] {name} ε={eps:g} escalation: {checks[-1]['value']} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return checks


def attack_and_report(out: Path, models: dict[str, tuple[NoisySequential, bool]], x: Tensor, y: Tensor,
                      eps: list[float], st: AttackSettings, source: NoisySequential | None, headline: float,
                      check_eps: list[float] | None = None, title: str = "",
                      quiet: bool = False, after_model=None, resume: bool | None = None) -> tuple[list[dict], list[dict]]:
    """The whole protocol, one model at a time: attacks at every ε, the checks with the
    escalation, and the reports rewritten (atomically) after each model, so that a run
    stopped part-way keeps every finished model's results. ``after_model(name, masks,
    escalated)`` (optional) returns more checks for the model's report: ``masks`` per (name, ε)
    every predictor's worst-case mask (ε = 0: clean), ``escalated`` per (name, ε) the defended
    predictor's escalated mask (e.g. the certified radii's soundness check).

    Every attack is recorded in ``out``'s journal (:mod:`glrnet.journal`) as it finishes;
    ``resume`` replays a journal left by an interrupted run of the same settings (``False``: a
    journal there is an error; ``None``: no journal)."""
    validate_eps([*eps, headline], st.norm, math.prod(x.shape[1:]) if hasattr(x, "shape") else None)
    out.mkdir(parents=True, exist_ok=True)
    journal = None if resume is None else AttackJournal(out / JOURNAL, fingerprint(models, x, y, eps, st, source),
                                                        resume)
    if journal is not None and len(journal) and not quiet:
        print(f"[robustness] resuming: {len(journal)} attacks recorded in {out / JOURNAL}", flush=True)
    rows, checks = [], []
    for name, entry in models.items():
        survivors, masks, escalated = {}, {}, {}
        one = {name: entry}
        model_rows = evaluate_robustness(one, x, y, eps, st, source=source, quiet=quiet, survivors=survivors,
                                         masks=masks, journal=journal)
        checks += sanity_checks(one, model_rows, survivors, x, y, headline, st, source,
                                [headline] if check_eps is None else check_eps, quiet, escalated=escalated,
                                journal=journal)
        if after_model is not None:
            checks += after_model(name, masks, escalated)
        rows += model_rows
        write_reports(out, rows, checks, headline, st, len(x), title=title)
    failed = [c for c in checks if not c["pass"]]
    for c in failed:   # on the console too, whatever ``quiet`` says: a failed check qualifies every figure
        print(f"glrnet robustness: sanity check FAILED for {c['model']}: {c['check']} (measured {c['value']}); "
              f"see {out / 'robustness.md'}", file=sys.stderr)
    return rows, checks


def run_protocol(out: Path, spec, models: dict, sources: dict, data, headline: float, device, quiet: bool,
                 runs: dict | None = None) -> dict:
    """The protocol inside ``glrnet reproduce`` (settings from the spec's [robustness] table). ``runs``
    (run name → (model spec, model, seed)): every seed's run of the chosen models is attacked, and
    ``robustness_seeds.md`` gives each figure's mean and min–max over the seeds."""
    rb = dict(spec.robustness)
    names = rb.pop("models", list(models))
    eps = sorted(set(rb.pop("eps", DEFAULT_EPS)) | {headline})
    images = rb.pop("images", 500)
    check_eps = rb.pop("check_eps", None)
    if "losses" in rb:
        rb["losses"] = tuple(rb["losses"])
    try:
        st = AttackSettings(**rb)
    except TypeError as e:
        raise ValueError(f"spec [robustness]: {e}") from None
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ValueError(f"spec [robustness] models {unknown} are not models of the spec")
    chosen = {n: (models[n][1], models[n][0].config.noisy) for n in names}
    seed_of = {n: models[n][0].config.seed for n in names}
    for run, (ms, model, seed) in (runs or {}).items():
        if ms.name in names and run not in chosen:
            chosen[run], seed_of[run] = (model, ms.config.noisy), seed
    x, y = data.x_test[:images], data.y_test[:images]
    first = next(iter(sources.values()))
    rows, checks = attack_and_report(out, chosen, x, y, eps, st, first, headline, check_eps, spec.name, quiet,
                                     resume=True)   # reproduce resumes whatever it finds, attacks included
    if len(set(seed_of.values())) > 1:
        base = {run: run if run in names else run.rsplit("-seed", 1)[0] for run in chosen}
        write_seed_spread(out, rows, checks, base, chosen, headline)
    return {"rows": len(rows), "checks_passed": sum(c["pass"] for c in checks), "checks": len(checks)}
