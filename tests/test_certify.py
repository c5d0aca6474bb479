"""Certified radii: the Monte Carlo bounds cover the true probabilities at their stated level, the
radius follows the formula, and no certified image is broken by an attack inside its radius."""

import math

import pytest
import torch
from scipy import stats

import glrnet
from glrnet.certify import (certified_accuracy, certify, clopper_pearson_lower, first_layer_norm,
                            project_spectral_norm_)


def test_clopper_pearson_lower_bound_covers_at_its_level():
    """2000 binomial experiments with p = 0.8, n = 200: the bound exceeds p in at most α of them
    (up to the binomial spread of the count, at family level 10⁻⁴)."""
    gen = torch.Generator().manual_seed(0)
    p, n, alpha, trials = 0.8, 200, 0.05, 2000
    k = torch.binomial(torch.full((trials,), float(n)), torch.full((trials,), p), generator=gen)
    misses = int((clopper_pearson_lower(k, n, alpha) > p).sum())
    assert misses <= stats.binom.ppf(1 - 1e-4, trials, alpha), misses
    assert misses > 0 or alpha * trials < 5   # the test can see a miss: the bound is not trivially low


def two_class_layer(seed=0, n=64):
    """One noisy linear layer as the whole network: the vote is argmax(u + r), so
    P[vote = 0] = Φ((u₀ − u₁) / (σ√2)) exactly."""
    torch.manual_seed(seed)
    layer = glrnet.NoisyLinear(3, 2, noise=torch.distributions.Normal(0.0, 1.0))
    x = torch.rand(n, 3)
    u = layer.affine(x).detach().double()
    p0 = torch.distributions.Normal(0.0, 1.0).cdf((u[:, 0] - u[:, 1]) / math.sqrt(2))
    return layer, x, p0


def test_certify_bounds_cover_known_probabilities_and_the_radius_is_the_formula():
    layer, x, p0 = two_class_layer()
    cert = certify(layer, x, n0=50, n=500, alpha=0.01, generator=torch.Generator().manual_seed(1))
    top = torch.where(p0 >= 0.5, 0, 1)
    p_top = torch.where(top == 0, p0, 1 - p0)
    decided = cert.prediction >= 0
    assert decided.sum() > 10
    # every bound that certifies lies below the true probability (α = 0.01 per image; 64 images)
    covered = (cert.p_lower[decided] <= p_top[decided] + 1e-12)
    assert covered.double().mean() >= 1 - stats.binom.ppf(1 - 1e-4, int(decided.sum()), 0.01) / int(decided.sum())
    assert torch.equal(cert.prediction[decided], top[decided])
    norm = torch.linalg.matrix_norm(layer.weight.double(), 2).item()
    expected = 1.0 / norm * torch.distributions.Normal(0.0, 1.0).icdf(cert.p_lower[decided])
    torch.testing.assert_close(cert.radius[decided], expected)
    assert cert.first_layer_norm == pytest.approx(norm)


def test_conv_first_layer_norm_is_the_operator_norm():
    conv = glrnet.NoisyConv2d(1, 2, 3, padding=1)
    norm = first_layer_norm(conv, (1, 5, 5))
    x = torch.randn(2000, 1, 5, 5)
    ratio = (conv.affine(x) - conv.bias[:, None, None]).detach().flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert ratio.max() <= norm * (1 + 1e-5) and ratio.max() > 0.5 * norm   # a bound, and not a loose one
    project_spectral_norm_(conv, 0.5 * norm, (1, 5, 5))
    assert first_layer_norm(conv, (1, 5, 5)) == pytest.approx(0.5 * norm)


def test_certify_refuses_what_the_theorem_does_not_cover():
    net = glrnet.NoisySequential(torch.nn.AvgPool2d(2), torch.nn.Flatten(), glrnet.NoisyLinear(16, 3),
                                 input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="must see the input itself"):
        certify(net, torch.rand(2, 1, 8, 8), n0=5, n=10)
    lap = glrnet.NoisyMLP([4, 3], noise=torch.distributions.Laplace(0.0, 1.0))
    with pytest.raises(ValueError, match="must be Gaussian"):
        certify(lap, torch.rand(2, 4), n0=5, n=10)


