"""The prepared GPU check of glrnet: environment, CUDA tests, benchmarks against their floors, training runs.

    benchmarks/gpu/run.sh [--smoke] [--out DIR] [--budget-s S] [--stages env,tests,bench,train] [options]

Stages, in order, each in its own process with its own time limit (a stage that fails or runs out of time is
recorded as such and the next one starts); the whole stops itself within ``--budget-s``:

1. env    GPU, torch / CUDA / cuDNN versions, device memory, CPU count, packages       → env.json
2. tests  tests/test_cuda.py on every device here (pytest, or a small runner without it) → tests.json, tests.log
3. bench  GLR steps against their floors (gpu_bench.py); a profile of the worst ratio    → bench.json, profile.txt
4. train  the study's training runs, most important first (gpu_train.py)                → train.json, train.log

and ``summary.md`` after every stage. These eight files are all it writes under ``--out`` (training checkpoints go
to a temporary folder, ``--work``). ``--smoke``: every stage at toy size on the CPU in well under a minute (the
normal test suite runs it: tests/test_gpu_script.py). Data: ``--data-dir`` (default ``.gpudata`` in the checkout,
git-ignored) with ``mnist/`` and ``fashion-mnist/`` IDX folders; see benchmarks/gpu/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STAGES = ("env", "tests", "bench", "train")
FILES = ("env.json", "tests.json", "tests.log", "bench.json", "profile.txt", "train.json", "train.log", "summary.md")
# --smoke runs these tests of tests/test_cuda.py only (a pass, the CUDA skips, the expected failure): the
# stage's plumbing; the normal suite runs the whole file
SMOKE_TESTS = "seeded_generator or float16_loss"
STAGE_FILES = {"env": ["env.json"], "tests": ["tests.json", "tests.log"], "bench": ["bench.json", "profile.txt"],
               "train": ["train.json", "train.log"]}


class Parser(argparse.ArgumentParser):
    """Bad options: one line, exit status 2."""

    def error(self, message):
        sys.stderr.write(f"device_check: error: {message}\n")
        sys.exit(2)


def parse(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, well under a minute")
    p.add_argument("--out", default=None, help="folder for the eight output files (default: $OUT)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget in seconds (default: 480; --smoke: 60)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke: cpu)")
    p.add_argument("--data-dir", default=".gpudata", help="folder holding mnist/ and fashion-mnist/ (IDX files)")
    p.add_argument("--work", default=None, help="folder for training checkpoints (default: a temporary folder)")
    p.add_argument("--tests-s", type=float, default=None, help="time limit of the tests stage (default 90; smoke 30)")
    p.add_argument("--bench-s", type=float, default=None, help="time limit of the bench stage (default 100; smoke 25)")
    p.add_argument("--bench-only", default="", help="bench: only configurations whose label contains this text")
    p.add_argument("--train-runs", default="", help="train: comma-separated run names (default: all, in order)")
    p.add_argument("--mnist-k", type=int, default=1536, help="train: K of the MNIST GLR run (default 1536)")
    p.add_argument("--mnist-epochs", type=int, default=5, help="train: epochs of the MNIST GLR run (default 5)")
    p.add_argument("--fashion-k", type=int, default=1536, help="train: K of the Fashion-MNIST GLR runs (default 1536)")
    p.add_argument("--memory-budget-mb", type=float, default=4096.0,
                   help="train: the GLR runs' memory budget (default 4096: K = 1,536 in one chunk)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)        # internal: run one stage in this process
    p.add_argument("--stage-seconds", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown stage(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(STAGES)}")
    a.stages = stages
    a.out = a.out or os.environ.get("OUT")
    if not a.out:
        p.error("--out not given and $OUT is not set: name the folder for the results")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out} is a file, not a folder")
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    if a.device.split(":")[0] not in ("cuda", "cpu"):
        p.error(f"--device {a.device!r}: use cuda, cuda:N or cpu")
    a.budget_s = a.budget_s if a.budget_s is not None else (60.0 if a.smoke else 480.0)
    a.tests_s = a.tests_s if a.tests_s is not None else (30.0 if a.smoke else 90.0)
    a.bench_s = a.bench_s if a.bench_s is not None else (25.0 if a.smoke else 100.0)
    for name in ("budget_s", "tests_s", "bench_s", "memory_budget_mb"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    for name in ("mnist_k", "mnist_epochs", "fashion_k"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(a, name)}")
    if a.mnist_k % 3:
        p.error(f"--mnist-k {a.mnist_k}: layer-wise injection spends K evenly over the LeNet's 3 noisy layers: "
                "use a multiple of 3 (e.g. 1536)")
    if a.fashion_k % 24:
        p.error(f"--fashion-k {a.fashion_k}: layer-wise injection spends K evenly over 3 (LeNet) and 8 (ResNet) "
                "noisy layers: use a multiple of 24 (e.g. 1536)")
    if a.train_runs:
        sys.path.insert(0, str(HERE))
        from gpu_train import RUN_NAMES   # noqa: E402
        bad = [r for r in a.train_runs.split(",") if r and r not in RUN_NAMES]
        if bad:
            p.error(f"--train-runs: unknown run(s) {', '.join(bad)}; valid: {', '.join(RUN_NAMES)}")
    return a


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- stage: env
def stage_env(a) -> None:
    t0 = time.time()
    import torch
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
           "processor": platform.processor(), "cpu_count": os.cpu_count(),
           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
           "device_requested": a.device, "smoke": a.smoke, "budget_s": a.budget_s,
           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
           "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH")
                   if k in os.environ}}
    from importlib.metadata import PackageNotFoundError, version
    for mod in ("numpy", "scipy", "scikit-learn", "matplotlib", "tqdm", "safetensors", "pytest"):
        try:
            env[mod] = version(mod)
        except PackageNotFoundError:      # absent (pytest may be): the tests stage then runs its own runner
            env[mod] = "absent"
    import glrnet
    env["glrnet"] = {"version": glrnet.__version__, "path": str(Path(glrnet.__file__).parent)}
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    if torch.cuda.is_available():
        try:       # whatever fails here, env.json is still written, saying what
            devs = []
            for i in range(torch.cuda.device_count()):
                pr = torch.cuda.get_device_properties(i)
                devs.append({"index": i, "name": pr.name, "total_memory_gib": pr.total_memory / 2**30,
                             "capability": f"{pr.major}.{pr.minor}", "multiprocessors": pr.multi_processor_count})
            env["devices"] = devs
            t = time.time()                     # first use: context creation, a draw, a product
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.empty(1024, 1024, device="cuda").normal_(generator=g)
            float((x @ x).sum())
            env["cuda_first_use_s"] = time.time() - t
            free, total = torch.cuda.mem_get_info()
            env["memory_free_gib"], env["memory_total_gib"] = free / 2**30, total / 2**30
            try:
                env["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            except Exception as e:
                env["nvidia_smi"] = f"unavailable ({type(e).__name__})"
        except Exception as e:
            env["cuda_error"] = f"{type(e).__name__}: {e}"
    env["seconds"] = time.time() - t0
    write_json(Path(a.out) / "env.json", env)
    gpu = env.get("devices", [{}])[0].get("name", "no GPU")
    print(f"env: {gpu}; torch {env['torch']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}, "
          f"{env['cpu_count']} CPUs, pytest {env['pytest']}", flush=True)


# ---------------------------------------------------------------------------- stage: tests
class Outcomes:
    """A pytest plugin that keeps each test's final outcome (``progress``: called after each report)."""

    def __init__(self, progress=None):
        self.cases, self.progress = {}, progress

    def pytest_runtest_logreport(self, report):
        c = self.cases.setdefault(report.nodeid, {"id": report.nodeid, "outcome": "passed", "seconds": 0.0})
        c["seconds"] += getattr(report, "duration", 0.0)
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                c["outcome"] = "xfailed" if report.skipped else "xpassed"
            else:
                c["outcome"] = report.outcome
        elif report.skipped:
            c["outcome"] = "skipped"
        elif report.failed:
            c["outcome"] = "error" if report.when == "setup" else "failed"
        if report.failed or report.skipped:
            text = str(report.longrepr) if report.longrepr is not None else ""
            c["message"] = text.strip().splitlines()[-1][:500] if text.strip() else ""
        if self.progress is not None and report.when == "teardown":
            self.progress(list(self.cases.values()))


