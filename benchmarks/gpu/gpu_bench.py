"""The benchmark stage of ``device_check.py``: one GLR step against its floor, side by side on one device.

    PYTHONPATH=src python benchmarks/gpu/gpu_bench.py --out bench.json --profile profile.txt [--smoke] [--device cuda]

Configurations (batch B, K noisy replications per input, σ = 2 on the units, cross-entropy):

* the seed's MLP 196-20-10 at K = 10⁴, B = 25 and the 784-256-256-10 MLP at K = 10³, B = 64 (sigmoid and
  threshold units, every unit noisy);
* the threshold LeNet of ``--arch lenet`` (conv 6@5×5, max-pool 2, conv 16@5×5, max-pool 2, output layer) at
  K = 96 / 384 / 1,536, B = 32, three ways: ``activity`` (noise on all 4,490 units: the seed's estimator),
  ``weight`` (noise σ_w = 0.05 on the convolutions' parameters, one draw per replication, every layer noisy in
  every replication: the scale study's weight-conv) and ``layerwise`` (that, with each replication noisy in one
  layer only, K/3 per layer: weight-layerwise, the technique of the training stage).

Each GLR variant (``default``: ``glrnet.GLR(replications=K)`` as a user writes it, leave-one-out baseline;
``budget``: a memory budget that holds all K replications in one chunk on a large GPU; ``budget-nocheck``: that
without the finite-loss check's host synchronisation; MLPs also ``plain``: no baseline, as in
docs/performance.md) is timed round-robin with its *floor*: the K·B noisy forward passes and their noise, in
plain torch (no glrnet code): the same number of noise values drawn in place, the first layer computed once
where its input is shared, per-replication kernels as one (grouped) convolution, torch's own pooling. What any
GLR implementation must do; the gradient work, the loss and the baseline are GLR's overhead over it.

Per row: median wall time per step (synchronised before and after each call) and the median of CUDA-event
times, the floor's, their ratio, noisy sample-replications per second (K·B / step time), the chunks the
estimator used, the peak device memory of one call, and the host synchronisations of one call
(``torch.cuda.set_sync_debug_mode``, set and reset in this process only). Then a ``torch.profiler`` table of the
configuration with the largest ratio (top kernels by device time, and the host side by CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import glrnet
from glrnet.train import TrainConfig, build_model   # the one non-top-level import of this file

TARGET_RATIO = 1.5            # the study's target: every step within 1.5× its floor
TARGET_SEED_RATE = 1e9        # and the seed's MLP at ≥ 10⁹ noisy sample-replications per second
BIG_BUDGET_MB = 16384.0       # "budget" variants: every replication in one chunk on a large GPU


def configurations(smoke: bool) -> list[dict]:
    """The benchmark rows' configurations, most important first (a stage short of time drops the last ones):
    the seed's MLP, the LeNet's layer-wise technique (the training stage's), its weight and activity noise, the
    large MLP. ``smoke``: the same networks at toy K and B."""
    def mlp(name, sizes, K, B):
        return [dict(name=f"{name} {'-'.join(map(str, sizes))} {act}", net="mlp", sizes=sizes, activation=act,
                     technique="activity", K=60 if smoke else K, B=5 if smoke else B)
                for act in (("threshold",) if smoke else ("sigmoid", "threshold"))]
    out = mlp("seed-mlp", [196, 20, 10], 10000, 25)
    for technique in ("layerwise", "weight", "activity"):
        for K in ((6,) if smoke else (96, 384, 1536)):
            out.append(dict(name=f"lenet threshold {technique}", net="lenet", activation="threshold",
                            technique=technique, K=K, B=4 if smoke else 32))
    return out + mlp("large-mlp", [784, 256, 256, 10], 1000, 64)


def build(cfg: dict, device: torch.device):
    """(model, x, y, estimator options shared by the variants) of one configuration."""
    torch.manual_seed(0)
    if cfg["net"] == "mlp":
        model = glrnet.NoisyMLP(cfg["sizes"], activation=cfg["activation"])
        shape, classes = (cfg["sizes"][0],), cfg["sizes"][-1]
    else:
        perturb = "activity" if cfg["technique"] == "activity" else "conv=weight:0.05"
        model = build_model(TrainConfig(arch="lenet", hidden=[], activation=cfg["activation"], perturb=perturb),
                            (28, 28), 10)
        shape, classes = (1, 28, 28), 10
    model = model.to(device)
    x = torch.rand(cfg["B"], *shape, device=device)
    y = torch.randint(0, classes, (cfg["B"],), device=device)
    options = {"injection": "layerwise"} if cfg["technique"] == "layerwise" else {}
    return model, x, y, options


def variants(cfg: dict) -> dict[str, dict]:
    out = {"default": {}, "budget": {"memory_budget_mb": BIG_BUDGET_MB},
           "budget-nocheck": {"memory_budget_mb": BIG_BUDGET_MB, "check_finite": False}}
    if cfg["net"] == "mlp":
        out["plain"] = {"baseline": False}
    return out


# ---------------------------------------------------------------------------- floors (plain torch)
def _act(name: str):
    if name == "threshold":
        return lambda v: torch.gt(v, 0, out=torch.empty_like(v))
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"no floor for activation {name!r}")


def floor_fn(cfg: dict, model, x: torch.Tensor, gen: torch.Generator):
    """The K·B noisy forward passes of ``cfg`` and their noise, in plain torch; returns a no-argument callable."""
    K, B, sigma, phi = cfg["K"], cfg["B"], 2.0, _act(cfg["activation"])
    dev, dt = x.device, x.dtype
    if cfg["net"] == "mlp":
        lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        widths = [m.out_features for m in lin]
        buf = torch.empty(K, B, sum(widths), device=dev, dtype=dt)

        @torch.no_grad()
        def mlp_floor():
            buf.normal_(0.0, sigma, generator=gen)
            h = (x @ lin[0].weight.T + lin[0].bias).unsqueeze(0) + buf[..., :widths[0]]   # first layer once per input
            o = widths[0]
            for m, w in zip(lin[1:], widths[1:]):
                h = torch.addmm(m.bias, phi(h).reshape(K * B, -1), m.weight.T).reshape(K, B, w).add_(buf[..., o:o + w])
                o += w
            return h
        return mlp_floor
    c1, c2 = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    W1, b1, W2, b2, W3, b3 = c1.weight, c1.bias, c2.weight, c2.bias, fc.weight, fc.bias
    P1, P2 = W1.numel() + b1.numel(), W2.numel() + b2.numel()
    pool = lambda h: F.max_pool2d(h, 2)  # noqa: E731
    if cfg["technique"] == "activity":           # every unit noisy in every replication
        r1 = torch.empty(K, B, 6, 24, 24, device=dev, dtype=dt)     # one contiguous block per layer
        r2 = torch.empty(K * B, 16, 8, 8, device=dev, dtype=dt)
        r3 = torch.empty(K, B, 10, device=dev, dtype=dt)

        @torch.no_grad()
        def activity_floor():
            for r in (r1, r2, r3):
                r.normal_(0.0, sigma, generator=gen)
            h = F.conv2d(x, W1, b1).unsqueeze(0) + r1                   # conv1 once per input
            h = pool(phi(h.reshape(K * B, 6, 24, 24)))
            h = pool(phi(F.conv2d(h, W2, b2).add_(r2)))
            return torch.addmm(b3, h.reshape(K * B, 256), W3.T).reshape(K, B, 10).add_(r3)
        return activity_floor

    def perturbed(W, b, e, k):                   # k kernels θ + eₖ as one (k·O, ...) kernel
        O = W.shape[0]
        return ((W.unsqueeze(0) + e[:, :W.numel()].reshape(k, *W.shape)).reshape(k * O, *W.shape[1:]),
                (b.unsqueeze(0) + e[:, W.numel():]).reshape(k * O))

    if cfg["technique"] == "weight":             # conv kernels perturbed per replication, every layer noisy
        e1, e2 = torch.empty(K, P1, device=dev, dtype=dt), torch.empty(K, P2, device=dev, dtype=dt)
        r = torch.empty(B, K, 10, device=dev, dtype=dt)

        @torch.no_grad()
        def weight_floor():
            e1.normal_(0.0, 0.05, generator=gen)
            e2.normal_(0.0, 0.05, generator=gen)
            r.normal_(0.0, sigma, generator=gen)
            h = pool(phi(F.conv2d(x, *perturbed(W1, b1, e1, K))))                 # (B, K·6, 12, 12): shared input
            h = pool(phi(F.conv2d(h, *perturbed(W2, b2, e2, K), groups=K)))      # (B, K·16, 4, 4): its own kernel
            return torch.addmm(b3, h.reshape(B * K, 256), W3.T).reshape(B, K, 10).add_(r)
        return weight_floor
    k = K // 3                                   # layerwise: K/3 replications noisy in each layer only
    e1, e2 = torch.empty(k, P1, device=dev, dtype=dt), torch.empty(k, P2, device=dev, dtype=dt)
    r = torch.empty(k, B, 10, device=dev, dtype=dt)

    @torch.no_grad()
    def layerwise_floor():
        e1.normal_(0.0, 0.05, generator=gen)
        e2.normal_(0.0, 0.05, generator=gen)
        r.normal_(0.0, sigma, generator=gen)
        h = pool(phi(F.conv2d(x, *perturbed(W1, b1, e1, k))))                     # conv1 noisy: (B, k·6, 12, 12)
        h = pool(phi(F.conv2d(h.reshape(B * k, 6, 12, 12), W2, b2)))              # the rest per replication
        out1 = torch.addmm(b3, h.reshape(B * k, 256), W3.T)
        h0 = pool(phi(F.conv2d(x, W1, b1)))                                       # noise-free up to conv2, once
        h = pool(phi(F.conv2d(h0, *perturbed(W2, b2, e2, k))))                    # conv2 noisy: (B, k·16, 4, 4)
        out2 = torch.addmm(b3, h.reshape(B * k, 256), W3.T)
        z3 = torch.addmm(b3, pool(phi(F.conv2d(h0, W2, b2))).reshape(B, 256), W3.T)   # output layer noisy
        return out1, out2, z3.unsqueeze(0) + r
    return layerwise_floor


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median wall seconds of each function (and of CUDA-event seconds on a GPU), measured round-robin: one call
    of each per round, each synchronised before and after, so that drift affects all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    wall = {n: [] for n in fns}
    events = {n: [] for n in fns}
    cuda = device.type == "cuda"
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t = time.perf_counter()
            fn()
            if cuda:
                end.record()
            _sync(device)
            wall[name].append(time.perf_counter() - t)
            if cuda:
                events[name].append(start.elapsed_time(end) / 1000)
    return {n: {"wall_s": statistics.median(wall[n]),
                "event_s": statistics.median(events[n]) if events[n] else None} for n in fns}


def host_syncs(fn, device: torch.device) -> int | None:
    """Synchronising CUDA calls made by one call of ``fn`` (torch's sync debug mode, reset afterwards)."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_memory_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(cfg: dict, device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """One configuration: every variant and the floor, round-robin; one row per variant."""
    model, x, y, options = build(cfg, device)
    K, B = cfg["K"], cfg["B"]
    fns, ests = {}, {}
    for name, extra in variants(cfg).items():
        est = glrnet.GLR(replications=K, generator=torch.Generator(device=device).manual_seed(1), **options, **extra)
        ests[name] = est
        fns[name] = (lambda e: lambda: e.estimate(model, x, y))(est)
    fns["floor"] = floor_fn(cfg, model, x if cfg["net"] == "mlp" else model.bind(x),
                            torch.Generator(device=device).manual_seed(2))
    times = median_times(fns, repeats, warmup, device)
    floor = times["floor"]["wall_s"]
    floor_peak = peak_memory_mb(fns["floor"], device)
    rows = []
    for name, est in ests.items():
        step = times[name]["wall_s"]
        chunks = est.estimate(model, x, y)[1].chunks
        ev, fev = times[name]["event_s"], times["floor"]["event_s"]
        rows.append({"config": cfg["name"], "net": cfg["net"], "activation": cfg["activation"],
                     "technique": cfg["technique"], "K": K, "B": B, "variant": name, "options": {**options,
                     **variants(cfg)[name]}, "step_ms": 1000 * step, "floor_ms": 1000 * floor, "ratio": step / floor,
                     "event_step_ms": None if ev is None else 1000 * ev,
                     "event_floor_ms": None if fev is None else 1000 * fev,
                     "event_ratio": None if ev is None or not fev else ev / fev,
                     "sample_replications_per_s": K * B / step, "chunks": chunks,
                     "peak_memory_mb": peak_memory_mb(fns[name], device),
                     "floor_peak_memory_mb": floor_peak,
                     "host_syncs": host_syncs(fns[name], device), "repeats": repeats, "warmup": warmup})
    fns.clear()
    ests.clear()
    return rows


def profile_table(cfg: dict, variant: str, device: torch.device, steps: int = 3) -> str:
    """torch.profiler tables of ``steps`` GLR steps of one configuration: kernels by device time, host by CPU."""
    from torch.profiler import ProfilerActivity, profile
    model, x, y, options = build(cfg, device)
    est = glrnet.GLR(replications=cfg["K"], generator=torch.Generator(device=device).manual_seed(1), **options,
                     **variants(cfg)[variant])
    for _ in range(2):
        est.estimate(model, x, y)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            est.estimate(model, x, y)
        _sync(device)
    avg = prof.key_averages()
    launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    parts = [f"# {cfg['name']}, K = {cfg['K']}, B = {cfg['B']}, variant {variant} ({steps} steps profiled)",
             f"# kernel launches per step: {launches / steps:.0f}" if device.type == "cuda" else
             "# (CPU run: no device kernels)", ""]
    if device.type == "cuda":
        parts += ["## top operators and kernels by self device time", "",
                  avg.table(sort_by="self_device_time_total", row_limit=30), ""]
    parts += ["## the host side: top operators by total CPU time", "",
              avg.table(sort_by="cpu_time_total", row_limit=30)]
    return "\n".join(parts)


def run(out: Path, profile_out: Path | None, device: str, smoke: bool, repeats: int | None, deadline: float | None,
        only: str = "") -> dict:
    """Measure every configuration (stopping before ``deadline``, a ``time.time()``), write ``out`` after each."""
    dev = torch.device(device)
    repeats = repeats or (2 if smoke else 10)
    warmup = 1 if smoke else 3
    result = {"device": device, "smoke": smoke, "torch": torch.__version__, "machine": platform.node(),
              "floor": "the K·B noisy forward passes and their noise, plain torch (see gpu_bench.py)",
              "targets": {"ratio_max": TARGET_RATIO, "seed_mlp_sample_replications_per_s_min": TARGET_SEED_RATE},
              "rows": [], "skipped": [], "errors": []}
    t_start = time.time()
    per_config = []
    for cfg in configurations(smoke):
        label = f"{cfg['name']} K={cfg['K']} B={cfg['B']}"
        if only and only not in label:
            continue
        left = None if deadline is None else deadline - time.time()
        guess = max(per_config) if per_config else 0.0      # the slowest configuration so far; the profile after
        if left is not None and per_config and left < (2.5 if profile_out is not None else 1.5) * guess + 2:
            result["skipped"].append(f"{label}: {left:.0f} s left of the stage's budget")
            print(f"skip {label}: out of time", flush=True)
            continue
        t = time.time()
        try:
            rows = measure(cfg, dev, repeats, warmup)
        except Exception as e:   # one configuration failing (e.g. out of memory) must not stop the others
            result["errors"].append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"ERROR {label}: {type(e).__name__}: {e}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        per_config.append(time.time() - t)
        if dev.type == "cuda":
            torch.cuda.empty_cache()       # the configuration's buffers are gone: return their memory
        result["rows"] += rows
        for r in rows:
            print(f"{label:45s} {r['variant']:15s} step {r['step_ms']:9.3f} ms  floor {r['floor_ms']:9.3f} ms  "
                  f"ratio {r['ratio']:6.2f}  {r['sample_replications_per_s']:.3g} sample-rep/s  chunks {r['chunks']}"
                  + (f"  syncs {r['host_syncs']}" if r["host_syncs"] is not None else ""), flush=True)
        _write(out, result)
    defaults = [r for r in result["rows"] if r["variant"] == "default"]
    seed = [r for r in defaults if r["config"].startswith("seed-mlp")]
    result["summary"] = {
        "configs": len(defaults), "max_default_ratio": max((r["ratio"] for r in defaults), default=None),
        "default_within_target": sum(r["ratio"] <= TARGET_RATIO for r in defaults),
        "best_variant_within_target": sum(min(q["ratio"] for q in result["rows"] if q["config"] == r["config"]
                                              and q["K"] == r["K"]) <= TARGET_RATIO for r in defaults),
        "seed_mlp_best_sample_replications_per_s": max((q["sample_replications_per_s"] for q in result["rows"]
                                                        if q["config"].startswith("seed-mlp")), default=None),
        "seed_mlp_default_sample_replications_per_s": [r["sample_replications_per_s"] for r in seed],
        "seconds": time.time() - t_start}
    if profile_out is not None and defaults:
        worst = max(defaults, key=lambda r: r["ratio"])
        cfg = next(c for c in configurations(smoke) if c["name"] == worst["config"] and c["K"] == worst["K"])
        left = None if deadline is None else deadline - time.time()
        head = (f"# slowest ratio to its floor: {worst['config']} K={worst['K']} B={worst['B']}, default variant, "
                f"ratio {worst['ratio']:.2f}\n")
        if left is not None and left < 0.5 * max(per_config):
            text = f"not profiled: {left:.0f} s left of the stage's budget"
            result["skipped"].append(f"profile of {worst['config']} K={worst['K']}: {left:.0f} s left")
        else:
            try:
                text = profile_table(cfg, "default", dev, steps=2 if smoke else 3)
                result["profiled"] = f"{worst['config']} K={worst['K']} (ratio {worst['ratio']:.2f})"
            except Exception as e:
                text = f"profiling {worst['config']} K={worst['K']} failed: {type(e).__name__}: {e}"
                result["errors"].append(text)
        profile_out.write_text(f"{head}{text}\n")
    _write(out, result)
    return result


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="bench.json to write")
    ap.add_argument("--profile", default=None, help="profile.txt to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="toy K and B (seconds, CPU allowed)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="stop starting configurations after this long")
    ap.add_argument("--only", default="", help="only configurations whose label contains this text")
    args = ap.parse_args(argv)
    deadline = None if args.seconds is None else time.time() + args.seconds
    run(Path(args.out), Path(args.profile) if args.profile else None, args.device, args.smoke, args.repeats,
        deadline, args.only)


if __name__ == "__main__":
    sys.exit(main())
