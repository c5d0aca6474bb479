"""Building blocks: noise scores and samplers, activations, model, OT / LAP, bad input."""

import math

import pytest
import torch
from scipy import stats
from torch.distributions import Cauchy, Exponential, Laplace, Normal, Uniform

import glrnet
from glrnet.nn.activations import ACTIVATIONS, get_activation
from glrnet.nn.noise import kinds, make_noise, sample_, score, score_autograd


@pytest.mark.parametrize("kind", kinds())
def test_closed_form_score_equals_autograd_of_log_prob(float64, kind):
    dist = make_noise(kind, 2.0)
    r = torch.linspace(-7, 7, 1001)
    r = r[r.abs() > 1e-9]  # Laplace's score is undefined at 0
    torch.testing.assert_close(score(dist, r), score_autograd(dist, r))


@pytest.mark.parametrize("dist", [make_noise("gaussian", 2), make_noise("laplace", 2),
                                  make_noise("logistic", 2), Cauchy(0.0, 1.0)], ids=str)
def test_in_place_sampler_has_the_distribution(float64, dist):
    """Kolmogorov-Smirnov against the distribution's own CDF (p > 1e-4), right std for the families."""
    x = sample_(dist, torch.empty(20000), torch.Generator().manual_seed(0))
    p = stats.kstest(x.numpy(), lambda v: dist.cdf(torch.as_tensor(v)).numpy()).pvalue
    assert p > 1e-4, p
    if not isinstance(dist, Cauchy):
        assert abs(x.std().item() - 2.0) < 5 * 2.0 / math.sqrt(2 * 20000) * 2


def test_make_noise_std_is_the_standard_deviation():
    for kind in kinds():
        assert make_noise(kind, 3.0).stddev.item() == pytest.approx(3.0)


@pytest.mark.parametrize("bad,match", [
    (Normal(1.0, 2.0), "zero-centred"),
    (Laplace(-0.5, 1.0), "zero-centred"),
    (Uniform(-1.0, 1.0), "differentiable density"),
    (Exponential(1.0), "differentiable density"),
    (Normal(torch.zeros(3), 1.0), "scalar"),
])
def test_bad_noise_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        glrnet.NoisyMLP([4, 3, 2], noise=bad)


def test_activations_are_finite_at_their_singular_points():
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 2.0])
    for name, f in ACTIVATIONS.items():
        assert torch.isfinite(f(x)).all(), name
    assert get_activation("threshold")(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 0, 1]
    v = torch.randn(6, 5, dtype=torch.float64, requires_grad=True).t()          # non-contiguous, in a graph
    h = get_activation("threshold")(v)
    assert h.dtype == torch.float64 and torch.equal(h, (v > 0).double()) and not h.requires_grad
    assert get_activation("arctan_inv")(torch.tensor(0.0)).item() == pytest.approx(math.pi / 2)
    assert get_activation("sigmoid:4")(torch.tensor(0.5)).item() == pytest.approx(1 / (1 + math.exp(-2)))
    x = torch.tensor([0.5, -2.0])
    torch.testing.assert_close(get_activation("log_abs_minus_x")(x), torch.log(x.abs()) - x)


def test_model_parameters_are_its_linear_layers():
    model = glrnet.NoisyMLP([196, 20, 10])
    params = list(model.parameters())
    assert [tuple(p.shape) for p in params] == [(20, 196), (20,), (10, 20), (10,)]
    assert all(isinstance(l, torch.nn.Linear) for l in model.layers)
    assert isinstance(model.noise, Normal) and model.noise.stddev.item() == 2.0


def test_ot_is_the_noise_free_forward():
    model = glrnet.NoisyMLP([6, 5, 4, 3], activation="threshold", output_activation="sigmoid")
    x = torch.rand(9, 6)
    h = x
    for t, layer in enumerate(model.layers):
        v = h @ layer.weight.T + layer.bias
        h = (v > 0).float() if t < 2 else torch.sigmoid(v)
    torch.testing.assert_close(model(x), h)
    assert torch.equal(glrnet.predict(model, x, mode="ot"), h.argmax(1))
    torch.testing.assert_close(glrnet.predict_proba(model, x, mode="ot"), torch.softmax(h, 1))


