"""The attack journal: every finished attack's per-image result, on disk the moment it finishes,
so that an interrupted robustness run resumes where it stopped and ends with exactly the
figures an uninterrupted run gives.

An escalated attack on a network with many surviving images runs for hours on a CPU (the 8×
stage of the protocol costs 512× the first stage's steps × restarts × samples per image); a
run stopped part-way must lose at most the attack in flight. The journal is one safetensors
file: per attack, the images it attacked (``idx``), their per-predictor correctness
(``ot``, ``lap``, ``vote``) and the attacker's random-generator state after it (restored when
the attack is replayed, so the attacks after it draw the same noise as in one sitting). Its
metadata holds the run's fingerprint (settings, images, weights): a journal is only resumed
by the run that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..utils.files import save_tensors_atomic

JOURNAL = "robustness_journal.safetensors"
#: bumped whenever an attack changes what it computes, so that a journal never replays a superseded attack
#: (2: the ``gauss`` surrogate smooths weight-noise layers with the pre-activation noise they cause;
#: 3: threshold networks are attacked through a sigmoid of slope 8 too; 4: on channel-site layers ``gauss``
#: smooths with the noise of the perturbed channel only). Not bumped when attacks are appended to the end of
#: the plan (the deterministic surrogates, ``apgd-*[mean]`` and ``apgd-*[moments]``): the recorded ones keep
#: their seeds and results, and an escalation level whose survivors change is rerun (its entries record the
#: images they attacked), so a resumed journal ends with the figures a fresh run gives.
ATTACKS_VERSION = "4"


def fingerprint(models: dict, x: Tensor, y: Tensor, eps: list[float], st, source=None) -> dict[str, str]:
    """What a journal's results depend on, as strings: the attack settings, the ε list, the attacked
    images and labels, and every network's weights (SHA-256)."""
    from dataclasses import asdict

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    fp = {"settings": json.dumps(asdict(st), sort_keys=True, default=list), "eps": json.dumps(list(eps)),
          "images": digest([x, y]), "attacks": ATTACKS_VERSION}
    for name, (model, noisy) in models.items():
        fp[f"model {name}"] = f"{digest(model.state_dict().values())} noisy={noisy}"
    if source is not None:
        fp["source"] = digest(source.state_dict().values())
    return fp


def _comparable(fp: dict[str, str], key: str):
    """A fingerprint entry as compared on resuming: the settings without ``max_doublings`` (a higher
    limit only adds escalation levels; the recorded ones stay valid, so a run may be escalated further)."""
    if key == "attacks":
        return fp.get(key, "1")        # journals written before the version was recorded
    if key != "settings" or key not in fp:
        return fp.get(key)
    return {k: v for k, v in json.loads(fp[key]).items() if k != "max_doublings"}


def _differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The fingerprint entries two journals disagree on. Models need only agree where both have them:
    a journal may be resumed with fewer or more models, and journals of disjoint models merged."""
    return sorted(k for k in set(a) | set(b) if (not k.startswith("model ") or (k in a and k in b))
                  and _comparable(a, k) != _comparable(b, k))


class AttackJournal:
    """``memo(scope)`` gives ``attack_model`` its ``memo``: an attack recorded under ``scope`` is
    replayed from disk, any other is run and recorded (the file rewritten atomically)."""

    def __init__(self, path: str | Path, fp: dict[str, str], resume: bool):
        self.path, self.fp, self.entries = Path(path), fp, {}
        if not self.path.exists():
            return
        if not resume:
            raise ValueError(f"{self.path} records an earlier run's attacks: pass --resume to continue it, "
                             f"or choose another --out")
        saved, self.entries = read_journal(self.path)
        differ = _differ(saved, fp)
        if differ:
            raise ValueError(f"--resume: {self.path} was recorded with other {', '.join(differ)}; "
                             f"rerun with the same settings, or choose another --out")
        self.fp = {**saved, **fp}      # every recorded model keeps its weights' digest

    def __len__(self) -> int:
        return len(self.entries)

    def memo(self, *scope) -> Callable:
        def call(name: str, run: Callable[[], dict], gen: torch.Generator, idx: Tensor | None = None) -> dict:
            key = " ".join(map(str, scope + (name,))).replace("/", "∕")
            e = self.entries.get(key)
            if e is not None and (idx is None or torch.equal(e.get("idx", idx), idx)):
                gen.set_state(e["generator"])
                return {k: v.to(gen.device) for k, v in e.items() if k in ("ot", "lap", "vote")}
            result = run()
            self.entries[key] = {**result, "generator": gen.get_state().clone(),
                                 **({"idx": idx.cpu()} if idx is not None else {})}
            self._save()
            return result
        return call

    def _save(self) -> None:
        write_journal(self.path, self.fp, self.entries)


def write_journal(path: str | Path, fp: dict[str, str], entries: dict[str, dict[str, Tensor]]) -> None:
    """The inverse of :func:`read_journal`, atomically."""
    save_tensors_atomic({f"{key}/{field}": t for key, e in entries.items() for field, t in e.items()}, path,
                        {"fingerprint": json.dumps(fp, sort_keys=True)})


def read_journal(path: str | Path) -> tuple[dict[str, str], dict[str, dict[str, Tensor]]]:
    """(fingerprint, entries) of a journal: entries keyed "<model> <ε> <stage> <attack>" (stage "1×",
    "2×", …), each {"ot", "lap", "vote": per-image correctness, "idx": the images attacked (escalation
    stages only), "generator"}."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        fp = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
    entries: dict[str, dict[str, Tensor]] = {}
    for name, t in load_file(path).items():
        key, _, field = name.rpartition("/")
        entries.setdefault(key, {})[field] = t
    return fp, entries


def survivors(path: str | Path, model: str, eps: float, predictor: str = "lap",
              images: int | None = None) -> Tensor:
    """The images on which every recorded attack on ``model`` at ``eps`` failed (for ``predictor``):
    the per-image worst case so far, escalation stages included, as a bool mask."""
    _, entries = read_journal(path)
    prefix = f"{model} {eps} ".replace("/", "∕")
    mine = {k: e for k, e in entries.items() if k.startswith(prefix) and predictor in e}
    if not mine:
        raise ValueError(f"{path}: no attack on {model!r} at ε = {eps} recorded for {predictor}")
    n = images or max(len(e[predictor]) for k, e in mine.items() if "idx" not in e)
    alive = torch.ones(n, dtype=torch.bool)
    for e in mine.values():
        if "idx" in e:
            alive[e["idx"]] &= e[predictor]
        else:
            alive &= e[predictor]
    return alive


def merge_journals(sources: list[str | Path], dest: str | Path) -> int:
    """One journal from several runs of the same protocol on different models (e.g. one process or
    machine per model): the union of their entries, written to ``dest``; ``--resume`` there then
    replays them all and writes one report. Returns the number of entries."""
    fp: dict[str, str] = {}
    entries: dict[str, dict[str, Tensor]] = {}
    for src in sources:
        saved, more = read_journal(src)
        differ = _differ(fp, saved) if fp else []
        if differ:
            raise ValueError(f"{src} was recorded with other {', '.join(differ)} than {sources[0]}: not merged")
        fp = {**saved, **fp}
        for key, e in more.items():
            entries.setdefault(key, e)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    write_journal(dest, fp, entries)
    return len(entries)
