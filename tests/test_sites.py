"""The parts past the MLP: the weight perturbation site (unbiased against the pathwise gradient and against
finite differences, alone and beside activity noise, dense and convolutional), the forward-only
alternatives with GLR's interface (ES, SPSA, forward gradients: each unbiased for what it
estimates), scale-aware noise and parameter-free normalisation."""

import math

import pytest
import torch
from torch.distributions import Normal

import glrnet
from glrnet.estimators.alternatives import ES, SPSA, ForwardGradient
from glrnet.nn import rescale_noise_
from stats import assert_means_equal, flat_grads, means_equal
from test_estimator import pathwise_samples


def mlp(sites=("weight", "weight"), stds=(0.3, 0.5), activation="sigmoid", seed=0, batch=5):
    torch.manual_seed(seed)
    model = glrnet.NoisySequential(
        glrnet.NoisyLinear(4, 3, activation=activation, site=sites[0], noise=Normal(0.0, stds[0])),
        glrnet.NoisyLinear(3, 3, site=sites[1], noise=Normal(0.0, stds[1])), input_shape=(4,))
    return model, torch.rand(batch, 4), torch.randint(0, 3, (batch,))


def glr_samples(model, x, y, n, seed=1, **kw):
    est = glrnet.GLR(generator=torch.Generator().manual_seed(seed), **kw)
    return torch.stack([flat_grads(est.estimate(model, x, y)[0]) for _ in range(n)])


@pytest.mark.parametrize("sampler,baseline", [("iid", True), ("iid", False), ("antithetic", True), ("qmc", False)])
@pytest.mark.parametrize("sites", [("weight", "weight"), ("weight", "activity"), ("flipout", "flipout"),
                                   ("flipout", "activity")], ids=["weight", "mixed", "flipout", "flipout-mixed"])
def test_weight_site_unbiased_vs_pathwise(float64, sites, sampler, baseline):
    model, x, y = mlp(sites)
    glr = glr_samples(model, x, y, n=120, replications=512, sampler=sampler, baseline=baseline)
    path = pathwise_samples(model, x, y, n=120, replications=800)
    print(assert_means_equal(glr, path))
    assert not means_equal(0.8 * glr, path)[0]          # the test can tell a 20 % bias


@pytest.mark.parametrize("site", ["weight", "flipout"])
def test_weight_site_convolutions_unbiased_vs_pathwise(float64, site):
    from test_cnn import tiny_cnn
    net, x, y = tiny_cnn()
    for m in glrnet.nn.noisy_layers(net):
        if isinstance(m, torch.nn.Conv2d):
            m.site, m.noise = site, Normal(0.0, 0.3)
    glr = glr_samples(net, x, y, n=120, replications=400)
    path = pathwise_samples(net, x, y, n=120, replications=400)
    print(assert_means_equal(glr, path))
    assert not means_equal(0.8 * glr, path)[0]


@pytest.mark.parametrize("site,activation", [("weight", "threshold"), ("flipout", "threshold"),
                                             ("weight", "centered:threshold")])
def test_weight_site_threshold_zero_one_unbiased_vs_finite_differences(float64, site, activation):
    """Also for a φ that is not elementwise (each input's units centred on their mean before the threshold):
    the likelihood ratio needs nothing of φ."""
    from test_estimator import fd_and_glr_columns
    model, x, y = mlp((site, "activity"), stds=(1.0, 1.0), activation=activation, seed=3, batch=4)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    n, k = 100, 1024
    glr = glr_samples(model, x, y, n=n, replications=k, loss="zero_one", sampler="antithetic")
    glr_sel, fd = fd_and_glr_columns(model, x, y, "zero_one", glr, n, k)
    print(assert_means_equal(glr_sel, fd))
    assert (glr_sel.mean(0).abs() / (glr_sel.std(0) / math.sqrt(n))).max() > 5


