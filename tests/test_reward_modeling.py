"""Reward modelling: pairs for the fit, single items and pairs for the predictive, HF models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_ggn import LaplaceWrapper, predict_preference
from laplace_ggn.links import probit
from laplace_ggn.testing import dense_jacobian

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 2, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (12,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return model, X, y


def _fit(structure="full", **kw):
    model, X, y = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = LaplaceWrapper(model, "reward_modeling", structure=structure, **kw)
        return la.fit(DataLoader(TensorDataset(X, y), batch_size=5)), model, X, y


def test_item_reward_and_pair_preference_use_the_joint_linearised_gaussian():
    la, model, X, y = _fit("full")
    Sigma = la.posterior_covariance()
    items = torch.randn(5, 3, dtype=DT)
    J = dense_jacobian(model, items)
    pred = la.predict(items)
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model(items), **TOL)
    torch.testing.assert_close(pred.variance, torch.einsum("bcp,pq,bcq->bc", J, Sigma, J), **TOL)
    # pairs: the two rewards' joint covariance, through the probit link
    pairs = X[:4]
    Jp = dense_jacobian(model, pairs.reshape(8, 3)).reshape(4, 2, -1)
    cov = torch.einsum("bcp,pq,bdq->bcd", Jp, Sigma, Jp)
    with torch.no_grad():
        f = model(pairs.reshape(8, 3)).reshape(4, 2)
    got = predict_preference(la, pairs)
    want = probit(f, cov)
    torch.testing.assert_close(got.mean, want.mean, **TOL)
    torch.testing.assert_close(got.mean.sum(-1), torch.ones(4, dtype=DT), **TOL)
    mc = predict_preference(
        la, pairs, link="mc", n_samples=3000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(mc.mean, got.mean, rtol=0, atol=0.03)
    nn_pred = predict_preference(
        la.fitted, pairs, "nn", n_samples=20, generator=torch.Generator().manual_seed(0)
    )
    assert nn_pred.mean.shape == (4, 2)


def test_reward_fit_on_last_layer_and_every_structure_and_mc():
    for structure in ("diag", "kfac", "lowrank"):
        la, model, X, y = _fit(structure, subset="last_layer")
        assert la.n_params == 5
        assert la.predict(X[:, 0]).variance.shape == (12, 1)
    la, *_ = _fit("kfac", curvature="mc", n_mc_samples=2)
    la.optimize_prior_precision(n_steps=10)
    assert bool(torch.isfinite(la.log_marginal_likelihood()))


def test_reward_errors():
    la, model, X, y = _fit("diag")
    with pytest.raises(ValueError, match=r"every input tensor in batch 0 must lead with \(B, 2\)"):
        LaplaceWrapper(model, "reward_modeling").fit(
            DataLoader(TensorDataset(X[:, :1].repeat(1, 3, 1), y), batch_size=5)
        )
    with pytest.raises(ValueError, match=r"reward_modeling targets \(batch 0\) must be 0 or 1"):
        LaplaceWrapper(model, "reward_modeling").fit(
            DataLoader(TensorDataset(X, torch.full((12,), 2)), batch_size=5)
        )
    two = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="reward_modeling needs a model with 1 output"):
        LaplaceWrapper(two, "reward_modeling").fit(DataLoader(TensorDataset(X, y), batch_size=5))
    with pytest.raises(ValueError, match="method='gridsearch' scores the predictive of held-out"):
        la.optimize_prior_precision("gridsearch", val_loader=[(X, y)])
    with pytest.raises(ValueError, match="method='marglik_temperature' needs likelihood"):
        la.optimize_prior_precision("marglik_temperature", val_loader=[(X, y)])
    with pytest.raises(
        ValueError, match="predict_preference\\(\\) needs likelihood='reward_modeling'"
    ):
        reg = LaplaceWrapper(nn.Linear(3, 1).double(), "regression", structure="diag")
        reg.fit([(X[:, 0], y.double())])
        predict_preference(reg, X)
    with pytest.raises(RuntimeError, match="predict_preference\\(\\) needs a fitted posterior"):
        predict_preference(LaplaceWrapper(model, "reward_modeling"), X)
    with pytest.raises(ValueError, match=r"every input tensor in x must lead with \(B, 2\)"):
        predict_preference(la, X[:, 0])
    with pytest.raises(ValueError, match="link must be None .* for likelihood='reward_modeling'"):
        la.predict(X[:, 0], link="bridge")
    with pytest.raises(ValueError, match="kernel_decomposition\\(\\) needs a likelihood of one"):
        la.kernel_decomposition(X[:, 0])
    lik = la.fitted.likelihood
    with pytest.raises(
        ValueError, match=r"reward_modeling targets must be the index of the prefer"
    ):
        lik.check_targets(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reward_modeling needs a reward model with outputs"):
        lik.position_targets(torch.zeros(3, 4, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="predicts the rewards of single items"):
        la.fitted.likelihood.predictive_nll(la.predict(X[:, 0]), y)


# ---------------------------------------------------------------------------------------------
# Hugging Face reward models fed by a pair collator
# ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _gpt2_reward(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=12, n_embd=8, n_layer=1, n_head=2, n_positions=16, num_labels=1,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(cfg).double().eval()


def _pair_batches(n: int = 6, batch_size: int = 3):
    """Batches {"input_ids": (B, 2, L), "attention_mask": (B, 2, L), "labels": (B,)}."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        a, b = (
            torch.randint(1, 12, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            for _ in range(2)
        )
        pairs.append((a, b, int(torch.randint(0, 2, (1,), generator=g))))

    def collate(rows):
        L = max(max(len(a), len(b)) for a, b, _ in rows)
        ids = torch.zeros(len(rows), 2, L, dtype=torch.long)
        mask = torch.zeros(len(rows), 2, L, dtype=torch.long)
        for i, (a, b, _) in enumerate(rows):
            for j, t in enumerate((a, b)):
                ids[i, j, : len(t)], mask[i, j, : len(t)] = t, 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([r[2] for r in rows]),
        }

    return DataLoader(pairs, batch_size=batch_size, collate_fn=collate)


