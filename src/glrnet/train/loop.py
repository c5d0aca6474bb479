"""The training loop: any gradient producer (GLR, back-propagation, ES, ...) + any torch.optim optimizer.

``train(TrainConfig(...), out_dir)`` writes into ``out_dir``:

* ``checkpoint.safetensors`` (+ ``checkpoint.json``) after every epoch, atomically;
  ``resume=True`` continues from it and ends with the same weights as an
  uninterrupted run (every random stream is either saved or derived from the seed);
* ``history.csv`` after every epoch (``progress.csv`` with ``eval_every``); at the end
  ``model.safetensors``, ``metrics.json`` and ``curves.png`` (training / validation loss per epoch,
  the seed's Figure 5).

Works unchanged under ``torchrun`` (:mod:`glrnet.estimators.distributed`): each rank trains on its
shard or its share of the replications, only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..certify import first_layer, project_spectral_norm_, project_stiefel_
from ..checkpoint import (atomic_write_csv, atomic_write_text, load_checkpoint, output_lock, read_checkpoint_meta,
                          save_checkpoint, save_model)
from ..data import Dataset, load_dataset
from ..estimators import distributed as dist_utils
from ..estimators.samplers import IID
from ..estimators.through_time import sampled_pass
from ..nn import get_loss
from ..nn.injection import Layout, noisy_forward, probe
from ..nn.rescale import rescale_noise_
from ..plots import plot_curves
from ..predict import predict_proba
from ..sequences import encode
from .build import build_model, build_optimizer, build_producer
from .config import TrainConfig

HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_acc_ot", "lr", "seconds", "samples_per_second",
                  "sample_replications_per_second"]
PROGRESS_FIELDS = ["step", "epoch", "seconds", "budget_seconds", "val_acc_ot"]


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False,
          data: Dataset | None = None, progress: bool | None = None, desc: str | None = None) -> dict:
    """Train per ``cfg``; write outputs into ``out_dir`` (if given). Returns the metrics dict.

    ``quiet`` silences the per-epoch lines; ``progress`` (default: not ``quiet``) shows one
    bar over all batches of the run (rate, ETA), labelled ``desc``. ``out_dir`` is held by a
    lock file while the run writes there (:func:`~glrnet.checkpoint.output_lock`: a second
    process training into it is refused); a run that fails before its first checkpoint
    leaves no folder behind.
    """
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else None
    writer = out is not None and dist_utils.rank() == 0
    with output_lock(out) if writer else contextlib.nullcontext():
        finished = _finished(out, cfg, resume)
        if finished is not None:
            return finished
        run = _Run(cfg, data, out, resume, quiet, desc, (not quiet) if progress is None else progress)
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            run.begin_epoch()
            for xb, yb in run.batches(epoch):
                run.opt.zero_grad(set_to_none=True)
                if cfg.relative_noise is not None or cfg.relative_weight_noise is not None:
                    rescale_noise_(run.model, xb, cfg.relative_noise, cfg.relative_weight_noise)   # σ from (θ, batch)
                stats = run.producer(epoch).backward(run.model, xb, yb)
                run.opt.step()
                run.after_step(epoch, stats)
                if run.out_of_time():
                    break      # a time budget: this epoch ends here, as if it were the last
            run.end_epoch(epoch)
            if run.stopped:
                break
        return run.finish()


def _finished(out: Path | None, cfg: TrainConfig, resume: bool) -> dict | None:
    """The metrics of a finished run of the same config in ``out`` (``resume``), or ``None``; a
    ``ValueError`` for an ``out`` that cannot take this run."""
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    ckpt = out / "checkpoint.safetensors"
    if resume and ckpt.exists():   # before any weight is loaded: a clear line, not a size mismatch
        check_resumable(ckpt, cfg)
    if resume and (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
        if TrainConfig.from_saved(metrics.get("config", {})).to_dict() == cfg.to_dict():
            return metrics
    if not resume and ckpt.exists():
        raise ValueError(f"{out} already holds a run (checkpoint.safetensors); pass --resume to continue it "
                         "or choose another --out")
    return None


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """A ``ValueError`` naming the options in which ``cfg`` differs from the run saved in ``ckpt``
    (read from its metadata alone, before any weight is loaded); ``epochs`` may grow."""
    now = dict(cfg.to_dict(), epochs=cfg.epochs)
    saved = dict(TrainConfig.from_saved(read_checkpoint_meta(ckpt)["config"]).to_dict(), epochs=cfg.epochs)
    if saved != now:
        diff = sorted(k for k in saved if saved[k] != now.get(k))
        raise ValueError(f"{ckpt} was written with a different configuration (differs in "
                         + ", ".join(f"{k}: saved {saved[k]!r}, now {now.get(k)!r}" for k in diff)
                         + "); use another --out or the same options")


def _seeded(seed: int, *stream: int, device="cpu") -> torch.Generator:
    """A generator for one named stream of a run: a pure function of (seed, stream ids)."""
    return torch.Generator(device=device).manual_seed(dist_utils.stream_seed(seed, *stream))


class _Run:
    """The state of one run between steps: data, model, producers, optimizer, history, clocks; its
    checkpoint restored on ``resume``."""

    def __init__(self, cfg: TrainConfig, data: Dataset | None, out: Path | None, resume: bool, quiet: bool,
                 desc: str | None, progress: bool):
        self.cfg, self.out, self.quiet, self.desc, self.progress = cfg, out, quiet, desc, progress
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.writer = out is not None and self.rank == 0
        self.device = device = torch.device(cfg.device)
        if data is None:
            data = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.val_fraction, cfg.subset, cfg.seed,
                                split=cfg.split)
        self.data = data = data.to(device)
        with torch.random.fork_rng(devices=[]):   # the initial weights from the run's own stream; the
            torch.manual_seed(dist_utils.stream_seed(cfg.seed, 0))   # caller's global RNG is left as it was
            self.model = build_model(cfg, data.image_shape, data.num_classes).to(device)
        self.gen = _seeded(cfg.seed, 4, device=device)   # the estimator's noise (or BP's, with bp_noise)
        if cfg.method == "glr" and self.world > 1:
            self.gen = dist_utils.rank_generator(dist_utils.stream_seed(cfg.seed, 4), device)
        self.main = build_producer(cfg, self.gen)
        self.warmup = None if cfg.warmup_loss is None else build_producer(cfg, self.gen, loss=cfg.warmup_loss)
        self.opt, self.sched = build_optimizer(cfg, self.model)
        self.history, self.progress_rows, self.start_epoch, self.train_seconds = [], [], 1, 0.0
        self.ckpt = out / "checkpoint.safetensors" if out is not None else None
        if resume and self.ckpt is not None and self.ckpt.exists():
            self._restore()
        elif self.world > 1:
            dist_utils.broadcast_parameters(self.model)
        self.constrain = self._first_norm_constraint()
        self.encode = None if cfg.encoding == "none" else self._encoder
        has_val = data.x_val is not None and len(data.x_val) > 0
        self.x_val, self.y_val = (data.x_val, data.y_val) if has_val else (data.x_test, data.y_test)
        self.val_name = "validation" if has_val else "test"
        self.n = len(data.x_train)
        self.starts = range(0, self.n, cfg.batch_size)
        self.reps = getattr(self.main, "forward_passes", cfg.replications if cfg.noisy else 1)
        self.step = self.progress_rows[-1]["step"] if self.progress_rows else (self.start_epoch - 1) * len(self.starts)
        self.budget_used = self.progress_rows[-1].get("budget_seconds", 0.0) if self.progress_rows else 0.0
        self.clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
        self.stopped = False
        self.bar = tqdm(total=len(self.starts) * (cfg.epochs - self.start_epoch + 1), desc=desc or cfg.method,
                        disable=not progress or self.rank != 0, unit="batch", dynamic_ncols=True, leave=False)

    def _restore(self) -> None:
        meta = load_checkpoint(self.ckpt, self.model, self.opt, {"estimator": self.gen})
        if self.sched is not None and meta.get("scheduler"):
            self.sched.load_state_dict(meta["scheduler"])
        self.history, self.start_epoch, self.train_seconds = meta["history"], meta["epoch"] + 1, meta["train_seconds"]
        self.progress_rows = list(meta.get("progress", []))
        if self.world > 1:  # each rank continues its own stream: stored per rank in the sidecar
            self.gen.set_state(torch.tensor(meta["rank_rng"][self.rank], dtype=torch.uint8))

    def _first_norm_constraint(self):
        """After each step, ‖W₁‖₂ ≤ c (or every singular value = c): keeps the noise meaningful
        (docs/robustness.md, certified radii). ``None`` without ``max_first_norm``."""
        cfg = self.cfg
        if cfg.max_first_norm is None:
            return None
        x = self.data.x_train[:1]
        layer, shape = first_layer(self.model, x), tuple(self.model.bind(x).shape[1:])
        project = project_stiefel_ if cfg.first_norm_projection == "stiefel" else project_spectral_norm_
        constrain = lambda: project(layer, cfg.max_first_norm, shape)  # noqa: E731
        constrain()
        return constrain

    def _encoder(self, x, stream: tuple[int, ...]):
        """Images → the model's sequences; the rate code's spikes from the run's stream ``stream`` (the
        validation and test trains the same at every evaluation, each training batch its own)."""
        gen = _seeded(self.cfg.seed, 5, *stream, device=self.device)
        return encode(x, self.cfg.encoding, self.data.image_shape, gen)

    def producer(self, epoch: int):
        """The gradient producer of this epoch: the warm-up loss's for the first ``warmup_epochs``."""
        return self.warmup if epoch <= self.cfg.warmup_epochs else self.main

    def begin_epoch(self) -> None:
        self.model.train()
        self.t0, self.c0 = time.perf_counter(), self.clock()
        self.running = torch.zeros((), dtype=torch.float64, device=self.device)
        self.batch_index = 0

    def batches(self, epoch: int):
        """This epoch's shuffled batches (this rank's shard under torchrun)."""
        order = torch.randperm(self.n, generator=_seeded(self.cfg.seed, 1, epoch)).to(self.device)
        for b, start in enumerate(self.starts):
            idx = order[start:start + self.cfg.batch_size]
            x = self.data.x_train[idx] if self.encode is None else self.encode(self.data.x_train[idx], (0, epoch, b))
            yield dist_utils.shard_batch(x, self.data.y_train[idx], self.cfg)

    def after_step(self, epoch: int, stats) -> None:
        """The constraint, the running loss, mid-epoch validation and the progress bar."""
        cfg = self.cfg
        if self.constrain is not None:
            self.constrain()
        self.running += stats.loss
        self.bar.update()
        self.step += 1
        self.batch_index += 1
        if cfg.eval_every and self.step % cfg.eval_every == 0:
            acc = evaluate(self.model, self.x_val, self.y_val, cfg.loss, False, encode=self._split_encoder(1))["acc_ot"]
            self.progress_rows.append({"step": self.step, "epoch": epoch,
                                       "seconds": self.train_seconds + time.perf_counter() - self.t0,
                                       "budget_seconds": self.budget_used + self.clock() - self.c0, "val_acc_ot": acc})
        done = min(self.batch_index * cfg.batch_size, self.n)
        if self.progress and self.rank == 0 and (self.batch_index % 20 == 0 or done >= self.n):
            elapsed = time.perf_counter() - self.t0
            self.bar.set_postfix(epoch=f"{epoch}/{cfg.epochs}", loss=f"{self.running.item() / self.batch_index:.4f}",
                                 rep_per_s=f"{done * self.reps / elapsed:.3g}", refresh=False)

    def _split_encoder(self, split: int):
        """The encoder of a fixed split (1 validation, 2 test, 3 training for the curves): chunk i's sequences
        drawn from the same stream at every call. ``None`` for a model that takes images."""
        if self.encode is None:
            return None
        return lambda x, i: self.encode(x, (split, i))

    def out_of_time(self) -> bool:
        cfg = self.cfg
        if cfg.max_seconds is not None and self.budget_used + self.clock() - self.c0 >= cfg.max_seconds:
            self.stopped = True
        return self.stopped

    def end_epoch(self, epoch: int) -> None:
        """The schedule's step, the epoch's curves (train and validation loss), history and checkpoint."""
        cfg = self.cfg
        self.budget_used += self.clock() - self.c0
        if self.sched is not None:
            self.sched.step()
        seconds = time.perf_counter() - self.t0
        self.train_seconds += seconds
        g_eval = _seeded(cfg.seed, 2, epoch, device=self.device)
        tr = evaluate(self.model, self.data.x_train, self.data.y_train, cfg.loss, cfg.noisy, cfg.eval_replications,
                      g_eval, encode=self._split_encoder(3))
        va = evaluate(self.model, self.x_val, self.y_val, cfg.loss, cfg.noisy, cfg.eval_replications, g_eval,
                      encode=self._split_encoder(1))
        self.history.append({"epoch": epoch, "train_loss": tr["loss"], "val_loss": va["loss"],
                             "val_acc_ot": va["acc_ot"], "lr": self.opt.param_groups[0]["lr"], "seconds": seconds,
                             "samples_per_second": self.n / seconds,
                             "sample_replications_per_second": self.n * self.reps / seconds})
        if not self.quiet and self.rank == 0:
            v = self.val_name
            tqdm.write(f"epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f}  {v} loss {va['loss']:.4f}  "
                       f"{v} acc (OT) {va['acc_ot']:.4f}  {seconds:.1f}s  {self.n * self.reps / seconds:.3g} "
                       "sample-rep/s")
        self._checkpoint(cfg.epochs if self.stopped else epoch)

    def _checkpoint(self, epoch: int) -> None:
        sidecar = {"config": self.cfg.to_dict(), "epoch": epoch, "history": self.history,
                   "train_seconds": self.train_seconds, "progress": self.progress_rows,
                   "scheduler": self.sched.state_dict() if self.sched is not None else None}
        if self.world > 1:
            sidecar["rank_rng"] = dist_utils.gather_generator_states(self.gen)
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.ckpt, self.model, self.opt, {"estimator": self.gen}, sidecar)
            atomic_write_csv(self.out / "history.csv", self.history, HISTORY_FIELDS)
            if self.progress_rows:
                atomic_write_csv(self.out / "progress.csv", self.progress_rows, PROGRESS_FIELDS)

    def finish(self) -> dict:
        """The test accuracies (OT; LAP for a model trained with noise) and the run's outputs."""
        cfg, data = self.cfg, self.data
        self.bar.close()
        self.model.eval()
        test = evaluate(self.model, data.x_test, data.y_test, cfg.loss, cfg.noisy, cfg.eval_replications,
                        _seeded(cfg.seed, 3, device=self.device),
                        lap_replications=cfg.lap_replications if cfg.noisy else 0, encode=self._split_encoder(2))
        metrics = {"test_accuracy_ot": test["acc_ot"], "test_accuracy_lap": test.get("acc_lap"),
                   "test_loss": test["loss"], "curves_on": self.val_name, "epochs": cfg.epochs,
                   "train_seconds": self.train_seconds, "steps": self.step, "budget_seconds": self.budget_used,
                   "stopped_by_time": bool(cfg.max_seconds is not None and self.budget_used >= cfg.max_seconds),
                   "final_train_loss": self.history[-1]["train_loss"] if self.history else math.nan,
                   "dataset": data.summary(), "world_size": self.world, "config": cfg.to_dict()}
        if self.writer:
            out = self.out
            out.mkdir(parents=True, exist_ok=True)
            save_model(out / "model.safetensors", self.model, {"config": cfg.to_dict()})
            plot_curves(self.history, out / "curves.png", val_name=self.val_name,
                        title=f"{self.desc or out.name}: {cfg.method.upper()} · {cfg.activation} · {cfg.loss}")
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, ensure_ascii=False))
        if not self.quiet and self.rank == 0:
            lap = f"  LAP(K={cfg.lap_replications}) {test['acc_lap']:.4f}" if cfg.noisy else ""
            print(f"test accuracy: OT {test['acc_ot']:.4f}{lap}  ({self.train_seconds:.1f}s training)")
        return metrics


