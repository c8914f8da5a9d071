r"""Link approximations: a Gaussian over logits mapped to class probabilities.

For logits :math:`f \sim N(\mu, \Sigma_f)`:

- ``probit`` (MacKay): :math:`\bar p = \mathrm{softmax}(\kappa \odot \mu)`,
  :math:`\kappa_c = (1 + \tfrac{\pi}{8} v_c)^{-1/2}` with :math:`v = \mathrm{diag}(\Sigma_f)`;
  the sigmoid of :math:`\kappa \mu` for a binary model.
- ``bridge`` (Laplace bridge, Hobbhahn et al. 2022): a Dirichlet with
  :math:`\alpha_k = v_k^{-1}\big(1 - \tfrac2C + \tfrac{e^{\mu_k}}{C^2}\sum_l e^{-\mu_l}\big)`,
  computed on the Gaussian projected onto the zero-sum subspace.
- ``bridge_norm`` (laplace-torch's normalised bridge): the same on the projected Gaussian
  rescaled to a mean variance of :math:`\sqrt{C/2}`, :math:`\mu/\sqrt{c}`, :math:`v/c`.
- ``mc``: S draws :math:`f_s = \mu + L z_s`, :math:`L L^\top = \Sigma_f`, independent for every
  input; mean of the softmax / sigmoid.

Probit needs only :math:`\mathrm{diag}(\Sigma_f)` and one product :math:`\Sigma_f v` per input,
the bridges :math:`\mathrm{diag}(\Sigma_f)` and the row sums :math:`\Sigma_f 1`, so they take the
covariances in any factored form of :mod:`laplace_ggn.posteriors._output` (O(C²) per input at
most; O(D·C) for the bridges of a Kronecker or diagonal Linear head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    Link,
    check_generator,
    check_memory,
    check_positive_int,
)
from .likelihoods import Prediction
from .posteriors._output import DenseOutputCovariance, OutputCovariance, as_output_covariance

__all__ = ["laplace_bridge", "link_predictive", "mc_link", "probit", "psd_sqrt"]


def link_predictive(
    link: Link,
    mean: Tensor,
    cov: OutputCovariance,
    *,
    binary: bool,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Prediction:
    """Class probabilities under logits ``N(mean, cov)`` through ``link``.

    Args:
        link: ``Link.PROBIT``, ``Link.BRIDGE``, ``Link.BRIDGE_NORM`` or ``Link.MC``.
        mean: Logit means, shape ``(N, C)`` (``(N, 1)`` if ``binary``).
        cov: Their covariances in factored form over the N rows.
        binary: One logit and the sigmoid instead of the softmax.
        n_samples: S for ``mc``.
        generator: Random generator for ``mc``.
        memory_budget: Bytes for the draws of ``mc``.

    Returns:
        The :class:`~laplace_ggn.likelihoods.Prediction`, shapes ``(N, C)``.

    Raises:
        ValueError: If ``mc`` needs dense covariances over ``memory_budget``.
    """
    if link is Link.PROBIT:
        return _probit(mean, cov, binary=binary)
    if link is Link.BRIDGE or link is Link.BRIDGE_NORM:
        return _bridge(mean, cov, binary=binary, normalize=link is Link.BRIDGE_NORM)
    N, C = mean.shape
    check_memory(
        N * C * C * mean.element_size(),
        memory_budget,
        f"the dense output covariances J Σ Jᵀ of link='mc' ({N} rows, shape ({N}, {C}, {C}))",
        "Pass fewer inputs per call, use link='probit' (diagonals only), or raise memory_budget=.",
    )
    return mc_link(
        mean,
        cov.to_dense(),
        n_samples=n_samples,
        binary=binary,
        generator=generator,
        memory_budget=memory_budget,
    )


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

    Returns:
        The :class:`~laplace_ggn.predictive.Prediction`, ``mean`` and ``variance`` ``(B, C)``.
    """
    v = cov.diagonal()
    kappa = torch.rsqrt(v * (math.pi / 8.0) + 1.0)
    if binary:
        p_bar = torch.sigmoid(kappa * mean)
        s = torch.sigmoid(mean)
        delta = (s * (1 - s)) ** 2 * v
    elif isinstance(cov, DenseOutputCovariance):
        p_bar = torch.softmax(kappa * mean, dim=-1)
        s = torch.softmax(mean, dim=-1)
        # on Σ_f / max|Σ_f|: huge finite matrices do not overflow in the product
        cs, vs, scale = _unit_scaled(cov, v)
        Ss = cs.matvec(s)
        delta = scale[:, None] * s**2 * (vs - 2 * Ss + (s * Ss).sum(-1, keepdim=True))
    else:  # factored forms form their products unscaled: no scaling (B·C passes)
        p_bar = torch.softmax(kappa * mean, dim=-1)
        s = torch.softmax(mean, dim=-1)
        Ss = cov.matvec(s)
        sSs = (s * Ss).sum(-1, keepdim=True)
        delta = (v - 2.0 * Ss + sSs) * s * s
    variance = torch.minimum(delta.clamp_min(0), (1 - p_bar) * p_bar)
    return Prediction(p_bar, variance)