@pytest.mark.slow
@pytest.mark.parametrize("predictor", ["vote", "lap"])
def test_no_certified_digit_is_broken_inside_its_radius(predictor):
    """Soundness on digits: a GLR network trained with a bounded first layer; every certified
    image is attacked by L2 PGD with EOT at 0.9 × its radius; the smoothed prediction, estimated
    with 4000 noisy passes, never changes."""
    torch.manual_seed(0)
    data = glrnet.load_dataset("digits", val_fraction=0.0)
    model = glrnet.NoisyMLP([64, 20, 10], activation="sigmoid", noise=torch.distributions.Normal(0.0, 0.5))
    est, opt = glrnet.GLR(replications=100), torch.optim.Adam(model.parameters(), lr=0.05)
    for epoch in range(3):
        for i in range(0, len(data.x_train), 32):
            opt.zero_grad()
            est.backward(model, data.x_train[i:i + 32], data.y_train[i:i + 32])
            opt.step()
            project_spectral_norm_(model[0], 2.0)
    x, y = data.x_test[:60], data.y_test[:60]
    cert = certify(model, x, n0=100, n=2000, alpha=0.001, predictor=predictor,
                   generator=torch.Generator().manual_seed(3))
    ok = (cert.prediction == y) & (cert.radius > 0)
    assert ok.sum() >= 10, certified_accuracy(cert, y, [0.0])
    from glrnet.robustness.attacks import pgd_l2
    from glrnet.robustness.oracles import LAPClassifier
    clf = LAPClassifier(model, samples=32, generator=torch.Generator().manual_seed(4))
    idx = ok.nonzero().squeeze(1)
    x_adv = pgd_l2(clf, x[idx], y[idx], (0.9 * cert.radius[idx]).float(), steps=20)
    assert ((x_adv - x[idx]).norm(dim=1) <= 0.9 * cert.radius[idx].float() + 1e-5).all()
    from glrnet.certify import _sample
    after = _sample(model, x_adv, 4000, predictor, torch.Generator().manual_seed(5), 1000).argmax(1)
    assert torch.equal(after, y[idx])
    # the attack is not toothless: at 3× the radius some images do change
    far = pgd_l2(clf, x[idx], y[idx], (3 * cert.radius[idx]).float().clamp_min(0.5), steps=20)
    assert (glrnet.predict(model, far, "lap", 500) != y[idx]).any()


def test_certify_command_and_bounded_training(tmp_path, capsys):
    from glrnet.certify import first_layer_norm
    from glrnet.checkpoint import load_model
    from glrnet.cli import main
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--replications", "20", "--subset", "200", "--noise-std", "0.5",
                 "--max-first-norm", "3", "--quiet", "--out", str(run)]) == 0
    model, _ = load_model(run / "model.safetensors")
    assert first_layer_norm(model[0], (64,)) <= 3 * (1 + 1e-5)
    assert main(["certify", "--run", str(run), "--images", "20", "--n0", "20", "--samples", "200",
                 "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "| certified accuracy |" in text and (tmp_path / "c" / "certified_accuracy.png").exists()
    assert (tmp_path / "c" / "README.md").exists()
    rc = main(["certify", "--run", str(run), "--radii", "a,b", "--out", str(tmp_path / "d")])
    assert rc == 2 and "--radii takes comma-separated numbers" in capsys.readouterr().err


def known_network(classes=10):
    """A network whose smoothed class probabilities are known exactly: two threshold units with noise
    N(0, 1) on u = (0.6, 0), so P[h = 1] = (Φ(0.6), ½), then a noise-free linear layer; each of the four
    states h has its own logits, so the vote's and LAP's true probabilities are finite sums."""
    import itertools
    torch.manual_seed(0)
    first = glrnet.NoisyLinear(1, 2, activation="threshold", noise=torch.distributions.Normal(0.0, 1.0))
    out = torch.nn.Linear(2, classes)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.6], [0.0]]))
        first.bias.zero_()
        out.weight.copy_(torch.randn(classes, 2))
        out.weight[0] = torch.tensor([5.0, 1.0])
        out.bias.copy_(torch.randn(classes))
    on = torch.distributions.Normal(0.0, 1.0).cdf(first.affine(torch.ones(1, 1)).detach().double()[0])
    lap, vote = torch.zeros(classes, dtype=torch.float64), torch.zeros(classes, dtype=torch.float64)
    for h in itertools.product([0.0, 1.0], repeat=2):
        prob = math.prod(float(on[j]) if h[j] else 1 - float(on[j]) for j in range(2))
        logits = out(torch.tensor(h)).detach().double()
        lap += prob * torch.softmax(logits, 0)
        vote[logits.argmax()] += prob
    return glrnet.NoisySequential(first, out, input_shape=(1,)), {"lap": lap, "vote": vote}


