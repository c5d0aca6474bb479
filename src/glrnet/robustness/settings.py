"""The settings of the adaptive-attack protocol, in one place: their defaults are the CLI's
(``glrnet robustness`` builds one flag per field) and the spec files' ([robustness] tables)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ..utils.seeding import stream_seed

DEFAULT_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)   # the ε sweep of the tables and of the protocol
NORMS = ("Linf", "L2")
CONVERGENCE_TOLERANCE = 0.01   # doubling steps, restarts and samples may move no worst case by more


@dataclass
class AttackSettings:
    steps: int = 100                 # APGD iterations per restart
    restarts: int = 1                # APGD restarts
    eot_samples: int = 32            # noise samples inside one gradient of a LAP predictor
    lr_samples: int = 512            # samples of the likelihood-ratio input gradient
    losses: tuple = ("ce", "dlr")    # APGD losses
    spsa_samples: int = 64
    spsa_steps: int = 40
    spsa_queries_k: int = 32        # noisy passes per SPSA query of a LAP predictor
    spsa_delta: float = 0.01
    random_draws: int = 16
    lap_replications: int = 1000
    seed: int = 0
    max_doublings: int = 3           # convergence check: double at most this many times (2×, 4×, 8×)
    norm: str = "Linf"               # the threat model's ball: "Linf" or "L2" (images in [0, 1] either way)
    score_vote: bool = False         # also score every image by the majority vote of K noisy passes

    def __post_init__(self):
        for f in ("steps", "restarts", "eot_samples", "lr_samples", "spsa_samples", "spsa_steps", "spsa_queries_k",
                  "random_draws", "lap_replications", "max_doublings"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"attack setting {f} must be ≥ 1, got {getattr(self, f)!r}")
        if self.norm not in NORMS:
            raise ValueError(f"attack setting norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    def doubled(self) -> "AttackSettings":
        """Twice the steps, restarts and samples: the protocol's convergence check."""
        return replace(self, steps=2 * self.steps, restarts=2 * self.restarts, eot_samples=2 * self.eot_samples,
                       lr_samples=2 * self.lr_samples, spsa_samples=2 * self.spsa_samples,
                       spsa_steps=2 * self.spsa_steps, random_draws=2 * self.random_draws,
                       seed=stream_seed(self.seed, 14))   # a fresh, independent stream per doubling


def budget_problem(e: float, norm: str = "Linf", pixels: int | None = None) -> str | None:
    """Why the threat model cannot mean the budget ε (None: it can): images lie in [0, 1]^d, so an L∞ ε must
    be in (0, 1] (beyond 1 every image is reachable), an L2 ε must be > 0 and at most the diagonal √d of the
    cube (``pixels`` = d; beyond it, likewise)."""
    if norm == "Linf" and not 0 < e <= 1:
        return ("an L∞ budget on images with pixels in [0, 1] must be in (0, 1] "
                "(e.g. 0.1 is 10 % of the pixel range; 1 reaches every image)")
    if norm == "L2" and not e > 0:
        return "an L2 budget must be > 0"
    if norm == "L2" and pixels is not None and e > pixels ** 0.5:
        diagonal = pixels ** 0.5
        return (f"an L2 budget above the diagonal √d = {diagonal:.4g} of the image cube [0, 1]^{pixels} reaches "
                f"every image; use ε ≤ {diagonal:.4g}")
    return None


def validate_eps(eps, norm: str = "Linf", pixels: int | None = None) -> None:
    """A ``ValueError`` naming the first budget ε that the threat model cannot mean (:func:`budget_problem`)."""
    for e in eps:
        problem = budget_problem(float(e), norm, pixels)
        if problem:
            raise ValueError(f"--eps {float(e):g}: {problem}")


@dataclass(frozen=True)
class ProtocolSettings:
    """What the protocol does besides the attacks' effort: the ε grid it attacks at, the headline ε (the
    report's claim, escalated), the ε where the convergence check escalates, and the attacks' settings.

    ``headline`` None: the middle of ``eps``; ``check_eps`` None: the headline only. The protocol attacks at
    :attr:`grid`, every ε named here."""

    eps: tuple[float, ...] = DEFAULT_EPS
    headline: float | None = None
    check_eps: tuple[float, ...] | None = None
    attacks: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self):
        if isinstance(self.eps, (int, float)) or not len(self.eps):
            raise ValueError(f"protocol setting eps must be a non-empty list of budgets, got {self.eps!r}")
        if not isinstance(self.attacks, AttackSettings):
            raise ValueError(f"protocol setting attacks must be an AttackSettings, got {type(self.attacks).__name__}")
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        if self.headline is None:
            object.__setattr__(self, "headline", self.eps[len(self.eps) // 2])
        if self.check_eps is not None:
            if isinstance(self.check_eps, (int, float)) or not len(self.check_eps):
                raise ValueError(f"protocol setting check_eps must be a non-empty list of budgets or None, "
                                 f"got {self.check_eps!r}")
            object.__setattr__(self, "check_eps", tuple(float(e) for e in self.check_eps))
        self.validate()

    def validate(self, pixels: int | None = None) -> None:
        """A one-line ``ValueError`` naming the first field whose budget the threat model cannot mean (with
        ``pixels``, the image size d: the L2 budgets beyond the cube's diagonal too)."""
        for name in ("eps", "headline", "check_eps"):
            value = getattr(self, name)
            for e in (value,) if name == "headline" else value or ():
                problem = budget_problem(float(e), self.attacks.norm, pixels)
                if problem:
                    raise ValueError(f"protocol setting {name} = {float(e):g}: {problem}")

    @property
    def grid(self) -> list[float]:
        """Every ε the protocol attacks at, in increasing order: ``eps``, the headline and ``check_eps``."""
        return sorted(set(self.eps) | {self.headline} | set(self.check_eps or ()))

    @property
    def escalated_eps(self) -> tuple[float, ...]:
        """Where the convergence check escalates: ``check_eps``, or the headline."""
        return self.check_eps if self.check_eps is not None else (self.headline,)


HELP = {"steps": "APGD iterations per restart", "restarts": "APGD restarts",
        "eot_samples": "noise samples inside one gradient of a LAP predictor (EOT)",
        "lr_samples": "samples of the likelihood-ratio input gradient", "losses": "APGD losses (comma-separated)",
        "spsa_samples": "SPSA perturbations per step", "spsa_steps": "SPSA steps",
        "spsa_queries_k": "noisy passes per SPSA query of a LAP predictor", "spsa_delta": "SPSA finite-difference step",
        "random_draws": "random corners x ± ε tried", "lap_replications": "K of the LAP predictor that scores images",
        "seed": "attack seed", "norm": "the threat model: Linf or L2 ball of radius ε",
        "score_vote": "also score every image by the majority vote of K noisy passes (the predictor CERTIFY certifies)",
        "max_doublings": "convergence check: double steps, restarts and samples at most "
        "this many times"}


def settings_fields():
    """(name, default, type) of every AttackSettings field, for building command-line flags."""
    return [(f.name, f.default, type(f.default)) for f in fields(AttackSettings)]
