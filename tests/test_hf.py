"""Hugging Face models as users have them: tokenizer + collator batches, ModelOutput, LoRA.

Random-init BERT- and GPT-2-style sequence classifiers from tiny configs (no download), a
word-level tokenizer built in code, batches from ``DataCollatorWithPadding``. The user writes
nothing but the model and the loader.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from cases import dense_ggn_of, range_projector, stored_curvature
from torch import nn
from torch.utils.data import DataLoader
from zoo import per_sample_jacobians

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from laplace_ggn import LaplaceWrapper  # noqa: E402
from laplace_ggn.testing import dense_output_hessians  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log red blue big small".split()
N = 8


def _tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def _loader(batch_size: int = 4, seed: int = 0) -> tuple[DataLoader, object]:
    tokenizer = _tokenizer()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (N,), generator=g)
    labels = torch.randint(0, 2, (N,), generator=g)
    rows = []
    for n, label in zip(lengths.tolist(), labels.tolist()):
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        rows.append({**tokenizer(" ".join(WORDS[i] for i in idx)), "label": label})
    collate = transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(rows, batch_size=batch_size, collate_fn=collate), tokenizer


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=len(WORDS) + 2,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=16,
        num_labels=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.GPT2ForSequenceClassification(cfg).double().eval()


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B A`` (scaled), laid out as
    PEFT lays it out (``lora_A`` and ``lora_B`` are bias-free ``nn.Linear`` layers)."""

    def __init__(self, base: nn.Linear, r: int = 2, scale: float = 2.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False).double()
        self.lora_B = nn.Linear(r, base.out_features, bias=False).double()
        nn.init.normal_(self.lora_B.weight, std=0.3)  # non-zero: a trained adapter
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def _bert_lora():
    model = _bert(1).requires_grad_(False)
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        attn.query, attn.value = LoRALinear(attn.query), LoRALinear(attn.value)
    model.classifier.requires_grad_(True)
    return model.eval()


def _all_batches(loader) -> tuple[dict, torch.Tensor]:
    batches = list(loader)
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    x = {k: torch.cat([pad(b[k]) for b in batches]) for k in ("input_ids", "attention_mask")}
    return x, torch.cat([b["labels"] for b in batches])


