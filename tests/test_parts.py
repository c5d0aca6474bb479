"""The estimator in parts: the fast path equals the reference definition on the same noise, for
every sampler × control variate × injection, MLP / CNN / residual network, one and many chunks;
each part unbiased; QMC and antithetic noise measurably reduce variance; PyTorch conventions."""

import math

import pytest
import torch
from torch import nn

import glrnet
from glrnet.estimators.control_variates import get_control_variate
from glrnet.estimators import CONTROL_VARIATES, glr_parameters, reference_estimate
from glrnet.nn import Layout, probe
from glrnet.estimators.samplers import IID, SAMPLERS, Sampler, get_sampler
from stats import assert_means_equal, flat_grads, means_equal
from test_estimator import pathwise_samples, small_problem, total_variance


class Recording(Sampler):
    """Wraps a sampler and keeps a copy of every chunk of noise drawn with it (to replay it to the
    reference): the whole (k, B, W) buffer a ``Layout`` filled, however many calls that took (a
    weight-site layer's slice is drawn on its own, row 0 only)."""

    def __init__(self, inner):
        self.inner, self.name, self.chunks = inner, inner.name, []

    @property
    def group_size(self):
        return self.inner.group_size

    @property
    def drawn_per_group(self):
        return self.inner.drawn_per_group

    def for_replications(self, replications, min_groups=1):
        inner = self.inner.for_replications(replications, min_groups)
        if inner is self.inner:
            return self
        sized = Recording(inner)
        sized.chunks = self.chunks
        return sized

    def group_ids(self, k, device=None):
        return self.inner.group_ids(k, device)

    def fill_(self, dist, out, generator):
        return self.inner.fill_(dist, out, generator)


@pytest.fixture(autouse=True)
def record_layout_fills(monkeypatch):
    """``Layout.fill_`` with a :class:`Recording` sampler keeps a copy of the buffer it filled."""
    fill = Layout.fill_

    def recording_fill(layout, sampler, out, generator):
        res = fill(layout, sampler, out, generator)
        if isinstance(sampler, Recording):
            sampler.chunks.append(res.clone())
        return res
    monkeypatch.setattr(Layout, "fill_", recording_fill)


def residual_cnn(activation="sigmoid", seed=0, batch=3):
    """conv → a residual block of two noisy convolutions (an ordinary nn.Module) → pool → linear."""
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = glrnet.NoisyConv2d(2, 2, 3, padding=1, activation=activation)
            self.conv2 = glrnet.NoisyConv2d(2, 2, 3, padding=1, activation=activation)

        def forward(self, h):
            return h + self.conv2(self.conv1(h))

    net = nn.Sequential(glrnet.NoisyConv2d(1, 2, 3, activation=activation), Block(), nn.AvgPool2d(2),
                        nn.Flatten(), glrnet.NoisyLinear(2 * 3 * 3, 3))
    return net, torch.rand(batch, 1, 8, 8), torch.randint(0, 3, (batch,))


def mlp():
    return small_problem([5, 4, 4, 3], batch=4)


def cnn():
    from test_cnn import tiny_cnn
    return tiny_cnn()


def weight_site(build, which=(nn.Conv2d, nn.Linear), first_only=False, site="weight"):
    """The same problem with the noise of some layers on their parameters (``site = "weight"`` or "flipout")."""
    def make():
        model, x, y = build()
        layers = [m for m in glrnet.nn.noisy_layers(model) if isinstance(m, which)]
        for m in layers[:1] if first_only else layers:
            m.site = site
        return model, x, y
    return make


MODELS = {"mlp": mlp, "cnn": cnn, "residual": residual_cnn, "mlp-weight": weight_site(mlp, first_only=True),
          "cnn-weight": weight_site(cnn, which=nn.Conv2d), "mlp-flipout": weight_site(mlp, site="flipout"),
          "cnn-flipout": weight_site(cnn, which=nn.Conv2d, site="flipout"),
          "mlp-channel": weight_site(mlp, site="channel"), "cnn-channel": weight_site(cnn, which=nn.Conv2d, site="channel")}


