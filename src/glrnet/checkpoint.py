"""Checkpoints and saved models: safetensors for tensors, JSON for everything else.

A checkpoint is one safetensors file written atomically (temporary file, then
``os.replace``): model weights, optimizer tensors and RNG states as tensors, and the
JSON sidecar (config, epoch, history, optimizer hyper-parameters, scheduler) in its
metadata, so the two can never disagree. ``checkpoint.json`` beside it is a copy for
people and tools. A saved model (``model.safetensors``) carries its architecture in
its metadata and is rebuilt by :func:`load_model`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open

from .nn.containers import NoisyMLP, NoisySequential
from .nn.noise import make_noise
from .utils.files import atomic_write_csv, atomic_write_text, save_tensors_atomic  # noqa: F401 (re-exported)

FORMAT = 1


LOCK = ".glrnet.lock"   # in an output folder while a glrnet process writes there: "<pid> <host>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process
        return True
    return True


def _create_lock(lock: Path) -> bool:
    """Create ``lock`` holding this process's pid, if no such file exists (O_EXCL: atomic)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


@contextmanager
def output_lock(out: str | os.PathLike):
    """Hold ``out`` (an output folder, created here) for this process: a lock file made with O_EXCL holding
    the pid, removed on exit. A second glrnet process writing into the same folder gets a ``ValueError``
    naming the one that holds it; a lock left by a process that is gone (killed) is taken over, saying so
    on stderr. A folder this call created and that is still empty on exit (the run failed before it
    wrote anything) is removed again. An unwritable ``out`` is a ``ValueError`` naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    created = []
    for p in (out, *out.parents):
        if p.exists():
            break
        created.append(p)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = "" if e.filename in (None, str(out)) else f": {e.filename}"
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror}{where}); choose another --out") from None
    lock = out / LOCK
    try:
        while not _create_lock(lock):
            try:
                text = lock.read_text()
            except FileNotFoundError:
                continue                                  # released meanwhile: try again
            words = text.split()
            pid = int(words[0]) if words and words[0].isdigit() else None
            host = words[1] if len(words) > 1 else socket.gethostname()
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                where = "" if host == socket.gethostname() else f" on {host}"
                raise ValueError(f"--out {out} is in use by another glrnet process (pid {pid}{where}; lock file "
                                 f"{lock}): wait for it to finish, or choose another --out")
            # a stale lock: move it aside atomically, so that two takers cannot both win
            aside = out / f"{LOCK}.stale.{os.getpid()}"
            try:
                os.replace(lock, aside)
            except FileNotFoundError:
                continue
            if aside.read_text() != text:                 # another process's fresh lock: put it back
                try:
                    os.link(aside, lock)
                except FileExistsError:
                    pass
                aside.unlink()
                continue
            aside.unlink()
            print(f"glrnet: taking over the lock {lock} of pid {pid}, which is no longer running "
                  "(it was stopped before it finished)", file=sys.stderr)
    except OSError as e:
        _remove_empty(created)
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}); choose another --out") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield out
    finally:
        try:
            if lock.read_text().split()[:1] == [str(os.getpid())]:
                lock.unlink()
        except (OSError, IndexError):
            pass
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed call created, deepest first, while they are empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def save_checkpoint(path: str | os.PathLike, model: NoisySequential, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator], sidecar: dict[str, Any]) -> None:
    """Write model, optimizer and RNG states plus ``sidecar`` (JSON-able) to ``path`` atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_json = {"param_groups": opt["param_groups"], "state": {}}
    for pid, state in opt["state"].items():
        opt_json["state"][str(pid)] = {}
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                opt_json["state"][str(pid)][k] = v
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    meta = dict(sidecar, format=FORMAT, optimizer=opt_json, generators=list(generators),
                model=model.config())
    text = json.dumps(meta)
    save_tensors_atomic(tensors, path, {"glrnet": text})
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, ensure_ascii=False))


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a checkpoint (config, epoch, history), without loading a tensor."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["glrnet"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} is unreadable ({e})") from None


def load_checkpoint(path: str | os.PathLike, model: NoisySequential, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator]) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the sidecar."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["glrnet"])
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} is unreadable ({e})") from None
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for pid, state in meta["optimizer"]["state"].items():
        opt["state"][int(pid)] = dict(state)
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt["state"].setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v
    optimizer.load_state_dict(opt)
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
    return meta


