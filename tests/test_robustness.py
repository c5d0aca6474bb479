"""Attacks: they break an undefended network; the gradient oracles agree with analytic ones."""

import math

import pytest
import torch

import glrnet
from glrnet.robustness import surrogates
from glrnet.robustness.attacks import fgsm, pgd
from glrnet.robustness import (AttackSettings, LAPClassifier, ProtocolSettings, attack_forward, attack_model,
                               attack_plan, lr_input_jacobian, smoothed_derivative, surrogates_for)
from glrnet.train import TrainConfig, train
from stats import assert_means_equal


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    from glrnet.checkpoint import load_model
    from glrnet.data import load_dataset
    root = tmp_path_factory.mktemp("models")
    train(TrainConfig(method="bp", epochs=6, lr=0.02), root / "bp", quiet=True)
    train(TrainConfig(epochs=3, replications=200), root / "glr", quiet=True)
    train(TrainConfig(epochs=3, replications=200, activation="threshold", baseline=True), root / "thr", quiet=True)
    data = load_dataset("digits")
    return (load_model(root / "bp" / "model.safetensors")[0], load_model(root / "glr" / "model.safetensors")[0],
            data.x_test[:60], data.y_test[:60], load_model(root / "thr" / "model.safetensors")[0])


@pytest.mark.slow
def test_every_attack_breaks_the_bp_network_at_large_eps(digits_models):
    bp, _, x, y, _ = digits_models
    assert (bp(x).argmax(1) == y).double().mean() > 0.85
    st = AttackSettings(steps=10, eot_samples=1, spsa_samples=32, spsa_steps=10, random_draws=4)
    res = attack_model(bp, False, x, y, 0.3, st, source=bp)
    for attack in ("transfer-fgsm", "fgsm", "apgd-ce[exact]", "apgd-dlr[exact]", "spsa", "worst-case"):
        acc = res[attack]["ot"].double().mean().item()
        assert acc <= 0.1, (attack, acc)
    assert res["random"]["ot"].double().mean() > 0.3  # random corners are no attack: a control


def test_white_box_attacks_break_the_lap_predictor_at_large_eps(digits_models):
    _, glr_model, x, y, _ = digits_models
    st = AttackSettings(steps=10, eot_samples=8, lr_samples=128, lap_replications=200)
    res = attack_model(glr_model, True, x, y, 0.3, st, attacks=["apgd-ce[exact]", "apgd-dlr[lr]"])
    for attack in ("apgd-ce[exact]", "apgd-dlr[lr]"):
        assert res[attack]["lap"].double().mean() <= 0.1, attack


@pytest.mark.slow
def test_every_surrogate_attack_runs_on_a_threshold_network_and_the_worst_case_is_their_union(digits_models):
    *_, x, y, thr = digits_models
    assert surrogates_for(thr) == ["gauss", "sigmoid:1", "sigmoid:4", "sigmoid:8", "ste", "lr"]
    st = AttackSettings(steps=5, eot_samples=4, lr_samples=64, spsa_samples=8, spsa_steps=3, random_draws=2,
                        lap_replications=100)
    res = attack_model(thr, True, x, y, 0.1, st)
    assert set(res) == set(attack_plan(thr, True, st)) | {"worst-case"}
    union = torch.ones_like(y, dtype=torch.bool)
    for name, r in res.items():
        if name != "worst-case":
            union &= r["lap"]
    assert torch.equal(res["worst-case"]["lap"], union)
    clean = (glrnet.predict(thr, x, "lap", 100) == y).double().mean()
    assert res["worst-case"]["lap"].double().mean() < clean


