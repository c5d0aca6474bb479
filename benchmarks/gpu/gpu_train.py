"""The training stage of ``device_check.py``: the study's goals, each run in its own process with its own limit.

Runs, in this order (the most important first), each given a share of the time left when it starts (a run that
finishes early leaves its time to the later ones):

==================== ======================================================================== =====
run                  what                                                                     share
==================== ======================================================================== =====
mnist-glr-lenet      GLR, the threshold LeNet, ``weight-layerwise`` (weight noise σ_w 0.05 on  0.55
                     the convolutions, layer-wise injection, leave-one-out baseline, Adam
                     0.01 annealed by cosine, batch 32), K = 1,536 over 5 epochs. Goal: test
                     accuracy ≥ 0.98, OT and LAP
mnist-bp-lenet       back-propagation, the sigmoid LeNet (the scale spec's ``bp``: Adam        0.05
                     0.001): its time to accuracy on the same GPU
fashion-ste-lenet    the threshold LeNet by BP with a surrogate derivative (sigmoid(4v),       0.06
                     ``docs/results/scale/ste_capacity.py``): the BP reference (CPU: 0.852)
fashion-glr-lenet    GLR weight-layerwise, the threshold LeNet. Goal: within 0.01 of the above  0.14
fashion-ste-resnet   the threshold ResNet (``--arch resnet``) by surrogate BP (CPU: 0.881)    0.06
fashion-glr-resnet   GLR weight-layerwise, the threshold ResNet. Goal: within 0.01 of above   0.12
mnist-bptt-lif       the rate-coded spiking network of docs/results/snn (784 Bernoulli spike  0.02
                     trains of T = 25 steps, 784-256 LIF, leaky-integrator readout) by BPTT
                     with the fast-sigmoid surrogate (the packaged spec snn's ``bptt-rate``)
mnist-glr-lif        the same network by GLR through time (``glr-rate``: membrane noise       0.06
                     σ 0.5, layer-wise), K = 128 (112 on the hidden layer, 16 on the
                     readout). Goal: test accuracy ≥ 0.97, OT and LAP; time to accuracy
                     beside the BPTT run's
==================== ======================================================================== =====

A GLR or BP run is ``train(TrainConfig(...))`` (checkpoint after every epoch; ``max_seconds`` stops it inside
its share, then it is evaluated on the test set as usual); validation accuracy (OT) every ``eval_every`` steps
gives the time to each accuracy. ``epochs="auto"``: before training, a few steps are timed and the run gets as
many epochs (up to its maximum) as its share holds, the learning rate annealed over those. A run killed at its
hard limit is reported from its last checkpoint. Smoke mode: every run at toy size (K = 6 or 16, a 120-image
subset, one epoch), on MNIST / Fashion-MNIST if the data folder holds them, else on the digits at 28×28.

    PYTHONPATH=src python benchmarks/gpu/gpu_train.py --out train.json --log train.log [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import glrnet
# the imports of non-top-level names in this file
from glrnet.sequences import encode
from glrnet.train import TrainConfig, build_model, build_optimizer, build_producer, train

HERE = Path(__file__).resolve()

GLR_WEIGHT_LAYERWISE = dict(arch="lenet", hidden=[], activation="threshold", loss="cross_entropy", noise_std=2.0,
                            method="glr", baseline=True, injection="layerwise", perturb="conv=weight:0.05",
                            optimizer="adam", lr=0.01, schedule="cosine", batch_size=32,
                            lap_replications=100, eval_replications=2)
BP_LENET = dict(arch="lenet", hidden=[], activation="sigmoid", loss="cross_entropy", method="bp", optimizer="adam",
                lr=0.001, batch_size=32, eval_replications=2)
SNN_RATE = dict(arch="lif:256", encoding="rate:25", loss="cross_entropy", noise_std=0.5, method="glr", baseline=True,
                injection="layerwise", optimizer="adam", lr=0.005, schedule="cosine", batch_size=100,
                lap_replications=100, eval_replications=4)
MNIST_THRESHOLDS = [0.9, 0.95, 0.97, 0.98]
SNN_THRESHOLDS = [0.9, 0.95, 0.97]
FASHION_THRESHOLDS = [0.8, 0.85, 0.88]
SMOKE_IMAGES = 120            # smoke: training images (108 train, 12 validation: 4 steps of 32), 30 test
RUN_NAMES = ["mnist-glr-lenet", "mnist-bp-lenet", "fashion-ste-lenet", "fashion-glr-lenet", "fashion-ste-resnet",
             "fashion-glr-resnet", "mnist-bptt-lif", "mnist-glr-lif"]


def run_specs(smoke: bool, mnist_k: int = 1536, mnist_epochs: int = 5, fashion_k: int = 1536,
              memory_budget_mb: float = 4096.0) -> dict[str, dict]:
    """Every run's specification (``smoke``: toy K, one epoch)."""
    k_lenet, k_resnet = (6, 16) if smoke else (mnist_k, fashion_k)
    glr = dict(GLR_WEIGHT_LAYERWISE, memory_budget_mb=memory_budget_mb)
    if smoke:
        glr.update(lap_replications=8)
    eval_every = 3 if smoke else 250
    specs = {
        "mnist-glr-lenet": dict(kind="train", dataset="mnist", share=0.53, thresholds=MNIST_THRESHOLDS,
                                cfg=dict(glr, replications=k_lenet, epochs=1 if smoke else mnist_epochs,
                                         eval_every=eval_every), epochs="fixed",
                                goal="test accuracy ≥ 0.98, OT and LAP", goal_accuracy=0.98),
        "mnist-bp-lenet": dict(kind="train", dataset="mnist", share=0.05, thresholds=MNIST_THRESHOLDS,
                               cfg=dict(BP_LENET, epochs=1 if smoke else 5, eval_every=3 if smoke else 100),
                               epochs="fixed" if smoke else "auto"),
        "fashion-ste-lenet": dict(kind="surrogate", dataset="fashion-mnist", share=0.06, thresholds=FASHION_THRESHOLDS,
                                  cfg=dict(arch="lenet", hidden=[], activation="threshold", lr=0.001, batch_size=32,
                                           epochs=1 if smoke else 20, eval_every=3 if smoke else 200, slope=4.0),
                                  epochs="fixed" if smoke else "auto", cpu_reference=0.852),
        "fashion-glr-lenet": dict(kind="train", dataset="fashion-mnist", share=0.14, thresholds=FASHION_THRESHOLDS,
                                  cfg=dict(glr, replications=k_lenet, epochs=1 if smoke else 5, eval_every=eval_every),
                                  epochs="fixed" if smoke else "auto", compare_with="fashion-ste-lenet",
                                  goal="test accuracy within 0.01 of surrogate-gradient BP on the same network"),
        "fashion-ste-resnet": dict(kind="surrogate", dataset="fashion-mnist", share=0.06, thresholds=FASHION_THRESHOLDS,
                                   cfg=dict(arch="resnet", hidden=[], activation="threshold", lr=0.001, batch_size=32,
                                            epochs=1 if smoke else 20, eval_every=3 if smoke else 200, slope=4.0),
                                   epochs="fixed" if smoke else "auto", cpu_reference=0.881),
        "fashion-glr-resnet": dict(kind="train", dataset="fashion-mnist", share=0.12, thresholds=FASHION_THRESHOLDS,
                                   cfg=dict(glr, arch="resnet", replications=k_resnet, epochs=1 if smoke else 5,
                                            eval_every=eval_every),
                                   epochs="fixed" if smoke else "auto", compare_with="fashion-ste-resnet",
                                   goal="test accuracy within 0.01 of surrogate-gradient BP on the same network"),
        "mnist-bptt-lif": dict(kind="train", dataset="mnist", share=0.02, thresholds=SNN_THRESHOLDS,
                               cfg=dict(SNN_RATE, method="bp", baseline=False, injection="all", lr=0.002,
                                        epochs=1 if smoke else 10, eval_every=3 if smoke else 100),
                               epochs="fixed" if smoke else "auto"),
        "mnist-glr-lif": dict(kind="train", dataset="mnist", share=0.06, thresholds=SNN_THRESHOLDS,
                              cfg=dict(SNN_RATE, layer_replications=[4, 2] if smoke else [112, 16],
                                       memory_budget_mb=memory_budget_mb, epochs=1 if smoke else 10,
                                       eval_every=3 if smoke else 100),
                              epochs="fixed" if smoke else "auto", goal="test accuracy ≥ 0.97, OT and LAP",
                              goal_accuracy=0.97),
    }
    for name, s in specs.items():
        s["name"] = name
    return specs


