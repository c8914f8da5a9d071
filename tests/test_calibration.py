"""Calibration metrics against torchmetrics, scikit-learn, scipy and direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_calibration_error,
    multiclass_accuracy,
    multiclass_calibration_error,
)

from laplace_ggn import calibration as cal

SEEDS = [0, 1, 2]
CE_NORMS = ((cal.expected_calibration_error, "l1"), (cal.maximum_calibration_error, "max"))


def _multiclass(seed: int, n: int = 400, c: int = 5, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    labels = torch.multinomial(probs.pow(0.6), 1, generator=g)[:, 0]  # miscalibrated on purpose
    return probs, labels


def _binary(seed: int, n: int = 400):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < p**1.5).long()
    return p, y


def _regression(seed: int, shape=(300,)):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    var = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    y = mean + 1.3 * var.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64)
    return mean, var, y


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_scores_match_references(seed):
    probs, labels = _multiclass(seed)
    c = probs.shape[1]
    torch.testing.assert_close(
        cal.accuracy(probs, labels),
        multiclass_accuracy(probs, labels, num_classes=c, average="micro").double(),
        rtol=0,
        atol=1e-7,  # torchmetrics returns float32
    )
    assert float(cal.negative_log_likelihood(probs, labels)) == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=list(range(c))), rel=1e-12
    )
    assert float(cal.brier_score(probs, labels)) == pytest.approx(
        brier_score_loss(labels.numpy(), probs.numpy(), labels=list(range(c))), rel=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("column", [False, True], ids=["(N,)", "(N,1)"])
def test_binary_scores_match_references(seed, column):
    p, y = _binary(seed)
    probs = p[:, None] if column else p
    torch.testing.assert_close(
        cal.accuracy(probs, y), binary_accuracy(p, y).double(), rtol=0, atol=1e-7
    )
    assert float(cal.negative_log_likelihood(probs, y)) == pytest.approx(
        log_loss(y.numpy(), p.numpy()), rel=1e-12
    )
    assert float(cal.brier_score(probs, y)) == pytest.approx(
        brier_score_loss(y.numpy(), p.numpy()), rel=1e-12
    )
    # The binary NLL equals the multiclass NLL of the two-column form.
    two = torch.stack([1 - p, p], dim=1)
    torch.testing.assert_close(
        cal.negative_log_likelihood(probs, y),
        cal.negative_log_likelihood(two, y),
        rtol=1e-12,
        atol=0,
    )


def test_nll_is_finite_for_zero_probability_on_true_class():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected = (-math.log(torch.finfo(torch.float64).eps) + math.log(2)) / 2
    assert float(cal.negative_log_likelihood(probs, labels)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_mce_match_torchmetrics_multiclass(seed, n_bins):
    probs, labels = _multiclass(seed)
    c = probs.shape[1]
    for fn, norm_ in CE_NORMS:
        ref = multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm=norm_)
        torch.testing.assert_close(
            fn(probs, labels, n_bins=n_bins).float(), ref, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_ece_mce_match_torchmetrics_binary(seed):
    p, y = _binary(seed)
    for fn, norm_ in CE_NORMS:
        ref = binary_calibration_error(p, y, n_bins=10, norm=norm_)
        torch.testing.assert_close(fn(p, y, n_bins=10), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ece_mce_equal_the_reliability_curve(seed):
    probs, labels = _multiclass(seed, scale=8.0)
    probs[:5] = torch.nn.functional.one_hot(labels[:5], probs.shape[1]).double()  # confidence 1
    probs[5] = torch.nn.functional.one_hot((labels[5] + 1) % probs.shape[1], probs.shape[1])
    curve = cal.reliability_curve(probs, labels, n_bins=15)
    m = curve.nonempty
    gaps = (curve.accuracy[m] - curve.confidence[m]).abs()
    ece_ref = (curve.counts[m].double() / probs.shape[0] * gaps).sum()
    torch.testing.assert_close(
        cal.expected_calibration_error(probs, labels), ece_ref, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(curve.ece, ece_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        cal.maximum_calibration_error(probs, labels), gaps.max(), rtol=1e-12, atol=1e-14
    )


def test_perfect_one_hot_predictions_have_zero_calibration_error():
    labels = torch.tensor([0, 2, 1, 1])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    # one ulp: a confidence of 1 enters torchmetrics as the largest float below 1
    assert float(cal.expected_calibration_error(probs, labels)) == pytest.approx(0.0, abs=1e-15)
    assert float(cal.brier_score(probs, labels)) == 0.0
    assert float(cal.accuracy(probs, labels)) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [5, 15])
def test_reliability_curve_binary_matches_sklearn(seed, n_bins):
    p, y = _binary(seed)
    curve = cal.reliability_curve(p, y, n_bins=n_bins)
    prob_true, prob_pred = calibration_curve(y.numpy(), p.numpy(), n_bins=n_bins)
    m = curve.nonempty
    np.testing.assert_allclose(curve.accuracy[m].numpy(), prob_true, rtol=1e-12)
    np.testing.assert_allclose(curve.confidence[m].numpy(), prob_pred, rtol=1e-12)
    hist, _ = np.histogram(p.numpy(), bins=np.linspace(0, 1, n_bins + 1))
    np.testing.assert_array_equal(curve.counts.numpy(), hist)
    torch.testing.assert_close(curve.edges, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_reliability_curve_multiclass_is_top_label_sklearn_curve(seed):
    probs, labels = _multiclass(seed)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).long()
    curve = cal.reliability_curve(probs, labels, n_bins=10)
    prob_true, prob_pred = calibration_curve(correct.numpy(), conf.numpy(), n_bins=10)
    m = curve.nonempty
    np.testing.assert_allclose(curve.accuracy[m].numpy(), prob_true, rtol=1e-12)
    np.testing.assert_allclose(curve.confidence[m].numpy(), prob_pred, rtol=1e-12)
    assert int(curve.counts.sum()) == probs.shape[0]
    assert torch.isnan(curve.accuracy[~m]).all() and torch.isnan(curve.confidence[~m]).all()


def test_confidence_histogram_and_max_probability():
    probs, labels = _multiclass(0)
    counts, edges = cal.confidence_histogram(probs, n_bins=12)
    torch.testing.assert_close(counts, cal.reliability_curve(probs, labels, n_bins=12).counts)
    hist, np_edges = np.histogram(probs.max(dim=1).values.numpy(), bins=12, range=(0, 1))
    np.testing.assert_array_equal(counts.numpy(), hist)
    np.testing.assert_allclose(edges.numpy(), np_edges)
    p = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    expected = torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(cal.max_probability(p), expected)


def test_numpy_inputs_and_float32():
    probs, labels = _multiclass(1)
    a = cal.classification_metrics(probs.numpy(), labels.numpy())
    b = cal.classification_metrics(probs.float(), labels)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_classification_metrics_dict():
    probs, labels = _multiclass(2)
    m = cal.classification_metrics(probs, labels, n_bins=10)
    assert m == {
        "accuracy": float(cal.accuracy(probs, labels)),
        "nll": float(cal.negative_log_likelihood(probs, labels)),
        "brier": float(cal.brier_score(probs, labels)),
        "ece": float(cal.expected_calibration_error(probs, labels, n_bins=10)),
        "mce": float(cal.maximum_calibration_error(probs, labels, n_bins=10)),
    }


# --------------------------------------------------------------------------- regression


@pytest.mark.parametrize("shape", [(300,), (120, 3)], ids=["(N,)", "(N,C)"])
def test_gaussian_nll_and_rmse(shape):
    mean, var, y = _regression(0, shape)
    n = shape[0]
    ref = torch.nn.functional.gaussian_nll_loss(mean, y, var, full=True, reduction="sum") / n
    torch.testing.assert_close(cal.gaussian_nll(mean, var, y), ref, rtol=1e-12, atol=0)
    dist = torch.distributions.Normal(mean, var.sqrt())
    torch.testing.assert_close(
        cal.gaussian_nll(mean, var, y), -dist.log_prob(y).sum() / n, rtol=1e-12, atol=0
    )
    ref_rmse = math.sqrt(float(((y - mean) ** 2).sum()) / y.numel())
    assert float(cal.rmse(mean, y)) == pytest.approx(ref_rmse, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(300,), (100, 2)], ids=["(N,)", "(N,C)"])
def test_interval_coverage_matches_explicit_intervals(seed, shape):
    mean, var, y = _regression(seed, shape)
    levels = (0.3, 0.5, 0.8, 0.9, 0.95, 0.99)
    cov = cal.interval_coverage(mean, var, y, levels=levels)
    m, s, t = mean.numpy(), np.sqrt(var.numpy()), y.numpy()
    for q, c in zip(levels, cov.tolist()):
        lo, hi = norm.interval(q, loc=m, scale=s)
        assert c == pytest.approx(np.mean((t >= lo) & (t <= hi)), abs=1e-12), q


def test_coverage_of_well_specified_gaussian_is_nominal():
    g = torch.Generator().manual_seed(3)
    n = 20000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(n, generator=g, dtype=torch.float64)
    y = mean + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    curve = cal.regression_calibration_curve(mean, var, y, n_levels=10)
    # binomial standard error at n = 20000 is at most 0.0036; 5 standard errors
    torch.testing.assert_close(curve.observed, curve.nominal, rtol=0, atol=0.018)
    # and overly narrow intervals under-cover
    narrow = cal.regression_calibration_curve(mean, var / 4, y, n_levels=10)
    assert bool((narrow.observed < narrow.nominal).all())


def test_regression_calibration_curve_and_error():
    mean, var, y = _regression(1)
    curve = cal.regression_calibration_curve(mean, var, y, n_levels=8)
    torch.testing.assert_close(curve.nominal, (torch.arange(8, dtype=torch.float64) + 0.5) / 8)
    torch.testing.assert_close(
        curve.observed, cal.interval_coverage(mean, var, y, levels=curve.nominal.tolist())
    )
    err = cal.regression_calibration_error(mean, var, y, n_levels=8)
    ref = sum(abs(o - q) for o, q in zip(curve.observed.tolist(), curve.nominal.tolist())) / 8
    assert float(err) == pytest.approx(ref, abs=1e-12)
    assert float(curve.error) == pytest.approx(ref, abs=1e-12)


def test_regression_metrics_dict():
    mean, var, y = _regression(2)
    m = cal.regression_metrics(mean, var, y)
    assert list(m) == [
        "nll",
        "rmse",
        "calibration_error",
        "coverage_50",
        "coverage_80",
        "coverage_90",
        "coverage_95",
        "coverage_99",
    ]
    cov = cal.interval_coverage(mean, var, y).tolist()
    assert [m[k] for k in list(m)[3:]] == cov
    assert m["nll"] == float(cal.gaussian_nll(mean, var, y))
    assert m["calibration_error"] == float(cal.regression_calibration_error(mean, var, y))
    assert "coverage_99.5" in cal.regression_metrics(mean, var, y, levels=(0.995,))


# --------------------------------------------------------------------------- validation

GOOD_P = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
GOOD_Y = torch.tensor([0, 1])


@pytest.mark.parametrize(
    "probs, labels, exc, match",
    [
        (
            [[0.7, 0.3]],
            GOOD_Y,
            TypeError,
            "probs must be a torch.Tensor or numpy.ndarray; got list",
        ),
        (torch.tensor([[1, 0], [0, 1]]), GOOD_Y, TypeError, "probs must be a floating-point"),
        (torch.rand(2, 2, 2), GOOD_Y, ValueError, r"probs must have shape .*got \(2, 2, 2\)"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "N >= 1"),
        (
            torch.tensor([[0.5, float("nan")], [0.5, 0.5]]),
            GOOD_Y,
            ValueError,
            "probs must be finite; got 1 NaN",
        ),
        (
            torch.tensor([[1.5, -0.5], [0.5, 0.5]]),
            GOOD_Y,
            ValueError,
            r"probs must lie in \[0, 1\]; got values in \[-0.5, 1.5\]. Apply softmax",
        ),
        (
            torch.tensor([[0.5, 0.4], [0.5, 0.5]]),
            GOOD_Y,
            ValueError,
            "probs rows must sum to 1.*maximal deviation of 0.1",
        ),
        (GOOD_P, GOOD_Y.double(), TypeError, "labels must be an integer or bool tensor; got dtype"),
        (
            GOOD_P,
            torch.tensor([0, 1, 1]),
            ValueError,
            r"labels must have shape \(2,?\) to match probs \(2, 2\); got \(3,?\)",
        ),
        (GOOD_P, torch.tensor([0, 2]), ValueError, r"labels must lie in \{0, ..., 1\}.*\[0, 2\]"),
        (
            torch.tensor([0.2, 0.9]),
            torch.tensor([-1, 1]),
            ValueError,
            r"labels must lie in \{0, ..., 1\}.*\[-1, 1\]",
        ),
        (GOOD_P, [0, 1], TypeError, "labels must be a torch.Tensor or numpy.ndarray"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        cal.accuracy,
        cal.negative_log_likelihood,
        cal.brier_score,
        cal.expected_calibration_error,
        cal.maximum_calibration_error,
        cal.reliability_curve,
        cal.classification_metrics,
    ],
    ids=lambda f: f.__name__,
)
def test_classification_input_errors(fn, probs, labels, exc, match):
    with pytest.raises(exc, match=match):
        fn(probs, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_labels_on_other_device():
    with pytest.raises(ValueError, match="labels must be on the device of probs"):
        cal.accuracy(GOOD_P, GOOD_Y.cuda())
    with pytest.raises(ValueError, match="y must be on the device of mean"):
        cal.gaussian_nll(M.cuda(), V.cuda(), M)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    probs, labels = _multiclass(0)
    a = cal.classification_metrics(probs, labels)
    b = cal.classification_metrics(probs.cuda(), labels.cuda())
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12), k
    curve = cal.reliability_curve(probs.cuda(), labels.cuda())
    assert curve.counts.device.type == "cuda"
    torch.testing.assert_close(curve.counts.cpu(), cal.reliability_curve(probs, labels).counts)
    mean, var, y = _regression(0, (50, 2))
    a = cal.regression_metrics(mean, var, y)
    b = cal.regression_metrics(mean.cuda(), var.cuda(), y.cuda())
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12), k


def test_max_probability_and_histogram_errors():
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        cal.max_probability(torch.tensor([1.2]))
    with pytest.raises(TypeError, match="n_bins must be an int; got float"):
        cal.confidence_histogram(GOOD_P, n_bins=2.0)


@pytest.mark.parametrize(
    "n_bins, exc, match",
    [
        (0, ValueError, "n_bins must be >= 1; got 0"),
        (2.5, TypeError, "n_bins must be an int"),
        (True, TypeError, "n_bins must be an int; got bool"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        cal.expected_calibration_error,
        cal.maximum_calibration_error,
        cal.reliability_curve,
        cal.classification_metrics,
    ],
    ids=lambda f: f.__name__,
)
def test_n_bins_errors(fn, n_bins, exc, match):
    with pytest.raises(exc, match=match):
        fn(GOOD_P, GOOD_Y, n_bins=n_bins)


M = torch.zeros(3, dtype=torch.float64)
V = torch.ones(3, dtype=torch.float64)


@pytest.mark.parametrize(
    "mean, var, y, exc, match",
    [
        (torch.zeros(3, dtype=torch.long), V, M, TypeError, "mean must be a floating-point tensor"),
        (torch.zeros(3, 2, 1), V, M, ValueError, r"mean must have shape \(N,\) or \(N, C\)"),
        (
            M,
            torch.ones(3, 1),
            M,
            ValueError,
            r"var must have the shape of mean \(3,?\).*got \(3, 1\)",
        ),
        (M, V, torch.zeros(4), ValueError, r"y must have the shape of mean \(3,?\).*got \(4,?\)"),
        (
            torch.tensor([0.0, float("nan"), 1.0]),
            V,
            M,
            ValueError,
            "mean must be finite; got 1 NaN",
        ),
        (
            M,
            V,
            torch.tensor([0.0, float("inf"), 1.0]),
            ValueError,
            "y must be finite; got 0 NaN and 1 Inf",
        ),
        (M, torch.tensor([1.0, 0.0, 1.0]), M, ValueError, "var must be finite and > 0"),
        (M, torch.tensor([1.0, float("nan"), 1.0]), M, ValueError, "var must be finite; got 1 NaN"),
        ("a", V, M, TypeError, "mean must be a torch.Tensor or numpy.ndarray; got str"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        cal.gaussian_nll,
        cal.interval_coverage,
        cal.regression_calibration_curve,
        cal.regression_calibration_error,
        cal.regression_metrics,
    ],
    ids=lambda f: f.__name__,
)
def test_regression_input_errors(fn, mean, var, y, exc, match):
    with pytest.raises(exc, match=match):
        fn(mean, var, y)


def test_rmse_and_level_errors():
    with pytest.raises(ValueError, match=r"y must have the shape of mean \(3,?\)"):
        cal.rmse(M, torch.zeros(2))
    msg = r"levels must be a non-empty sequence of numbers in \(0, 1\); got \[0.5, 1.0\]"
    with pytest.raises(ValueError, match=msg):
        cal.interval_coverage(M, V, M, levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="levels must be a non-empty sequence"):
        cal.regression_metrics(M, V, M, levels=())
    with pytest.raises(ValueError, match="n_levels must be >= 1; got 0"):
        cal.regression_calibration_curve(M, V, M, n_levels=0)
    with pytest.raises(TypeError, match="n_levels must be an int; got float"):
        cal.regression_calibration_error(M, V, M, n_levels=3.0)
