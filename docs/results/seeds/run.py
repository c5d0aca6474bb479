"""Train glr-threshold-01 (paper-seeds' options) for one seed, with diagnostic snapshots.

Training goes through ``glrnet.train.train`` unchanged; a snapshot at epoch e is the run resumed up to
e epochs (``resume=True`` ends with the same weights as an uninterrupted run), then
``diagnose.diagnose`` on the training images. Appends to OUT/snapshots.csv, classes.csv, units.csv.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 docs/results/seeds/run.py --seed 1 --snap 1,2,4 \
        --setting paper --out /tmp/seeds
    ... --setting lr0.01 --set lr=0.01            (any TrainConfig field=value)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import fields
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from diagnose import CLASS_FIELDS, UNIT_FIELDS, diagnose, summary_line  # noqa: E402

from glrnet.checkpoint import load_model  # noqa: E402
from glrnet.data import load_dataset  # noqa: E402
from glrnet.train import TrainConfig, train  # noqa: E402

# paper-seeds.toml: [datasets] + [defaults] + [[models]] glr-threshold-01
PAPER = dict(dataset="mnist", data_dir="/work/shared/data/mnist", split="seed", val_fraction=0.1, image_size=14,
             hidden=[20], activation="threshold", loss="zero_one", noise="gaussian", noise_std=2.0,
             replications=1000, baseline=True, batch_size=25, epochs=24, optimizer="adam", lr=0.05,
             lap_replications=1000, eval_every=168)


def parse_value(name: str, text: str):
    if name not in {f.name for f in fields(TrainConfig)}:
        raise SystemExit(f"unknown TrainConfig field {name}")
    try:
        return json.loads(text)          # numbers, true/false, null, lists
    except json.JSONDecodeError:
        return text                      # a plain string (a loss, an optimizer, ...)


def append(path: Path, rows: list[dict], header: list[str]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--snap", default="24", help="epochs at which to snapshot, e.g. 1,2,4,8 (the last = epochs)")
    ap.add_argument("--setting", default="paper")
    ap.add_argument("--set", action="append", default=[], help="TrainConfig field=value (JSON or a string)")
    ap.add_argument("--out", default="/tmp/seeds")
    a = ap.parse_args()
    over = {}
    for s in a.set:
        k, v = s.split("=", 1)
        over[k] = parse_value(k, v)
    cfg_d = {**PAPER, **over, "seed": a.seed}
    root = Path(a.out)
    run_dir = root / "runs" / f"{a.setting}-seed{a.seed}"
    data = load_dataset(cfg_d["dataset"], cfg_d["data_dir"], cfg_d["image_size"], cfg_d["val_fraction"], None,
                        a.seed, split=cfg_d["split"])
    for e in [int(s) for s in a.snap.split(",")]:
        t0 = time.perf_counter()
        cfg = TrainConfig(**{**cfg_d, "epochs": e})
        m = train(cfg, run_dir, resume=True, quiet=True, data=data)
        wall = time.perf_counter() - t0
        model, _ = load_model(run_dir / "model.safetensors")
        d = diagnose(model, data.x_train, data.y_train, seed=a.seed)
        hist = list(csv.DictReader((run_dir / "history.csv").open()))[-1]
        key = {"setting": a.setting, "seed": a.seed, "epoch": e}
        append(root / "snapshots.csv", [{**key, "train_acc_ot": d["acc_ot"], "val_acc_ot": hist["val_acc_ot"],
                                         "test_acc_ot": m["test_accuracy_ot"], "test_acc_lap": m["test_accuracy_lap"],
                                         "train_loss_noisy": hist["train_loss"],
                                         "dead_classes": " ".join(map(str, d["dead_classes"])),
                                         "n_dead_units": len(d["dead_units"]),
                                         "min_class_pred_share": min(r["pred_share"] for r in d["classes"]),
                                         "train_seconds": m["train_seconds"], "wall_seconds_segment": wall}],
               ["setting", "seed", "epoch", "train_acc_ot", "val_acc_ot", "test_acc_ot", "test_acc_lap",
                "train_loss_noisy", "dead_classes", "n_dead_units", "min_class_pred_share", "train_seconds",
                "wall_seconds_segment"])
        append(root / "classes.csv", [{**key, **r} for r in d["classes"]], ["setting", "seed", "epoch"] + CLASS_FIELDS)
        append(root / "units.csv", [{**key, **u} for u in d["units"]], ["setting", "seed", "epoch", "layer"] + UNIT_FIELDS)
        print(f"[{a.setting} seed {a.seed} epoch {e}] test OT {m['test_accuracy_ot']:.4f} val OT "
              f"{float(hist['val_acc_ot']):.4f}  ({wall:.0f}s)  {summary_line(d)}", flush=True)


if __name__ == "__main__":
    main()
