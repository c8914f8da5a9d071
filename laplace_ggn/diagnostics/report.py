"""The report of the kernel / non-kernel decomposition: numbers, text and a figure."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .._checks import Likelihood
from ..likelihoods import get_likelihood

__all__ = ["KernelDecomposition", "SampleFit"]


@dataclass(frozen=True)
class SampleFit:
    """Fit of one kind of parameter samples, evaluated through one model.

    Attributes:
        samples: ``"MAP"`` (θ* only), ``"kernel"``, ``"non-kernel"`` or ``"full"``.
        model: ``"network"`` (f(x, θ)) or ``"linearised"`` (f(x, θ*) + J(x)(θ - θ*)).
        nll_mean: Mean over samples of the NLL per input.
        nll_std: Standard deviation (n - 1 normalised) over samples of the NLL per input (0 for
            MAP).
        metric_mean: Mean over samples of the accuracy (classification, binary) or the RMSE
            (regression).
        metric_std: Its standard deviation over samples.
    """

    samples: str
    model: str
    nll_mean: float
    nll_std: float
    metric_mean: float
    metric_std: float


@dataclass(frozen=True, repr=False, eq=False)
class KernelDecomposition:
    r"""Report of the kernel / non-kernel decomposition of a Laplace posterior.

    Attributes:
        rank: r, the number of eigenvalues of G above ``tol·λ_max`` (or the rank the caller
            fixed).
        kernel_dim: P - r.
        tol: Relative eigenvalue threshold.
        n_params: P.
        eigenvalues: Eigenvalues of the unit-noise G held by the posterior, descending,
            shape ``(R,)``.
        kept_eigenpairs: ``None`` when the posterior holds G exactly; k for a top-k low-rank
            posterior, whose kernel is the complement of the kept subspace.
        prior_kind: ``"scalar"``, ``"layerwise"`` or ``"diagonal"``.
        trace_kernel: :math:`\mathrm{tr}(P_{ker}\Sigma)`.
        trace_nonkernel: :math:`\mathrm{tr}(P_\perp\Sigma)`.
        kernel_variance_fraction: :math:`\mathrm{tr}(P_{ker}\Sigma)/\mathrm{tr}\,\Sigma`, equal
            to :math:`((P-r)/\alpha)/\mathrm{tr}\,\Sigma` for a scalar prior.
        predictive_variance_kernel: Diagonal of :math:`J P_{ker}\Sigma P_{ker} J^\top`,
            shape ``(B, C)``.
        predictive_variance_nonkernel: Diagonal of :math:`J P_\perp\Sigma P_\perp J^\top`,
            shape ``(B, C)``.
        predictive_variance_cross: Diagonal of :math:`J(P_{ker}\Sigma P_\perp +
            P_\perp\Sigma P_{ker})J^\top`, shape ``(B, C)``; zero for a scalar prior.
        likelihood: The likelihood of the fit.
        n_samples: S, posterior samples per kind in the sample table.
        targets: ``"given"`` (``y`` passed) or ``"MAP"`` (fit measured against the MAP
            predictions).
        sample_fit: Rows of the sample table.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from laplace_ggn import LaplaceWrapper
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> model = model.double()  # float64: the default tol=1e-9 is below float32 accuracy
        >>> data = TensorDataset(torch.randn(5, 1).double(), torch.randn(5, 1).double())
        >>> la = LaplaceWrapper(model, "regression", structure="full").fit(DataLoader(data, 5))
        >>> report = la.kernel_decomposition(DataLoader(data, 5), n_samples=4)
        >>> report.rank <= 5, report.kernel_dim == la.n_params - report.rank
        (True, True)
        >>> float(report.predictive_variance_kernel.abs().max()) < 1e-8
        True
    """

    rank: int
    kernel_dim: int
    tol: float
    n_params: int
    eigenvalues: Tensor
    kept_eigenpairs: int | None
    prior_kind: str
    trace_kernel: float
    trace_nonkernel: float
    kernel_variance_fraction: float
    predictive_variance_kernel: Tensor
    predictive_variance_nonkernel: Tensor
    predictive_variance_cross: Tensor
    likelihood: Likelihood
    n_samples: int
    targets: str
    sample_fit: tuple[SampleFit, ...] = field(default=())

    @property
    def metric_name(self) -> str:
        """``"RMSE"`` for regression, ``"accuracy"`` otherwise."""
        return get_likelihood(self.likelihood).metric_name

    @property
    def predictive_variance(self) -> Tensor:
        r"""Sum of the three parts: the diagonal of :math:`J\Sigma J^\top`, shape ``(B, C)``."""
        return (
            self.predictive_variance_kernel
            + self.predictive_variance_nonkernel
            + self.predictive_variance_cross
        )

    def fit_of(self, samples: str, model: str) -> SampleFit:
        """The row of the sample table for ``samples`` and ``model``.

        Args:
            samples: One of ``"MAP"``, ``"kernel"``, ``"non-kernel"``, ``"full"``.
            model: ``"network"`` or ``"linearised"``.

        Returns:
            The row.

        Raises:
            ValueError: If no row has these names.
        """
        for row in self.sample_fit:
            if row.samples == samples and row.model == model:
                return row
        raise ValueError(
            f"(samples, model) must be one of {[(r.samples, r.model) for r in self.sample_fit]}; "
            f"got {(samples, model)!r}."
        )

    def __repr__(self) -> str:
        return (
            f"KernelDecomposition(rank={self.rank}, kernel_dim={self.kernel_dim}, tol={self.tol:g}, "
            f"kernel_variance_fraction={self.kernel_variance_fraction:.4g})"
        )

    def __str__(self) -> str:
        P, r = self.n_params, self.rank
        lam_max = float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0
        if self.kept_eigenpairs is None:
            basis = "exact eigendecomposition of G"
        else:
            basis = (
                f"top-{self.kept_eigenpairs} eigenpairs of G; the kernel includes the "
                f"{P - self.kept_eigenpairs}-dimensional complement of the kept subspace"
            )
        B, C = self.predictive_variance_kernel.shape
        lines = [
            "Kernel / non-kernel decomposition of the Laplace posterior",
            f"  basis     : {basis}",
            (
                f"  rank      : r = {r} of P = {P} (eigenvalues > tol·λ_max = {self.tol:g} × "
                f"{lam_max:.4g}); kernel dim P - r = {self.kernel_dim}"
            ),
            f"  prior     : {self.prior_kind}",
            (
                f"  variance  : tr(P_ker Σ) = {self.trace_kernel:.4g}, tr(P_⊥ Σ) = "
                f"{self.trace_nonkernel:.4g}; kernel share = {self.kernel_variance_fraction:.4f}"
            ),
            f"  predictive variance on {B} inputs × {C} outputs (mean): kernel "
            f"{float(self.predictive_variance_kernel.mean()):.4g}, non-kernel "
            f"{float(self.predictive_variance_nonkernel.mean()):.4g}"
            + (
                f", cross {float(self.predictive_variance_cross.mean()):.4g}"
                if self.prior_kind != "scalar"
                else ""
            ),
        ]
        if self.sample_fit:
            tgt = "the given targets" if self.targets == "given" else "the MAP predictions"
            lines.append(
                f"  fit of {self.n_samples} samples per kind against {tgt} "
                "(mean ± std over samples; NLL per input):"
            )
            m = self.metric_name
            lines.append(f"    {'samples':<11} {'model':<11} {'NLL':>22} {m:>22}")
            for row in self.sample_fit:
                lines.append(
                    f"    {row.samples:<11} {row.model:<11} "
                    f"{_pm(row.nll_mean, row.nll_std):>22} {_pm(row.metric_mean, row.metric_std):>22}"
                )
        return "\n".join(lines)

    def plot(self, *, x_axis: Tensor | None = None, output: int | None = None, train_x=None):
        """Draw the variance parts along the inputs and the sample table as bars.

        Args:
            x_axis: 1-D input coordinate of each input, shape ``(B,)``; with it the parts are
                drawn as stacked areas over this axis, otherwise as stacked bars per input
                (sorted by total variance).
            output: Output column to draw; ``None`` sums the variances over the outputs.
            train_x: Training input coordinates to mark on the 1-D axis, shape ``(N,)``.

        Returns:
            The matplotlib figure.

        Raises:
            ValueError: If ``x_axis`` has not one entry per input or ``output`` is out of range.
        """
        from ..plots import plot_kernel_decomposition

        return plot_kernel_decomposition(self, x_axis=x_axis, output=output, train_x=train_x)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}"
