"""glr-threshold-01 for one seed, train()'s loop with an optional cross-entropy warm-up, and per-epoch diagnostics.

The run is ``glrnet.train.train``'s, rebuilt from its public pieces and its named random streams (initial
weights: stream (seed, 0); data order: (seed, 1, epoch); the estimator's noise: (seed, 4)): with
``--warmup-epochs 0`` its weights are train()'s step for step. ``--warmup-epochs W``: the first W epochs'
GLR estimates use the cross-entropy loss (the same noise stream, optimizer and Adam state), the rest the 0-1
loss. After every epoch: validation accuracy (OT) and ``diagnose.diagnose`` on the training images; at the end
clean test accuracy (OT) and LAP (K = 1000). ``--resume`` continues from OUT/runs/<setting>-seed<s>/state.pt.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 docs/results/seeds/loop.py --seed 1 --epochs 24 --warmup-epochs 1 \
        --setting ce-warmup1 --out /tmp/seeds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from diagnose import CLASS_FIELDS, UNIT_FIELDS, diagnose  # noqa: E402
from run import PAPER, append  # noqa: E402

import glrnet  # noqa: E402
from glrnet.checkpoint import save_model  # noqa: E402
from glrnet.data import load_dataset  # noqa: E402
from glrnet.train import TrainConfig, build_model, build_optimizer, build_producer  # noqa: E402
from glrnet.utils.seeding import stream_seed  # noqa: E402

EPOCH_FIELDS = ["setting", "seed", "epoch", "loss", "val_acc_ot", "train_acc_ot", "dead_classes", "n_dead_units",
                "min_class_pred_share", "min_class_vote_share", "dead_class_row_nsr", "train_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--setting", default="paper")
    ap.add_argument("--out", default="/tmp/seeds")
    ap.add_argument("--lap-replications", type=int, default=1000)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    cfg = TrainConfig(**{**PAPER, "seed": a.seed, "epochs": a.epochs}).validate()
    cfg_ce = TrainConfig(**{**PAPER, "seed": a.seed, "epochs": a.epochs, "loss": "cross_entropy"}).validate()
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.val_fraction, None, cfg.seed, split=cfg.split)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.seed, 0))
        model = build_model(cfg, data.image_shape, data.num_classes)
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, 4))
    zero_one, ce = build_producer(cfg, gen), build_producer(cfg_ce, gen)   # one noise stream for both
    opt, _ = build_optimizer(cfg, model)
    root = Path(a.out)
    run_dir = root / "runs" / f"{a.setting}-seed{a.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    start, train_seconds = 1, 0.0
    if a.resume and (run_dir / "state.pt").exists():
        st = torch.load(run_dir / "state.pt", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start, train_seconds = st["epoch"] + 1, st["train_seconds"]
    n = len(data.x_train)
    for epoch in range(start, a.epochs + 1):
        producer = ce if epoch <= a.warmup_epochs else zero_one
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(cfg.seed, 1, epoch)))
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            producer.backward(model, data.x_train[idx], data.y_train[idx])
            opt.step()
        train_seconds += time.perf_counter() - t0
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": epoch,
                    "train_seconds": train_seconds}, run_dir / "state.pt")
        with torch.no_grad():
            val = (model(data.x_val).argmax(1) == data.y_val).double().mean().item()
        d = diagnose(model, data.x_train, data.y_train, seed=a.seed * 1000 + epoch)
        key = {"setting": a.setting, "seed": a.seed, "epoch": epoch}
        dead = d["dead_classes"]
        append(root / "epochs.csv", [{**key, "loss": "cross_entropy" if producer is ce else "zero_one",
                                      "val_acc_ot": f"{val:.6f}", "train_acc_ot": f"{d['acc_ot']:.6f}",
                                      "dead_classes": " ".join(map(str, dead)), "n_dead_units": len(d["dead_units"]),
                                      "min_class_pred_share": min(r["pred_share"] for r in d["classes"]),
                                      "min_class_vote_share": min(r["vote_share"] for r in d["classes"]),
                                      "dead_class_row_nsr": " ".join(f"{d['classes'][c]['row_nsr']:.1f}" for c in dead),
                                      "train_seconds": f"{train_seconds:.1f}"}], EPOCH_FIELDS)
        append(root / "classes.csv", [{**key, **r} for r in d["classes"]], ["setting", "seed", "epoch"] + CLASS_FIELDS)
        append(root / "units.csv", [{**key, **u} for u in d["units"]], ["setting", "seed", "epoch", "layer"] + UNIT_FIELDS)
        print(f"[{a.setting} seed {a.seed}] epoch {epoch} val OT {val:.4f} train OT {d['acc_ot']:.4f} dead classes "
              f"{dead} dead units {len(d['dead_units'])} ({train_seconds:.0f}s)", flush=True)
    if start <= a.epochs or not (run_dir / "metrics.json").exists():
        with torch.no_grad():
            test_ot = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
        lap = glrnet.predict(model, data.x_test, "lap", a.lap_replications,
                             generator=torch.Generator().manual_seed(stream_seed(cfg.seed, 3)))
        test_lap = (lap == data.y_test).double().mean().item()
        save_model(run_dir / "model.safetensors", model, {"config": {**json.loads(json.dumps(vars(cfg), default=str)),
                                                                      "warmup_epochs": a.warmup_epochs}})
        metrics = {"setting": a.setting, "seed": a.seed, "epochs": a.epochs, "warmup_epochs": a.warmup_epochs,
                   "test_acc_ot": test_ot, "test_acc_lap": test_lap, "val_acc_ot": val, "train_seconds": train_seconds}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        append(root / "final.csv", [metrics], list(metrics))
        print(f"[{a.setting} seed {a.seed}] test OT {test_ot:.4f} LAP {test_lap:.4f}", flush=True)


if __name__ == "__main__":
    main()
