r"""Kernel / non-kernel decomposition of a Laplace posterior (Roy et al., NeurIPS 2024).

With the eigendecomposition of the unit-noise GGN :math:`G = U \mathrm{diag}(\lambda) U^\top`
and :math:`r` the number of eigenvalues above ``tol·λ_max``, the parameter space splits into

- the non-kernel :math:`P_\perp = U_r U_r^\top` (directions that change the function on the
  training inputs), and
- the kernel :math:`P_{ker} = I - P_\perp` (reparameterisations: to first order they leave the
  function on the training inputs unchanged).

With a scalar prior α and curvature scale s (:math:`\Lambda = sG + \alpha I`) the covariance
splits exactly, because :math:`P_{ker}` commutes with Λ:

.. math::
    \Sigma = P_{ker}\Sigma P_{ker} + P_\perp \Sigma P_\perp, \quad
    P_\perp \Sigma P_\perp = U_r \mathrm{diag}\big(1/(s\lambda_r + \alpha)\big) U_r^\top, \quad
    P_{ker}\Sigma P_{ker} = \alpha^{-1} P_{ker} \text{ (eigenvalues exactly 0)}.

Eigenvalues that are below the threshold but not exactly zero keep their exact variance
:math:`1/(s\lambda + \alpha)` inside the kernel block, so the parts always add up to Σ.
With a layerwise or diagonal prior Λ does not commute with :math:`P_{ker}`; then
:math:`\Sigma = P_{ker}\Sigma P_{ker} + P_\perp\Sigma P_\perp + (P_{ker}\Sigma P_\perp +
P_\perp\Sigma P_{ker})` and the cross part is reported on its own (its trace is zero, so the
variance fraction needs no cross term).

For a top-k low-rank posterior the held subspace is that of the k largest eigenpairs; its
complement is counted as kernel (the posterior there is the prior), and the report says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._checks import Likelihood, Structure, check_finite, is_integer, shape_str
from .functional import FunctionalModel, batch_size_of, input_tensors, split_batch, to_device
from .posteriors import eigenbasis_of

__all__ = ["SUPPORTED_STRUCTURES", "KernelDecomposition", "SampleFit", "kernel_decomposition"]

SUPPORTED_STRUCTURES = (Structure.FULL, Structure.LOWRANK)
SAMPLE_KINDS = ("MAP", "kernel", "non-kernel", "full")
MODELS = ("network", "linearised")


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
        return "RMSE" if self.likelihood is Likelihood.REGRESSION else "accuracy"

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
        from .plots import plot_kernel_decomposition

        return plot_kernel_decomposition(self, x_axis=x_axis, output=output, train_x=train_x)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}"


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def gather_inputs(
    x: object, *, input_key: str | None = None, target_key: str | None = None
) -> tuple[object, Tensor | None]:
    """Model inputs as one batch: a tensor/tuple/dict as is, or a loader's inputs concatenated.

    Args:
        x: Model input (tensor, tuple or dict of tensors) or an iterable of ``(x, y)`` batches.
        input_key: Key of the inputs in mapping batches (see
            :func:`~laplace_ggn.functional.split_batch`).
        target_key: Key of the targets in mapping batches.

    Returns:
        ``(inputs, targets)``; ``targets`` is ``None`` for a plain input and the concatenated
        targets for a loader.

    Raises:
        TypeError: If ``x`` is neither an input nor an iterable of batches.
        ValueError: If the loader is empty or its batches are malformed.
    """
    if isinstance(x, (Tensor, Mapping, tuple, list)):
        return x, None
    if not isinstance(x, Iterable):
        raise TypeError(
            "x must be a tensor, a tuple or dict of tensors, or a DataLoader of (x, y) batches; "
            f"got {type(x).__name__}."
        )
    xs, ys, spec = [], [], None
    for i, batch in enumerate(x):
        xb, yb = split_batch(batch, input_key=input_key, target_key=target_key, where=f"batch {i}")
        leaves, spec = tree_flatten(xb)
        xs.append(leaves)
        ys.append(torch.as_tensor(yb))
    if not xs:
        raise ValueError("x must yield at least one batch; got an empty loader.")
    leaves = [torch.cat([b[j] for b in xs]) for j in range(len(xs[0]))]
    return tree_unflatten(leaves, spec), torch.cat(ys)


# ---------------------------------------------------------------------------------------------
# the decomposition
# ---------------------------------------------------------------------------------------------


def eigenbasis(posterior: object) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, ``(R,)``) and eigenvectors ``(P, R)`` of G held by a posterior.

    Args:
        posterior: A posterior with the optional ``eigenbasis()`` member of the
            :class:`~laplace_ggn.posteriors.Posterior` protocol (full and low rank).

    Returns:
        ``(λ, U)`` sorted by decreasing λ, λ clamped at 0.

    Raises:
        ValueError: If the posterior holds no eigendecomposition of G.
    """
    basis = eigenbasis_of(posterior)
    if basis is None:
        raise ValueError(
            "posterior must hold an eigendecomposition of G (structure 'full' or 'lowrank'); "
            f"got {type(posterior).__name__}."
        )
    lam, U = basis
    lam = lam.clamp_min(0)
    order = torch.argsort(lam, descending=True)
    return lam[order], U[:, order]


