"""GLR through time: spiking (LIF) and recurrent layers trained without back-propagation through time.

What is checked:
* the layers are their equations (leaky integrate-and-fire with each reset, the leaky integrator, the Elman
  layer), alone and step by step in a TimeLoop, noise-free and with given noise at every step;
* the fast path (two passes, the noise drawn again from per-chunk seeds) equals the definition
  (``reference_through_time``: every step kept, one autograd call) on the same noise, in float64, for every
  built-in sampler × control variate × injection × perturbation, in one chunk and in many;
* the estimate is unbiased: against the average of back-propagated gradients over common noise paths for
  smooth units, and against central finite differences of E[L] with common random numbers for spiking
  units (and the 0-1 loss), with tolerances from standard errors (stats.py);
* the alternatives run through the same ``backward(model, x, y)``: back-propagation through time with the
  surrogate derivative, ES (weight perturbation: one forward pass per chunk), forward gradients through time
  (unbiased for the surrogate gradient), LAP prediction; and a short training run learns.
"""

import functools
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

import glrnet
from glrnet.estimators import CONTROL_VARIATES, SAMPLERS, glr_parameters
from glrnet.estimators import through_time
from glrnet.estimators.samplers import IID, get_sampler
from glrnet.nn import Layout, TimeInjection, probe
from stats import assert_means_equal, flat_grads, means_equal

T, B, IN = 4, 3, 3


def lif_loop(recurrent=True, reset="subtract", perturbation=None, sigma=0.4, readout="mean", seed=0, steps=T):
    """A recurrent LIF layer then a leaky-integrator readout, step by step."""
    torch.manual_seed(seed)
    noise = Normal(0.0, sigma)
    model = glrnet.TimeLoop(
        glrnet.Leaky(IN, 4, beta=0.8, threshold=0.5, reset_mechanism=reset, recurrent=recurrent, noise=noise,
                     perturbation=perturbation),
        glrnet.LeakyIntegrator(4, 3, beta=0.7, noise=noise, perturbation=perturbation),
        readout=readout, input_shape=(steps, IN))
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    return model, torch.rand(B, steps, IN), torch.randint(0, 3, (B,))


def lif_layer_major(seed=0):
    """The same kind of network layer by layer in a NoisySequential (each layer takes the whole sequence)."""
    torch.manual_seed(seed)
    noise = Normal(0.0, 0.4)
    model = glrnet.NoisySequential(glrnet.Leaky(IN, 4, beta=0.8, threshold=0.5, noise=noise),
                                   glrnet.TimeDistributed(nn.Identity()),
                                   glrnet.Leaky(4, 3, beta=0.9, threshold=0.5, noise=noise), glrnet.Readout("sum"))
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    return model, torch.rand(B, T, IN), torch.randint(0, 3, (B,))


def elman(activation="sigmoid", perturbation=None, seed=0):
    """A noisy recurrent sigmoid layer, a noisy linear layer per step, the mean over steps (smooth units)."""
    torch.manual_seed(seed)
    model = glrnet.TimeLoop(glrnet.Recurrent(IN, 4, activation=activation, noise=Normal(0.0, 1.0),
                                             perturbation=perturbation),
                            glrnet.NoisyLinear(4, 3, noise=Normal(0.0, 1.0), perturbation=perturbation),
                            readout="mean", input_shape=(T, IN))
    return model, torch.rand(B, T, IN), torch.randint(0, 3, (B,))


MODELS = {
    "lif-recurrent": lif_loop,
    "lif-zero-reset": lambda: lif_loop(recurrent=False, reset="zero"),
    "lif-layer-major": lif_layer_major,
    "elman": elman,
    "lif-weight": lambda: lif_loop(perturbation="weight"),
    "lif-flipout": lambda: lif_loop(perturbation="flipout"),
    "lif-channel": lambda: lif_loop(perturbation="channel"),
    "elman-weight-first": lambda: _first_layer_site(elman, "weight"),
}


def _first_layer_site(build, site):
    model, x, y = build()
    glrnet.noisy_layers(model)[0].site = site
    return model, x, y


