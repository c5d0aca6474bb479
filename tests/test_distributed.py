"""torch.distributed: real processes (2 ranks, gloo, this CPU) launched by torchrun."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stats import assert_means_equal
from test_estimator import glr_samples, pathwise_samples

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("parallel,variant,arch", [("replications", "plain", "mlp"), ("replications", "baseline", "mlp"),
                                                   ("data", "baseline", "mlp"), ("replications", "both", "mlp"),
                                                   ("replications", "baseline", "cnn"), ("data", "baseline", "cnn")])
def test_distributed_estimator_unbiased_and_equal_to_single_process(tmp_path, float64, parallel, variant, arch):
    """2 ranks, K replications in all: same mean as the single-process K-replication estimator and as
    the pathwise gradient; the spread matches the single-process one (same K ⇒ same variance).
    For an MLP and for a noisy CNN."""
    from dist_worker import problem
    n, k = 150, 400
    out = tmp_path / "samples.pt"
    torchrun([str(HERE / "dist_worker.py"), str(out), parallel, variant, str(n), str(k), arch])
    dist_samples = torch.load(out)["samples"]
    model, x, y = problem(arch)
    kw = {"plain": {"baseline": False}, "baseline": {"baseline": True}, "both": {"baseline": True, "sampler": "antithetic"}}[variant]
    single = glr_samples(model, x, y, n=n, replications=k, **kw)
    print(assert_means_equal(dist_samples, single))
    # per replication the pathwise gradient varies far less than GLR, so k replications suffice
    print(assert_means_equal(dist_samples, pathwise_samples(model, x, y, n=n, replications=k)))
    ratio = dist_samples.var(0).sum() / single.var(0).sum()
    # the total variance of both is estimated from n draws; its log has SE ≲ sqrt(2/n) each
    assert abs(torch.log(ratio).item()) < 4 * (2 * 2 / n) ** 0.5, ratio


@pytest.mark.slow
def test_two_rank_training_learns_and_writes_one_set_of_outputs(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "glrnet", "train", "--dataset", "digits", "--epochs", "3", "--replications", "400",
            "--parallel", "data", "--out", str(out), "--quiet"]
    torchrun(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_accuracy_ot"] > 0.6
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "checkpoint.safetensors", "curves.png",
                                                     "history.csv", "metrics.json", "model.safetensors"]


@pytest.mark.slow
def test_resumed_distributed_run_continues_identically(tmp_path):
    """2 ranks, replication-parallel: 1 epoch then --resume to 2 epochs = 2 epochs straight."""
    base = ["-m", "glrnet", "train", "--dataset", "digits", "--replications", "200", "--subset", "400",
            "--quiet", "--baseline"]
    torchrun([*base, "--epochs", "2", "--out", str(tmp_path / "straight")])
    torchrun([*base, "--epochs", "1", "--out", str(tmp_path / "split")])
    torchrun([*base, "--epochs", "2", "--out", str(tmp_path / "split"), "--resume"])
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_world_of_one_rank_is_the_single_process_estimator(tmp_path):
    """In process, a gloo group of one rank: the grid, the shard, and DistributedGLR's estimate, which is
    GLR's on the same noise stream exactly (the multi-process cases above are the slow ones)."""
    import torch.distributed as dist

    from glrnet.estimators import GLR, distributed
    from test_estimator import small_problem
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.data_groups("replications", 4) == 1 and distributed.data_groups("data", 4) == 4
    assert distributed.data_groups("2", 4) == 2
    with pytest.raises(ValueError, match="do not divide"):
        distributed.data_groups("3", 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, x, y = small_problem([5, 4, 3], batch=6)
        assert distributed.grid_position("data") == (0, 1, 0, 1)
        xs, ys = distributed.shard_batch(x, y, type("C", (), {"parallel": "data"}))
        assert xs is x and ys is y
        for kw in (dict(baseline=False), dict(baseline=True, sampler="antithetic")):
            a, sa = distributed.DistributedGLR(parallel="data", replications=64,
                                               generator=distributed.rank_generator(0), **kw).estimate(model, xs, ys)
            b, sb = GLR(replications=64, generator=distributed.rank_generator(0), **kw).estimate(model, x, y)
            for g, h in zip(a, b):
                torch.testing.assert_close(g, h)
            torch.testing.assert_close(sa.loss, sb.loss)
    finally:
        dist.destroy_process_group()
    assert distributed.world_size() == 1
