"""Control variates: per-replication losses L (K, B) → loss weights w (K, B) of the GLR estimate.

The estimate is (1/(K·B)) Σₖ Σᵢ wₖᵢ · s(rₖᵢ) · hₖᵢ. Any w = L − b with a baseline b that does
not depend on replication k's own noise keeps it exactly unbiased (E[b · s(r)] = E[b] E[s(r)]
= 0). Replications drawn together (a sampler's *groups*: antithetic pairs, QMC nets) depend
on each other, so a baseline must leave out k's whole group g(k), not k alone.

A control variate gives two things:

* ``weights(L, groups)`` — the definition, on all K replications at once (the reference
  estimator uses it);
* ``split(L_chunk, groups_chunk, K)`` → (a, c) with w = a − c · Sᵢ, Sᵢ = Σₖ Lₖᵢ over *all* K:
  a needs only the chunk at hand, and the Sᵢ term is added once at the end. This is what
  lets the fast path process replications in chunks, and across processes. A control
  variate without ``split`` works only when all K replications fit one chunk.

To add one: subclass :class:`ControlVariate` in one file, implement ``weights`` (and ``split``, or set
``chunkable = False``), and :func:`register_control_variate` it; the estimator, the CLI's choices, the
specs and the tests pick it up (``tests/test_extensions.py`` shows one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_sums(losses: Tensor, groups: Tensor, group_size: int) -> Tensor:
    """(K, B): each replication's whole-group sum of losses (its own included)."""
    sums = torch.zeros(losses.shape[0] // group_size, *losses.shape[1:], dtype=losses.dtype, device=losses.device)
    return sums.index_add_(0, groups, losses)[groups]


class ControlVariate:
    name = "control variate"
    min_groups = 1
    chunkable = True    # has ``split``: works when the replications are processed in chunks or across processes

    def weights(self, losses: Tensor, groups: Tensor, group_size: int) -> Tensor:
        """w (K, B) from all K replications' losses (K, B) and their group ids (K,)."""
        raise NotImplementedError

    def split(self, losses: Tensor, groups: Tensor, group_size: int, replications: int) -> tuple[Tensor, float]:
        """(a, c) for a chunk of replications (k, B), with w = a − c·Sᵢ (module docstring)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class NoBaseline(ControlVariate):
    """w = L: the seed's plain estimator."""

    name = "none"

    def weights(self, losses, groups, group_size):
        return losses

    def split(self, losses, groups, group_size, replications):
        return losses, 0.0


class LeaveOneOut(ControlVariate):
    """wₖᵢ = Lₖᵢ − (Sᵢ − Gₖᵢ) / (K − m): the mean loss of the replications outside k's group
    (m replications, group sum Gₖᵢ). Leave-one-out for i.i.d. noise (m = 1), leave-pair-out
    for antithetic pairs (m = 2), leave-net-out for QMC. Needs at least two groups."""

    name = "leave-one-out"
    min_groups = 2

    def weights(self, losses, groups, group_size):
        K, m = losses.shape[0], group_size
        return losses - (losses.sum(0) - group_sums(losses, groups, m)) / (K - m)

    def split(self, losses, groups, group_size, replications):
        m = group_size
        return losses + group_sums(losses, groups, m) / (replications - m), 1.0 / (replications - m)


CONTROL_VARIATES: dict[str, type[ControlVariate]] = {}


def register_control_variate(cls: type[ControlVariate]) -> type[ControlVariate]:
    """Make ``cls`` available by its ``name`` (``GLR(baseline=...)``, the CLI, specs)."""
    CONTROL_VARIATES[cls.name] = cls
    return cls


for _cls in (NoBaseline, LeaveOneOut):
    register_control_variate(_cls)


def get_control_variate(baseline: bool | str | ControlVariate) -> ControlVariate:
    """``True`` → leave-one-out, ``False`` → none, a name, or an instance."""
    if isinstance(baseline, ControlVariate):
        return baseline
    if baseline is True:
        return LeaveOneOut()
    if baseline is False or baseline is None:
        return NoBaseline()
    if baseline not in CONTROL_VARIATES:
        raise ValueError(f"unknown control variate {baseline!r}; valid: {', '.join(CONTROL_VARIATES)}")
    return CONTROL_VARIATES[baseline]()