def replay_reference(model, x, y, est, rec):
    """The reference estimate on exactly the noise the fast path drew (chunks replayed in order)."""
    pr = probe(model, x)
    sets = [pr.order] if est.injection == "all" else [[i] for i in pr.order]
    chunks, out = list(rec.chunks), {}
    for active, per_set in zip(sets, est._per_set(len(sets))):
        layout, taken, parts, groups, offset = Layout(pr, active), 0, [], [], 0
        sampler = est.sampler.for_replications(per_set, est.control_variate.min_groups)
        while taken < per_set:
            c = chunks.pop(0)
            parts.append(c)
            groups.append(sampler.group_ids(c.shape[0]) + offset)
            offset += c.shape[0] // sampler.group_size
            taken += c.shape[0]
        noise = {i: v.reshape(per_set, x.shape[0], *(pr.shapes[i] if isinstance(pr.perturbations[i], glrnet.Activity) else (-1,)))
                 for i, v in layout.views(torch.cat(parts)).items()}
        out.update(reference_estimate(model, x, y, est.loss, noise, torch.cat(groups), sampler.group_size,
                                      est.control_variate))
    assert not chunks
    return [g for i in range(len(pr.layers)) for g in out[i]]


@pytest.mark.parametrize("injection", ["all", "layerwise"])
@pytest.mark.parametrize("baseline", list(CONTROL_VARIATES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fast_path_equals_reference_on_the_same_noise(float64, model_name, sampler, baseline, injection):
    model, x, y = MODELS[model_name]()
    for budget, prefetch in ((1000.0, False), (0.002, False), (0.002, True)):
        rec = Recording(get_sampler(sampler))
        est = glrnet.GLR(replications=96, baseline=baseline, sampler=rec, injection=injection,
                         memory_budget_mb=budget, prefetch=prefetch, generator=torch.Generator().manual_seed(3))
        fast, stats = est.estimate(model, x, y)
        if budget < 1:
            assert stats.chunks > (1 if injection == "all" else 3)
        ref = replay_reference(model, x, y, est, rec)
        assert len(fast) == len(ref) == len(list(model.parameters()))
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "cnn-channel"])
def test_replications_per_layer_equal_the_reference(float64, model_name):
    """``replications=[k₁, k₂, k₃]`` (layer-wise): each layer's sub-estimate from its own count, one chunk and
    many, equal to the reference on the same noise; counts that do not fit are refused by name."""
    model, x, y = MODELS[model_name]()
    for budget in (1000.0, 0.002):
        rec = Recording(get_sampler("antithetic"))
        est = glrnet.GLR(replications=[16, 64, 32], baseline=True, sampler=rec, injection="layerwise",
                         memory_budget_mb=budget, prefetch=False, generator=torch.Generator().manual_seed(3))
        fast, stats = est.estimate(model, x, y)
        assert stats.replications == 112
        for f, r in zip(fast, replay_reference(model, x, y, est, rec)):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"replications per layer \[16, 64\] has 2 entries for 3 noisy layers"):
        glrnet.GLR(replications=[16, 64], injection="layerwise").estimate(model, x, y)
    with pytest.raises(ValueError, match="need injection='layerwise'"):
        glrnet.GLR(replications=[16, 64, 32])
    with pytest.raises(ValueError, match="positive integers"):
        glrnet.GLR(replications=[16, 0, 32], injection="layerwise")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_chunks_of_one_replication_under_the_chunked_baseline(float64, model_name):
    """A chunk of k = 1 has B rows in every layer: only its first noisy layer's input is shared by the
    chunks (a regression: the others' inputs were once taken as shared, i.e. from the last chunk)."""
    from test_cnn import tiny_cnn
    model, x, y = small_problem([5, 4, 4, 3], batch=16) if model_name == "mlp" else tiny_cnn(batch=16)
    rec = Recording(get_sampler("iid"))        # B = 16: any chunk draws whole blocks of 16, so k = 1 is allowed
    est = glrnet.GLR(replications=8, baseline=True, sampler=rec, memory_budget_mb=1e-6, prefetch=False,
                     generator=torch.Generator().manual_seed(3))
    fast, stats = est.estimate(model, x, y)
    assert stats.chunks == 8
    for f, r in zip(fast, replay_reference(model, x, y, est, rec)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_the_reference_is_the_formula_for_a_linear_layer(float64):
    """One noisy linear layer: ∂/∂W = mean of L · s(r) hᵀ, computed by hand."""
    torch.manual_seed(0)
    layer = glrnet.NoisyLinear(3, 2)
    x, y, K = torch.rand(4, 3), torch.randint(0, 2, (4,)), 5
    r = torch.randn(K, 4, 2) * 2
    loss = glrnet.get_loss("cross_entropy")
    got = reference_estimate(layer, x, y, loss, {0: r}, torch.arange(K), 1, get_control_variate(False))[0]
    L = loss((layer.affine(x) + r).reshape(K * 4, 2), y.repeat(K)).reshape(K, 4).detach()
    s = r / 4.0
    torch.testing.assert_close(got[0], torch.einsum("kb,kbo,bi->oi", L, s, x) / (K * 4))
    torch.testing.assert_close(got[1], torch.einsum("kb,kbo->o", L, s) / (K * 4))


def glr_samples(model, x, y, n, seed=1, **kw):
    est = glrnet.GLR(generator=torch.Generator().manual_seed(seed), **kw)
    return torch.stack([flat_grads(est.estimate(model, x, y)[0]) for _ in range(n)])


@pytest.mark.parametrize("baseline", list(CONTROL_VARIATES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_and_control_variate_unbiased_vs_pathwise(float64, sampler, baseline):
    model, x, y = small_problem([5, 4, 3])
    glr = glr_samples(model, x, y, n=150, replications=512, sampler=sampler, baseline=baseline)
    print(assert_means_equal(glr, pathwise_samples(model, x, y, n=150, replications=2000)))


def pathwise_one_layer(model, x, y, layer, n, replications, seed):
    """Pathwise gradients of E[L with noise in noisy layer ``layer`` only] (autograd), n samples."""
    pr = probe(model, x)
    layout = Layout(pr, [layer])
    gen, out = torch.Generator().manual_seed(seed), []
    params = list(pr.layers[layer].parameters())
    for _ in range(n):
        r = torch.empty(replications, x.shape[0], layout.width)
        IID().fill_(pr.layers[layer].noise, r, gen)
        inj = glrnet.nn.Injection(pr.layers, replications, x.shape[0], layout.views(r))
        o = glrnet.nn.noisy_forward(model, x, inj, pr.layers[layer])
        loss = glrnet.get_loss("cross_entropy")(o, y.repeat(replications)).mean()
        out.append(flat_grads(torch.autograd.grad(loss, params)))
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["iid", "qmc"])
def test_layerwise_injection_unbiased_for_each_layers_own_objective(float64, sampler):
    model, x, y = small_problem([5, 4, 4, 3])
    glr = glr_samples(model, x, y, n=150, replications=1200, sampler=sampler, injection="layerwise")
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in model]
    cols = torch.split(glr, sizes, dim=1)
    for t in range(3):
        path = pathwise_one_layer(model, x, y, t, n=150, replications=1000, seed=10 + t)
        print(t, assert_means_equal(cols[t], path))
    assert not means_equal(0.85 * cols[0], pathwise_one_layer(model, x, y, 0, 150, 1000, 99))[0]   # power


@pytest.mark.slow
def test_residual_cnn_unbiased_vs_pathwise():
    """float32: unbiasedness, not float64 arithmetic, is what is compared. Per replication the pathwise
    reference varies far less than GLR (under a hundredth in total, at most a tenth in any coordinate),
    so a quarter of GLR's replications adds little to the standard error of the difference; the same
    two sets of samples also show that the test has power."""
    net, x, y = residual_cnn()
    glr = glr_samples(net, x, y, n=150, replications=1000)
    path = pathwise_samples(net, x, y, n=150, replications=250)
    print(assert_means_equal(glr, path))
    ok, report = means_equal(0.85 * glr, path)
    print("0.85 × GLR:", report)
    assert not ok   # the test has power


@pytest.mark.parametrize("sampler", ["antithetic", "qmc"])
def test_threshold_zero_one_unbiased_vs_finite_differences(float64, sampler):
    from test_estimator import fd_and_glr_columns
    model, x, y = small_problem([4, 3, 3], batch=4, seed=3, activation="threshold")
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(3.0)
    n, k = 100, 1024
    glr = glr_samples(model, x, y, n=n, replications=k, loss="zero_one", sampler=sampler)
    glr_sel, fd = fd_and_glr_columns(model, x, y, "zero_one", glr, n, k)
    print(assert_means_equal(glr_sel, fd))
    assert (glr_sel.mean(0).abs() / (glr_sel.std(0) / math.sqrt(n))).max() > 5


@pytest.mark.parametrize("sampler", ["antithetic", "qmc"])
def test_antithetic_and_qmc_lower_variance_than_iid(sampler):
    """Total variance of the plain estimate (no baseline), same problem, same K: iid / sampler > 1 by
    more than 4 standard errors of the log ratio (reported in the test output). With the
    leave-one-out baseline, iid noise is best on this problem (docs/method.md has the figures)."""
    model, x, y = small_problem([10, 6, 3], batch=8, seed=4)
    n = 300
    iid = glr_samples(model, x, y, n=n, replications=64, seed=5, baseline=False)
    other = glr_samples(model, x, y, n=n, replications=64, seed=6, sampler=sampler, baseline=False)
    (v1, se1), (v2, se2) = total_variance(iid), total_variance(other)
    ratio, se_log = v1 / v2, math.hypot(se1, se2)
    print(f"{sampler}: variance iid / {sampler} = {ratio:.2f} (± {100 * se_log:.0f} %)")
    assert math.log(ratio) - 4 * se_log > 0, f"{sampler}: ratio {ratio:.2f}"


def test_variance_estimate_matches_the_spread_of_independent_estimates(float64):
    model, x, y = small_problem([5, 4, 3])
    est = glrnet.GLR(replications=200, generator=torch.Generator().manual_seed(0), variance_batches=10)
    runs = [est.estimate(model, x, y, return_variance=True) for _ in range(200)]
    grads = torch.stack([flat_grads(g) for g, _ in runs])
    reported = torch.stack([flat_grads(s.variance) for _, s in runs]).mean(0).sum().item()
    empirical, se_log = total_variance(grads)
    print(f"reported {reported:.4g}, empirical {empirical:.4g} (± {100 * se_log:.0f} %)")
    assert abs(math.log(reported / empirical)) < 4 * se_log + 0.05   # + the bias of a 10-batch variance


def test_no_process_wide_side_effects():
    model, x, y = small_problem([20, 8, 3], batch=16)
    threads = torch.get_num_threads()
    for prefetch in (False, True):
        glrnet.GLR(replications=500, memory_budget_mb=0.05, prefetch=prefetch).estimate(model, x, y)
        assert torch.get_num_threads() == threads
    glrnet.predict(model, x, "lap", 200, prefetch=True)
    assert torch.get_num_threads() == threads


def test_a_noisy_layer_alone_applies_its_activation_and_trains():
    layer = glrnet.NoisyLinear(4, 3, activation="threshold")
    x = torch.randn(5, 4)
    assert torch.equal(layer(x), (layer.affine(x) > 0).to(x.dtype))
    y = torch.randint(0, 3, (5,))
    glrnet.GLR(replications=20).backward(layer, x, y)
    assert layer.weight.grad.shape == (3, 4)


def test_noisy_sequential_indexes_like_nn_sequential():
    net = glrnet.NoisyMLP([4, 5, 3])
    assert len(net) == 2 and isinstance(net[0], glrnet.NoisyLinear) and net[-1] is list(net)[1]
    assert isinstance(net[:1], nn.Sequential) and net.layers[0] is net[0]


def test_frozen_parameters_get_no_grad_and_stay():
    model, x, y = small_problem([5, 4, 3])
    model[0].weight.requires_grad_(False)
    before = model[0].weight.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    glrnet.GLR(replications=50).backward(model, x, y)
    assert model[0].weight.grad is None and model[0].bias.grad is not None
    opt.step()
    assert torch.equal(model[0].weight, before)
    assert len(glr_parameters(model)[0]) == 1


def test_forward_changes_no_module_state():
    net = glrnet.NoisySequential(glrnet.NoisyConv2d(1, 2, 3), nn.Flatten(), glrnet.NoisyLinear(2 * 4 * 4, 3))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    attrs = dict(vars(net))
    x = torch.rand(2, 1, 6, 6)
    net(x)
    glrnet.predict(net, x, "lap", 10)
    glrnet.GLR(replications=10).estimate(net, x, torch.tensor([0, 1]))
    assert net.input_shape is None and vars(net).keys() == attrs.keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError):   # a different input shape is not silently accepted as "bound"
        net(torch.rand(2, 1, 8, 8))


