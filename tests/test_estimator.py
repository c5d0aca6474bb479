"""The GLR estimator is exactly right: unbiased against independent references.

References: (1) the pathwise (autograd) gradient through the same noisy network,
for smooth φ and L; (2) central finite differences of E[L] with common random
numbers, for discontinuous φ and L. Tolerances come from standard errors (stats.py).
"""

import functools
import math

import pytest
import torch

import glrnet
from glrnet.nn.noise import kinds, make_noise
from stats import assert_means_equal, flat_grads, means_equal


def glr_samples(model, x, y, n, **kw):
    est = glrnet.GLR(generator=torch.Generator().manual_seed(kw.pop("seed", 1)), **kw)
    return torch.stack([flat_grads(est.estimate(model, x, y)[0]) for _ in range(n)])


def pathwise_samples(model, x, y, n, replications, seed=2):
    bp = glrnet.Backprop(noise=True, replications=replications, generator=torch.Generator().manual_seed(seed))
    out = []
    for _ in range(n):
        model.zero_grad()
        bp.backward(model, x, y)
        out.append(flat_grads([p.grad for p in model.parameters()]))
    return torch.stack(out)


def small_problem(sizes, batch=6, seed=0, **model_kw):
    torch.manual_seed(seed)
    model = glrnet.NoisyMLP(sizes, **model_kw)
    x = torch.rand(batch, sizes[0])
    y = torch.randint(0, sizes[-1], (batch,))
    return model, x, y


@functools.cache
def _pathwise_reference(sizes, dtype):
    model, x, y = small_problem(list(sizes))
    return pathwise_samples(model, x, y, n=200, replications=2000)


def pathwise_reference(sizes):
    """Pathwise gradients of small_problem(sizes), drawn once and shared by the tests of this file that
    compare an estimator on that problem with them (their GLR samples use other seeds)."""
    return _pathwise_reference(tuple(sizes), torch.get_default_dtype())


@pytest.mark.slow
@pytest.mark.xdist_group("estimator_reference")
@pytest.mark.parametrize("sizes", [[5, 4, 3], [5, 4, 4, 3]], ids=["2-layer", "3-layer"])
def test_glr_equals_pathwise_sigmoid_cross_entropy(float64, sizes):
    """E[GLR] = E[pathwise gradient] for every parameter (sigmoid, cross-entropy, N(0, 2))."""
    model, x, y = small_problem(sizes)
    glr = glr_samples(model, x, y, n=200, replications=2000)
    path = pathwise_reference(sizes)
    report = assert_means_equal(glr, path)
    print(report)
    # the same test has power: a 15 % mis-scaled estimator is rejected
    ok, report = means_equal(0.85 * glr, path)
    print("0.85 × GLR:", report)
    assert not ok


@pytest.mark.parametrize("output_activation", ["sigmoid"])
def test_glr_equals_pathwise_with_output_activation(float64, output_activation):
    model, x, y = small_problem([5, 4, 3], output_activation=output_activation)
    assert_means_equal(glr_samples(model, x, y, n=150, replications=2000),
                       pathwise_samples(model, x, y, n=150, replications=2000))


def expected_loss_fd(model, x, y, loss, param, index, h, samples, seed, noise=None):
    """Central finite difference of E[L] in one coordinate with common random numbers.

    Returns per-replication differences (samples,), whose mean estimates ∂E[L]/∂θ. ``noise``: the
    draw of sample_noise(model, samples, batch) with a generator seeded ``seed``, when already drawn.
    """
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = glrnet.nn.sample_noise(model, samples, x.shape[0], generator=gen)
    loss = glrnet.get_loss(loss)
    values = []
    with torch.no_grad():
        for sign in (+1, -1):
            param[index] += sign * h
            out = model(x, noise=noise)
            values.append(loss(out.reshape(-1, out.shape[-1]), y.repeat(samples)).reshape(samples, -1).mean(1))
            param[index] -= sign * h
    return (values[0] - values[1]) / (2 * h)


def fd_and_glr_columns(model, x, y, loss, glr, n, k, h=0.05):
    """The first and last entry of every parameter: (GLR samples (n, 2P), central finite differences of
    E[L] with common random numbers (n, 2P), each column the mean of k replications)."""
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    fd_cols, glr_cols = [], []
    for pi, p in enumerate(params):
        # both entries of a parameter see the same noise (seed 10 + pi): drawn once
        noise = glrnet.nn.sample_noise(model, n * k, x.shape[0], generator=torch.Generator().manual_seed(10 + pi))
        for flat in (0, p.numel() - 1):
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), p.shape))
            diffs = expected_loss_fd(model, x, y, loss, p.data, index, h, n * k, seed=10 + pi, noise=noise)
            fd_cols.append(diffs.reshape(n, k).mean(1))
            glr_cols.append(glr[:, offsets[pi] + flat])
    return torch.stack(glr_cols, 1), torch.stack(fd_cols, 1)


