"""Train a spiking network on MNIST by GLR through time, or by an alternative through the same
``backward(model, x, y)``; checkpointed, resumable, logged with wall time.

    OMP_NUM_THREADS=1 python docs/results/snn/train_snn.py --task rate --method glr --out /tmp/snn/rate-glr \
        --data-dir ../shared/data/mnist [--epochs 1] [--time-limit 3600] [options below]

Tasks (MNIST, pixels in [0, 1]):
  rate    rate-coded: each pixel a Bernoulli spike train over T = 25 steps (fresh draws every batch; the
          validation and test trains drawn once from a fixed seed), as in the snntorch tutorials;
  rows    row-sequential: one 28-pixel row per step, T = 28, currents;
  pixels  pixel by pixel on 14×14 images, T = 196, currents.

Network: ``TimeLoop(Leaky(inputs, hidden, beta, threshold, recurrent), LeakyIntegrator(hidden, 10),
readout="mean")`` (``--layers 2``: a second Leaky layer). Methods: ``glr`` (``--perturbation`` per layer,
``--injection``, ``--replications``, leave-one-out baseline), ``es``, ``bptt`` (surrogate derivative,
fast sigmoid slope 25), ``fg`` (forward gradients through time). Adam, cosine-annealed over the planned
steps. Every ``--eval-every`` steps: validation accuracy (noise-free network, OT) into ``log.csv`` with
the wall and process times, and a checkpoint (``ckpt.pt``: weights, optimiser, position, log) that a
rerun with the same ``--out`` resumes from. At the end: test accuracy (OT, and LAP for noisy models with
``--lap``) into ``result.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Normal

import glrnet

TASKS = {"rate": (25, 784), "rows": (28, 28), "pixels": (196, 1)}


def sequences(task: str, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flat images (B, 784) as input sequences (B, T, inputs)."""
    if task == "rate":
        T = TASKS["rate"][0]
        return torch.bernoulli(x[:, None, :].expand(len(x), T, x.shape[1]), generator=generator)
    if task == "rows":
        return x.reshape(len(x), 28, 28)
    if task == "pixels":
        img = torch.nn.functional.avg_pool2d(x.reshape(len(x), 1, 28, 28), 2)
        return img.reshape(len(x), 196, 1)
    raise ValueError(task)


def build(args) -> glrnet.TimeLoop:
    steps, inputs = TASKS[args.task]
    layers, width = [], inputs
    pert = args.perturbation
    for _ in range(args.layers):
        layers.append(glrnet.Leaky(width, args.hidden, beta=args.beta, threshold=args.threshold,
                                   reset_mechanism=args.reset, recurrent=args.recurrent,
                                   noise=Normal(0.0, args.sigma_weight if pert[0] == "weight" else args.sigma),
                                   perturbation=pert[0]))
        width = args.hidden
    layers.append(glrnet.LeakyIntegrator(width, 10, beta=args.readout_beta,
                                         noise=Normal(0.0, args.sigma_weight if pert[-1] == "weight" else
                                                      args.readout_sigma),
                                         perturbation=pert[-1]))
    model = glrnet.TimeLoop(*layers, readout="mean", input_shape=(steps, inputs))
    if args.init_gain != 1.0:
        with torch.no_grad():
            for m in layers:
                m.weight.mul_(args.init_gain)
    return model


def producer(args):
    if args.method == "glr":
        k = args.replications[0] if len(args.replications) == 1 else list(args.replications)
        return glrnet.GLR(replications=k, baseline=True, injection=args.injection,
                          sampler=args.sampler, memory_budget_mb=args.memory_mb, prefetch=False)
    if args.method == "es":
        return glrnet.ES(population=args.replications[0], sigma=args.sigma_weight)
    if args.method == "bptt":
        return glrnet.Backprop()
    if args.method == "fg":
        return glrnet.ForwardGradient(directions=args.replications[0])
    raise ValueError(args.method)