# ---------------------------------------------------------------------------- data
def load(dataset: str, data_dir: Path, smoke: bool):
    """The dataset (validation: 10 % of training, stratified); in smoke mode a 200-image subset, or the digits at
    28×28 where the data folder lacks ``dataset``."""
    folder = data_dir / dataset
    if smoke and not folder.is_dir():
        return glrnet.load_dataset("digits", image_size=28, val_fraction=0.1, subset=SMOKE_IMAGES), "digits"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: copy the data first (mkdir -p .gpudata && cp -r "
                                "../shared/data/mnist ../shared/data/fashion-mnist .gpudata/) and name .gpudata "
                                "in the run call's carry")
    return glrnet.load_dataset(dataset, folder, None, 0.1, SMOKE_IMAGES if smoke else None), dataset


# ---------------------------------------------------------------------------- one run (child process)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_to_accuracy(series: list[tuple[float, float]], thresholds: list[float]) -> dict[str, float | None]:
    """Seconds at which the validation accuracy first reached each threshold (None: never)."""
    out = {}
    for thr in thresholds:
        hit = [s for s, acc in series if acc >= thr]
        out[f"{thr:g}"] = min(hit) if hit else None
    return out


def seconds_per_step(step, device: torch.device, warmup: int = 2, timed: int = 5) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(timed):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plan_epochs(spec: dict, s_step: float, steps_per_epoch: int, budget_s: float, eval_s: float) -> tuple[int, str]:
    """Epochs for the run: fixed, or (``auto``) as many as ``budget_s`` holds up to the configured maximum."""
    wanted = spec["cfg"]["epochs"]
    per_epoch = 1.15 * s_step * steps_per_epoch + eval_s
    predicted = wanted * per_epoch
    if spec["epochs"] == "fixed":
        fits = "fits" if predicted <= budget_s else "does NOT fit"
        return wanted, f"fixed at {wanted}; predicted {predicted:.0f} s for {budget_s:.0f} s available: {fits}"
    e = max(1, min(wanted, int(budget_s // per_epoch)))
    return e, (f"auto: {e} of at most {wanted} ({per_epoch:.1f} s per epoch predicted, {budget_s:.0f} s available)")


def calibrate_train(cfg: TrainConfig, data, device: torch.device, warmup: int, timed: int) -> float:
    """Seconds per training step of ``cfg`` (producer + optimizer step on real batches), on a throwaway model."""
    torch.manual_seed(123)
    model = build_model(cfg, data.image_shape, data.num_classes).to(device)
    producer = build_producer(cfg, torch.Generator(device=device).manual_seed(123))
    opt, _ = build_optimizer(cfg, model)
    batches = itertools.cycle(range(0, max(1, len(data.x_train) - cfg.batch_size), cfg.batch_size))
    gen = torch.Generator(device=device).manual_seed(124)

    def step():
        i = next(batches)
        x = data.x_train[i:i + cfg.batch_size]
        if cfg.encoding != "none":          # a network through time: the images as sequences, as train() makes them
            x = encode(x, cfg.encoding, data.image_shape, gen)
        opt.zero_grad(set_to_none=True)
        producer.backward(model, x, data.y_train[i:i + cfg.batch_size])
        opt.step()
    return seconds_per_step(step, device, warmup=warmup, timed=timed)


def read_progress(run_dir: Path) -> list[dict]:
    path = run_dir / "progress.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def train_run(spec: dict, data, data_name: str, device: torch.device, run_dir: Path, deadline: float, smoke: bool,
              report) -> dict:
    """A GLR or BP run through ``glrnet.train``: planned, time-limited, its progress read back."""
    opts = dict(spec["cfg"])
    data = data.to(device)
    cfg = TrainConfig(dataset=data_name, image_size=28 if data_name == "digits" else None, device=str(device),
                      **opts).validate()
    steps_per_epoch = -(-len(data.x_train) // cfg.batch_size)
    reserve = 2.0 if smoke else 20.0              # the final evaluation (LAP on the test set), model and figure
    s_step = calibrate_train(cfg, data, device, warmup=1 if smoke else 2, timed=1 if smoke else 5)
    eval_s = 0.0 if smoke else 2.0
    available = deadline - time.time() - reserve
    epochs, why = plan_epochs(spec, s_step, steps_per_epoch, available, eval_s)
    cfg.epochs = epochs
    cfg.max_seconds = max(1.0, available)          # the share's limit, whatever the plan predicted
    report(calibration={"s_per_step": s_step, "steps_per_epoch": steps_per_epoch, "available_s": available,
                        "epochs": epochs, "plan": why,
                        "predicted_train_s": epochs * steps_per_epoch * s_step},
           config=asdict(cfg), status="training")
    print(f"[{spec['name']}] {s_step * 1000:.1f} ms per step, {steps_per_epoch} steps per epoch; epochs {why}",
          flush=True)
    metrics = train(cfg, run_dir, quiet=False, progress=False, data=data, desc=spec["name"])
    progress = read_progress(run_dir)
    series = [(r["seconds"], r["val_acc_ot"]) for r in progress]
    history = json.loads((run_dir / "checkpoint.json").read_text()).get("history", []) \
        if (run_dir / "checkpoint.json").exists() else []
    t = 0.0
    for h in history:
        t += h["seconds"]
        series.append((t, h["val_acc_ot"]))
    return {"status": "done", "test_accuracy_ot": metrics["test_accuracy_ot"],
            "test_accuracy_lap": metrics["test_accuracy_lap"], "steps": metrics["steps"],
            "train_seconds": metrics["train_seconds"], "stopped_by_time": metrics["stopped_by_time"],
            "epochs_done": len(history), "history": history, "dataset_summary": metrics["dataset"],
            "progress": [[int(r["step"]), round(r["seconds"], 2), r["val_acc_ot"]] for r in progress],
            "time_to_accuracy": time_to_accuracy(sorted(series), spec["thresholds"])}


def surrogate_run(spec: dict, data, data_name: str, device: torch.device, deadline: float, smoke: bool,
                  report) -> dict:
    """The threshold network by back-propagation with a surrogate derivative: forward exact (1[v > 0]), backward
    the derivative of sigmoid(slope·v); Adam, noise-free (docs/results/scale/ste_capacity.py)."""
    o = spec["cfg"]
    slope = o["slope"]

    class Surrogate:   # a noisy pass's handler (glrnet.nn.intercept): exact forward, sigmoid(slope·v)' backward
        @staticmethod
        def apply(layer, h):
            v = layer.affine(h)
            if layer.activation is None:
                return v
            soft = torch.sigmoid(slope * v)
            return soft + ((v > 0).to(v.dtype) - soft).detach()

    def fresh():
        torch.manual_seed(0)
        model = build_model(TrainConfig(arch=o["arch"], hidden=o["hidden"], activation=o["activation"]),
                            data.image_shape, data.num_classes).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=o["lr"]), glrnet.noisy_layers(model)

    x_train = data.x_train.to(device)
    x_train = fresh()[0].bind(x_train)
    y_train = data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    B = o["batch_size"]

    def step_on(model, opt, layers, idx):
        with glrnet.nn.intercept(Surrogate()):
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def accuracy(model, x, y):
        return sum((model(model.bind(x[i:i + 5000])).argmax(1) == y[i:i + 5000]).sum().item()
                   for i in range(0, len(x), 5000)) / len(x)

    model, opt, layers = fresh()
    perm = torch.randperm(len(x_train), device=device)
    s_step = seconds_per_step(lambda: step_on(model, opt, layers, perm[:B]), device, warmup=1 if smoke else 3,
                              timed=1 if smoke else 10)
    steps_per_epoch = -(-len(x_train) // B)
    reserve = 1.0 if smoke else 5.0
    available = deadline - time.time() - reserve
    epochs, why = plan_epochs(spec, s_step, steps_per_epoch, available, 0.0 if smoke else 0.5)
    report(calibration={"s_per_step": s_step, "steps_per_epoch": steps_per_epoch, "available_s": available,
                        "epochs": epochs, "plan": why, "predicted_train_s": epochs * steps_per_epoch * s_step},
           config=dict(o, epochs=epochs, device=str(device), dataset=data_name), status="training")
    print(f"[{spec['name']}] {s_step * 1000:.2f} ms per step, {steps_per_epoch} steps per epoch; epochs {why}",
          flush=True)
    model, opt, layers = fresh()                 # the run itself starts from the initial weights
    gen = torch.Generator().manual_seed(0)
    progress, history, step, seconds, stopped = [], [], 0, 0.0, False
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(x_train), generator=gen).to(device).split(B):
            step_on(model, opt, layers, idx)
            step += 1
            if step % o["eval_every"] == 0:
                progress.append([step, round(seconds + time.perf_counter() - t0, 2), accuracy(model, x_val, y_val)])
            if time.time() > deadline - reserve:
                stopped = True
                break
        _sync(device)
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch, "seconds": seconds, "val_acc_ot": accuracy(model, x_val, y_val)})
        print(f"[{spec['name']}] epoch {epoch}/{epochs}: val {history[-1]['val_acc_ot']:.4f} ({seconds:.1f} s)",
              flush=True)
        report(history=history, progress=progress)
        if stopped:
            break
    test = accuracy(model, x_test, y_test)
    print(f"[{spec['name']}] test accuracy {test:.4f} after {step} steps, {seconds:.1f} s", flush=True)
    series = [(s, a) for _, s, a in progress] + [(h["seconds"], h["val_acc_ot"]) for h in history]
    return {"status": "done", "test_accuracy_ot": test, "test_accuracy_lap": None, "steps": step,
            "train_seconds": seconds, "stopped_by_time": stopped, "epochs_done": len(history), "history": history,
            "progress": progress, "dataset_summary": data.summary(),
            "time_to_accuracy": time_to_accuracy(sorted(series), spec["thresholds"])}