def test_lap_classifier_is_an_ordinary_module_for_attack_libraries(digits_models):
    """torchattacks' APGD, given the wrapper and 4-D images, breaks the noisy predictor at ε = 0.3."""
    torchattacks = pytest.importorskip("torchattacks")
    _, glr_model, x, y, _ = digits_models
    clf = LAPClassifier(glr_model, samples=16, generator=torch.Generator().manual_seed(0))
    assert isinstance(clf, torch.nn.Module) and clf(x.reshape(-1, 1, 8, 8)).shape == (len(x), 10)
    x_adv = torchattacks.APGD(clf, eps=0.3, steps=10, loss="ce")(x.reshape(-1, 1, 8, 8), y)
    acc = (glrnet.predict(glr_model, x_adv.reshape(len(x), -1), "lap", 200) == y).double().mean()
    assert acc <= 0.1 and (x_adv.reshape(len(x), -1) - x).abs().max() <= 0.3 + 1e-6


def one_hidden_threshold(seed=0):
    torch.manual_seed(seed)
    model = glrnet.NoisyMLP([5, 4, 3], activation="threshold")
    return model, torch.rand(6, 5), torch.randn(3)


def analytic_grad(model, x, c):
    """∇ₓ E[c · output] = W₀ᵀ diag(φ(z/σ)/σ) W₁ᵀ c for E[out] = W₁ Φ(z/σ) + b₁, z = W₀x + b₀."""
    sigma = model.noise.stddev.item()
    z = model.layers[0].affine(x)
    dens = torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (dens * (c @ model.layers[1].weight)) @ model.layers[0].weight


def test_bpda_eot_gradient_equals_the_analytic_smoothed_gradient(float64):
    """One threshold layer under N(0, σ²): E[step(z + r)] = Φ(z/σ), so the BPDA-EOT gradient is exact."""
    model, x, c = one_hidden_threshold()
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        noise = glrnet.nn.sample_noise(model, 64, 6, generator=torch.Generator().manual_seed(0))
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
    from glrnet.robustness.surrogates import _GH
    bound = max(w * math.sqrt(2) * abs(t) / (2.0 * math.sqrt(math.pi)) for t, w in zip(*_GH))
    assert (approx - exact).abs().max() <= bound, bound
    # a smooth φ: quadrature equals E[φ'(z + r)] (pathwise), computed by Monte Carlo
    r = torch.randn(200000, generator=torch.Generator().manual_seed(0)) * 2.0
    sig = glrnet.get_activation("sigmoid")
    mc = torch.stack([(torch.sigmoid(zi + r) * (1 - torch.sigmoid(zi + r))).mean() for zi in z[::10]])
    torch.testing.assert_close(smoothed_derivative(sig, z[::10], 2.0), mc, atol=2e-3, rtol=0)


def _input_grad(clf, x, y):
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(xr), y, reduction="sum"), xr)
    return g


def test_lap_classifier_gradients_agree_across_surrogates_for_a_smooth_network(float64):
    """For a smooth network the pathwise (exact) and likelihood-ratio gradients of −log p̄_y estimate
    the same quantity; two independent pathwise estimates agree with each other too."""
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([5, 4, 3])
    x, y = torch.rand(3, 5), torch.tensor([0, 1, 2])
    g1 = _input_grad(LAPClassifier(model, 20000, "exact", generator=torch.Generator().manual_seed(0)), x, y)
    g2 = _input_grad(LAPClassifier(model, 20000, "exact", generator=torch.Generator().manual_seed(1)), x, y)
    g3 = _input_grad(LAPClassifier(model, 200000, "lr", generator=torch.Generator().manual_seed(2)), x, y)
    scale = g1.abs().max()
    assert (g1 - g2).abs().max() < 0.1 * scale
    assert (g1 - g3).abs().max() < 0.2 * scale


def test_surrogate_backward_passes():
    """Forward is φ exactly for every surrogate; backward is the named derivative."""
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([3, 4, 2], activation="threshold")
    x = torch.rand(5, 3)
    noise = glrnet.nn.sample_noise(model, 5, generator=torch.Generator().manual_seed(0))
    for s in ("gauss", "sigmoid:1", "sigmoid:4", "ste"):
        torch.testing.assert_close(attack_forward(model, x, noise, s), model(x, noise=noise))
    v = torch.linspace(-3, 3, 7)
    for s, expect in (("ste", torch.ones(7)), ("sigmoid:4", 4 * torch.sigmoid(4 * v) * (1 - torch.sigmoid(4 * v)))):
        vr = v.clone().requires_grad_(True)
        out = surrogates._Surrogate.apply(vr, v, model.activation, surrogates.derivative(model, s)(model.activation))
        (g,) = torch.autograd.grad(out.sum(), vr)
        torch.testing.assert_close(g, expect)
    with pytest.raises(ValueError, match="unknown surrogate"):
        attack_forward(model, x, noise, "nonsense")


