"""Scaling efficiency of distributed GLR (torch.distributed, gloo on CPU) over 1, 2, ... ranks.

    python benchmarks/bench_scaling.py [--ranks 1,2] [--steps 20] [--parallel replications|data]

Each measurement launches ``torchrun --nproc_per_node=P``; every rank gets cores/P intra-op
threads. Work per step is fixed (the seed's 196-20-10, K = 10000, batch 25), so strong
scaling: efficiency(P) = T(1) / (P · T(P)). Across machines, launch the same worker with
``torchrun --nnodes=N --node_rank=i --rdzv_endpoint=HOST:PORT`` (docs/performance.md, "Scaling out").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import glrnet
    from glrnet.estimators import distributed
    if not dist.is_initialized():  # also for 1 rank: the same code path, all-reduces included
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = glrnet.NoisyMLP([196, 20, 10])
    x, y = torch.rand(args.batch, 196), torch.randint(0, 10, (args.batch,))
    est = distributed.DistributedGLR(parallel=args.parallel, replications=args.replications,
                                     generator=distributed.rank_generator(0))

    class Cfg:
        parallel = args.parallel
    xs, ys = distributed.shard_batch(x, y, Cfg)
    for _ in range(3):
        est.estimate(model, xs, ys)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t = time.perf_counter()
        est.estimate(model, xs, ys)
        times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        print(json.dumps({"ranks": dist.get_world_size(), "median_s": statistics.median(times)}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--replications", type=int, default=10000)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--parallel", default="replications")
    p.add_argument("--threads-per-rank", type=int, default=0,
                   help="intra-op threads per rank (0: cores / ranks, i.e. the whole machine every time)")
    p.add_argument("--out", default="benchmarks/scaling.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    rows = []
    for n in [int(r) for r in args.ranks.split(",")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threads = args.threads_per_rank or max(1, cores // n)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={port}", __file__, "--worker", "--steps", str(args.steps), "--replications",
               str(args.replications), "--batch", str(args.batch), "--parallel", args.parallel]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        t1 = rows[0]["median_s"]
        r = rows[-1]
        r["speedup"] = t1 / r["median_s"]
        r["efficiency"] = r["speedup"] / r["ranks"] * rows[0]["ranks"]
        r["threads_per_rank"] = threads
        print(f"{r['ranks']} rank(s) × {threads} threads: {r['median_s'] * 1e3:7.1f} ms/step  "
              f"speed-up {r['speedup']:.2f}×  efficiency {100 * r['efficiency']:.0f} %  "
              f"({args.parallel}-parallel, K={args.replications}, batch {args.batch})", flush=True)
    with open(args.out, "w") as f:
        json.dump({"cores": cores, "parallel": args.parallel, "threads_per_rank": args.threads_per_rank,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
