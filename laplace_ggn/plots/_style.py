"""Colours, axes styling and input conversion shared by the displays; the lazy pyplot import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._checks import shape_str

__all__ = ["PALETTE"]


PALETTE = ("#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
"""Colour-blind safe colours (Okabe-Ito), used in order for the models of a figure."""

_GREY = "#6b6b6b"


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _named(x: Any, what: str) -> dict[str, Any]:
    if isinstance(x, Mapping):
        if len(x) == 0:
            raise ValueError(f"{what} must hold at least one model; got an empty mapping.")
        return {str(k): v for k, v in x.items()}
    return {"model": x}


def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}.")


def _colors(n: int, colors: Sequence[str] | None) -> list[str]:
    colors = list(colors) if colors is not None else list(PALETTE)
    return [colors[i % len(colors)] for i in range(n)]


def _style_axes(ax) -> None:
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _mark_confidence_regions(ax) -> None:
    """Label the halves above and below the diagonal of a calibration plot."""
    style = dict(transform=ax.transAxes, color=_GREY, fontsize=8.5, style="italic")
    ax.text(0.03, 0.97, "under-confident", va="top", ha="left", **style)
    ax.text(0.97, 0.03, "over-confident", va="bottom", ha="right", **style)


def _vector(x: Any, name: str, n: int | None = None) -> np.ndarray:
    a = _np(x, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = f"({n},) or ({n}, 1)" if n is not None else "(N,) or (N, 1)"
        raise ValueError(f"{name} must have shape {want}; got {shape_str(a.shape)}.")
    return a.astype(np.float64)
