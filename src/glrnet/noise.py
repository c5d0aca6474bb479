"""Neuron noise r ~ f and its score s(r) = −d log f(r) / dr.

The GLR estimator needs two things from the noise distribution: samples, drawn
in place into preallocated buffers from an explicit ``torch.Generator`` (fast and
reproducible), and the score s. Noise is described by a ``torch.distributions``
object; closed forms are used for the three families below (each is tested against
the autograd derivative of ``log_prob``):

==========================  ====================  ============================
noise f                     score s(r)            in-place sampler
==========================  ====================  ============================
Normal(0, σ)                r / σ²                ``normal_``
Laplace(0, b)               sign(r) / b           inverse CDF of ``uniform_``
Logistic(0, s) (below)      tanh(r / 2s) / s      logit of ``uniform_``
==========================  ====================  ============================

Any other zero-centred distribution on the real line with a differentiable density
and an ``icdf`` also works (sampled by inverse CDF, score by autograd), more slowly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.distributions import (AffineTransform, Distribution, Laplace, Normal, SigmoidTransform,
                                 TransformedDistribution, Uniform, constraints)


class Logistic(TransformedDistribution):
    """Logistic(loc, scale): density e^{−z} / (scale (1 + e^{−z})²), z = (x − loc)/scale.

    ``torch.distributions`` has none; this is the standard construction
    loc + scale · logit(U), U ~ Uniform(0, 1). Standard deviation: scale · π / √3.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __init__(self, loc, scale, validate_args=None):
        loc, scale = torch.as_tensor(loc, dtype=torch.get_default_dtype()), torch.as_tensor(
            scale, dtype=torch.get_default_dtype())
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        base = Uniform(torch.zeros_like(self.loc), torch.ones_like(self.loc), validate_args=validate_args)
        super().__init__(base, [SigmoidTransform().inv, AffineTransform(self.loc, self.scale)],
                         validate_args=validate_args)

    @property
    def mean(self):
        return self.loc

    @property
    def stddev(self):
        return self.scale * math.pi / math.sqrt(3)

    def __repr__(self):
        return f"Logistic(loc: {self.loc}, scale: {self.scale})"


KINDS = ("gaussian", "laplace", "logistic")


def make_noise(kind: str = "gaussian", std: float = 2.0) -> Distribution:
    """Zero-centred noise of the given family with standard deviation ``std``.

    ``std`` is the standard deviation for every family (Laplace scale std/√2, logistic
    scale std·√3/π), so that families are compared at equal variance.
    """
    if not std > 0:
        raise ValueError(f"noise standard deviation must be > 0, got {std}")
    if kind == "gaussian":
        return Normal(0.0, float(std))
    if kind == "laplace":
        return Laplace(0.0, float(std) / math.sqrt(2))
    if kind == "logistic":
        return Logistic(0.0, float(std) * math.sqrt(3) / math.pi)
    raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(KINDS)}")


def describe(dist: Distribution) -> dict:
    """A JSON-able description that :func:`make_noise` turns back into ``dist``."""
    for kind, cls in (("gaussian", Normal), ("laplace", Laplace), ("logistic", Logistic)):
        if type(dist) is cls:
            return {"kind": kind, "std": float(dist.stddev)}
    return {"kind": type(dist).__name__, "std": float("nan")}


def validate_noise(dist: Distribution) -> Distribution:
    """Check that ``dist`` is a scalar, zero-centred distribution on ℝ with a differentiable density."""
    if not isinstance(dist, Distribution):
        raise ValueError(f"noise must be a torch.distributions.Distribution, got {type(dist).__name__}")
    if dist.batch_shape != torch.Size() or dist.event_shape != torch.Size():
        raise ValueError(f"noise must be a scalar distribution (one draw per neuron), got batch shape "
                         f"{tuple(dist.batch_shape)} and event shape {tuple(dist.event_shape)}")
    if dist.support is not constraints.real:
        raise ValueError(
            f"noise {dist!r} has no differentiable density on the real line (support {dist.support}); "
            "GLR needs the score −d log f/dr, so use Normal, Laplace or Logistic noise")
    centre = getattr(dist, "loc", None)
    if centre is None:
        centre = dist.mean
    if not torch.all(torch.as_tensor(centre) == 0):
        raise ValueError(f"noise must be zero-centred, got location {float(centre):g} for {dist!r}")
    if not _closed_form(dist) and not _has_icdf(dist):
        raise ValueError(f"noise {type(dist).__name__} has no closed-form sampler and no icdf")
    return dist


def _closed_form(dist: Distribution) -> bool:
    return type(dist) in (Normal, Laplace, Logistic)


def _has_icdf(dist: Distribution) -> bool:
    try:
        dist.icdf(torch.tensor(0.5))
    except NotImplementedError:
        return False
    return True


def _scale(dist: Distribution) -> float:
    return float(dist.scale)


