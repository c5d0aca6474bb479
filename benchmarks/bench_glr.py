"""GLR step throughput: glrnet vs the seed's naive style vs the machine's floor, side by side.

    python benchmarks/bench_glr.py [--device cpu|cuda] [--repeats 15] [--out benchmarks/results.json]
                                   [--compare-src DIR]

For each configuration (the seed's 196-20-10, K = 10000, batch 25; and 784-256-256-10,
K = 1000, batch 64; σ = 2, cross-entropy; sigmoid and threshold) it measures, each in a
fresh subprocess (so peak memory is per measurement), the median time of one gradient
estimate for:

* ``ours``   — ``glrnet.GLR(baseline=False).estimate`` (the plain estimator, like the others;
               default settings, so ``prefetch="auto"``);
* ``ours-prefetch`` / ``ours-no-prefetch`` — the same with ``prefetch=True`` (noise drawn on a
               helper thread, torch's threads lowered by one for the call) / ``False``: what
               prefetching buys;
* ``ours-antithetic`` — ``sampler="antithetic"`` (half the random numbers);
* ``naive``  — the seed's style: each input replicated K times, every per-sample outer
               product s·xᵀ materialised and averaged (a Python loop over the batch keeps
               it inside memory);
* ``floor``  — the same number of noise values drawn in place plus matrix products of the
               same shapes (forward and gradient): what any implementation must do.

Prints ours/naive (speed-up) and ours/floor (overhead) and writes JSON. Also: LAP
prediction throughput at K = 10000 and a back-propagation epoch (6000 images, batch 25).
``--compare-src DIR`` also measures ``ours`` and ``ours-prefetch`` of the glrnet in DIR (e.g. a
worktree of the previous commit, ``git worktree add /tmp/prev HEAD~1``) in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "seed 196-20-10 K=10000 B=25": dict(sizes=[196, 20, 10], K=10000, B=25),
    "large 784-256-256-10 K=1000 B=64": dict(sizes=[784, 256, 256, 10], K=1000, B=64),
}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats, device, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def naive_estimate(model, x, y, K):
    """The seed's approach: replicate inputs, materialise per-sample outer products, average."""
    grads = [torch.zeros_like(p) for p in model.parameters()]
    sigma = float(model.noise.stddev)
    for b in range(x.shape[0]):
        h = x[b].repeat(K, 1)                                  # (K, in): input replicated K times
        inputs, noises = [], []
        for t, layer in enumerate(model.layers):
            r = torch.randn(K, layer.out_features) * sigma
            inputs.append(h)
            noises.append(r)
            v = h @ layer.weight.T + layer.bias + r
            h = model.activation(v) if t < len(model.layers) - 1 else v
        loss = torch.nn.functional.cross_entropy(h, y[b].repeat(K), reduction="none")
        for t in range(len(model.layers)):
            s = noises[t] / sigma**2
            outer = (loss[:, None, None] * s[:, :, None]) * inputs[t][:, None, :]   # (K, out, in)
            grads[2 * t] += outer.mean(0)
            grads[2 * t + 1] += (loss[:, None] * s).mean(0)
    return [g / x.shape[0] for g in grads]


