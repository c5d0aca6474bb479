"""Certified radii: the first layer held at a fixed scale (stiefel / spectral projections),
input-space smoothing as a glrnet network, the L2 threat model of the attack protocol, the
majority-vote predictor, and the certified-radii experiment with its soundness check."""

import math
from pathlib import Path

import pytest
import torch

import glrnet
from glrnet.robustness.settings import AttackSettings
from glrnet.robustness.attacks import distance, fgsm, pgd, project
from glrnet.certify import certify, first_layer_norm, project_stiefel_
from glrnet.train import TrainConfig, build_model, input_smoothing_layer

SPECS = Path(glrnet.__file__).parent / "specs"


def test_stiefel_projection_sets_every_singular_value_and_is_the_nearest_such_matrix():
    torch.manual_seed(0)
    layer = glrnet.NoisyLinear(30, 7)
    w0 = layer.weight.detach().clone()
    before = project_stiefel_(layer, 3.0)
    s = torch.linalg.svdvals(layer.weight.double())
    torch.testing.assert_close(s, torch.full_like(s, 3.0))
    assert before == pytest.approx(torch.linalg.matrix_norm(w0.double(), 2).item())
    # nearest: no other matrix with all singular values 3 (a random one, rotated) is closer to w0
    d = (layer.weight - w0).norm()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(30, 7, generator=g))
        assert (3.0 * q.T - w0).norm() >= d
    w1 = layer.weight.detach().clone()
    project_stiefel_(layer, 3.0)            # idempotent
    torch.testing.assert_close(layer.weight, w1, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="linear first layer"):
        project_stiefel_(glrnet.NoisyConv2d(1, 2, 3), 1.0)


def test_input_smoothing_network_certifies_in_units_of_the_input_noise():
    """The frozen identity with its own noise N(0, σ_in²) makes the certificate's σ/‖W₁‖₂ exactly σ_in,
    while the later layers keep the neuron noise σ; the next layer sees x + r, r ~ N(0, σ_in²)."""
    cfg = TrainConfig(dataset="digits", hidden=[5], noise_std=2.0, input_noise_std=0.5, method="bp", bp_noise=True)
    model = build_model(cfg.validate(), (64,), 10)
    assert not model[0].weight.requires_grad and first_layer_norm(model[0], (64,)) == pytest.approx(1.0)
    assert [float(m.noise.stddev) for m in model.noisy_layers] == [0.5, 2.0, 2.0]
    x = torch.rand(3, 64)
    cert = certify(model, x, n0=10, n=50, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert cert.sigma / cert.first_layer_norm == pytest.approx(0.5)
    r = glrnet.nn.sample_noise(model, 20000, 1, generator=torch.Generator().manual_seed(1))[:, 0, :64]
    seen = input_smoothing_layer(64, 0.5).affine(x[:1]) + r - x[:1]
    assert seen.std().item() == pytest.approx(0.5, rel=5 / math.sqrt(2 * r.numel()))
    with pytest.raises(ValueError, match="input noise std"):
        TrainConfig(arch="lenet", input_noise_std=0.5).validate()
    with pytest.raises(ValueError, match="stiefel' needs max first norm"):
        TrainConfig(first_norm_projection="stiefel").validate()


def test_bounded_training_keeps_the_projection_and_the_frozen_layer(tmp_path):
    from glrnet.checkpoint import load_model
    from glrnet.train import train
    common = dict(dataset="digits", subset=300, epochs=1, replications=20, eval_replications=5, lap_replications=20)
    train(TrainConfig(**common, max_first_norm=2.0, first_norm_projection="stiefel"), tmp_path / "s", quiet=True)
    model, _ = load_model(tmp_path / "s" / "model.safetensors")
    s = torch.linalg.svdvals(model[0].weight.double())
    torch.testing.assert_close(s, torch.full_like(s, 2.0), atol=1e-4, rtol=1e-4)
    train(TrainConfig(**common, method="bp", bp_noise=True, input_noise_std=0.5, noise_std=2.0, lr=0.01),
          tmp_path / "i", quiet=True)
    model, _ = load_model(tmp_path / "i" / "model.safetensors")
    torch.testing.assert_close(model[0].weight, torch.eye(64))   # trained through, never changed


def test_l2_attacks_stay_in_the_ball_and_fgsm_steps_along_the_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 3))
    x, y = torch.rand(16, 20), torch.randint(0, 3, (16,))
    for eps in (0.1, 1.0):
        for adv in (fgsm(net, x, y, eps, norm="L2"), pgd(net, x, y, eps, steps=10, norm="L2")):
            assert (distance(adv, x, "L2") <= eps * (1 + 1e-5)).all() and adv.min() >= 0 and adv.max() <= 1
    # away from the box, L2 FGSM moves exactly ε along the normalised gradient
    xc = torch.full((4, 20), 0.5)
    adv = fgsm(net, xc, y[:4], 0.2, norm="L2")
    torch.testing.assert_close(distance(adv, xc, "L2"), torch.full((4,), 0.2))
    g = torch.autograd.functional.jacobian(lambda z: torch.nn.functional.cross_entropy(net(z), y[:4],
                                                                                       reduction="sum"), xc)
    cos = torch.nn.functional.cosine_similarity(adv - xc, g, dim=1)
    torch.testing.assert_close(cos, torch.ones(4))
    z = project(x + 3.0, x, 0.5, "L2")
    assert (distance(z, x, "L2") <= 0.5 + 1e-6).all()
    with pytest.raises(ValueError, match="norm must be one of"):
        AttackSettings(norm="L1")


