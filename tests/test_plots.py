"""Displays: the drawn artists carry exactly the numbers of laplace_ggn.calibration."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from laplace_ggn import calibration as cal  # noqa: E402
from laplace_ggn.plots import (  # noqa: E402
    ConfidenceHistogramDisplay,
    RegressionCalibrationDisplay,
    ReliabilityDisplay,
    SpectrumDisplay,
    UncertaintyBandDisplay,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _probs(seed: int, n: int = 300, c: int = 4, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    probs = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.multinomial(probs.sqrt(), 1, generator=g)[:, 0]
    return probs, labels


def _regression(seed: int, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(n, generator=g, dtype=torch.float64)
    y = mean + 1.5 * var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    return mean, var, y


# --------------------------------------------------------------------------- reliability


def test_reliability_display_lines_are_the_reliability_curves():
    p1, labels = _probs(0)
    p2 = (p1.log() / 2.0).softmax(1)
    d = ReliabilityDisplay.from_predictions({"MAP": p1, "Laplace": p2}, labels, n_bins=12)
    assert list(d.lines_) == ["MAP", "Laplace"]
    assert len(d.ax_.get_lines()) == 3  # two models and the diagonal
    for name, p in (("MAP", p1), ("Laplace", p2)):
        curve = cal.reliability_curve(p, labels, n_bins=12)
        m = curve.nonempty.numpy()
        np.testing.assert_allclose(d.lines_[name].get_xdata(), curve.confidence.numpy()[m])
        np.testing.assert_allclose(d.lines_[name].get_ydata(), curve.accuracy.numpy()[m])
        values, edges = d.hist_patches_[name].get_data()[:2]
        np.testing.assert_array_equal(values, curve.counts.numpy())
        np.testing.assert_allclose(edges, curve.edges.numpy())
        ece = float(cal.expected_calibration_error(p, labels, n_bins=12))
        assert d.ece[name] == ece
        assert f"ECE {100 * ece:.1f}%" in d.lines_[name].get_label()
    labels_in_legend = [t.get_text() for t in d.ax_.get_legend().get_texts()]
    assert labels_in_legend[0] == "Perfect calibration" and len(labels_in_legend) == 3
    np.testing.assert_array_equal(d.diagonal_.get_xydata(), [[0, 0], [1, 1]])
    assert d.hist_ax_ is not None and d.hist_ax_.get_shared_x_axes().joined(d.ax_, d.hist_ax_)
    assert d.figure_ is d.ax_.figure
    assert sorted(t.get_text() for t in d.ax_.texts) == ["over-confident", "under-confident"]


def test_reliability_gap_fill_spans_confidence_to_accuracy():
    probs, labels = _probs(1)
    d = ReliabilityDisplay.from_predictions(probs, labels, n_bins=8)
    curve = cal.reliability_curve(probs, labels, n_bins=8)
    m = curve.nonempty
    verts = d.gap_fills_["model"].get_paths()[0].vertices
    # fill_between(x, y1=x, y2=acc): vertices run along y1 then back along y2
    conf, acc = curve.confidence[m].numpy(), curve.accuracy[m].numpy()
    for x, a in zip(conf, acc):
        ys = verts[np.isclose(verts[:, 0], x), 1]
        assert np.any(np.isclose(ys, x)) and np.any(np.isclose(ys, a))


def test_reliability_binary_and_existing_axes():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(200, generator=g, dtype=torch.float64)
    y = (torch.rand(200, generator=g, dtype=torch.float64) < p).long()
    fig, ax = plt.subplots()
    d = ReliabilityDisplay.from_predictions(p[:, None], y, n_bins=5, ax=ax)
    assert d.ax_ is ax and d.figure_ is fig and d.hist_ax_ is not None
    assert d.hist_ax_.get_xlabel() == "Predicted probability of class 1"
    assert len(d.ax_.texts) == 0  # no over/under-confident labels for a positive-class curve
    curve = cal.reliability_curve(p, y, n_bins=5)
    np.testing.assert_allclose(d.lines_["model"].get_ydata(), curve.accuracy.numpy())
    d2 = ReliabilityDisplay.from_predictions(p, y, n_bins=5, show_histogram=False)
    assert d2.hist_ax_ is None and d2.hist_patches_ == {}
    assert d2.ax_.get_xlabel() == "Predicted probability of class 1"


def test_reliability_replot_on_new_axes():
    probs, labels = _probs(3)
    d = ReliabilityDisplay.from_predictions(probs, labels)
    first = d.figure_
    assert d.plot(show_histogram=False) is d and d.figure_ is not first
    assert len(d.ax_.get_lines()) == 2


# --------------------------------------------------------------------------- regression


def test_regression_calibration_display_lines_are_the_curves():
    mean, var, y = _regression(0)
    d = RegressionCalibrationDisplay.from_predictions(
        {"narrow": mean, "wide": mean}, {"narrow": var / 4, "wide": var * 4}, y, n_levels=10
    )
    assert list(d.lines_) == ["narrow", "wide"] and len(d.ax_.get_lines()) == 3
    for name, v in (("narrow", var / 4), ("wide", var * 4)):
        c = cal.regression_calibration_curve(mean, v, y, n_levels=10)
        np.testing.assert_allclose(d.lines_[name].get_xdata(), c.nominal.numpy())
        np.testing.assert_allclose(d.lines_[name].get_ydata(), c.observed.numpy())
        assert f"error {float(c.error):.3f}" in d.lines_[name].get_label()
    # too narrow under-covers, too wide over-covers
    assert np.all(d.lines_["narrow"].get_ydata() < d.lines_["narrow"].get_xdata())
    assert np.all(d.lines_["wide"].get_ydata() > d.lines_["wide"].get_xdata())


def test_regression_calibration_display_errors():
    mean, var, y = _regression(1)
    msg = r"var must have the model names of mean \['a'\]; got \['b'\]"
    with pytest.raises(ValueError, match=msg):
        RegressionCalibrationDisplay.from_predictions({"a": mean}, {"b": var}, y)
    with pytest.raises(ValueError, match="mean must hold at least one model; got an empty mapping"):
        RegressionCalibrationDisplay.from_predictions({}, {}, y)
    with pytest.raises(ValueError, match="var must be finite and > 0"):
        RegressionCalibrationDisplay.from_predictions(mean, -var, y)


# --------------------------------------------------------------------------- band


def test_uncertainty_band_sorted_and_two_std():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, generator=g, dtype=torch.float64) * 4 - 2
    mean, var = torch.sin(x), 0.05 + x**2 / 10
    x_tr = torch.rand(15, 1, generator=g, dtype=torch.float64)
    d = UncertaintyBandDisplay.from_predictions(
        x[:, None], mean[:, None], var, x_train=x_tr, y_train=torch.sin(x_tr), n_std=2.0
    )
    order = torch.argsort(x)
    np.testing.assert_allclose(d.line_.get_xdata(), x[order].numpy())
    np.testing.assert_allclose(d.line_.get_ydata(), mean[order].numpy())
    verts = d.band_.get_paths()[0].vertices
    std = var[order].sqrt().numpy()
    for xi, lo, hi in zip(
        x[order].numpy(),
        (mean[order] - 2 * var[order].sqrt()).numpy(),
        (mean[order] + 2 * var[order].sqrt()).numpy(),
    ):
        ys = verts[np.isclose(verts[:, 0], xi), 1]
        assert np.any(np.isclose(ys, lo)) and np.any(np.isclose(ys, hi))
    assert std.shape == (40,)
    np.testing.assert_allclose(
        d.train_scatter_.get_offsets(), np.c_[x_tr.numpy()[:, 0], np.sin(x_tr.numpy()[:, 0])]
    )
    assert d.test_scatter_ is None


def test_uncertainty_band_errors():
    x = torch.linspace(0, 1, 5)
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\) or \(5, 1\); got \(4,?\)"):
        UncertaintyBandDisplay.from_predictions(x, torch.zeros(4), torch.ones(5))
    with pytest.raises(ValueError, match=r"x must have shape \(N,\) or \(N, 1\); got \(5, 2\)"):
        UncertaintyBandDisplay.from_predictions(torch.zeros(5, 2), x, x)
    with pytest.raises(ValueError, match="var must be >= 0; got a minimum of -1"):
        UncertaintyBandDisplay.from_predictions(x, x, -torch.ones(5))
    with pytest.raises(ValueError, match="x_test and y_test must be given together"):
        UncertaintyBandDisplay.from_predictions(x, x, x, x_test=x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor or numpy.ndarray; got list"):
        UncertaintyBandDisplay.from_predictions([0.0, 1.0], x, x)


# --------------------------------------------------------------------------- spectrum


def test_spectrum_display_eigenvalues_and_density():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(20, 6, generator=g, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(a.T @ a)  # 6 positive
    ev = torch.cat([ev, torch.tensor([0.0, -1e-12], dtype=torch.float64)])
    grid = np.linspace(0, float(ev.max()), 50)
    density = np.exp(-grid)
    d = SpectrumDisplay.from_spectrum(eigenvalues=ev, grid=grid, density=density)
    assert len(d.axes_) == 2 and d.ax_ is d.axes_[0]
    np.testing.assert_allclose(d.eigenvalue_line_.get_ydata(), np.sort(ev[ev > 0].numpy())[::-1])
    np.testing.assert_array_equal(d.eigenvalue_line_.get_xdata(), np.arange(1, 7))
    assert d.n_nonpositive_ == 2 and d.ax_.get_yscale() == "log"
    np.testing.assert_allclose(d.density_line_.get_xdata(), grid)
    np.testing.assert_allclose(d.density_line_.get_ydata(), density)
    only = SpectrumDisplay.from_spectrum(grid=grid, density=density, log_density=False)
    assert len(only.axes_) == 1 and only.eigenvalue_line_ is None
    assert only.ax_.get_yscale() == "linear"


def test_spectrum_display_errors():
    msg = r"eigenvalues or \(grid, density\) must be given; got neither"
    with pytest.raises(ValueError, match=msg):
        SpectrumDisplay.from_spectrum()
    with pytest.raises(ValueError, match="grid and density must be given together"):
        SpectrumDisplay.from_spectrum(grid=np.ones(3))
    msg = r"density must have shape \(3,\) or \(3, 1\); got \(4,?\)"
    with pytest.raises(ValueError, match=msg):
        SpectrumDisplay.from_spectrum(grid=np.ones(3), density=np.ones(4))
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="ax must hold 2 axes \\(one per panel\\); got 1"):
        SpectrumDisplay.from_spectrum(
            eigenvalues=np.ones(3), grid=np.ones(3), density=np.ones(3), ax=ax
        )


# --------------------------------------------------------------------------- confidence


def test_confidence_histogram_display_counts():
    p_in, labels = _probs(6, n=300, scale=4.0)
    p_out, _ = _probs(7, n=120, scale=0.5)
    d = ConfidenceHistogramDisplay.from_predictions(
        {"in": p_in, "out": p_out}, n_bins=15, normalize=False
    )
    assert list(d.patches_) == ["in", "out"]
    counts_in = cal.reliability_curve(p_in, labels, n_bins=15).counts.numpy()
    np.testing.assert_array_equal(d.patches_["in"].get_data()[0], counts_in)
    counts_out, _ = cal.confidence_histogram(p_out, n_bins=15)
    np.testing.assert_array_equal(d.patches_["out"].get_data()[0], counts_out.numpy())
    assert d.mean_lines_["out"].get_xdata()[0] == pytest.approx(float(p_out.max(1).values.mean()))
    assert d.means["in"] > d.means["out"]
    frac = ConfidenceHistogramDisplay.from_predictions({"in": p_in}, n_bins=15, log=True)
    np.testing.assert_allclose(frac.patches_["in"].get_data()[0], counts_in / 300)
    assert frac.ax_.get_yscale() == "log"


def test_display_input_errors():
    probs, labels = _probs(8)
    msg = "probs must hold at least one model; got an empty mapping"
    with pytest.raises(ValueError, match=msg):
        ReliabilityDisplay.from_predictions({}, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(300,?\)"):
        ReliabilityDisplay.from_predictions(probs, labels[:10])
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        ConfidenceHistogramDisplay.from_predictions({"a": probs * 2})


def test_plots_module_imports_matplotlib_lazily():
    import subprocess
    import sys

    code = "import sys, laplace_ggn.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- errors


def test_uncertainty_band_needs_both_train_arrays():
    from laplace_ggn.plots import UncertaintyBandDisplay

    x = torch.linspace(0, 1, 5)
    with pytest.raises(
        ValueError, match="x_train and y_train must be given together; got only one of them"
    ):
        UncertaintyBandDisplay.from_predictions(x, x, torch.ones(5), x_train=x)
