"""What a newcomer's mistakes get: one clear line naming the problem, and nothing lost.
One test per case a newcomer meets (tracebacks, silent cases, false statements, outputs)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from glrnet.cli import main
from glrnet.train import TrainConfig, train

TINY = ["--epochs", "1", "--replications", "10", "--subset", "200", "--quiet"]


def err_of(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_resume_with_changed_hidden_names_the_option_before_loading_weights(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 0
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    rc, err = err_of(capsys, ["train", *TINY, "--hidden", "7", "--resume", "--out", str(tmp_path)])
    assert rc == 2 and "different configuration" in err and "hidden: saved [20], now [7]" in err
    assert "Traceback" not in err and (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_lenet_on_digits_says_the_images_are_too_small(tmp_path, capsys):
    rc, err = err_of(capsys, ["train", *TINY, "--arch", "lenet", "--hidden", "none", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--arch lenet: its convolutions and pooling do not fit digits's 8×8 images" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", [["train", *TINY], ["reproduce", "--quick", "--quiet"],
                                     ["robustness", "--run", "nowhere"]])
def test_out_naming_a_file_fails_at_once(tmp_path, capsys, command):
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc, err = err_of(capsys, [*command, "--out", str(f)])
    assert rc == 2 and f"--out {f} is a file, not a folder" in err and f.read_text() == "keep me"


def test_bench_glr_unknown_config_is_one_line():
    bench = Path(__file__).parents[1] / "benchmarks" / "bench_glr.py"
    r = subprocess.run([sys.executable, str(bench), "--configs", "seed"], capture_output=True, text=True)
    assert r.returncode == 2 and "--configs: unknown configuration(s) ['seed']; valid:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("text,match", [
    ("[experiment]\nepsilon = 0.1\n", r"\[experiment\]: unknown key 'epsilon'; valid: name, notes, seeds$"),
    ("[default]\nlr = 0.1\n", r"unknown section \[default\]; valid: \[experiment\], \[datasets\], \[defaults\]"),
    ("[replications]\nmodel = ['x']\n", r"\[replications\]: unknown key 'model'; valid: models, replications, variants$"),
    ("[experiment]\nseeds = [0, 0]\n", "seeds must be a list of distinct integers"),
])
def test_spec_typos_are_rejected_with_the_valid_names(tmp_path, text, match):
    from glrnet.experiments import load_spec, spec_path
    spec, quick = tmp_path / "s.toml", spec_path("quick").read_text()
    section, _, line = text.partition("\n")
    if section + "\n" in quick:   # a typo inside an existing section
        quick = quick.replace(section + "\n", text, 1)
    else:                          # a misspelt section
        quick += "\n" + text
    spec.write_text(quick)
    with pytest.raises(ValueError, match=match):
        load_spec(spec)


def test_robustness_says_when_it_attacks_fewer_images_than_asked(tmp_path, capsys):
    train(TrainConfig(epochs=1, replications=10, subset=200), tmp_path / "run", quiet=True)
    rc, err = err_of(capsys, ["robustness", "--run", str(tmp_path / "run"), "--images", "500", "--eps", "bad",
                              "--out", str(tmp_path / "rb")])
    assert "--images 500: digits has 450 test images; attacking all 450" in err


def test_evaluate_on_another_dataset_warns(tmp_path, capsys):
    from test_data import make_idx_folder
    data = make_idx_folder(tmp_path / "idx", n_train=200, n_test=20)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data), "--image-size", "8", *TINY[:4],
                 "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    rc, err = err_of(capsys, ["evaluate", "--run", str(run), "--dataset", "digits", "--lap-replications", "2",
                              "--quiet"])
    assert rc == 0 and "warning: the run was trained on mnist, evaluated here on digits" in err


def test_resume_of_a_folder_that_holds_no_run_says_so(tmp_path, capsys):
    rc, err = err_of(capsys, ["train", *TINY, "--resume", "--out", str(tmp_path / "new")])
    assert rc == 0 and "holds no run yet; starting a new one" in err


def test_reproduce_interrupt_message_does_not_point_to_a_missing_option(monkeypatch, capsys, tmp_path):
    import glrnet.experiments as exp

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(exp, "reproduce", interrupted)
    rc, err = err_of(capsys, ["reproduce", "--quick", "--out", str(tmp_path)])
    assert rc == 130 and "rerun the same command" in err and "--resume" not in err


def test_version_and_license(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("glrnet ")
    assert "MIT License" in (Path(__file__).parents[1] / "LICENSE").read_text()


def test_files_are_written_with_the_umask_mode(tmp_path):
    """Text and tensors alike (safetensors writes its own file, 0600, over the temporary one: it was
    how models, checkpoints and journals came out unreadable to the group)."""
    import torch

    from glrnet.checkpoint import atomic_write_text, save_tensors_atomic
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.md", "x")
        save_tensors_atomic({"t": torch.zeros(2)}, tmp_path / "t.safetensors", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.md").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o640


def test_failed_sanity_checks_reach_the_console_and_every_eps_is_in_the_summary(monkeypatch, tmp_path, capsys):
    import glrnet.robustness.protocol as rb
    from glrnet.robustness.settings import AttackSettings
    eps = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    rows = [{"model": "m", "attack": a, "eps": e, "acc_ot": 0.5, "acc_lap": float("nan"), "images": 4}
            for a in ("worst-case", "transfer-fgsm") for e in eps] + \
        [{"model": "m", "attack": "none", "eps": 0.0, "acc_ot": 0.9, "acc_lap": float("nan"), "images": 4}]
    monkeypatch.setattr(rb, "evaluate_robustness", lambda *a, **k: rb.RobustnessResult(rows))
    monkeypatch.setattr(rb, "sanity_checks", lambda *a, **k: rb.ChecksResult([
        {"model": "m", "check": "iterative ≤ one-step", "value": "0.36 vs 0.28", "pass": False}]))
    rb.attack_and_report(tmp_path, {"m": (None, False)}, [0] * 4, [0] * 4, eps, AttackSettings(), None, 0.1,
                         quiet=True)
    err = capsys.readouterr().err
    assert "sanity check FAILED for m: iterative ≤ one-step (measured 0.36 vs 0.28)" in err
    header = next(line for line in (tmp_path / "robustness.md").read_text().splitlines() if line.startswith("| model |"))
    assert all(f"worst case ε={e:g}" in header for e in eps)


def test_parallel_data_groups_are_accepted_as_documented():
    assert TrainConfig(parallel="2").validate().parallel == "2"
    with pytest.raises(ValueError, match="unknown parallel mode 'rows'"):
        TrainConfig(parallel="rows").validate()


def test_robustness_flags_are_the_attack_settings_fields(capsys):
    from dataclasses import fields

    from glrnet.robustness.settings import AttackSettings
    with pytest.raises(SystemExit):
        main(["robustness", "--help"])
    text = capsys.readouterr().out
    for f in fields(AttackSettings):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_robustness_into_a_folder_with_an_unfinished_run_asks_for_resume(tmp_path, capsys):
    train(TrainConfig(epochs=1, replications=10, subset=200), tmp_path / "run", quiet=True)
    (tmp_path / "rb").mkdir()
    (tmp_path / "rb" / "robustness_journal.safetensors").write_bytes(b"attacks of an earlier run")
    rc, err = err_of(capsys, ["robustness", "--run", str(tmp_path / "run"), "--eps", "0.1", "--images", "50",
                              "--out", str(tmp_path / "rb")])
    assert rc == 2 and "robustness_journal.safetensors records an earlier run's attacks: pass --resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "rb" / "robustness_journal.safetensors").read_bytes() == b"attacks of an earlier run"
