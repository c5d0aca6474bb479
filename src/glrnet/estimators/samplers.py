"""How the noise of a chunk of replications is drawn: i.i.d., antithetic pairs, randomized QMC.

A sampler fills a buffer (k, B, W) — k replications of B inputs, W noisy units per input —
with noise whose every replication is, *marginally*, i.i.d. f in all W units. That is all
the GLR estimator needs to stay unbiased: each replication's term L · s(r) · h has the
right expectation whatever the dependence between replications. Dependence is what reduces
variance, and a control variate must respect it: replications come in *groups* (a pair,
a QMC net) that depend on each other and on nothing else, and ``group_ids`` says which
(the leave-one-out baseline then leaves out the whole group; see control_variates.py).

To add a sampler: subclass :class:`Sampler` in one file, implement ``fill_`` (and ``group_ids`` if its
groups are not consecutive), and :func:`register_sampler` it; the estimator, the LAP predictor, the
CLI's choices, the specs and the tests pick it up (``tests/test_extensions.py`` shows one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.quasirandom import SobolEngine

from ..nn.noise import icdf_, sample_


class Sampler:
    """Draws noise for chunks of replications. ``group_size``: replications per dependence group
    (chunks always hold whole groups)."""

    name = "sampler"
    group_size = 1
    drawn_per_group = 1   # replications' worth of values a group takes from the generator

    def for_replications(self, replications: int, min_groups: int = 1) -> "Sampler":
        """The sampler to use for calls of ``replications`` replications (this one, or a configured copy;
        this object is never changed), or a ``ValueError`` if they cannot be split into whole groups.
        ``min_groups``: where the sampler may choose its group size, at least this many groups."""
        if replications % self.group_size:
            raise ValueError(f"sampler {self.name!r} draws groups of {self.group_size} replications; "
                             f"replications = {replications} is not a multiple")
        return self

    def fill_(self, dist: Distribution, out: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def group_ids(self, k: int, device=None) -> Tensor:
        """(k,) group index, within a chunk, of each of its k replications."""
        return torch.arange(k, device=device) // self.group_size

    def __repr__(self) -> str:
        return self.name


class IID(Sampler):
    """Every replication independent: the seed's estimator."""

    name = "iid"

    def fill_(self, dist, out, generator):
        return sample_(dist, out, generator)


class Antithetic(Sampler):
    """Pairs (r, −r), every noisy unit of a replication negated at once (f symmetric). The first
    half of a chunk holds r, the second −r; half the random numbers are drawn."""

    name = "antithetic"
    group_size = 2

    def fill_(self, dist, out, generator):
        half = out.shape[0] // 2
        if out.shape[0] % 2:
            raise ValueError(f"antithetic noise needs an even number of replications, got {out.shape[0]}")
        sample_(dist, out[:half], generator)
        torch.neg(out[:half], out=out[half:])
        return out

    def group_ids(self, k, device=None):
        return torch.arange(k // 2, device=device).repeat(2)


class QMC(Sampler):
    """Randomized quasi-Monte Carlo: each group of ``points`` (a power of two) replications of an
    input is a Sobol net in the W noise dimensions, randomized by a uniform digital shift
    (XOR with independent random bits per group, input and dimension), then mapped through
    f's inverse CDF. Each point is exactly uniform on the cube, so each replication is
    i.i.d. f and the estimator stays unbiased; within a group the points fill the cube more
    evenly than independent draws. Dimensions beyond Sobol's 21201 reuse the base
    coordinates with their own shifts (still exactly uniform, no QMC gain there).

    ``points=None``: the largest power of two ≤ 16 dividing the replications of a call (and leaving the
    control variate the groups it needs).
    """

    name = "qmc"
    BITS = SobolEngine.MAXBIT

    def __init__(self, points: int | None = None, seed: int = 0):
        if points is not None and (points < 2 or points & (points - 1)):
            raise ValueError(f"QMC points per group must be a power of two ≥ 2, got {points}")
        self.points, self.seed = points, seed
        self.group_size = points or 2
        self._base: dict = {}
        self._sized: dict = {}   # points=None: the configured copy for each group size

    @property
    def drawn_per_group(self):
        return self.group_size

    def for_replications(self, replications, min_groups=1):
        if self.points is not None:
            return super().for_replications(replications)
        points = 1 << (math.gcd(replications, 16).bit_length() - 1)
        while points > 2 and replications // points < min_groups:
            points //= 2
        if points < 2:
            raise ValueError(f"sampler 'qmc' needs an even number of replications, got {replications}")
        if points not in self._sized:
            self._sized[points] = QMC(points, self.seed)
        return self._sized[points]

    def _base_points(self, width: int, device) -> Tensor:
        """(points, width) Sobol points as integers in [0, 2^BITS) (scrambled once, fixed seed)."""
        key = (width, self.group_size, str(device))
        if key not in self._base:
            dim = min(width, SobolEngine.MAXDIM)
            pts = SobolEngine(dim, scramble=True, seed=self.seed).draw(self.group_size, dtype=torch.float64)
            ints = (pts * 2 ** self.BITS).long()
            self._base[key] = ints[:, torch.arange(width) % dim].to(device)
        return self._base[key]

    def fill_(self, dist, out, generator):
        k, B, W = out.shape
        M = self.group_size
        if k % M:
            raise ValueError(f"QMC noise needs whole groups of {M} replications, got {k}")
        base = self._base_points(W, out.device)                                   # (M, W)
        shift = torch.randint(0, 2 ** self.BITS, (k // M, 1, B, W), generator=generator, device=out.device)
        ints = torch.bitwise_xor(base.reshape(1, M, 1, W), shift)                  # (k/M, M, B, W)
        u = ints.reshape(k, B, W).to(torch.float64).add_(0.5).mul_(2.0 ** -self.BITS)   # in (0, 1), never 0 or 1
        return out.copy_(icdf_(dist, u))     # F⁻¹ in float64: float32 would round u near 1 to 1 (r = ∞)


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Make ``cls`` available by its ``name`` (``GLR(sampler=...)``, predictors, the CLI, specs)."""
    SAMPLERS[cls.name] = cls
    return cls


for _cls in (IID, Antithetic, QMC):
    register_sampler(_cls)


def get_sampler(sampler: str | Sampler) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]()
