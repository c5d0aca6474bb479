"""Training loop, checkpoints, resume after a real kill, learning on digits, the CLI."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from glrnet.checkpoint import load_model
from glrnet.cli import main
from glrnet.train import TrainConfig, train


@pytest.mark.slow
@pytest.mark.parametrize("kw,floor", [
    (dict(activation="threshold", loss="zero_one", baseline=True), 0.6),
    (dict(activation="sigmoid", loss="cross_entropy"), 0.8),
])
def test_glr_learns_digits_far_above_chance(kw, floor):
    """Chance is 0.10; a few epochs of GLR reach far above it (OT and LAP)."""
    m = train(TrainConfig(epochs=4, replications=500, seed=1, **kw), quiet=True)
    print(kw, m["test_accuracy_ot"], m["test_accuracy_lap"])
    assert m["test_accuracy_ot"] > floor and m["test_accuracy_lap"] > floor


def test_backprop_baseline_learns_digits():
    m = train(TrainConfig(method="bp", epochs=3, optimizer="adam", lr=0.01), quiet=True)
    assert m["test_accuracy_ot"] > 0.85


def test_same_seed_same_run():
    cfg = dict(epochs=1, replications=50, subset=200)
    a, b = train(TrainConfig(**cfg), quiet=True), train(TrainConfig(**cfg), quiet=True)
    assert a["test_accuracy_ot"] == b["test_accuracy_ot"] and a["final_train_loss"] == b["final_train_loss"]


def test_outputs_written(tmp_path):
    m = train(TrainConfig(epochs=2, replications=50, subset=200, val_fraction=0.2), tmp_path, quiet=True)
    for f in ("metrics.json", "model.safetensors", "history.csv", "curves.png", "checkpoint.safetensors",
              "checkpoint.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"test_accuracy_ot", "test_accuracy_lap", "epochs", "train_seconds", "config"} <= set(metrics)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    model, extra = load_model(tmp_path / "model.safetensors")
    assert extra["config"]["replications"] == 50 and model.sizes == [64, 20, 10]
    assert m["test_accuracy_ot"] == metrics["test_accuracy_ot"]


def _train_cmd(out, epochs=3, extra=()):
    return [sys.executable, "-m", "glrnet", "train", "--dataset", "digits", "--epochs", str(epochs),
            "--replications", "2000", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.5",
            "--schedule", "cosine", "--out", str(out), "--quiet", *extra]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """Kill a real training process after its epoch-1 checkpoint; --resume ends with identical weights."""
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), check=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed))
    sidecar = killed / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if sidecar.exists() and json.loads(sidecar.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = json.loads(sidecar.read_text())["epoch"]
    assert epoch_at_kill < 3 and not (killed / "metrics.json").exists(), "the run finished before the kill"
    assert (killed / "history.csv").exists()
    subprocess.run(_train_cmd(killed, extra=["--resume"]), check=True, timeout=300)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert ma["test_accuracy_ot"] == mb["test_accuracy_ot"]


def test_resume_with_other_config_refused(tmp_path):
    train(TrainConfig(epochs=1, replications=50, subset=100), tmp_path, quiet=True)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(ValueError, match="different configuration.*replications"):
        train(TrainConfig(epochs=2, replications=60, subset=100), tmp_path, resume=True, quiet=True)


def test_cli_errors_exit_2_with_valid_names(capsys, tmp_path):
    for argv, needle in [(["train", "--activation", "tanhh"], "valid: sigmoid, threshold"),
                         (["train", "--loss", "hinge"], "cross_entropy"),
                         (["train", "--dataset", "cifar"], "digits"),
                         (["train", "--noise", "uniform"], "gaussian")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "does not exist" in err


def test_cli_help_documents_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for opt in ["--dataset", "--data-dir", "--image-size", "--hidden", "--activation", "--output-activation",
                "--loss", "--noise", "--noise-std", "--replications", "--baseline", "--sampler", "--injection", "--method",
                "--optimizer", "--lr", "--epochs", "--batch-size", "--seed", "--device", "--out", "--resume"]:
        assert opt in text, opt
    assert "(default: 1000)" in text


def test_cli_train_evaluate_datasets(tmp_path, capsys):
    from test_data import make_idx_folder
    data = make_idx_folder(tmp_path / "idx", n_train=200, n_test=50)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data), "--image-size", "14", "--epochs", "2",
                 "--replications", "100", "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", "--run", str(out), "--lap-replications", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy_ot"] <= 1 and result["lap_replications"] == 50
    assert main(["datasets"]) == 0
    assert "digits" in capsys.readouterr().out


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    train(TrainConfig(epochs=1, replications=20, subset=100), tmp_path, quiet=True)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(TrainConfig(epochs=1, replications=20, subset=100, seed=5), tmp_path, quiet=True)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_failing_run_keeps_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A loss that turns NaN in epoch 2: exit 1 with a clear message; epoch 1's checkpoint survives."""
    import glrnet.estimators as est_mod
    real = est_mod.GLR.estimate
    calls = {"n": 0}

    def flaky(self, model, x, y):
        calls["n"] += 1
        if calls["n"] > 5:  # after the first epoch of 4 batches
            raise est_mod.NonFiniteLossError("loss 'cross_entropy' gave 3 non-finite values")
        return real(self, model, x, y)
    monkeypatch.setattr(est_mod.GLR, "estimate", flaky)
    code = main(["train", "--subset", "100", "--batch-size", "25", "--replications", "20", "--epochs", "3",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 1 and "non-finite" in capsys.readouterr().err
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 1
    assert (tmp_path / "history.csv").exists() and not (tmp_path / "metrics.json").exists()


def test_same_seed_same_machine_same_threads_gives_bit_identical_weights(tmp_path):
    """What is bit-reproducible (docs/results.md): the same config, seed and thread count on the same
    machine give identical weights; another thread count or machine need not (float summation order)."""
    from glrnet.checkpoint import load_model
    cfg = dict(epochs=2, replications=50, subset=200, activation="threshold", loss="zero_one")
    for name in ("a", "b"):
        train(TrainConfig(**cfg), tmp_path / name, quiet=True)
    a, _ = load_model(tmp_path / "a" / "model.safetensors")
    b, _ = load_model(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    train(TrainConfig(**{**cfg, "seed": 1}), tmp_path / "c", quiet=True)
    c, _ = load_model(tmp_path / "c" / "model.safetensors")
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_training_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(TrainConfig(epochs=1, replications=10, subset=200), tmp_path, quiet=True)
    assert torch.equal(torch.rand(3), expected)


def test_a_warmup_loss_trains_the_first_epochs_then_the_loss(tmp_path):
    """--warmup-loss cross_entropy --warmup-epochs 1 with the 0-1 loss: after epoch 1 the network is exactly the one
    cross-entropy training gives (same streams), and the run then continues on the 0-1 loss."""
    common = dict(activation="threshold", epochs=2, replications=20, eval_replications=2, lap_replications=4, hidden=[8])
    warm = train(TrainConfig(loss="zero_one", warmup_loss="cross_entropy", warmup_epochs=1, **common),
                 tmp_path / "warm", quiet=True)
    ce = train(TrainConfig(loss="cross_entropy", **common), tmp_path / "ce", quiet=True)
    first = [next(csv.DictReader(open(tmp_path / run / "history.csv")))["val_acc_ot"] for run in ("warm", "ce")]
    assert first[0] == first[1]
    assert warm["config"]["warmup_loss"] == "cross_entropy" and warm["config"]["loss"] == "zero_one"