def _binary_as_two_class(mean: Tensor, cov: OutputCovariance) -> tuple[Tensor, OutputCovariance]:
    """Logit a of a sigmoid as two softmax logits (-a/2, a/2) with their covariance."""
    mu = torch.cat([-mean / 2, mean / 2], dim=1)
    v = cov.diagonal()[:, 0] / 4
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=mean.dtype, device=mean.device)
    return mu, DenseOutputCovariance(v[:, None, None] * sign)


def laplace_bridge(
    mean: Tensor, cov: Tensor, *, binary: bool = False, normalize: bool = False
) -> Prediction:
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

    With ``normalize`` (laplace-torch's ``"bridge_norm"``) the projected Gaussian is first
    rescaled so that its mean variance is :math:`\sqrt{C/2}`: with
    :math:`c = \overline{\Sigma'_{kk}} / \sqrt{C/2}`, :math:`\mu'' = \mu'/\sqrt c` and
    :math:`\Sigma''_{kk} = \Sigma'_{kk}/c` enter the formula above.  The plain bridge's mean does
    not depend on the scale of :math:`\Sigma_f` at all; the normalised one tends to the one-hot
    arg-max of μ as :math:`\Sigma_f \to 0` and to :math:`\propto 1/\Sigma'_{kk}` as it grows
    (see ``docs/predictive.md``).

    Args:
        mean: Logit means, shape ``(B, C)`` (``(B, 1)`` if ``binary``).
        cov: Logit covariances, shape ``(B, C, C)``.
        binary: One logit and the sigmoid.
        normalize: The normalised bridge.

    Returns:
        The :class:`Prediction`, shapes ``(B, C)``.

    Example:
        >>> laplace_bridge(torch.zeros(1, 2), torch.eye(2).expand(1, 2, 2)).mean
        tensor([[0.5000, 0.5000]])
    """
    return _bridge(mean, as_output_covariance(cov), binary=binary, normalize=normalize)


def _bridge(mean: Tensor, cov: OutputCovariance, *, binary: bool, normalize: bool) -> Prediction:
    """Laplace bridge (normalised or not) from the diagonals and the row sums."""
    if binary:
        mean, cov = _binary_as_two_class(mean, cov)
    C = mean.shape[1]
    mu = mean - mean.mean(-1, keepdim=True)
    cs, ds, scale = _unit_scaled(cov, cov.diagonal())
    s1 = cs.row_sums()
    # diag(P Σ P) with P = I - 11ᵀ/C: Σ_kk - 2(Σ1)_k/C + 1ᵀΣ1/C² (few passes over (N, C))
    v = torch.add(ds, s1, alpha=-2.0 / C) + s1.sum(-1, keepdim=True) / C**2
    log_v = v.clamp_min(torch.finfo(v.dtype).tiny).log() + torch.log(scale)[:, None]
    if normalize and C:
        # Σ'' = Σ'/c and μ'' = μ'/√c with c = mean_k Σ'_kk / √(C/2), in log space
        log_c = torch.logsumexp(log_v, -1, keepdim=True) - math.log(C) - 0.5 * math.log(C / 2)
        big = torch.finfo(mu.dtype).max / 8  # a collapsed Σ' gives the one-hot arg-max
        mu = (mu * torch.exp(-log_c / 2)).clamp(-big, big)
        log_v = log_v - log_c
    # log(1 - 2/C + e^{μ_k}/C² Σ_l e^{-μ_l}) - log Σ'_kk
    log_alpha = mu + (torch.logsumexp(-mu, dim=-1, keepdim=True) - 2 * math.log(C))
    if C > 2:
        log_alpha = torch.logaddexp(log_alpha, log_alpha.new_tensor(math.log(1.0 - 2.0 / C)))
    log_alpha = log_alpha - log_v
    log_alpha0 = torch.logsumexp(log_alpha, dim=-1, keepdim=True)
    m = torch.exp(log_alpha - log_alpha0)  # α / α₀
    variance = (1 - m) * m / (log_alpha0.exp() + 1)
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

    def row_sums(self) -> Tensor:
        return self.cov.row_sums() / self.scale[:, None]

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
    S = check_positive_int(n_samples, "n_samples")
    check_generator(generator)
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
