"""Figures of calibration and uncertainty, in scikit-learn's Display pattern.

Each display is built from predictions by a ``from_*`` classmethod that computes its numbers
through :mod:`laplace_ggn.calibration` and draws them; ``plot(ax=None, ...)`` draws again
(on new axes, or on ``ax``) and returns the display, with the figure in ``figure_``, the main
axes in ``ax_`` and the drawn artists in further ``*_`` attributes. This is the only module
that imports matplotlib, and only inside the functions that draw.

Inputs may be torch tensors or numpy arrays. Where several models are allowed, pass a dict
``{"MAP": probs_map, "Laplace": probs_la}``; a single array is drawn under the name
``"model"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import calibration as cal
from ._checks import shape_str

__all__ = [
    "plot_kernel_decomposition",
    "ReliabilityDisplay",
    "RegressionCalibrationDisplay",
    "UncertaintyBandDisplay",
    "SpectrumDisplay",
    "ConfidenceHistogramDisplay",
    "PALETTE",
]

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


class ReliabilityDisplay:
    """Reliability diagram of one or several models, with a confidence histogram below.

    Top: per-bin accuracy against mean confidence (binary: frequency of class 1 against the
    positive-class probability), the diagonal of perfect calibration, and the gap between
    them shaded; the legend gives each model's ECE. Bottom: number of samples per bin.

    Args:
        curves: Reliability curves by model name, all with the same bins.
        ece: ECE by model name; defaults to each curve's own ``ece``.
        binary: Whether the curves bin positive-class probabilities (changes the labels).

    Attributes:
        figure_: The figure.
        ax_: Axes of the reliability diagram.
        hist_ax_: Axes of the histogram, or ``None``.
        lines_: ``{name: Line2D}`` of accuracy against confidence over the non-empty bins.
        gap_fills_: ``{name: PolyCollection}`` shading accuracy - confidence.
        hist_patches_: ``{name: StepPatch}`` of the bin counts.
        diagonal_: The ``Line2D`` of perfect calibration.
    """

    def __init__(
        self,
        curves: Mapping[str, cal.ReliabilityCurve],
        *,
        ece: Mapping[str, float] | None = None,
        binary: bool = False,
    ) -> None:
        self.curves = dict(curves)
        self.ece = dict(ece) if ece is not None else {k: float(c.ece) for k, c in curves.items()}
        self.binary = binary

    @classmethod
    def from_predictions(
        cls,
        probs: Any,
        labels: Any,
        *,
        n_bins: int = 15,
        ax: Any = None,
        hist_ax: Any = None,
        show_histogram: bool = True,
        title: str | None = None,
        colors: Sequence[str] | None = None,
    ) -> ReliabilityDisplay:
        """Compute the reliability curves and draw them.

        Args:
            probs: Probabilities ``(N, C)`` or positive-class ``(N,)``/``(N, 1)``, or a dict
                of such arrays by model name (all on the same labels).
            labels: Integer labels, shape ``(N,)``.
            n_bins: Number of equal-width bins.
            ax: Axes for the diagram; new figure when ``None``.
            hist_ax: Axes for the histogram; when ``None`` and ``ax`` is given, one is
                appended below ``ax``.
            show_histogram: Whether to draw the histogram.
            title: Title of the diagram.
            colors: Colours of the models, in order.

        Returns:
            The display, drawn.

        Raises:
            ValueError: If ``probs`` is an empty mapping or an input fails the checks of
                :func:`laplace_ggn.calibration.reliability_curve`.
            TypeError: If an input has the wrong type.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> p = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
            >>> d = ReliabilityDisplay.from_predictions({"MAP": p}, torch.tensor([0, 0]))
            >>> list(d.lines_)
            ['MAP']
        """
        named = _named(probs, "probs")
        curves = {k: cal.reliability_curve(p, labels, n_bins=n_bins) for k, p in named.items()}
        ece = {
            k: float(cal.expected_calibration_error(p, labels, n_bins=n_bins))
            for k, p in named.items()
        }
        first = next(iter(named.values()))
        binary = first.ndim == 1 or (first.ndim == 2 and first.shape[1] == 1)
        return cls(curves, ece=ece, binary=binary).plot(
            ax=ax, hist_ax=hist_ax, show_histogram=show_histogram, title=title, colors=colors
        )

    def plot(
        self,
        ax: Any = None,
        *,
        hist_ax: Any = None,
        show_histogram: bool = True,
        title: str | None = None,
        colors: Sequence[str] | None = None,
    ) -> ReliabilityDisplay:
        """Draw the diagram (see :meth:`from_predictions` for the arguments).

        Returns:
            ``self``, with the artists in its attributes.
        """
        plt = _pyplot()
        if ax is None:
            if show_histogram:
                fig, (ax, hist_ax) = plt.subplots(
                    2,
                    1,
                    figsize=(5.4, 6.4),
                    sharex=True,
                    gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.08},
                )
            else:
                fig, ax = plt.subplots(figsize=(5.4, 5.0))
        elif show_histogram and hist_ax is None:
            from mpl_toolkits.axes_grid1 import make_axes_locatable

            hist_ax = make_axes_locatable(ax).append_axes("bottom", size="30%", pad=0.1, sharex=ax)
        fig = ax.figure
        xlabel = "Predicted probability of class 1" if self.binary else "Confidence"
        ylabel = "Frequency of class 1" if self.binary else "Accuracy"

        self.diagonal_ = ax.plot(
            [0, 1], [0, 1], ls="--", color=_GREY, lw=1.2, label="Perfect calibration", zorder=1
        )[0]
        self.lines_, self.gap_fills_, self.hist_patches_ = {}, {}, {}
        for (name, curve), color in zip(self.curves.items(), _colors(len(self.curves), colors)):
            m = curve.nonempty.cpu().numpy()
            conf = curve.confidence.cpu().numpy()[m]
            acc = curve.accuracy.cpu().numpy()[m]
            self.gap_fills_[name] = ax.fill_between(
                conf, conf, acc, color=color, alpha=0.16, lw=0, zorder=2
            )
            self.lines_[name] = ax.plot(
                conf,
                acc,
                marker="o",
                ms=5,
                lw=2,
                color=color,
                zorder=3,
                markeredgecolor="white",
                markeredgewidth=0.8,
                label=f"{name}  (ECE {100 * self.ece[name]:.1f}%)",
            )[0]
            if show_histogram:
                self.hist_patches_[name] = hist_ax.stairs(
                    curve.counts.cpu().numpy(),
                    curve.edges.cpu().numpy(),
                    fill=True,
                    facecolor=color,
                    alpha=0.2,
                    edgecolor=color,
                    lw=1.4,
                    label=name,
                )
                hist_ax.stairs(
                    curve.counts.cpu().numpy(), curve.edges.cpu().numpy(), color=color, lw=1.4
                )
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel=ylabel)
        if not self.binary:  # for a positive-class curve, above the diagonal is not "under"
            _mark_confidence_regions(ax)
        _style_axes(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.92), frameon=False, fontsize=9)
        if title:
            ax.set_title(title, fontsize=12, loc="left")
        if show_histogram:
            hist_ax.set_yscale("log")
            top = max(int(c.counts.max()) for c in self.curves.values())
            hist_ax.set(xlim=(0, 1), ylim=(0.7, 2.0 * top), xlabel=xlabel, ylabel="Count")
            _style_axes(hist_ax)
            ax.tick_params(labelbottom=False)
            ax.set_xlabel("")
        else:
            ax.set_xlabel(xlabel)
        self.figure_, self.ax_, self.hist_ax_ = fig, ax, (hist_ax if show_histogram else None)
        return self


class RegressionCalibrationDisplay:
    """Observed against nominal coverage of central Gaussian intervals, for several models.

    Points above the diagonal are under-confident (intervals too wide), below it
    over-confident. The legend gives each model's calibration error (mean absolute gap).

    Args:
        curves: Regression calibration curves by model name.

    Attributes:
        figure_: The figure.
        ax_: The axes.
        lines_: ``{name: Line2D}`` of observed against nominal coverage.
        gap_fills_: ``{name: PolyCollection}`` shading observed - nominal.
        diagonal_: The ``Line2D`` of perfect calibration.
    """

    def __init__(self, curves: Mapping[str, cal.RegressionCalibrationCurve]) -> None:
        self.curves = dict(curves)

    @classmethod
    def from_predictions(
        cls,
        mean: Any,
        var: Any,
        y: Any,
        *,
        n_levels: int = 20,
        ax: Any = None,
        title: str | None = None,
        colors: Sequence[str] | None = None,
    ) -> RegressionCalibrationDisplay:
        """Compute the coverage curves and draw them.

        Args:
            mean: Predictive means ``(N,)`` or ``(N, C)``, or a dict of them by model name.
            var: Predictive variances of the same shape, or a dict with the keys of ``mean``.
            y: Targets, shape of each mean.
            n_levels: Number of nominal levels.
            ax: Axes to draw on; new figure when ``None``.
            title: Title of the axes.
            colors: Colours of the models, in order.

        Returns:
            The display, drawn.

        Raises:
            ValueError: If the keys of ``mean`` and ``var`` differ, or an input fails the checks
                of :func:`laplace_ggn.calibration.regression_calibration_curve`.
            TypeError: If an input has the wrong type.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> d = RegressionCalibrationDisplay.from_predictions(
            ...     torch.zeros(50), torch.ones(50), torch.randn(50), n_levels=5)
            >>> d.lines_["model"].get_xdata().shape
            (5,)
        """
        means, vars_ = _named(mean, "mean"), _named(var, "var")
        if list(means) != list(vars_):
            raise ValueError(
                f"var must have the model names of mean {list(means)}; got {list(vars_)}."
            )
        curves = {
            k: cal.regression_calibration_curve(means[k], vars_[k], y, n_levels=n_levels)
            for k in means
        }
        return cls(curves).plot(ax=ax, title=title, colors=colors)

    def plot(
        self, ax: Any = None, *, title: str | None = None, colors: Sequence[str] | None = None
    ) -> RegressionCalibrationDisplay:
        """Draw the curves (see :meth:`from_predictions` for the arguments).

        Returns:
            ``self``, with the artists in its attributes.
        """
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(5.0, 5.0))
        self.diagonal_ = ax.plot(
            [0, 1], [0, 1], ls="--", color=_GREY, lw=1.2, label="Perfect calibration", zorder=1
        )[0]
        self.lines_, self.gap_fills_ = {}, {}
        for (name, c), color in zip(self.curves.items(), _colors(len(self.curves), colors)):
            q, o = c.nominal.cpu().numpy(), c.observed.cpu().numpy()
            self.gap_fills_[name] = ax.fill_between(q, q, o, color=color, alpha=0.16, lw=0)
            self.lines_[name] = ax.plot(
                q,
                o,
                marker="o",
                ms=4.5,
                lw=2,
                color=color,
                markeredgecolor="white",
                markeredgewidth=0.8,
                label=f"{name}  (error {float(c.error):.3f})",
                zorder=3,
            )[0]
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="Nominal coverage of central interval",
            ylabel="Observed coverage",
        )
        _mark_confidence_regions(ax)
        _style_axes(ax)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, fontsize=9)
        if title:
            ax.set_title(title, fontsize=12, loc="left")
        self.figure_, self.ax_ = ax.figure, ax
        return self


def _vector(x: Any, name: str, n: int | None = None) -> np.ndarray:
    a = _np(x, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = f"({n},) or ({n}, 1)" if n is not None else "(N,) or (N, 1)"
        raise ValueError(f"{name} must have shape {want}; got {shape_str(a.shape)}.")
    return a.astype(np.float64)


class UncertaintyBandDisplay:
    """1-D regression: predictive mean, a band of ``n_std`` standard deviations, and data.

    Args:
        x: Inputs, shape ``(N,)``, sorted.
        mean: Predictive means, shape ``(N,)``.
        std: Predictive standard deviations, shape ``(N,)``.
        x_train, y_train: Training data, shape ``(M,)`` each, or ``None``.
        x_test, y_test: Test data, shape ``(T,)`` each, or ``None``.
        n_std: Half-width of the band in standard deviations.

    Attributes:
        figure_: The figure.
        ax_: The axes.
        line_: ``Line2D`` of the mean.
        band_: ``PolyCollection`` of ``mean ± n_std·std``.
        train_scatter_, test_scatter_: ``PathCollection`` of the data, or ``None``.
    """

    def __init__(
        self,
        x,
        mean,
        std,
        *,
        x_train=None,
        y_train=None,
        x_test=None,
        y_test=None,
        n_std: float = 2.0,
    ) -> None:
        self.x, self.mean, self.std = x, mean, std
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.n_std = n_std

    @classmethod
    def from_predictions(
        cls,
        x: Any,
        mean: Any,
        var: Any,
        *,
        x_train: Any = None,
        y_train: Any = None,
        x_test: Any = None,
        y_test: Any = None,
        n_std: float = 2.0,
        ax: Any = None,
        title: str | None = None,
    ) -> UncertaintyBandDisplay:
        """Sort by ``x`` and draw the band.

        Args:
            x: Inputs, shape ``(N,)`` or ``(N, 1)``.
            mean: Predictive means, shape ``(N,)`` or ``(N, 1)``.
            var: Predictive variances (``>= 0``), shape ``(N,)`` or ``(N, 1)``.
            x_train: Training inputs, shape ``(M,)`` or ``(M, 1)``, or ``None``.
            y_train: Training targets, shape of ``x_train``.
            x_test: Test inputs, shape ``(T,)`` or ``(T, 1)``, or ``None``.
            y_test: Test targets, shape of ``x_test``.
            n_std: Half-width of the band in standard deviations.
            ax: Axes to draw on; new figure when ``None``.
            title: Title of the axes.

        Returns:
            The display, drawn.

        Raises:
            TypeError: If an input is not a tensor or array.
            ValueError: If shapes disagree, a variance is negative, or only one of a data pair
                is given.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> x = torch.linspace(-1, 1, 20)
            >>> d = UncertaintyBandDisplay.from_predictions(x, x**2, 0.1 + x**2)
            >>> d.line_.get_xdata().shape
            (20,)
        """
        xs = _vector(x, "x")
        n = xs.shape[0]
        mu, v = _vector(mean, "mean", n), _vector(var, "var", n)
        if not np.all(v >= 0):
            raise ValueError(f"var must be >= 0; got a minimum of {v.min():.3g}.")
        data = {}
        for xn, yn, xv, yv in (
            ("x_train", "y_train", x_train, y_train),
            ("x_test", "y_test", x_test, y_test),
        ):
            if (xv is None) != (yv is None):
                raise ValueError(f"{xn} and {yn} must be given together; got only one of them.")
            if xv is not None:
                a = _vector(xv, xn)
                data[xn], data[yn] = a, _vector(yv, yn, a.shape[0])
        order = np.argsort(xs, kind="stable")
        return cls(xs[order], mu[order], np.sqrt(v[order]), n_std=n_std, **data).plot(
            ax=ax, title=title
        )

    def plot(self, ax: Any = None, *, title: str | None = None) -> UncertaintyBandDisplay:
        """Draw the band (see :meth:`from_predictions` for the arguments).

        Returns:
            ``self``, with the artists in its attributes.
        """
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 3.8))
        color = PALETTE[1]
        self.band_ = ax.fill_between(
            self.x,
            self.mean - self.n_std * self.std,
            self.mean + self.n_std * self.std,
            color=color,
            alpha=0.2,
            lw=0,
            label=f"mean ± {self.n_std:g} std",
        )
        self.line_ = ax.plot(self.x, self.mean, color=color, lw=2, label="predictive mean")[0]
        self.train_scatter_ = self.test_scatter_ = None
        if self.x_train is not None:
            self.train_scatter_ = ax.scatter(
                self.x_train,
                self.y_train,
                s=14,
                color="#222222",
                alpha=0.8,
                lw=0,
                label="training data",
                zorder=3,
            )
        if self.x_test is not None:
            self.test_scatter_ = ax.scatter(
                self.x_test,
                self.y_test,
                s=16,
                facecolor="none",
                edgecolor=PALETTE[0],
                lw=1,
                label="test data",
                zorder=3,
            )
        ax.set(xlabel="x", ylabel="y", xlim=(self.x[0], self.x[-1]))
        _style_axes(ax)
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False, fontsize=9
        )
        if title:
            ax.set_title(title, fontsize=12, loc="left")
        self.figure_, self.ax_ = ax.figure, ax
        return self


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


class ConfidenceHistogramDisplay:
    r"""Overlaid histograms of the confidence :math:`\max_c p_{nc}` of several sets.

    Typical use: in-distribution against out-of-distribution inputs of one model, where a
    well-calibrated model is less confident out of distribution.

    Args:
        histograms: ``{name: (counts, edges)}`` from
            :func:`laplace_ggn.calibration.confidence_histogram`.
        means: Mean confidence by name.
        normalize: Whether the bars show the fraction of each set instead of counts.
        log: Whether the vertical axis is logarithmic.

    Attributes:
        figure_: The figure.
        ax_: The axes.
        patches_: ``{name: StepPatch}`` of the histogram values.
        mean_lines_: ``{name: Line2D}`` vertical line at the mean confidence.
    """

    def __init__(
        self, histograms, *, means: Mapping[str, float], normalize: bool = True, log: bool = False
    ) -> None:
        self.histograms, self.means = dict(histograms), dict(means)
        self.normalize, self.log = normalize, log

    @classmethod
    def from_predictions(
        cls,
        probs: Any,
        *,
        n_bins: int = 20,
        normalize: bool = True,
        log: bool = False,
        ax: Any = None,
        title: str | None = None,
        colors: Sequence[str] | None = None,
    ) -> ConfidenceHistogramDisplay:
        """Histogram the confidences of each named set and draw them overlaid.

        Args:
            probs: Probabilities ``(N, C)`` or positive-class ``(N,)``, or a dict of such
                arrays by set name (sizes may differ).
            n_bins: Number of equal-width bins on ``[0, 1]``.
            normalize: Whether to show fractions of each set instead of counts.
            log: Whether the vertical axis is logarithmic.
            ax: Axes to draw on; new figure when ``None``.
            title: Title of the axes.
            colors: Colours of the sets, in order.

        Returns:
            The display, drawn.

        Raises:
            TypeError: If an input has the wrong type.
            ValueError: If ``probs`` is empty or fails the checks of
                :func:`laplace_ggn.calibration.confidence_histogram`.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> d = ConfidenceHistogramDisplay.from_predictions(
            ...     {"in": torch.tensor([[0.9, 0.1]]), "out": torch.tensor([[0.5, 0.5]])})
            >>> sorted(d.patches_)
            ['in', 'out']
        """
        named = _named(probs, "probs")
        hists = {k: cal.confidence_histogram(p, n_bins=n_bins) for k, p in named.items()}
        means = {k: float(cal.max_probability(p).mean()) for k, p in named.items()}
        return cls(hists, means=means, normalize=normalize, log=log).plot(
            ax=ax, title=title, colors=colors
        )

    def plot(
        self, ax: Any = None, *, title: str | None = None, colors: Sequence[str] | None = None
    ) -> ConfidenceHistogramDisplay:
        """Draw the histograms (see :meth:`from_predictions` for the arguments).

        Returns:
            ``self``, with the artists in its attributes.
        """
        plt = _pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(5.8, 3.8))
        self.patches_, self.mean_lines_ = {}, {}
        for (name, (counts, edges)), color in zip(
            self.histograms.items(), _colors(len(self.histograms), colors)
        ):
            c = counts.cpu().numpy().astype(np.float64)
            values = c / c.sum() if self.normalize else c
            self.patches_[name] = ax.stairs(
                values, edges.cpu().numpy(), fill=True, facecolor=color, alpha=0.2, label=None
            )
            ax.stairs(
                values,
                edges.cpu().numpy(),
                color=color,
                lw=1.6,
                label=f"{name}  (mean {self.means[name]:.3f})",
            )
            self.mean_lines_[name] = ax.axvline(self.means[name], color=color, ls="--", lw=1.3)
        lo = min(float(edges[:-1][counts > 0].min()) for counts, edges in self.histograms.values())
        ax.set(
            xlim=(max(0.0, lo - 0.02), 1.0),
            xlabel="Confidence (max probability)",
            ylabel="Fraction of set" if self.normalize else "Count",
        )
        if self.log:
            tops = [
                float(c.max()) / (float(c.sum()) if self.normalize else 1.0)
                for c, _ in self.histograms.values()
            ]
            bottoms = [
                1.0 / (float(c.sum()) if self.normalize else 1.0)
                for c, _ in self.histograms.values()
            ]
            ax.set_yscale("log")
            ax.set_ylim(0.7 * min(bottoms), 2.0 * max(tops))
        _style_axes(ax)
        ax.legend(loc="upper left", frameon=False, fontsize=9)
        if title:
            ax.set_title(title, fontsize=12, loc="left")
        self.figure_, self.ax_ = ax.figure, ax
        return self


# ---------------------------------------------------------------------------------------------
# Kernel / non-kernel decomposition (laplace_ggn.diagnostics)
# ---------------------------------------------------------------------------------------------

KERNEL_COLORS = {
    "kernel": "#D55E00",
    "non-kernel": "#0072B2",
    "network": "#4d4d4d",
    "linearised": "#009E73",
}


def _kernel_np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def plot_kernel_decomposition(
    report: Any, *, x_axis: Any = None, output: int | None = None, train_x: Any = None
):
    """Draw a kernel decomposition report.

    Args:
        report: The :class:`~laplace_ggn.diagnostics.KernelDecomposition`.
        x_axis: 1-D coordinate of each input, shape ``(B,)``, or ``None`` (bars per input).
        output: Output column to draw; ``None`` sums the variances over outputs.
        train_x: Training input coordinates to mark on the 1-D axis, shape ``(N,)``.

    Returns:
        The matplotlib figure; ``figure.axes`` lists its panels (variance, metric, NLL).

    Raises:
        ValueError: If ``x_axis`` does not have one entry per input, or ``output`` is out of
            range.
    """
    import matplotlib.pyplot as plt

    kern = _kernel_np(report.predictive_variance_kernel)
    nonk = _kernel_np(report.predictive_variance_nonkernel)
    cross = _kernel_np(report.predictive_variance_cross)
    B, C = kern.shape
    if output is None:
        kern, nonk, cross = kern.sum(1), nonk.sum(1), cross.sum(1)
        out_label = "summed over outputs" if C > 1 else ""
    else:
        if not (isinstance(output, int) and 0 <= output < C):
            raise ValueError(f"output must be None or an int in [0, {C - 1}]; got {output!r}.")
        kern, nonk, cross = kern[:, output], nonk[:, output], cross[:, output]
        out_label = f"output {output}"
    has_cross = bool(np.abs(cross).max() > 1e-12 * max(float((kern + nonk).max()), 1e-300))
    n_panels = 3 if report.sample_fit else 1
    fig, axes = plt.subplots(
        1,
        n_panels,
        figsize=(5.2 + 3.6 * (n_panels - 1), 3.6),
        gridspec_kw={"width_ratios": [1.6] + [1] * (n_panels - 1)},
        squeeze=False,
        layout="constrained",
    )
    ax = axes[0, 0]
    if x_axis is not None:
        xs = _kernel_np(x_axis).reshape(-1)
        if xs.shape[0] != B:
            raise ValueError(f"x_axis must have {B} entries (one per input); got {xs.shape[0]}.")
        order = np.argsort(xs)
        xs, k, n = xs[order], kern[order], nonk[order]
        ax.fill_between(
            xs,
            0,
            n,
            color=KERNEL_COLORS["non-kernel"],
            alpha=0.75,
            lw=0,
            label="non-kernel  J P⊥ Σ P⊥ Jᵀ",
        )
        ax.fill_between(
            xs,
            n,
            n + k,
            color=KERNEL_COLORS["kernel"],
            alpha=0.75,
            lw=0,
            label="kernel  J Pker Σ Pker Jᵀ",
        )
        if has_cross:
            ax.plot(xs, n + k + cross[order], color="k", lw=1.2, label="total incl. cross part")
        if train_x is not None:
            tx = _kernel_np(train_x).reshape(-1)
            ax.plot(
                tx,
                np.zeros_like(tx),
                "|",
                color="k",
                ms=12,
                mew=1.5,
                clip_on=False,
                label="training inputs",
            )
        ax.set_xlabel("input x")
        ax.set_xlim(xs[0], xs[-1])
    else:
        order = np.argsort(-(kern + nonk))
        pos = np.arange(B)
        width = 0.8 if B <= 40 else 1.0
        ax.bar(
            pos,
            nonk[order],
            width,
            color=KERNEL_COLORS["non-kernel"],
            lw=0,
            label="non-kernel  J P⊥ Σ P⊥ Jᵀ",
        )
        ax.bar(
            pos,
            kern[order],
            width,
            bottom=nonk[order],
            color=KERNEL_COLORS["kernel"],
            lw=0,
            label="kernel  J Pker Σ Pker Jᵀ",
        )
        if has_cross:
            ax.plot(
                pos,
                (kern + nonk + cross)[order],
                ".",
                color="k",
                ms=3,
                label="total incl. cross part",
            )
        ax.set_xlabel("input (sorted by total variance)")
        ax.set_xlim(-0.5, B - 0.5)
    top = float(np.max(kern + nonk + np.maximum(cross, 0)))
    ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)
    ax.set_ylabel("predictive variance" + (f" ({out_label})" if out_label else ""))
    ax.set_title(
        f"r = {report.rank} of P = {report.n_params}, tol = {report.tol:g}; "
        f"kernel share of tr Σ = {report.kernel_variance_fraction:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=1)
    if x_axis is None and B <= 40:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    _style_axes(ax)

    if report.sample_fit:
        kinds = [
            k
            for k in ("MAP", "kernel", "non-kernel", "full")
            if any(r.samples == k for r in report.sample_fit)
        ]
        pos = np.arange(len(kinds))
        w = 0.38
        for ax, attr, label in (
            (axes[0, 1], "metric", report.metric_name),
            (axes[0, 2], "nll", "NLL per input"),
        ):
            for j, model in enumerate(("network", "linearised")):
                rows = [report.fit_of(k, model) for k in kinds]
                means = [getattr(r, f"{attr}_mean") for r in rows]
                stds = [getattr(r, f"{attr}_std") for r in rows]
                ax.bar(
                    pos + (j - 0.5) * w,
                    means,
                    w,
                    yerr=stds,
                    capsize=3,
                    color=KERNEL_COLORS[model],
                    label=model,
                    lw=0,
                    error_kw={"elinewidth": 1, "ecolor": "#222222"},
                )
            ax.set_xticks(pos, [k if k != "non-kernel" else "non-\nkernel" for k in kinds])
            vals = np.array(
                [getattr(r, f"{attr}_mean") + getattr(r, f"{attr}_std") for r in report.sample_fit]
            )
            if attr == "nll" and vals.max() - vals.min() > 100:
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_xlabel("samples")
            ax.set_ylabel(label)
            ax.set_title(
                f"{report.n_samples} samples; targets: "
                + ("given" if report.targets == "given" else "MAP predictions"),
                fontsize=9,
            )
            _style_axes(ax)
        axes[0, 1].legend(fontsize=8, frameon=False)
        if report.metric_name == "accuracy":
            axes[0, 1].set_ylim(0, 1.05)
    return fig
