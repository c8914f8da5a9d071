"""What goes into and comes out of the user's model: mapping batches, output types, the last
layer, trainable subsets, and validation of the inputs of every read path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import TinyEncoder, make_arch

from laplace_ggn import LaplaceWrapper, jacobians
from laplace_ggn.functional import resolve_subset, split_batch
from laplace_ggn.testing import dense_ggn


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(n: int = 12, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# 'last_layer': the last layer with parameters of its own whose output reaches the output
# ---------------------------------------------------------------------------------------------


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 10)
        self.fc2 = nn.Linear(10, 3)
        self.log_temp = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) / self.log_temp.exp()


def test_last_layer_ignores_root_level_parameters():
    model = _Temperature().double()
    X, y = _data()
    la = LaplaceWrapper(model, structure="diag", subset="last_layer").fit([(X, y)])
    assert la.state_dict()["subset"] == ["fc2.weight", "fc2.bias"]
    assert la.n_params == 33
    arch = make_arch("transformer")  # positional embedding at the root, head last
    assert resolve_subset(arch.model, "last_layer", arch.x_test).names == (
        "head.weight",
        "head.bias",
    )


def test_last_layer_skips_a_layer_whose_output_is_not_used():
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)
            self.probe = nn.Linear(4, 1)  # runs last, but its output is discarded

        def forward(self, x):
            h = torch.tanh(self.body(x))
            out = self.head(h)
            self.probe(h)
            return out

    assert resolve_subset(SideBranch(), "last_layer", torch.randn(2, 3)).names == (
        "head.weight",
        "head.bias",
    )


def test_last_layer_single_layer_model_and_tied_weights():
    class OnlyRoot(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(x @ self.w)

    assert resolve_subset(OnlyRoot(), "last_layer", torch.randn(2, 3)).names == ("w",)
    assert resolve_subset(nn.Linear(3, 2), "last_layer", torch.randn(2, 3)).names == (
        "weight",
        "bias",
    )

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids).mean(1))

    # the head's own names: the alias of the tied weight (its use in the head alone)
    layout = resolve_subset(Tied(), "last_layer", torch.randint(0, 5, (2, 3)))
    assert layout.names == ("out.weight", "out.bias")


class _WeightNormHead(nn.Module):
    def __init__(self, deprecated: bool):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 6)
        norm = nn.utils.weight_norm if deprecated else nn.utils.parametrizations.weight_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation warning of nn.utils.weight_norm
            self.head = norm(nn.Linear(6, 4))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # weight_norm under vmap
@pytest.mark.parametrize("deprecated", [False, True], ids=["parametrizations", "deprecated"])
def test_last_layer_of_a_weight_norm_head_holds_its_parametrised_weight(deprecated):
    # 'last_layer' kept only the head's bias (4 of 32 parameters), silently: the originals of
    # the parametrised weight live in a submodule of the head; the deprecated weight_norm
    # could not be copied at all (its computed weight is not a graph leaf)
    model = _WeightNormHead(deprecated).double()
    X = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(1))
    model(X).sum().backward()  # a forward with autograd, as after training
    model.zero_grad(set_to_none=True)
    names = (
        ("head.bias", "head.weight_g", "head.weight_v")
        if deprecated
        else (
            "head.bias",
            "head.parametrizations.weight.original0",
            "head.parametrizations.weight.original1",
        )
    )
    assert resolve_subset(model, "last_layer", X).names == names
    la = LaplaceWrapper(model, structure="full", subset="last_layer").fit([(X, y)])
    assert la.n_params == 32
    G = dense_ggn(model, X, y, "classification", names=list(names))
    torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-10, atol=1e-12)
    for structure in ("diag", "kfac", "lowrank"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kfac names the blocks it keeps diagonal
            other = LaplaceWrapper(model, structure=structure, subset="last_layer").fit([(X, y)])
        assert other.fitted.layout.names == names
        assert bool(torch.isfinite(other.predict(X).variance).all())


def test_last_layer_refused_when_no_layer_reaches_the_output():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(3, 3)
            self.w = nn.Parameter(torch.randn(3, 2))

        def forward(self, x):
            self.aux(x)
            return x @ self.w

    with pytest.raises(
        ValueError,
        match=r"subset='last_layer' needs a module with trainable parameters of its own whose "
        r"output reaches the model output; the traced forward pass ran the layers \['aux'\], "
        r"none of whose outputs reaches the model output \(root-level parameters \['w'\] never "
        r"count\)\. Pass subset= a list of parameter names\.",
    ):
        resolve_subset(Unused(), "last_layer", torch.randn(2, 3))

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):  # the layer's weights are used, its forward never runs
            return nn.functional.linear(x, self.fc.weight) * self.scale

    with pytest.raises(
        ValueError,
        match=r"the traced forward pass ran no module with trainable parameters of its own "
        r"\(root-level parameters \['scale'\] never count\)",
    ):
        resolve_subset(Direct(), "last_layer", torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# 'trainable': parameters with requires_grad=False are left out
# ---------------------------------------------------------------------------------------------


def test_trainable_alias_leaves_frozen_parameters_out():
    model = _mlp()
    model[0].requires_grad_(False)
    X, y = _data()
    a = LaplaceWrapper(model, structure="full", subset="all").fit([(X, y)])
    t = LaplaceWrapper(model, structure="full", subset="trainable").fit([(X, y)])
    assert a.state_dict()["subset"] == t.state_dict()["subset"] == ["2.weight", "2.bias"]
    torch.testing.assert_close(a.posterior_covariance(), t.posterior_covariance(), rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"got 'trainabel'\. Did you mean 'trainable'\? \('trainable' is an alias"
    ):
        LaplaceWrapper(model, subset="trainabel")


# ---------------------------------------------------------------------------------------------
# Mapping batches
# ---------------------------------------------------------------------------------------------


def test_split_batch_mapping_rules():
    x, m, y = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    # Hugging Face style: every other key is a keyword input
    got_x, got_y = split_batch({"input_ids": x, "attention_mask": m, "labels": y})
    assert set(got_x) == {"input_ids", "attention_mask"} and got_y is y
    assert split_batch({"input": x, "target": y})[0] is x  # single 'input': positional
    assert split_batch({"input": x, "label": y})[1] is y
    assert split_batch({"a": x, "b": m, "y": y}, target_key="y")[0] == {"a": x, "b": m}
    assert split_batch({"inp": x, "lab": y}, input_key="inp", target_key="lab")[0] is x
    with pytest.raises(
        ValueError,
        match=r"mapping batches \(batch 2\) must hold exactly one target key of \['target', "
        r"'labels', 'label'\] when target_key is not set; got keys \['input', 'target', 'labels'\] "
        r"\(several: \['target', 'labels'\]\)\. Set target_key=",
    ):
        split_batch({"input": x, "target": y, "labels": y}, where="batch 2")
    with pytest.raises(
        ValueError, match=r"must hold target_key 'y'; got keys \['input', 'target'\]"
    ):
        split_batch({"input": x, "target": y}, target_key="y")
    with pytest.raises(
        ValueError, match=r"must hold input_key 'x'; got keys \['input', 'target'\]"
    ):
        split_batch({"input": x, "target": y}, input_key="x")
    with pytest.raises(
        ValueError,
        match=r"must hold model inputs besides the targets 'labels'; got keys \['labels'\]",
    ):
        split_batch({"labels": y})


class _Masked(nn.Module):
    """Mean of the unmasked rows: the mask changes the output."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x, mask):
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.l((x * m).sum(1) / m.sum(1))