def fallback_runner(module, log, only: list[str] | None = None, progress=None) -> list[dict]:
    """Call every ``test_*`` function of ``module`` on every case it declares (``fn.cases``), as pytest would
    (``torch.manual_seed(0)`` first, a fresh ``tmp_path``); ``fn.expected_failure``: a strict expected failure."""
    import unittest
    import torch
    cases = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != module.__name__:
            continue
        if only is not None and not any(o in name for o in only):
            continue
        for kw in module.all_cases(fn):
            cid = f"{module.__name__}.py::{name}[{'-'.join(str(v) for v in kw.values())}]"
            t = time.time()
            outcome, message = "passed", ""
            with tempfile.TemporaryDirectory() as tmp:
                args = dict(kw)
                if "tmp_path" in inspect.signature(fn).parameters:
                    args["tmp_path"] = Path(tmp)
                torch.manual_seed(0)
                try:
                    fn(**args)
                    if getattr(fn, "expected_failure", None):
                        outcome, message = "failed", "[XPASS(strict)] " + fn.expected_failure
                except unittest.SkipTest as e:
                    outcome, message = "skipped", str(e)
                except Exception as e:
                    if getattr(fn, "expected_failure", None):
                        outcome, message = "xfailed", f"{type(e).__name__}: {e}"[:500]
                    else:
                        outcome, message = "failed", f"{type(e).__name__}: {e}"[:500]
                        log.write(traceback.format_exc())
            cases.append({"id": cid, "outcome": outcome, "seconds": time.time() - t, "message": message})
            log.write(f"{cid} {outcome.upper()} ({time.time() - t:.2f} s){': ' + message if message else ''}\n")
            log.flush()
            if progress is not None:
                progress(cases)
    return cases