def test_lap_converges_as_replications_grow(float64):
    """|p_K − p_ref| within 5 SE of the Monte Carlo error for each K; the error shrinks with K."""
    torch.manual_seed(1)
    model = glrnet.NoisyMLP([8, 6, 4], activation="threshold")
    x = torch.rand(5, 8)
    gen = torch.Generator().manual_seed(0)
    ref = glrnet.predict_proba(model, x, "lap", replications=400_000, generator=gen)
    # per-replication spread of the softmax, for the standard errors
    out = torch.softmax(model(x, noise=glrnet.nn.sample_noise(model, 20000, 5, generator=gen)), -1)
    sd = out.std(0)
    errors = []
    for k in (10, 100, 1000, 10000):
        p = glrnet.predict_proba(model, x, "lap", replications=k, generator=gen, memory_budget_mb=0.05)
        se = sd * math.sqrt(1 / k + 1 / 400_000)
        assert ((p - ref).abs() < 5 * se).all(), k
        errors.append((p - ref).abs().max().item())
    assert errors[-1] < errors[0] / 10, errors
    torch.testing.assert_close(ref.sum(1), torch.ones(5))


def test_lap_antithetic_and_memory_budget():
    model = glrnet.NoisyMLP([8, 6, 4])
    x = torch.rand(50, 8)
    a = glrnet.predict_proba(model, x, "lap", 1000, generator=torch.Generator().manual_seed(0), antithetic=True,
                             memory_budget_mb=0.01)
    b = glrnet.predict_proba(model, x, "lap", 1000, generator=torch.Generator().manual_seed(0), antithetic=True)
    assert a.shape == (50, 4)
    torch.testing.assert_close(a.sum(1), torch.ones(50))
    assert (a - b).abs().max() < 0.1


@pytest.fixture
def setup():
    model = glrnet.NoisyMLP([6, 5, 3])
    return model, torch.rand(4, 6), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("change,match", [
    (lambda x, y: (torch.rand(4, 7), y), r"shape \(batch, 6\)"),
    (lambda x, y: (x[0], y), r"shape \(batch, 6\)"),
    (lambda x, y: (x.index_fill(0, torch.tensor([2]), float("nan")), y), "NaN or inf"),
    (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("inf")), y), "NaN or inf"),
    (lambda x, y: (x, torch.tensor([0, 1, 3, 1])), r"labels must lie in \[0, 2\]"),
    (lambda x, y: (x, torch.tensor([0, -1, 1, 1])), r"labels must lie"),
    (lambda x, y: (x, y[:3]), "labels must have shape"),
    (lambda x, y: (x, y.float()), "integer class indices"),
])
def test_bad_batches_rejected(setup, change, match):
    model, x, y = setup
    x, y = change(x, y)
    for producer in (glrnet.GLR(replications=10), glrnet.Backprop()):
        with pytest.raises(ValueError, match=match):
            producer.backward(model, x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(replications=1, baseline=True), "baseline needs ≥ 2 groups"),
    (dict(replications=2, baseline=True, sampler="antithetic"), "≥ 2 groups"),
    (dict(replications=5, sampler="antithetic"), "not a multiple"),
    (dict(replications=0), "positive integer"),
    (dict(loss="hinge"), "unknown loss 'hinge'; valid: cross_entropy, zero_one"),
    (dict(memory_budget_mb=0), "memory_budget_mb"),
])
def test_bad_estimator_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        glrnet.GLR(**kwargs)


def test_bad_model_options_rejected():
    with pytest.raises(ValueError, match="unknown activation 'tanhh'; valid: sigmoid, threshold"):
        glrnet.NoisyMLP([4, 3], activation="tanhh")
    with pytest.raises(ValueError, match="unknown activation"):
        glrnet.NoisyMLP([4, 3], output_activation="nope")
    with pytest.raises(ValueError, match="sizes"):
        glrnet.NoisyMLP([4])
    with pytest.raises(ValueError, match="differentiable loss"):
        glrnet.Backprop(loss="zero_one")
    with pytest.raises(ValueError, match="unknown prediction mode"):
        glrnet.predict_proba(glrnet.NoisyMLP([4, 3]), torch.rand(2, 4), mode="avg")


def test_nan_loss_raises_and_leaves_parameters_and_grads_untouched(setup):
    model, x, y = setup
    calls = {"n": 0}

    def flaky_loss(out, target):  # fine at first, NaN in some later replications
        calls["n"] += 1
        loss = glrnet.cross_entropy(out, target)
        return torch.where(out[:, 0] > 3.0, torch.full_like(loss, float("nan")), loss)

    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    est = glrnet.GLR(loss=flaky_loss, replications=2000, memory_budget_mb=0.01)
    with pytest.raises(glrnet.NonFiniteLossError, match="non-finite values.*untouched"):
        est.backward(model, x, y)
    assert calls["n"] > 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.full_like(p, 0.5))


def test_custom_activation_and_loss_callables():
    model = glrnet.NoisyMLP([6, 5, 3], activation=torch.tanh)
    hinge = lambda out, y: torch.relu(1 - out.gather(1, y[:, None]) + out).sum(1)  # noqa: E731
    stats = glrnet.GLR(loss=hinge, replications=50).backward(model, torch.rand(4, 6), torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(stats.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
