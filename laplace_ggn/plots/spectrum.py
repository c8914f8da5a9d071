"""Display of a curvature spectrum: eigenvalues and spectral density."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch  # noqa: F401  (the examples in the docstrings use it)

from ._style import _GREY, PALETTE, _pyplot, _style_axes, _vector

__all__ = ["SpectrumDisplay"]


class SpectrumDisplay:
    """Eigenvalues on a log scale and/or a spectral density curve.

    Accepts plain arrays, e.g. the output of a Lanczos run or a stochastic Lanczos quadrature
    density, so it depends on no other module.

    Args:
        eigenvalues: Eigenvalues, shape ``(K,)``, or ``None``.
        grid: Points of the density, shape ``(G,)``, or ``None``.
        density: Density at ``grid``, shape ``(G,)``, or ``None``.

    Attributes:
        figure_: The figure.
        axes_: List of the axes drawn (eigenvalues first, then density).
        ax_: The first of ``axes_``.
        eigenvalue_line_: ``Line2D`` of the positive eigenvalues sorted in decreasing order
            against their rank (1-based), or ``None``.
        density_line_: ``Line2D`` of the density, or ``None``.
        n_nonpositive_: Number of eigenvalues ``<= 0`` left out of the log plot.
    """

    def __init__(self, *, eigenvalues=None, grid=None, density=None) -> None:
        self.eigenvalues, self.grid, self.density = eigenvalues, grid, density

    @classmethod
    def from_spectrum(
        cls,
        *,
        eigenvalues: Any = None,
        grid: Any = None,
        density: Any = None,
        ax: Any = None,
        log_density: bool = True,
        title: str | None = None,
    ) -> SpectrumDisplay:
        """Draw eigenvalues (left) and/or a density (right).

        Args:
            eigenvalues: Eigenvalues, shape ``(K,)``, or ``None``.
            grid: Points of the density, shape ``(G,)``, or ``None``.
            density: Density at ``grid``, shape ``(G,)``, or ``None``.
            ax: One axes per panel drawn (a single axes when one panel), or ``None``.
            log_density: Whether the density axis is logarithmic.
            title: Title of the figure.

        Returns:
            The display, drawn.

        Raises:
            TypeError: If an input is not a tensor or array.
            ValueError: If nothing is given, only one of ``grid``/``density`` is given, their
                shapes differ, or the number of axes does not match the panels.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> d = SpectrumDisplay.from_spectrum(
            ...     eigenvalues=torch.tensor([3.0, 1.0, 1e-3], dtype=torch.float64))
            >>> d.eigenvalue_line_.get_ydata().tolist()
            [3.0, 1.0, 0.001]
        """
        if (grid is None) != (density is None):
            raise ValueError("grid and density must be given together; got only one of them.")
        if eigenvalues is None and grid is None:
            raise ValueError("eigenvalues or (grid, density) must be given; got neither.")
        ev = _vector(eigenvalues, "eigenvalues") if eigenvalues is not None else None
        g = d = None
        if grid is not None:
            g = _vector(grid, "grid")
            d = _vector(density, "density", g.shape[0])
        return cls(eigenvalues=ev, grid=g, density=d).plot(
            ax=ax, log_density=log_density, title=title
        )

    def plot(
        self, ax: Any = None, *, log_density: bool = True, title: str | None = None
    ) -> SpectrumDisplay:
        """Draw the panels (see :meth:`from_spectrum` for the arguments).

        Returns:
            ``self``, with the artists in its attributes.

        Raises:
            ValueError: If the number of axes in ``ax`` does not match the panels.
        """
        plt = _pyplot()
        n_panels = int(self.eigenvalues is not None) + int(self.grid is not None)
        if ax is None:
            fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 3.8), squeeze=False)
            axes = list(axes[0])
        else:
            axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
            if len(axes) != n_panels:
                raise ValueError(f"ax must hold {n_panels} axes (one per panel); got {len(axes)}.")
            fig = axes[0].figure
        self.eigenvalue_line_ = self.density_line_ = None
        self.n_nonpositive_ = 0
        i = 0
        if self.eigenvalues is not None:
            a = axes[i]
            i += 1
            ev = np.sort(self.eigenvalues)[::-1]
            pos = ev[ev > 0]
            self.n_nonpositive_ = int(ev.size - pos.size)
            self.eigenvalue_line_ = a.plot(
                np.arange(1, pos.size + 1), pos, marker="o", ms=3, lw=1.4, color=PALETTE[1]
            )[0]
            a.set_yscale("log")
            a.set(xlabel="Rank", ylabel="Eigenvalue")
            if self.n_nonpositive_:
                a.text(
                    0.97,
                    0.95,
                    f"{self.n_nonpositive_} eigenvalues ≤ 0 not shown",
                    transform=a.transAxes,
                    ha="right",
                    va="top",
                    fontsize=8.5,
                    color=_GREY,
                )
            _style_axes(a)
        if self.grid is not None:
            a = axes[i]
            self.density_line_ = a.plot(self.grid, self.density, lw=1.8, color=PALETTE[0])[0]
            a.fill_between(self.grid, self.density, color=PALETTE[0], alpha=0.15, lw=0)
            if log_density:
                a.set_yscale("log")
                top = float(self.density.max())
                positive = self.density[self.density > 0]
                if top > 0:
                    a.set_ylim(max(float(positive.min()), 1e-8 * top), 2.0 * top)
            a.set(xlabel="Eigenvalue", ylabel="Density", xlim=(self.grid.min(), self.grid.max()))
            _style_axes(a)
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout() if ax is None else None
        self.figure_, self.axes_, self.ax_ = fig, axes, axes[0]
        return self