def one(impl: str, config: str, activation: str, device: str, repeats: int) -> dict:
    import glrnet
    c = CONFIGS[config]
    torch.manual_seed(0)
    model = glrnet.NoisyMLP(c["sizes"], activation=activation).to(device)
    x = torch.rand(c["B"], c["sizes"][0], device=device)
    y = torch.randint(0, 10, (c["B"],), device=device)
    K, B, widths = c["K"], c["B"], c["sizes"][1:]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warmup = 2
    if impl in ("ours", "ours-prefetch", "ours-no-prefetch"):
        kw = {} if impl == "ours" else {"prefetch": impl == "ours-prefetch"}   # "ours": the default
        est = glrnet.GLR(replications=K, baseline=False, **kw)
        fn = lambda: est.estimate(model, x, y)  # noqa: E731
    elif impl == "ours-antithetic":
        try:
            est = glrnet.GLR(replications=K, baseline=False, sampler="antithetic")
        except TypeError:   # glrnet before samplers
            est = glrnet.GLR(replications=K, baseline=False, antithetic=True)
        fn = lambda: est.estimate(model, x, y)  # noqa: E731
    elif impl == "naive":
        fn = lambda: naive_estimate(model, x, y, K)  # noqa: E731
        repeats = 3 if K * B <= 250_000 else 1          # it is slow: a minute per estimate on the large one
        warmup = 0
    elif impl == "floor":
        buf = torch.empty(K, B, sum(widths), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        acts = [torch.rand(K * B, w, device=device) for w in widths]
        mats = [torch.rand(w_out, w_in, device=device) for w_in, w_out in zip(c["sizes"][:-1], widths)]
        x0 = torch.rand(B, c["sizes"][0], device=device)

        def fn():
            buf.normal_(0, 2.0, generator=gen)                      # the noise values
            pre = x0 @ mats[0].T                                    # first layer, once
            for t in range(1, len(widths)):
                acts[t - 1] @ mats[t].T                             # forward of later layers
                acts[t].T @ acts[t - 1]                             # their weight gradients
            acts[0].reshape(K, B, -1).sum(0).T @ x0                 # first layer's gradient
            return pre
    else:
        raise ValueError(impl)
    median, times = _time(fn, repeats, device, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"impl": impl, "config": config, "activation": activation, "median_s": median,
           "sample_replications_per_s": K * B / median, "peak_rss_mb": peak / 1024,
           "peak_rss_over_setup_mb": (peak - base_rss) / 1024, "repeats": len(times)}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def lap_and_bp(device: str, repeats: int) -> dict:
    import glrnet
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([196, 20, 10]).to(device)
    x = torch.rand(200, 196, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    median, _ = _time(lambda: glrnet.predict_proba(model, x, "lap", 10000, generator=gen), max(3, repeats // 3), device, 1)
    xs, ys = torch.rand(6000, 196, device=device), torch.randint(0, 10, (6000,), device=device)
    bp = glrnet.Backprop()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch():
        for i in range(0, 6000, 25):
            opt.zero_grad()
            bp.backward(model, xs[i:i + 25], ys[i:i + 25])
            opt.step()
    bp_median, _ = _time(epoch, 3, device, 1)
    return {"lap_images_per_s_K10000": 200 / median, "bp_epoch_s_6000_images_batch25": bp_median,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    p.add_argument("--compare-src", default=None, help="also measure the glrnet in this source folder")
    p.add_argument("--one", nargs=3, metavar=("IMPL", "CONFIG", "ACTIVATION"), help=argparse.SUPPRESS)
    p.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown configuration(s) {unknown}; valid: {', '.join(repr(c) for c in CONFIGS)}")
    if args.one:
        print(json.dumps(one(*args.one, args.device, args.repeats)))
        return
    if args.extras:
        print(json.dumps(lap_and_bp(args.device, args.repeats)))
        return

    def sub(*extra, src=str(Path(__file__).resolve().parents[1] / "src")):
        cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), *extra]
        env = {**os.environ, "PYTHONPATH": src}
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env
                                         ).stdout.strip().splitlines()[-1])

    rows = []
    for config in args.configs.split(","):
        for act in ("sigmoid", "threshold"):
            r = {}
            for i in ("ours", "ours-prefetch", "ours-no-prefetch"):   # each beside the previous commit's
                r[i] = sub("--one", i, config, act)
                if args.compare_src:
                    r["previous-" + i] = sub("--one", i, config, act, src=args.compare_src)
            for i in ("ours-antithetic", "naive", "floor"):
                r[i] = sub("--one", i, config, act)
            rows.append({"config": config, "activation": act, **{f"{i}_s": r[i]["median_s"] for i in r},
                         **{f"{i}_over_floor": r[i]["median_s"] / r["floor"]["median_s"] for i in r if i != "floor"},
                         **{f"{i}_peak_rss_mb": r[i]["peak_rss_mb"] for i in r},
                         "ours_sample_replications_per_s": r["ours"]["sample_replications_per_s"],
                         "speedup_vs_naive": r["naive"]["median_s"] / r["ours"]["median_s"],
                         "ours_over_floor": r["ours"]["median_s"] / r["floor"]["median_s"],
                         "antithetic_over_floor": r["ours-antithetic"]["median_s"] / r["floor"]["median_s"]})
            row = rows[-1]
            print(f"{config:34s} {act:9s} ours {row['ours_s'] * 1e3:8.1f} ms  naive {row['naive_s'] * 1e3:9.1f} ms  "
                  f"floor {row['floor_s'] * 1e3:7.1f} ms  |  ours/naive speed-up {row['speedup_vs_naive']:6.1f}×  "
                  f"ours/floor {row['ours_over_floor']:.2f} (prefetch {row['ours-prefetch_over_floor']:.2f}, none "
                  f"{row['ours-no-prefetch_over_floor']:.2f})  antithetic/floor {row['antithetic_over_floor']:.2f}  "
                  + (f"previous: {row['previous-ours_over_floor']:.2f} (prefetch "
                     f"{row['previous-ours-prefetch_over_floor']:.2f}, none "
                     f"{row['previous-ours-no-prefetch_over_floor']:.2f})  " if args.compare_src else "") +
                  f"|  {row['ours_sample_replications_per_s']:.3g} sample-rep/s  peak RSS {row['ours_peak_rss_mb']:.0f} MB "
                  f"(naive {row['naive_peak_rss_mb']:.0f} MB)", flush=True)
    extras = sub("--extras")
    print(f"LAP prediction (196-20-10, K = 10000): {extras['lap_images_per_s_K10000']:.0f} images/s;  "
          f"BP epoch (6000 images, batch 25): {extras['bp_epoch_s_6000_images_batch25']:.2f} s")
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": torch.get_num_threads(), "torch": torch.__version__, "device": args.device},
              "seed_reported_s_per_iteration": 12.0, "rows": rows, "extras": extras}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
