"""The study's tables from the runs of train_snn.py: final accuracies, time to a validation accuracy, the curves.

    python docs/results/snn/tables.py --runs /tmp/snn/runs --pilots /tmp/snn/pilots --out docs/results/snn

Writes runs.csv (one row per run: settings, steps, test accuracy, training wall and process time, whether it
finished), time_to_accuracy.csv (the first logged step at which the validation accuracy reached each level,
with its wall and process seconds), pilots.csv (the 10k-image pilots) and curves/<run>.csv (each run's
log.csv). Wall time is the training steps' own (no evaluation), on a machine shared with other jobs;
process time (CPU seconds of the one training thread) is the steadier measure there.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

LEVELS = (0.80, 0.90, 0.93, 0.95, 0.96, 0.97)


def read_run(d: Path) -> dict | None:
    if not (d / "args.json").exists() or not (d / "log.csv").exists():
        return None
    a = json.loads((d / "args.json").read_text())
    log = list(csv.DictReader(open(d / "log.csv")))
    r = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else {}
    last = log[-1]
    k = a["replications"]
    return {"run": d.name, "task": a["task"], "method": a["method"], "hidden": a["hidden"],
            "recurrent": a["recurrent"], "K": "/".join(map(str, k)) if isinstance(k, list) else k,
            "injection": a["injection"] if a["method"] == "glr" else "", "sigma": a["sigma"] if a["method"] == "glr" else "",
            "perturbation": "/".join(a["perturbation"]) if a["method"] == "glr" else "",
            "sigma_weight": a["sigma_weight"] if a["method"] == "es" or "weight" in a["perturbation"] and a["method"] == "glr"
            else "", "beta": a["beta"], "init_gain": a["init_gain"],
            "lr": a["lr"], "epochs_planned": a["epochs"], "subset": a["subset"] or "",
            "epochs_done": round(float(last["epoch"]), 2), "val_acc_last": last["val_acc"],
            "best_val": max(float(row["val_acc"]) for row in log),
            "test_acc_ot": r.get("test_acc_ot", ""), "test_acc_lap": r.get("test_acc_lap", ""),
            "train_wall_s": round(float(last["wall_s"])), "train_cpu_s": round(float(last["cpu_s"])),
            "finished": r.get("finished", False), "_log": log}


def robustness_table(src: Path, out: Path) -> None:
    """robustness.csv and log.txt of robustness_snn.py copied, and robustness.md: per ε, each attack's accuracy
    and the worst case of the defended predictor (LAP; in parentheses the noise-free network's, GLR)."""
    (out / "robustness").mkdir(exist_ok=True)
    for f in ("robustness.csv", "log.txt"):
        shutil.copy(src / f, out / "robustness" / f)
    rows = list(csv.DictReader(open(src / "robustness.csv")))
    models = list(dict.fromkeys(r["model"] for r in rows))
    attacks = ["fgsm", "apgd-ce", "apgd-dlr", "random", "worst-case"]
    lines = ["| ε | " + " | ".join(f"{m}: {' / '.join(attacks)}" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    eps = sorted({float(r["eps"]) for r in rows})
    for e in eps:
        cells = []
        for m in models:
            got = {r["attack"]: r for r in rows if r["model"] == m and float(r["eps"]) == e}
            if e == 0:
                r = got.get("none")
                cells.append(f"clean {float(r['acc']):.3f}" if r else "")
                continue
            vals = [f"{float(got[a]['acc']):.3f}" if a in got else "—" for a in attacks]
            esc = [a for a in got if a.startswith("worst-case ") and a != "worst-case"]
            if esc:
                vals[-1] += " → " + " → ".join(f"{float(got[a]['acc']):.3f} ({a.split()[1]})" for a in esc)
            cells.append(" / ".join(vals))
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    (out / "robustness" / "robustness.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="/tmp/snn/runs")
    ap.add_argument("--pilots", default="/tmp/snn/pilots")
    ap.add_argument("--robust", default="/tmp/snn/robust", help="robustness_snn.py's output folder")
    ap.add_argument("--out", default="docs/results/snn")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    for src, name in ((args.runs, "runs.csv"), (args.pilots, "pilots.csv")):
        runs = [r for d in sorted(Path(src).iterdir()) if d.is_dir() and (r := read_run(d))]
        fields = [k for k in runs[0] if not k.startswith("_")]
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(runs)
        if name != "runs.csv":
            continue
        with open(out / "time_to_accuracy.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "level", "step", "epoch", "wall_s", "cpu_s"])
            for r in runs:
                for level in LEVELS:
                    hit = next((row for row in r["_log"] if float(row["val_acc"]) >= level), None)
                    w.writerow([r["run"], level] + ([hit["step"], round(float(hit["epoch"]), 2), hit["wall_s"],
                                                      hit["cpu_s"]] if hit else ["not reached", "", "", ""]))
        for r in runs:
            shutil.copy(Path(src) / r["run"] / "log.csv", out / "curves" / f"{r['run']}.csv")
    if (Path(args.robust) / "robustness.csv").exists():
        robustness_table(Path(args.robust), out)
    print((out / "runs.csv").read_text())
    print((out / "time_to_accuracy.csv").read_text())


if __name__ == "__main__":
    main()