def _check_options(tol: object, rank: object, n_samples: object, R: int) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 <= tol < 1):
        raise ValueError(f"tol must be a float in [0, 1); got {tol!r}.")
    if rank is not None and (not is_integer(rank) or not (0 <= rank <= R)):
        raise ValueError(
            f"rank must be None or an int in [0, {R}] (the eigenpairs the posterior holds); "
            f"got {rank!r}."
        )
    if not is_integer(n_samples) or n_samples < 0:
        raise ValueError(
            f"n_samples must be an int >= 0 (0 skips the sample table); got {n_samples!r}."
        )


def _variance_parts(posterior, J: Tensor, lam: Tensor, U: Tensor, r: int):
    """Diagonals of the kernel, non-kernel and cross parts of J Σ Jᵀ, each ``(B, C)``."""
    B, C, P = J.shape
    Jf = J.reshape(B * C, P)
    prior, s = posterior.prior, posterior.scale
    Ur = U[:, :r]
    A = Jf @ Ur  # (BC, r)
    if prior.is_scalar:
        alpha = prior.precision
        nonk = (A**2 / (s * lam[:r] + alpha)).sum(-1)
        kern = ((Jf @ U[:, r:]) ** 2 / (s * lam[r:] + alpha)).sum(-1)
        if U.shape[1] < P:  # the complement of the held subspace: prior variance 1/α
            resid = Jf - (Jf @ U) @ U.T
            kern = kern + (resid**2).sum(-1) / alpha
        cross = torch.zeros_like(kern)
    else:  # squared norms of the rows of J P S (S Sᵀ = Σ): >= 0 whatever the conditioning
        Jn = A @ Ur.T  # J P_⊥, (BC, P)
        Sk = posterior.covariance_sqrt_rows(Jf - Jn)
        Sn = posterior.covariance_sqrt_rows(Jn)
        kern, nonk, cross = (Sk**2).sum(-1), (Sn**2).sum(-1), 2 * (Sk * Sn).sum(-1)
    return kern.reshape(B, C), nonk.reshape(B, C), cross.reshape(B, C)


def _traces(posterior, lam: Tensor, U: Tensor, r: int) -> tuple[float, float]:
    r"""``(tr(P_ker Σ), tr(P_⊥ Σ))`` from the held eigenpairs, without a P×P matrix beyond them."""
    prior, s = posterior.prior, posterior.scale
    P = U.shape[0]
    if prior.is_scalar:
        alpha = prior.precision
        tr_nonk = (1 / (s * lam[:r] + alpha)).sum()
        tr_ker = (1 / (s * lam[r:] + alpha)).sum() + (P - U.shape[1]) / alpha
        return float(tr_ker), float(tr_nonk)
    Ur = U[:, :r]
    tr_nonk = (posterior.covariance_sqrt_rows(Ur.T) ** 2).sum() if r else torch.zeros(())
    if U.shape[1] == P:  # complete basis: the kernel block directly, tr(U_kᵀ Σ U_k)
        Uk = U[:, r:]
        tr_ker = (posterior.covariance_sqrt_rows(Uk.T) ** 2).sum() if r < P else torch.zeros(())
        return float(tr_ker), float(tr_nonk)
    tr_total = posterior.variance().sum()  # the low-rank posterior's stable diagonal of Σ
    return max(float(tr_total - tr_nonk), 0.0), float(tr_nonk)


