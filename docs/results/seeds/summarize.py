"""The README's tables from the CSVs in this folder (epochs.csv, final.csv, classes.csv)."""

import csv
import statistics
import sys
from pathlib import Path

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
epochs = list(csv.DictReader((here / "epochs.csv").open()))
final = {(r["setting"], r["seed"]): r for r in csv.DictReader((here / "final.csv").open())}
classes = list(csv.DictReader((here / "classes.csv").open()))

for setting in dict.fromkeys(r["setting"] for r in epochs):
    rows = [r for r in epochs if r["setting"] == setting]
    print(f"\n### {setting}\n")
    print("| seed | epochs | loss (epoch 1) | val OT (ep 1) | dead class (ep 1) | its max margin/σ | its row NSR | "
          "revived at epoch | val OT (last) | dead class (last) | dead units (last) | test OT | test LAP | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in dict.fromkeys(r["seed"] for r in rows):
        rs = [r for r in rows if r["seed"] == seed]
        first, last = rs[0], rs[-1]
        dead = first["dead_classes"].split()
        cl = {c["class"]: c for c in classes if c["setting"] == setting and c["seed"] == seed and c["epoch"] == "1"}
        mm = " ".join(f"{float(cl[c]['max_margin_sigma']):.1f}" for c in dead) or "–"
        ns = " ".join(cl[c]["row_nsr"][:4] for c in dead) or "–"
        f = final.get((setting, seed), {})
        fmt = lambda k: f"{float(f[k]):.4f}" if k in f else "–"  # noqa: E731
        revived = next((r["epoch"] for r in rs if not r["dead_classes"]), "no" if len(rs) > 1 else "not followed") if dead else "–"
        print(f"| {seed} | {last['epoch']} | {first['loss']} | {float(first['val_acc_ot']):.4f} | {first['dead_classes'] or '–'} "
              f"| {mm} | {ns} | {revived} | {float(last['val_acc_ot']):.4f} | {last['dead_classes'] or '–'} | {last['n_dead_units']} "
              f"| {fmt('test_acc_ot')} | {fmt('test_acc_lap')} | {float(last['train_seconds']):.0f} |")
    tests = [float(final[(setting, s)]["test_acc_ot"]) for s in dict.fromkeys(r["seed"] for r in rows)
             if (setting, s) in final and final[(setting, s)]["epochs"] == rows[-1]["epoch"]]
    if len(tests) > 1:
        print(f"\ntest OT over {len(tests)} seeds: mean {statistics.mean(tests):.4f}, sd {statistics.stdev(tests):.4f}, "
              f"range {min(tests):.4f}–{max(tests):.4f} (spread {max(tests) - min(tests):.4f})")
    alive = [float(c["row_nsr"]) for c in classes if c["setting"] == setting and c["epoch"] == "1"
             and c["class"] not in next(r for r in rows if r["seed"] == c["seed"] and r["epoch"] == "1")["dead_classes"].split()]
    if alive:
        print(f"output-row NSR of the live classes at epoch 1: median {statistics.median(alive):.2f}")
