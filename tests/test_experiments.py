"""glrnet reproduce through the one runner: a tiny transfer spec end to end (structure and sanity of every
output), the technique study's smoke spec, every packaged spec validated, and the one validator's
one-line errors and the runner's refusals."""

import csv
import json
import math
import re
from pathlib import Path

import pytest

from glrnet.cli import main
from glrnet.experiments import data_folder, load_spec, packaged_specs, spec_path
from glrnet.experiments.schema import SECTIONS

DATA = Path(__file__).parent / "data"

TINY = """
[experiment]
name = "tiny"

[[datasets]]
dataset = "digits"
subset = 400

[defaults]
hidden = [12]
replications = 50
epochs = 2
eval_replications = 10
lap_replications = 50

[[models]]
name = "src-a"
method = "bp"
hidden = [32, 16]
activation = "relu"
lr = 0.01
epochs = 8

[[models]]
name = "src-b"
method = "bp"
hidden = [32, 16, 16, 16, 16]
activation = "relu"
lr = 0.01
epochs = 8

[[models]]
name = "bp"
label = "sigmoid, trained by BP"
method = "bp"
activation = "sigmoid"
lr = 0.02
epochs = 6

[[models]]
name = "glr-threshold-01"
label = "threshold, 0-1 loss"
activation = "threshold"
loss = "zero_one"
baseline = true

[transfer]
sources = ["src-a", "src-b"]
eps = [0.1, 0.3]
headline_target = 0.5
calibrate_model = "bp"
lap_replications = 50

[transfer.reference]
bp = { orig = 0.99, ot = [0.28, 0.62] }
glr-threshold-01 = { orig = 0.86, ot = [0.56, 0.77], lap = [0.58, 0.79] }

[replications]
models = ["glr-threshold-01"]
replications = [10]
variants = ["plain", "baseline"]

[robustness]
models = ["bp", "glr-threshold-01"]
eps = [0.3]
images = 30
steps = 3
eot_samples = 4
lr_samples = 16
spsa_samples = 8
spsa_steps = 2
random_draws = 2
lap_replications = 50
"""


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    spec = root / "tiny.toml"
    spec.write_text(TINY)
    out = root / "out"
    assert main(["reproduce", "--spec", str(spec), "--out", str(out), "--quiet"]) == 0
    return spec, out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_outputs_exist(run):
    _, out = run
    for name in ["results.csv", "table1.md", "table2.md", "summary.json", "study.csv", "study.md", "spec.toml",
                 "fig2_sigmoid_slopes.png", "fig5_training_curves.png", "fig6_adversarial_examples.png",
                 "fig7_activations.png", "transfer_src-a.png", "robustness_worst_case.png", "robustness.md",
                 "robustness.csv", "README.md"]:
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "adversarial").rglob("*.safetensors"))) == 2 * 3   # 2 sources × (2 ε + headline)


def test_results_are_complete_and_sane(run):
    _, out = run
    rows = read_csv(out / "results.csv")
    summary = json.loads((out / "summary.json").read_text())["datasets"]["digits"]["transfer"]
    eps = summary["eps"]
    assert 0 < summary["headline_eps"] <= 0.5 and summary["headline_eps"] in eps
    assert len(rows) == 4 * 2 * len(eps)            # (2 sources + 2 models) × 2 sources × ε
    for r in rows:
        for key in ("acc_orig", "acc_ot"):
            assert 0 <= float(r[key]) <= 1
        lap = float(r["acc_lap"])
        assert (math.isnan(lap) and r["method"] == "bp") or 0 <= lap <= 1
    for src in ("src-a", "src-b"):  # white box on itself: accuracy falls as ε grows
        own = sorted((float(r["eps"]), float(r["acc_ot"])) for r in rows if r["model"] == src and r["source"] == src)
        accs = [a for _, a in own]
        assert all(b <= a + 1e-9 for a, b in zip(accs, accs[1:])) and accs[-1] < float(
            next(r["acc_orig"] for r in rows if r["model"] == src)) - 0.3


def test_tables_have_every_row_with_the_reference_beside_ours(run):
    _, out = run
    for i in (1, 2):
        text = (out / f"table{i}.md").read_text()
        assert "sigmoid, trained by BP" in text and "threshold, 0-1 loss" in text and "Headline ε" in text
        assert len([l for l in text.splitlines() if l.startswith("| ") and "model" not in l]) == 2
    assert "| 0.99 | 0.28 | – |" in (out / "table1.md").read_text()


