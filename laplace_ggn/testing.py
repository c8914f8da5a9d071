r"""Dense references and the conformance battery every posterior structure must pass.

The references are computed another way than the library does: Jacobians with
:func:`torch.func.jacrev` over the whole batch, output Hessians with
:func:`torch.autograd.functional.hessian` of the per-sample NLL, Hessians of the loss with
autograd, and Σ by an explicit inverse.  Use them in float64 on tiny models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

__all__ = [
    "flat_params",
    "dense_jacobian",
    "dense_output_hessians",
    "dense_ggn",
    "dense_hessian",
    "dense_ef",
    "dense_posterior_covariance",
    "check_posterior",
    "nll_per_sample",
]


def flat_params(model: nn.Module, names: Sequence[str] | None = None) -> tuple[list[str], Tensor]:
    """Names and flat vector ``(P,)`` of the model's parameters (or of ``names``)."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def _call_flat(model: nn.Module, names: Sequence[str], theta: Tensor, x: Tensor) -> Tensor:
    params = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = theta[i : i + k].view(params[n].shape)
        i += k
    f = functional_call(model, out, (x,))
    return f.unsqueeze(1) if f.ndim == 1 else f


def dense_jacobian(model: nn.Module, x: Tensor, names: Sequence[str] | None = None) -> Tensor:
    """Jacobian of the outputs, shape ``(B, C, P)`` (jacrev over the whole batch, eval mode)."""
    names, theta = flat_params(model, names)
    was = model.training
    model.eval()
    try:
        J = jacrev(lambda th: _call_flat(model, names, th, x))(theta)
    finally:
        model.train(was)
    return J.detach()


def nll_per_sample(likelihood: str, f: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """Per-sample negative log likelihood written from scratch, shape ``(B,)``.

    ``likelihood`` is ``"regression"`` (Gaussian, σ), ``"classification"`` (softmax) or
    ``"binary"`` (one logit).

    Returns:
        The NLL of each sample, shape ``(B,)``.

    Raises:
        ValueError: If ``likelihood`` is not one of the three names.
    """
    if likelihood == "regression":
        r = (y.reshape(f.shape) - f) ** 2
        return 0.5 * r.sum(-1) / sigma**2 + 0.5 * f.shape[1] * math.log(2 * math.pi * sigma**2)
    if likelihood == "classification":
        return -torch.log_softmax(f, -1).gather(1, y.long().reshape(-1, 1))[:, 0]
    if likelihood == "binary":
        z = f[:, 0]
        t = y.reshape(-1).to(f.dtype)
        return -(
            t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)
        )
    raise ValueError(f"likelihood must be regression/classification/binary; got {likelihood!r}.")


def dense_output_hessians(likelihood: str, f: Tensor, y: Tensor, sigma: float = 1.0) -> Tensor:
    """Output Hessians Λ_n of the NLL by autograd, shape ``(B, C, C)``."""
    Hs = []
    for n in range(f.shape[0]):
        fn = f[n].detach()
        yn = y[n : n + 1]
        Hs.append(
            torch.autograd.functional.hessian(
                lambda z: nll_per_sample(likelihood, z.unsqueeze(0), yn, sigma).sum(), fn
            )
        )
    return torch.stack(Hs)


def dense_ggn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    likelihood: str,
    *,
    sigma: float = 1.0,
    names: Sequence[str] | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    r""":math:`G = \sum_n J_n^\top \Lambda_n J_n`, shape ``(P, P)``.

    Outputs ``(B, T, C)`` count every position as an observation,
    :math:`G = \sum_{b,t} J_{bt}^\top \Lambda_{bt} J_{bt}`, with targets ``(B, T)`` (or
    ``(B, T, C)`` for regression); targets equal to ``ignore_index`` are left out.

    Returns:
        G, shape ``(P, P)``.
    """
    J = dense_jacobian(model, x, names)
    with torch.no_grad():
        f = model(x)
    f = f.unsqueeze(1) if f.ndim == 1 else f
    C = f.shape[-1]
    J, f = J.reshape(-1, C, J.shape[-1]), f.reshape(-1, C)
    y = y.reshape(f.shape[0], -1)
    if ignore_index is not None and likelihood != "regression":
        keep = (y != ignore_index).all(-1)
        J, f, y = J[keep], f[keep], y[keep]
    Lam = dense_output_hessians(likelihood, f.detach(), y, sigma)
    return torch.einsum("bcp,bcd,bdq->pq", J, Lam, J)


def dense_hessian(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    likelihood: str,
    *,
    sigma: float = 1.0,
    names: Sequence[str] | None = None,
) -> Tensor:
    r"""Exact Hessian of the summed NLL w.r.t. the parameters, shape ``(P, P)``."""
    names, theta = flat_params(model, names)

    def loss(th: Tensor) -> Tensor:
        return nll_per_sample(likelihood, _call_flat(model, names, th, x), y, sigma).sum()

    return torch.autograd.functional.hessian(loss, theta)


