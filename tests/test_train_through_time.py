"""Networks through time from the command line and the spec files: images encoded as sequences, a spiking
or recurrent network trained by GLR or back-propagation through time, saved, loaded and evaluated."""

from __future__ import annotations

import json

import pytest
import torch

import glrnet
from glrnet.checkpoint import load_model
from glrnet.cli import main
from glrnet.sequences import encode, parse_encoding, sequence_shape
from glrnet.train import TrainConfig, build_model

TINY = ["--dataset", "digits", "--subset", "120", "--epochs", "1", "--replications", "8", "--batch-size", "40",
        "--lap-replications", "4", "--eval-replications", "2", "--noise-std", "0.5", "--quiet"]


def test_encodings_give_the_sequences_they_name():
    x = torch.rand(3, 64)
    assert encode(x, "rows", (8, 8)).shape == (3, 8, 8) and torch.equal(encode(x, "rows", (8, 8))[:, 2], x[:, 16:24])
    assert encode(x, "pixels", (8, 8)).shape == (3, 64, 1)
    spikes = encode(x[:1].expand(2000, 64), "rate:5", (8, 8), torch.Generator().manual_seed(0))
    assert spikes.shape == (2000, 5, 64) and set(spikes.unique().tolist()) <= {0.0, 1.0}
    rate, se = spikes.mean((0, 1)), (x[0] * (1 - x[0]) / 10000).sqrt()
    assert ((rate - x[0]).abs() <= 5 * se + 1e-9).all()          # the spike rate is the pixel's value
    assert sequence_shape("rate:25", (28, 28)) == (25, 784) and parse_encoding("none") == ("none", 0)
    for bad in ("rate", "rate:0", "row", "pixels:3"):
        with pytest.raises(ValueError, match="--encoding: cannot read"):
            parse_encoding(bad)
    with pytest.raises(ValueError, match="rate coding needs pixel values in"):
        encode(2 * x, "rate:3", (8, 8))


def test_a_time_arch_builds_a_time_loop_with_its_perturbation():
    model = build_model(TrainConfig(arch="lif:16:rec,lif:8", encoding="rows", perturb="first=weight").validate(),
                        (8, 8), 10)
    assert isinstance(model, glrnet.TimeLoop) and model.readout == "mean"
    assert [type(m).__name__ for m in model] == ["Leaky", "Leaky", "LeakyIntegrator"]
    assert model[0].recurrent and not model[1].recurrent and model[0].site == "weight" and model[1].site == "activity"
    rnn = build_model(TrainConfig(arch="rnn:12:threshold", encoding="pixels").validate(), (8, 8), 10)
    assert [type(m).__name__ for m in rnn] == ["Recurrent", "NoisyLinear"] and rnn.readout == "last"
    assert rnn(torch.rand(2, 64, 1)).shape == (2, 10)


@pytest.mark.parametrize("options,message", [
    (["--arch", "lif:16"], "--arch lif:16 takes sequences: give --encoding rate:T, rows or pixels"),
    (["--encoding", "rows"], "--arch mlp takes images: --encoding is for networks through time"),
    (["--arch", "lif:16", "--encoding", "rows", "--hidden", "30"], "--arch lif:16 is a network through time whose"),
    (["--arch", "lif:16", "--encoding", "rows", "--activation", "threshold"], "sets its own units (lif: spikes;"),
    (["--arch", "lif:x", "--encoding", "rows"], "--arch: cannot read 'lif:x' in a network through time"),
    (["--arch", "lif:16", "--encoding", "rows", "--method", "spsa"], "method spsa is not defined for it"),
])
def test_a_time_arch_and_its_encoding_go_together(tmp_path, capsys, options, message):
    assert main(["train", *TINY, *options, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_each_recurrent_layer_gets_its_own_activation_and_the_report_names_them():
    cfg = TrainConfig(arch="rnn:16,rnn:16:relu", encoding="rows")
    model = build_model(cfg, (28, 28), 10)
    assert ["activation=tanh" in repr(model[0]), "activation=relu" in repr(model[1])] == [True, True]
    assert cfg.unit == "rnn-tanh+rnn-relu" and TrainConfig(arch="lif:8,lif:8:rec", encoding="rows").unit == "lif"


@pytest.mark.parametrize("method", ["glr", "bp"])
def test_a_spiking_network_trains_saves_and_evaluates(tmp_path, capsys, method):
    out = tmp_path / method
    assert main(["train", *TINY, "--arch", "lif:16", "--encoding", "rate:4", "--method", method,
                 *(["--injection", "layerwise"] if method == "glr" else []), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["encoding"] == "rate:4" and 0 <= metrics["test_accuracy_ot"] <= 1
    assert (metrics["test_accuracy_lap"] is not None) == (method == "glr")
    model, _ = load_model(out / "model.safetensors")
    assert isinstance(model, glrnet.TimeLoop)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--lap-replications", "4", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["accuracy_ot"] <= 1 and result["test_images"] > 0
    assert main(["certify", "--run", str(out), "--out", str(tmp_path / "c")]) == 2
    assert ("is a network through time (encoding rate:4)" if method == "glr" else "was trained without noise") \
        in capsys.readouterr().err


def test_a_spec_names_networks_through_time():
    from glrnet.experiments import load_spec
    spec = load_spec("snn")
    group = spec.time_to_accuracy[0]
    cfg = spec.timed_config(group, group.runs[-1], spec.datasets[0]).validate()
    assert (cfg.arch, cfg.encoding, cfg.method, cfg.injection) == ("lif:256", "rate:25", "glr", "layerwise")


@pytest.mark.slow
def test_the_snn_study_runs_through_the_one_runner(tmp_path):
    from pathlib import Path
    spec = Path(__file__).parent / "data" / "snn-smoke.toml"
    assert main(["reproduce", "--spec", str(spec), "--out", str(tmp_path / "out"), "--no-robustness", "--quiet"]) == 0
    table = (tmp_path / "out" / "rate" / "training_digits.md").read_text()
    for run in ("bptt-rate-lif-cross_entropy", "glr-rate-lif-cross_entropy"):
        assert f"| {run} |" in table