@pytest.mark.parametrize("predictor", ["vote", "lap"])
def test_certificates_are_wrong_at_most_at_their_stated_level(predictor):
    """4000 independent certificates of one input whose true probabilities are known (α = 0.2, n = 30):
    a certificate is wrong if its class is not the true top class, its p̲_A exceeds the truth, or its
    p̄_B is below the true runner-up. The wrong ones are at most α + 3 binomial standard errors."""
    net, truth = known_network()
    p = truth[predictor]
    trials, alpha = 4000, 0.2
    cert = certify(net, torch.ones(trials, 1), n0=10, n=30, alpha=alpha, predictor=predictor,
                   generator=torch.Generator().manual_seed(1))
    decided = cert.prediction >= 0
    a = cert.prediction.clamp_min(0)
    runner_up = torch.stack([torch.cat([p[:c], p[c + 1:]]).max() for c in a.tolist()])
    wrong = decided & ((cert.prediction != p.argmax()) | (cert.p_lower > p[a] + 1e-12)
                      | (cert.p_upper_other < runner_up - 1e-12))
    assert decided.double().mean() > 0.5                     # the test sees certificates, not abstentions
    rate = wrong.double().mean().item()
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), rate
    if predictor == "vote":
        assert wrong.any()                                  # the count can see a wrong certificate


def test_lap_bounds_split_alpha_over_the_classes():
    """p̲_A at α/2 (Hoeffding), each of the C − 1 others at α/(2(C − 1)), and p̄_B never above 1 − p̲_A."""
    from glrnet.certify import lap_bounds
    mean = torch.tensor([[0.70, 0.20, 0.05, 0.05], [0.80, 0.195, 0.005, 0.0]], dtype=torch.float64)
    n, alpha, top = 200, 0.05, torch.tensor([0, 0])
    lower, upper = lap_bounds(mean, top, n, alpha)
    t_a, t_b = math.sqrt(math.log(2 / alpha) / (2 * n)), math.sqrt(math.log(2 * 3 / alpha) / (2 * n))
    torch.testing.assert_close(lower, mean[:, 0] - t_a)
    torch.testing.assert_close(upper, torch.minimum(mean[:, 1] + t_b, 1 - lower))
    assert upper[0] == pytest.approx(0.20 + t_b) and upper[1] == pytest.approx(1 - lower[1])


def test_certify_refuses_weight_noise_on_the_first_layer():
    from glrnet.certify import noise_site
    net = glrnet.NoisyMLP([4, 5, 3], noise=torch.distributions.Normal(0.0, 1.0))
    assert noise_site(net[0]) == "activity"
    for site in ("weight", "flipout", "channel"):
        net[0].site = site
        with pytest.raises(ValueError, match=f"carries its noise on its weights \\(site '{site}'\\)"):
            certify(net, torch.rand(2, 4), n0=5, n=10)
