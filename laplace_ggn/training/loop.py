r"""Training with the Laplace evidence: the network, its prior precision and σ / T together.

:func:`marglik_training` is Algorithm 1 of Immer et al. (ICML 2021, "Scalable marginal
likelihood estimation for model selection in deep learning"): the network is trained on

.. math::
    \mathcal L(\theta) = N\cdot\overline{\mathrm{NLL}}(\theta)
    + \tfrac12(\theta-\theta_0)^\top\mathrm{diag}(\delta)(\theta-\theta_0)

(divided by N for the optimiser, so that learning rates are those of a mean loss) with the
current prior precision δ as its weight decay, and every ``marglik_frequency`` epochs after
the burn-in the Laplace posterior is refitted at the current weights and the hyperparameters
take ``n_hypersteps`` Adam steps up its evidence (:mod:`.hyper`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import Likelihood, as_enum, is_integer
from ..distributed import resolve_distributed
from ..layout import resolve_subset
from ..posteriors import PriorKind
from ..wrapper import LaplaceWrapper
from .data import Ranks, TrainingData
from .hyper import HyperState, TemperatureTerm
from .result import MarglikHistory, MarglikTrainingResult

__all__ = ["marglik_training"]

_PROGRESS_MIN_STEPS = 200


def _check_count(value: object, name: str, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _make_optimizer(optimizer: object, kwargs: dict | None, params: list[Tensor]):
    """The network's optimiser: a constructed one, or a class / factory called on the parameters."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if kwargs:
            raise ValueError(
                "optimizer_kwargs apply to an optimizer class or factory; got them with a "
                f"constructed {type(optimizer).__name__}. Pass the class, or leave them out."
            )
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(params, **(kwargs or {}))
    else:
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, its class, or a callable taking the "
            f"parameters; got {type(optimizer).__name__}."
        )
    decay = [g.get("weight_decay", 0) for g in opt.param_groups]
    if any(decay):
        raise ValueError(
            f"optimizer must have weight_decay=0; got weight_decay={max(decay)}. The prior "
            "precision learned by the evidence is the weight decay of marglik_training."
        )
    return opt


