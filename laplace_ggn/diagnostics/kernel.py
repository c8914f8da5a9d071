r"""The kernel / non-kernel decomposition: eigenbasis, variance parts, traces and samples."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import Likelihood, Structure, check_finite, is_integer, shape_str
from ..functional import FunctionalModel, batch_size_of, input_tensors, to_device
from ..posteriors import eigenbasis_of
from ._samples import _FitAccumulator, gather_inputs
from .report import KernelDecomposition

__all__ = ["decompose_fitted", "eigenbasis", "kernel_decomposition", "supported_structures"]
MODELS = ("network", "linearised")


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
        names = " or ".join(repr(s) for s in supported_structures())
        raise ValueError(
            f"posterior must hold an eigendecomposition of G (structure {names}); got "
            f"{type(posterior).__name__}."
        )
    lam, U = basis
    lam = lam.clamp_min(0)
    order = torch.argsort(lam, descending=True)
    return lam[order], U[:, order]


def supported_structures() -> tuple[str, ...]:
    """The registered structures whose posteriors hold an eigenbasis of G, in registry order.

    Those whose posterior class provides the optional ``eigenbasis()`` member of the
    :class:`~laplace_ggn.posteriors.Posterior` protocol (``full`` and ``lowrank`` built in).

    Returns:
        The structure names.
    """
    from ..structures import STRUCTURES

    return tuple(
        name
        for name, spec in STRUCTURES.items()
        if callable(getattr(spec.posterior_cls, "eigenbasis", None))
    )


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


def kernel_decomposition(
    posterior: object,
    fmodel: FunctionalModel,
    x: object,
    *,
    likelihood: Likelihood,
    lik: object,
    structure: str,
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
            a malformed input, or returns it ready for the model (its device and dtype).

    Returns:
        The report.

    Raises:
        ValueError: If the posterior holds no eigenbasis of G (structures other than those
            of :func:`supported_structures`), an option is out of
            range, ``y`` is given with a loader, or targets do not fit the likelihood.
        TypeError: If ``x`` is neither an input nor a loader.
    """
    name = structure.value if isinstance(structure, Structure) else str(structure)
    supported = supported_structures()
    if eigenbasis_of(posterior) is None and name not in supported:
        raise ValueError(
            f"structure must be one of {list(supported)} for kernel_decomposition(); got "
            f"{name!r}. The decomposition needs the eigenbasis of G: fit with "
            + " or ".join(f"structure={s!r}" for s in supported)
            + "."
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
        inputs = check_input(inputs)
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
    acc = _FitAccumulator(lik, sigma)
    acc.n_out = C
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    per_sample = 6 * C * P * torch.empty((), dtype=fmodel.dtype).element_size()
    start = 0
    for xc in fmodel.chunks(inputs, fmodel.chunk_size(per_sample)):
        J, fc = fmodel.jacobians(xc, n_outputs=C)
        b = J.shape[0]
        parts.append(_variance_parts(posterior, J, lam, U, r))
        if n_samples:
            yc = y[start : start + b] if y is not None else lik.targets_from_outputs(fc)
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


def decompose_fitted(
    fitted: object,
    x: object,
    *,
    kept_eigenpairs: int | None = None,
    y: Tensor | None = None,
    tol: float = 1e-9,
    rank: int | None = None,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
) -> KernelDecomposition:
    """:func:`kernel_decomposition` of a :class:`~laplace_ggn.FittedLaplace`.

    Args:
        fitted: The fitted Laplace approximation (structure ``full`` or ``lowrank``).
        x: Inputs of batch size B, or a loader of ``(x, y)`` batches.
        kept_eigenpairs: k for a top-k low-rank posterior, ``None`` when G is held exactly.
        y: Targets for ``x`` (``None``: the MAP predictions).
        tol: Eigenvalues of G at most ``tol·λ_max`` count as kernel.
        rank: Fix r instead of thresholding (``None``: threshold by ``tol``).
        n_samples: Samples per kind for the table; 0 skips it.
        generator: Random generator for the samples.

    Returns:
        The report.

    Raises:
        ValueError: If the model's outputs are ``(B, T, C)``, a sample holds several model
            inputs (reward modelling), the structure holds no
            eigenbasis of G, or an argument is invalid.
        TypeError: If ``x`` is neither a model input nor a loader.
    """
    if fitted.likelihood.items_per_sample > 1:
        raise ValueError(
            f"kernel_decomposition() needs a likelihood of one model input per sample; got "
            f"likelihood {fitted.likelihood.name!r}, whose samples hold "
            f"{fitted.likelihood.items_per_sample} (its fit metric is of pairs, its predictive "
            "of single items)."
        )
    if fitted.statistics.output_ndim != 2:
        raise ValueError(
            "kernel_decomposition() needs a model with outputs (B, C); got a model fitted "
            "on outputs (B, T, C). Decompose a model that returns one position, e.g. the "
            "last token's outputs."
        )
    return kernel_decomposition(
        fitted.posterior,
        fitted.fmodel,
        x,
        likelihood=fitted.likelihood,
        lik=fitted.likelihood,
        structure=fitted.structure.name,
        y=y,
        sigma_noise=fitted.hyperparameters.sigma_noise,
        tol=tol,
        rank=rank,
        n_samples=n_samples,
        kept_eigenpairs=kept_eigenpairs,
        generator=generator,
        input_key=fitted.reader.input_key,
        target_key=fitted.reader.target_key,
        check_input=fitted.model_input,
    )
