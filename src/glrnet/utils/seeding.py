"""Named random streams: one seed per purpose, independent of every other."""

from __future__ import annotations

import numpy as np


def stream_seed(*keys: int) -> int:
    """A 63-bit seed for the stream named by integer ``keys``: NumPy's SeedSequence hashing,
    built to give statistically independent streams for distinct keys (and the same on every run)."""
    return int(np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(1, np.uint64)[0] >> 1)