@torch.no_grad()
def accuracy(model, x, y, batch=500) -> float:
    hits = 0
    for i in range(0, len(x), batch):
        hits += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    return hits / len(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=list(TASKS), default="rate")
    ap.add_argument("--method", choices=["glr", "es", "bptt", "fg"], default="glr")
    ap.add_argument("--data-dir", default="../shared/data/mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--recurrent", action="store_true")
    ap.add_argument("--beta", type=float, default=0.9)
    ap.add_argument("--readout-beta", type=float, default=0.9)
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--reset", default="subtract")
    ap.add_argument("--init-gain", type=float, default=1.0)
    ap.add_argument("--perturbation", nargs="+", default=["activity"],
                    help="one name for every layer, or one per layer (hidden ..., readout)")
    ap.add_argument("--injection", default="layerwise")
    ap.add_argument("--sampler", default="iid")
    ap.add_argument("--replications", type=int, nargs="+", default=[64],
                    help="K; with --injection layerwise one count per noisy layer may be given (hidden ..., readout)")
    ap.add_argument("--sigma", type=float, default=0.5, help="membrane noise std of the hidden layers")
    ap.add_argument("--readout-sigma", type=float, default=0.5)
    ap.add_argument("--sigma-weight", type=float, default=0.02, help="weight-noise std (weight perturbation, ES)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--subset", type=int, default=None, help="training images (pilots)")
    ap.add_argument("--val", type=int, default=5000, help="validation images held out of the training set")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--time-limit", type=float, default=None, help="stop training after this many wall seconds")
    ap.add_argument("--memory-mb", type=float, default=512.0)
    ap.add_argument("--lap", type=int, default=0, help="LAP replications for the final test (0: OT only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if len(args.perturbation) == 1:
        args.perturbation = args.perturbation * 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ds = glrnet.load_dataset("mnist", data_dir=args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(ds.x_train), generator=g)
    val_idx, train_idx = perm[:args.val], perm[args.val:]
    if args.subset:
        train_idx = train_idx[:args.subset]
    x_train, y_train = ds.x_train[train_idx], ds.y_train[train_idx]
    fixed = torch.Generator().manual_seed(12345)                 # the validation and test spike trains: drawn once
    x_val, y_val = sequences(args.task, ds.x_train[val_idx], fixed), ds.y_train[val_idx]
    x_test, y_test = sequences(args.task, ds.x_test, fixed), ds.y_test

    torch.manual_seed(args.seed)
    model = build(args)
    est = producer(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = len(x_train) // args.batch
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) /
                                                                                   total_steps)))
    state = {"step": 0, "wall": 0.0, "cpu": 0.0, "log": []}
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        print(f"resumed at step {state['step']}", flush=True)
    (out / "args.json").write_text(json.dumps({**vars(args), "argv": sys.argv}, indent=1))
    print(model, flush=True)
    print(f"{est!r}; {len(x_train)} training images, {steps_per_epoch} steps per epoch, {total_steps} steps",
          flush=True)

    def evaluate_and_save():
        acc = accuracy(model, x_val, y_val)
        row = {"step": state["step"], "epoch": state["step"] / steps_per_epoch, "wall_s": round(state["wall"], 1),
               "cpu_s": round(state["cpu"], 1), "val_acc": acc, "loss": state.get("loss", float("nan"))}
        state["log"].append(row)
        with open(out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(state["log"])
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "state": state}, tmp)
        os.replace(tmp, ckpt)
        print(f"step {row['step']:6d} epoch {row['epoch']:.2f} wall {row['wall_s']:8.0f}s "
              f"loss {row['loss']:.3f} val {acc:.4f}", flush=True)

    if state["step"] == 0:
        evaluate_and_save()
    losses = []
    while state["step"] < total_steps:
        if args.time_limit and state["wall"] >= args.time_limit:
            print("time limit reached", flush=True)
            break
        epoch, pos = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = order[pos * args.batch:(pos + 1) * args.batch]
        data_gen = torch.Generator().manual_seed(args.seed * 10**7 + state["step"])
        xb, yb = sequences(args.task, x_train[idx], data_gen), y_train[idx]
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        stats = est.backward(model, xb, yb)
        opt.step()
        sched.step()
        state["wall"] += time.perf_counter() - t0
        state["cpu"] += time.process_time() - c0
        state["step"] += 1
        losses.append(float(stats.loss))
        if state["step"] % args.eval_every == 0 or state["step"] == total_steps:
            state["loss"] = sum(losses) / len(losses)
            losses = []
            evaluate_and_save()

    result = {"steps": state["step"], "epochs": state["step"] / steps_per_epoch, "train_wall_s": state["wall"],
              "train_cpu_s": state["cpu"], "val_acc": accuracy(model, x_val, y_val),
              "test_acc_ot": accuracy(model, x_test, y_test), "finished": state["step"] >= total_steps}
    if args.lap:
        t0 = time.perf_counter()
        pred = glrnet.predict(model, x_test, "lap", args.lap, generator=torch.Generator().manual_seed(1))
        result["test_acc_lap"] = (pred == y_test).double().mean().item()
        result["lap_replications"], result["lap_wall_s"] = args.lap, time.perf_counter() - t0
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