# ---------------------------------------------------------------------------------------------- the layers
def lif_by_hand(x, W, Wr, b, beta, theta, reset, noise=None):
    """The LIF equations written out (s_0 = 0, u_0 = 0); noise (T, B, out) added to each step's membrane."""
    u = s = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
    spikes = []
    for t in range(x.shape[1]):
        drive = x[:, t] @ W.T + b + (s @ Wr.T if Wr is not None else 0) + (noise[t] if noise is not None else 0)
        if reset == "subtract":
            u = beta * u - theta * s + drive
        elif reset == "zero":
            u = beta * u * (1 - s) + drive
        else:
            u = beta * u + drive
        s = (u > theta).to(x.dtype)
        spikes.append(s)
    return torch.stack(spikes, 1), u


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_leaky_is_the_lif_equations(float64, reset, recurrent):
    torch.manual_seed(0)
    layer = glrnet.Leaky(5, 6, beta=0.85, threshold=0.7, reset_mechanism=reset, recurrent=recurrent)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    x = torch.rand(4, 9, 5)
    want, _ = lif_by_hand(x, layer.input_weight, layer.recurrent_weight, layer.bias, 0.85, 0.7, reset)
    assert 0.05 < want.mean() < 0.95      # the neurons fire, and not always
    torch.testing.assert_close(layer(x), want)
    loop = glrnet.TimeLoop(layer, readout="sum")
    torch.testing.assert_close(loop(x), want.sum(1))


def test_leaky_integrator_and_elman_layer_are_their_equations(float64):
    torch.manual_seed(0)
    x = torch.rand(4, 7, 5)
    li = glrnet.LeakyIntegrator(5, 3, beta=0.6)
    u, want = torch.zeros(4, 3, dtype=x.dtype), []
    for t in range(7):
        u = 0.6 * u + x[:, t] @ li.weight.T + li.bias
        want.append(u)
    torch.testing.assert_close(li(x), torch.stack(want, 1))
    torch.testing.assert_close(glrnet.TimeLoop(li, readout="last")(x), u)
    torch.testing.assert_close(glrnet.TimeLoop(li, readout="mean")(x), torch.stack(want, 1).mean(1))
    rnn = glrnet.Recurrent(5, 4, activation="tanh")
    h, want = torch.zeros(4, 4, dtype=x.dtype), []
    for t in range(7):
        h = torch.tanh(x[:, t] @ rnn.input_weight.T + h @ rnn.recurrent_weight.T + rnn.bias)
        want.append(h)
    torch.testing.assert_close(rnn(x), torch.stack(want, 1))


def test_step_by_step_equals_layer_by_layer(float64):
    torch.manual_seed(0)
    a, b = glrnet.Leaky(IN, 4, recurrent=True, threshold=0.3), glrnet.LeakyIntegrator(4, 3)
    x = torch.rand(B, 6, IN)
    loop = glrnet.TimeLoop(a, b, readout="mean")
    seq = glrnet.NoisySequential(a, b, glrnet.Readout("mean"))
    torch.testing.assert_close(loop(x), seq(x))


def test_a_noisy_pass_adds_fresh_noise_to_every_steps_membrane(float64):
    """Inside a noisy pass, step t's membrane gets the noise drawn for that step (replication-major rows)."""
    model, x, y = lif_loop()
    pr = probe(model, x)
    k = 2
    noise = {i: [torch.randn(k, B, pr.width(i)) * 0.4 for _ in range(T)] for i in pr.order}
    inj = TimeInjection(pr.layers, k, B, lambda i, n: noise[i][n], pr.perturbations, pr.order)
    out = glrnet.nn.noisy_forward(model, x, inj, pr.layers[0])
    lif, li = model[0], model[1]
    for j in range(k):
        s, _ = lif_by_hand(x, lif.input_weight, lif.recurrent_weight, lif.bias, 0.8, 0.5, "subtract",
                           torch.stack(noise[0])[:, j])
        u, us = 0, []
        for t in range(T):
            u = 0.7 * u + s[:, t] @ li.weight.T + li.bias + noise[1][t][j]
            us.append(u)
        torch.testing.assert_close(out[j * B:(j + 1) * B], torch.stack(us).mean(0))
    assert inj.applications == {0: T, 1: T}