def pathwise_channel_samples(model, x, y, n, replications, seed=2):
    """Pathwise (autograd) gradients of what the channel site estimates: for the one channel-site layer, channel
    c's parameters get ∇θ_c E[L | the replication perturbs channel c] (O times its share of the mean loss's
    gradient, from the replications that perturbed c); every other parameter ∇θ E[L], all its noise on."""
    from glrnet.nn import Injection, Layout, noisy_forward, probe
    from glrnet.estimators.samplers import IID
    pr = probe(model, x)
    layout, gen = Layout(pr), torch.Generator().manual_seed(seed)
    (j,) = [i for i, m in enumerate(pr.layers) if m.site == "channel"]
    chan, O = pr.layers[j], pr.layers[j].weight.shape[0]
    params, out = list(model.parameters()), []
    own = [next(q for q, pp in enumerate(params) if pp is p) for p in chan.parameters()]
    for _ in range(n):
        r = layout.fill_(IID(), torch.empty(replications, x.shape[0], layout.width), gen)
        c = pr.perturbations[j].split(layout.views(r)[j])[1]
        inj = Injection(pr.layers, replications, x.shape[0], layout.views(r))
        losses = glrnet.get_loss("cross_entropy")(noisy_forward(model, x, inj, layout.first),
                                                  y.repeat(replications)).reshape(replications, -1).mean(1)
        total = list(torch.autograd.grad(losses.mean(), params, retain_graph=True))
        for q in own:
            total[q] = torch.zeros_like(total[q])
        for ch in c.unique():
            g = torch.autograd.grad(losses[c == ch].sum() * O / replications, [params[q] for q in own],
                                    retain_graph=True)
            for q, gp in zip(own, g):
                total[q][ch] += gp[ch]
        out.append(flat_grads(total))
    return torch.stack(out)


@pytest.mark.parametrize("sampler", list(glrnet.estimators.SAMPLERS))
@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_channel_site_unbiased_for_each_channels_own_objective(float64, problem, sampler):
    """Site "channel" (one output channel's parameters perturbed per replication, its likelihood ratio × O):
    unbiased, channel by channel, for ∇θ_c E[L with that channel's noise], and for ∇θ E[L] elsewhere."""
    if problem == "mlp":
        model, x, y = mlp(("channel", "activity"))
    else:
        from test_cnn import tiny_cnn
        model, x, y = tiny_cnn()
        model[0].site, model[0].noise = "channel", Normal(0.0, 0.3)
    glr = glr_samples(model, x, y, n=120, replications=480, sampler=sampler)
    path = pathwise_channel_samples(model, x, y, n=120, replications=480)
    print(assert_means_equal(glr, path))
    assert not means_equal(0.8 * glr, path)[0]