def dense_ef(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    likelihood: str,
    *,
    sigma: float = 1.0,
    names: Sequence[str] | None = None,
) -> Tensor:
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top`, shape ``(P, P)``."""
    names, theta = flat_params(model, names)
    grads = []
    for n in range(x.shape[0]):
        g = torch.func.grad(
            lambda th: nll_per_sample(
                likelihood, _call_flat(model, names, th, x[n : n + 1]), y[n : n + 1], sigma
            ).sum()
        )(theta)
        grads.append(g)
    g = torch.stack(grads)
    return g.T @ g


def dense_posterior_covariance(
    curvature: Tensor, prior_diag: Tensor | float, scale: float = 1.0
) -> Tensor:
    r"""Σ = (s·G + Λ₀)⁻¹ by an explicit inverse, shape ``(P, P)``."""
    P = curvature.shape[0]
    prior = torch.as_tensor(prior_diag, dtype=curvature.dtype).expand(P)
    return torch.linalg.inv(scale * curvature + torch.diag(prior))


def check_posterior(
    posterior,
    Sigma: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    n_samples: int = 20000,
    seed: int = 0,
    batch: int = 4,
    outputs: int = 3,
    rank: int | None = None,
) -> None:
    """Run the conformance battery of a posterior against its dense covariance.

    Checks ``to_dense``; ``covariance_matvec`` on ``(P,)`` and ``(P, K)``; ``log_det`` against
    ``-logdet(Σ)``; ``functional_covariance`` against ``einsum("bcp,pq,bdq->bcd")``; seeded
    sample mean and covariance within a statistical tolerance; reproducibility of samples
    under a generator; symmetry and positive semi-definiteness of Σ.  For a posterior
    supported on a subspace (singular Σ of rank ``rank``, such as the projected one),
    ``log_det`` is compared with the log pseudo-determinant of Σ⁺, minus the sum of the logs
    of the ``rank`` largest eigenvalues of Σ, and the samples must lie in the range of Σ.

    Args:
        posterior: Any object of the ``Posterior`` protocol.
        Sigma: Dense reference covariance, shape ``(P, P)``.
        rtol: Relative tolerance of the exact checks.
        atol: Absolute tolerance of the exact checks.
        n_samples: Samples for the statistical checks.
        seed: Seed of the random checks.
        batch: B of the random Jacobians.
        outputs: C of the random Jacobians.
        rank: Rank of Σ when it is singular (``None``: Σ is positive definite).

    Raises:
        AssertionError: If any check fails.
    """
    gen = torch.Generator(device=Sigma.device).manual_seed(seed)
    P = Sigma.shape[0]
    dt, dev = Sigma.dtype, Sigma.device

    def close(a: Tensor, b: Tensor, what: str, rt: float = rtol, at: float = atol) -> None:
        torch.testing.assert_close(a, b, rtol=rt, atol=at, msg=lambda m: f"{what}: {m}")

    dense = posterior.to_dense()
    close(dense, Sigma, "to_dense")
    close(dense, dense.T, "symmetry of Σ")
    assert float(torch.linalg.eigvalsh(Sigma).min()) > -atol, "Σ must be PSD"
    v = torch.randn(P, dtype=dt, device=dev, generator=gen)
    V = torch.randn(P, 3, dtype=dt, device=dev, generator=gen)
    close(posterior.covariance_matvec(v), Sigma @ v, "covariance_matvec (P,)")
    close(posterior.covariance_matvec(V), Sigma @ V, "covariance_matvec (P, K)")
    if rank is None:
        ref_logdet = -torch.logdet(Sigma)
    else:
        ev = torch.linalg.eigvalsh(Sigma)
        ref_logdet = -torch.log(ev[P - rank :]).sum()
    close(posterior.log_det(), ref_logdet, "log_det of the precision", rt=rtol, at=1e-6)
    J = torch.randn(batch, outputs, P, dtype=dt, device=dev, generator=gen)
    close(
        posterior.functional_covariance(J),
        torch.einsum("bcp,pq,bdq->bcd", J, Sigma, J),
        "functional_covariance",
    )
    s1 = posterior.sample(7, generator=torch.Generator(device=dev).manual_seed(seed))
    s2 = posterior.sample(7, generator=torch.Generator(device=dev).manual_seed(seed))
    assert s1.shape == (7, P), f"sample shape: expected (7, {P}), got {tuple(s1.shape)}"
    close(s1, s2, "sample reproducibility under a generator", rt=0, at=0)
    S = posterior.sample(n_samples, generator=gen)
    d = S - posterior.mean
    if rank is not None:
        _, vecs = torch.linalg.eigh(Sigma)
        null = vecs[:, : P - rank]
        off = float((d @ null).abs().max()) if P > rank else 0.0
        scale = float(Sigma.diagonal().max().sqrt())
        assert off <= 1e-8 * scale + atol, f"samples leave the support of Σ by {off:.3g}"
    std = (
        Sigma.diagonal()
        .sqrt()
        .clamp_min(torch.finfo(dt).eps ** 0.5 * float(Sigma.diagonal().max().sqrt()))
    )
    # mean: each coordinate's error is N(0, σ²/n); 6 sigma bound
    bound = 6 * std / math.sqrt(n_samples)
    assert bool((d.mean(0).abs() <= bound + 1e-12).all()), "sample mean far from the posterior mean"
    emp = d.T @ d / n_samples
    corr_err = (emp - Sigma) / torch.outer(std, std)
    # entries of an empirical correlation have sd <= sqrt(2/n); 6 sigma bound
    assert float(corr_err.abs().max()) <= 6 * math.sqrt(2.0 / n_samples), (
        f"sample covariance off by {float(corr_err.abs().max()):.3g} in correlation units"
    )