def child(spec: dict, run_dir: Path, result_path: Path, data_dir: Path, device: str, deadline: float,
          smoke: bool) -> None:
    """One run in this process: its result (and, as it goes, its plan and progress) in ``result_path``."""
    t0 = time.time()
    result = {"name": spec["name"], "kind": spec["kind"], "dataset": spec["dataset"], "status": "starting"}

    def report(**kw):
        result.update(kw)
        result["wall_seconds"] = time.time() - t0
        _write(result_path, result)

    report()
    try:
        dev = torch.device(device)
        data, data_name = load(spec["dataset"], data_dir, smoke)
        report(data=data_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        if spec["kind"] == "train":
            out = train_run(spec, data, data_name, dev, run_dir, deadline, smoke, report)
        else:
            out = surrogate_run(spec, data, data_name, dev, deadline, smoke, report)
    except Exception as e:     # the one-line reason in the result; the traceback in the log
        report(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    report(**out)


# ---------------------------------------------------------------------------- all runs (parent)
def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _partial(run_dir: Path, spec: dict) -> dict:
    """What a killed run left: its last checkpoint's history and progress (GLR / BP runs)."""
    meta = run_dir / "checkpoint.json"
    if not meta.exists():
        return {}
    side = json.loads(meta.read_text())
    history = side.get("history", [])
    series, t = [(p["seconds"], p["val_acc_ot"]) for p in side.get("progress", [])], 0.0
    for h in history:
        t += h["seconds"]
        series.append((t, h["val_acc_ot"]))
    return {"epochs_done": len(history), "history": history, "train_seconds": side.get("train_seconds"),
            "time_to_accuracy": time_to_accuracy(sorted(series), spec["thresholds"])}


def comparisons(results: dict, specs: dict) -> list[dict]:
    """GLR against its BP reference (the Fashion-MNIST goal), and the MNIST goal."""
    out = []
    for name, spec in specs.items():
        r = results.get(name, {})
        if spec.get("goal_accuracy") is not None and r.get("status") == "done":
            ot, lap = r.get("test_accuracy_ot"), r.get("test_accuracy_lap")
            out.append({"run": name, "goal": spec["goal"], "ot": ot, "lap": lap,
                        "met": bool(ot is not None and lap is not None and min(ot, lap) >= spec["goal_accuracy"]),
                        "epochs_done": r.get("epochs_done"), "stopped_by_time": r.get("stopped_by_time")})
        ref = specs.get(spec.get("compare_with", ""), None)
        if ref is not None:
            b = results.get(ref["name"], {})
            if r.get("status") == "done" and b.get("status") == "done":
                bp = b["test_accuracy_ot"]
                gaps = {k: bp - r[f"test_accuracy_{k}"] for k in ("ot", "lap")
                        if r.get(f"test_accuracy_{k}") is not None}
                out.append({"run": name, "reference": ref["name"], "goal": spec["goal"], "bp": bp,
                            "glr_ot": r["test_accuracy_ot"], "glr_lap": r.get("test_accuracy_lap"),
                            "gap_ot": gaps.get("ot"), "gap_lap": gaps.get("lap"),
                            "met_ot": gaps.get("ot") is not None and gaps["ot"] <= 0.01,
                            "met_lap": gaps.get("lap") is not None and gaps["lap"] <= 0.01,
                            "cpu_reference_bp": ref.get("cpu_reference"),   # BP after 20 epochs on the CPU
                            "gap_to_cpu_reference_ot": ref["cpu_reference"] - r["test_accuracy_ot"],
                            "gap_to_cpu_reference_lap": None if r.get("test_accuracy_lap") is None else
                            ref["cpu_reference"] - r["test_accuracy_lap"],
                            "glr_epochs_done": r.get("epochs_done"), "bp_epochs_done": b.get("epochs_done")})
    return out


def run_all(out: Path, log: Path, work: Path, data_dir: Path, device: str, smoke: bool, deadline: float,
            names: list[str] | None = None, **spec_options) -> dict:
    """Every run in order, each in its own process with its share of the time left before ``deadline`` (by which
    the last is stopped, killed if need be); ``smoke``: all in one process, which spares five interpreter
    starts (the same code otherwise)."""
    specs = run_specs(smoke, **spec_options)
    names = names or RUN_NAMES
    chosen = [specs[n] for n in RUN_NAMES if n in names]
    result = {"device": device, "smoke": smoke, "data_dir": str(data_dir), "order": [s["name"] for s in chosen],
              "runs": {}, "comparisons": []}
    work.mkdir(parents=True, exist_ok=True)
    groups = [chosen] if smoke else [[s] for s in chosen]
    grace = 5.0 if smoke else 30.0          # a run stops itself by its deadline; killed only past it by this much
    done = 0
    with open(log, "a") as logf:
        for group in groups:
            left = deadline - grace - time.time()
            share = sum(s["share"] for s in group) / sum(s["share"] for s in chosen[done:])
            allot = left * share
            done += len(group)
            label = ",".join(s["name"] for s in group)
            if not smoke and allot < 20.0:
                for s in group:
                    result["runs"][s["name"]] = {"name": s["name"], "status": "skipped",
                                                 "error": f"{max(0.0, left):.0f} s left of the stage"}
                _write(out, result)
                continue
            group_deadline = time.time() + allot
            logf.write(f"\n===== {label}: {allot:.0f} s allotted ({left:.0f} s left) =====\n")
            logf.flush()
            cmd = [sys.executable, str(HERE), "--child", label, "--work", str(work), "--data-dir", str(data_dir),
                   "--device", device, "--deadline", repr(group_deadline)]
            cmd += ["--smoke"] if smoke else []
            for k, v in spec_options.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            t = time.time()
            # in this stage's process group: a stage stopped at its limit takes its runs with it
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=max(1.0, group_deadline + grace - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()                             # the run's process, started above
                proc.wait()
                rc = None
            for spec in group:
                name = spec["name"]
                rpath = work / f"{name}.json"
                r = json.loads(rpath.read_text()) if rpath.exists() else {"name": name, "status": "not started"}
                if r.get("status") != "done":
                    partial = _partial(work / name, spec)
                    if rc is None:
                        why = f"past its hard limit ({allot + grace:.0f} s); " + (
                            f"{partial['epochs_done']} epoch(s) checkpointed" if partial.get("epochs_done")
                            else "no epoch finished")
                    else:
                        why = r.get("error") or f"exit code {rc}; see train.log"
                    r.update(status="killed" if rc is None else "error", error=why, **partial)
                r["process_seconds"] = time.time() - t
                r["allotted_s"] = allot * spec["share"] / sum(s["share"] for s in group)
                result["runs"][name] = r
                acc = r.get("test_accuracy_ot")
                print(f"train {name}: {r['status']}" + (f", test OT {acc:.4f}" if acc is not None else "")
                      + (f" LAP {r['test_accuracy_lap']:.4f}" if r.get("test_accuracy_lap") is not None else "")
                      + (f" ({r['error']})" if r.get("error") else ""), flush=True)
            result["comparisons"] = comparisons(result["runs"], specs)
            _write(out, result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="train.json", help="train.json to write")
    ap.add_argument("--log", default="train.log", help="train.log (the runs' own output)")
    ap.add_argument("--work", help="folder for the runs' checkpoints")
    ap.add_argument("--data-dir", default=".gpudata")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seconds", type=float, default=300.0, help="time for all runs")
    ap.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--mnist-k", type=int, default=1536)
    ap.add_argument("--mnist-epochs", type=int, default=5)
    ap.add_argument("--fashion-k", type=int, default=1536)
    ap.add_argument("--memory-budget-mb", type=float, default=4096.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    options = dict(mnist_k=args.mnist_k, mnist_epochs=args.mnist_epochs, fashion_k=args.fashion_k,
                   memory_budget_mb=args.memory_budget_mb)
    if args.child:          # one process: these runs in order, each with its share of the time to the deadline
        specs = run_specs(args.smoke, **options)
        group = [specs[n] for n in args.child.split(",")]
        for i, spec in enumerate(group):
            share = spec["share"] / sum(s["share"] for s in group[i:])
            deadline = time.time() + (args.deadline - time.time()) * share
            try:
                child(spec, Path(args.work) / spec["name"], Path(args.work) / f"{spec['name']}.json",
                      Path(args.data_dir), args.device, deadline, args.smoke)
            except Exception:
                import traceback
                traceback.print_exc()       # into train.log; the result file says why in one line
                if len(group) == 1:
                    sys.exit(1)
        return
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUN_NAMES]
    if unknown:
        ap.error(f"--runs: unknown run(s) {', '.join(unknown)}; valid: {', '.join(RUN_NAMES)}")
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix="glrnet-gpu-train-"))
    run_all(Path(args.out), Path(args.log), work, Path(args.data_dir), args.device, args.smoke,
            time.time() + args.seconds, names, **options)


if __name__ == "__main__":
    sys.exit(main())
