"""Peak memory and time of one gradient estimate through time, against T: GLR (two passes, noise drawn again)
and its alternatives beside back-propagation through time, on a recurrent spiking network.

    OMP_NUM_THREADS=1 python benchmarks/bench_through_time.py [--steps 10 100 1000] [--batch 32] [--hidden 128]
        [--inputs 1] [--replications 32] [--out FILE]

The network reads one value per step (pixel-by-pixel sequential MNIST reads 196 on 14×14 images):
``TimeLoop(Leaky(inputs, hidden, recurrent=True), LeakyIntegrator(hidden, 10), readout="mean")``. Each
(method, T) runs in a fresh process: one estimate on a tiny network (T = 2, 4 units, 2 inputs) does torch's
one-time set-up, model and data are built, the allocator's free memory is returned to the system, the
process's peak resident memory is reset to its resident memory now (``/proc/self/clear_refs``), and one
estimate at T runs (glibc told to map every block of 64 kB or more on its own, so that resident memory
follows the tensors alive); the table gives the peak's increase over
the resident memory before it (the estimate's own working set; data and model excluded) and the wall time
of that estimate. Methods, all through the same ``backward(model, x, y)``:

* ``bptt``          back-propagation through time, surrogate derivative (fast sigmoid, slope 25);
* ``glr``           GLR, activity noise on every step, leave-one-out baseline (two forward passes);
* ``glr-weight``    GLR, weight noise held over the sequence, layer-wise injection, baseline (one pass);
* ``es``            ES (antithetic weight noise, every layer; one pass);
* ``forward-grad``  forward gradients through time, one tangent per step and unit (two passes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch.distributions import Normal

METHODS = ("bptt", "glr", "glr-weight", "es", "forward-grad")


def build(steps: int, batch: int, hidden: int, inputs: int, seed: int = 0):
    import glrnet
    torch.manual_seed(seed)
    noise = Normal(0.0, 0.3)
    model = glrnet.TimeLoop(glrnet.Leaky(inputs, hidden, beta=0.9, threshold=1.0, recurrent=True, noise=noise),
                            glrnet.LeakyIntegrator(hidden, 10, beta=0.9, noise=noise), readout="mean")
    x = torch.rand(batch, steps, inputs)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def producer(method: str, replications: int):
    import glrnet
    if method == "bptt":
        return glrnet.Backprop()
    if method == "glr":
        return glrnet.GLR(replications=replications, prefetch=False)
    if method == "glr-weight":
        return glrnet.GLR(replications=replications, injection="layerwise", prefetch=False,
                          perturbation=glrnet.Weight(Normal(0.0, 0.02)))
    if method == "es":
        return glrnet.ES(population=replications, sigma=0.02)
    if method == "forward-grad":
        return glrnet.ForwardGradient(directions=1)
    raise ValueError(method)


def memory_mb() -> dict[str, float]:
    """The process's resident memory now (VmRSS) and its peak (VmHWM), MB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024.0
    return out


def reset_peak() -> None:
    """Return the allocator's free memory to the system (``malloc_trim``), then set the peak (VmHWM) to the
    resident memory now: writing 5 to /proc/self/clear_refs (Linux ≥ 4.0)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# glibc: every allocation of 64 kB or more its own mapping, returned at free, so that the resident memory
# follows the tensors alive (by default freed blocks stay resident and are reused unseen)
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def one(method: str, steps: int, batch: int, hidden: int, inputs: int, replications: int) -> dict:
    """One estimate in this process: peak-memory increase (MB) and wall time (s)."""
    est = producer(method, replications)
    model, x, y = build(2, 2, 4, inputs)
    est.backward(model, x, y)                 # warm-up on a tiny network: torch's one-time set-up, not the working set
    model, x, y = build(steps, batch, hidden, inputs)
    model.zero_grad()
    reset_peak()
    before = memory_mb()["VmRSS"]
    t0 = time.perf_counter()
    est.backward(model, x, y)
    seconds = time.perf_counter() - t0
    return {"method": method, "steps": steps, "peak_increase_mb": memory_mb()["VmHWM"] - before, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inputs", type=int, default=1)
    ap.add_argument("--replications", type=int, default=32)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.batch, args.hidden, args.inputs,
                             args.replications)))
        return
    rows = []
    for method in args.methods:
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--one", method, str(steps), "--batch", str(args.batch),
                   "--hidden", str(args.hidden), "--inputs", str(args.inputs),
                   "--replications", str(args.replications)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                            env={**os.environ, **CHILD_ENV}).stdout.strip()
                             .splitlines()[-1])
            rows.append(res)
            print(f"{method:13s} T = {steps:5d}: peak +{res['peak_increase_mb']:8.1f} MB, {res['seconds']:8.2f} s",
                  flush=True)
    print()
    print(f"| method | " + " | ".join(f"T = {t:,}: MB / s" for t in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for method in args.methods:
        cells = [next(r for r in rows if r["method"] == method and r["steps"] == t) for t in args.steps]
        print(f"| {method} | " + " | ".join(f"{c['peak_increase_mb']:.1f} / {c['seconds']:.2f}" for c in cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