def test_vote_predictor_counts_noisy_argmaxes():
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([6, 8, 3], activation="threshold", noise=torch.distributions.Normal(0.0, 1.0))
    x = torch.rand(10, 6)
    p = glrnet.predict_proba(model, x, "vote", 400, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.sum(1), torch.ones(10))
    assert ((p * 400) - (p * 400).round()).abs().max() < 1e-4     # counts over 400 passes
    quiet = glrnet.NoisyMLP([6, 8, 3], activation="threshold", noise=torch.distributions.Normal(0.0, 1e-6))
    quiet.load_state_dict(model.state_dict())
    assert torch.equal(glrnet.predict(quiet, x, "vote", 20), glrnet.predict(quiet, x, "ot"))


def _smoke_spec(tmp_path) -> Path:
    text = (Path(__file__).parent / "data" / "certified-smoke.toml").read_text()
    path = tmp_path / "smoke.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_certified_spec_runs_end_to_end_with_a_soundness_line_in_every_report(tmp_path, capsys):
    from glrnet.cli import main
    out = tmp_path / "out"
    assert main(["reproduce", "--spec", str(_smoke_spec(tmp_path)), "--out", str(out), "--quiet"]) == 0
    text = (out / "certified.md").read_text()
    assert "| glr-threshold-c4 | vote |" in text and "| smooth-0.5 | lap |" in text and "Soundness:" in text
    report = (out / "robustness.md").read_text()      # one dataset: its files in --out itself
    for model in ("glr-threshold-c4", "smooth-0.5"):
        for predictor in ("vote", "lap"):
            assert f"| {model} | sound: no image certified at radius ≥ ε ({predictor})" in report
    assert "L2 ball of radius ε" in report and (out / "certified_accuracy.png").exists()
    rows = (out / "robustness.csv").read_text().splitlines()
    assert rows[0].split(",")[:7] == ["model", "attack", "eps", "acc_ot", "acc_lap", "acc_vote", "images"]


def test_soundness_check_fails_when_a_certified_image_is_broken():
    from glrnet.experiments.certified import soundness_checks
    from glrnet.certify import Certificate
    y = torch.tensor([0, 1, 2])
    cert = Certificate(torch.tensor([0, 1, -1]), torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64),
                       torch.zeros(3), torch.zeros(3), 1.0, 1.0, "vote", 0.001, 100)
    masks = {("m", 0.5): {"vote": torch.tensor([False, False, False])}}
    (check,) = soundness_checks("m", {"vote": cert}, y, masks, {}, [0.5])
    assert not check["pass"] and check["broken"] == 1 and check["certified"] == 1
    masks = {("m", 0.5): {"vote": torch.tensor([True, False, False])}}
    (check,) = soundness_checks("m", {"vote": cert}, y, masks, {}, [0.5])
    assert check["pass"]


def test_certified_spec_is_checked_before_anything_runs(tmp_path):
    from glrnet.experiments import load_spec
    spec = load_spec(SPECS / "certified.toml")
    assert [d.dataset for d in spec.datasets] == ["mnist", "fashion-mnist"] and spec.certify.radii == [0.25, 0.5, 1.0, 1.5]
    bad = tmp_path / "bad.toml"
    bad.write_text((SPECS / "certified.toml").read_text().replace("samples = 10000", "sampels = 10000"))
    with pytest.raises(ValueError, match=r"\[certify\]: unknown key 'sampels'; valid: models, radii, n0, samples"):
        load_spec(bad)
    bad.write_text((SPECS / "certified.toml").read_text().replace('first_norm_projection = "stiefel"\n',
                                                                  'first_norm_projection = "stifel"\n', 1))
    with pytest.raises(ValueError, match=r"\[\[models\]\] 'glr-threshold-01-s1' on mnist-seed: unknown first norm"):
        load_spec(bad)
    bad.write_text((SPECS / "certified.toml").read_text().replace('norm = "L2"', 'norm = "L1"'))
    with pytest.raises(ValueError, match=r"\[robustness\]: attack setting norm must be one of Linf, L2"):
        load_spec(bad)
