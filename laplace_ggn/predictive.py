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
- ``bridge_norm`` (laplace-torch's normalised bridge): the bridge of the projected Gaussian
  rescaled to a mean variance of :math:`\sqrt{C/2}`.
- ``mc``: S draws :math:`f_s = \mu + L z_s`, :math:`L L^\top = J \Sigma J^\top`, independent
  for every input; mean of the softmax / sigmoid.

NN: :math:`\theta_s \sim N(\theta_*, \Sigma)`, the network is evaluated at every sample with
:func:`torch.func.functional_call` (vectorised over samples with :func:`torch.func.vmap`
where the model allows), and the likelihood's prediction is averaged.

Every predictive returns a :class:`Prediction` with ``mean`` and ``variance`` of shape
``(B, C)`` (``(B, T, C)`` for a model with outputs ``(B, T, C)``: every position is its own
Gaussian over C logits).  Regression: ``variance`` is the variance of y (functional variance + σ²).
Classification: ``variance`` is the variance of the class probability under the posterior:
the sample variance for ``mc`` and ``nn``, the Dirichlet variance for the bridges, and the
delta-method value :math:`\mathrm{diag}(A \Sigma_f A^\top)`, :math:`A = \mathrm{diag}(s) - s s^\top`,
:math:`s = \mathrm{softmax}(\mu)`, capped at :math:`\bar p(1 - \bar p)`, for ``probit``.

Probit, the bridges and the regression variance need only :math:`\mathrm{diag}(\Sigma_f)`, the
row sums :math:`\Sigma_f 1` and one product :math:`\Sigma_f v` per input, so they take the
output covariances in any factored form of :mod:`laplace_ggn.posteriors._output` (O(C²) per
input at most); for a Linear head
(:class:`~laplace_ggn.head.LinearHead`) these come from the features, without Jacobians.

The GLM predictive is computed in :mod:`laplace_ggn.glm`, the links are in
:mod:`laplace_ggn.links` (their public names are available here too); each likelihood of :mod:`laplace_ggn.likelihoods`
maps outputs and their covariances to its predictive.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.func import vmap

from ._autodiff import cannot_transform
from ._checks import (
    Likelihood,
    Link,
    PredictMethod,
    as_enum,
    check_computed_finite,
    check_generator,
    check_memory,
    check_positive_int,
)
from .functional import batch_size_of, split_batch
from .glm import functional_moments, glm_from_moments, glm_predictive, output_covariance
from .likelihoods import Bernoulli, Categorical, LikelihoodModel, Prediction, get_likelihood
from .links import laplace_bridge, mc_link, probit, psd_sqrt

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

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def resolve_options(
    likelihood: Likelihood | str | LikelihoodModel,
    method: str | PredictMethod,
    link: str | Link | None,
) -> tuple[PredictMethod, Link | None]:
    """Convert and check the ``method`` / ``link`` pair for a likelihood.

    ``link=None`` means ``probit`` for ``glm`` and ``mc`` for ``nn``.  Regression has no link:
    ``None`` and the default ``"probit"`` are accepted and ignored, other links raise.

    Args:
        likelihood: The likelihood (option or object).
        method: ``"glm"`` or ``"nn"``.
        link: ``"probit"``, ``"bridge"``, ``"bridge_norm"``, ``"mc"`` or ``None``.

    Returns:
        ``(method, link)``; the link is ``None`` for regression.

    Raises:
        ValueError: If an option is unknown or the combination is invalid (the message lists
            the valid ones).
    """
    m = as_enum(PredictMethod, method, "method")
    lk = None if link is None else as_enum(Link, link, "link")
    return get_likelihood(likelihood).check_link(m, lk)


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
        entered = [False]

        def f(theta: Tensor) -> Tensor:
            entered[0] = True
            return fmodel(theta, x)

        try:
            return vmap(f)(thetas)
        except Exception as err:  # noqa: BLE001 -- the model's own errors are re-raised
            if not cannot_transform(err, entered=entered[0]):
                raise
            # the model cannot run under vmap (data-dependent control flow, in-place updates
            # of unbatched tensors): once per sample; warned once that loop has run, so that
            # an error of the model itself (raised again by it) comes without the warning
            call["vmap"] = False
            out = torch.stack([fmodel(t, x) for t in thetas])
            warnings.warn(
                f"vmap over parameter samples failed ({type(err).__name__}: {str(err)[:120]}); "
                "evaluating the network once per sample.",
                RuntimeWarning,
                stacklevel=4,
            )
            return out
    return torch.stack([fmodel(t, x) for t in thetas])


def nn_predictive(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood | LikelihoodModel,
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

    Raises:
        ValueError: If the S parameter draws ``(S, P)`` or the outputs ``(S, B, M)`` exceed
            ``fmodel.memory_budget`` (checked before they are formed).
    """
    S = check_positive_int(n_samples, "n_samples")
    P, elt, budget = fmodel.n_params, fmodel.theta.element_size(), fmodel.memory_budget
    hint = "Pass fewer n_samples (or inputs per call), or raise memory_budget=."
    check_memory(S * P * elt, budget, f"the {S} parameter draws of method='nn' (P={P})", hint)
    B = batch_size_of(x)
    if B:
        M = fmodel.forward(next(iter(fmodel.chunks(x, 1))))[0].numel()
        check_memory(
            S * B * M * elt,
            budget,
            f"the outputs of method='nn' ({S} draws x {B} inputs x M={M})",
            hint,
        )
    thetas = posterior.sample(S, generator=generator)
    out = sample_outputs(fmodel, thetas, x, n_outputs=n_outputs)
    return get_likelihood(likelihood).sample_predictive(out, sigma_noise)


# ---------------------------------------------------------------------------------------------
# Entry point and scoring
# ---------------------------------------------------------------------------------------------


def predict(
    fmodel,
    posterior,
    x: object,
    *,
    likelihood: Likelihood | LikelihoodModel,
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
        link: ``"probit"``, ``"bridge"``, ``"bridge_norm"``, ``"mc"`` or ``None`` (probit for
            glm, mc for nn).
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
    lik = get_likelihood(likelihood)
    m, lk = resolve_options(lik, method, link)
    check_positive_int(n_samples, "n_samples")
    check_generator(generator)
    kw = {
        "likelihood": lik,
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


def predictive_nll(pred: Prediction, y: Tensor, likelihood: Likelihood | LikelihoodModel) -> Tensor:
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
    return get_likelihood(likelihood).predictive_nll(pred, y)


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
    lik = Bernoulli() if binary else Categorical()
    return lik.temper(pred, temperature)


def batches_of(
    loader: Iterable, *, input_key: str, target_key: str
) -> Iterable[tuple[object, Tensor]]:
    """Yield ``(x, y)`` from a loader of pairs or mappings."""
    for i, batch in enumerate(loader):
        yield split_batch(batch, input_key=input_key, target_key=target_key, where=f"batch {i}")