def test_pgd_respects_the_budget_and_the_pixel_range():
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([6, 5, 3], activation="relu")
    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    for attack in (lambda: pgd(model, x, y, 0.1, steps=5), lambda: fgsm(model, x, y, 0.1)):
        xa = attack()
        assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1


@pytest.mark.slow
def test_escalation_attacks_only_survivors_and_never_revives_a_broken_image(digits_models, monkeypatch):
    *_, x, y, thr = digits_models
    import glrnet.robustness.protocol as rb
    st = AttackSettings(steps=2, eot_samples=2, lr_samples=16, spsa_samples=4, spsa_steps=1, random_draws=1,
                        lap_replications=50, losses=("ce",), max_doublings=3)
    alive = attack_model(thr, True, x, y, 0.1, st)["worst-case"]["lap"]
    seen = []
    real = rb.attack_model
    monkeypatch.setattr(rb, "attack_model", lambda m, n, xs, *a, **k: seen.append(len(xs)) or real(m, n, xs, *a, **k))
    esc = rb.escalate(thr, True, x, y, 0.1, st, alive, tolerance=-1.0)        # never converged: every level runs
    levels = esc.levels
    assert [m for m, _ in levels] == [2, 4, 8]
    path = [alive.double().mean().item()] + [a for _, a in levels]
    assert all(b <= a for a, b in zip(path, path[1:])), path                 # a union only shrinks
    assert seen[0] == int(alive.sum()) and all(b <= a for a, b in zip(seen, seen[1:])), seen
    assert path[-1] < path[0]                                                # 8× the effort breaks more of them
    assert esc.alive.double().mean().item() == path[-1] and not (esc.alive & ~alive).any()
    assert len(rb.escalate(thr, True, x, y, 0.1, st, alive, tolerance=1.0).levels) == 1   # stops at the first level


def test_attack_settings_name_a_bad_value():
    with pytest.raises(ValueError, match="max_doublings must be ≥ 1, got 0"):
        AttackSettings(max_doublings=0)


