"""GLR beyond the MLP: noisy convolutional networks (NoisySequential) are estimated exactly right."""

import math

import pytest
import torch

import glrnet
from stats import assert_means_equal, flat_grads, means_equal
from test_estimator import fd_and_glr_columns, glr_samples, pathwise_samples


def tiny_cnn(activation="sigmoid", seed=0, batch=3, scale=1.0):
    """2 noisy convolutions (one strided, one padded), pooling, flatten, a noisy linear output."""
    torch.manual_seed(seed)
    net = glrnet.NoisySequential(
        glrnet.NoisyConv2d(1, 2, 3, activation=activation), torch.nn.MaxPool2d(2),
        glrnet.NoisyConv2d(2, 2, 2, stride=1, padding=1, activation=activation), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), glrnet.NoisyLinear(2 * 2 * 2, 3), noise=torch.distributions.Normal(0.0, 2.0),
        input_shape=(1, 8, 8))
    x = torch.rand(batch, 1, 8, 8)
    y = torch.randint(0, 3, (batch,))
    if scale != 1.0:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(scale)
    return net, x, y


def test_issue_api_example_runs():
    net = glrnet.NoisySequential(
        glrnet.NoisyConv2d(1, 6, 5, activation="threshold"), torch.nn.MaxPool2d(2),
        glrnet.NoisyConv2d(6, 16, 5, activation="threshold"), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        glrnet.NoisyLinear(256, 10), noise=torch.distributions.Normal(0.0, 2.0), input_shape=(1, 28, 28))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    stats = glrnet.GLR(loss="zero_one", replications=100, baseline=True).backward(net, x, y)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    assert 0 <= stats.loss <= 1
    pred = glrnet.predict(net, x, mode="lap", replications=1000)
    assert pred.shape == (4,) and torch.equal(glrnet.predict(net, x.reshape(4, -1)), glrnet.predict(net, x))
    assert isinstance(net.layers[0], torch.nn.Conv2d) and isinstance(net.layers[-1], torch.nn.Linear)
    assert net.widths == [6 * 24 * 24, 16 * 8 * 8, 10]


@pytest.fixture(scope="module")
def cnn_reference():
    """A sigmoid CNN and pathwise gradients of its expected loss, shared by the tests below (float32:
    what they compare is unbiasedness, not float64 arithmetic). Per replication the pathwise gradient
    varies far less than GLR (a few thousandths in total), so a quarter of GLR's replications adds
    little to the standard error of the difference."""
    net, x, y = tiny_cnn(seed=1)
    return net, x, y, pathwise_samples(net, x, y, n=200, replications=500)


@pytest.mark.slow
@pytest.mark.xdist_group("cnn_reference")
def test_glr_equals_pathwise_for_a_sigmoid_cnn_every_parameter(cnn_reference):
    net, x, y, path = cnn_reference
    glr = glr_samples(net, x, y, n=200, replications=2000)
    print(assert_means_equal(glr, path))
    ok, report = means_equal(0.85 * glr, path)
    print("0.85 × GLR:", report)
    assert not ok  # the test has power


@pytest.mark.xdist_group("cnn_reference")
@pytest.mark.parametrize("variant", [dict(baseline=True), dict(baseline=False, sampler="antithetic"),
                                     dict(baseline=True, sampler="antithetic")], ids=["baseline", "antithetic", "both"])
def test_variance_reduced_cnn_estimators_are_unbiased(cnn_reference, variant):
    net, x, y, path = cnn_reference
    print(assert_means_equal(glr_samples(net, x, y, n=150, replications=1000, **variant), path))


@pytest.mark.slow
def test_glr_equals_finite_differences_for_a_threshold_cnn_with_zero_one_loss():
    """float32: the losses are 0 or 1 and the step h = 0.05, so float64 adds nothing to the comparison."""
    net, x, y = tiny_cnn("threshold", seed=3, scale=3.0)
    n, k = 100, 2000
    glr = glr_samples(net, x, y, n=n, replications=k, loss="zero_one", baseline=True)
    sel, fd = fd_and_glr_columns(net, x, y, "zero_one", glr, n, k)   # first and last entry of every parameter
    print(assert_means_equal(sel, fd))
    z = (sel.mean(0).abs() / (sel.std(0) / math.sqrt(n))).max()
    print(f"largest |z| of the GLR column means: {z:.1f}")
    assert z > 5  # not trivially zero


@pytest.mark.parametrize("variant", [dict(baseline=False), dict(baseline=True), dict(baseline=True, sampler="antithetic")],
                         ids=["plain", "baseline", "both"])
def test_cnn_chunking_does_not_change_the_estimate(variant):
    net, x, y = tiny_cnn(seed=2)
    a = glrnet.GLR(replications=64, memory_budget_mb=1e-3, prefetch=False,
                   generator=torch.Generator().manual_seed(0), **variant).estimate(net, x, y)
    b = glrnet.GLR(replications=64, memory_budget_mb=512, prefetch=False,
                   generator=torch.Generator().manual_seed(0), **variant).estimate(net, x, y)
    assert a[1].chunks > 1 and b[1].chunks == 1
    torch.testing.assert_close(flat_grads(a[0]), flat_grads(b[0]), rtol=1e-4, atol=1e-6)


