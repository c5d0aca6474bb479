"""What a newcomer reads holds: README code runs, links resolve, errors are one line, figures are labelled."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from glrnet.cli import build_parser, main
from glrnet.experiments import packaged_specs
from glrnet.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_tracked_file(doc):
    tracked = tracked_files()
    folders = {str(Path(f).parent) for f in tracked} | {str(p) for f in tracked for p in Path(f).parents}
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        rel = os.path.normpath(doc.parent.relative_to(ROOT) / target.split("#")[0])
        assert rel in tracked or rel in folders, f"{doc.name}: link {target} → {rel} is not a tracked file"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    acc = float(re.search(r"test accuracy \(LAP\): ([0-9.]+)", capsys.readouterr().out).group(1))
    assert acc > 0.3  # threshold units + 0-1 loss after 3 epochs: far above chance (0.1)


# the robustness guide trains and attacks networks: minutes, not seconds
@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.slow) if d.name == "robustness.md" else d
                                 for d in DOCS if d.name != "README.md" and "```python" in d.read_text()],
                         ids=lambda p: p.name)
def test_docs_python_blocks_run_as_written(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
        exec(compile(block, doc.name, "exec"), {"__name__": "__docs__"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(TrainConfig(method="bp", epochs=2, lr=0.02), root / "bp", quiet=True)
    train(TrainConfig(epochs=1, replications=50), root / "glr", quiet=True)
    return root


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(4096)], ids=["empty", "short", "random"])
def test_corrupt_model_file_is_a_one_line_error_naming_it(runs, tmp_path, capsys, content):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    assert main(["evaluate", "--run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_truncated_model_file_is_a_one_line_error(runs, tmp_path, capsys):
    good = (runs / "glr" / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    assert main(["evaluate", "--run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1


def test_unusable_device_is_a_one_line_error_naming_it(runs, capsys):
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for argv in (["evaluate", "--run", str(runs / "glr")], ["train", "--epochs", "1", "--out", "unused"],
                 ["reproduce", "--quick", "--out", "unused"]):
        assert main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}" in err and len(err.strip().splitlines()) == 1
    assert not Path("unused").exists()


def test_failed_train_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()


def test_run_trained_with_relative_data_dir_evaluates_from_elsewhere(tmp_path, monkeypatch, capsys):
    from test_data import make_idx_folder
    make_idx_folder(tmp_path / "data" / "idx", n_train=100, n_test=30)
    monkeypatch.chdir(tmp_path / "data")
    assert main(["train", "--dataset", "mnist", "--data-dir", "idx", "--image-size", "14", "--epochs", "1",
                 "--replications", "20", "--out", "run", "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--run", "data/run", "--lap-replications", "20", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "30 test" in result["dataset"]


def test_help_shows_each_default_once_and_every_command_has_a_description(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name, p in sub.items():
        assert p.description, f"{name} has no description"
        text = p.format_help()
        assert "(default: None)" not in text
        for line in text.splitlines():
            assert line.count("(default:") <= 1, line
    # the main job's time: measured (a figure in seconds in the README), never a bare promise in the help
    main_job = next(line for line in (ROOT / "README.md").read_text().splitlines() if "# main job" in line)
    assert re.search(r"measured \d+ s", main_job), main_job
    assert not re.search(r"\d+ s\b", sub["reproduce"].format_help())
    # every packaged spec is named where the help and the README list them
    spec_help = next(a.help for a in sub["reproduce"]._actions if "--spec" in a.option_strings)
    readme = (ROOT / "README.md").read_text()
    listing = readme[readme.index("specs/ "):readme.index("cli/ ")]
    for name in packaged_specs():
        assert re.search(rf"\b{name}\b", spec_help), f"reproduce --spec help does not name {name}"
        assert re.search(rf"\b{name}\b", listing), f"README's layout does not name the packaged spec {name}"


def test_json_output_is_not_escaped(runs, capsys):
    assert main(["evaluate", "--run", str(runs / "glr"), "--lap-replications", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "×" in out and "\\u00d7" not in out


def test_bp_model_without_noise_has_no_lap_figure(runs, capsys):
    metrics = json.loads((runs / "bp" / "metrics.json").read_text())
    assert metrics["test_accuracy_lap"] is None
    assert main(["evaluate", "--run", str(runs / "bp"), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy_lap"] is None and "without noise" in result["note"]


def test_progress_bars_on_evaluate(runs, capsys):
    assert main(["evaluate", "--run", str(runs / "glr"), "--lap-replications", "200"]) == 0
    assert "LAP" in capsys.readouterr().err


def test_robustness_report_does_not_repeat_the_headline_column(tmp_path):
    from glrnet.robustness import AttackSettings, write_reports
    rows = [{"model": "m", "attack": a, "eps": e, "acc_ot": 0.5, "acc_lap": float("nan"), "images": 10}
            for a in ("worst-case", "transfer-fgsm") for e in (0.1, 0.2)]
    rows.append({"model": "m", "attack": "none", "eps": 0.0, "acc_ot": 0.9, "acc_lap": float("nan"), "images": 10})
    write_reports(tmp_path, rows, [], 0.1, AttackSettings(), 10)
    header = next(l for l in (tmp_path / "robustness.md").read_text().splitlines() if l.startswith("| model | predictor"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == len(set(cells)) and "worst case ε=0.1" in cells


def test_every_figure_has_axis_labels_a_titled_run_and_a_legend_off_the_data(runs, tmp_path, monkeypatch):
    from glrnet import plots
    from glrnet.robustness import reports
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append((Path(path).name, fig)))
    monkeypatch.setattr(reports, "save_figure", lambda fig, path: figures.append((Path(path).name, fig)))
    hist = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_acc_ot": 0.5} for e in (1, 2, 3)]
    plots.plot_curves(hist, tmp_path / "c.png", title="bp-2hidden: BP", val_name="validation")
    plots.figure_training_curves(tmp_path / "f5.png", {"a": hist, "b": hist})
    plots.figure_sigmoid_slopes(tmp_path / "f2.png")
    plots.figure_extra_activations(tmp_path / "f7.png")
    rows = [{"model": m, "source": "src", "eps": e, "acc_orig": 0.9, "acc_ot": 0.5 - e, "acc_lap": 0.55 - e}
            for m in ("a", "b") for e in (0.1, 0.2)]
    plots.figure_transfer(tmp_path / "t.png", rows, "src", ["a", "b"], "spec")
    rob = [{"model": m, "attack": a, "eps": e, "acc_ot": 0.3, "acc_lap": 0.2}
           for m in ("a", "b") for a in ("worst-case", "transfer-fgsm") for e in (0.1, 0.2)]
    rob += [{"model": m, "attack": "none", "eps": 0.0, "acc_ot": 0.9, "acc_lap": 0.9} for m in ("a", "b")]
    reports.figure_worst_case(tmp_path / "w.png", rob, ["a", "b"], {"a": "acc_lap", "b": "acc_ot"}, "spec")
    assert len(figures) == 6
    for name, fig in figures:
        fig.canvas.draw()
        for ax in fig.axes:
            if not ax.axison or not ax.has_data():
                continue
            # a twin or shared axis may take its label from its sibling
            xl = any(a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax)) or ax.get_xlabel()
            yl = any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax)) or ax.get_ylabel()
            assert xl and yl, (name, ax.get_title())
            legend = ax.get_legend()
            if legend is not None and name in ("t.png", "w.png", "c.png"):
                box = legend.get_window_extent()
                assert not box.overlaps(ax.get_window_extent()), name  # legend outside the axes
    titles = {name: " ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [a.get_title() for a in fig.axes])
              for name, fig in figures}
    assert "bp-2hidden" in titles["c.png"] and "src" in titles["t.png"] and "spec" in titles["w.png"]