@pytest.mark.slow
def test_an_interrupted_protocol_resumes_from_its_journal_with_the_uninterrupted_figures(digits_models, tmp_path,
                                                                                          monkeypatch):
    """Each finished attack is on disk at once; a resumed run replays them (not recomputing one)
    and ends with the same robustness.csv as a run in one sitting, escalation included."""
    from dataclasses import replace

    import glrnet.robustness.attacks as atk
    from glrnet.robustness.protocol import attack_and_report
    bp, _, x, y, thr = digits_models
    st = AttackSettings(steps=2, eot_samples=2, lr_samples=16, spsa_samples=4, spsa_steps=1, random_draws=1,
                        lap_replications=50, losses=("ce",), max_doublings=1)
    settings = ProtocolSettings((0.1, 0.3), headline=0.1, attacks=st)
    args = ({"thr": (thr, True)}, x[:30], y[:30], settings, bp)
    attack_and_report(tmp_path / "once", *args, quiet=True, resume=False)

    real, calls = dict(atk.ATTACKS), []
    def counting(family, stop_at=None):
        def fn(*a):
            calls.append(family)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real[family](*a)
        return fn
    for family in real:                        # stopped in the 1× stage's second ε
        monkeypatch.setitem(atk.ATTACKS, family, counting(family, stop_at=len(attack_plan(thr, True, st)) + 4))
    with pytest.raises(KeyboardInterrupt):
        attack_and_report(tmp_path / "cut", *args, quiet=True, resume=False)
    done = len(calls) - 1
    with pytest.raises(ValueError, match="robustness_journal.safetensors records an earlier run's attacks: "
                                         "pass --resume"):
        attack_and_report(tmp_path / "cut", *args, quiet=True, resume=False)
    with pytest.raises(ValueError, match="recorded with other settings"):
        attack_and_report(tmp_path / "cut", *args[:3], replace(settings, attacks=AttackSettings(steps=3)), bp,
                          quiet=True, resume=True)
    calls.clear()
    for family in real:
        monkeypatch.setitem(atk.ATTACKS, family, counting(family))
    attack_and_report(tmp_path / "cut", *args, quiet=True, resume=True)
    resumed = len(calls)
    calls.clear()
    attack_and_report(tmp_path / "again", *args, quiet=True, resume=None)   # no journal: the same run
    assert resumed == len(calls) - done                                      # no recorded attack ran again
    assert (tmp_path / "cut" / "robustness.csv").read_text() == (tmp_path / "once" / "robustness.csv").read_text()
    assert (tmp_path / "again" / "robustness.csv").read_text() == (tmp_path / "once" / "robustness.csv").read_text()
    assert done > 0 and not (tmp_path / "again" / "robustness_journal.safetensors").exists()
    import csv

    from glrnet.robustness.journal import survivors
    rows = list(csv.DictReader(open(tmp_path / "once" / "robustness.csv")))
    last = [r for r in rows if r["model"] == "thr" and r["attack"].startswith("worst-case") and r["eps"] == "0.1"][-1]
    alive = survivors(tmp_path / "cut" / "robustness_journal.safetensors", "thr", 0.1)   # the escalated worst case
    assert last["attack"] != "worst-case" and alive.double().mean().item() == pytest.approx(float(last["acc_lap"]))
    calls.clear()                                      # a higher limit on doublings resumes too: only new levels run
    rows = attack_and_report(tmp_path / "cut", *args[:3], replace(settings, attacks=replace(st, max_doublings=2)), bp,
                             quiet=True, resume=True).rows
    base = [r for r in rows if r["model"] == "thr" and r["attack"] == "worst-case" and r["eps"] == 0.1][0]
    assert last["attack"] == "worst-case 2×" and float(last["acc_lap"]) > 0   # the first run stopped at its limit,
    assert float(base["acc_lap"]) - float(last["acc_lap"]) > 0.01               # not converged
    assert 0 < len(calls) <= len(attack_plan(thr, True, st)) + 1                # so 4× runs, and only 4×
    assert "worst-case 4×" in {r["attack"] for r in rows if r["eps"] == 0.1}


@pytest.mark.slow
def test_journals_of_separate_processes_merge_into_one_report(digits_models, tmp_path, monkeypatch):
    """The protocol split over two processes (one model each) and merged gives the one-process report,
    running no attack again; a journal of other settings is refused."""
    import glrnet.robustness.attacks as atk
    from glrnet.robustness.journal import JOURNAL, merge_journals
    from glrnet.robustness.protocol import attack_and_report
    bp, glr_model, x, y, thr = digits_models
    st = AttackSettings(steps=2, eot_samples=2, lr_samples=16, spsa_samples=4, spsa_steps=1, random_draws=1,
                        lap_replications=50, losses=("ce",), max_doublings=1)
    both = {"thr": (thr, True), "glr": (glr_model, True)}
    rest = (x[:20], y[:20], ProtocolSettings((0.1,), attacks=st), bp)
    attack_and_report(tmp_path / "one", both, *rest, quiet=True, resume=False)
    attack_and_report(tmp_path / "a", {"thr": both["thr"]}, *rest, quiet=True, resume=False)
    attack_and_report(tmp_path / "b", {"glr": both["glr"]}, *rest, quiet=True, resume=False)
    assert merge_journals([tmp_path / "a" / JOURNAL, tmp_path / "b" / JOURNAL], tmp_path / "m" / JOURNAL) > 0
    calls = []
    for family, fn in dict(atk.ATTACKS).items():
        monkeypatch.setitem(atk.ATTACKS, family, lambda *a, fn=fn, family=family: calls.append(family) or fn(*a))
    attack_and_report(tmp_path / "m", both, *rest, quiet=True, resume=True)
    assert calls == []
    assert (tmp_path / "m" / "robustness.csv").read_text() == (tmp_path / "one" / "robustness.csv").read_text()
    attack_and_report(tmp_path / "c", {"thr": both["thr"]}, x[:20], y[:20],
                      ProtocolSettings((0.1,), attacks=replace_seed(st)), bp, quiet=True, resume=False)
    with pytest.raises(ValueError, match="recorded with other settings than .*: not merged"):
        merge_journals([tmp_path / "a" / JOURNAL, tmp_path / "c" / JOURNAL], tmp_path / "n" / JOURNAL)


