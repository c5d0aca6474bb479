"""More attacks on the images an escalated robustness run left standing (the survivors recorded in its
journal): each attack at the escalation's last budget (the journal's settings doubled ``--doublings``
times), each on the images every earlier attack failed on; prints how many each broke and the LAP worst
case after it. An attack here can only lower the run's figure (the worst case is a per-image union), so
this checks a claimed worst case against attacks outside the protocol's plan, e.g. steeper sigmoid
surrogates where slope 4 already broke more images than slope 1. ``--journal`` may be given more than
once (journals of the same images and network, e.g. of two attack plans): the survivors are then the
images every attack of every journal failed on, the settings the first journal's.

    OMP_NUM_THREADS=1 python docs/results/scale/attack_survivors.py --run <run folder> \
        --journal <robustness out>/robustness_journal.safetensors --data-dir ../shared/data/mnist \
        --images 100 --eps 0.1 --doublings 3 --attacks "apgd-ce[sigmoid:8],apgd-ce[sigmoid:16]"
"""
import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from glrnet.robustness.settings import AttackSettings
from glrnet.robustness.attacks import AttackContext, correct, distance, resolve_attack
from glrnet.checkpoint import load_model
from glrnet.data import load_run_dataset
from glrnet.utils.seeding import stream_seed
from glrnet.robustness.journal import fingerprint, read_journal, survivors

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", required=True)
p.add_argument("--journal", required=True, action="append")
p.add_argument("--data-dir", required=True)
p.add_argument("--images", type=int, default=100)
p.add_argument("--eps", type=float, default=0.1)
p.add_argument("--doublings", type=int, default=3, help="the journal's settings doubled this many times")
p.add_argument("--attacks", required=True, help="comma-separated plan entries, e.g. apgd-ce[sigmoid:16]")
a = p.parse_args()

run = Path(a.run)
model, extra = load_model(run / "model.safetensors")
data = load_run_dataset(extra.get("config", {}), None, a.data_dir)
x, y = data.x_test[:a.images], data.y_test[:a.images]
alive = torch.ones(len(x), dtype=torch.bool)
for i, journal in enumerate(a.journal):
    fp, _ = read_journal(journal)
    settings = AttackSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(fp["settings"]).items()})
    base = settings if i == 0 else base
    mine = fingerprint({run.name: (model, True)}, x, y, json.loads(fp["eps"]), settings)
    wrong = [k for k in ("images", f"model {run.name}") if fp.get(k) != mine[k]]
    if wrong:
        raise SystemExit(f"{journal}: recorded with other {', '.join(wrong)} than --run {run} / --images {a.images}")
    alive &= survivors(journal, run.name, a.eps, "lap", len(x))
st = base
for _ in range(a.doublings):
    st = st.doubled()
print(f"{run.name} ε = {a.eps:g}: {int(alive.sum())} of {len(alive)} images survive every recorded attack "
      f"(LAP worst case {alive.double().mean():.3f}); attacks at {2 ** a.doublings}× "
      f"(steps {st.steps}, restarts {st.restarts}, EOT samples {st.eot_samples})", flush=True)
for i, attack in enumerate(a.attacks.split(",")):
    idx = alive.nonzero().squeeze(1)
    if not len(idx):
        break
    t0 = time.perf_counter()
    sti = replace(st, seed=stream_seed(st.seed, 16, i))      # streams of their own, apart from the run's
    gen = torch.Generator().manual_seed(sti.seed)
    fn, arg = resolve_attack(attack)
    xa = fn(AttackContext(model, True, sti, None, gen, 100 + i), x[idx], y[idx], a.eps, arg)
    if distance(xa, x[idx], st.norm).max() > a.eps * (1 + 1e-4) + 1e-5 or xa.min() < 0 or xa.max() > 1:
        raise RuntimeError(f"attack {attack} left the ε-ball or [0, 1]")
    held = correct(model, xa, y[idx], True, st.lap_replications, st.seed)["lap"]
    alive[idx] = held
    print(f"{attack}: on {len(idx)} images broke {int((~held).sum())}; LAP worst case now "
          f"{alive.double().mean():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
