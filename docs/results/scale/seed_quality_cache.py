"""Seed the quality cache of a scale run folder from the committed quality.csv, so that a rerun of [quality]
measures only the (technique, unit, loss) combinations that are new to it:

    python docs/results/scale/seed_quality_cache.py <spec> <out>   # then glrnet reproduce --spec <spec> --out <out> ...

A row is used only for a technique of the spec whose options are those it was measured with (quality.csv was
written by the spec at commit 6975a10; the techniques the packaged spec kept have the same options).
"""
import csv
import json
import sys
from pathlib import Path

from glrnet.experiments import load_spec, quality_config, quality_key

spec_file, out = sys.argv[1], Path(sys.argv[2])
spec = load_spec(spec_file)
q = spec.quality
rows = list(csv.DictReader(open(Path(__file__).parent / "quality.csv")))
cache = {}
for r in rows:
    if r["technique"] not in spec.models:
        continue
    key = quality_key(quality_config(spec, r["technique"], r["unit"], r["loss"]), q.samples, q.batch)
    e = cache.setdefault(key, {"layers": [], "seconds_per_estimate": float(r["seconds_per_estimate"])})
    e["layers"].append({"layer": r["layer"], "params": int(r["params"]), "nsr": float(r["nsr"]),
                        "cos_true": float(r["cos_true"]), "cos_bp": float(r["cos_bp"])})
out.mkdir(parents=True, exist_ok=True)
(out / "quality_cache.json").write_text(json.dumps(cache))
print(len(cache), "cached combinations")