def test_parameter_outside_a_noisy_layer_is_refused_by_name():
    net = glrnet.NoisySequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), glrnet.NoisyLinear(2 * 6 * 6, 3),
                                 input_shape=(1, 8, 8))
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"'0.weight'.*not in a noisy layer"):
        glrnet.GLR(replications=4).backward(net, x, y)
    for p in net.layers[0].parameters():
        p.requires_grad_(False)
    glrnet.GLR(replications=4).backward(net, x, y)  # frozen: fine
    with pytest.raises(ValueError, match="at least one noisy layer"):
        glrnet.NoisySequential(torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"inputs must have shape \(batch, 1, 8, 8\)"):
        glrnet.predict(net, torch.rand(2, 1, 9, 9))


def test_cnn_save_load_round_trip_and_lap(tmp_path):
    from glrnet.checkpoint import load_model, save_model
    net, x, _ = tiny_cnn("threshold")
    save_model(tmp_path / "m.safetensors", net, {"config": {}})
    back, _ = load_model(tmp_path / "m.safetensors")
    assert isinstance(back, glrnet.NoisySequential) and back.activations() == net.activations()
    noise = glrnet.nn.sample_noise(net, 5, len(x), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(x, noise=noise), net(x, noise=noise))
    p1 = glrnet.predict_proba(net, x, "lap", 64, generator=torch.Generator().manual_seed(1))
    p2 = glrnet.predict_proba(back, x, "lap", 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p1, p2)


def test_cnn_through_the_cli_train_resume_evaluate_and_a_spec(tmp_path, capsys):
    """--arch builds a noisy CNN; checkpoints resume exactly; evaluate and a spec file use it too."""
    import json

    from glrnet.cli import main
    from glrnet.experiments import load_spec
    from safetensors.torch import load_file
    from test_data import make_idx_folder
    data = make_idx_folder(tmp_path / "idx", n_train=120, n_test=40, size=12)
    base = ["train", "--dataset", "mnist", "--data-dir", str(data), "--arch", "conv:3:3,maxpool:2,conv:4:3:1:1",
            "--hidden", "none", "--activation", "threshold", "--loss", "zero_one", "--replications", "16",
            "--baseline", "--quiet", "--lap-replications", "8", "--batch-size", "20"]
    assert main([*base, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["evaluate", "--run", str(tmp_path / "a"), "--lap-replications", "8", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy_lap"] is not None
    assert main(["train", "--arch", "conv:3", "--out", str(tmp_path / "c"), "--epochs", "1"]) == 2
    assert "cannot read 'conv:3'" in capsys.readouterr().err
    spec = tmp_path / "s.toml"
    spec.write_text('[[datasets]]\ndataset = "mnist"\n[[models]]\nname = "s"\nmethod = "bp"\n'
                    '[[models]]\nname = "cnn"\narch = "lenet"\nhidden = []\n[transfer]\nsources = ["s"]\n')
    loaded = load_spec(spec)
    assert loaded.config("cnn", loaded.datasets[0]).arch == "lenet"


@pytest.mark.slow
def test_likelihood_ratio_input_gradient_of_a_cnn_is_unbiased(float64):
    """GLR applied to the input through a convolution equals the pathwise input gradient in mean."""
    from glrnet.robustness import lr_input_jacobian
    net, x, _ = tiny_cnn(seed=5, batch=2)
    c = torch.randn(3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    lr = torch.stack([lr_input_jacobian(net, x, lambda out: (out @ c)[..., None], 2000, gen)[0][:, 0].reshape(-1)
                      for _ in range(60)])
    path = []
    for _ in range(60):
        xr = x.reshape(2, -1).clone().requires_grad_(True)
        out = net(xr, noise=glrnet.nn.sample_noise(net, 2000, 2, generator=gen))
        (g,) = torch.autograd.grad((out @ c).mean(0).sum(), xr)
        path.append(g.reshape(-1))
    print(assert_means_equal(lr, torch.stack(path)))


@pytest.mark.parametrize("shape,kernel,stride", [((3, 4, 8, 8), 2, None), ((3, 4, 9, 7), 2, None),
                                                 ((2, 3, 10, 10), 3, None), ((2, 3, 10, 10), (2, 3), None),
                                                 ((2, 3, 8, 8), 3, 2), ((2, 3, 8, 8), 1, None)])
def test_maxpool_is_torchs_maxpool(shape, kernel, stride):
    """glrnet's MaxPool2d (the elementwise maximum of strided views where windows do not overlap) gives
    torch's outputs, NaN included, and torch's gradients (under autograd it is torch's forward)."""
    from glrnet.nn import MaxPool2d
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")
    ours, theirs = MaxPool2d(kernel, stride), torch.nn.MaxPool2d(kernel, stride)
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True, rtol=0, atol=0)
    xg = torch.randn(*shape, requires_grad=True)
    g1, = torch.autograd.grad(ours(xg).sum(), xg)
    g2, = torch.autograd.grad(theirs(xg).sum(), xg)
    assert torch.equal(g1, g2)