def test_replications_and_robustness_reports(run):
    _, out = run
    study = read_csv(out / "study.csv")
    assert {(r["replications"], r["variant"]) for r in study} == {("10", "plain"), ("10", "baseline"), ("50", "baseline")}
    rob = read_csv(out / "robustness.csv")
    assert {r["attack"] for r in rob} >= {"worst-case", "apgd-ce[gauss]", "apgd-dlr[lr]", "apgd-ce[ste]",
                                          "apgd-ce[sigmoid:1]", "apgd-ce[ot]", "spsa", "random", "transfer-fgsm"}
    worst = [r for r in rob if r["attack"] == "worst-case"]
    for r in worst:  # the worst case is at most every single attack
        single = [float(s["acc_ot"]) for s in rob if s["model"] == r["model"] and s["eps"] == r["eps"]
                  and s["attack"] != "none" and not s["attack"].startswith("worst-case")]
        assert float(r["acc_ot"]) <= min(single) + 1e-9
    for r in rob:  # each escalation level (doubling on the survivors) only adds broken images
        if r["attack"].startswith("worst-case ") and r["attack"].endswith("×"):
            key = "acc_lap" if r["acc_lap"] not in ("", "nan") else "acc_ot"
            base = next(w for w in worst if w["model"] == r["model"] and w["eps"] == r["eps"])
            assert float(r[key]) <= float(base[key]) + 1e-9
    assert any(r["attack"] == "worst-case 2×" for r in rob)
    assert "Sanity checks" in (out / "robustness.md").read_text()


def test_rerun_into_its_own_folder_reuses_everything(run):
    spec, out = run
    before = (out / "results.csv").read_text()
    mtime = (out / "models" / "bp" / "model.safetensors").stat().st_mtime
    assert main(["reproduce", "--spec", str(spec), "--out", str(out), "--quiet", "--no-robustness"]) == 0
    assert (out / "models" / "bp" / "model.safetensors").stat().st_mtime == mtime
    assert (out / "results.csv").read_text() == before


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals_are_one_line_and_write_nothing(run, tmp_path, capsys):
    spec, out = run
    err = one_line_error(capsys, ["reproduce", "--quick", "--spec", "paper", "--out", str(tmp_path / "a")])
    assert "--quick runs the packaged quick spec" in err and "--spec paper" in err
    assert not (tmp_path / "a").exists()
    train_run = out / "models" / "bp"                     # a `glrnet train` folder
    err = one_line_error(capsys, ["reproduce", "--spec", str(spec), "--out", str(train_run)])
    assert f"--out {train_run} holds a glrnet train run (metrics.json)" in err
    err = one_line_error(capsys, ["reproduce", "--quick", "--out", str(out)])     # another spec's results
    assert f"--out {out} holds the results of spec 'tiny'" in err and "not of 'quick'" in err
    assert "name = \"tiny\"" in (out / "spec.toml").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    err = one_line_error(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "other")])
    assert "is not empty and holds no spec's results" in err
    err = one_line_error(capsys, ["reproduce", "--spec", str(spec), "--dataset", "mnist", "--out", str(out)])
    assert "--dataset mnist" in err and "it has digits" in err


def test_data_dir_is_the_folder_that_holds_one_folder_per_dataset(tmp_path):
    from glrnet.data import DataError
    from glrnet.experiments.schema import DatasetSpec
    (tmp_path / "mnist-10k").mkdir()
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    entry = DatasetSpec("mnist-10k", "mnist", "mnist-10k")
    assert data_folder(entry, str(tmp_path)) == str(tmp_path / "mnist-10k")
    assert data_folder(entry, None) is None and data_folder(DatasetSpec("d", "digits", "digits"), "x") is None
    with pytest.raises(DataError, match="holds IDX files itself: pass the folder above it"):
        data_folder(DatasetSpec("mnist", "mnist", "mnist"), str(tmp_path / "mnist"))
    with pytest.raises(DataError, match="no folder fashion-mnist/ in it"):
        data_folder(DatasetSpec("fashion-mnist", "fashion-mnist", "fashion-mnist"), str(tmp_path))


# ---------------------------------------------------------------------------------------- the schema
@pytest.mark.parametrize("name", packaged_specs())
def test_every_packaged_spec_validates(name):
    spec = load_spec(name)
    assert spec.name and spec.datasets and spec.models
    assert name in ("quick", "paper", "paper-seeds", "fashion", "fashion-seeds", "mnist-10k", "certified", "scale")


