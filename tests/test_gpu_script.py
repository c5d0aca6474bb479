"""benchmarks/gpu/run.sh, the prepared GPU check, cannot rot: its ``--smoke`` run (every stage at toy size on the
CPU, the digits at 28×28 for data) writes all eight output files, each parses, and what they report is
consistent (ratios are step / floor, rates are K·B / step, accuracies lie in [0, 1], the test counts add up);
bad options are refused in one line. No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "device_check.py"
FILES = ("env.json", "tests.json", "tests.log", "bench.json", "profile.txt", "train.json", "train.log", "summary.md")
RUNS = ["mnist-glr-lenet", "mnist-bp-lenet", "fashion-ste-lenet", "fashion-glr-lenet", "fashion-ste-resnet",
        "fashion-glr-resnet", "mnist-bptt-lif", "mnist-glr-lif"]

pytestmark = pytest.mark.slow


def script(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run for the module (typically 30-40 s on two idle cores; the budget leaves room for a busy
    machine, and the script stops when done)."""
    out = tmp_path_factory.mktemp("gpu-smoke")
    res = script("--smoke", "--out", str(out), "--budget-s", "180", "--data-dir", str(out / "absent"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return out, res.stdout


def load(out, name):
    return json.loads((out / name).read_text())


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_file_is_written_and_parses(smoke):
    out, stdout = smoke
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)      # nothing else under --out
    for name in FILES:
        text = (out / name).read_text()
        assert text.strip(), name
        if name.endswith(".json"):
            obj = json.loads(text)
            if name != "env.json":
                assert obj["stage"]["status"] == "ok", (name, obj["stage"])
    env = load(out, "env.json")
    assert env["torch"] == torch.__version__ and env["cpu_count"] == os.cpu_count()
    assert env["cuda_available"] == torch.cuda.is_available() and env["smoke"] is True
    summary = (out / "summary.md").read_text()
    for heading in ("## Tests", "## GLR step against its floor", "## Training runs"):
        assert heading in summary
    assert "device check done" in stdout


def test_the_tests_stage_reports_its_counts(smoke):
    out, _ = smoke
    t = load(out, "tests.json")
    c = t["counts"]
    assert t["total"] == sum(c.values()) == len(t["cases"]) > 0
    assert c["failed"] == c["error"] == c["xpassed"] == 0, [x for x in t["cases"] if x["outcome"] != "passed"]
    assert c["passed"] >= 1
    if not torch.cuda.is_available():                      # the CUDA cases are skipped, not failed
        assert c["skipped"] >= 1 and all(x["outcome"] == "skipped" for x in t["cases"] if "[cuda" in x["id"])
    assert "passed" in (out / "tests.log").read_text()


def test_bench_rows_are_positive_finite_and_consistent(smoke):
    out, _ = smoke
    b = load(out, "bench.json")
    assert b["rows"] and not b["errors"]
    for r in b["rows"]:
        for key in ("step_ms", "floor_ms", "ratio", "sample_replications_per_s"):
            assert finite_positive(r[key]), (key, r)
        assert math.isclose(r["ratio"], r["step_ms"] / r["floor_ms"], rel_tol=1e-9)
        assert math.isclose(r["sample_replications_per_s"], r["K"] * r["B"] / (r["step_ms"] / 1000), rel_tol=1e-9)
        assert r["chunks"] >= 1 and r["variant"] in ("default", "budget", "budget-nocheck", "plain")
    assert {r["technique"] for r in b["rows"]} >= {"activity", "weight"}
    assert b["summary"]["configs"] == len({(r["config"], r["K"]) for r in b["rows"]})
    profile = (out / "profile.txt").read_text()
    worst = max((r for r in b["rows"] if r["variant"] == "default"), key=lambda r: r["ratio"])
    assert profile.startswith(f"# slowest ratio to its floor: {worst['config']} K={worst['K']} B={worst['B']}")
    assert "Name" in profile and b["profiled"].startswith(f"{worst['config']} K={worst['K']}")


def test_every_training_run_finishes_and_reports(smoke):
    out, _ = smoke
    t = load(out, "train.json")
    assert t["order"] == RUNS
    for name in RUNS:
        r = t["runs"][name]
        assert r["status"] == "done", (name, r.get("error"))
        assert 0 <= r["test_accuracy_ot"] <= 1 and r["steps"] >= 1 and r["epochs_done"] == 1
        assert finite_positive(r["calibration"]["s_per_step"])
        assert set(r["time_to_accuracy"]) and all(v is None or v >= 0 for v in r["time_to_accuracy"].values())
        if "-glr-" in name:
            assert 0 <= r["test_accuracy_lap"] <= 1
    pairs = [c for c in t["comparisons"] if "reference" in c]
    assert [c["run"] for c in pairs] == ["fashion-glr-lenet", "fashion-glr-resnet"]
    for c in pairs:
        assert math.isclose(c["gap_ot"], c["bp"] - c["glr_ot"]) and c["met_ot"] == (c["gap_ot"] <= 0.01)
    for run, level in (("mnist-glr-lenet", 0.98), ("mnist-glr-lif", 0.97)):
        goal = next(c for c in t["comparisons"] if c["run"] == run)
        assert goal["met"] == (min(goal["ot"], goal["lap"]) >= level)
    assert "test accuracy" in (out / "train.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--smoke", "--budget-s", "0"], "--budget-s must be > 0"),
    (["--smoke", "--stages", "env,nope"], "--stages: unknown stage(s) nope"),
    (["--smoke", "--train-runs", "mnist-glr-lenet,typo"], "--train-runs: unknown run(s) typo"),
    (["--mnist-k", "1000"], "use a multiple of 3"),
    (["--smoke"], "--out not given and $OUT is not set"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, args, message):
    if "--out" not in args and "not set" not in message:
        args = [*args, "--out", str(tmp_path / "o")]
    res = script(*args, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_the_full_run_without_a_gpu_says_how_to_rehearse(tmp_path):
    res = script("--out", str(tmp_path / "o"), timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "use --smoke" in res.stderr, res.stderr