def replace_seed(st):
    from dataclasses import replace
    return replace(st, seed=st.seed + 1)


@pytest.mark.parametrize("site", ["weight", "channel"])
def test_gauss_surrogate_smooths_a_weight_noise_layer_with_the_noise_it_causes(float64, site):
    """On a weight-site layer the pre-activation noise is e·(x, 1), of std σ_w‖(x, 1)‖, not σ_w: the
    Gaussian surrogate smooths with the measured v − z (with σ_w = 0.05 alone its derivative vanished
    a few σ_w from the threshold: the attack was masked on every weight-noise network). A channel site
    perturbs one unit per replication: the scale is that of the perturbed entries, not the layer's mean
    (which is √3 too small here)."""
    from torch.distributions import Normal

    from glrnet.nn.activations import threshold
    from glrnet.robustness.surrogates import derivative
    layer = glrnet.NoisyLinear(4, 3, activation="threshold", noise=Normal(0.0, 0.05), site=site)
    sigma = 0.05 * math.sqrt(4 * 2.0 ** 2 + 1)                     # input x = (2, 2, 2, 2): ‖(x, 1)‖ = √17
    n = 4000
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(n, 3, generator=gen) * sigma
    if site == "channel":                                           # replication k moves unit cₖ only
        e = e * torch.nn.functional.one_hot(torch.randint(3, (n,), generator=gen), 3)
    z = torch.tensor([[0.1, -0.3, 0.5]]).expand(n, 3)
    d = derivative(glrnet.NoisySequential(layer), "gauss")(layer)(z + e, z)[0]
    want = smoothed_derivative(threshold, z[0], sigma)
    # the RMS of m nonzero draws has relative sd 1/√(2m); the density's relative change is |z²/σ² − 1| times that
    m = e.ne(0).sum().item()
    tol = 4 * (z[0] ** 2 / sigma ** 2 - 1).abs() / math.sqrt(2 * m) + 1e-9
    assert ((d - want).abs() / want <= tol).all(), (d, want, tol)
    assert smoothed_derivative(threshold, z[0], 0.05)[2] < 1e-20 < want[2]    # what σ_w alone gave at z = 0.5
    if site == "channel":                                           # what the layer-wide RMS gave (attacks v3)
        old = smoothed_derivative(threshold, z[0], e.pow(2).mean().sqrt())
        assert ((old - want).abs() / want > tol).any(), (old, want, tol)


def test_targeted_apgd_outside_the_plan_breaks_the_bp_network_and_names_its_loss(digits_models):
    from glrnet.robustness.attacks import AttackContext, distance, resolve_attack
    bp, _, x, y, _ = digits_models
    st = AttackSettings(steps=10, eot_samples=1)
    fn, arg = resolve_attack("apgdt-dlr[exact]")
    ctx = AttackContext(bp, False, st, None, torch.Generator().manual_seed(0), 0)
    xa = fn(ctx, x, y, 0.3, arg)
    assert distance(xa, x, "Linf").max() <= 0.3 + 1e-5 and xa.min() >= 0 and xa.max() <= 1
    assert (bp(xa).argmax(1) == y).double().mean() <= 0.1
    with pytest.raises(ValueError, match=r"apgdt-dlr\[<surrogate>\]"):
        fn(ctx, x, y, 0.3, "ce[exact]")