def test_packaged_specs_say_what_they_run():
    paper = load_spec(spec_path("paper"))
    assert paper.transfer.sources == ["bp-2hidden", "bp-5hidden"] and len(paper.transfer.models) == 12
    d = paper.datasets[0]
    assert (d.dataset, d.split, d.val_fraction, d.image_size) == ("mnist", "seed", 0.1, 14)
    k = {m: (paper.config(m, d).replications, paper.config(m, d).baseline) for m in paper.transfer.models
         if paper.config(m, d).method == "glr"}
    assert sum(v == (1000, True) for v in k.values()) == 8
    assert {n for n, v in k.items() if v == (10000, False)} == {"glr-sigmoid-k10000", "glr-threshold-k10000",
                                                                "glr-threshold-01-k10000"}
    assert paper.config("bp-2hidden", d).hidden == [300, 100]         # [defaults] under the source's own options
    small = load_spec("mnist-10k")
    assert small.transfer.models == paper.transfer.models[:9] and small.datasets[0].folder == "mnist-10k"
    assert load_spec("paper-seeds").seeds == [0, 1, 2]
    fashion = load_spec("fashion")
    assert fashion.datasets[0].dataset == "fashion-mnist" and fashion.transfer.models == [
        "bp-sigmoid", "glr-sigmoid", "glr-threshold", "glr-threshold-01"]
    cert = load_spec("certified")
    assert [x.dataset for x in cert.datasets] == ["mnist", "fashion-mnist"] and cert.certify.radii == [0.25, 0.5, 1.0, 1.5]
    assert cert.robustness[0].settings.norm == "L2" and cert.robustness[0].check_eps == [1.0]
    scale = load_spec("scale")
    assert len(scale.models) <= 15 and scale.quality.budget == 96
    mnist = scale.datasets[0]
    compute = next(g for g in scale.time_to_accuracy if g.name == "compute")
    k384 = next(r for r in compute.runs if r.name == "weight-layerwise-k384-cosine5")
    cfg = scale.timed_config(compute, k384, mnist)
    assert (cfg.replications, cfg.epochs, cfg.schedule, cfg.max_seconds, cfg.injection, cfg.perturb) == (
        384, 5, "cosine", 3600.0, "layerwise", "conv=weight:0.05")
    text = "\n".join(spec_path(n).read_text() for n in packaged_specs()).lower()
    assert "session" not in text and "issue" not in text


ALL = TINY.replace("[robustness]", "[[robustness]]\nname = \"a\"") + """
[certify]
radii = [0.25]

[quality]
budget = 8

[[time_to_accuracy]]
name = "g"
seconds = 1
runs = ["bp", { model = "bp", name = "bp-lr", lr = 0.1 }]
"""


def test_a_spec_with_every_section_validates(tmp_path):
    path = tmp_path / "all.toml"
    path.write_text(ALL)
    spec = load_spec(path)
    assert [g.runs[1].name for g in spec.time_to_accuracy] == ["bp-lr"] and spec.certify.models[0] == "bp"
    assert set(re.findall(r"^\[+([a-z_]+)", ALL, re.M)) == set(SECTIONS)   # every section of the schema


@pytest.mark.parametrize("section", list(SECTIONS) + ["transfer.reference", "time_to_accuracy runs"])
def test_an_unknown_key_is_named_in_one_line_with_its_section(tmp_path, section):
    path = tmp_path / "bad.toml"
    if section == "time_to_accuracy runs":
        text, where = ALL.replace('lr = 0.1 }', 'lr = 0.1, bogus_key = 1 }'), "[[time_to_accuracy]] 'g' runs #2"
    else:
        header = re.search(rf"^\[+{re.escape(section)}\]+.*$", ALL, re.M).group(0)
        text = ALL.replace(header, header + "\nbogus_key = 1", 1)
        where = {"transfer.reference": "[transfer.reference]", "datasets": "[[datasets]] 'digits'",
                 "models": "[[models]] 'src-a'", "robustness": "[[robustness]] 'a'",
                 "time_to_accuracy": "[[time_to_accuracy]] 'g'"}.get(section, f"[{section}]")
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"spec {path}: {where}: unknown key 'bogus_key'; valid: "), msg
    assert len(msg) < 400, msg                        # the valid keys, not the 50 training options


