"""Noise for the estimator's chunks of replications: reused buffers, and an optional helper thread that
draws the next chunk while the current one is processed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import Tensor

#: chunk size (MB of working set) when noise is prefetched: small enough for the cache, two in flight
PREFETCH_CHUNK_MB = 16.0

_NOISE_THREAD: ThreadPoolExecutor | None = None


def _noise_thread() -> ThreadPoolExecutor:
    """The process's one noise-drawing thread (single-threaded itself), created on first prefetch."""
    global _NOISE_THREAD
    if _NOISE_THREAD is None:
        _NOISE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glrnet-noise",
                                           initializer=torch.set_num_threads, initargs=(1,))
    return _NOISE_THREAD


class NoiseStream:
    """Successive chunks of noise from ``draw(k, slot)``, optionally drawn one chunk ahead.

    Random numbers are the serial bottleneck on a CPU (one generator, one core). With
    ``prefetch`` the next chunk is drawn on a helper thread while the caller works on the
    current one; the generator is consumed in the same order either way, so the values are
    the same. Prefetching is opt-in and scoped to the iteration: while it runs, torch's
    intra-op threads are lowered by one (the helper's core) and restored when the stream
    ends, so no setting outlives the call (benchmarks/bench_glr.py measures what it buys). A
caller who runs torch on one thread (``torch.set_num_threads(1)``) leaves the second core to
the helper: then nothing is changed at all, which is also the fastest way to prefetch
(torch's idle compute threads otherwise spin for a while after each call and compete with
the helper).
    """

    def __init__(self, prefetch: bool = False):
        self.prefetch = prefetch

    def chunks(self, draw: Callable[[int, int], Tensor], sizes: list[int], device: torch.device):
        threads = torch.get_num_threads()
        if not self.prefetch or torch.device(device).type != "cpu" or len(sizes) == 1:
            for k in sizes:
                yield draw(k, 0)
            return
        pool = _noise_thread()
        if threads > 1:   # one thread: the caller has left a core to the helper already
            torch.set_num_threads(threads - 1)
        pending = None
        try:
            pending = pool.submit(draw, sizes[0], 0)
            for i in range(len(sizes)):
                noise = pending.result()
                if i + 1 < len(sizes):
                    pending = pool.submit(draw, sizes[i + 1], (i + 1) % 2)
                yield noise
        finally:
            if pending is not None and not pending.done():
                pending.result()
            torch.set_num_threads(threads)


class Buffers:
    """Reused (k, rows, width) buffers, two slots (double buffering for prefetch)."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, k: int, rows: int, width: int, like: Tensor, slot: int) -> Tensor:
        key = (like.device, like.dtype, rows, width, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < k:
            buf = torch.empty(k, rows, width, dtype=like.dtype, device=like.device)
            self._buffers = {kk: v for kk, v in self._buffers.items() if kk[:4] == key[:4]}
            self._buffers[key] = buf
        return buf[:k]