# ------------------------------------------------------------------------- the protocol on any module with noisy layers
FAST = AttackSettings(steps=2, eot_samples=2, lr_samples=8, spsa_samples=4, spsa_steps=1, spsa_queries_k=4,
                      random_draws=1, lap_replications=20, losses=("ce",), max_doublings=1)


@pytest.fixture
def one_thread():
    """Models of a few units: one thread is faster, and on a busy machine much faster, than several."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class OwnNet(torch.nn.Module):
    """A user's module: images in, its own forward (not a walk over a sequence of modules)."""

    def __init__(self):
        super().__init__()
        from torch.distributions import Normal
        self.a = glrnet.NoisyLinear(6, 8, activation="sigmoid", noise=Normal(0.0, 0.3))
        self.b = glrnet.NoisyLinear(8, 3, noise=Normal(0.0, 0.3))

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(h - h.mean(-1, keepdim=True))


def plain_sequential():
    from torch.distributions import Normal
    return torch.nn.Sequential(glrnet.NoisyLinear(6, 8, activation="threshold", noise=Normal(0.0, 0.3)),
                               glrnet.NoisyLinear(8, 3, noise=Normal(0.0, 0.3)))


def spiking_loop():
    from torch.distributions import Normal
    return glrnet.TimeLoop(glrnet.Leaky(4, 6, noise=Normal(0.0, 0.3)),
                           glrnet.LeakyIntegrator(6, 3, noise=Normal(0.0, 0.3)), readout="last")


def check_protocol_result(result, name, settings, x):
    """What every run of the protocol returns: masks per (model, ε), worst case ≤ clean, escalation monotone."""
    from glrnet.robustness import ProtocolResult
    assert isinstance(result, ProtocolResult)
    clean = result.masks[name, 0.0]
    assert set(clean) == {"ot", "lap"} and all(m.shape == (len(x),) and m.dtype == torch.bool for m in clean.values())
    for eps in settings.grid:
        worst = result.masks[name, eps]
        assert worst["lap"].double().mean() <= clean["lap"].double().mean() + 0.25   # LAP scoring is itself random
        assert worst["ot"].double().mean() <= clean["ot"].double().mean()
    alive = result.escalated[name, settings.headline]
    assert not (alive & ~result.masks[name, settings.headline]["lap"]).any()   # escalation only breaks more images
    path = [r["acc_lap"] for r in result.rows if r["model"] == name and r["eps"] == settings.headline
            and r["attack"].startswith("worst-case")]
    assert len(path) >= 2 and all(b <= a for a, b in zip(path, path[1:])), path
    conv = [c for c in result.checks if c["model"] == name and "escalated" in c]
    assert len(conv) == 1 and conv[0]["escalated"] == pytest.approx(alive.double().mean().item())


@pytest.mark.parametrize("build, shape, skipped", [
    (plain_sequential, (6,), {}),
    (OwnNet, (1, 2, 3), {"moments": "walks the modules of an nn.Sequential"}),
    (spiking_loop, (5, 4), {"lr": "applied at every time step", "mean": "time step", "moments": "time step"}),
], ids=["nn.Sequential", "own module", "TimeLoop"])
def test_the_protocol_serves_any_module_with_noisy_layers(build, shape, skipped, tmp_path, one_thread):
    """The public entry point on a plain nn.Sequential of noisy layers, a module of one's own (images in) and a
    spiking TimeLoop (sequences in): every attack of the plan runs, the surrogates that do not apply are left
    out with their reason, and the returned result holds the masks the reports were written from."""
    from glrnet.robustness import attack_and_report, plan_attacks
    torch.manual_seed(0)
    model = build()
    x = torch.rand(6, *shape)
    with torch.no_grad():
        y = model(x).argmax(-1)                  # the model's own predictions: every image correct to begin with
    settings = ProtocolSettings((0.1, 0.3), headline=0.1, attacks=FAST)
    plan = plan_attacks(model, True, FAST, x)
    assert plan.skipped.keys() == skipped.keys()
    assert all(why in plan.skipped[what] for what, why in skipped.items())
    result = attack_and_report(tmp_path, {"net": model}, x, y, settings, quiet=True)
    assert {r["attack"] for r in result.rows if r["eps"] == 0.1} >= set(plan.attacks) | {"worst-case"}
    check_protocol_result(result, "net", settings, x)
    assert result.skipped == {"net": plan.skipped}
    report = (tmp_path / "robustness.md").read_text()
    assert all(f"| net | {what} |" in report for what in skipped)