def tests_record(cases: list[dict], runner: str, exit_code, seconds: float, finished: bool) -> dict:
    import torch
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped", "xfailed",
                                                                  "xpassed")}
    return {"runner": runner, "file": "tests/test_cuda.py", "finished": finished, "exit_code": exit_code,
            "cuda_available": torch.cuda.is_available(), "counts": counts, "total": len(cases), "cases": cases,
            "seconds": seconds}


def stage_tests(a) -> None:
    t0 = time.time()
    import torch
    out = Path(a.out)
    target = ROOT / "tests" / "test_cuda.py"
    runner = "?"

    def progress(cases):       # tests.json after every test: a stage stopped at its limit still reports
        write_json(out / "tests.json", tests_record(cases, runner, None, time.time() - t0, False))
    with open(out / "tests.log", "w") as log:
        try:
            os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"   # this stage's process only: no third-party plugins
            import pytest
            runner = f"pytest {pytest.__version__}"
        except ImportError:
            pytest, runner = None, "fallback (pytest absent): benchmarks/gpu/device_check.py calls the test functions"
        log.write(f"# {runner}; CUDA available: {torch.cuda.is_available()}\n")
        log.flush()
        if pytest is not None:
            plugin = Outcomes(progress)
            select = ["-k", SMOKE_TESTS] if a.smoke else []     # smoke: the plumbing (the suite runs the file)
            old_out, old_err = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log             # pytest's report into tests.log
            try:
                rc = pytest.main([str(target), "-v", "-rA", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                                  "-o", "addopts=",   # the project's addopts name pytest-xdist, not loaded here
                                  "-W", "ignore::pytest.PytestUnknownMarkWarning", *select], plugins=[plugin])
            finally:
                sys.stdout, sys.stderr = old_out, old_err
            cases = list(plugin.cases.values())
            exit_code = int(rc)
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            module = importlib.import_module("test_cuda")
            cases = fallback_runner(module, log, SMOKE_TESTS.split(" or ") if a.smoke else None, progress)
            exit_code = None
    record = tests_record(cases, runner, exit_code, time.time() - t0, True)
    write_json(out / "tests.json", record)
    counts = record["counts"]
    bad = [c for c in cases if c["outcome"] in ("failed", "error", "xpassed")]
    print("tests: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" ({runner.split(' (')[0]})"
          + "".join(f"\n  {c['outcome'].upper()} {c['id']}: {c.get('message', '')}" for c in bad), flush=True)


# ---------------------------------------------------------------------------- stages: bench, train
def stage_bench(a) -> None:
    sys.path.insert(0, str(HERE))
    import gpu_bench
    seconds = a.stage_seconds or a.bench_s
    deadline = time.time() + max(1.0, seconds - (1.5 if a.smoke else 5))     # bench.json written before the limit
    gpu_bench.run(Path(a.out) / "bench.json", Path(a.out) / "profile.txt", a.device, a.smoke, None, deadline,
                  a.bench_only)


