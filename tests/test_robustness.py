"""Attacks: they break an undefended network; the gradient oracles agree with analytic ones."""

import math

import pytest
import torch

import glrnet
from glrnet.attacks import fgsm, pgd
from glrnet.robustness import (AttackSettings, attack_forward, attack_model, eot_gradient, lr_input_jacobian,
                               smoothed_derivative)
from glrnet.train import TrainConfig, train
from stats import assert_means_equal


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    from glrnet.checkpoint import load_model
    from glrnet.data import load_dataset
    root = tmp_path_factory.mktemp("models")
    train(TrainConfig(method="bp", epochs=6, lr=0.02), root / "bp", quiet=True)
    train(TrainConfig(epochs=3, replications=200), root / "glr", quiet=True)
    data = load_dataset("digits")
    return (load_model(root / "bp" / "model.safetensors")[0], load_model(root / "glr" / "model.safetensors")[0],
            data.x_test[:60], data.y_test[:60])


def test_every_attack_breaks_the_bp_network_at_large_eps(digits_models):
    bp, _, x, y = digits_models
    assert (bp(x).argmax(1) == y).double().mean() > 0.85
    st = AttackSettings(steps=10, eot_samples=1, spsa_samples=32, spsa_steps=10, random_draws=4)
    res = attack_model(bp, False, x, y, 0.3, st, source=bp)
    for attack in ("transfer-fgsm", "fgsm", "pgd-eot", "spsa", "worst-case"):
        acc = res[attack]["ot"].double().mean().item()
        assert acc <= 0.1, (attack, acc)
    assert res["random"]["ot"].double().mean() > 0.3  # random corners are no attack: a control


def test_white_box_attacks_break_the_lap_predictor_at_large_eps(digits_models):
    _, glr_model, x, y = digits_models
    st = AttackSettings(steps=10, eot_samples=8, lr_samples=128, spsa_samples=16, spsa_steps=5, random_draws=2,
                        lap_replications=200)
    res = attack_model(glr_model, True, x, y, 0.3, st, attacks=["pgd-eot", "pgd-lr"])
    for attack in ("pgd-eot", "pgd-lr"):
        assert res[attack]["lap"].double().mean() <= 0.1, attack


def one_hidden_threshold(seed=0):
    torch.manual_seed(seed)
    model = glrnet.NoisyMLP([5, 4, 3], activation="threshold")
    return model, torch.rand(6, 5), torch.randn(3)


def analytic_grad(model, x, c):
    """∇ₓ E[c · output] = W₀ᵀ diag(φ(z/σ)/σ) W₁ᵀ c for E[out] = W₁ Φ(z/σ) + b₁, z = W₀x + b₀."""
    sigma = model.noise.stddev.item()
    z = model.layers[0](x)
    dens = torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (dens * (c @ model.layers[1].weight)) @ model.layers[0].weight


def test_bpda_eot_gradient_equals_the_analytic_smoothed_gradient(float64):
    """One threshold layer under N(0, σ²): E[step(z + r)] = Φ(z/σ), so the BPDA-EOT gradient is exact."""
    model, x, c = one_hidden_threshold()
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        noise = model.sample_noise(64, 6, generator=torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad((attack_forward(model, xr, noise) @ c).mean(0).sum(), xr)
    torch.testing.assert_close(g, analytic_grad(model, x, c).detach())


def test_lr_input_gradient_is_unbiased_for_the_analytic_gradient(float64):
    model, x, c = one_hidden_threshold(1)
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([lr_input_jacobian(model, x, lambda out: (out @ c)[..., None], 2000, gen)[0][:, 0]
                           .reshape(-1) for _ in range(100)])
    print(assert_means_equal(samples, analytic_grad(model, x, c).detach().reshape(-1)))


def test_gauss_hermite_smoothed_derivative_matches_closed_form(float64):
    z = torch.linspace(-5, 5, 101)
    step_like = lambda v: (v > 0).to(v.dtype)  # noqa: E731 - unnamed, so the quadrature path is used
    exact = smoothed_derivative(glrnet.get_activation("threshold"), z, 2.0)
    approx = smoothed_derivative(step_like, z, 2.0)
    # for a step integrand the quadrature is piecewise constant in z: its error is at most the
    # largest single-node term w_i √2 |t_i| / (σ √π)
    from glrnet.robustness import _GH
    bound = max(w * math.sqrt(2) * abs(t) / (2.0 * math.sqrt(math.pi)) for t, w in zip(*_GH))
    assert (approx - exact).abs().max() <= bound, bound
    # a smooth φ: quadrature equals E[φ'(z + r)] (pathwise), computed by Monte Carlo
    r = torch.randn(200000, generator=torch.Generator().manual_seed(0)) * 2.0
    sig = glrnet.get_activation("sigmoid")
    mc = torch.stack([(torch.sigmoid(zi + r) * (1 - torch.sigmoid(zi + r))).mean() for zi in z[::10]])
    torch.testing.assert_close(smoothed_derivative(sig, z[::10], 2.0), mc, atol=2e-3, rtol=0)


def test_eot_gradient_of_smooth_network_is_the_pathwise_mean(float64):
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([5, 4, 3])
    x, y = torch.rand(3, 5), torch.tensor([0, 1, 2])
    g1 = eot_gradient(model, True, 20000, torch.Generator().manual_seed(0))(x, y)
    g2 = eot_gradient(model, True, 20000, torch.Generator().manual_seed(1))(x, y)
    assert (g1 - g2).abs().max() < 0.1 * g1.abs().max()  # converged estimates of the same expectation


def test_pgd_respects_the_budget_and_the_pixel_range():
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([6, 5, 3], activation="relu")
    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    for attack in (lambda: pgd(model, x, y, 0.1, steps=5), lambda: fgsm(model, x, y, 0.1)):
        xa = attack()
        assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
