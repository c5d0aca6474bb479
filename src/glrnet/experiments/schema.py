"""The experiment spec: one schema, one validator, one loader.

A spec (TOML) names the *runs* — training options, datasets, seeds — and the *analyses* applied
to them. Sections (every one optional but ``[[datasets]]``, ``[[models]]`` and one analysis):

``[experiment]``
    ``name`` (default: the file's stem), ``notes``, ``seeds`` (every model run trained once per seed;
    not the transfer sources, not the timed runs).
``[[datasets]]``
    ``name`` (default: ``dataset``), ``dataset`` (digits, mnist, fashion-mnist), ``folder`` (its
    subfolder of ``--data-dir``; default: ``dataset``), ``split``, ``image_size``, ``subset``,
    ``val_fraction``. Every analysis runs on every dataset unless it names its own.
``[defaults]``
    training options (``glrnet train``'s, as :class:`~glrnet.train.TrainConfig` fields) that every
    ``[[models]]`` entry starts from.
``[[models]]``
    ``name``, ``label``, ``like`` (start from an earlier model's options instead), and training options.

Analyses:

``[transfer]`` (the paper's Tables 1–2)
    ``sources`` (models that FGSM examples are transferred from), ``models`` (the models attacked;
    default every model that is not a source), ``eps``, ``headline_target``, ``calibrate_model``,
    ``attack_images``, ``lap_replications``, ``[transfer.reference]`` (``<model> = {orig, ot, lap}``:
    the paper's figures set beside ours).
``[replications]``
    accuracy against K with and without variance reduction (needs ``[transfer]``): ``models``,
    ``replications``, ``variants``.
``[certify]``
    certified L2 radii (CERTIFY): ``models``, ``radii``, ``n0``, ``samples``, ``alpha``, ``images``,
    ``predictors``, ``seed``.
``[robustness]`` or ``[[robustness]]`` (the adaptive-attack protocol)
    ``name`` (needed when there are several), ``models`` (model names, or ``"<group>/<run>"`` for a
    run of a ``[[time_to_accuracy]]`` group), ``source`` (the transfer-FGSM network, named the same
    way), ``datasets``, ``eps``, ``headline``, ``images``, ``check_eps``, and every attack setting
    (:class:`~glrnet.attack_settings.AttackSettings`: ``steps``, ``norm``, ``max_doublings``, ...).
``[quality]`` (the technique study's gradient quality)
    ``models``, ``dataset``, ``units``, ``losses``, ``budget``, ``samples``, ``batch``.
``[[time_to_accuracy]]`` (the technique study's accuracy after a fixed training time)
    ``name``, ``datasets``, ``runs`` (model names, or tables ``{model, name, <training options>}``),
    ``seconds``, ``clock``, ``eval_every``, ``epochs``, ``thresholds``, ``final_quality``,
    ``final_samples``.

Every unknown section or key is one ``ValueError`` line naming the file, the section, the key and the
valid keys; every bad value names its section and key; every model is checked as a run on every
dataset it is trained on, before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..robustness.settings import AttackSettings
from ..train import TrainConfig

DATA_KEYS = ("dataset", "data_dir", "image_size", "subset", "split", "val_fraction")   # [[datasets]]' own
TRAINING_OPTIONS = tuple(n for n in TrainConfig.option_names() if n not in DATA_KEYS + ("device",))
ATTACK_KEYS = tuple(f.name for f in fields(AttackSettings))
PREDICTORS = ("vote", "lap")
VARIANTS = ("plain", "baseline", "antithetic", "baseline+antithetic")
CLOCKS = ("wall", "cpu")

SECTIONS = {   # section → (keys, whether it is an array of tables)
    "experiment": (("name", "notes", "seeds"), False),
    "datasets": (("name", "dataset", "folder", "split", "image_size", "subset", "val_fraction"), True),
    "defaults": (TRAINING_OPTIONS, False),
    "models": (("name", "label", "like") + TRAINING_OPTIONS, True),
    "transfer": (("sources", "models", "eps", "headline_target", "calibrate_model", "attack_images",
                  "lap_replications", "reference"), False),
    "replications": (("models", "replications", "variants"), False),
    "certify": (("models", "radii", "n0", "samples", "alpha", "images", "predictors", "seed"), False),
    "robustness": (("name", "models", "source", "datasets", "eps", "headline", "images", "check_eps") + ATTACK_KEYS,
                   None),   # one table or several
    "quality": (("models", "dataset", "units", "losses", "budget", "samples", "batch"), False),
    "time_to_accuracy": (("name", "datasets", "runs", "seconds", "clock", "eval_every", "epochs", "thresholds",
                          "final_quality", "final_samples"), True),
}
ANALYSES = ("transfer", "replications", "certify", "robustness", "quality", "time_to_accuracy")
REFERENCE_KEYS = ("orig", "ot", "lap")
RUN_KEYS = ("model", "name") + TRAINING_OPTIONS


def check_seeds(value, where: str) -> list[int]:
    if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and len(set(value)) == len(value)):
        raise ValueError(f"{where}: seeds must be a list of distinct integers, e.g. [0, 1, 2], got {value!r}")
    return list(value)


# ---------------------------------------------------------------------------------------- the schema's objects
@dataclass
class DatasetSpec:
    name: str
    dataset: str
    folder: str
    split: str = "standard"
    image_size: int | None = None
    subset: int | None = None
    val_fraction: float = 0.1

    def options(self, data_dir: str | None = None) -> dict:
        """The training options of this dataset (``data_dir``: its resolved IDX folder, or None)."""
        return {"dataset": self.dataset, "data_dir": data_dir, "split": self.split, "image_size": self.image_size,
                "subset": self.subset, "val_fraction": self.val_fraction}


@dataclass
class ModelSpec:
    name: str
    label: str
    options: dict                  # training options: [defaults], then the entry's own (or its ``like``'s)


@dataclass
class Transfer:
    sources: list[str]
    models: list[str]
    eps: list[float]
    headline_target: float
    calibrate_model: str
    attack_images: int | None
    lap_replications: int
    reference: dict[str, dict]


@dataclass
class Replications:
    models: list[str]
    replications: list[int]
    variants: list[str]


@dataclass
class Certify:
    models: list[str]
    radii: list[float]
    n0: int = 100
    samples: int = 10000
    alpha: float = 0.001
    images: int = 500
    predictors: list[str] = field(default_factory=lambda: list(PREDICTORS))
    seed: int = 0


@dataclass
class Robustness:
    name: str                      # "" for the one unnamed table
    models: list[str]              # model names, or "<group>/<run>"
    source: str | None
    datasets: list[str]
    eps: list[float]
    headline: float | None         # None: the transfer's calibrated ε, else the middle of eps
    images: int
    check_eps: list[float] | None  # None: the headline
    settings: AttackSettings


@dataclass
class Quality:
    models: list[str]
    dataset: str
    units: list[str]
    losses: list[str]
    budget: int
    samples: int
    batch: int


@dataclass
class TimedRun:
    name: str
    model: str
    options: dict                  # the run's own training options (over the model's and the group's)


@dataclass
class TimeToAccuracy:
    name: str
    datasets: list[str]
    runs: list[TimedRun]
    seconds: float
    clock: str
    eval_every: int
    epochs: int
    thresholds: list[float]
    final_quality: list[int]
    final_samples: int

    def options(self) -> dict:
        """What the group sets for each of its runs (a run's own options win)."""
        return {"max_seconds": self.seconds, "budget_clock": self.clock, "eval_every": self.eval_every,
                "epochs": self.epochs}


@dataclass
class Spec:
    path: Path
    name: str
    notes: str
    seeds: list[int] | None
    datasets: list[DatasetSpec]
    models: dict[str, ModelSpec]
    transfer: Transfer | None = None
    replications: Replications | None = None
    certify: Certify | None = None
    robustness: list[Robustness] = field(default_factory=list)
    quality: Quality | None = None
    time_to_accuracy: list[TimeToAccuracy] = field(default_factory=list)

    def config(self, model: str, dataset: DatasetSpec, data_dir: str | None = None, **over) -> TrainConfig:
        """The model's run on ``dataset`` (unvalidated): its options, the dataset's, then ``over``."""
        return TrainConfig.from_dict({**self.models[model].options, **dataset.options(data_dir), **over})

    def timed_config(self, group: TimeToAccuracy, run: TimedRun, dataset: DatasetSpec, data_dir: str | None = None,
                     **over) -> TrainConfig:
        """A timed run: [defaults] < the model < the group (budget, clock, eval_every, epochs) < the run."""
        return TrainConfig.from_dict({**self.models[run.model].options, **group.options(), **run.options,
                                      **dataset.options(data_dir), **over})

    def seed_runs(self, model: str) -> list[tuple[int, str]]:
        """(seed, run name) of a model: its own seed under its plain name, each other seed of
        ``[experiment] seeds`` as ``<model>-seed<s>`` (a spec that gains seeds reuses the runs it had)."""
        own = self.models[model].options.get("seed", 0)
        if self.transfer is not None and model in self.transfer.sources:
            return [(own, model)]            # one source for every seed: the attack does not vary
        return [(s, model if s == own else f"{model}-seed{s}") for s in (self.seeds or [own])]

    def with_seeds(self, seeds: list[int] | None) -> "Spec":
        return self if seeds is None else replace(self, seeds=check_seeds(seeds, f"spec {self.path}: --seeds"))

    def datasets_named(self, only: str | None) -> list[DatasetSpec]:
        """The [[datasets]] entries whose name or dataset is ``only`` (every one for None)."""
        chosen = [d for d in self.datasets if only is None or only in (d.name, d.dataset)]
        if not chosen:
            raise ValueError(f"--dataset {only}: spec {self.path} has no such dataset; it has "
                             + ", ".join(d.name for d in self.datasets))
        return chosen


# ---------------------------------------------------------------------------------------- packaged specs
def spec_path(name: str) -> Path:
    """The packaged spec ``name`` (``quick``, ``paper``, ...)."""
    return Path(str(resources.files("glrnet") / "specs" / f"{name}.toml"))


def packaged_specs() -> list[str]:
    return sorted(p.stem for p in spec_path("quick").parent.glob("*.toml"))


def find_spec(spec: str | Path) -> Path:
    """A spec file: the path itself, or the packaged spec of that name."""
    path = Path(spec)
    if not path.is_file() and path.suffix == "" and spec_path(str(path)).is_file():
        path = spec_path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} not found (packaged specs: {', '.join(packaged_specs())})")
    return path


def spec_name(path: Path) -> str | None:
    """The ``[experiment] name`` of the spec file at ``path`` (its stem if unnamed); None if unreadable."""
    try:
        return tomllib.loads(Path(path).read_text()).get("experiment", {}).get("name", Path(path).stem)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return None


