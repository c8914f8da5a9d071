"""Figure of the kernel / non-kernel decomposition of :mod:`laplace_ggn.diagnostics`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._style import _style_axes

__all__ = ["KERNEL_COLORS", "plot_kernel_decomposition"]


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