@pytest.mark.parametrize("layer", [glrnet.NoisyLinear(5, 3), glrnet.NoisyConv2d(4, 6, 3, padding=1, groups=2),
                                   glrnet.NoisyConv2d(3, 2, 2, stride=2, bias=False),
                                   glrnet.NoisyConv2d(2, 4, 3, stride=2, padding=1, dilation=2)],
                         ids=["linear", "grouped", "conv", "conv-strided-dilated"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-input", "per-replication-input"])
def test_weight_effect_and_perturbed_are_the_layer_at_perturbed_parameters(float64, layer, shared):
    """``weight_effect(h, e)``[k, n] = layer(hₙ; θ + eₖ) − layer(hₙ; θ) and ``perturbed``[k, n] = layer(hₙ; θ + eₖ),
    for an input shared by the k replications (B rows: the first noisy layer) or one per replication (k·B
    rows); and a noisy forward pass through weight-site layers (which takes ``perturbed`` under no_grad,
    the effect otherwise) gives the same outputs with and without autograd."""
    layer = layer.double()
    k, B = 3, 4
    shape = (5,) if isinstance(layer, torch.nn.Linear) else (layer.in_channels, 7, 7)
    h = torch.rand(B if shared else k * B, *shape)
    e = torch.randn(k, layer.parameter_count)
    effect, whole = layer.weight_effect(h, e, k, B), layer.perturbed(h, e, k, B)
    names = [name for name, _ in layer.named_parameters()]
    for kk in range(k):
        hk = h if shared else h[kk * B:(kk + 1) * B]
        params = [p + d for p, d in zip(layer.parameters(), layer.split_parameters(e[kk]))]
        want = torch.func.functional_call(layer, dict(zip(names, params)), (hk,))
        torch.testing.assert_close(whole[kk], want)
        torch.testing.assert_close(effect[kk], want - layer(hk))
    torch.manual_seed(0)
    net = glrnet.NoisySequential(glrnet.NoisyConv2d(2, 3, 3, activation="sigmoid", site="weight"),
                                 glrnet.NoisyConv2d(3, 2, 3, activation="sigmoid", site="weight"), torch.nn.Flatten(),
                                 glrnet.NoisyLinear(18, 3, site="weight"), input_shape=(2, 7, 7)).double()
    x = torch.rand(B, 2, 7, 7)
    noise = glrnet.nn.sample_noise(net, k, B, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = net(x, noise)
    torch.testing.assert_close(fast, net(x, noise))


@pytest.mark.parametrize("layer", [glrnet.NoisyLinear(5, 3), glrnet.NoisyConv2d(4, 6, 3, padding=1, groups=2),
                                   glrnet.NoisyConv2d(3, 2, 2, stride=2, bias=False)], ids=["linear", "grouped", "conv"])
def test_flipout_effect_is_the_layer_at_per_input_sign_flipped_parameters(float64, layer):
    """layer(hₙ ⊙ ς; e) ⊙ ρ = layer(hₙ; θ + e ⊙ Mₖₙ) − layer(hₙ; θ), parameter by parameter, and the batch
    contraction ``mask_sum`` is Σₙ aₙ Mₙ."""
    layer = layer.double()
    k, B = 3, 4
    h = torch.rand(B, *((5,) if isinstance(layer, torch.nn.Linear) else (layer.in_channels, 6, 6)))
    flip = glrnet.Flipout(Normal(0.0, 1.0))
    r = torch.randn(k, B, flip.width(layer, ()))
    e, rho, vs = flip.split(layer, r)
    assert set(rho.unique().tolist()) | set(vs.unique().tolist()) == {-1.0, 1.0}
    z = layer.affine(h)
    got = flip.forward(layer, h, r, k, B, grad=False).reshape(k, *z.shape) - z
    mask = flip.mask(layer, rho, vs)
    for kk in range(k):
        for n in range(B):
            params = [p + d for p, d in zip(layer.parameters(), layer.split_parameters(e[kk] * mask[kk, n]))]
            names = [name for name, _ in layer.named_parameters()]
            want = torch.func.functional_call(layer, dict(zip(names, params)), (h[n:n + 1],)) - layer(h[n:n + 1])
            torch.testing.assert_close(got[kk, n], want[0])
    a = torch.randn(k, B)
    torch.testing.assert_close(flip.mask_sum(layer, a, rho, vs), torch.einsum("kb,kbp->kp", a, mask))


def test_flipout_needs_symmetric_noise_and_averages_over_the_batch(float64):
    """Flipout refuses a noise a sign flip would change. Its own-perturbation variance is Σₙ‖gₙ‖² against
    the shared perturbation's ‖Σₙ gₙ‖² (gₙ: input n's gradient), to first order; on a batch whose inputs
    agree (one input 32 times) the ratio is 1/B + 2/(P + 2) ≈ 0.15 (B = 32, P = 15), at the same K, σ and
    unbiased target."""
    model, x, y = mlp(("flipout", "activity"))
    with pytest.raises(ValueError, match="'flipout' needs noise symmetric"):
        model[0].noise = torch.distributions.Gumbel(0.0, 1.0)
    traces = {}
    for site in ("weight", "flipout"):
        model, x, y = mlp((site, "activity"), stds=(0.3, 0.01), batch=1)
        g = glr_samples(model, x.repeat(32, 1), y.repeat(32), n=60, replications=32, baseline=True)
        traces[site] = g[:, :model[0].parameter_count].var(0).sum().item()
    # a variance trace from 60 draws has relative SE ≈ √(2/59) ≈ 0.18, the ratio ≈ 0.26: 0.35 is > 4 SE above
    # the expected 0.15, and an estimator that does not average over the batch (ratio ~1) fails it
    assert traces["flipout"] < 0.35 * traces["weight"], traces


@pytest.mark.parametrize("site", ["weight", "flipout"])
def test_weight_site_saves_loads_and_predicts(tmp_path, site):
    from glrnet.checkpoint import load_model, save_model
    model, x, _ = mlp((site, "activity"))
    save_model(tmp_path / "m.safetensors", model)
    back, _ = load_model(tmp_path / "m.safetensors")
    assert [m.site for m in back.noisy_layers] == [site, "activity"]
    assert [float(m.noise.stddev) for m in back.noisy_layers] == [pytest.approx(0.3), pytest.approx(0.5)]
    g = torch.Generator().manual_seed(0)
    p = glrnet.predict_proba(back, x, "lap", 200, generator=g)
    torch.testing.assert_close(p, glrnet.predict_proba(model, x, "lap", 200, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="unknown perturbation 'synapse'"):
        glrnet.NoisyLinear(2, 2, site="synapse")
    from glrnet.robustness.surrogates import surrogates_for
    assert surrogates_for(back) == ["exact"]            # no likelihood-ratio input gradient without unit noise first
    assert surrogates_for(mlp(("activity", "weight"))[0]) == ["exact", "lr"]


def smoothed_gradient_samples(model, x, y, sigma, n, seed=7):
    """∇θ L(θ + σε) by autograd at n perturbed parameter vectors (noise-free network): samples whose
    mean is ∇θ E_ε[L(θ + σε)], the objective ES estimates."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    out = []
    for _ in range(n):
        eps = [torch.randn(p.shape, generator=gen) * sigma for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        out.append(flat_grads(torch.autograd.grad(loss, params)))
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
    return torch.stack(out)


def test_es_is_unbiased_for_the_smoothed_loss(float64):
    model, x, y = mlp(("activity", "activity"))
    es = ES(population=400, sigma=0.3, generator=torch.Generator().manual_seed(1))
    est = torch.stack([flat_grads(es.estimate(model, x, y)[0]) for _ in range(150)])
    ref = smoothed_gradient_samples(model, x, y, 0.3, n=3000)
    print(assert_means_equal(est, ref))
    assert [m.site for m in model.noisy_layers] == ["activity", "activity"]   # restored after each call


def noise_free_gradient(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return flat_grads(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_spsa_estimates_the_gradient(float64, distribution):
    model, x, y = mlp(("activity", "activity"))
    spsa = SPSA(directions=20, eps=1e-4, distribution=distribution, generator=torch.Generator().manual_seed(2))
    est = torch.stack([flat_grads(spsa.estimate(model, x, y)[0]) for _ in range(400)])
    print(assert_means_equal(est, noise_free_gradient(model, x, y)))
    theta = torch.cat([p.reshape(-1) for p in model.parameters()])
    spsa.estimate(model, x, y)
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in model.parameters()]), theta)  # θ restored


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per-layer"])
def test_forward_gradient_is_unbiased(float64, per_layer):
    model, x, y = mlp(("activity", "activity"))
    fg = ForwardGradient(directions=10, per_layer=per_layer, generator=torch.Generator().manual_seed(3))
    est = torch.stack([flat_grads(fg.estimate(model, x, y)[0]) for _ in range(400)])
    exact = noise_free_gradient(model, x, y)
    print(assert_means_equal(est, exact))
    assert not means_equal(est, 0.8 * exact)[0]


def test_alternatives_fill_grad_of_trainable_parameters_only_and_refuse_what_they_cannot_do():
    model, x, y = mlp(("activity", "activity"))
    model[1].bias.requires_grad_(False)
    for producer in (ES(population=8), SPSA(directions=2), ForwardGradient(directions=2)):
        model.zero_grad(set_to_none=True)
        stats = producer.backward(model, x, y)
        assert model[1].bias.grad is None and all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert torch.isfinite(stats.loss)
    step, _, _ = mlp(("activity", "activity"), activation="threshold")
    with pytest.raises(ValueError, match="differentiable units"):
        ForwardGradient().backward(step, x, y)
    with pytest.raises(ValueError, match="differentiable loss"):
        ForwardGradient(loss="zero_one")
    with pytest.raises(ValueError, match="even number"):
        ES(population=5)
    ES(loss="zero_one", population=8).backward(step, x, y)       # ES needs no gradient of φ or L


def test_relative_noise_sets_sigma_from_the_noise_free_preactivation():
    model, x, _ = mlp(("activity", "activity"))
    stds = rescale_noise_(model, x, 0.5)
    with torch.no_grad():
        z0 = model[0].affine(x)
        z1 = model[1].affine(model[0](x))
    assert stds[0] == pytest.approx(0.5 * z0.pow(2).mean().sqrt().item(), rel=1e-6)
    assert stds[1] == pytest.approx(0.5 * z1.pow(2).mean().sqrt().item(), rel=1e-6)
    assert float(model[1].noise.stddev) == pytest.approx(stds[1])


def test_relative_weight_noise_tracks_the_weights_scale():
    model, x, _ = mlp(("weight", "activity"))
    before = float(model[1].noise.stddev)
    stds = rescale_noise_(model, x, weight_ratio=0.25)
    assert list(stds) == [0]                                      # the activity layer keeps its σ
    assert stds[0] == pytest.approx(0.25 * model[0].weight.pow(2).mean().sqrt().item(), rel=1e-6)
    assert float(model[1].noise.stddev) == before
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    assert rescale_noise_(model, x, 0.5, 0.25)[0] == pytest.approx(3 * stds[0], rel=1e-6)


def test_training_options_for_sites_alternatives_scale_and_norm(tmp_path):
    from glrnet.checkpoint import load_model
    from glrnet.train import TrainConfig, build_model, train
    cfg = TrainConfig(arch="conv:2:3,maxpool:2", hidden=[], perturb="conv=weight:0.1",
                      norm="layer").validate()
    model = build_model(cfg, (8, 8), 10)
    assert [m.site for m in model.noisy_layers] == ["weight", "activity"]
    assert any(isinstance(m, torch.nn.GroupNorm) and not m.affine for m in model)
    first = build_model(TrainConfig(arch="lenet", hidden=[], perturb="first=weight").validate(), (28, 28), 10)
    assert [m.site for m in first.noisy_layers] == ["weight", "activity", "activity"]
    flip = build_model(TrainConfig(arch="lenet", hidden=[], perturb="conv=flipout").validate(), (28, 28), 10)
    assert [m.site for m in flip.noisy_layers] == ["flipout", "flipout", "activity"]
    kinds = [type(m).__name__ for m in build_model(TrainConfig(arch="lenet", hidden=[]), (28, 28), 10)]
    assert kinds == ["NoisyConv2d", "MaxPool2d", "NoisyConv2d", "MaxPool2d", "Flatten", "NoisyLinear"]
    common = dict(dataset="digits", subset=200, epochs=1, replications=8, eval_replications=4, lap_replications=8)
    for method in ("es", "spsa", "forward"):
        train(TrainConfig(**common, method=method), tmp_path / method, quiet=True)
        assert (tmp_path / method / "model.safetensors").exists()
    train(TrainConfig(**common, relative_noise=0.5, norm="layer"), tmp_path / "rel", quiet=True)
    model, _ = load_model(tmp_path / "rel" / "model.safetensors")
    assert len({float(m.noise.stddev) for m in model.noisy_layers}) == 2     # each layer its own σ, saved
    for bad, match in ((dict(perturb="some=weight"), "--perturb: cannot read"), (dict(norm="batch"), "unknown norm"),
                       (dict(perturb="conv=weight:0"), "the noise std must be > 0"),
                       (dict(relative_noise=0.0), "relative noise must be > 0"),
                       (dict(relative_weight_noise=0.5), "needs GLR with the noise on parameters"),
                       (dict(flipout=True), "flipout needs GLR with the noise on parameters"),
                       (dict(perturb="conv=flipout", method="es"), "method es perturbs every weight itself"),
                       (dict(method="forward", activation="threshold"), "smooth activation")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()


def test_local_losses_estimate_each_blocks_own_objective(float64):
    """Block b's estimate is unbiased for ∇ E[L(head_b) | noise in block b only], the pathwise gradient
    through the network truncated at head b with noise in block b's layers alone."""
    from glrnet.nn import Injection, Layout, LocalLosses, noisy_forward, probe
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(glrnet.NoisyConv2d(1, 2, 3, activation="sigmoid"), torch.nn.MaxPool2d(2)),
              torch.nn.Sequential(glrnet.NoisyConv2d(2, 2, 2, activation="sigmoid"))]
    heads = [torch.nn.Sequential(torch.nn.Flatten(), glrnet.NoisyLinear(18, 3)),
             torch.nn.Sequential(torch.nn.Flatten(), glrnet.NoisyLinear(8, 3))]
    net = LocalLosses(blocks, heads)
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 3, (3,))
    glr = glr_samples(net, x, y, n=120, replications=600)
    sizes = [sum(p.numel() for p in m.parameters()) for m in glrnet.nn.noisy_layers(net)]
    cols = torch.split(glr, sizes, dim=1)          # conv0, conv1, head0, head1 (module order)
    gen = torch.Generator().manual_seed(9)
    for b, owned in ((0, (0, 2)), (1, (1, 3))):
        run = net.truncated(b)
        pr = probe(run, x)
        mine = {id(m) for m in net.block_layers(b)}
        layout = Layout(pr, [i for i in pr.order if id(pr.layers[i]) in mine])
        params = [p for m in net.block_layers(b) for p in m.parameters()]
        path = []
        for _ in range(120):
            r = layout.fill_(glrnet.estimators.samplers.IID(), torch.empty(600, 3, layout.width), gen)
            out = noisy_forward(run, x, Injection(pr.layers, 600, 3, layout.views(r)), layout.first)
            loss = torch.nn.functional.cross_entropy(out, y.repeat(600))
            path.append(flat_grads(torch.autograd.grad(loss, params)))
        mine_cols = torch.cat([cols[owned[0]], cols[owned[1]]], 1)
        print(b, assert_means_equal(mine_cols, torch.stack(path)))
    assert torch.equal(net(x), net.truncated(1)(x))         # the prediction is the last head's


def test_attack_surrogate_differentiates_through_the_centring():
    """An attacker's gradient through ``centered:threshold`` with the ``sigmoid:4`` surrogate is the chain rule
    through the centring (the mean's share included): with one hidden layer and a linear output it equals
    autograd's input gradient of the same network with ``centered:sigmoid:4`` units, to rounding."""
    from glrnet.robustness.surrogates import attack_forward

    def net(act):
        torch.manual_seed(0)
        return glrnet.NoisySequential(glrnet.NoisyConv2d(1, 2, 3, activation=act), torch.nn.Flatten(),
                                      glrnet.NoisyLinear(2 * 6 * 6, 3), input_shape=(1, 8, 8)).double()
    torch.manual_seed(1)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64)
    (got,) = torch.autograd.grad((attack_forward(net("centered:threshold"), x, surrogate="sigmoid:4") * c).sum(), x)
    (want,) = torch.autograd.grad((net("centered:sigmoid:4")(x) * c).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_centered_activation_keeps_every_channel_firing_and_round_trips(tmp_path):
    """``centered:<φ>`` centres each input's pre-activation per channel (per unit set for a dense layer) before φ:
    a channel whose pre-activations are all far below 0 still fires at about half of its positions; the name
    round-trips through saving; back-propagation refuses a centred threshold; attacks get the threshold's surrogates."""
    from glrnet.nn.activations import get_activation, is_step
    from glrnet.checkpoint import load_model, save_model
    from glrnet.robustness.surrogates import surrogates_for
    phi = get_activation("centered:threshold")
    assert repr(phi) == "centered:threshold" and is_step(phi) and repr(get_activation("centered:sigmoid:4")) == "centered:sigmoid:4"
    v = torch.randn(5, 3, 6, 6) - 50.0
    torch.testing.assert_close(phi(v).mean((2, 3)), (v - v.mean((2, 3), keepdim=True) > 0).double().mean((2, 3)).float())
    assert phi(v).mean() > 0.3 and get_activation("threshold")(v).sum() == 0
    for w in (v, 5.0 + 1e-6 * torch.randn(64, 4, 5, 5), torch.randn(7, 30, dtype=torch.float64)):
        assert torch.equal(phi(w), phi.inner(phi.center(w))) and phi(w).dtype == w.dtype   # the fast 1[v > v̄]
    torch.testing.assert_close(phi(torch.tensor([[1.0, 2.0, 6.0]])), torch.tensor([[0.0, 0.0, 1.0]]))
    torch.manual_seed(0)
    net = glrnet.NoisySequential(glrnet.NoisyConv2d(1, 2, 3, activation="centered:threshold", site="weight"),
                                 torch.nn.Flatten(), glrnet.NoisyLinear(2 * 6 * 6, 3), input_shape=(1, 8, 8))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
    save_model(tmp_path / "m.safetensors", net)
    back, _ = load_model(tmp_path / "m.safetensors")
    assert repr(back[0].activation) == "centered:threshold"
    torch.testing.assert_close(back(x), net(x))
    with pytest.raises(ValueError, match="threshold"):
        glrnet.Backprop().backward(net, x, y)
    assert "sigmoid:4" in surrogates_for(net)
    with pytest.raises(ValueError, match="centered:<activation>"):
        get_activation("centred:threshold")