def _inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _dense_ggn(model, x, y, names):
    J = per_sample_jacobians(model, x, names)
    with torch.no_grad():
        f = model(**x).logits
    return torch.einsum("bcp,bcd,bdq->pq", J, dense_output_hessians("classification", f, y), J)


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_collator_batches_fit_and_predict_without_glue(make):
    model = make()
    loader, _ = _loader()
    la = LaplaceWrapper(model, structure="full", prior_precision=0.5).fit(loader)
    x, y = _all_batches(loader)
    names = la.state_dict()["subset"]
    G = _dense_ggn(model, x, y, names)
    Sigma = torch.linalg.inv(G + 0.5 * torch.eye(la.n_params, dtype=torch.float64))
    torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=1e-6, atol=1e-9)
    batch = next(iter(loader))
    inputs = _inputs(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no slow fallback on the GLM path
        pred = la.predict(inputs)
        J, f = la.jacobians(inputs)
    with torch.no_grad():
        torch.testing.assert_close(f, model(**inputs).logits, rtol=1e-12, atol=1e-12)
    J_ref = per_sample_jacobians(model, inputs, names)
    torch.testing.assert_close(J, J_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        la.functional_covariance(inputs),
        torch.einsum("bcp,pq,bdq->bcd", J_ref, Sigma, J_ref),
        rtol=1e-6,
        atol=1e-9,
    )
    assert pred.mean.shape == (4, 2)
    sampled = la.predict(inputs, "nn", n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampled.mean.sum(-1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("structure", ["diag", "kfac"])
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_structures_and_last_layer(make, structure):
    model = make()
    loader, _ = _loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kfac names its diagonal blocks
        la = LaplaceWrapper(model, structure=structure).fit(loader)
    x, y = _all_batches(loader)
    if structure == "diag":  # GPT-2's Conv1D layers (weights stored transposed) included
        G = _dense_ggn(model, x, y, la.state_dict()["subset"])
        torch.testing.assert_close(
            la.posterior.variance(), 1 / (G.diagonal() + 1), rtol=1e-6, atol=1e-9
        )
    la.optimize_prior_precision(n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())
    inputs = _inputs(next(iter(loader)))
    assert la.predict(inputs).mean.shape == (4, 2)
    head = LaplaceWrapper(model, structure=structure, subset="last_layer").fit(loader)
    expected = ["classifier.weight", "classifier.bias"] if make is _bert else ["score.weight"]
    assert head.state_dict()["subset"] == expected
    if structure == "diag":
        G = _dense_ggn(model, x, y, expected)
        torch.testing.assert_close(
            head.posterior_covariance(),
            torch.linalg.inv(torch.diag(G.diagonal()) + torch.eye(head.n_params, dtype=G.dtype)),
            rtol=1e-6,
            atol=1e-9,
        )
    assert head.predict(inputs, link="bridge").mean.shape == (4, 2)


def test_lora_subset_is_the_adapters_and_the_head():
    model = _bert_lora()
    loader, _ = _loader()
    la = LaplaceWrapper(model, structure="full", subset="trainable").fit(loader)
    names = la.state_dict()["subset"]
    assert all("lora_" in n or n.startswith("classifier.") for n in names)
    assert len(names) == 6
    assert la.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert la.n_params == LaplaceWrapper(model, structure="full").fit(loader).n_params
    x, y = _all_batches(loader)
    G = _dense_ggn(model, x, y, names)
    Sigma = torch.linalg.inv(G + torch.eye(la.n_params, dtype=torch.float64))
    torch.testing.assert_close(la.posterior_covariance(), Sigma, rtol=1e-6, atol=1e-9)
    inputs = _inputs(next(iter(loader)))
    J_ref = per_sample_jacobians(model, inputs, names)
    torch.testing.assert_close(
        la.functional_covariance(inputs),
        torch.einsum("bcp,pq,bdq->bcd", J_ref, Sigma, J_ref),
        rtol=1e-6,
        atol=1e-9,
    )
    low = LaplaceWrapper(model, structure="lowrank", rank=5, subset="trainable").fit(loader)
    assert low.predict(inputs).mean.shape == (4, 2)


def test_input_key_with_other_model_inputs_is_refused():
    model = _bert()
    loader, _ = _loader()
    la = LaplaceWrapper(model, structure="diag", input_key="input_ids", target_key="labels")
    with pytest.raises(
        ValueError,
        match=r"must hold only input_key 'input_ids' and the targets 'labels' when input_key is "
        r"set; got the other keys \['attention_mask'\], which would be ignored",
    ):
        la.fit(loader)
    assert not la.is_fitted
    fitted = LaplaceWrapper(model, structure="diag").fit(loader)
    batch = next(iter(loader))
    with pytest.raises(ValueError, match=r"x must hold the model's inputs only; got the target "):
        fitted.predict(dict(batch))


# ---------------------------------------------------------------------------------------------
# A language model with its output layer tied to the embedding (GPT-2's default)
# ---------------------------------------------------------------------------------------------


def _gpt2_lm(vocab: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=8,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _lm_batches(vocab: int, n: int = 3, T: int = 4, seed: int = 1, batch_size: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    labels = torch.randint(0, vocab, (n, T), generator=g)
    return [(ids[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, n, batch_size)]


def _head_only(model, ids):
    """Logits as a function of the output layer's weight alone (the embedding keeps θ*)."""
    W = model.lm_head.weight.detach().clone()

    def fn(w):
        out = torch.func.functional_call(
            model, {"lm_head.weight": w.view(W.shape)}, (ids,), tie_weights=False
        )
        return out.logits

    return fn, W.reshape(-1)


@pytest.mark.parametrize(
    ("structure", "rank"),
    [("full", None), ("diag", None), ("kfac", None), ("lowrank", None), ("lowrank", 160)],
)
def test_tied_lm_head_last_layer_is_the_head_with_fixed_features(structure, rank):
    model = _gpt2_lm()
    batches = _lm_batches(20)
    la = LaplaceWrapper(model, structure=structure, subset="last_layer", rank=rank).fit(batches)
    assert la.state_dict()["subset"] == ["lm_head.weight"] and la.n_params == 160
    ids = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    fn, w = _head_only(model, ids)
    G = dense_ggn_of(fn, w, "classification", labels)
    if structure == "diag":
        G = torch.diag(G.diagonal())
    elif structure == "kfac":  # the dense form of its own approximation: B ⊗ A of the head
        with torch.no_grad():
            phi = model.transformer(ids).last_hidden_state.reshape(-1, 8)
            p = torch.softmax(fn(w).reshape(-1, 20), -1)
        A = phi.T @ phi
        B = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
        G = torch.kron(B, A)
    torch.testing.assert_close(stored_curvature(la), G, rtol=1e-8, atol=1e-10)
    # predictions come from the head's features: J Σ Jᵀ equals the dense Jacobian's
    x = ids[:2]
    J = torch.func.jacrev(_head_only(model, x)[0])(w).reshape(2, 4, 20, 160)
    Sigma = la.posterior_covariance()
    torch.testing.assert_close(
        la.functional_covariance(x),
        torch.einsum("btcp,pq,btdq->btcd", J, Sigma, J),
        rtol=1e-7,
        atol=1e-10,
    )


def test_tied_lm_head_projected_range_and_state_round_trip():
    model = _gpt2_lm()
    batches = _lm_batches(20, n=1, T=2)  # 40 rows < P = 160: a proper range
    la = LaplaceWrapper(model, structure="projected", subset="last_layer").fit(batches)
    fn, w = _head_only(model, batches[0][0])
    torch.testing.assert_close(
        stored_curvature(la), range_projector(torch.func.jacrev(fn)(w)), rtol=1e-8, atol=1e-10
    )
    full = LaplaceWrapper(model, structure="full", subset="last_layer").fit(_lm_batches(20))
    back = LaplaceWrapper.from_state_dict(model, full.state_dict())
    assert back.fitted.layout.names == ("lm_head.weight",)
    x = batches[0][0]
    torch.testing.assert_close(back.predict(x).mean, full.predict(x).mean, rtol=0, atol=0)
    torch.testing.assert_close(back.posterior_covariance(), full.posterior_covariance())
    # the user's model is still tied and unchanged
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tied_lm_every_use_of_the_canonical_name():
    model = _gpt2_lm()
    batches = _lm_batches(20)
    la = LaplaceWrapper(model, structure="full", subset=["transformer.wte.weight"]).fit(batches)
    ids = torch.cat([x for x, _ in batches])
    W = model.transformer.wte.weight.detach()

    def fn(w):  # tie_weights=True: the embedding and the output layer both use w
        return torch.func.functional_call(
            model, {"transformer.wte.weight": w.view(W.shape)}, (ids,)
        ).logits

    G = dense_ggn_of(
        fn, W.reshape(-1).clone(), "classification", torch.cat([y for _, y in batches])
    )
    torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("structure", ["diag", "kfac", "lowrank"])
def test_tied_lm_head_stays_in_a_small_memory_budget(structure):
    """vocab 200: the head's curvature needs kB; the embedding's Jacobian 10 MB per sample."""
    model = _gpt2_lm(vocab=200)
    batches = _lm_batches(200)
    budget = 2 << 20
    la = LaplaceWrapper(
        model, structure=structure, subset="last_layer", curvature="mc", memory_budget=budget
    )
    la.fit(batches, generator=torch.Generator().manual_seed(0))
    assert la.fitted.layout.names == ("lm_head.weight",)
    x = batches[0][0][:1]  # link='mc' forms (4, 200, 200) covariances: 1.2 MB
    for method, link in (("glm", "probit"), ("glm", "mc"), ("nn", "mc")):
        pred = la.predict(x, method, link=link, n_samples=3)
        torch.testing.assert_close(pred.mean.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dense output covariances J Σ Jᵀ of link='mc' \(8 rows"):
        la.predict(batches[0][0], link="mc")
    la.optimize_prior_precision(n_steps=3)
    wte = ["transformer.wte.weight"]  # every use: one sample's Jacobian is 4·200 x 1,600
    canon = LaplaceWrapper(
        model, structure=structure, subset=wte, curvature="mc", memory_budget=budget
    )
    with (
        warnings.catch_warnings(),
        pytest.raises(
            ValueError,
            match=r"one sample's Jacobian of the parameters \[transformer.wte.weight\] \(M=800 outputs "
            r"x P=1600\) in batch 0 must fit in the memory budget of 0.00195 GB; got 0.00954 GB\. .*"
            r"subset='last_layer'",
        ),
    ):
        warnings.simplefilter("ignore", UserWarning)  # kfac names its diagonal block
        canon.fit(batches, generator=torch.Generator().manual_seed(0))
    assert not canon.is_fitted


def test_tied_lm_predict_is_refused_before_its_jacobian_exceeds_the_budget():
    model = _gpt2_lm(vocab=200)
    batches = _lm_batches(200)
    wte = ["transformer.wte.weight"]
    la = LaplaceWrapper(model, structure="lowrank", subset=wte, curvature="mc", rank=5)
    la.fit(batches, generator=torch.Generator().manual_seed(0))
    state = la.state_dict()
    state["memory_budget"] = 2 << 20
    small = LaplaceWrapper.from_state_dict(model, state)
    with pytest.raises(
        ValueError,
        match=r"one sample's Jacobian J\(x\) \(M=800 outputs x P=1600 parameters\) must fit in "
        r"the memory budget of 0.00195 GB; got 0.00954 GB\. .*pass subset='last_layer'",
    ):
        small.predict(batches[0][0])
    with pytest.raises(ValueError, match=r"one sample's Jacobian \(M=800 outputs x P=1600"):
        small.jacobians(batches[0][0])
    assert la.predict(batches[0][0]).mean.shape == (2, 4, 200)


def test_tied_lm_head_tuning_uses_the_head_within_the_budget():
    model = _gpt2_lm(vocab=200)
    batches = _lm_batches(200)
    la = LaplaceWrapper(
        model, structure="diag", subset="last_layer", curvature="mc", memory_budget=2 << 20
    )
    la.fit(batches, generator=torch.Generator().manual_seed(0))
    # one sample's Jacobian would be 4·200 x 1,600 (10 MB): the head's features are used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the choice may lie on the grid's edge
        la.optimize_prior_precision("gridsearch", val_loader=batches)
    assert la.gridsearch_result_ is not None
    la.optimize_prior_precision("marglik", n_steps=3)
    assert torch.isfinite(la.log_marginal_likelihood())
