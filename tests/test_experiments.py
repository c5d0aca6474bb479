"""glrnet reproduce end to end on a tiny spec: structure and sanity of every output."""

import csv
import json
import math

import pytest

from glrnet.cli import main
from glrnet.experiments import load_spec, spec_path

TINY = """
[experiment]
name = "tiny"
dataset = "digits"
subset = 400
eps = [0.1, 0.3]
headline_target = 0.5
calibrate_model = "bp"
lap_replications = 50

[defaults]
hidden = [12]
replications = 50
epochs = 2
eval_replications = 10
lap_replications = 50

[[sources]]
name = "src-a"
method = "bp"
hidden = [32, 16]
activation = "relu"
lr = 0.01
epochs = 8

[[sources]]
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
seed_figures = { orig = 0.99, ot = [0.28, 0.62] }

[[models]]
name = "glr-threshold-01"
label = "threshold, 0-1 loss"
activation = "threshold"
loss = "zero_one"
baseline = true
seed_figures = { orig = 0.86, ot = [0.56, 0.77], lap = [0.58, 0.79] }

[study]
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


@pytest.fixture(scope="module")
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
    for name in ["results.csv", "table1.md", "table2.md", "summary.json", "study.csv", "study.md",
                 "fig2_sigmoid_slopes.png", "fig5_training_curves.png", "fig6_adversarial_examples.png",
                 "fig7_activations.png", "transfer_src-a.png", "robustness_worst_case.png", "robustness.md",
                 "robustness.csv"]:
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "adversarial").rglob("*.safetensors"))) == 2 * 3   # 2 sources × (2 ε + headline)


def test_results_are_complete_and_sane(run):
    _, out = run
    rows = read_csv(out / "results.csv")
    summary = json.loads((out / "summary.json").read_text())
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


def test_tables_have_every_row_with_the_seed_beside_ours(run):
    spec, out = run
    for i in (1, 2):
        text = (out / f"table{i}.md").read_text()
        assert "sigmoid, trained by BP" in text and "threshold, 0-1 loss" in text and "Headline ε" in text
        assert len([l for l in text.splitlines() if l.startswith("| ") and "model" not in l]) == 2
    assert "| 0.99 | 0.28 | – |" in (out / "table1.md").read_text()


def test_study_and_robustness_reports(run):
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


def test_rerun_reuses_everything(run, capsys):
    spec, out = run
    before = (out / "results.csv").read_text()
    mtime = (out / "models" / "bp" / "model.safetensors").stat().st_mtime
    assert main(["reproduce", "--spec", str(spec), "--out", str(out), "--quiet", "--no-robustness"]) == 0
    assert (out / "models" / "bp" / "model.safetensors").stat().st_mtime == mtime
    assert (out / "results.csv").read_text() == before


def test_packaged_specs_load_and_bad_specs_are_named(tmp_path):
    paper = load_spec(spec_path("paper"))
    assert len(paper.models) == 12 and [s.name for s in paper.sources] == ["bp-2hidden", "bp-5hidden"]
    assert (paper.dataset, paper.split, paper.val_fraction) == ("mnist", "seed", 0.1)
    k = {m.name: (m.config.replications, m.config.baseline) for m in paper.models if m.config.method == "glr"}
    assert sum(v == (1000, True) for v in k.values()) == 8
    assert {n for n, v in k.items() if v == (10000, False)} == {"glr-sigmoid-k10000", "glr-threshold-k10000",
                                                                "glr-threshold-01-k10000"}
    assert load_spec(quick=True).dataset == "digits"
    small = load_spec(spec_path("mnist-10k"))
    assert [m.name for m in small.models] == [m.name for m in paper.models][:9] and small.split == "standard"
    fashion = load_spec(spec_path("fashion"))
    assert fashion.dataset == "fashion-mnist" and [m.name for m in fashion.models] == [
        "bp-sigmoid", "glr-sigmoid", "glr-threshold", "glr-threshold-01"]
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace('activation = "threshold"', 'activation = "thresh"'))
    with pytest.raises(ValueError, match="glr-threshold-01.*unknown activation 'thresh'"):
        load_spec(bad)
    bad.write_text("[experiment\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_spec(bad)
