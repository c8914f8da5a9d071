r"""The preference probability of pairs under a reward model's Laplace posterior.

For a pair :math:`(x_0, x_1)` the two rewards are jointly Gaussian under the linearised
posterior, :math:`r \sim N(\mu, J\Sigma J^\top)` with :math:`J = [J(x_0); J(x_1)]` (their
covariance matters: a shared feature moves both), and

.. math::
    p(\text{candidate } i \text{ preferred}) = \mathbb E\big[\mathrm{softmax}(r_0, r_1)_i\big],

approximated by the classification links (probit, bridge, Monte Carlo) or averaged over
sampled networks.  :meth:`LaplaceWrapper.predict` gives a single item's reward instead.
"""

from __future__ import annotations

import torch

from ._checks import Likelihood, Link, PredictMethod, check_computed_finite, check_positive_int
from .batches import flatten_items
from .glm import output_covariance
from .likelihoods import Categorical, Prediction
from .predictive import resolve_options, sample_outputs

__all__ = ["predict_preference"]

_PAIR = Categorical()


def predict_preference(
    laplace: object,
    x: object,
    method: str | PredictMethod = "glm",
    *,
    link: str | Link | None = None,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Prediction:
    """Probability that each candidate of a pair is the preferred one, under the posterior.

    Args:
        laplace: A fitted ``LaplaceWrapper`` (or its ``FittedLaplace``) of likelihood
            ``"reward_modeling"``.
        x: Pairs: every input tensor leads with ``(B, 2)``, as in the training batches.
        method: ``"glm"`` (the joint Gaussian of the two rewards through a link) or ``"nn"``.
        link: ``"probit"`` (glm default), ``"bridge"`` or ``"mc"``.
        n_samples: S for ``link="mc"`` and ``method="nn"``.
        generator: Random generator.

    Returns:
        The :class:`~laplace_ggn.likelihoods.Prediction`: ``mean`` ``(B, 2)``, the probability
        that candidate 0 / 1 is preferred (rows sum to 1), and its variance.

    Raises:
        RuntimeError: If ``laplace`` is not fitted.
        ValueError: If its likelihood is not reward modelling, or the options or the pairs are
            invalid.
    """
    fitted = getattr(laplace, "fitted", laplace)
    if fitted is None:
        raise RuntimeError("predict_preference() needs a fitted posterior; call fit() first.")
    if fitted.likelihood.kind is not Likelihood.REWARD_MODELING:
        raise ValueError(
            f"predict_preference() needs likelihood='reward_modeling'; got likelihood "
            f"{fitted.likelihood.name!r}."
        )
    m, lk = resolve_options(_PAIR, method, link)
    check_positive_int(n_samples, "n_samples")
    fitted.model_input(flatten_items(x, 2, "x"), "x")  # each candidate checked as a model input
    x = fitted.reader.to_device(x)
    pairs = fitted.fmodel.with_items(2)
    if m is PredictMethod.NN:
        thetas = fitted.posterior.sample(n_samples, generator=generator)
        pred = _PAIR.sample_predictive(sample_outputs(pairs, thetas, x, n_outputs=2))
    else:
        with torch.no_grad():
            f, cov = output_covariance(pairs, fitted.posterior, x, n_outputs=2)
            pred = _PAIR.glm_predictive(
                f,
                cov,
                link=lk,
                n_samples=n_samples,
                generator=generator,
                memory_budget=pairs.memory_budget,
            )
    check_computed_finite(pred.mean, "preference probability")
    return pred