def stage_train(a) -> None:
    sys.path.insert(0, str(HERE))
    import gpu_train
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="glrnet-gpu-train-"))
    names = [n for n in a.train_runs.split(",") if n] or None
    end = time.time() + a.stage_seconds - (2.0 if a.smoke else 5.0)     # train.json written before the limit
    try:
        gpu_train.run_all(Path(a.out) / "train.json", Path(a.out) / "train.log", work, Path(a.data_dir), a.device,
                          a.smoke, end, names, mnist_k=a.mnist_k, mnist_epochs=a.mnist_epochs,
                          fashion_k=a.fashion_k, memory_budget_mb=a.memory_budget_mb)
    finally:
        if not a.work:                  # a temporary folder of ours: what the runs reported is in train.json
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- the whole
def run_stage(a, stage: str, seconds: float) -> dict:
    """``stage`` in a child process (its own process group) limited to ``seconds``; what happened."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--stage-seconds", repr(seconds),
           *argv_without_stage(a.argv)]
    t = time.time()
    print(f"== stage {stage}: up to {seconds:.0f} s", flush=True)
    env = dict(os.environ)
    if a.smoke:       # one torch thread per process: on a busy shared CPU, spinning thread pools stall toy runs
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=os.setpgrp)   # its own process group: stopped with its children
    try:
        rc = proc.wait(timeout=seconds)
        status = "ok" if rc == 0 else f"failed (exit code {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)           # the stage's own process group, started above
        proc.wait()
        status = f"stopped at its limit ({seconds:.0f} s)"
    info = {"status": status, "seconds": round(time.time() - t, 1), "limit_s": round(seconds, 1)}
    print(f"== stage {stage}: {status} after {info['seconds']} s", flush=True)
    out = Path(a.out)
    for name in STAGE_FILES[stage]:                    # every file exists and parses, whatever happened
        path = out / name
        if name.endswith(".json"):
            obj = read_json(path)
            if obj is None:
                obj = {"status": "missing", "error": f"stage {stage}: {status}; no result written"}
            obj["stage"] = info
            write_json(path, obj)
        elif not path.exists():
            path.write_text(f"stage {stage}: {status}; nothing written\n")
    return info


def argv_without_stage(argv: list[str]) -> list[str]:
    args, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--stage", "--stage-seconds"):
            skip = True
            continue
        if x.startswith("--stage=") or x.startswith("--stage-seconds="):
            continue
        args.append(x)
    return args


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def summary(a, stages: dict, started: float) -> str:
    out = Path(a.out)
    env, tests, bench, train = (read_json(out / f) or {} for f in ("env.json", "tests.json", "bench.json",
                                                                    "train.json"))
    lines = [f"# glrnet device check{' (smoke: toy sizes on the CPU)' if a.smoke else ''}", "",
             f"Wall time {time.time() - started:.0f} s of a {a.budget_s:.0f} s budget; device {a.device}.", ""]
    if env:
        gpu = ", ".join(f"{d['name']} ({d['total_memory_gib']:.0f} GiB)" for d in env.get("devices", [])) or "no GPU"
        lines += [f"Environment: {gpu}; torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, cuDNN "
                  f"{env.get('cudnn')}; Python {env.get('python')}; {env.get('cpu_count')} CPUs; pytest "
                  f"{env.get('pytest')}; commit {env.get('git_commit') or 'unknown'}.", ""]
    lines += ["| stage | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {s} | {i['status']} | {i['seconds']} | {i['limit_s']} |" for s, i in stages.items()]
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", f"## Tests (tests/test_cuda.py, {tests.get('runner', '?').split(' (')[0]})", "",
                  ", ".join(f"{v} {k}" for k, v in c.items() if v) + "."]
        lines += [f"- {x['outcome'].upper()} `{x['id']}`: {x.get('message', '')}" for x in tests.get("cases", [])
                  if x["outcome"] in ("failed", "error", "xpassed")]
    if bench.get("rows"):
        lines += ["", "## GLR step against its floor (the K·B noisy forward passes and their noise)", "",
                  "| configuration | K | B | variant | step ms | floor ms | ratio | sample-rep/s | chunks | syncs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['config']} | {r['K']} | {r['B']} | {r['variant']} | {r['step_ms']:.3f} | "
                         f"{r['floor_ms']:.3f} | {r['ratio']:.2f} | {r['sample_replications_per_s']:.3g} | "
                         f"{r['chunks']} | {_fmt(r.get('host_syncs'), 'd')} |")
        s = bench.get("summary", {})
        lines += ["", f"Targets: ratio ≤ {bench['targets']['ratio_max']} everywhere (default variant: "
                  f"{s.get('default_within_target')} of {s.get('configs')}; best variant: "
                  f"{s.get('best_variant_within_target')} of {s.get('configs')}; worst default ratio "
                  f"{_fmt(s.get('max_default_ratio'), '.2f')}); seed MLP ≥ 10⁹ sample-replications/s (best: "
                  f"{_fmt(s.get('seed_mlp_best_sample_replications_per_s'), '.3g')}). Profile of "
                  f"{bench.get('profiled', '–')}: profile.txt."]
        if bench.get("skipped") or bench.get("errors"):
            lines += [f"- not measured: {x}" for x in bench.get("skipped", []) + bench.get("errors", [])]
    runs = train.get("runs", {})
    if runs:
        lines += ["", "## Training runs", "",
                  "| run | data | status | test OT | test LAP | epochs | steps | train s | s/step | time to accuracy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in train.get("order", runs):
            r = runs.get(name, {})
            tta = ", ".join(f"{k}: {'–' if v is None else f'{v:.0f} s'}" for k, v in
                            (r.get("time_to_accuracy") or {}).items())
            cal = r.get("calibration") or {}
            lines.append(f"| {name} | {r.get('data', r.get('dataset', '?'))} | {r.get('status')}"
                         f"{': ' + r['error'] if r.get('error') else ''} | {_fmt(r.get('test_accuracy_ot'), '.4f')} | "
                         f"{_fmt(r.get('test_accuracy_lap'), '.4f')} | {r.get('epochs_done', '–')}"
                         f"{'/' + str(cal['epochs']) if cal.get('epochs') else ''} | {r.get('steps', '–')} | "
                         f"{_fmt(r.get('train_seconds'), '.0f')} | {_fmt(cal.get('s_per_step'), '.4f')} | {tta} |")
        for c in train.get("comparisons", []):
            if "reference" in c:
                lines.append(f"- {c['run']} against {c['reference']}: BP {c['bp']:.4f}, GLR OT {c['glr_ot']:.4f} / "
                             f"LAP {_fmt(c.get('glr_lap'), '.4f')}; gap OT {c['gap_ot']:+.4f}, LAP "
                             f"{_fmt(c.get('gap_lap'), '+.4f')}; goal (gap ≤ 0.01) met: OT {c['met_ot']}, LAP "
                             f"{c['met_lap']} (epochs: GLR {c.get('glr_epochs_done')}, BP {c.get('bp_epochs_done')}; "
                             f"BP after 20 epochs on the CPU: {c['cpu_reference_bp']}, gap to it OT "
                             f"{c['gap_to_cpu_reference_ot']:+.4f})")
            else:
                lines.append(f"- {c['run']}: {c['goal']}: OT {_fmt(c['ot'], '.4f')}, LAP {_fmt(c['lap'], '.4f')}: "
                             f"{'met' if c['met'] else 'not met'} ({c.get('epochs_done')} epochs"
                             f"{', stopped by time' if c.get('stopped_by_time') else ''})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse(argv)
    if a.stage:                                     # a child: one stage in this process
        {"env": stage_env, "tests": stage_tests, "bench": stage_bench, "train": stage_train}[a.stage](a)
        return 0
    started = time.time()
    import torch
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None else
                 f"CUDA {torch.version.cuda}, but no GPU is visible")
        sys.stderr.write(f"device_check: error: --device {a.device}: this torch ({torch.__version__}) is {build}; "
                         "use --smoke for the CPU rehearsal or --device cpu for the full sizes on the CPU\n")
        return 2
    Path(a.out).mkdir(parents=True, exist_ok=True)
    data = Path(a.data_dir)
    if "train" in a.stages and not a.smoke and not all((data / d).is_dir() for d in ("mnist", "fashion-mnist")):
        print(f"warning: {data} lacks mnist/ or fashion-mnist/; the training runs on them will fail. Copy them first: "
              "mkdir -p .gpudata && cp -r ../shared/data/mnist ../shared/data/fashion-mnist .gpudata/ (and name "
              ".gpudata in the run call's carry)", flush=True)
    end = started + a.budget_s - (2.0 if a.smoke else 8.0)      # the summary's time
    caps = {"env": 20.0 if a.smoke else 60.0, "tests": a.tests_s, "bench": a.bench_s, "train": None}
    stages = {}
    for stage in a.stages:
        left = end - time.time()
        if left < (3.0 if a.smoke else 15.0):
            stages[stage] = {"status": f"skipped: {left:.0f} s of the budget left", "seconds": 0, "limit_s": 0}
            print(f"== stage {stage}: skipped, {left:.0f} s left", flush=True)
            continue
        seconds = left if caps[stage] is None else min(caps[stage], left)
        stages[stage] = run_stage(a, stage, seconds)
        (Path(a.out) / "summary.md").write_text(summary(a, stages, started))
    (Path(a.out) / "summary.md").write_text(summary(a, stages, started))
    print(f"device check done in {time.time() - started:.0f} s; results in {a.out}: "
          + ", ".join(f for f in FILES if (Path(a.out) / f).exists()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
