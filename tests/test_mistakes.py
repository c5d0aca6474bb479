"""A newcomer's mistakes: each gives the right result, or one line naming the problem and a non-zero exit,
with nothing already written lost. Never a plausible wrong result."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glrnet.cli import main
from glrnet.train import TrainConfig, build_model, train

TINY = ["--epochs", "1", "--replications", "10", "--subset", "200", "--quiet"]
SRC = Path(__file__).resolve().parents[1] / "src"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def err_of(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A GLR run and a back-propagation run on digits (seconds)."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(epochs=1, replications=10, subset=200, eval_replications=2, lap_replications=10)
    train(TrainConfig(**common), root / "glr", quiet=True)
    train(TrainConfig(method="bp", **common), root / "bp", quiet=True)
    return root


# ---------------------------------------------------------------------- data
@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="the shared MNIST / Fashion-MNIST files are absent")
def test_mnist_asked_of_the_fashion_folder_is_refused(tmp_path, capsys):
    rc, err = err_of(capsys, ["train", "--dataset", "mnist", "--data-dir", str(SHARED / "fashion-mnist"), *TINY,
                              "--out", str(tmp_path / "r")])
    assert rc == 2 and one_line(err) == (
        f"glrnet train: error: data folder {SHARED / 'fashion-mnist'} holds fashion-mnist (identified by its files' "
        "checksums), not mnist: pass the mnist folder (or a folder holding mnist/) as --data-dir, or --dataset "
        "fashion-mnist")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="the shared MNIST files are absent")
def test_a_data_folder_without_dataset_is_refused_naming_what_it_holds(tmp_path, capsys):
    rc, err = err_of(capsys, ["train", "--data-dir", str(SHARED / "mnist"), *TINY, "--out", str(tmp_path / "r")])
    assert rc == 2 and one_line(err) == (
        f"glrnet train: error: --data-dir {SHARED / 'mnist'} holds mnist (identified by its files' checksums), but "
        "the dataset is digits (the default; bundled with scikit-learn, it reads no folder): add --dataset mnist")
    assert not (tmp_path / "r").exists()


def test_a_data_folder_without_dataset_is_refused_for_any_folder(tmp_path, capsys):
    from test_data import make_idx_folder
    data = make_idx_folder(tmp_path / "idx")
    rc, err = err_of(capsys, ["train", "--data-dir", str(data), *TINY, "--out", str(tmp_path / "r")])
    assert rc == 2 and "holds IDX files, but the dataset is digits" in one_line(err)
    assert "add --dataset mnist or --dataset fashion-mnist" in err


# ---------------------------------------------------------------------- the output folder
@pytest.mark.slow
def test_a_second_training_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """A live process holds the folder (a real lock, taken by another interpreter): the training refuses
    with one line and writes nothing; once that process is gone, the lock is gone too."""
    out = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom glrnet.checkpoint import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = err_of(capsys, ["train", *TINY, "--out", str(out)])
        assert rc == 2 and one_line(err) == (
            f"glrnet train: error: --out {out} is in use by another glrnet process (pid {holder.pid}; lock file "
            f"{out / '.glrnet.lock'}): wait for it to finish, or choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [".glrnet.lock"]
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not out.exists()     # released, and the empty folder it made removed


def test_a_running_training_keeps_its_files_when_a_second_one_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ".glrnet.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")   # a live process
    rc, err = err_of(capsys, ["train", *TINY, "--resume", "--epochs", "2", "--out", str(out)])
    assert rc == 2 and "is in use by another glrnet process" in one_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".glrnet.lock"} == before


def test_a_stale_lock_is_taken_over_saying_so(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "r"
    out.mkdir()
    (out / ".glrnet.lock").write_text(f"{pid} {socket.gethostname()}\n")
    rc, err = err_of(capsys, ["train", *TINY, "--out", str(out)])
    assert rc == 0 and f"taking over the lock {out / '.glrnet.lock'} of pid {pid}, which is no longer running" in err
    assert (out / "metrics.json").exists() and not (out / ".glrnet.lock").exists()


@pytest.mark.parametrize("where,why", [("/proc/glrnet-x", "No such file or directory"),
                                       ("FILE/sub", "Not a directory")])
def test_an_out_that_cannot_be_made_is_one_line(tmp_path, capsys, where, why):
    (tmp_path / "FILE").write_text("keep me")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    for command in (["train", *TINY], ["certify", "--run", str(tmp_path)], ["robustness", "--run", str(tmp_path)]):
        rc, err = err_of(capsys, [*command, "--out", out])
        assert rc == 2 and one_line(err).endswith(f"error: --out {out}: cannot create the folder ({why}); choose "
                                                  "another --out"), err
    assert (tmp_path / "FILE").read_text() == "keep me"


def test_an_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    """(As root every folder is writable: the refusal of the file system is simulated.)"""
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    rc, err = err_of(capsys, ["train", *TINY, "--out", str(tmp_path / "ro" / "r")])
    assert rc == 2 and one_line(err) == (f"glrnet train: error: --out {tmp_path / 'ro' / 'r'}: cannot create the "
                                         "folder (Permission denied); choose another --out")


# ---------------------------------------------------------------------- options a method ignores
@pytest.mark.parametrize("options,message", [
    (["--method", "es", "--sampler", "qmc"], "sampler qmc draws GLR's noise; method es does not use it (ES draws its "
                                             "own antithetic pairs): drop --sampler or use --method glr"),
    (["--method", "es", "--sampler", "iid"], "sampler iid draws GLR's noise; method es does not use it"),
    (["--method", "bp", "--injection", "layerwise"], "injection layerwise is for GLR and forward gradients; method bp "
                                                     "does not use it: drop --injection"),
    (["--method", "es", "--no-baseline"], "the leave-one-out baseline is GLR's control variate; method es does not "
                                          "use it: drop --baseline / --no-baseline"),
    (["--method", "bp", "--baseline"], "the leave-one-out baseline is GLR's control variate; method bp"),
    (["--method", "es", "--perturb", "all=weight"], "--perturb all=weight:0.05 sets GLR's perturbation; method es "
                                                    "perturbs every weight itself"),
    (["--method", "bp", "--perturb", "first=weight"], "--perturb first=weight:0.05 sets GLR's perturbation; method bp "
                                                      "trains the noise-free network"),
    (["--method", "es", "--weight-noise", "all"], "--perturb all=weight:0.05 sets GLR's perturbation; method es"),
    (["--perturb", "conv=weight"], "--perturb conv=weight:0.05 puts noise on the convolutions, and arch mlp has none"),
    (["--weight-noise", "conv"], "--perturb conv=weight:0.05 puts noise on the convolutions, and arch mlp has none"),
    (["--arch", "lif:16", "--encoding", "rate:4", "--perturb", "conv=weight"],
     "--perturb conv=weight:0.05 puts noise on the convolutions, and arch lif:16 has none"),
    (["--sigma", "0.1"], "sigma is ES's σ and SPSA's ε; method glr does not use it"),
    (["--perturb", "conv:weight"], "--perturb: cannot read 'conv:weight'; use activity, or WHICH=PERTURBATION[:STD]"),
    (["--eval-replications", "0"], "eval replications must be ≥ 1, got 0"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, options, message):
    rc, err = err_of(capsys, ["train", *TINY, *options, "--out", str(tmp_path / "r")])
    assert rc == 2 and one_line(err).startswith(f"glrnet train: error: {message}"), err
    assert not (tmp_path / "r").exists()


def test_the_library_refuses_ignored_options_and_accepts_a_methods_own_state():
    with pytest.raises(ValueError, match="sampler antithetic draws GLR's noise; method spsa does not use it"):
        TrainConfig(method="spsa", sampler="antithetic").validate()
    with pytest.raises(ValueError, match="injection layerwise is for GLR and forward gradients; method es"):
        TrainConfig(method="es", injection="layerwise").validate()
    TrainConfig(method="es", baseline=False).validate()      # no baseline is what ES is (specs' defaults say so)
    TrainConfig(method="forward", injection="layerwise").validate()
    TrainConfig(method="bp", bp_noise=True, perturb="first=weight").validate()


def test_a_perturbation_site_with_no_layer_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="arch avgpool:2 has no convolutions to carry it"):
        build_model(TrainConfig(arch="avgpool:2", perturb="conv=weight"), (28, 28), 10)


def test_weight_noise_on_an_mlp_trains_and_is_saved_with_its_sites(tmp_path, capsys):
    from glrnet.checkpoint import load_model
    assert main(["train", *TINY, "--perturb", "first=weight", "--out", str(tmp_path / "r")]) == 0
    model, _ = load_model(tmp_path / "r" / "model.safetensors")
    assert [m.site for m in model.noisy_layers] == ["weight", "activity"]
    assert model.noisy_layers[0].noise.stddev == pytest.approx(0.05)
    assert model.noisy_layers[1].noise.stddev == pytest.approx(2.0)
    rc, err = err_of(capsys, ["certify", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "c")])
    assert rc == 2 and "carries its noise on its weights (site 'weight')" in one_line(err)
    assert not (tmp_path / "c").exists()


def test_es_history_reports_passes_per_input(tmp_path):
    import csv
    train(TrainConfig(method="es", epochs=1, replications=10, subset=200, eval_replications=2), tmp_path, quiet=True)
    row = next(csv.DictReader(open(tmp_path / "history.csv")))
    ratio = float(row["sample_replications_per_second"]) / float(row["samples_per_second"])
    assert ratio == pytest.approx(10, rel=1e-4)


# ---------------------------------------------------------------------- robustness
@pytest.mark.parametrize("eps,norm,message", [
    ("2", "Linf", "--eps 2: an L∞ budget on images with pixels in [0, 1] must be in (0, 1]"),
    ("-0.1", "Linf", "--eps -0.1: an L∞ budget on images with pixels in [0, 1] must be in (0, 1]"),
    ("0.1,0", "Linf", "--eps 0: an L∞ budget on images with pixels in [0, 1] must be in (0, 1]"),
    ("-0.1", "L2", "--eps -0.1: an L2 budget must be > 0"),
    ("0.5,9", "L2", "--eps 9: an L2 budget above the diagonal √d = 8 of the image cube [0, 1]^64 reaches every "
                    "image; use ε ≤ 8"),
])
def test_a_budget_the_threat_model_cannot_mean_is_refused(runs, tmp_path, capsys, eps, norm, message):
    rc, err = err_of(capsys, ["robustness", "--run", str(runs / "glr"), "--images", "50", "--eps", eps, "--norm", norm,
                              "--out", str(tmp_path / "a")])
    assert rc == 2 and one_line(err).startswith(f"glrnet robustness: error: {message}"), err
    assert not (tmp_path / "a").exists()


def test_the_protocol_refuses_a_budget_too(runs):
    from glrnet.robustness.settings import AttackSettings
    from glrnet.checkpoint import load_model
    from glrnet.robustness.protocol import attack_and_report
    model = load_model(runs / "glr" / "model.safetensors")[0]
    with pytest.raises(ValueError, match="--eps 1.5: an L∞ budget"):
        attack_and_report(Path("unused"), {"m": (model, True)}, torch.rand(2, 64), torch.zeros(2, dtype=torch.long),
                          [0.1], AttackSettings(), None, 1.5)
    assert not Path("unused").exists()


def test_runs_of_two_datasets_are_refused_upfront(runs, tmp_path, capsys):
    from test_data import make_idx_folder
    data = make_idx_folder(tmp_path / "idx", n_train=100)
    other = tmp_path / "mnist-run"
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data), "--image-size", "14", *TINY[:4], "--quiet",
                 "--out", str(other)]) == 0
    rc, err = err_of(capsys, ["robustness", "--run", str(runs / "glr"), str(other), "--out", str(tmp_path / "a")])
    assert rc == 2 and one_line(err) == (
        f"glrnet robustness: error: --run: the runs were trained on different data ({runs / 'glr'}: digits, split "
        f"standard; {other}: mnist at 14×14, split standard); attack the runs of one dataset at a time")


def test_two_runs_of_one_name_are_refused(runs, tmp_path, capsys):
    import shutil
    shutil.copytree(runs / "glr", tmp_path / "glr")
    rc, err = err_of(capsys, ["robustness", "--run", str(runs / "glr"), str(tmp_path / "glr"),
                              "--out", str(tmp_path / "a")])
    assert rc == 2 and "--run: two runs are named 'glr'" in one_line(err)


# ---------------------------------------------------------------------- certify and evaluate
def test_certify_refuses_a_run_trained_without_noise(runs, tmp_path, capsys):
    rc, err = err_of(capsys, ["certify", "--run", str(runs / "bp"), "--out", str(tmp_path / "c")])
    assert rc == 2 and one_line(err) == (
        f"glrnet certify: error: --run {runs / 'bp'} was trained without noise (method bp, no --bp-noise): certifying "
        "it would certify a noisy network it never was; certify a run trained with noise (glr, or bp --bp-noise)")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flag", ["--images", "--subset"])
def test_certify_zero_images_is_one_line(runs, tmp_path, capsys, flag):
    rc, err = err_of(capsys, ["certify", "--run", str(runs / "glr"), flag, "0", "--out", str(tmp_path / "c")])
    assert rc == 2 and one_line(err) == f"glrnet certify: error: {flag} must be ≥ 1 test image, got 0"


def test_evaluate_subset_is_that_many_test_images(runs, capsys):
    import glrnet
    from glrnet.checkpoint import load_model
    assert main(["evaluate", "--run", str(runs / "glr"), "--subset", "100", "--lap-replications", "10",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    data = glrnet.load_dataset("digits")
    model = load_model(runs / "glr" / "model.safetensors")[0]
    expected = (glrnet.predict(model, data.x_test[:100], "ot") == data.y_test[:100]).double().mean().item()
    assert result["test_images"] == 100 and result["accuracy_ot"] == pytest.approx(expected)


# ---------------------------------------------------------------------- console
def test_progress_bars_refresh_rarely_when_stderr_is_a_log(tmp_path, capsys):
    """Under pytest stderr is not a terminal: after the command, a bar redraws once a minute at most."""
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 0
    from tqdm.auto import tqdm
    bar = tqdm(total=1, disable=False)
    assert bar.mininterval == 60.0
    bar.close()


def test_the_attack_console_speaks_plain_words_and_a_short_eps_grid_is_not_a_failure(monkeypatch, tmp_path, capsys):
    import glrnet.robustness.protocol as rb
    from glrnet.robustness.settings import AttackSettings
    assert rb.describe_attack("apgd-dlr[sigmoid:8]") == "APGD (DLR loss) through the sigmoid:8 surrogate"
    assert rb.describe_attack("transfer-fgsm") == "FGSM transferred from the source network"
    eps = [0.05, 0.1]
    rows = [{"model": "m", "attack": a, "eps": e, "acc_ot": 0.5, "acc_lap": float("nan"), "images": 4}
            for a in ("worst-case", "transfer-fgsm") for e in eps] + \
        [{"model": "m", "attack": "none", "eps": 0.0, "acc_ot": 0.9, "acc_lap": float("nan"), "images": 4}]
    monkeypatch.setattr(rb, "evaluate_robustness", lambda *a, **k: rb.RobustnessResult(rows))
    monkeypatch.setattr(rb, "sanity_checks", lambda *a, **k: rb.ChecksResult([
        {"model": "m", "check": "reaches chance (≤ 0.15) at ε = 0.1 (ot)", "value": "0.500", "pass": False}]))
    rb.attack_and_report(tmp_path, {"m": (None, False)}, [0] * 4, [0] * 4, eps, AttackSettings(), None, 0.1, quiet=True)
    err = capsys.readouterr().err
    assert "FAILED" not in err and "the grid stops short of where the attacks reach chance (add a larger --eps" in err
