"""Atomic file writing: a reader sees the old file or the complete new one, never a half-written one."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, on
    failure it is removed, so readers only ever see the old file or the complete new one. The
    file gets the mode an ordinary ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)        # again: a writer that replaces the file (safetensors) leaves its own 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> None:
    """Rows as CSV (floats to 6 significant digits; keys not in ``fields`` ignored), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