@pytest.mark.parametrize("old,new,match", [
    ("[defaults]\nhidden = [12]", "[defaults]\nhidden = [12]\nlrr = 0.1",
     r"\[defaults\]: unknown key 'lrr'; valid: a training option of `glrnet train` \(a TrainConfig field\); closest: lr$"),
    ("[transfer]\n", "[transfr]\n", r"unknown section \[transfr\]; valid: \[experiment\], \[datasets\]"),
    ('activation = "threshold"', 'activation = "thresh"', r"\[\[models\]\] 'glr-threshold-01': unknown activation"),
    ('name = "tiny"', 'name = "tiny"\nseeds = [0, 0]', "seeds must be a list of distinct integers"),
    ('[[models]]\nname = "bp"', '[[models]]\nname = "bp"\nimage_size = 8', "'image_size' is a \\[\\[datasets\\]\\] key"),
    ('calibrate_model = "bp"', 'calibrate_model = "nope"', r"\[transfer\]: calibrate_model 'nope' is not a source"),
    ('models = ["glr-threshold-01"]', 'models = ["bp-x"]', r"\[replications\]: models: 'bp-x' is not a model of"),
    ("steps = 3", "steps = 0", r"\[robustness\]: attack setting steps must be ≥ 1, got 0"),
    ('models = ["bp", "glr-threshold-01"]', 'models = ["g/x"]', r"\[robustness\]: models: 'g/x' is no run of a"),
    ("[experiment\n", "[experiment\n", "bad.toml"),
])
def test_bad_values_are_named_in_one_line(tmp_path, old, new, match):
    path = tmp_path / "bad.toml"
    text = TINY.replace(old, new, 1) if old != "[experiment\n" else "[experiment\n"
    assert text != TINY
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_spec(path)
    assert "\n" not in str(e.value)


def test_time_to_accuracy_runs_are_checked_as_runs(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(ALL.replace('name = "bp-lr", lr = 0.1', 'name = "bp-lr", loss = "zero_one"'))
    with pytest.raises(ValueError, match=r"\[\[time_to_accuracy\]\] 'g' run 'bp-lr': .*differentiable"):
        load_spec(path)
    path.write_text(ALL.replace('name = "bp-lr", lr = 0.1', 'lr = 0.1'))
    with pytest.raises(ValueError, match=r"runs: names must be unique, got 'bp-sigmoid-cross_entropy'"):
        load_spec(path)


# ---------------------------------------------------------------------------------------- the technique study
def test_study_spec_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert main(["reproduce", "--spec", str(DATA / "scale-smoke.toml"), "--out", str(out), "--quiet"]) == 0
    quality = (out / "quality.md").read_text()
    assert "| bp | sigmoid | cross_entropy | 0 / 1.000 | 0 / 1.000 | 1.000 |" in quality
    assert "| forward | threshold" not in quality            # not applicable: skipped, not run
    short = (out / "short" / "training_digits.md").read_text()
    assert "| combined-threshold-zero_one | combined | threshold | zero_one |" in short
    assert (out / "short" / "progress_digits.png").exists()
    long = (out / "long" / "training_digits.md").read_text()     # the second group, on its own
    assert "| bp-sigmoid-cross_entropy |" in long and "| zero_one |" not in long and "| combined-k4 |" in long
    final = (out / "long" / "quality_final_digits.md").read_text()   # GLR runs only, each K
    assert "| combined-threshold-cross_entropy | threshold | cross_entropy | 4 |" in final and "| 8 |" in final
    assert "| bp-" not in final
    runs = out / "long" / "digits" / "runs"
    assert json.loads((runs / "bp-sigmoid-cross_entropy" / "metrics.json").read_text())["config"]["epochs"] == 2
    assert json.loads((runs / "combined-k4" / "metrics.json").read_text())["config"]["replications"] == 4
    rb = (out / "robustness" / "glr" / "robustness.md").read_text()   # the [[robustness]] table
    assert "combined-threshold-cross_entropy" in rb and "transfer-fgsm" in rb and "worst-case 2×" in rb
    assert (out / "robustness" / "glr" / "robustness_journal.safetensors").exists()


def test_progress_figure_reads_runs_whose_unit_has_a_colon(tmp_path):
    """A run of ``centered:threshold`` lives in ``<model>-centered_threshold-<loss>``; the progress figure's
    series are read from there."""
    from glrnet.experiments.spec import run_name
    from glrnet.experiments.study import progress_series
    name = run_name("t", "centered:threshold", "cross_entropy")
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    (run / "progress.csv").write_text("step,epoch,seconds,budget_seconds,val_acc_ot\n10,1,2.0,1.5,0.5\n20,1,4.0,3.0,0.75\n")
    assert name == "t-centered_threshold-cross_entropy"
    assert progress_series(tmp_path / "runs", [name, "u-threshold-cross_entropy"]) == {name: ([1.5, 3.0], [0.5, 0.75])}