class _FitAccumulator:
    """Running sums of NLL, squared error and correct predictions per sample."""

    def __init__(self, lik, likelihood: Likelihood, sigma: Tensor):
        self.lik, self.kind, self.sigma = lik, likelihood, sigma
        self.nll: dict[tuple[str, str], Tensor] = {}
        self.metric: dict[tuple[str, str], Tensor] = {}
        self.n = 0
        self.n_out = 0

    def add(self, key: tuple[str, str], F: Tensor, y: Tensor) -> None:
        """Add outputs ``F`` of shape ``(S, B, C)`` against targets ``y``."""
        nll = torch.stack([self.lik.nll(f, y, self.sigma) for f in F])
        if self.kind is Likelihood.REGRESSION:
            met = ((F - y) ** 2).sum((1, 2))
        elif self.kind is Likelihood.CLASSIFICATION:
            met = (F.argmax(-1) == y).sum(-1).to(F.dtype)
        else:
            met = ((F > 0).to(F.dtype) == y).sum((1, 2)).to(F.dtype)
        self.nll[key] = self.nll.get(key, 0) + nll
        self.metric[key] = self.metric.get(key, 0) + met

    def rows(self) -> tuple[SampleFit, ...]:
        out = []
        for key in self.nll:
            nll = self.nll[key] / self.n
            if self.kind is Likelihood.REGRESSION:
                met = (self.metric[key] / (self.n * self.n_out)).sqrt()
            else:
                met = self.metric[key] / self.n
            sd = (lambda t: float(t.std())) if nll.numel() > 1 else (lambda t: 0.0)
            out.append(
                SampleFit(key[0], key[1], float(nll.mean()), sd(nll), float(met.mean()), sd(met))
            )
        return tuple(out)


