"""Files written by the release before the package redesign still load, and mean the same.

``tests/fixtures/release-0.1.0/`` was written by glrnet at commit 6975a10 (the command is in its
expected.json): a threshold CNN whose convolution carries weight noise, its checkpoint, and the OT
logits and LAP probabilities that release computed on fixed inputs. The current code must rebuild the
same network (same perturbations and noise), give the same numbers, and resume from the checkpoint.
"""

import json
import shutil
from pathlib import Path

import torch

import glrnet
from glrnet.checkpoint import load_checkpoint, load_model, read_checkpoint_meta
from glrnet.train import TrainConfig, build_model, build_optimizer

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"


def test_a_saved_model_of_the_previous_release_loads_and_predicts_the_same():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model, extra = load_model(FIXTURE / "model.safetensors")
    assert [m.perturbation.name for m in model.noisy_layers] == expected["sites"] == ["weight", "activity", "activity"]
    assert isinstance(model[0].perturbation, glrnet.Weight) and abs(float(model[0].noise.stddev) - 0.05) < 1e-7
    torch.manual_seed(expected["input_seed"])
    x = torch.rand(*expected["inputs_shape"])
    torch.testing.assert_close(model(x), torch.tensor(expected["ot_logits"]))
    lap = glrnet.predict_proba(model, x, "lap", expected["lap_replications"],
                               generator=torch.Generator().manual_seed(expected["lap_seed"]))
    torch.testing.assert_close(lap, torch.tensor(expected["lap_proba"]))


def test_a_checkpoint_of_the_previous_release_restores_model_optimizer_and_generators(tmp_path):
    shutil.copy(FIXTURE / "checkpoint.safetensors", tmp_path / "checkpoint.safetensors")
    meta = read_checkpoint_meta(tmp_path / "checkpoint.safetensors")
    cfg = TrainConfig.from_saved(meta["config"])
    model = build_model(cfg, (8, 8), 10)
    opt, _ = build_optimizer(cfg, model)
    gens = {name: torch.Generator() for name in meta["generators"]}
    load_checkpoint(tmp_path / "checkpoint.safetensors", model, opt, gens)
    saved, _ = load_model(FIXTURE / "model.safetensors")
    for a, b in zip(model.parameters(), saved.parameters()):
        torch.testing.assert_close(a, b)
    assert [m.perturbation.name for m in model.noisy_layers] == ["weight", "activity", "activity"]
    assert opt.state_dict()["state"], "the optimizer's state was restored"