def test_noise_families_dispatch_by_registration():
    from torch.distributions import Cauchy, Normal

    from glrnet.checkpoint import save_model
    from glrnet.nn.noise import describe, score, score_autograd

    class MyNormal(Normal):
        pass

    r = torch.randn(100)
    torch.testing.assert_close(score(MyNormal(0.0, 2.0), r), r / 4.0)
    torch.testing.assert_close(score(Cauchy(0.0, 1.0), r), score_autograd(Cauchy(0.0, 1.0), r))
    model = glrnet.NoisyMLP([3, 2], noise=Cauchy(0.0, 1.0))
    glrnet.GLR(replications=10).estimate(model, torch.rand(2, 3), torch.tensor([0, 1]))   # trains
    with pytest.raises(ValueError, match="Cauchy cannot be saved: register it"):
        describe(Cauchy(0.0, 1.0))
    with pytest.raises(ValueError, match="Cauchy cannot be saved"):
        save_model("/nonexistent/never-written.safetensors", model)


def test_layerwise_and_variance_options_are_checked():
    model, x, y = small_problem([5, 4, 4, 3])
    with pytest.raises(ValueError, match="multiple of 3"):
        glrnet.GLR(replications=100, injection="layerwise").estimate(model, x, y)
    with pytest.raises(ValueError, match="variance_batches"):
        glrnet.GLR(replications=105).estimate(model, x, y, return_variance=True)
    with pytest.raises(ValueError, match="unknown injection 'layer'"):
        glrnet.GLR(injection="layer")
    with pytest.raises(ValueError, match="unknown sampler 'sobol'; valid: iid, antithetic, qmc"):
        glrnet.GLR(sampler="sobol")


def test_residual_network_through_the_cli_saves_loads_and_predicts(tmp_path):
    from glrnet.checkpoint import load_model
    from glrnet.cli import main
    out = tmp_path / "res"
    assert main(["train", "--arch", "conv:4:3:1:1,res:4:3,avgpool:2", "--hidden", "none", "--epochs", "1",
                 "--replications", "8", "--subset", "200", "--quiet", "--out", str(out)]) == 0
    model, _ = load_model(out / "model.safetensors")
    assert isinstance(model[1], glrnet.Residual) and len(glrnet.noisy_layers(model)) == 4
    x = torch.rand(3, 64)
    assert glrnet.predict(model, x, "lap", 10).shape == (3,)
    glrnet.GLR(replications=8).backward(model, x, torch.tensor([0, 1, 2]))
    assert all(p.grad is not None for p in model.parameters())
