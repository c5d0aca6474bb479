"""GLR step of a noisy CNN against its floor and against a back-propagation step, side by side.

    python benchmarks/bench_cnn.py [--device cpu|cuda] [--repeats 7] [--K 100] [--B 32] [--out FILE] [--src DIR]

The network is the LeNet of ``--arch lenet`` on 28×28 inputs: NoisyConv2d(1, 6, 5) → max-pool 2 →
NoisyConv2d(6, 16, 5) → max-pool 2 → flatten → NoisyLinear(256, 10), σ = 2, cross-entropy.
For sigmoid and threshold units it measures (medians, all in one process, measured round-robin):

* ``glr``      — ``glrnet.GLR(replications=K, baseline=False).estimate`` (plain, and with the
                 baseline; each also with ``prefetch=True``: noise drawn on a helper thread);
* ``floor``    — what any GLR implementation must do: draw the K·B·Σwidths noise values and run
                 the K·B noisy forward passes (no gradient work at all), in plain torch (no glrnet
                 code, so that two commits are measured against the same floor);
* ``bp``       — one back-propagation step (noise-free forward + backward) of the same CNN
                 on the same B images, the cost GLR replaces.

Prints glr/floor (overhead over the unavoidable work) and glr/bp, and writes JSON. ``--src DIR``
imports glrnet from another source tree (e.g. a worktree of the previous commit), so two commits
can be compared by their ratios to the same floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import sys

import torch


def lenet(activation: str):
    import glrnet
    return glrnet.NoisySequential(
        glrnet.NoisyConv2d(1, 6, 5, activation=activation), torch.nn.MaxPool2d(2),
        glrnet.NoisyConv2d(6, 16, 5, activation=activation), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        glrnet.NoisyLinear(256, 10), noise=torch.distributions.Normal(0.0, 2.0), input_shape=(1, 28, 28))


def median_times(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds of each function, measured round-robin (one call of each per round), so
    that a machine whose speed drifts, or that other jobs share, affects all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--K", type=int, default=100)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--src", default=None, help="import glrnet from this source folder")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    import glrnet
    dev, K, B = args.device, args.K, args.B
    results = {"src": glrnet.__file__, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": dev, "K": K, "B": B, "rows": []}
    for act in ("sigmoid", "threshold"):
        torch.manual_seed(0)
        net = lenet(act).to(dev)
        x = torch.rand(B, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (B,), device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        plain = glrnet.GLR(replications=K, baseline=False, generator=gen, prefetch=False)
        base = glrnet.GLR(replications=K, baseline=True, generator=gen, prefetch=False)
        plain_pf = glrnet.GLR(replications=K, baseline=False, generator=gen, prefetch=True)
        base_pf = glrnet.GLR(replications=K, baseline=True, generator=gen, prefetch=True)
        width = sum(net.widths)
        chunk = max(1, min(K, int(16 * 2**20) // (B * 6 * width * 4)))   # a 16 MB working set per chunk
        buf = torch.empty(chunk, B, width, device=dev)

        layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

        @torch.no_grad()
        def floor():   # plain torch, no glrnet code: the same noise and the same noisy forward passes
            for k0 in range(0, K, chunk):
                k = min(chunk, K - k0)
                r = buf[:k].normal_(0.0, 2.0, generator=gen)
                h, offset = x, 0
                for m in net.layers:
                    if m not in layers:
                        h = m(h)
                        continue
                    z = (torch.nn.Conv2d.forward if isinstance(m, torch.nn.Conv2d) else torch.nn.Linear.forward)(m, h)
                    w = z[0].numel()
                    noise = r[..., offset:offset + w].reshape(k, B, *z.shape[1:])
                    offset += w
                    h = (z.unsqueeze(0) + noise if h is x else z.reshape(k, B, *z.shape[1:]) + noise)
                    h = h.reshape(k * B, *z.shape[1:])
                    h = m.activation(h) if m.activation is not None else h

        def bp():
            net.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()

        row = {"activation": act}
        fns = {"floor": floor, "glr": lambda: plain.estimate(net, x, y),
               "glr_baseline": lambda: base.estimate(net, x, y), "glr_prefetch": lambda: plain_pf.estimate(net, x, y),
               "glr_baseline_prefetch": lambda: base_pf.estimate(net, x, y), "bp": bp}
        for name, sec in median_times(fns, args.repeats, dev).items():
            row[name + "_ms"] = 1000 * sec
        row["glr_over_floor"] = row["glr_ms"] / row["floor_ms"]
        row["glr_baseline_over_floor"] = row["glr_baseline_ms"] / row["floor_ms"]
        row["glr_prefetch_over_floor"] = row["glr_prefetch_ms"] / row["floor_ms"]
        row["glr_baseline_prefetch_over_floor"] = row["glr_baseline_prefetch_ms"] / row["floor_ms"]
        row["glr_over_bp"] = row["glr_ms"] / row["bp_ms"]
        row["sample_replications_per_s"] = K * B / (row["glr_ms"] / 1000)
        results["rows"].append(row)
        print(f"{act:9s} K={K} B={B}: floor {row['floor_ms']:.1f} ms | GLR {row['glr_ms']:.1f} ms "
              f"({row['glr_over_floor']:.2f}× floor) | GLR+baseline {row['glr_baseline_ms']:.1f} ms "
              f"({row['glr_baseline_over_floor']:.2f}× floor) | prefetch: {row['glr_prefetch_over_floor']:.2f}× / "
              f"{row['glr_baseline_prefetch_over_floor']:.2f}× | BP step {row['bp_ms']:.2f} ms "
              f"(GLR = {row['glr_over_bp']:.0f}× BP) | {row['sample_replications_per_s']:.3g} sample-rep/s",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