def _masked_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 4, dtype=torch.long)
    mask[::2, 2:] = 0
    y = torch.randint(0, 2, (8,), generator=g)
    return [{"x": x[i : i + 4], "mask": mask[i : i + 4], "labels": y[i : i + 4]} for i in (0, 4)]


def test_mapping_batches_pass_every_input_to_the_model():
    model = _Masked().double()
    batches = _masked_batches()
    la = LaplaceWrapper(model, structure="full").fit(batches)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    _, f = la.jacobians(inputs)
    torch.testing.assert_close(f, model(**inputs).detach(), rtol=0, atol=0)
    la.optimize_prior_precision("gridsearch", val_loader=batches, n_points=3)
    la2 = LaplaceWrapper(model, structure="full", prior_precision=la.prior_precision).fit(batches)
    pred = la2.predict(inputs)
    assert pred.mean.shape == (4, 2)
    report = la.kernel_decomposition(iter(batches), n_samples=2)  # a loader of mappings
    assert report is not None
    with pytest.raises(
        ValueError,
        match=r"keyword inputs \(batch 0\) must be arguments of _Masked\.forward\(x, mask\); got "
        r"the keys \['inp'\]",
    ):
        LaplaceWrapper(model, structure="diag").fit(
            [{"inp": inputs["x"], "mask": inputs["mask"], "labels": batches[0]["labels"]}]
        )
    with pytest.raises(
        ValueError, match=r"x must hold the model's inputs only; got the target key"
    ):
        la.predict(batches[0])
    with pytest.raises(ValueError, match=r"keyword inputs must be arguments of _Masked\.forward"):
        la.predict({"x": inputs["x"], "mask": inputs["mask"], "extra": inputs["mask"]})