def test_the_probe_counts_applications_and_a_one_shot_pass_refuses_repeats():
    model, x, _ = lif_loop()
    pr = probe(model, x)
    assert pr.repeated and pr.applications == {0: T, 1: T} and pr.shapes == {0: (4,), 1: (3,)}
    assert not probe(*glrnet_mlp()).repeated
    layout = Layout(pr)
    with pytest.raises(RuntimeError, match="ran twice in one forward pass"):
        glrnet.nn.noisy_forward(model, x, layout.injection(1, B, torch.zeros(1, B, layout.width)), layout.first)


def glrnet_mlp():
    return glrnet.NoisyMLP([3, 4, 2]), torch.rand(2, 3)


def test_time_distributed_refuses_noisy_layers_and_the_loop_refuses_flat_noise():
    with pytest.raises(ValueError, match="put noisy layers in a TimeLoop"):
        glrnet.TimeDistributed(glrnet.NoisyLinear(3, 3))
    model, x, _ = lif_loop()
    with pytest.raises(ValueError, match="takes no flat noise tensor"):
        model(x, noise=torch.zeros(1))
    with pytest.raises(ValueError, match="reset_mechanism"):
        glrnet.Leaky(3, 3, reset_mechanism="soft")


# ---------------------------------------------------------------------------------------------- fast path = definition
@pytest.fixture
def recorded(monkeypatch):
    """Every draw of the fast path: (seed, active layers, layer, application, noise), in order."""
    log = []
    call = through_time.PassNoise.__call__

    def recording(self, i, n):
        r = call(self, i, n)
        log.append((self.seed, tuple(self.active), i, n, r.clone()))
        return r

    monkeypatch.setattr(through_time.PassNoise, "__call__", recording)
    return log


