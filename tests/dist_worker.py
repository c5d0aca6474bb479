"""Run under torchrun: N independent distributed GLR estimates, saved by rank 0 (used by test_distributed)."""

import sys

import torch
import torch.distributed as dist

from glrnet.estimators import distributed

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_cnn import tiny_cnn  # noqa: E402
from test_estimator import small_problem  # noqa: E402
from stats import flat_grads  # noqa: E402


def problem(arch: str):
    return small_problem([5, 4, 3], batch=6) if arch == "mlp" else tiny_cnn(seed=4, batch=4)


def main(out: str, parallel: str, variant: str, n: int, k: int, arch: str = "mlp") -> None:
    torch.set_default_dtype(torch.float64)
    distributed.init_from_env("cpu")
    model, x, y = problem(arch)
    kw = {"plain": {"baseline": False}, "baseline": {"baseline": True}, "both": {"baseline": True, "sampler": "antithetic"}}[variant]
    est = distributed.DistributedGLR(parallel=parallel, replications=k,
                                     generator=distributed.rank_generator(0), **kw)
    xs, ys = distributed.shard_batch(x, y, type("C", (), {"parallel": parallel}))
    samples = []
    for _ in range(n):
        grads, stats = est.estimate(model, xs, ys)
        samples.append(flat_grads(grads))
    samples = torch.stack(samples)
    gathered = [torch.zeros_like(samples) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, samples)
    if dist.get_rank() == 0:
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks disagree on the gradient"
        torch.save({"samples": samples, "loss": stats.loss}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:])