def _make_scheduler(scheduler: object, opt):
    if scheduler is None or hasattr(scheduler, "step"):
        return scheduler
    if callable(scheduler):
        return scheduler(opt)
    raise TypeError(
        "scheduler must be None, a learning-rate scheduler, or a callable taking the optimizer; "
        f"got {type(scheduler).__name__}."
    )


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str | Likelihood = "classification",
    *,
    structure: str = "kfac",
    prior_structure: str | PriorKind = "layerwise",
    n_epochs: int = 100,
    optimizer: Callable | torch.optim.Optimizer = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    scheduler: object = None,
    lr_hyper: float = 0.1,
    n_epochs_burnin: int = 10,
    marglik_frequency: int = 5,
    n_hypersteps: int = 50,
    tune_sigma_noise: bool = True,
    tune_temperature: bool = True,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
    process_group: object = None,
    **laplace_options: object,
) -> MarglikTrainingResult:
    r"""Train a network and learn its prior precision (and σ or T) by the Laplace evidence.

    .. math::
        \min_\theta\; N\cdot\overline{\mathrm{NLL}}(\theta) + \tfrac12\theta^\top
        \mathrm{diag}(\delta)\theta, \qquad
        \max_{\delta, \sigma, T}\; \log p(\mathcal D \mid \delta, \sigma, T)
        \approx -\ell(\theta_*) - \tfrac12\theta_*^\top\Lambda_0\theta_*
        - \tfrac12\log|\Lambda| + \tfrac12\log|\Lambda_0|.

    The learned T is the temperature of the likelihood ``softmax(f / T)`` (``sigmoid(f / T)``
    binary): the network is trained on it, and ``result.laplace`` holds it as
    ``logit_temperature`` (its curvature, evidence and predictive are those of f / T, saved by
    ``state_dict``).  With a per-tensor prior T is interchangeable with the last layer's prior
    scale (``docs/marglik-training.md``).

    Args:
        model: The network (trained in place; a ``DistributedDataParallel`` module is trained
            through DDP and its ``.module`` fitted).
        train_loader: Re-iterable batches of every kind ``LaplaceWrapper.fit`` accepts.
        likelihood: ``"regression"``, ``"classification"`` or ``"binary"``.
        structure: The posterior's structure (``"kfac"``, ``"diag"``, ``"full"``, ...).
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"`` δ.
        n_epochs: Epochs over ``train_loader``.
        optimizer: The network's optimiser: its class or a factory ``params -> Optimizer``
            (``weight_decay`` must be 0), or a constructed optimiser.
        optimizer_kwargs: Keyword arguments of the class / factory (e.g. ``{"lr": 1e-3}``).
        scheduler: ``None``, a scheduler, or a factory ``optimizer -> scheduler``; stepped
            once per epoch.
        lr_hyper: Adam's learning rate on the log hyperparameters.
        n_epochs_burnin: Epochs before the first refit.
        marglik_frequency: Refit every this many epochs (and after the last).
        n_hypersteps: Adam steps on the evidence per refit.
        tune_sigma_noise: Learn σ (regression).
        tune_temperature: Learn T (classification, binary).
        progress: Show a tqdm bar over the epochs (``None``: for 200 batches or more).
        generator: Random generator of the refits' ``curvature="mc"`` draws.
        distributed: Each rank trains on its shard; gradients are averaged (unless the model
            is DDP) and the refits reduce over ranks (``None``: if initialised).
        process_group: Group of the distributed run.
        **laplace_options: Options of the refits' ``LaplaceWrapper`` (``subset``,
            ``curvature="mc"``, ``input_key``, ``output_fn``, ...); ``prior_precision``,
            ``sigma_noise`` and ``logit_temperature`` give the starting values, ``prior_mean``
            (a tensor) centres the weight decay.

    Returns:
        The :class:`MarglikTrainingResult`: ``.model``, ``.laplace``, ``.history``.

    Raises:
        ValueError: If an option is invalid (named), the data is empty or malformed, or the
            structure refuses the prior structure.
        TypeError: If an option has the wrong type.
        RuntimeError: If the evidence becomes non-finite.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> x = torch.linspace(-2, 2, 64).unsqueeze(1)
        >>> data = DataLoader(TensorDataset(x, torch.sin(2 * x) + 0.3 * torch.randn_like(x)), 16)
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> res = marglik_training(net, data, "regression", n_epochs=4, n_epochs_burnin=0,
        ...                        marglik_frequency=2, n_hypersteps=5, optimizer_kwargs={"lr": 1e-2})
        >>> res.history.loss.shape, res.laplace.is_fitted
        (torch.Size([4]), True)
    """
    n_epochs = _check_count(n_epochs, "n_epochs", 1)
    n_epochs_burnin = _check_count(n_epochs_burnin, "n_epochs_burnin", 0)
    marglik_frequency = _check_count(marglik_frequency, "marglik_frequency", 1)
    n_hypersteps = _check_count(n_hypersteps, "n_hypersteps", 0)
    if isinstance(lr_hyper, bool) or not isinstance(lr_hyper, (int, float)) or not lr_hyper > 0:
        raise ValueError(f"lr_hyper must be a float > 0; got {lr_hyper!r}.")
    kind = as_enum(PriorKind, prior_structure, "prior_structure")
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    proto = LaplaceWrapper(net, likelihood, structure=structure, **laplace_options)
    fo, hp0 = proto._options, proto.hyperparameters
    if fo.structure == "projected":
        raise ValueError(
            "structure must have a finite curvature to train with the evidence; got "
            "structure='projected', whose evidence counts the range of the training Jacobian "
            "as infinitely curved and does not weigh the weight decay against the fit. Use "
            "'kfac', 'diag', 'full' or 'lowrank'."
        )
    if hp0.prior_base is not None:
        raise ValueError(
            "prior_mean of marglik_training must be a tensor of shape (P,); got a fitted wrapper. "
            "Train with the penalty -la.log_prob(theta) instead (docs/continual.md)."
        )
    lik = fo.likelihood_model
    tune_sigma_noise = bool(tune_sigma_noise) and lik.has_noise
    tune_temperature = bool(tune_temperature) and lik.predicts_probabilities
    dctx = resolve_distributed(distributed, process_group)
    ranks = None if dctx is None else Ranks(dctx)
    data = TrainingData(train_loader, fo, ranks)
    layout = proto._layout
    if layout is None:  # "last_layer": traced on a private eval-mode copy, as fit does
        x0 = next(iter(data.batches()), (None,))[0]
        layout = resolve_subset(copy.deepcopy(net).eval(), fo.subset, x0, fo.user_output_fn)
    hyper = HyperState(
        kind, layout, hp0.prior_precision, hp0.sigma_noise, fo.logit_temperature,
        tune_sigma_noise=tune_sigma_noise, tune_temperature=tune_temperature, lr=float(lr_hyper),
    )  # fmt: skip
    fo.spec.check_prior(hp0.prior(layout, hyper.prior_precision))
    named = dict(net.named_parameters())
    subset = [named[n] for n in layout.names]
    opt = _make_optimizer(optimizer, optimizer_kwargs, list(model.parameters()))
    sched = _make_scheduler(scheduler, opt)
    was_training = model.training
    try:
        model.eval()  # counting reads the data once: no BatchNorm statistics are updated
        N = data.count(net)
        learned = ("prior_precision", "sigma_noise", "logit_temperature")
        options = {k: v for k, v in laplace_options.items() if k not in learned}
        options.update(structure=structure, subset=list(layout.names))

        def refit(temperature: float) -> LaplaceWrapper:
            la = LaplaceWrapper(
                net, likelihood, prior_precision=hyper.prior_precision,
                sigma_noise=hyper.sigma_noise if lik.has_noise else 1.0,
                logit_temperature=temperature, **options,
            )  # fmt: skip
            return la.fit(
                train_loader, progress=False, generator=generator, distributed=distributed,
                process_group=process_group,
            )  # fmt: skip

        try:
            n_batches = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        show = (
            progress if progress is not None else (n_batches or 0) * n_epochs >= _PROGRESS_MIN_STEPS
        )
        show = bool(show) and (ranks is None or ranks.rank == 0)
        rows, marglik_epochs, la = [], [], None
        theta0 = hp0.prior_mean
        with tqdm(range(1, n_epochs + 1), disable=not show, desc="marglik training") as bar:
            for epoch in bar:
                model.train()
                T, sigma = hyper.temperature, hyper.sigma_noise
                delta = hp0.prior(layout, hyper.prior_precision).diag()
                losses = []
                for x, y, where in data.batches(checked=False):
                    nll, n = data.nll(model, x, y, where, sigma=sigma, temperature=T)
                    if n == 0:
                        continue
                    theta = torch.cat([p.reshape(-1) for p in subset])
                    d = theta if theta0 is None else theta - theta0
                    loss = nll / n + 0.5 * (delta * d * d).sum() / N
                    opt.zero_grad()
                    loss.backward()
                    if ranks is not None and net is model:
                        ranks.average_gradients(list(model.parameters()))
                    opt.step()
                    losses.append(float(loss.detach()))
                if sched is not None:
                    sched.step()
                evidence = math.nan
                if epoch >= n_epochs_burnin and (
                    epoch % marglik_frequency == 0 or epoch == n_epochs
                ):
                    la = refit(T)
                    term = None
                    if tune_temperature:
                        temps = T * torch.exp(TemperatureTerm.offsets(torch.float64))
                        with torch.no_grad():
                            model.eval()
                            values = data.nll_at_temperatures(net, temps)
                        term = TemperatureTerm(math.log(T), values)
                    evidence = hyper.ascend(la.fitted, term, n_hypersteps)
                    marglik_epochs.append(epoch)
                rows.append(
                    {
                        "loss": sum(losses) / max(len(losses), 1),
                        "log_evidence": evidence,
                        "prior_precision": hyper.prior_precision,
                        "sigma_noise": hyper.sigma_noise if lik.has_noise else 1.0,
                        "temperature": hyper.temperature,
                    }
                )
                if not math.isnan(evidence):
                    bar.set_postfix(loss=f"{rows[-1]['loss']:.4g}", evidence=f"{evidence:.4g}")
    finally:
        model.train(was_training)
    if la is None or hyper.temperature != la.logit_temperature:
        la = refit(hyper.temperature)  # the curvature of the final T
    la.set_hyperparameters(
        prior_precision=hyper.prior_precision,
        sigma_noise=hyper.sigma_noise if lik.has_noise else None,
    )
    if not marglik_epochs:
        warnings.warn(
            f"marglik_training never refitted the posterior: n_epochs={n_epochs} ends before "
            f"the burn-in of n_epochs_burnin={n_epochs_burnin}; the hyperparameters are the "
            "starting ones.",
            UserWarning,
            stacklevel=2,
        )
    return MarglikTrainingResult(model, la, MarglikHistory.from_rows(rows, marglik_epochs))