def replay_reference(model, x, y, est, log):
    """The definition on exactly the noise the fast path drew; also checks that its second pass drew it again."""
    pr = probe(model, x, est.perturbation)
    sets = [pr.order] if est.injection == "all" else [[i] for i in pr.order]
    out = {}
    for active, per_set in zip(sets, est._per_set(len(sets))):
        events = [e for e in log if e[1] == tuple(active)]
        seeds = list(dict.fromkeys(e[0] for e in events))
        sampler = est.sampler.for_replications(per_set, est.control_variate.min_groups)
        noise, groups, offset = {}, [], 0
        for seed in seeds:
            draws = [e for e in events if e[0] == seed]
            first = draws[:len(draws) // 2]
            for e1, e2 in zip(first, draws[len(draws) // 2:]):      # pass 2 drew the same noise, in order
                assert e1[2:4] == e2[2:4] and torch.equal(e1[4], e2[4])
            per_layer = {}
            for _, _, i, n, r in first:
                per_layer.setdefault(i, []).append(r)
            for i, rs in per_layer.items():
                noise.setdefault(i, []).append(rs)
            k = first[0][4].shape[0]
            groups.append(sampler.group_ids(k) + offset)
            offset += k // sampler.group_size
        noise = {i: [torch.cat(chunk) for chunk in zip(*chunks)] for i, chunks in noise.items()}
        assert noise[active[0]][0].shape[0] == per_set
        out.update(through_time.reference_through_time(model, x, y, est.loss, noise, torch.cat(groups),
                                                       sampler.group_size, est.control_variate, est.perturbation))
    return [g for i in range(len(pr.layers)) for g in out[i]]


@pytest.mark.parametrize("injection", ["all", "layerwise"])
@pytest.mark.parametrize("baseline", sorted(CONTROL_VARIATES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fast_path_equals_the_definition_on_the_same_noise(float64, recorded, model_name, sampler, baseline,
                                                           injection):
    model, x, y = MODELS[model_name]()
    for budget in (1000.0, 0.002):
        recorded.clear()
        est = glrnet.GLR(replications=64, baseline=baseline, sampler=sampler, injection=injection,
                         memory_budget_mb=budget, generator=torch.Generator().manual_seed(3))
        fast, stats = est.estimate(model, x, y)
        assert stats.chunks > 1 or budget > 1
        ref = replay_reference(model, x, y, est, recorded)
        assert len(ref) == len(fast) == sum(p.requires_grad for p in model.parameters())
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_the_estimators_perturbation_applies_to_every_layer_through_time(float64, recorded):
    """``GLR(perturbation=Weight(...))`` (what ES is) on a model whose layers carry activity noise."""
    model, x, y = lif_loop()
    est = glrnet.GLR(replications=16, perturbation=glrnet.Weight(Normal(0.0, 0.1)), sampler="antithetic",
                     generator=torch.Generator().manual_seed(0))
    fast, _ = est.estimate(model, x, y)
    for f, r in zip(fast, replay_reference(model, x, y, est, recorded)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_replications_per_layer_equal_the_definition(float64, recorded):
    model, x, y = lif_loop()
    est = glrnet.GLR(replications=[16, 48], injection="layerwise", generator=torch.Generator().manual_seed(0))
    fast, _ = est.estimate(model, x, y)
    for f, r in zip(fast, replay_reference(model, x, y, est, recorded)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


def test_variance_batches_and_non_finite_losses_through_time(float64):
    model, x, y = lif_loop()
    est = glrnet.GLR(replications=40, variance_batches=4, generator=torch.Generator().manual_seed(0))
    grads, stats = est.estimate(model, x, y, return_variance=True)
    assert len(stats.variance) == len(grads) and all((v > 0).any() for v in stats.variance)
    nan_loss = lambda out, t: out.sum(-1) * float("nan")                 # noqa: E731
    with pytest.raises(glrnet.NonFiniteLossError):
        glrnet.GLR(loss=nan_loss, replications=8).estimate(model, x, y)


def test_held_noise_needs_one_forward_pass_per_chunk_activity_noise_two():
    calls = []
    for site in ("weight", None):
        model, x, y = lif_loop(perturbation=site)
        handle = model.register_forward_pre_hook(lambda m, a: calls.append(site) if len(a[0]) == B else None)
        glrnet.GLR(replications=8).estimate(model, x, y)
        handle.remove()
    assert calls.count("weight") == 1 and calls.count(None) == 2


@pytest.mark.parametrize("recurrent", [False, True])
def test_noise_free_inputs_replay_the_noise_over_one_noise_free_pass(float64, monkeypatch, recurrent):
    """Layer-wise injection on a feed-forward stack: each noisy layer's inputs come before any noise, so the
    second pass is one noise-free pass of B rows with the noise drawn again; the same estimate as running
    the k·B noisy rows again. A recurrent layer's input holds its own noisy spikes: the noisy pass again when
    it is the noisy one (the readout after it still sees noise-free spikes)."""
    model, x, y = lif_loop(recurrent=recurrent)
    passes = []
    run_pass = through_time.run_pass
    monkeypatch.setattr(through_time, "run_pass", lambda *a, **kw: passes.append(a[3]) or run_pass(*a, **kw))
    estimate = lambda: glrnet.GLR(replications=[8, 16], injection="layerwise", baseline=True,  # noqa: E731
                                  generator=torch.Generator().manual_seed(0)).estimate(model, x, y)[0]
    fast = estimate()
    assert passes == ([8, 1, 16, 1] if not recurrent else [8, 8, 16, 1])
    monkeypatch.setattr(through_time, "replay_noise_free",
                        lambda model, x, layout, noise, on_apply: run_pass(model, x, layout, noise.k, noise,
                                                                           on_apply=on_apply))
    for f, g in zip(fast, estimate()):
        torch.testing.assert_close(f, g, rtol=1e-12, atol=0.0)


def test_the_estimator_refuses_to_run_across_processes():
    model, x, y = lif_loop()
    est = glrnet.GLR(replications=8)
    est._ranks = lambda: 2
    with pytest.raises(ValueError, match="one process"):
        est.estimate(model, x, y)


# ---------------------------------------------------------------------------------------------- unbiased
def glr_samples(model, x, y, n, seed=1, **kw):
    est = glrnet.GLR(generator=torch.Generator().manual_seed(seed), **kw)
    return torch.stack([flat_grads(est.estimate(model, x, y)[0]) for _ in range(n)])


def pathwise_samples(model, x, y, n, replications, active=None, seed=2):
    """Back-propagation through time through the noisy network (noise in ``active`` layers only; default all),
    n samples of the gradient averaged over ``replications`` common noise paths: unbiased for smooth units."""
    pr = probe(model, x)
    layout = Layout(pr, active)
    gen, params, out = torch.Generator().manual_seed(seed), [p for g in glr_parameters(model) for p in g], []
    for _ in range(n):
        o = through_time.sampled_pass(model, x, layout, replications, IID(), gen)
        loss = glrnet.get_loss("cross_entropy")(o, y.repeat(replications)).mean()
        out.append(flat_grads(torch.autograd.grad(loss, params)))
    return torch.stack(out)


@functools.cache
def _elman_reference(dtype):
    model, x, y = elman()
    return model, x, y, pathwise_samples(model, x, y, n=300, replications=1000)


@pytest.mark.slow
@pytest.mark.xdist_group("elman_reference")
@pytest.mark.parametrize("baseline", sorted(CONTROL_VARIATES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_unbiased_against_backprop_through_time_over_common_noise_paths(float64, sampler, baseline):
    """Every sampler and control variate against one set of pathwise samples (drawn once, shared)."""
    model, x, y, path = _elman_reference(torch.get_default_dtype())
    glr = glr_samples(model, x, y, n=300, replications=256, sampler=sampler, baseline=baseline)
    print(assert_means_equal(glr, path))
    if sampler == "iid" and baseline == "leave-one-out":    # the test has power: 15 % off is rejected
        ok, report = means_equal(0.85 * glr, path)
        print("0.85 × GLR:", report)
        assert not ok


def test_backprop_with_noise_is_the_same_pathwise_gradient(float64):
    """glrnet.Backprop(noise=True) through time (its dispatch) agrees with the helper above."""
    model, x, y = elman()
    bp = glrnet.Backprop(noise=True, replications=1000, generator=torch.Generator().manual_seed(5))
    samples = []
    for _ in range(60):
        model.zero_grad()
        bp.backward(model, x, y)
        samples.append(flat_grads([p.grad for p in model.parameters()]))
    print(assert_means_equal(torch.stack(samples), pathwise_samples(model, x, y, n=60, replications=1000)))


@pytest.mark.slow
def test_weight_perturbation_unbiased_against_backprop_through_its_noise(float64):
    model, x, y = elman(perturbation="weight")
    for m in glrnet.noisy_layers(model):
        m.noise = Normal(0.0, 0.3)
    glr = glr_samples(model, x, y, n=150, replications=256, sampler="antithetic")
    print(assert_means_equal(glr, pathwise_samples(model, x, y, n=150, replications=1000)))


@pytest.mark.slow
def test_layerwise_injection_unbiased_for_each_layers_own_objective(float64):
    model, x, y = elman()
    glr = glr_samples(model, x, y, n=150, replications=512, injection="layerwise")
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in glrnet.noisy_layers(model)]
    for t, cols in enumerate(torch.split(glr, sizes, dim=1)):
        path = torch.split(pathwise_samples(model, x, y, 150, 1000, active=[t], seed=10 + t), sizes, dim=1)[t]
        print(t, assert_means_equal(cols, path))


def fd_directions(model, count=2, seed=0):
    """``count`` random unit directions in each trainable parameter tensor (the others zero), flattened."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for g in glr_parameters(model) for p in g]
    dirs = []
    for j, p in enumerate(params):
        for _ in range(count):
            v = [torch.zeros(q.numel(), dtype=q.dtype) for q in params]
            v[j] = torch.randn(p.numel(), generator=gen, dtype=p.dtype)
            v[j] /= v[j].norm()
            dirs.append(torch.cat(v))
    return torch.stack(dirs)                                            # (d, P)


def fd_samples(model, x, y, loss, dirs, n, replications, perturbation=None, h=0.03, seed=7):
    """Central finite differences of E[L] along each direction with common random numbers: the same noise
    paths (the same seeds) at θ + hv and θ − hv. n samples (n, d), each the mean over ``replications``."""
    pr = probe(model, x, perturbation)
    layout = Layout(pr)
    params = [p for g in glr_parameters(model) for p in g]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    loss, gen, out = glrnet.get_loss(loss), torch.Generator().manual_seed(seed), []

    def set_theta(v):
        o = 0
        for p in params:
            p.copy_(v[o:o + p.numel()].reshape(p.shape))
            o += p.numel()

    with torch.no_grad():
        for _ in range(n):
            s = int(torch.randint(0, 2**62, (), generator=gen))
            row = []
            for v in dirs:
                vals = []
                for sign in (1, -1):
                    set_theta(theta + sign * h * v)
                    o, _ = through_time.run_pass(model, x, layout, replications,
                                                 through_time.PassNoise(layout, IID(), s, replications, x))
                    vals.append(loss(o, y.repeat(replications)).mean())
                row.append((vals[0] - vals[1]) / (2 * h))
            out.append(torch.stack(row))
        set_theta(theta)
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["subtract-cross-entropy", "zero-reset-zero-one", "weight-noise"])
def test_spiking_unbiased_against_finite_differences_of_the_expected_loss(float64, case):
    if case == "subtract-cross-entropy":
        (model, x, y), loss, pert = lif_loop(), "cross_entropy", None
    elif case == "zero-reset-zero-one":
        (model, x, y), loss, pert = lif_loop(reset="zero", readout="last"), "zero_one", None
    else:
        (model, x, y), loss, pert = lif_loop(perturbation="weight", sigma=0.15), "cross_entropy", None
    dirs = fd_directions(model)
    glr = glr_samples(model, x, y, n=200, replications=1024, loss=loss, sampler="antithetic") @ dirs.T
    fd = fd_samples(model, x, y, loss, dirs, n=100, replications=2048, perturbation=pert)
    print(assert_means_equal(glr, fd))
    se = glr.std(0) / math.sqrt(len(glr))
    assert (glr.mean(0).abs() / se).max() > 5          # some directional derivative is resolved: the test has power


@pytest.mark.slow
@pytest.mark.parametrize("option", ["leave-one-out", "antithetic", "qmc"])
def test_variance_reduction_carries_through_time(float64, option):
    """Total variance of the plain estimate (i.i.d. noise, no baseline) over that of each option, on a spiking
    network over 8 steps: measured 12× (baseline), 4.6× (antithetic), 3.7× (QMC) at K = 64; asserted ≥ 2×
    and above 1 by more than 4 standard errors of the log ratio."""
    from test_estimator import total_variance
    model, x, y = lif_loop(steps=8)
    kw = dict(baseline=True) if option == "leave-one-out" else dict(sampler=option, baseline=False)
    plain = glr_samples(model, x, y, n=200, replications=64, seed=5, baseline=False)
    other = glr_samples(model, x, y, n=200, replications=64, seed=6, **kw)
    (v1, se1), (v2, se2) = total_variance(plain), total_variance(other)
    ratio, se_log = v1 / v2, math.hypot(se1, se2)
    print(f"{option}: variance plain / {option} = {ratio:.2f} (± {100 * se_log:.0f} %)")
    assert ratio > 2 and math.log(ratio) - 4 * se_log > 0


# ---------------------------------------------------------------------------------------------- the alternatives
def test_backprop_through_time_uses_the_surrogate_derivative(float64):
    u = torch.linspace(-1, 1, 11, dtype=torch.float64, requires_grad=True)
    s = glrnet.nn.FastSigmoid(25.0)(u - 0.2)
    torch.testing.assert_close(s.detach(), (u > 0.2).double())
    (g,) = torch.autograd.grad(s.sum(), u)
    torch.testing.assert_close(g, 1 / (1 + 25 * (u.detach() - 0.2).abs()) ** 2)
    model, x, y = lif_loop()
    model.zero_grad()
    glrnet.Backprop().backward(model, x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.slow
def test_forward_gradients_through_time_unbiased_for_the_surrogate_gradient(float64):
    model, x, y = lif_loop()
    model.zero_grad()
    glrnet.Backprop().backward(model, x, y)
    exact = flat_grads([p.grad for p in model.parameters()])
    fg = glrnet.ForwardGradient(directions=8, generator=torch.Generator().manual_seed(0))
    samples = torch.stack([flat_grads(fg.estimate(model, x, y)[0]) for _ in range(150)])
    print(assert_means_equal(samples, exact))
    assert not means_equal(samples, 0.8 * exact)[0]
    per_layer = glrnet.ForwardGradient(directions=4, per_layer=True, generator=torch.Generator().manual_seed(1))
    print(assert_means_equal(torch.stack([flat_grads(per_layer.estimate(model, x, y)[0]) for _ in range(100)]), exact))


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_snntorch_leaky_gives_the_same_spikes_and_surrogate_gradient(reset):
    """Where snntorch is installed: its Leaky (fast sigmoid, slope 25) and ours, same weights, same sequence."""
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate
    torch.manual_seed(0)
    ours = glrnet.Leaky(5, 6, beta=0.85, threshold=0.7, reset_mechanism=reset)
    fc = nn.Linear(5, 6)
    fc.load_state_dict(ours.state_dict())
    theirs = snn.Leaky(beta=0.85, threshold=0.7, reset_mechanism=reset, spike_grad=surrogate.fast_sigmoid(25))
    x = torch.rand(4, 9, 5) * 3
    mem, spikes = theirs.init_leaky(), []
    for t in range(9):
        spk, mem = theirs(fc(x[:, t]), mem)
        spikes.append(spk)
    want = torch.stack(spikes, 1)
    got = ours(x)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(want.sum(), list(fc.parameters()))
    g2 = torch.autograd.grad(got.sum(), list(ours.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_lap_prediction_through_time(float64):
    model, x, _ = lif_loop()
    p = glrnet.predict_proba(model, x, "lap", 4000, generator=torch.Generator().manual_seed(0))
    q = glrnet.predict_proba(model, x, "lap", 4000, sampler="antithetic", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.sum(-1), torch.ones(B, dtype=p.dtype))
    assert ((p - q).abs() < 6 * math.sqrt(0.25 * 2 / 4000)).all()


def parity_task(n=64, steps=8, seed=0):
    """Which of two input channels fires more over the sequence (Bernoulli spikes at rates 0.2 / 0.5)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    rates = torch.full((n, 2), 0.2)
    rates[torch.arange(n), y] = 0.5
    x = torch.bernoulli(rates[:, None, :].expand(n, steps, 2).contiguous(), generator=g)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("method", ["glr", "glr-weight-layerwise", "es", "bptt", "forward-gradient"])
def test_a_spiking_network_learns_by_each_method(method):
    torch.manual_seed(0)
    noise = Normal(0.0, 0.3)
    model = glrnet.TimeLoop(glrnet.Leaky(2, 8, beta=0.8, threshold=0.5, noise=noise),
                            glrnet.LeakyIntegrator(8, 2, beta=0.8, noise=noise), readout="mean")
    x, y = parity_task()
    est = {"glr": glrnet.GLR(replications=32),
           "glr-weight-layerwise": glrnet.GLR(replications=32, injection="layerwise",
                                              perturbation=glrnet.Weight(Normal(0.0, 0.05))),
           "es": glrnet.ES(population=32, sigma=0.05),
           "bptt": glrnet.Backprop(),
           "forward-gradient": glrnet.ForwardGradient(directions=4)}[method]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        est.backward(model, x, y)
        opt.step()
    xt, yt = parity_task(seed=1)
    acc = (glrnet.predict(model, xt) == yt).double().mean().item()
    assert acc > 0.8, acc