def test_input_key_refuses_inputs_it_would_drop():
    model = _Masked().double()
    la = LaplaceWrapper(model, structure="diag", input_key="x", target_key="labels")
    with pytest.raises(
        ValueError,
        match=r"must hold only input_key 'x' and the targets 'labels' when input_key is set; got "
        r"the other keys \['mask'\], which would be ignored\. Leave input_key unset",
    ):
        la.fit(_masked_batches())
    assert not la.is_fitted


def test_mapping_batches_on_tensor_models_keep_working():
    model = _mlp()
    X, y = _data()
    old = LaplaceWrapper(model, structure="full").fit([{"input": X, "target": y}])
    new = LaplaceWrapper(model, structure="full").fit([(X, y)])
    torch.testing.assert_close(old.posterior_covariance(), new.posterior_covariance())
    state = old.state_dict()
    assert state["input_key"] is None and state["target_key"] is None
    again = LaplaceWrapper.from_state_dict(model, state)
    torch.testing.assert_close(again.predict(X).mean, old.predict(X).mean)


# ---------------------------------------------------------------------------------------------
# Model outputs that are not a tensor
# ---------------------------------------------------------------------------------------------


class _Out:
    def __init__(self, scores):
        self.scores = scores


class _Outputs(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.kind = kind

    def forward(self, x):
        z = self.l(x)
        if self.kind == "tuple":
            return z, x
        if self.kind == "dict":
            return {"logits": z, "hidden": x}
        if self.kind == "attr":
            return type("ModelOutput", (), {"logits": z})()
        return _Out(z)


@pytest.mark.parametrize("kind", ["tuple", "dict", "attr"])
def test_outputs_accepted_by_default(kind):
    torch.manual_seed(0)
    model = _Outputs(kind).double()
    plain = _Outputs("tuple").double()
    plain.load_state_dict(model.state_dict())
    X, y = _data()
    la = LaplaceWrapper(model, structure="full").fit([(X, y)])
    ref = LaplaceWrapper(nn.Sequential(plain.l), structure="full").fit([(X, y)])
    torch.testing.assert_close(la.posterior_covariance(), ref.posterior_covariance())
    torch.testing.assert_close(la.predict(X).mean, ref.predict(X).mean)


def test_output_fn_for_other_outputs_and_its_errors():
    torch.manual_seed(0)
    model = _Outputs("custom").double()
    X, y = _data()
    with pytest.raises(
        TypeError,
        match=r"model output must be a tensor, .* got _Out\. Pass output_fn= \(a callable taking "
        r"the model output and returning the \(B, C\) tensor\)",
    ):
        LaplaceWrapper(model, structure="diag").fit([(X, y)])
    la = LaplaceWrapper(model, structure="diag", output_fn=lambda out: out.scores).fit([(X, y)])
    assert la.predict(X).mean.shape == (12, 3)
    last = LaplaceWrapper(
        model, structure="diag", subset="last_layer", output_fn=lambda out: out.scores
    ).fit([(X, y)])
    assert last.n_params == 12
    again = LaplaceWrapper.from_state_dict(model, la.state_dict(), output_fn=lambda o: o.scores)
    torch.testing.assert_close(again.predict(X).mean, la.predict(X).mean)
    with pytest.raises(TypeError, match=r"output_fn must be callable or None; got str"):
        LaplaceWrapper(model, output_fn="scores")
    with pytest.raises(
        TypeError, match=r"output_fn must return a tensor of shape \(B, C\); got list from a model"
    ):
        LaplaceWrapper(model, structure="diag", output_fn=lambda o: [o.scores]).fit([(X, y)])


# ---------------------------------------------------------------------------------------------
# Inputs of the read paths are validated like fit's; no fast path is lost to a user error
# ---------------------------------------------------------------------------------------------


def test_predict_inputs_validated_and_fast_path_kept(monkeypatch):
    model = _mlp(dtype=torch.float32)
    X, y = _data(dtype=torch.float32)
    la = LaplaceWrapper(model, structure="diag").fit(DataLoader(TensorDataset(X, y), 6))
    before = la.predict(X).mean
    for fn in (la.predict, la.jacobians, la.functional_covariance):
        with pytest.raises(
            ValueError,
            match=r"x must have the model's dtype torch\.float32; got torch\.float64\. Cast the "
            r"data \(x\.to\(torch\.float32\)\)",
        ):
            fn(X.double())
        with pytest.raises(
            ValueError,
            match=r"x must have 2 dimensions \(batch first\) like the training inputs; got shape "
            r"\(3,\)\. Add the batch dimension: x\.unsqueeze\(0\)\.",
        ):
            fn(X[0])
        with pytest.raises(ValueError, match=r"model input must have a leading batch dimension"):
            fn(X[0, 0])
        with pytest.raises(
            ValueError,
            match=r"x must have the structure of the training inputs, tensors at \[''\]; got "
            r"tensors at \['\[0\]', '\[1\]'\]",
        ):
            fn((X, X))
    with pytest.raises(ValueError, match=r"x tensors must share the batch size"):
        la.predict((X, X[:3]))
    with pytest.raises(
        TypeError, match=r"x must be a tensor, a tuple or a dict of tensors; got str"
    ):
        la.predict("abc")
    full = LaplaceWrapper(model, structure="full").fit([(X, y)])
    with pytest.raises(ValueError, match=r"x must have the model's dtype torch\.float32"):
        full.kernel_decomposition(X.double())
    # the batched (vmap) path is still the one used after those errors, and gives the same
    calls = []
    real = jacobians._reverse_jacobian
    monkeypatch.setattr(jacobians, "_reverse_jacobian", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(la.predict(X).mean, before, rtol=0, atol=0)
    assert not calls


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac", "lowrank"])
def test_wrong_feature_width_names_the_expected_and_received_shapes(structure):
    # raw "mat1 and mat2 shapes cannot be multiplied (1x4 and 3x5)" before
    X, y = _data()
    la = LaplaceWrapper(_mlp(), structure=structure).fit([(X, y)])
    wide = torch.randn(2, 4, dtype=torch.float64)
    msg = (
        r"model input must have shape \(B, 3\) like the training inputs \(any batch size B\); "
        r"got \(B, 4\), on which the model raised RuntimeError: "
    )
    steps = {
        "predict": lambda: la.predict(wide),
        "predict bridge": lambda: la.predict(wide, link="bridge"),
        "predict nn": lambda: la.predict(wide, "nn", n_samples=2),
        "functional_covariance": lambda: la.functional_covariance(wide),
        "jacobians": lambda: la.jacobians(wide),
        "gridsearch": lambda: la.optimize_prior_precision(
            "gridsearch", val_loader=[(wide, y[:2])], n_points=2
        ),
    }
    for step in steps.values():
        with pytest.raises(ValueError, match=msg):
            step()
    with pytest.raises(ValueError, match=msg + r"mat1 and mat2 shapes"):
        la.fit([(X, y), (wide, y[:2])])  # a later batch against the first one
    assert torch.equal(
        la.predict(X).mean,
        LaplaceWrapper(_mlp(), structure=structure).fit([(X, y)]).predict(X).mean,
    )
    # several inputs: the one that differs is named by its path
    two = LaplaceWrapper(_TwoInputs().double(), structure=structure).fit(
        [((X, torch.randn(12, 4, dtype=torch.float64)), y % 2)]
    )
    with pytest.raises(
        ValueError, match=r"model input\[1\] must have shape \(B, 4\) .*; got \(B, 5\)"
    ):
        two.predict((X[:2], torch.randn(2, 5, dtype=torch.float64)))


class _Bag(nn.Module):
    def __init__(self, mode: str, padding_idx: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.EmbeddingBag(10, 3, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(3, 3)

    def forward(self, text, offsets=None, per_sample_weights=None):
        return self.head(self.emb(text, offsets, per_sample_weights=per_sample_weights))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # embedding_bag under vmap
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_embedding_bag_with_offsets_refused_naming_the_ways_that_work(mode):
    bags = [[3, 4, 5], [6, 7], [8, 9, 1, 2], [5]]
    flat, offsets = torch.tensor(sum(bags, [])), torch.tensor([0, 3, 5, 9])
    y = torch.tensor([0, 1, 2, 1])
    model = _Bag(mode, padding_idx=0).double()
    with pytest.raises(
        ValueError,
        match=r"input in batch 0 tensors must share the batch size \(first dimension\); got "
        r"\{'\[0\]': 10, '\[1\]': 4\}\. The model has an nn.EmbeddingBag: .* Pass the bags as "
        r"one \(B, L\) tensor instead \(offsets=None\), padded with the layer's padding_idx",
    ):
        LaplaceWrapper(model, structure="diag").fit([((flat, offsets), y)])
    # the ways out the message names give the offsets model's GGN, one bag per sample
    padded = torch.tensor([b + [0] * (4 - len(b)) for b in bags])
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    def f(theta, i):
        return torch.func.functional_call(
            model, theta, (flat[offsets[i] : offsets[i] + len(bags[i])], offsets[:1])
        )[0]

    G = 0
    for i in range(4):
        J = torch.func.jacrev(f)({n: p.detach() for n, p in params.items()}, i)
        J = torch.cat([J[n].reshape(3, -1) for n in names], 1)
        p = torch.softmax(f({n: q.detach() for n, q in params.items()}, i), -1)
        G = G + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    inputs = [padded]
    if mode == "sum":  # any padding index, weights 0 on it
        unpadded = _Bag("sum", padding_idx=None).double()
        unpadded.load_state_dict(model.state_dict())
        inputs.append({"text": padded, "per_sample_weights": (padded != 0).double()})
    for x in inputs:
        net = model if isinstance(x, torch.Tensor) else unpadded
        la = LaplaceWrapper(net, structure="full").fit([(x, y)])
        torch.testing.assert_close(la.posterior.ggn, G, rtol=1e-10, atol=1e-12)
        assert la.predict(x).mean.shape == (4, 3)


def test_integer_and_float_inputs_are_checked_against_training():
    arch = make_arch("transformer")
    la = LaplaceWrapper(arch.model, structure="diag").fit(arch.batches)
    bad = dict(arch.x_test)
    bad["input_ids"] = bad["input_ids"].double()
    with pytest.raises(
        ValueError, match=r"x\['input_ids'\] must be a integer tensor like the training inputs"
    ):
        la.predict(bad)
    with pytest.raises(ValueError, match=r"val_loader input\['attention_mask'\] must have 2"):
        la.optimize_prior_precision(
            "gridsearch",
            val_loader=[
                {
                    **arch.x_test,
                    "attention_mask": arch.x_test["attention_mask"][:, 0],
                    "labels": arch.y[:5],
                }
            ],
        )


def test_user_model_untouched_and_copies_are_independent():
    model = TinyEncoder().double().eval()
    snapshot = copy.deepcopy(model.state_dict())
    arch = make_arch("transformer")
    la = LaplaceWrapper(model, structure="diag").fit(arch.batches)
    la.predict(arch.x_test)
    clone = copy.deepcopy(la)
    torch.testing.assert_close(clone.predict(arch.x_test).mean, la.predict(arch.x_test).mean)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.functional_covariance(arch.x_test)
