"""What every analysis shares: one dataset of a spec being run (its data, its output folder) and
its trained runs — trained once, reused when finished, resumed when interrupted."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data import DataError, Dataset, load_dataset
from ..utils.seeding import stream_seed
from ..nn.containers import NoisySequential
from ..train import TrainConfig, build_model, train
from .spec import DatasetSpec, Spec


def data_folder(entry: DatasetSpec, data_dir: str | None) -> str | None:
    """The IDX folder of a [[datasets]] entry. ``--data-dir`` names the folder that holds one folder per
    dataset (``../shared/data`` holds ``mnist/``, ``fashion-mnist/``, ...): the entry's is
    ``<data_dir>/<folder>``. None without ``--data-dir`` (the download cache) and for digits."""
    if data_dir is None or entry.dataset == "digits":
        return None
    root = Path(data_dir)
    path = root / entry.folder
    if path.is_dir():
        return str(path)
    if any(root.glob("*-idx?-ubyte*")):
        raise DataError(f"--data-dir {data_dir} holds IDX files itself: pass the folder above it, which holds "
                        f"one folder per dataset ({entry.folder}/ for [[datasets]] {entry.name!r})")
    raise DataError(f"--data-dir {data_dir}: no folder {entry.folder}/ in it for [[datasets]] {entry.name!r} "
                    "(--data-dir names the folder that holds mnist/, fashion-mnist/, ...)")


def dataset_options(entry: DatasetSpec, data_dir: str | None) -> dict:
    """``load_dataset``'s arguments for a [[datasets]] entry under ``--data-dir``."""
    return {"name": entry.dataset, "data_dir": data_folder(entry, data_dir), "image_size": entry.image_size,
            "val_fraction": entry.val_fraction, "subset": entry.subset, "split": entry.split}


def load_entry(entry: DatasetSpec, data_dir: str | None) -> Dataset:
    return load_dataset(**dataset_options(entry, data_dir))


def initial_model(cfg: TrainConfig, data: Dataset) -> NoisySequential:
    """The network ``cfg`` starts training from (``glrnet train``'s own initial weights, from the run's
    seed), without training it; the caller's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, 0))
        return build_model(cfg, data.image_shape, data.num_classes)


@dataclass
class Site:
    """One [[datasets]] entry of a spec being run: its data (on ``device``) and where its outputs go."""

    spec: Spec
    entry: DatasetSpec
    out: Path                     # the spec's output folder
    folder: Path                  # this dataset's: ``out`` for a one-dataset spec, else ``out/<dataset name>``
    data: Dataset
    data_dir: str | None          # the IDX folder (resolved), or None
    device: str
    quiet: bool
    metrics: dict[str, dict] = field(default_factory=dict)    # model run name → its metrics
    _models: dict[Path, NoisySequential] = field(default_factory=dict)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def config(self, model: str, seed: int | None = None, **over) -> TrainConfig:
        cfg = self.spec.config(model, self.entry, self.data_dir, device=self.device, **over)
        if seed is not None:
            cfg.seed = seed
        return cfg

    def train(self, cfg: TrainConfig, run_dir: Path, desc: str) -> dict:
        """Train (or reuse, or resume) one run into ``run_dir``."""
        return train(cfg, run_dir, resume=True, quiet=True, data=self.data, progress=not self.quiet, desc=desc)

    def model_run(self, model: str, seed: int, run: str) -> dict:
        """The model's run for ``seed`` into ``models/<run>``; its metrics."""
        if run not in self.metrics:
            cfg = self.config(model, seed)
            t0 = time.perf_counter()
            self.say(f"[train] {self.entry.name}/{run}: {cfg.method} {cfg.activation} {cfg.loss} arch={cfg.arch} "
                     f"hidden={cfg.hidden} K={cfg.replications} epochs={cfg.epochs} seed={seed}")
            m = self.train(cfg, self.folder / "models" / run, f"{self.entry.name}/{run}")
            lap = f" LAP {m['test_accuracy_lap']:.4f}" if m.get("test_accuracy_lap") is not None else ""
            self.say(f"        test acc OT {m['test_accuracy_ot']:.4f}{lap} ({time.perf_counter() - t0:.0f}s)")
            self.metrics[run] = m
        return self.metrics[run]

    def runs_of(self, model: str) -> list[tuple[int, str]]:
        """(seed, run name) of every run of ``model`` (every seed of the spec)."""
        return self.spec.seed_runs(model)

    def load(self, run_dir: Path) -> NoisySequential:
        """A finished run's network (loaded once)."""
        if run_dir not in self._models:
            path = run_dir / "model.safetensors"
            if not path.is_file():
                raise ValueError(f"{path} does not exist: its run was not trained (yet)")
            self._models[run_dir] = load_model(path, self.device)[0]
        return self._models[run_dir]

    def model(self, run: str) -> NoisySequential:
        return self.load(self.folder / "models" / run)

    def timed_dir(self, group: str, run: str) -> Path:
        """A [[time_to_accuracy]] run's folder: ``<out>/<group>/<dataset>/runs/<run>``."""
        return self.out / group / self.entry.name / "runs" / run

    def resolve(self, ref: str, model_seeds: bool = True) -> dict[str, tuple[NoisySequential, bool, int]]:
        """A [robustness] reference → {run name: (network, noisy, seed)}: ``<group>/<run>`` one timed run,
        a model name its run of every seed (``model_seeds``) or of its own seed."""
        if "/" in ref:
            gname, run = ref.split("/", 1)
            group = next(g for g in self.spec.time_to_accuracy if g.name == gname)
            timed = next(r for r in group.runs if r.name == run)
            cfg = self.spec.timed_config(group, timed, self.entry)
            return {run: (self.load(self.timed_dir(gname, run)), cfg.noisy, cfg.seed)}
        runs = self.runs_of(ref) if model_seeds else self.runs_of(ref)[:1]
        out = {}
        for seed, run in runs:
            self.model_run(ref, seed, run)
            out[run] = (self.model(run), self.config(ref, seed).noisy, seed)
        return out