def save_model(path: str | os.PathLike, model: NoisySequential, extra: dict | None = None) -> None:
    """Weights plus the architecture (and ``extra``, e.g. the training config) in the metadata."""
    meta = {"glrnet_model": json.dumps(model.config())}
    if extra is not None:
        meta["glrnet_extra"] = json.dumps(extra)
    save_tensors_atomic(dict(model.state_dict()), Path(path), meta)


def model_from_config(cfg: dict) -> NoisySequential:
    if "modules" in cfg:
        return NoisySequential.from_config(cfg)      # one shared noise, or each layer's own
    noise = cfg.get("noise", {"kind": "gaussian", "std": 2.0})
    noise = make_noise(noise["kind"], noise["std"])
    return NoisyMLP(cfg["sizes"], activation=cfg["activation"], noise=noise,
                    output_activation=cfg.get("output_activation"))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[NoisySequential, dict]:
    """Rebuild a model saved by :func:`save_model`; returns (model, extra metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved model at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None
    if "glrnet_model" not in meta:
        raise ValueError(f"{path} is not a glrnet model (no 'glrnet_model' metadata)")
    try:
        model = model_from_config(json.loads(meta["glrnet_model"]))
        model.load_state_dict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: the saved model cannot be rebuilt ({e})") from None
    return model.to(device), json.loads(meta.get("glrnet_extra", "{}"))


# what each file an experiment writes is (README.md in every output folder)
FILE_INDEX = [
    ("spec.toml", "the experiment spec, as run"),
    ("summary.json", "headline ε, timings, every model's clean accuracy"),
    ("results.csv", "every model (and seed) × FGSM source × ε: Acc_Orig, clean LAP, Acc_OT, Acc_LAP"),
    ("results_seeds.csv", "results.csv over seeds: mean, sd, min and max of each figure"),
    ("table1.md", "Table 1: FGSM transferred from the first source, the seed's figures beside ours"),
    ("table2.md", "Table 2: the same from the second source"),
    ("transfer_*.png", "accuracy against ε under transferred FGSM, OT and LAP panels"),
    ("fig2_sigmoid_slopes.png", "the seed's Fig. 2: sigmoids of several slopes"),
    ("fig5_training_curves.png", "training and validation loss of every model"),
    ("fig6_adversarial_examples.png", "FGSM examples at the headline ε"),
    ("fig7_activations.png", "the seed's Fig. 7: the discontinuous activations"),
    ("noise_scale.md", "noise against signal per layer (RMS of the pre-activation / σ)"),
    ("noise_scale.csv", "the same as CSV"),
    ("study.md", "accuracy against K with and without variance reduction"),
    ("study.csv", "the same as CSV"),
    ("robustness.md", "adaptive attacks: worst case per model and ε, per attack, escalation, sanity checks"),
    ("robustness.csv", "every model × attack × ε, OT and LAP accuracy"),
    ("robustness_checks.json", "the sanity checks and the escalation, as data"),
    ("robustness_worst_case.png", "adaptive worst case (solid) against transfer FGSM (dashed)"),
    ("robustness_seeds.md", "the adaptive worst case over seeds: mean and min–max"),
    ("robustness_journal.safetensors", "every attack's per-image result as it finished (what --resume replays)"),
    ("models/", "one folder per trained model: metrics.json, history.csv, curves.png, model.safetensors, checkpoint"),
    ("adversarial/", "the FGSM image sets, one file per (source, ε) (not exported)"),
]


def write_index(out: str | os.PathLike, title: str) -> None:
    """README.md in ``out``: what each file there is (only the files that exist)."""
    out = Path(out)
    names = {p.name + ("/" if p.is_dir() else "") for p in out.iterdir()}
    lines = [f"# {title}", "", "What each file here is (written by glrnet; rerunning the same command "
             "regenerates it).", "", "| file | what it is |", "|---|---|"]
    for pattern, text in FILE_INDEX:
        hits = sorted(n for n in names if fnmatch.fnmatch(n, pattern))
        if hits:
            lines.append(f"| {', '.join(f'`{h}`' for h in hits)} | {text} |")
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