def sample_(dist: Distribution, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``out`` in place with i.i.d. draws of ``dist`` from ``generator``; returns ``out``."""
    if type(dist) is Normal:
        return out.normal_(0.0, _scale(dist), generator=generator)
    tiny = torch.finfo(out.dtype).tiny
    if type(dist) is Laplace:
        # torch's Laplace.rsample: −b · sign(u) · log1p(−|u|),  u ~ U(−1, 1)
        out.uniform_(-1.0 + torch.finfo(out.dtype).eps, 1.0, generator=generator)
        sign = torch.sign(out)
        return out.abs_().neg_().log1p_().mul_(sign).mul_(-_scale(dist))
    if type(dist) is Logistic:
        return out.uniform_(tiny, 1.0, generator=generator).logit_().mul_(_scale(dist))
    out.uniform_(tiny, 1.0, generator=generator)
    return out.copy_(dist.icdf(out))


def score(dist: Distribution, r: Tensor, out: Tensor | None = None) -> Tensor:
    """s(r) = −d log f(r) / dr, elementwise (closed form where known, autograd otherwise)."""
    if type(dist) is Normal:
        return torch.mul(r, 1.0 / _scale(dist) ** 2, out=out)
    if type(dist) is Laplace:
        return torch.sign(r, out=out).mul_(1.0 / _scale(dist))
    if type(dist) is Logistic:
        s = _scale(dist)
        return torch.mul(r, 0.5 / s, out=out).tanh_().mul_(1.0 / s)
    return score_autograd(dist, r) if out is None else out.copy_(score_autograd(dist, r))


def linear_score_scale(dist: Distribution) -> float | None:
    """c if s(r) = c·r (Normal: 1/σ²), else None; the estimator then reuses r as its score."""
    return 1.0 / _scale(dist) ** 2 if type(dist) is Normal else None


def score_autograd(dist: Distribution, r: Tensor) -> Tensor:
    """−d log f(r)/dr by autograd on ``dist.log_prob``; the reference for the closed forms."""
    with torch.enable_grad():
        r = r.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(dist.log_prob(r).sum(), r)
    return -grad


def fill_noise_(dist: Distribution, out: Tensor, generator: torch.Generator | None = None,
                antithetic: bool = False) -> Tensor:
    """Fill ``out`` (k, ...) with noise; ``antithetic``: draws r in the first half of axis 0, −r in the second."""
    if not antithetic:
        return sample_(dist, out, generator)
    if out.shape[0] % 2:
        raise ValueError(f"antithetic noise needs an even number of replications, got {out.shape[0]}")
    half = out.shape[0] // 2
    sample_(dist, out[:half], generator)
    torch.neg(out[:half], out=out[half:])
    return out


#: chunk size (MB of working set) when noise is prefetched: small enough for the cache, two in flight
PREFETCH_CHUNK_MB = 16.0

_CORE_RESERVED = False
_NOISE_THREAD: ThreadPoolExecutor | None = None


def reserve_core_for_noise() -> bool:
    """Dedicate one core to drawing noise: lower torch's intra-op threads by one, once per process.

    Measured on a 2-core machine (benchmarks/): noise drawn on a helper thread while one
    compute thread works brings a GLR step to within ~1.1× of the random-number floor;
    oversubscribing (helper + all compute threads), or changing the thread count around
    every call, is several times slower and slows later small operations too. Returns
    False (and prefetching is skipped) when torch runs on a single thread.
    """
    global _CORE_RESERVED
    if _CORE_RESERVED:
        return True
    threads = torch.get_num_threads()
    if threads < 2:
        return False
    torch.set_num_threads(threads - 1)
    _CORE_RESERVED = True
    return True


def _noise_thread() -> ThreadPoolExecutor:
    """The process's one noise-drawing thread (single-threaded itself), shared by every stream."""
    global _NOISE_THREAD
    if _NOISE_THREAD is None:
        _NOISE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glrnet-noise",
                                           initializer=torch.set_num_threads, initargs=(1,))
    return _NOISE_THREAD


class NoiseStream:
    """Noise for successive chunks of replications, drawn in place into reused buffers.

    Random numbers are the serial bottleneck on a CPU (one generator, one core), so with
    ``prefetch`` the next chunk is drawn on a helper thread while the caller works on the
    current one (see :func:`reserve_core_for_noise`). The generator is consumed in the same
    order either way, so the values are the same. Antithetic chunks hold draws r in their
    first half and −r in their second.
    """

    def __init__(self, prefetch: bool = True):
        self.prefetch = prefetch
        self._buffers: dict = {}

    def chunks(self, dist: Distribution, sizes: list[int], rows: int, width: int, like: Tensor,
               generator: torch.Generator | None, antithetic: bool = False):
        """Yield noise tensors (k, rows, width) for each k in ``sizes`` (dtype and device of ``like``)."""
        draw = lambda k, slot: self._draw(dist, k, rows, width, like, generator, antithetic, slot)  # noqa: E731
        if not self.prefetch or like.device.type != "cpu" or len(sizes) == 1 or not reserve_core_for_noise():
            for k in sizes:
                yield draw(k, 0)
            return
        pool = _noise_thread()
        pending = pool.submit(draw, sizes[0], 0)
        for i in range(len(sizes)):
            noise = pending.result()
            if i + 1 < len(sizes):
                pending = pool.submit(draw, sizes[i + 1], (i + 1) % 2)
            yield noise

    def _draw(self, dist, k, rows, width, like, generator, antithetic, slot) -> Tensor:
        key = (like.device, like.dtype, rows, width, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < k:
            buf = torch.empty(k, rows, width, dtype=like.dtype, device=like.device)
            self._buffers = {kk: v for kk, v in self._buffers.items() if kk[:4] == key[:4]}
            self._buffers[key] = buf
        return fill_noise_(dist, buf[:k], generator, antithetic)
