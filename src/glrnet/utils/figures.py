"""Matplotlib without pyplot: figures built and saved with no backend chosen or changed, so a user's
interactive session is left as it was (matplotlib is an extra: only the reports import this)."""

from __future__ import annotations

from matplotlib import colormaps
from matplotlib.figure import Figure

from .files import atomic_path


def subplots(*args, figsize=None, **kwargs):
    """(figure, axes) like ``pyplot.subplots``, without pyplot's global state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig, path) -> None:
    """Write ``fig`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def styles(n):
    """n distinguishable (colour, marker) pairs: tab20 colours, markers cycling after 10."""
    cmap, markers = colormaps["tab20"], "osD^v<>ph*"
    return [(cmap(i % 20), markers[i % len(markers)]) for i in range(n)]