@pytest.mark.slow
@pytest.mark.parametrize("activation,loss", [("threshold", "zero_one"), ("arctan_inv", "cross_entropy")])
def test_glr_equals_finite_differences_discontinuous(float64, activation, loss):
    """Discontinuous φ / L: GLR = central FD of E[L] (CRN), selected weights of every layer."""
    model, x, y = small_problem([4, 3, 3, 3], batch=4, seed=3, activation=activation)
    with torch.no_grad():  # put the pre-activations where the discontinuities matter
        for layer in model.layers:
            layer.weight.mul_(3.0)
    n, k = 100, 2000
    glr = glr_samples(model, x, y, n=n, replications=k, loss=loss)
    glr_sel, fd = fd_and_glr_columns(model, x, y, loss, glr, n, k)
    print(assert_means_equal(glr_sel, fd))
    # the gradient is not trivially zero, so equality says something
    assert (glr_sel.mean(0).abs() / (glr_sel.std(0) / math.sqrt(n))).max() > 5


@pytest.mark.slow
@pytest.mark.parametrize("kind", kinds())
def test_each_noise_estimator_unbiased(float64, kind):
    model, x, y = small_problem([5, 4, 3], noise=make_noise(kind, 2.0))
    assert_means_equal(glr_samples(model, x, y, n=150, replications=2000),
                       pathwise_samples(model, x, y, n=150, replications=2000))


VARIANTS = {"baseline": dict(baseline=True), "antithetic": dict(baseline=False, sampler="antithetic"),
            "baseline+antithetic": dict(baseline=True, sampler="antithetic")}
PLAIN = dict(baseline=False)


@pytest.mark.xdist_group("estimator_reference")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sizes", [[5, 4, 3], [5, 4, 4, 3]], ids=["2-layer", "3-layer"])
def test_variance_reduction_unbiased(float64, variant, sizes):
    model, x, y = small_problem(sizes)
    est = glr_samples(model, x, y, n=200, replications=200, **VARIANTS[variant])
    print(assert_means_equal(est, pathwise_reference(sizes)))


def paper_problem(seed=0):
    """The seed's 196-20-10 sigmoid network, a random batch of 25 inputs, scaled random weights."""
    torch.manual_seed(seed)
    model = glrnet.NoisyMLP([196, 20, 10])
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(3.0)
    return model, torch.rand(25, 196), torch.randint(0, 10, (25,))


def total_variance(samples):
    """Trace of the covariance, and the standard error of its logarithm.

    v̂ = mean of dₙ = ‖gₙ − ḡ‖² · N/(N−1); SE(log v̂) ≈ std(dₙ) / (√N · v̂) (delta method).
    """
    s = samples.double()
    n = s.shape[0]
    d = ((s - s.mean(0)) ** 2).sum(1) * n / (n - 1)
    v = d.mean().item()
    return v, d.std().item() / (math.sqrt(n) * v)


@pytest.mark.parametrize("variant,min_ratio", [("baseline", 3.5), ("antithetic", 2.0),
                                               ("baseline+antithetic", 2.0)])
def test_variance_reduction_ratio(variant, min_ratio):
    """Total variance (trace of the covariance) of the estimate on the paper's network at K = 100.

    The ratio plain / reduced must exceed ``min_ratio`` by more than 4 standard errors of its
    logarithm (the two estimates are independent, so their log-SEs add in quadrature).
    """
    model, x, y = paper_problem()
    n = 300
    plain = glr_samples(model, x, y, n=n, replications=100, seed=5, **PLAIN)
    reduced = glr_samples(model, x, y, n=n, replications=100, seed=6, **VARIANTS[variant])
    (v_plain, se_plain), (v_reduced, se_reduced) = total_variance(plain), total_variance(reduced)
    ratio, se_log = v_plain / v_reduced, math.hypot(se_plain, se_reduced)
    print(f"{variant}: variance ratio {ratio:.2f} (± {100 * se_log:.0f} %)")
    assert math.log(ratio) - 4 * se_log > math.log(min_ratio), f"{variant}: ratio {ratio:.2f}"


@pytest.mark.parametrize("variant", [PLAIN, *VARIANTS.values()], ids=["plain", *VARIANTS])
def test_chunked_equals_unchunked(variant):
    """Same seed, a tiny memory budget (many chunks) vs a large one (one chunk): same estimate."""
    model, x, y = small_problem([7, 6, 5, 3], batch=5)
    results = []
    for budget in (0.01, 1000.0):
        est = glrnet.GLR(replications=600, memory_budget_mb=budget,
                         generator=torch.Generator().manual_seed(7), **variant)
        grads, stats = est.estimate(model, x, y)
        results.append((flat_grads(grads), stats))
    (a, sa), (b, sb) = results
    assert sa.chunks > 4 and sb.chunks == 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sa.loss, sb.loss)


def test_backward_accumulates_into_grad_and_works_with_optimizers():
    model, x, y = small_problem([5, 4, 3])
    est = glrnet.GLR(replications=100, generator=torch.Generator().manual_seed(0))
    grads, _ = glrnet.GLR(replications=100, generator=torch.Generator().manual_seed(0)).estimate(model, x, y)
    stats = est.backward(model, x, y)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    est.generator.manual_seed(0)
    est.backward(model, x, y)  # adds, as autograd does
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, 2 * g)
    assert stats.loss.dim() == 0 and stats.loss > 0
    for opt_cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop):
        before = [p.detach().clone() for p in model.parameters()]
        opt = opt_cls(model.parameters(), lr=0.01)
        opt.zero_grad()
        est.backward(model, x, y)
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