@torch.no_grad()
def evaluate(model: torch.nn.Module, x, y, loss, noisy: bool, replications: int = 100,
             generator: torch.Generator | None = None, lap_replications: int = 0, encode=None,
             chunk: int = 500) -> dict:
    """Loss (expected under the noise if ``noisy``, else noise-free), OT accuracy, optional LAP accuracy, in
    chunks of ``chunk`` images; ``encode(x_chunk, i)`` (optional) turns the i-th chunk into the model's input
    (a network through time's sequences)."""
    loss_fn = get_loss(loss)
    hits = lap_hits = total = 0.0
    for i in range(0, len(x), chunk):
        xi, yi = x[i:i + chunk], y[i:i + chunk]
        if encode is not None:
            xi = encode(xi, i // chunk)
        out = model(xi)
        hits += (out.argmax(1) == yi).double().sum().item()
        if noisy:
            layout = Layout(probe(model, xi))
            if layout.probe.repeated:   # through time: the noise drawn step by step
                o = sampled_pass(model, xi, layout, replications, IID(), generator)
            else:
                r = layout.fill_(IID(), xi.new_empty(replications, xi.shape[0], layout.width), generator)
                o = noisy_forward(model, xi, layout.injection(replications, xi.shape[0], r), layout.first)
            total += loss_fn(o.reshape(-1, o.shape[-1]), yi.repeat(replications)).double().sum().item() / replications
        else:
            total += loss_fn(out, yi).double().sum().item()
    if lap_replications:   # after the loss, in one call where the input is the images (the figures of every release)
        step = chunk if encode is not None else len(x)
        for i in range(0, len(x), step):
            xi = x[i:i + step] if encode is None else encode(x[i:i + step], i // chunk)
            p = predict_proba(model, xi, "lap", lap_replications, generator=generator)
            lap_hits += (p.argmax(1) == y[i:i + step]).double().sum().item()
    result = {"acc_ot": hits / len(x), "loss": total / len(x)}
    if lap_replications:
        result["acc_lap"] = lap_hits / len(x)
    return result
