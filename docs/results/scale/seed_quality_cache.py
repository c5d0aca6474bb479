"""Seed the quality cache of a scale run folder from the committed quality.csv, so that a rerun of [quality]
measures only the techniques that are new to it:

    python docs/results/scale/seed_quality_cache.py <spec> <out> <data-dir>   # then glrnet reproduce --spec <spec> --out <out> ...
"""
import csv
import json
import sys
from pathlib import Path
from glrnet.scale import load_scale_spec
from glrnet.certification import _data_options
spec_file, out, data_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
spec = load_scale_spec(spec_file); q = spec["quality"]; techniques = spec["techniques"]
d = {x["name"]: x for x in spec["datasets"]}[q.get("dataset", spec["datasets"][0]["name"])]
o = _data_options(d, data_dir)
setting = {k: v for k, v in q.items() if k != "techniques"}
rows = list(csv.DictReader(open("docs/results/scale/quality.csv")))
cache = {}
for r in rows:
    key = json.dumps([setting, techniques[r["technique"]][1], o, r["unit"], r["loss"]], sort_keys=True, default=str)
    e = cache.setdefault(key, {"layers": [], "seconds_per_estimate": float(r["seconds_per_estimate"])})
    e["layers"].append({"layer": r["layer"], "params": int(r["params"]), "nsr": float(r["nsr"]),
                        "cos_true": float(r["cos_true"]), "cos_bp": float(r["cos_bp"])})
out.mkdir(parents=True, exist_ok=True)
(out / "quality_cache.json").write_text(json.dumps(cache))
print(len(cache), "cached combinations")