def test_evaluate_escalate_and_check_return_their_results(one_thread):
    """The protocol's steps called one by one: each returns its results (no dictionary to fill)."""
    from glrnet.robustness import ChecksResult, RobustnessResult, evaluate_robustness, sanity_checks
    torch.manual_seed(1)
    model = plain_sequential()
    x = torch.rand(5, 6)
    y = model(x).argmax(-1).detach()
    settings = ProtocolSettings((0.2,), attacks=FAST)
    robust = evaluate_robustness({"m": (model, True)}, x, y, settings, quiet=True)
    assert isinstance(robust, RobustnessResult) and robust.defended == {"m": "lap"}
    assert torch.equal(robust.survivors("m", 0.2), robust.masks["m", 0.2]["lap"])
    assert [r["attack"] for r in robust.rows][:2] == ["none", "fgsm"]
    checked = sanity_checks({"m": (model, True)}, robust, x, y, settings, quiet=True)
    assert isinstance(checked, ChecksResult) and set(checked.escalated) == {("m", 0.2)}
    assert [r["attack"] for r in checked.rows][0] == "worst-case 2×" and len(checked.checks) >= 3


def test_protocol_settings_name_a_bad_field_in_one_line():
    from glrnet.robustness import ProtocolSettings
    for make, message in [
            (lambda: ProtocolSettings(eps=()), "protocol setting eps must be a non-empty list of budgets, got ()"),
            (lambda: ProtocolSettings(eps=(0.1, 1.5)), "protocol setting eps = 1.5: an L∞ budget"),
            (lambda: ProtocolSettings(headline=0.0), "protocol setting headline = 0: an L∞ budget"),
            (lambda: ProtocolSettings(check_eps=(-0.1,)), "protocol setting check_eps = -0.1: an L∞ budget"),
            (lambda: ProtocolSettings(check_eps=0.1), "protocol setting check_eps must be a non-empty list"),
            (lambda: ProtocolSettings(attacks={"steps": 3}), "protocol setting attacks must be an AttackSettings"),
            (lambda: ProtocolSettings((3.0,), attacks=AttackSettings(norm="L2")).validate(4),
             "protocol setting eps = 3: an L2 budget above the diagonal √d = 2"),
            (lambda: AttackSettings(steps=0), "attack setting steps must be ≥ 1, got 0")]:
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    s = ProtocolSettings((0.3, 0.1), check_eps=(0.2,))
    assert s.headline == 0.1 and s.grid == [0.1, 0.2, 0.3] and s.escalated_eps == (0.2,)


def test_bpda_surrogates_reach_a_threshold_layer_applied_at_every_time_step(one_thread):
    """Through time the noise is drawn step by step; a surrogate keeps the forward exact (the same noise gives
    the same outputs) and gives the step units a gradient."""
    from torch.distributions import Normal

    from glrnet.robustness import noisy_attack_forward
    torch.manual_seed(0)
    loop = glrnet.TimeLoop(glrnet.NoisyLinear(4, 6, activation="threshold", noise=Normal(0.0, 0.3)),
                           glrnet.LeakyIntegrator(6, 3, noise=Normal(0.0, 0.3)), readout="last")
    x = torch.rand(3, 5, 4)
    assert surrogates_for(loop, x) == ["gauss", "sigmoid:1", "sigmoid:4", "sigmoid:8", "ste"]
    exact = noisy_attack_forward(loop, x, 4, "exact", torch.Generator().manual_seed(0))
    for s in ("gauss", "sigmoid:4", "ste"):
        xr = x.clone().requires_grad_(True)
        out = noisy_attack_forward(loop, xr, 4, s, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, exact)
        (g,) = torch.autograd.grad(out[..., 0].sum(), xr)
        assert g.abs().sum() > 0, s
