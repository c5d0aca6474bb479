"""GLR on a GPU: the fast path equals the reference definition there (float64, the same noise), CPU and GPU
estimates agree in distribution, a seeded CUDA generator reproduces an estimate, float16 / bfloat16 parameters
get gradients of their own dtype, and ``glrnet train --device cuda`` runs end to end.

Every test takes a ``device``: its ``"cuda"`` cases carry the ``cuda`` marker and are skipped where no GPU is
visible (``pytest -m cuda`` selects them on a GPU machine; ``-m "not cuda"`` leaves them out), its ``"cpu"``
cases run everywhere, so the CPU suite exercises the same code. The file also runs without pytest:
``benchmarks/gpu/device_check.py`` calls its test functions itself on a machine that lacks pytest (the cases
a function takes are kept on it as ``fn.cases``). Tolerances come from standard errors (``stats.py``); seeds
are fixed.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
import unittest
from contextlib import contextmanager
from pathlib import Path

import torch

import glrnet

try:
    import pytest
except ImportError:          # benchmarks/gpu/device_check.py runs these functions itself
    pytest = None

from glrnet.estimators.reference import reference_estimate  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from stats import means_equal, flat_grads  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------- cases without pytest
def parametrize(name: str, values):
    """``pytest.mark.parametrize`` over ``values`` (a ``"cuda"`` device marked ``cuda`` and skipped without a
    GPU); the values are also kept on the function (``fn.cases``) for runners without pytest."""
    def mark(fn):
        cases = getattr(fn, "cases", {})
        fn.cases = {name: list(values), **cases}
        if pytest is not None:
            gpu = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
            params = [pytest.param(v, marks=gpu, id=str(v)) if name == "device" and v == "cuda"
                      else pytest.param(v, id=str(v)) for v in values]
            fn = pytest.mark.parametrize(name, params)(fn)
        return fn
    return mark


def expected_failure(reason: str):
    """A known defect of the library, stated in ``reason``: strict (the day it is fixed, the test says so)."""
    def mark(fn):
        fn.expected_failure = reason
        return pytest.mark.xfail(strict=True, reason=reason)(fn) if pytest is not None else fn
    return mark


def need(device: str) -> torch.device:
    """The device, or a skip (``unittest.SkipTest``: pytest and the fallback runner both report it skipped)."""
    if device == "cuda" and not HAS_CUDA:
        raise unittest.SkipTest("no CUDA device")
    return torch.device(device)


def all_cases(fn):
    """Every keyword combination of ``fn.cases`` (what the fallback runner calls)."""
    cases = getattr(fn, "cases", {})
    names = list(cases)
    return [dict(zip(names, combo)) for combo in itertools.product(*(cases[n] for n in names))]


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------- small problems
def lenet_like(site: str = "activity", activation: str = "threshold", batch: int = 4, seed: int = 0):
    """conv 3×3 → max-pool 2 → conv 3×3 → flatten → linear on 10×10 inputs (the LeNet's shape, small), noise
    N(0, 2) on the units; ``site="weight"``: the convolutions' noise N(0, 0.05) on their parameters."""
    torch.manual_seed(seed)
    net = glrnet.NoisySequential(
        glrnet.NoisyConv2d(1, 2, 3, activation=activation), torch.nn.MaxPool2d(2),
        glrnet.NoisyConv2d(2, 3, 3, activation=activation), torch.nn.Flatten(), glrnet.NoisyLinear(3 * 2 * 2, 3),
        noise=torch.distributions.Normal(0.0, 2.0), input_shape=(1, 10, 10))
    if site != "activity":
        for m in glrnet.noisy_layers(net)[:2]:
            m.site, m.noise = site, torch.distributions.Normal(0.0, 0.05)
    return net, torch.rand(batch, 1, 10, 10), torch.randint(0, 3, (batch,))


def mlp(activation: str = "sigmoid", batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return glrnet.NoisyMLP([5, 4, 4, 3], activation=activation), torch.rand(batch, 5), torch.randint(0, 3, (batch,))


# name: (problem, estimator options) — the seed's estimator, its variance-reduced forms, and the scale study's
# techniques: weight noise on the convolutions (all layers noisy at once, or one layer per replication)
CASES = {
    "mlp-plain": (lambda: mlp(), dict(baseline=False)),
    "mlp-antithetic": (lambda: mlp(), dict(baseline=True, sampler="antithetic")),
    "cnn-activity": (lambda: lenet_like(), dict(baseline=True)),
    "cnn-weight-all": (lambda: lenet_like("weight"), dict(baseline=True)),
    "cnn-weight-layerwise": (lambda: lenet_like("weight"), dict(baseline=True, injection="layerwise")),
}


def to(problem, device, dtype=None):
    net, x, y = problem
    return net.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype), y.to(device)


def recording_sampler(name: str):
    """A sampler of the kind ``name`` that keeps a copy of every buffer it fills, in order."""
    base = type(glrnet.GLR(sampler=name).sampler)

    class Recording(base):
        def fill_(self, dist, out, generator):
            res = super().fill_(dist, out, generator)
            self.calls.append(res.clone())
            return res
    rec = Recording()
    rec.calls = []
    return rec


def noise_layout(model, x):
    """Execution order and unit shapes of the noisy layers (one noise-free pass on x[:1])."""
    layers = glrnet.noisy_layers(model)
    with torch.no_grad(), glrnet.Injection(layers, 1, 1) as inj:
        model(x[:1])
    return layers, inj.order, inj.shapes


def replay_reference(model, x, y, est, rec):
    """The reference estimate on exactly the noise the fast path drew. A chunk of a layer set is one buffer
    (k, B, Σ widths) where all its layers carry unit noise of one law, else one buffer per layer (a weight-site
    layer's (k, 1, P): one perturbation per replication, shared by the batch)."""
    layers, order, shapes = noise_layout(model, x)
    B, calls, out = x.shape[0], list(rec.calls), {}
    width = {i: math.prod(shapes[i]) if layers[i].site == "activity" else layers[i].parameter_count for i in order}
    sets = [order] if est.injection == "all" else [[i] for i in order]
    for active in sets:
        per_set = est.replications // len(sets)
        parts, groups, taken, offset = {i: [] for i in active}, [], 0, 0
        while taken < per_set:
            c = calls.pop(0)
            k = c.shape[0]
            if len(active) > 1 and c.shape[1] == B and c.shape[2] == sum(width[i] for i in active):
                o = 0
                for i in active:          # one buffer for the whole set: split it per layer
                    parts[i].append(c[..., o:o + width[i]])
                    o += width[i]
            else:
                for n, i in enumerate(active):
                    part = c if n == 0 else calls.pop(0)
                    assert part.shape[0] == k and part.shape[2] == width[i], (part.shape, k, width[i])
                    parts[i].append(part.expand(k, B, width[i]))
            groups.append(est.sampler.group_ids(k, x.device) + offset)
            offset += k // est.sampler.group_size
            taken += k
        noise = {i: torch.cat(parts[i]).reshape(per_set, B, *(shapes[i] if layers[i].site == "activity" else (-1,)))
                 for i in active}
        out.update(reference_estimate(model, x, y, est.loss, noise, torch.cat(groups), est.sampler.group_size,
                                      est.control_variate))
    assert not calls, f"{len(calls)} recorded noise buffers were not replayed"
    return [g for i in range(len(layers)) for g in out[i]]


# ---------------------------------------------------------------------------- the tests
@parametrize("case", list(CASES))
@parametrize("device", DEVICES)
def test_fast_path_equals_the_reference_on_the_same_noise(device, case):
    """float64 on the device: GLR.estimate (one chunk, and many chunks under a tiny memory budget) equals the
    estimator's definition evaluated on the noise the fast path drew."""
    dev = need(device)
    make, options = CASES[case]
    with default_dtype(torch.float64):
        model, x, y = to(make(), dev)
    for budget in (1000.0, 0.002):
        rec = recording_sampler(options.get("sampler", "iid"))
        est = glrnet.GLR(replications=48, memory_budget_mb=budget, prefetch=False,
                         generator=torch.Generator(device=dev).manual_seed(3), **{**options, "sampler": rec})
        fast, stats = est.estimate(model, x, y)
        assert stats.chunks > (1 if budget < 1 else 0)
        ref = replay_reference(model, x, y, est, rec)
        assert len(fast) == len(ref) == len(list(model.parameters()))
        for f, r in zip(fast, ref):
            assert f.device.type == dev.type and f.dtype == torch.float64
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def samples(model, x, y, n, seed, device, **options):
    est = glrnet.GLR(generator=torch.Generator(device=device).manual_seed(seed), **options)
    return torch.stack([flat_grads(est.estimate(model, x, y)[0]).double().cpu() for _ in range(n)])


@parametrize("case", ["mlp-antithetic", "cnn-weight-layerwise"])
@parametrize("device", DEVICES)
def test_estimates_on_the_device_agree_in_distribution_with_the_cpu(device, case):
    """float32, 200 independent estimates on the device and 200 on the CPU (other seeds): every coordinate's
    means equal within standard errors (Bonferroni and χ² bounds, stats.py). ``device="cpu"`` compares two CPU
    streams of 100 each: the check itself. A 20 % mis-scaled estimate is rejected (the test has power)."""
    dev = need(device)
    make, options = CASES[case]
    problem, n = make(), 200 if dev.type == "cuda" else 100
    here = samples(*to(copy.deepcopy(problem), dev), n=n, seed=11, device=dev, replications=48, **options)
    cpu = samples(*to(problem, "cpu"), n=n, seed=12, device="cpu", replications=48, **options)
    ok, report = means_equal(here, cpu)
    print(f"{device} vs cpu ({case}): {report}")
    assert ok, report
    assert not means_equal(0.8 * here, cpu)[0], "a 20 % mis-scaled estimate was not rejected: no power"


@parametrize("device", DEVICES)
def test_a_seeded_generator_reproduces_the_estimate(device):
    """Two estimators with ``torch.Generator(device).manual_seed(7)`` draw bit-identical noise and give
    bit-identical estimates; another seed gives another estimate; without a generator, ``torch.manual_seed``
    governs the one the estimator makes on the device."""
    dev = need(device)
    model, x, y = to(lenet_like("weight"), dev)

    def run(seed):
        rec = recording_sampler("iid")
        est = glrnet.GLR(replications=96, injection="layerwise", sampler=rec,
                         generator=torch.Generator(device=dev).manual_seed(seed))
        return est.estimate(model, x, y)[0], rec.calls

    (a, noise_a), (b, noise_b), (c, _) = run(7), run(7), run(8)
    assert len(noise_a) == len(noise_b) and all(torch.equal(p, q) for p, q in zip(noise_a, noise_b)), \
        "the same seed drew different noise"
    assert all(torch.equal(p, q) for p, q in zip(a, b)), \
        "the same noise gave different estimates (non-deterministic arithmetic on this device)"
    assert not all(torch.equal(p, q) for p, q in zip(a, c)), "another seed gave the same estimate"
    with torch.random.fork_rng(devices=[]):          # the caller's global stream is left as it was
        results = []
        for _ in range(2):
            torch.manual_seed(5)
            results.append(glrnet.GLR(replications=96, injection="layerwise").estimate(model, x, y)[0])
    assert all(torch.equal(p, q) for p, q in zip(*results))


@parametrize("dtype", ["float16", "bfloat16"])
@parametrize("device", DEVICES)
def test_low_precision_parameters_get_gradients_of_their_own_dtype(device, dtype):
    """A float16 / bfloat16 model and batch: ``backward`` fills every ``.grad`` in the parameter's dtype, on its
    device, finite; and the estimates agree in distribution with float32 ones on the same (rounded) weights
    (200 of each on a GPU; 60 on the CPU, whose half-precision arithmetic is slow)."""
    dev, dt = need(device), getattr(torch, dtype)
    low = to(lenet_like("weight"), dev, dt)
    model, x, y = low
    est = glrnet.GLR(replications=48, injection="layerwise", generator=torch.Generator(device=dev).manual_seed(1))
    est.backward(model, x, y)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dt and p.grad.device.type == dev.type, name
        assert torch.isfinite(p.grad).all(), name
    ref = (copy.deepcopy(model).float(), x.float(), y)
    n = 200 if dev.type == "cuda" else 60
    a = samples(*low, n=n, seed=2, device=dev, replications=48, injection="layerwise")
    b = samples(*ref, n=n, seed=3, device=dev, replications=48, injection="layerwise")
    ok, report = means_equal(a, b)
    print(f"{dtype} vs float32 on {device}: {report}")
    assert ok, report


@parametrize("device", DEVICES)
def test_float16_loss_statistic_stays_finite_at_the_seed_scale(device):
    """The seed's 196-20-10 MLP at K = 1000, B = 25 in float16: the reported mean loss is finite (sums over the
    replications are taken in float32)."""
    dev = need(device)
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([196, 20, 10], activation="threshold").to(dev, torch.float16)
    x, y = torch.rand(25, 196, device=dev, dtype=torch.float16), torch.randint(0, 10, (25,), device=dev)
    grads, stats = glrnet.GLR(replications=1000, generator=torch.Generator(device=dev).manual_seed(0)).estimate(
        model, x, y)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(stats.loss), f"mean loss {stats.loss}"


@parametrize("device", ["cuda"])
def test_glrnet_train_runs_on_the_device(device, tmp_path):
    """``glrnet train --device cuda`` (the scale study's weight-layerwise technique, digits at 28×28, one
    epoch): it finishes and writes its metrics with accuracies in [0, 1]. (The CPU path: test_train.py.)"""
    need(device)
    src = str(Path(glrnet.__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "glrnet", "train", "--dataset", "digits", "--image-size", "28", "--subset", "300",
           "--arch", "lenet", "--hidden", "none", "--activation", "threshold", "--perturb", "conv=weight",
           "--injection", "layerwise", "--replications", "96", "--lr", "0.01", "--epochs", "1",
           "--lap-replications", "10", "--eval-replications", "2", "--device", device, "--quiet",
           "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["device"] == device
    assert 0 <= metrics["test_accuracy_ot"] <= 1 and 0 <= metrics["test_accuracy_lap"] <= 1
