"""PyTorch's conventions, checked by running them: what train() / eval() mean for a noisy layer, modules with
batch statistics, the probe leaves the model's state alone, no host synchronisation on the estimator's path
when asked, nothing process-wide changed at import, and the core needs only torch and safetensors."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import glrnet


def lenet_bn(batchnorm):
    torch.manual_seed(0)
    return nn.Sequential(glrnet.NoisyConv2d(1, 2, 3, activation="sigmoid"), batchnorm(2), nn.Flatten(),
                         glrnet.NoisyLinear(2 * 6 * 6, 3))


def test_a_noisy_layer_alone_is_the_noise_free_layer_in_train_and_eval_mode():
    """Noise is never implicit (unlike Dropout): a plain forward is the OT network in either mode."""
    layer = glrnet.NoisyLinear(4, 3, activation="threshold")
    x = torch.randn(5, 4)
    want = (nn.functional.linear(x, layer.weight, layer.bias) > 0).float()
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("batchnorm", [nn.BatchNorm1d, nn.BatchNorm2d], ids=["1d", "2d"])
def test_batch_statistics_in_training_mode_are_refused_in_one_line(batchnorm):
    """In a noisy pass a batch's rows are the K replications: normalising over them would let each replication's
    output depend on the others' noise. Refused by name; in eval mode the running statistics are used, the
    estimate runs, and they do not move."""
    bn = batchnorm if batchnorm is nn.BatchNorm2d else (lambda c: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(c * 36),
                                                                                 nn.Unflatten(1, (c, 6, 6))))
    model = lenet_bn(bn)
    for p in model.parameters():
        p.requires_grad_(isinstance(p, nn.Parameter) and any(p is q for m in glrnet.noisy_layers(model)
                                                             for q in m.parameters()))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
    est = glrnet.GLR(replications=8)
    with pytest.raises(ValueError, match=r"BatchNorm\dd '.*' is in training mode: .* call \.eval\(\)"):
        est.backward(model, x, y)
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    est.backward(model, x, y)
    glrnet.predict(model, x, "lap", 16)
    for k, v in stats.items():
        torch.testing.assert_close(model.state_dict()[k], v)


@pytest.mark.parametrize("frozen", ["a bias", "a whole layer"])
def test_frozen_parameters_stay_frozen_and_get_no_grad(frozen):
    model = glrnet.NoisyMLP([5, 4, 4, 3])
    for p in [model[0].bias] if frozen == "a bias" else list(model[0].parameters()):
        p.requires_grad_(False)
    for kw in (dict(), dict(injection="layerwise", replications=24), dict(memory_budget_mb=0.001, prefetch=False)):
        model.zero_grad()
        glrnet.GLR(**{"replications": 8, **kw}).backward(model, torch.rand(3, 5), torch.tensor([0, 1, 2]))
        assert model[0].bias.grad is None and (model[0].weight.grad is None) == (frozen == "a whole layer")
        assert all(p.grad is not None for m in model[1:] for p in m.parameters())


def test_no_host_synchronisation_on_the_estimators_path_when_check_finite_is_off(monkeypatch):
    """With ``check_finite=False`` nothing reads a tensor's value back to Python during an estimate (the CPU
    stand-in for a CUDA synchronisation: every conversion of a tensor to a Python value is made to fail, but for
    the noise distributions' own parameters, which are host numbers the user gave)."""
    model = glrnet.NoisySequential(glrnet.NoisyConv2d(1, 2, 3, activation="threshold"), glrnet.nn.MaxPool2d(2),
                                   nn.Flatten(), glrnet.NoisyLinear(2 * 3 * 3, 3), input_shape=(1, 8, 8))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
    for kw in (dict(), dict(baseline=True, memory_budget_mb=0.01), dict(injection="layerwise")):
        est = glrnet.GLR(replications=16, check_finite=False, prefetch=False,
                         generator=torch.Generator().manual_seed(0), **kw)
        est.estimate(model, x, y)     # warm: the first call may build things
        host = {id(t) for layer in glrnet.noisy_layers(model) for t in (layer.noise.loc, layer.noise.scale)}
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                original = getattr(torch.Tensor, name)

                def guarded(t, *a, _n=name, _f=original):
                    if id(t) not in host:
                        pytest.fail(f"host synchronisation: Tensor.{_n}")
                    return _f(t, *a)
                m.setattr(torch.Tensor, name, guarded)
            est.estimate(model, x, y)


def run_python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.slow
def test_importing_glrnet_changes_no_process_wide_state():
    """No matplotlib backend chosen, no thread count or global seed changed by importing any module."""
    res = run_python("""
        import matplotlib, torch
        backend, threads, state = matplotlib.get_backend(), torch.get_num_threads(), torch.get_rng_state()
        import glrnet, glrnet.plots, glrnet.robustness, glrnet.cli, glrnet.certify, glrnet.train
        assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())
        assert torch.get_num_threads() == threads
        assert torch.equal(torch.get_rng_state(), state)
        print("ok")
    """, {"MPLBACKEND": "svg"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.slow
def test_the_core_needs_only_torch_and_safetensors():
    """An estimate, a training step and LAP prediction with scikit-learn, scipy, matplotlib and tqdm made
    unimportable."""
    res = run_python("""
        import sys
        for name in ("sklearn", "scipy", "matplotlib", "tqdm", "torchattacks"):
            sys.modules[name] = None     # import fails as if not installed
        import torch, glrnet
        model = glrnet.NoisySequential(glrnet.NoisyConv2d(1, 2, 3, activation="threshold"), torch.nn.Flatten(),
                                       glrnet.NoisyLinear(2 * 6 * 6, 3), input_shape=(1, 8, 8))
        x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 3, (4,))
        opt = torch.optim.Adam(model.parameters())
        glrnet.GLR(replications=16, baseline=True, sampler="qmc", injection="layerwise").backward(model, x, y)
        opt.step()
        glrnet.ES(population=8).backward(model, x, y)
        print(glrnet.predict(model, x, "lap", 32).shape)
    """)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([4])" in res.stdout
