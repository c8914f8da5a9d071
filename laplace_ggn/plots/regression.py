"""Displays of regression predictives: interval calibration and uncertainty bands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch  # noqa: F401  (the examples in the docstrings use it)

from .. import calibration as cal
from ._style import (
    _GREY,
    PALETTE,
    _colors,
    _mark_confidence_regions,
    _named,
    _pyplot,
    _style_axes,
    _vector,
)

__all__ = ["RegressionCalibrationDisplay", "UncertaintyBandDisplay"]


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