def test_hf_reward_model_last_layer_equals_the_dense_pair_ggn():
    model = _gpt2_reward()
    loader = _pair_batches()
    la = LaplaceWrapper(model, "reward_modeling", structure="full", subset="last_layer").fit(loader)
    assert list(la.fitted.layout.names) == ["score.weight"]
    batches = list(loader)
    rows = []
    for b in batches:
        B, _, L = b["input_ids"].shape
        x = {k: b[k].reshape(B * 2, L) for k in ("input_ids", "attention_mask")}
        W = model.score.weight.detach()

        def rewards(w, x=x, B=B):
            out = torch.func.functional_call(model, {"score.weight": w}, kwargs=x).logits
            return out.reshape(B, 2)

        J = torch.func.jacrev(rewards)(W).reshape(B, 2, -1)
        with torch.no_grad():
            p = torch.softmax(rewards(W), -1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        rows.append(torch.einsum("bcp,bcd,bdq->pq", J, H, J))
    torch.testing.assert_close(la.posterior.ggn, sum(rows), **TOL)
    single = {k: v[:, 0] for k, v in batches[0].items() if k != "labels"}
    assert la.predict(single).variance.shape == (3, 1)
    pairs = {k: v for k, v in batches[0].items() if k != "labels"}
    assert predict_preference(la, pairs).mean.shape == (3, 2)


def test_hf_reward_model_all_parameters_kfac_fits_and_predicts():
    la = LaplaceWrapper(_gpt2_reward(), "reward_modeling", structure="kfac", prior_precision=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(_pair_batches())
    batch = next(iter(_pair_batches()))
    single = {k: v[:, 1] for k, v in batch.items() if k != "labels"}
    pred = la.predict(single)
    assert bool((pred.variance > 0).all())
    assert bool(torch.isfinite(la.log_marginal_likelihood()))
