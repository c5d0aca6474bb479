"""Every extension point, proven from one file: a new sampler, control variate, noise density and
perturbation are defined here alone, registered, and run through the same checks as the built-in ones —
the fast path equals the reference on the same noise, the estimate is unbiased, a training step works,
and LAP prediction takes them. Nothing else in the library is touched to add them.

The registrations are scoped to this module (a fixture removes them after), so other test files see
only the built-in registries.
"""

import math

import pytest
import torch
from torch.distributions import Distribution, Normal, constraints

import glrnet
from glrnet.estimators import CONTROL_VARIATES, SAMPLERS, ControlVariate, Sampler, register_control_variate
from glrnet.estimators import register_sampler
from glrnet.estimators.control_variates import group_sums
from glrnet.nn import PERTURBATIONS, Activity, register_perturbation
from glrnet.nn.noise import NoiseFamily, _FAMILIES, icdf_, make_noise, register_noise, score, score_autograd
from stats import assert_means_equal, flat_grads
from test_estimator import pathwise_samples
from test_parts import Recording, record_layout_fills, replay_reference  # noqa: F401 (the fixture is used)


# ---------------------------------------------------------------------------- the four extensions
class Stratified(Sampler):
    """Latin-hypercube noise: in each group of m replications, every noise coordinate of every input takes
    one value from each of the m equal-probability strata of f (a random permutation of the strata, a
    uniform offset inside each), through f's inverse CDF. Each replication alone is exactly i.i.d. f."""

    name = "stratified"
    group_size = 4
    drawn_per_group = 8

    def fill_(self, dist, out, generator):
        k, B, W = out.shape
        m = self.group_size
        keys = torch.rand(k // m, m, B, W, generator=generator, dtype=torch.float64, device=out.device)
        strata = keys.argsort(1).to(torch.float64)
        offset = torch.rand(k // m, m, B, W, generator=generator, dtype=torch.float64, device=out.device)
        u = ((strata + offset) / m).clamp(1e-12, 1 - 1e-12).reshape(k, B, W)
        return out.copy_(icdf_(dist, u))


class ShrunkLeaveOneOut(ControlVariate):
    """w = L − β · (mean loss of the other groups' replications of the same input): leave-one-out shrunk by β.
    Any β keeps the estimate unbiased (the baseline does not depend on the replication's own noise)."""

    name = "shrunk-loo"
    min_groups = 2
    beta = 0.5

    def weights(self, losses, groups, group_size):
        K = losses.shape[0]
        return losses - self.beta * (losses.sum(0) - group_sums(losses, groups, group_size)) / (K - group_size)

    def split(self, losses, groups, group_size, replications):
        c = self.beta / (replications - group_size)
        return losses + c * group_sums(losses, groups, group_size), c


class HyperbolicSecant(Distribution):
    """f(r) = sech(π r / 2s) / 2s: symmetric, smooth, heavier tails than the Normal; variance s²."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.real
    has_rsample = False

    def __init__(self, scale, validate_args=None):
        self.scale = torch.as_tensor(float(scale))
        super().__init__(torch.Size(), validate_args=validate_args)

    @property
    def mean(self):
        return torch.zeros(())

    @property
    def stddev(self):
        return self.scale

    def log_prob(self, r):
        a = math.pi * r / (2 * self.scale)
        return -torch.log(torch.cosh(a)) - torch.log(2 * self.scale)

    def icdf(self, u):
        return (2 * self.scale / math.pi) * torch.log(torch.tan(math.pi * u / 2))

    def __repr__(self):
        return f"HyperbolicSecant(scale: {float(self.scale):g})"


def _sech_score(d, r, out=None):     # s(r) = (π / 2s) tanh(π r / 2s)
    s = float(d.scale)
    return torch.mul(r, math.pi / (2 * s), out=out).tanh_().mul_(math.pi / (2 * s))


class SharedActivity(Activity):
    """Activity noise drawn once per replication and shared by the batch (every input of replication k sees
    the same rₖ on its units): each input's marginal is the activity model's, so each input's term of the
    estimate is unchanged and unbiased; only the correlation between inputs differs."""

    name = "shared-activity"
    per_input = False

    @staticmethod
    def _expand(r, batch):
        return r[:, :1].expand(r.shape[0], batch, r.shape[-1])

    def forward(self, layer, h, r, k, batch, grad):
        return super().forward(layer, h, self._expand(r.reshape(k, -1, r.shape[-1]), batch), k, batch, grad)

    def reference_term(self, layer, h, r, w):
        return super().reference_term(layer, h, self._expand(r, w.shape[1]), w)

    def accumulate(self, layer, state, h, r, a, **kw):
        return super().accumulate(layer, state, h, self._expand(r, a.shape[1]), a, **kw)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the four extensions for this module's tests only."""
    register_sampler(Stratified)
    register_control_variate(ShrunkLeaveOneOut)
    register_noise(HyperbolicSecant, NoiseFamily("hypsecant", lambda std: HyperbolicSecant(std),
                                                 sample_=lambda d, out, g: out.copy_(icdf_(d, torch.rand(
                                                     out.shape, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12))),
                                                 score=_sech_score))
    register_perturbation(SharedActivity)
    yield
    del SAMPLERS["stratified"], CONTROL_VARIATES["shrunk-loo"], PERTURBATIONS["shared-activity"]
    del _FAMILIES[HyperbolicSecant]


def problem(perturbation="activity", noise=None, seed=0):
    """A 5-4-3 sigmoid MLP; the first layer carries the given perturbation and noise (default Normal(0, 1))."""
    torch.manual_seed(seed)
    noise = noise or Normal(0.0, 1.0)
    model = glrnet.NoisySequential(glrnet.NoisyLinear(5, 4, activation="sigmoid", noise=noise, perturbation=perturbation),
                                   glrnet.NoisyLinear(4, 3, noise=Normal(0.0, 1.0)), input_shape=(5,)).double()
    return model, torch.rand(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


CASES = {"sampler": dict(sampler="stratified"), "control variate": dict(baseline="shrunk-loo"),
         "noise": dict(noise="hypsecant"), "perturbation": dict(perturbation="shared-activity")}


def build(case, seed=0):
    kw = CASES[case]
    model, x, y = problem(kw.get("perturbation", "activity"), make_noise(kw["noise"], 1.0) if "noise" in kw else None,
                          seed)
    est = dict(sampler=kw.get("sampler", "iid"), baseline=kw.get("baseline", True))
    return model, x, y, est


# ---------------------------------------------------------------------------- the same checks as the built-ins
def test_the_registries_hold_them():
    assert "stratified" in SAMPLERS and "shrunk-loo" in CONTROL_VARIATES and "shared-activity" in PERTURBATIONS
    assert "hypsecant" in glrnet.nn.noise.kinds()


def test_the_noise_score_is_the_derivative_of_its_log_density(float64):
    d = make_noise("hypsecant", 0.7)
    r = torch.linspace(-4, 4, 81, dtype=torch.float64)
    torch.testing.assert_close(score(d, r), score_autograd(d, r))
    draws = torch.empty(200_000, dtype=torch.float64)
    glrnet.nn.noise.sample_(d, draws, torch.Generator().manual_seed(0))
    se = 0.7 / math.sqrt(len(draws))
    assert abs(draws.mean().item()) < 5 * se and abs(draws.std().item() - 0.7) < 5 * 0.7 / math.sqrt(2 * len(draws))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("budget", [1000.0, 0.0005], ids=["one-chunk", "chunks"])
def test_fast_path_equals_reference_on_the_same_noise(float64, case, budget):
    model, x, y, kw = build(case)
    rec = Recording(glrnet.estimators.get_sampler(kw["sampler"]))
    est = glrnet.GLR(replications=64, baseline=kw["baseline"], sampler=rec, memory_budget_mb=budget, prefetch=False,
                     generator=torch.Generator().manual_seed(3))
    fast, stats = est.estimate(model, x, y)
    assert stats.chunks > 1 or budget > 1
    for f, r in zip(fast, replay_reference(model, x, y, est, rec)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_against_the_pathwise_gradient(float64, case):
    model, x, y, kw = build(case)
    est = glrnet.GLR(replications=64, generator=torch.Generator().manual_seed(1), **kw)
    glr = torch.stack([flat_grads(est.estimate(model, x, y)[0]) for _ in range(400)])
    assert_means_equal(glr, pathwise_samples(model, x, y, 200, 64))


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_fills_grad_and_lowers_the_loss(float64, case):
    model, x, y, kw = build(case)
    est = glrnet.GLR(replications=256, generator=torch.Generator().manual_seed(0), **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = est.estimate(model, x, y)[1].loss.item()
    for _ in range(30):
        opt.zero_grad()
        est.backward(model, x, y)
        assert all(p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        opt.step()
    after = torch.stack([est.estimate(model, x, y)[1].loss for _ in range(5)]).mean().item()
    assert after < before - 0.05


@pytest.mark.parametrize("case", list(CASES))
def test_lap_prediction_takes_them(float64, case):
    """LAP with the case's sampler (and model) equals i.i.d. LAP within Monte Carlo error."""
    model, x, _, kw = build(case)
    K = 4000
    p = glrnet.predict_proba(model, x, "lap", K, sampler=kw["sampler"], generator=torch.Generator().manual_seed(0))
    q = glrnet.predict_proba(model, x, "lap", K, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.sum(-1), torch.ones(len(x), dtype=p.dtype))
    assert ((p - q).abs() < 6 * math.sqrt(0.25 * 2 / K)).all()


def test_a_non_chunkable_control_variate_names_the_fix(float64):
    """A control variate without ``split`` works in one chunk and says what to change when chunks are needed."""
    model, x, y = problem()
    est = glrnet.GLR(replications=64, baseline=glrnet.estimators.CenteredRanks(), memory_budget_mb=0.0005,
                     prefetch=False)
    with pytest.raises(ValueError, match="needs all 64 replications in one chunk: raise memory_budget_mb"):
        est.estimate(model, x, y)


def test_the_command_line_and_the_specs_take_whatever_the_registries_hold(tmp_path, monkeypatch):
    """``glrnet --plugin MODULE``: what the module registers is among the CLI's choices; a spec accepts it."""
    import json

    from glrnet.cli import main
    from glrnet.experiments import load_spec
    (tmp_path / "my_plugin.py").write_text(
        "from glrnet.estimators import register_control_variate, register_sampler\n"
        "from test_extensions import ShrunkLeaveOneOut, Stratified\n"
        "register_sampler(Stratified)\nregister_control_variate(ShrunkLeaveOneOut)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["--plugin", "my_plugin", "train", "--dataset", "digits", "--hidden", "8", "--epochs", "1",
                 "--replications", "16", "--sampler", "stratified", "--control-variate", "shrunk-loo",
                 "--lap-replications", "8", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["sampler"] == "stratified" and config["baseline"] == "shrunk-loo"
    spec = tmp_path / "s.toml"
    spec.write_text('[experiment]\nname = "s"\n[[datasets]]\nname = "digits"\ndataset = "digits"\n'
                    '[[models]]\nname = "m"\nsampler = "stratified"\nbaseline = "shrunk-loo"\nperturb = "all=flipout"\n'
                    '[certify]\nradii = [0.25]\n')
    load_spec(spec)
    spec.write_text(spec.read_text().replace('"shrunk-loo"', '"no-such-variate"'))
    with pytest.raises(ValueError, match="unknown control variate 'no-such-variate'"):
        load_spec(spec)