def kernel_decomposition(
    posterior: object,
    fmodel: FunctionalModel,
    x: object,
    *,
    likelihood: Likelihood,
    lik: object,
    structure: Structure,
    y: Tensor | None = None,
    sigma_noise: Tensor | float = 1.0,
    tol: float = 1e-9,
    rank: int | None = None,
    n_samples: int = 32,
    kept_eigenpairs: int | None = None,
    generator: torch.Generator | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
    check_input: Callable[[object], object] | None = None,
) -> KernelDecomposition:
    r"""Split the posterior and the linearised predictive into kernel and non-kernel parts.

    .. math::
        \Sigma = P_{ker}\Sigma P_{ker} + P_\perp\Sigma P_\perp
        \;(+\,\text{cross part for non-scalar priors}), \quad
        P_\perp = U_r U_r^\top,\; r = \#\{\lambda_i > \mathrm{tol}\cdot\lambda_{max}\}.

    Samples: one posterior draw :math:`\delta \sim N(0, \Sigma)` gives the full sample
    :math:`\theta_* + \delta`, the kernel-only sample :math:`\theta_* + P_{ker}\delta \sim
    N(\theta_*, P_{ker}\Sigma P_{ker})` (for a scalar prior :math:`\theta_* + \alpha^{-1/2}
    P_{ker} z`) and the non-kernel-only sample :math:`\theta_* + P_\perp\delta` (for a scalar
    prior :math:`\theta_* + U_r\,\mathrm{diag}((s\lambda_r+\alpha)^{-1/2}) z_r`). Each is
    evaluated through the network :math:`f(x, \theta)` and the linearised model
    :math:`f(x, \theta_*) + J(x)(\theta - \theta_*)`.

    Args:
        posterior: A fitted posterior of structure ``full`` or ``lowrank``.
        fmodel: The functional model the posterior was fitted on.
        x: Inputs of batch size B (tensor, tuple or dict) or a loader of ``(x, y)`` batches,
            whose inputs are concatenated and whose targets serve as ``y``.
        likelihood: The likelihood kind.
        lik: The likelihood object (:func:`laplace_ggn.likelihoods.get_likelihood`).
        structure: The structure of the posterior.
        y: Targets for the inputs (shape as in training); ``None`` measures the fit against
            the MAP predictions.
        sigma_noise: Observation noise σ for the regression NLL.
        tol: Eigenvalues of G at most ``tol·λ_max`` count as kernel.
        rank: Fix r instead of thresholding (``None``: threshold by ``tol``).
        n_samples: Samples per kind for the table; 0 skips it.
        kept_eigenpairs: k for a top-k low-rank posterior, ``None`` when G is held exactly.
        generator: Random generator for the samples.
        input_key: Key of the inputs in mapping batches (see
            :func:`~laplace_ggn.functional.split_batch`).
        target_key: Key of the targets in mapping batches.
        check_input: Called on the (gathered) inputs before anything is computed; raises on
            a malformed input.

    Returns:
        The report.

    Raises:
        ValueError: If the structure is not ``full`` or ``lowrank``, an option is out of
            range, ``y`` is given with a loader, or targets do not fit the likelihood.
        TypeError: If ``x`` is neither an input nor a loader.
    """
    if structure not in SUPPORTED_STRUCTURES:
        raise ValueError(
            f"structure must be one of {[s.value for s in SUPPORTED_STRUCTURES]} for "
            f"kernel_decomposition(); got {structure.value!r}. The decomposition needs the "
            "eigenbasis of G: fit with structure='full' or structure='lowrank'."
        )
    lam, U = eigenbasis(posterior)
    P, R = U.shape
    _check_options(tol, rank, n_samples, R)
    rank, n_samples = (None if rank is None else int(rank)), int(n_samples)
    inputs, loader_y = gather_inputs(x, input_key=input_key, target_key=target_key)
    if loader_y is not None and y is not None:
        raise ValueError(
            "y must be None when x is a loader (its targets serve as y); got both. "
            "Pass the inputs as a tensor to use other targets."
        )
    y = loader_y if loader_y is not None else y
    if check_input is not None:
        check_input(inputs)
    inputs = to_device(inputs, fmodel.device)
    for t in input_tensors(inputs):
        check_finite(t, "input")
    B = batch_size_of(inputs)
    if B == 0:
        raise ValueError("x must hold at least one input; got 0 rows.")
    f_map = fmodel.forward(inputs)
    C = f_map.shape[1]
    if y is not None:
        y = torch.as_tensor(y).to(fmodel.device)
        if y.shape[0] != B:
            raise ValueError(
                f"y must have {B} rows like the inputs; got shape {shape_str(y.shape)}."
            )
        y = lik.check_targets(f_map, y, "y")
        check_finite(y, "y")
        targets = "given"
    else:
        targets = "MAP"

    lam_max = float(lam[0]) if R else 0.0
    floor = P * torch.finfo(lam.dtype).eps
    if rank is None and tol < floor:
        warnings.warn(
            f"tol={tol:g} is below the accuracy of the eigenvalues of G in {lam.dtype} "
            f"(about P·eps = {floor:.1e} relative to λ_max): eigenvalues near tol·λ_max are "
            f"rounding noise and the rank is unreliable. Pass tol >= {floor:.1e} or fit in "
            "float64.",
            RuntimeWarning,
            stacklevel=3,
        )
    if rank is None:
        r = int((lam > tol * lam_max).sum()) if lam_max > 0 else 0
    else:
        r = rank
    sigma = torch.as_tensor(sigma_noise, dtype=fmodel.dtype, device=fmodel.device)
    tr_ker, tr_nonk = _traces(posterior, lam, U, r)

    # parameter-space sample offsets: full δ, its kernel and non-kernel projections
    deltas: dict[str, Tensor] = {}
    if n_samples:
        delta = posterior.sample(n_samples, generator=generator) - posterior.mean
        d_nonk = (delta @ U[:, :r]) @ U[:, :r].T
        deltas = {"kernel": delta - d_nonk, "non-kernel": d_nonk, "full": delta}
    acc = _FitAccumulator(lik, likelihood, sigma)
    acc.n_out = C
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    per_sample = 6 * C * P * torch.empty((), dtype=fmodel.dtype).element_size()
    start = 0
    for xc in fmodel.chunks(inputs, fmodel.chunk_size(per_sample)):
        J, fc = fmodel.jacobians(xc, n_outputs=C)
        b = J.shape[0]
        parts.append(_variance_parts(posterior, J, lam, U, r))
        if n_samples:
            yc = y[start : start + b] if y is not None else _map_targets(fc, likelihood)
            acc.n += b
            for model in MODELS:
                acc.add(("MAP", model), fc.unsqueeze(0), yc)
            with torch.no_grad():
                for kind, D in deltas.items():
                    F_lin = fc.unsqueeze(0) + torch.einsum("bcp,sp->sbc", J, D)
                    F_net = torch.stack([fmodel(fmodel.theta + d, xc) for d in D])
                    acc.add((kind, "network"), F_net, yc)
                    acc.add((kind, "linearised"), F_lin, yc)
        start += b
    kern, nonk, cross = (torch.cat([p[i] for p in parts]) for i in range(3))
    return KernelDecomposition(
        rank=r,
        kernel_dim=P - r,
        tol=float(tol),
        n_params=P,
        eigenvalues=lam.detach().clone(),
        kept_eigenpairs=kept_eigenpairs,
        prior_kind=posterior.prior.kind.value,
        trace_kernel=tr_ker,
        trace_nonkernel=tr_nonk,
        kernel_variance_fraction=tr_ker / (tr_ker + tr_nonk),
        predictive_variance_kernel=kern,
        predictive_variance_nonkernel=nonk,
        predictive_variance_cross=cross,
        likelihood=likelihood,
        n_samples=n_samples,
        targets=targets,
        sample_fit=acc.rows() if n_samples else (),
    )


def _map_targets(f: Tensor, likelihood: Likelihood) -> Tensor:
    """Targets made from the MAP outputs ``(B, C)``: the outputs, the argmax, or the sign."""
    if likelihood is Likelihood.REGRESSION:
        return f
    if likelihood is Likelihood.CLASSIFICATION:
        return f.argmax(-1)
    return (f > 0).to(f.dtype)
