r"""Predictive distributions: the linearised (GLM) and the sampled-network (NN) predictive.

GLM: the network is linearised at the MAP, :math:`f_{lin}(x, \theta) = f(x, \theta_*) +
J(x)(\theta - \theta_*)`, so the outputs are Gaussian,
:math:`f(x) \sim N(f(x, \theta_*), J(x) \Sigma J(x)^\top)`.  Regression adds the observation
noise :math:`\sigma^2 I`; classification maps the Gaussian over logits through a link:

- ``probit`` (MacKay): :math:`\bar p = \mathrm{softmax}(\kappa \odot \mu)`,
  :math:`\kappa_c = (1 + \tfrac{\pi}{8} v_c)^{-1/2}` with :math:`v = \mathrm{diag}(J \Sigma J^\top)`;
  the sigmoid of :math:`\kappa \mu` for a binary model.
- ``bridge`` (Laplace bridge, Hobbhahn et al. 2022): a Dirichlet with
  :math:`\alpha_k = v_k^{-1}\big(1 - \tfrac2C + \tfrac{e^{\mu_k}}{C^2}\sum_l e^{-\mu_l}\big)`,
  computed on the Gaussian projected onto the zero-sum subspace (:math:`\mu - \bar\mu 1`,
  :math:`P \Sigma P` with :math:`P = I - 11^\top/C`), so that adding the same constant to every
  logit changes nothing, as for the softmax; mean :math:`\alpha / \alpha_0`.
- ``mc``: S draws :math:`f_s = \mu + L z_s`, :math:`L L^\top = J \Sigma J^\top`, independent
  for every input; mean of the softmax / sigmoid.

NN: :math:`\theta_s \sim N(\theta_*, \Sigma)`, the network is evaluated at every sample with
:func:`torch.func.functional_call` (vectorised over samples with :func:`torch.func.vmap`
where the model allows), and the likelihood's prediction is averaged.

Every predictive returns a :class:`Prediction` with ``mean`` and ``variance`` of shape
``(B, C)`` (``(B, T, C)`` for a model with outputs ``(B, T, C)``: every position is its own
Gaussian over C logits).  Regression: ``variance`` is the variance of y (functional variance + σ²).
Classification: ``variance`` is the variance of the class probability under the posterior:
the sample variance for ``mc`` and ``nn``, the Dirichlet variance for ``bridge``, and the
delta-method value :math:`\mathrm{diag}(A \Sigma_f A^\top)`, :math:`A = \mathrm{diag}(s) - s s^\top`,
:math:`s = \mathrm{softmax}(\mu)`, capped at :math:`\bar p(1 - \bar p)`, for ``probit``.

Probit, bridge and the regression variance need only :math:`\mathrm{diag}(\Sigma_f)` and one
product :math:`\Sigma_f v` per input, so they take the output covariances in any factored form
of :mod:`laplace_ggn.posteriors._output` (O(C²) per input); for a Linear head
(:class:`~laplace_ggn.head.LinearHead`) these come from the features, without Jacobians.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Likelihood,
    Link,
    PredictMethod,
    as_enum,
    check_computed_finite,
    is_integer,
    shape_str,
)
from .functional import batch_size_of, split_batch
from .posteriors._output import (
    DenseOutputCovariance,
    OutputCovariance,
    as_output_covariance,
)

__all__ = [
    "Prediction",
    "batches_of",
    "functional_moments",
    "glm_from_moments",
    "glm_predictive",
    "laplace_bridge",
    "mc_link",
    "nn_predictive",
    "output_covariance",
    "predict",
    "predictive_nll",
    "probit",
    "psd_sqrt",
    "resolve_options",
    "sample_outputs",
    "temper",
]

_VALID = (
    "valid combinations: method='glm' with link 'probit', 'bridge' or 'mc'; method='nn' with "
    "link 'mc' (the default for 'nn'); regression ignores the link"
)


@dataclass(frozen=True)
class Prediction:
    """Moments of a predictive distribution.

    Attributes:
        mean: Regression: predictive mean; classification: class probabilities (a binary
            model gives the probability of class 1), shape ``(B, C)``.
        variance: Regression: variance of y (functional + σ²); classification: variance of
            the class probability under the posterior, shape ``(B, C)``.
    """

    mean: Tensor
    variance: Tensor


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def resolve_options(
    likelihood: Likelihood, method: str | PredictMethod, link: str | Link | None
) -> tuple[PredictMethod, Link | None]:
    """Convert and check the ``method`` / ``link`` pair for a likelihood.

    ``link=None`` means ``probit`` for ``glm`` and ``mc`` for ``nn``.  Regression has no link:
    ``None`` and the default ``"probit"`` are accepted and ignored, other links raise.

    Args:
        likelihood: The wrapper's likelihood.
        method: ``"glm"`` or ``"nn"``.
        link: ``"probit"``, ``"bridge"``, ``"mc"`` or ``None``.

    Returns:
        ``(method, link)``; the link is ``None`` for regression.

    Raises:
        ValueError: If an option is unknown or the combination is invalid (the message lists
            the valid ones).
    """
    m = as_enum(PredictMethod, method, "method")
    lk = None if link is None else as_enum(Link, link, "link")
    if likelihood is Likelihood.REGRESSION:
        if lk not in (None, Link.PROBIT):
            raise ValueError(
                f"link must be None (or the default 'probit', ignored) for "
                f"likelihood='regression'; got link={lk.value!r}. The regression predictive is "
                f"Gaussian and needs no link; {_VALID}."
            )
        return m, None
    if m is PredictMethod.NN:
        if lk not in (None, Link.MC):
            raise ValueError(
                f"link must be 'mc' (or None) with method='nn'; got link={lk.value!r}. The "
                f"sampled-network predictive averages over network samples; {_VALID}."
            )
        return m, Link.MC
    return m, (Link.PROBIT if lk is None else lk)


def _check_n_samples(n_samples: object) -> int:
    if not is_integer(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
    return int(n_samples)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}."
        )


# ---------------------------------------------------------------------------------------------
# Links: Gaussian over logits -> class probabilities
# ---------------------------------------------------------------------------------------------


def probit(mean: Tensor, var: Tensor, *, binary: bool = False) -> Prediction:
    r"""MacKay's probit approximation of the expected softmax / sigmoid.

    .. math::
        \bar p = \mathrm{softmax}(\kappa \odot \mu), \qquad
        \kappa_c = (1 + \tfrac{\pi}{8} v_c)^{-1/2}.

    The variance is the delta-method variance of the probabilities (see the module
    docstring), capped at :math:`\bar p (1 - \bar p)`.

    Args:
        mean: Logit means μ, shape ``(B, C)`` (``(B, 1)`` if ``binary``).
        var: Logit covariances, shape ``(B, C, C)``, or their diagonals ``(B, C)``.
        binary: One logit and the sigmoid instead of the softmax.

    Returns:
        The :class:`Prediction` with shapes ``(B, C)``.

    Example:
        >>> p = probit(torch.zeros(2, 3), torch.ones(2, 3))
        >>> p.mean
        tensor([[0.3333, 0.3333, 0.3333],
                [0.3333, 0.3333, 0.3333]])
    """
    return _probit(mean, as_output_covariance(var), binary=binary)


def _probit(mean: Tensor, cov: OutputCovariance, *, binary: bool) -> Prediction:
    r"""Probit from the diagonal and one product per input.

    :math:`\mathrm{diag}(A\Sigma A^\top)_c = s_c^2(\Sigma_{cc} - 2(\Sigma s)_c + s^\top\Sigma s)`.
    """
    v = cov.diagonal()
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * v)
    if binary:
        p_bar = torch.sigmoid(kappa * mean)
        s = torch.sigmoid(mean)
        delta = (s * (1 - s)) ** 2 * v
    else:
        p_bar = torch.softmax(kappa * mean, dim=-1)
        s = torch.softmax(mean, dim=-1)
        # on Σ_f / max|Σ_f|: huge finite covariances do not overflow into NaN
        cs, vs, scale = _unit_scaled(cov, v)
        Ss = cs.matvec(s)
        delta = scale[:, None] * s**2 * (vs - 2 * Ss + (s * Ss).sum(-1, keepdim=True))
    variance = torch.minimum(delta.clamp_min(0), p_bar * (1 - p_bar))
    return Prediction(p_bar, variance)


def _binary_as_two_class(mean: Tensor, cov: OutputCovariance) -> tuple[Tensor, OutputCovariance]:
    """Logit a of a sigmoid as two softmax logits (-a/2, a/2) with their covariance."""
    mu = torch.cat([-mean / 2, mean / 2], dim=1)
    v = cov.diagonal()[:, 0] / 4
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=mean.dtype, device=mean.device)
    return mu, DenseOutputCovariance(v[:, None, None] * sign)


def laplace_bridge(mean: Tensor, cov: Tensor, *, binary: bool = False) -> Prediction:
    r"""Laplace bridge: the Dirichlet matched to a Gaussian over logits (Hobbhahn et al.).

    The softmax is invariant to adding the same constant to every logit, so
    :math:`\mathrm{softmax}(f) = \mathrm{softmax}(Pf)` with :math:`P = I - 11^\top/C`, and the
    Gaussian is first projected onto the zero-sum subspace:
    :math:`\mu' = P\mu = \mu - \bar\mu 1`, :math:`\Sigma' = P \Sigma P`.  The projection is
    the exact distribution of the logits the softmax sees; it makes the result invariant to
    shifting every logit (and every sample of them) by the same constant.  Then

    .. math::
        \alpha_k = \frac{1}{\Sigma'_{kk}}\Big(1 - \frac2C + \frac{e^{\mu'_k}}{C^2}
        \sum_l e^{-\mu'_l}\Big), \quad
        \mathbb E[p_k] = \frac{\alpha_k}{\alpha_0}, \quad
        \mathrm{Var}[p_k] = \frac{\alpha_k(\alpha_0 - \alpha_k)}{\alpha_0^2(\alpha_0 + 1)},

    with :math:`\alpha_0 = \sum_k \alpha_k`, computed in log space (and on
    :math:`\Sigma'/\max|\Sigma|`, so that huge finite covariances do not overflow).  A binary
    logit a is the pair :math:`(-a/2, a/2)` with covariance
    :math:`\tfrac{\Sigma}{4}\left[\begin{smallmatrix}1&-1\\-1&1\end{smallmatrix}\right]`,
    already on the zero-sum subspace.

    Args:
        mean: Logit means, shape ``(B, C)`` (``(B, 1)`` if ``binary``).
        cov: Logit covariances, shape ``(B, C, C)``.
        binary: One logit and the sigmoid.

    Returns:
        The :class:`Prediction`, shapes ``(B, C)``.

    Example:
        >>> laplace_bridge(torch.zeros(1, 2), torch.eye(2).expand(1, 2, 2)).mean
        tensor([[0.5000, 0.5000]])
    """
    return _bridge(mean, as_output_covariance(cov), binary=binary)


def _bridge(mean: Tensor, cov: OutputCovariance, *, binary: bool) -> Prediction:
    """Laplace bridge from the diagonal and the product with the ones vector."""
    if binary:
        mean, cov = _binary_as_two_class(mean, cov)
    C = mean.shape[1]
    mu = mean - mean.mean(-1, keepdim=True)
    cs, ds, scale = _unit_scaled(cov, cov.diagonal())
    s1 = cs.matvec(torch.ones_like(mean))
    # diag(P Σ P) with P = I - 11ᵀ/C: Σ_kk - 2(Σ1)_k/C + 1ᵀΣ1/C²
    v = ds - 2 * s1 / C + s1.sum(-1, keepdim=True) / C**2
    v = v.clamp_min(torch.finfo(v.dtype).tiny)
    const = torch.full_like(mu, math.log(1.0 - 2.0 / C) if C > 2 else -math.inf)
    log_num = torch.logaddexp(
        const, mu + torch.logsumexp(-mu, dim=-1, keepdim=True) - 2 * math.log(C)
    )
    log_alpha = log_num - torch.log(v) - torch.log(scale)[:, None]
    m = torch.softmax(log_alpha, dim=-1)
    alpha0 = torch.exp(torch.logsumexp(log_alpha, dim=-1, keepdim=True))
    variance = m * (1 - m) / (alpha0 + 1)
    if binary:
        return Prediction(m[:, 1:], variance[:, 1:])
    return Prediction(m, variance)


def _unit_scaled(cov: OutputCovariance, diag: Tensor) -> tuple[OutputCovariance, Tensor, Tensor]:
    """The covariances and their diagonals ``diag`` divided by their largest absolute entry.

    Returns:
        ``(scaled covariances, scaled diagonals (N, C), scales (N,))``.
    """
    if isinstance(cov, DenseOutputCovariance):
        scale = _max_abs(cov.M)
        return DenseOutputCovariance(cov.M / scale[:, None, None]), diag / scale[:, None], scale
    # PSD: the largest entry is on the diagonal
    scale = (
        diag.abs().amax(-1).clamp_min(torch.finfo(diag.dtype).tiny)
        if diag.numel()
        else diag.new_ones(diag.shape[0])
    )
    return _Scaled(cov, scale), diag / scale[:, None], scale


@dataclass(frozen=True)
class _Scaled:
    """A factored output covariance divided by one scale per input."""

    cov: OutputCovariance
    scale: Tensor

    def diagonal(self) -> Tensor:
        return self.cov.diagonal() / self.scale[:, None]

    def matvec(self, V: Tensor) -> Tensor:
        return self.cov.matvec(V) / self.scale[:, None]

    def to_dense(self) -> Tensor:
        return self.cov.to_dense() / self.scale[:, None, None]


def _max_abs(cov: Tensor) -> Tensor:
    """Largest absolute entry of each matrix ``(B, C, C)``, shape ``(B,)``, at least ``tiny``."""
    if cov.numel() == 0:
        return cov.new_ones(cov.shape[0])
    return cov.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(cov.dtype).tiny)


def psd_sqrt(cov: Tensor) -> Tensor:
    r"""A factor L with :math:`L L^\top = \Sigma` for PSD (possibly singular) matrices.

    The eigendecomposition runs on :math:`\Sigma / \max|\Sigma|` (and, if that fails to
    converge, once more in float64), so that huge or tiny finite entries do not make it fail.

    Args:
        cov: Shape ``(B, C, C)``, finite.

    Returns:
        Shape ``(B, C, C)``; eigenvalues below 0 (round-off) are clamped to 0.

    Raises:
        RuntimeError: If the eigendecomposition fails even in float64 (non-finite entries).
    """
    scale = _max_abs(cov)[:, None, None]
    try:
        lam, U = torch.linalg.eigh(cov / scale)
    except torch.linalg.LinAlgError:
        try:
            lam, U = torch.linalg.eigh((cov / scale).to(torch.float64))
        except torch.linalg.LinAlgError as err:
            raise RuntimeError(
                "functional covariance J Σ Jᵀ must have an eigendecomposition for the mc link; "
                f"torch.linalg.eigh failed ({err}). Check it for NaN/Inf."
            ) from err
        lam, U = lam.to(cov.dtype), U.to(cov.dtype)
    return U * (lam.clamp_min(0).sqrt() * scale[:, 0].sqrt()).unsqueeze(-2)


def mc_link(
    mean: Tensor,
    cov: Tensor,
    *,
    n_samples: int = 100,
    binary: bool = False,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Prediction:
    r"""Monte Carlo expectation of the softmax / sigmoid under :math:`N(\mu, \Sigma_f)`.

    .. math::
        f_s = \mu + L z_s, \quad z_s \sim N(0, I), \quad
        \bar p = \frac1S \sum_s \mathrm{softmax}(f_s),

    with fresh, independent noise for every input and sample.  The variance is the unbiased
    sample variance of the probabilities (0 when S = 1).

    Args:
        mean: Logit means, shape ``(B, C)``.
        cov: Logit covariances, shape ``(B, C, C)``.
        n_samples: S.
        binary: One logit and the sigmoid.
        generator: Random generator for reproducible draws.
        memory_budget: Bytes for the ``(S, B, C)`` draws; inputs are processed in chunks
            (draws depend on the chunking, so on the budget, for a given generator state).

    Returns:
        The :class:`Prediction`, shapes ``(B, C)``.

    Raises:
        ValueError: If ``n_samples`` is not a positive integer.
        TypeError: If ``generator`` is not a ``torch.Generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mc_link(torch.zeros(4, 1), torch.zeros(4, 1, 1), binary=True, generator=g).mean[:, 0]
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    S = _check_n_samples(n_samples)
    _check_generator(generator)
    B, C = mean.shape
    if B == 0:
        return Prediction(mean.new_zeros(0, C), mean.new_zeros(0, C))
    rows = max(1, int(memory_budget // max(1, 4 * S * C * mean.element_size())))
    means, variances = [], []
    for start in range(0, B, rows):
        mu, L = mean[start : start + rows], psd_sqrt(cov[start : start + rows])
        z = torch.randn((S, *mu.shape), dtype=mu.dtype, device=mu.device, generator=generator)
        logits = mu + torch.einsum("bcd,sbd->sbc", L, z)
        p = torch.sigmoid(logits) if binary else torch.softmax(logits, dim=-1)
        means.append(p.mean(0))
        variances.append(p.var(dim=0, correction=1) if S > 1 else torch.zeros_like(mu))
    return Prediction(torch.cat(means), torch.cat(variances))


# ---------------------------------------------------------------------------------------------
# GLM predictive
# ---------------------------------------------------------------------------------------------


def glm_from_moments(
    f: Tensor,
    cov: Tensor | OutputCovariance,
    *,
    likelihood: Likelihood,
    link: Link | None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Prediction:
    r"""Map the linearised outputs :math:`N(f, \Sigma_f)` to the predictive.

    Regression: mean ``f``, variance :math:`\mathrm{diag}(\Sigma_f) + \sigma^2`.
    Classification and binary: the link (see the module docstring).  Outputs ``(B, T, C)``
    are B·T independent Gaussians over C logits.

    Args:
        f: Outputs at θ*, shape ``(B, C)`` or ``(B, T, C)``.
        cov: Functional covariances :math:`J \Sigma J^\top`, shape ``(*f.shape, C)``, or a
            factored :class:`~laplace_ggn.posteriors._output.OutputCovariance` over the
            ``f.numel() / C`` rows of ``f``.
        likelihood: The likelihood.
        link: The link (ignored for regression).
        sigma_noise: σ (regression).
        n_samples: S for the ``mc`` link.
        generator: Random generator for the ``mc`` link.
        memory_budget: Bytes for the draws of the ``mc`` link.

    Returns:
        The :class:`Prediction`, shapes of ``f``.
    """
    C = f.shape[-1]
    rows = f.reshape(-1, C)
    op = DenseOutputCovariance(cov.reshape(-1, C, C)) if isinstance(cov, Tensor) else cov
    if likelihood is Likelihood.REGRESSION:
        sigma = torch.as_tensor(sigma_noise, dtype=f.dtype, device=f.device)
        pred = Prediction(rows, op.diagonal() + sigma**2)
    else:
        binary = likelihood is Likelihood.BINARY
        if link is Link.PROBIT:
            pred = _probit(rows, op, binary=binary)
        elif link is Link.BRIDGE:
            pred = _bridge(rows, op, binary=binary)
        else:
            pred = mc_link(
                rows,
                op.to_dense(),
                n_samples=n_samples,
                binary=binary,
                generator=generator,
                memory_budget=memory_budget,
            )
    return Prediction(pred.mean.reshape(f.shape), pred.variance.reshape(f.shape))


def output_covariance(
    fmodel, posterior, x: object, *, n_outputs: int, head=None
) -> tuple[Tensor, OutputCovariance]:
    r"""Outputs at θ* and :math:`J(x) \Sigma J(x)^\top` per position, in factored form.

    With a :class:`~laplace_ggn.head.LinearHead` (the subset is one Linear layer whose output
    is the model output) and a posterior with ``linear_head_covariance``, the covariances
    come from the features entering the layer: no Jacobian, nothing differentiated through
    the body, memory independent of C·P.  Otherwise (or when the head check fails for this
    call) Jacobians are computed in chunks and go through ``posterior.functional_covariance``.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure.
        x: Model input of batch size B.
        n_outputs: C.
        head: The subset's Linear head, or ``None``.

    Returns:
        ``(f, cov)``: outputs ``(B, C)`` or ``(B, T, C)`` and the covariances of the
        N = B (or B·T) rows.
    """
    first = next(iter(fmodel.chunks(x, 1)), None)
    if first is None:  # an input of 0 rows
        z = fmodel.theta.new_zeros(0, n_outputs)
        return z, DenseOutputCovariance(z.new_zeros(0, n_outputs, n_outputs))
    if head is not None and hasattr(posterior, "linear_head_covariance"):
        got = head.features(x)
        if got is not None:
            phi, f = got
            return f, posterior.linear_head_covariance(phi, head.index)
    P = fmodel.n_params
    M = fmodel.forward(first)[0].numel()  # T·C for outputs (B, T, C)
    per_sample = 4 * M * P * fmodel.theta.element_size()
    fs, covs = [], []
    for xc in fmodel.chunks(x, fmodel.chunk_size(per_sample)):
        J, f = fmodel.jacobians(xc, n_outputs=M)
        fs.append(f)
        covs.append(posterior.functional_covariance(J.reshape(-1, f.shape[-1], P)))
    return torch.cat(fs), DenseOutputCovariance(torch.cat(covs))


def functional_moments(
    fmodel, posterior, x: object, *, n_outputs: int, head=None
) -> tuple[Tensor, Tensor]:
    r"""Outputs at θ* and :math:`J(x) \Sigma J(x)^\top` as dense matrices.

    Σ is never formed: see :func:`output_covariance`.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure.
        x: Model input of batch size B.
        n_outputs: C.
        head: The subset's Linear head, or ``None``.

    Returns:
        ``(f, cov)`` of shapes ``(B, C)`` and ``(B, C, C)`` (``(B, T, C)`` and
        ``(B, T, C, C)`` for sequence outputs).
    """
    f, op = output_covariance(fmodel, posterior, x, n_outputs=n_outputs, head=head)
    C = f.shape[-1]
    return f, op.to_dense().reshape(*f.shape, C)


def glm_predictive(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood,
    link: Link | None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
    head=None,
) -> Prediction:
    """Linearised predictive at inputs ``x`` (see :func:`glm_from_moments`).

    Returns:
        The :class:`Prediction`, shapes ``(B, C)`` (``(B, T, C)`` for sequence outputs).

    Raises:
        RuntimeError: If the functional covariance is not finite.
    """
    with torch.no_grad():  # the Jacobians switch autograd on for themselves
        f, cov = output_covariance(fmodel, posterior, x, n_outputs=n_outputs, head=head)
        check_computed_finite(
            cov.M if isinstance(cov, DenseOutputCovariance) else cov.diagonal(),
            "functional covariance J Σ Jᵀ (GLM predictive)",
        )
        return glm_from_moments(
            f,
            cov,
            likelihood=likelihood,
            link=link,
            sigma_noise=sigma_noise,
            n_samples=n_samples,
            generator=generator,
            memory_budget=fmodel.memory_budget,
        )


# ---------------------------------------------------------------------------------------------
# NN (sampling) predictive
# ---------------------------------------------------------------------------------------------


def _pair_bytes(fmodel, n_outputs: int) -> int:
    # outputs plus an allowance for the activations of one (sample, input) pair
    return 16 * max(n_outputs, 16) * fmodel.theta.element_size()


def sample_outputs(fmodel, thetas: Tensor, x: object, *, n_outputs: int) -> Tensor:
    r"""Network outputs :math:`f(x, \theta_s)` for every sample, shape ``(S, B, C)``.

    Vectorised over samples with :func:`torch.func.vmap` (a per-sample loop if the model
    cannot be vmapped) and chunked over samples and inputs so that the intermediates stay
    under ``fmodel.memory_budget``.  The user's model is never written.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        thetas: Parameter samples of the subset, shape ``(S, P)``.
        x: Model input of batch size B.
        n_outputs: C (for chunking).

    Returns:
        Shape ``(S, B, C)``.
    """
    S, P = thetas.shape
    elt = fmodel.theta.element_size()
    pairs = max(1, fmodel.memory_budget // _pair_bytes(fmodel, n_outputs))
    B = batch_size_of(x)
    if B == 0:
        return thetas.new_zeros(S, 0, n_outputs)
    x_chunk = min(B, pairs)
    s_chunk = max(1, min(S, pairs // x_chunk, fmodel.memory_budget // max(1, 4 * P * elt)))
    rows = []
    # decided afresh on every call; recurrent layers have no batching rule over parameters
    call = {"vmap": not fmodel.has_rnn}
    with torch.no_grad():
        for xc in fmodel.chunks(x, x_chunk):
            cols = []
            for start in range(0, S, s_chunk):
                cols.append(_eval_samples(fmodel, thetas[start : start + s_chunk], xc, call))
            rows.append(torch.cat(cols, dim=0))
    return torch.cat(rows, dim=1)


def _eval_samples(fmodel, thetas: Tensor, x: object, call: dict) -> Tensor:
    if call["vmap"]:
        try:
            return vmap(fmodel, in_dims=(0, None))(thetas, x)
        except Exception as err:
            # the model cannot run under vmap (data-dependent control flow, in-place updates
            # of unbatched tensors); an error of the input itself surfaces again below
            call["vmap"] = False
            warnings.warn(
                f"vmap over parameter samples failed ({type(err).__name__}: {str(err)[:120]}); "
                "evaluating the network once per sample.",
                RuntimeWarning,
                stacklevel=4,
            )
    return torch.stack([fmodel(t, x) for t in thetas])


def nn_predictive(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
) -> Prediction:
    r"""Sampled-network predictive: :math:`\theta_s \sim N(\theta_*, \Sigma)`, S network runs.

    Regression: mean and unbiased sample variance of :math:`f(x, \theta_s)`, plus σ².
    Classification / binary: mean and sample variance of the softmax / sigmoid.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure (gives ``sample``).
        x: Model input of batch size B.
        likelihood: The likelihood.
        sigma_noise: σ (regression).
        n_samples: S.
        generator: Random generator for reproducible samples.
        n_outputs: C.

    Returns:
        The :class:`Prediction`, shapes ``(B, C)``.
    """
    S = _check_n_samples(n_samples)
    thetas = posterior.sample(S, generator=generator)
    out = sample_outputs(fmodel, thetas, x, n_outputs=n_outputs)
    if likelihood is Likelihood.CLASSIFICATION:
        out = torch.softmax(out, dim=-1)
    elif likelihood is Likelihood.BINARY:
        out = torch.sigmoid(out)
    var = out.var(dim=0, correction=1) if S > 1 and out.shape[1] else torch.zeros_like(out[0])
    if likelihood is Likelihood.REGRESSION:
        var = var + torch.as_tensor(sigma_noise, dtype=out.dtype, device=out.device) ** 2
    return Prediction(out.mean(0), var)


# ---------------------------------------------------------------------------------------------
# Entry point and scoring
# ---------------------------------------------------------------------------------------------


def predict(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood,
    method: str | PredictMethod = "glm",
    link: str | Link | None = None,
    sigma_noise: Tensor | float = 1.0,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    n_outputs: int,
    head=None,
) -> Prediction:
    """Predictive at inputs ``x``: options checked first, then GLM or NN.

    Args:
        fmodel: The :class:`~laplace_ggn.functional.FunctionalModel`.
        posterior: Any posterior structure.
        x: Model input of batch size B.
        likelihood: The likelihood.
        method: ``"glm"`` or ``"nn"``.
        link: ``"probit"``, ``"bridge"``, ``"mc"`` or ``None`` (probit for glm, mc for nn).
        sigma_noise: σ (regression).
        n_samples: S for ``mc`` / ``nn``.
        generator: Random generator for ``mc`` / ``nn``.
        n_outputs: C.
        head: The subset's :class:`~laplace_ggn.head.LinearHead` (GLM without Jacobians).

    Returns:
        The :class:`Prediction`, shapes ``(B, C)`` (``(B, T, C)`` for sequence outputs).

    Raises:
        ValueError: If the options or their combination are invalid, or ``n_samples`` is not
            a positive integer.
        TypeError: If ``generator`` is not a ``torch.Generator``.
        RuntimeError: If the functional covariance or the predictive is not finite (a
            numerical overflow, e.g. saturated logits in float32).
    """
    m, lk = resolve_options(likelihood, method, link)
    _check_n_samples(n_samples)
    _check_generator(generator)
    kw = {
        "likelihood": likelihood,
        "sigma_noise": sigma_noise,
        "n_samples": n_samples,
        "generator": generator,
        "n_outputs": n_outputs,
    }
    if m is PredictMethod.NN:
        pred = nn_predictive(fmodel, posterior, x, **kw)
    else:
        pred = glm_predictive(fmodel, posterior, x, link=lk, head=head, **kw)
    name = f"method={m.value!r}" + (f", link={lk.value!r}" if lk is not None else "")
    check_computed_finite(pred.mean, f"predictive mean ({name})")
    check_computed_finite(pred.variance, f"predictive variance ({name})")
    return pred


def predictive_nll(pred: Prediction, y: Tensor, likelihood: Likelihood) -> Tensor:
    r"""Per-point negative log predictive density, shape ``(B,)``.

    Regression: :math:`\sum_c \tfrac12\log(2\pi v_c) + (y_c - m_c)^2 / (2 v_c)`;
    classification: :math:`-\log \bar p_{y}`; binary: :math:`-y\log\bar p - (1-y)\log(1-\bar p)`.

    Args:
        pred: The predictive, shapes ``(B, C)``.
        y: Targets as the likelihood's ``check_targets`` returns them: ``(B, C)`` floats,
            ``(B,)`` class indices or ``(B, 1)`` zeros and ones.
        likelihood: The likelihood.

    Returns:
        Shape ``(B,)``.

    Raises:
        ValueError: If ``y`` does not match the prediction's batch size.
    """
    B = pred.mean.shape[0]
    if y.shape[0] != B:
        raise ValueError(f"y must have batch size {B}; got shape {shape_str(y.shape)}.")
    tiny = torch.finfo(pred.mean.dtype).tiny
    if likelihood is Likelihood.REGRESSION:
        v = pred.variance
        r = (y.reshape(pred.mean.shape) - pred.mean) ** 2
        return (0.5 * torch.log(2 * math.pi * v) + 0.5 * r / v).sum(-1)
    if likelihood is Likelihood.CLASSIFICATION:
        p = pred.mean.gather(1, y.long().reshape(-1, 1))[:, 0]
        return -torch.log(p.clamp_min(tiny))
    p = pred.mean[:, 0]
    t = y.reshape(-1).to(p.dtype)
    return -(t * torch.log(p.clamp_min(tiny)) + (1 - t) * torch.log((1 - p).clamp_min(tiny)))


def temper(pred: Prediction, temperature: Tensor | float, *, binary: bool = False) -> Prediction:
    r"""Predictive temperature T on class probabilities: :math:`p_T \propto \bar p^{1/T}`.

    .. math::
        p_T = \mathrm{softmax}(\log\bar p / T), \qquad
        \text{binary: } p_T = \sigma\big(\mathrm{logit}(\bar p)/T\big).

    A map of the predictive's probabilities (temperature scaling of the predictive, not of
    each sample): it keeps the arg-max; T < 1 sharpens, T > 1 softens.  For the probit link
    it divides the probit-corrected logits :math:`\kappa\odot\mu` by T.  The variance is that
    of the untempered predictive, capped at :math:`p_T(1 - p_T)`.

    Args:
        pred: Classification probabilities ``(B, C)`` (binary: ``(B, 1)``) and variances.
        temperature: T > 0, shape ``()``.
        binary: One probability of class 1 per input.

    Returns:
        The tempered :class:`Prediction`, shapes ``(B, C)``.

    Example:
        >>> p = Prediction(torch.tensor([[0.8, 0.2]]), torch.zeros(1, 2))
        >>> temper(p, 2.0).mean
        tensor([[0.6667, 0.3333]])
    """
    p = pred.mean
    T = torch.as_tensor(temperature, dtype=p.dtype, device=p.device)
    tiny = torch.finfo(p.dtype).tiny
    if binary:
        logit = torch.log(p.clamp_min(tiny)) - torch.log((1 - p).clamp_min(tiny))
        p_t = torch.sigmoid(logit / T)
    else:
        p_t = torch.softmax(torch.log(p.clamp_min(tiny)) / T, dim=-1)
    return Prediction(p_t, torch.minimum(pred.variance, p_t * (1 - p_t)))


def batches_of(
    loader: Iterable, *, input_key: str, target_key: str
) -> Iterable[tuple[object, Tensor]]:
    """Yield ``(x, y)`` from a loader of pairs or mappings."""
    for i, batch in enumerate(loader):
        yield split_batch(batch, input_key=input_key, target_key=target_key, where=f"batch {i}")
