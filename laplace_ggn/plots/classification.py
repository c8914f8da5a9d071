"""Displays of classifiers: reliability diagram and confidence histogram."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch  # noqa: F401  (the examples in the docstrings use it)

from .. import calibration as cal
from ._style import _GREY, _colors, _mark_confidence_regions, _named, _pyplot, _style_axes

__all__ = ["ConfidenceHistogramDisplay", "ReliabilityDisplay"]


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
