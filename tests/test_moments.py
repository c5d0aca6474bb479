"""The deterministic attack surrogates (glrnet.robustness.moments) against Monte Carlo over the network's own noise."""

import pytest
import torch
from torch import nn
from torch.distributions import Normal

import glrnet
from glrnet import NoisyConv2d, NoisyLinear, NoisySequential
from glrnet.robustness.attacks import attack_plan
from glrnet.nn import MaxPool2d
from glrnet.robustness.moments import deterministic_surrogates, mean_field_forward, moment_forward
from glrnet.robustness import AttackSettings, LAPClassifier
from stats import assert_means_equal

K = 20_000   # noisy passes per Monte Carlo check


def _noisy_outputs(model: NoisySequential, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(K, B·units) outputs of K noisy passes."""
    r = glrnet.nn.sample_noise(model, K, len(x), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, noise=r).reshape(K, -1)


def _assert_exact_moments(model: NoisySequential, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Monte Carlo checks of moment propagation's output mean and variance (the variance as the mean of
    (out − mean)², its exact mean); returns the variances."""
    with torch.no_grad():
        m, v = moment_forward(model, x)
    out = _noisy_outputs(model, x, seed=seed)
    assert_means_equal(out, m.reshape(-1))
    assert_means_equal((out - m.reshape(-1)) ** 2, v.reshape(-1))
    return v


@pytest.mark.parametrize("layer", [
    lambda: NoisyConv2d(2, 3, 3, activation="threshold", noise=Normal(0.0, 0.7)),
    lambda: NoisyConv2d(2, 3, 3, activation="threshold", noise=Normal(0.0, 0.3), site="weight"),
    lambda: NoisyLinear(18, 5, activation="sigmoid", noise=Normal(0.0, 1.5)),
    lambda: NoisyLinear(18, 5, activation="threshold", noise=Normal(0.0, 0.4), site="channel"),
], ids=["conv-activity-threshold", "conv-weight-threshold", "linear-activity-sigmoid", "linear-channel-threshold"])
def test_the_mean_field_of_one_layer_is_its_expected_output(layer):
    """One noisy layer on a fixed input: E[φ(z + r)] exactly (the closed form, or 64-node Gauss–Hermite)."""
    torch.manual_seed(0)
    layer = layer()
    model = NoisySequential(layer, input_shape=(2, 3, 3) if isinstance(layer, NoisyConv2d) else (18,))
    x = torch.rand(4, *model.input_shape)
    with torch.no_grad():
        exact = mean_field_forward(model, x).reshape(-1)
    assert_means_equal(_noisy_outputs(model, x), exact)
    assert not torch.equal(exact, model(x).reshape(-1))   # the noise does matter here: not the noise-free net


def test_moment_propagation_gives_the_exact_mean_and_variance_of_a_threshold_cnn_with_unit_noise():
    """Activity noise on a convolution of threshold units, max-pooling, a noisy linear read-out: the pooled
    units are independent Bernoulli variables and the read-out is linear, so the logits' mean and variance
    are exact, not approximations; Monte Carlo checks both (the variance as the mean of (out − mean)²)."""
    torch.manual_seed(1)
    model = NoisySequential(NoisyConv2d(1, 2, 3, activation="threshold", noise=Normal(0.0, 1.0)), MaxPool2d(2),
                            nn.Flatten(), NoisyLinear(8, 3, noise=Normal(0.0, 0.5)), input_shape=(1, 6, 6))
    v = _assert_exact_moments(model, torch.rand(3, 1, 6, 6), seed=1)
    assert (v > 0.25).all()   # more than the read-out's own noise: the convolution's noise reaches the logits


def test_the_deterministic_surrogates_join_the_plan_last_and_only_where_they_apply():
    st = AttackSettings()
    thr = glrnet.NoisyMLP([16, 8, 4], activation="threshold")
    assert deterministic_surrogates(thr) == ["mean", "moments"]
    assert attack_plan(thr, True, st)[-4:] == ["apgd-ce[mean]", "apgd-dlr[mean]", "apgd-ce[moments]", "apgd-dlr[moments]"]
    # a module moment propagation has no rule for: the mean field still applies
    odd = NoisySequential(NoisyLinear(16, 8, activation="threshold"), nn.Tanh(), NoisyLinear(8, 4), input_shape=(16,))
    assert deterministic_surrogates(odd) == ["mean"]
    with pytest.raises(ValueError, match="no rule for Tanh"):
        moment_forward(odd, torch.zeros(1, 16))
    assert "apgd-ce[mean]" not in attack_plan(thr, False, st)   # a network without noise keeps its plan


@pytest.mark.parametrize("surrogate", ["mean", "moments"])
def test_a_deterministic_surrogate_classifier_needs_no_eot(surrogate):
    """Two calls give the same logits and the same input gradient (nothing random), and the gradient is
    not zero on a threshold network (whose exact gradient is zero almost everywhere)."""
    torch.manual_seed(2)
    thr = glrnet.NoisyMLP([16, 8, 4], activation="threshold")
    clf = LAPClassifier(thr, 8, surrogate, generator=torch.Generator().manual_seed(0))
    x = torch.rand(5, 16, requires_grad=True)
    g1, = torch.autograd.grad(clf(x).sum(), x)
    g2, = torch.autograd.grad(clf(x).sum(), x)
    assert torch.equal(g1, g2) and g1.abs().sum() > 0


def test_average_pooling_propagates_exact_moments_and_is_not_taken_for_binary_units():
    """Average pooling is linear (exact moments), and its output is not binary: a max-pool after it is refused
    instead of being given the Bernoulli rule."""
    torch.manual_seed(3)
    model = NoisySequential(NoisyConv2d(1, 2, 3, activation="threshold", noise=Normal(0.0, 1.0)), nn.AvgPool2d(2),
                            nn.Flatten(), NoisyLinear(8, 3, noise=Normal(0.0, 0.5)), input_shape=(1, 6, 6))
    x = torch.rand(3, 1, 6, 6)
    _assert_exact_moments(model, x, seed=3)
    pooled_twice = NoisySequential(NoisyConv2d(1, 2, 3, activation="threshold"), nn.AvgPool2d(2), MaxPool2d(2),
                                   nn.Flatten(), NoisyLinear(2, 3), input_shape=(1, 6, 6))
    with pytest.raises(ValueError, match="needs binary"):
        moment_forward(pooled_twice, x)


def test_gauss_hermite_expectation_is_exact_where_the_answer_is_known():
    """E[r²] = σ² and E[r⁴] = 3σ⁴ (polynomials of degree < 128: exact), E[cos r] = exp(−σ²/2), with σ a
    number or a tensor of per-unit standard deviations."""
    from glrnet.robustness.surrogates import gauss_expectation
    like = torch.zeros(3, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(gauss_expectation(lambda r: r**2, sigma, like), sigma**2)
    torch.testing.assert_close(gauss_expectation(lambda r: r**4, sigma, like), 3 * sigma**4)
    torch.testing.assert_close(gauss_expectation(torch.cos, sigma, like), torch.exp(-sigma**2 / 2))
    torch.testing.assert_close(gauss_expectation(lambda r: (r - 0.5) ** 2 + like, 2.0, like),
                               torch.full((3,), 4.25, dtype=torch.float64))
