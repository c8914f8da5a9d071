"""Tiny seeded models of the families users fit, their data, and dense references.

Every model is float64, in eval mode after a training-mode pass that gives BatchNorm layers
non-trivial statistics, with at most a few hundred parameters. Inputs are tensors, tuples or
Hugging Face-style mappings. The references are computed another way than the library:
per-sample Jacobians from one plain-autograd backward pass per output of a forward pass of
that single sample, the output Hessians by autograd, KFAC factors from layer inputs and
jacrev through zero offsets added to the layer outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from laplace_ggn.model_io import output_tensor
from laplace_ggn.testing import dense_output_hessians

N_TRAIN, N_TEST, BATCH = 12, 5, 6


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.features(x))


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(2), ResBlock(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(torch.relu(self.stem(x)))).flatten(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyEncoder(nn.Module):
    """Token classifier: embedding + root-level positional parameter + TransformerEncoder."""

    def __init__(self, vocab: int = 7, d: int = 4, T: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        layer = nn.TransformerEncoderLayer(d, 2, 8, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"features": h, "logits": self.head(h)}


class Temperature(nn.Module):
    """Two layers and a free, root-level learned temperature."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.log_temp = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) / self.log_temp.exp()


@dataclass
class Arch:
    """A model, its training batches, test inputs and the subsets the matrix uses."""

    name: str
    model: nn.Module
    batches: list
    x_test: object
    X: object  # all training inputs as one batch
    y: Tensor
    last_layer: tuple[str, ...]
    names: list[str]


def _images(g: torch.Generator, n: int) -> Tensor:
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)


def _tokens(g: torch.Generator, n: int) -> dict[str, Tensor]:
    ids = torch.randint(1, 7, (n, 5), generator=g)
    lengths = torch.randint(2, 6, (n,), generator=g)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _settle(model: nn.Module, x: object) -> nn.Module:
    """One training-mode pass (BatchNorm statistics), then eval mode, float64."""
    model.double().train()
    with torch.no_grad():
        call(model, x)
    return model.eval()


def call(model: nn.Module, x: object):
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def slice_input(x: object, start: int, stop: int) -> object:
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, x)


ARCH_NAMES = ("mlp", "cnn_bn", "resnet", "lstm", "gru", "transformer", "dict_out", "root_param")


def make_arch(name: str, seed: int = 0) -> Arch:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = N_TRAIN + N_TEST
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X = torch.randn(n, 4, generator=g, dtype=torch.float64)
        last, names = ("2.weight", "2.bias"), ["0.bias", "2.weight"]
    elif name == "cnn_bn":
        model, X = ConvBN(), _images(g, n)
        last, names = ("head.weight", "head.bias"), ["features.1.weight", "head.bias"]
    elif name == "resnet":
        model, X = ResNet(), _images(g, n)
        last, names = ("fc.weight", "fc.bias"), ["blocks.1.conv2.weight", "fc.weight"]
    elif name in ("lstm", "gru"):
        model = Recurrent(nn.LSTM if name == "lstm" else nn.GRU)
        X = torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
        last, names = ("head.weight", "head.bias"), ["rnn.weight_hh_l0", "head.bias"]
    elif name == "transformer":
        model, X = TinyEncoder(), _tokens(g, n)
        last = ("head.weight", "head.bias")
        names = ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.linear2.weight"]
    elif name == "dict_out":
        model = DictOut()
        X = torch.randn(n, 4, generator=g, dtype=torch.float64)
        last, names = ("head.weight", "head.bias"), ["body.weight", "head.bias"]
    elif name == "root_param":
        model = Temperature()
        X = torch.randn(n, 4, generator=g, dtype=torch.float64)
        last, names = ("fc2.weight", "fc2.bias"), ["log_temp", "fc2.weight"]
    else:
        raise ValueError(name)
    _settle(model, X)
    y = torch.randint(0, 3, (n,), generator=g)
    X_train, x_test = slice_input(X, 0, N_TRAIN), slice_input(X, N_TRAIN, n)
    y = y[:N_TRAIN]
    batches = []
    for s in range(0, N_TRAIN, BATCH):
        xb, yb = slice_input(X_train, s, s + BATCH), y[s : s + BATCH]
        batches.append({**xb, "labels": yb} if isinstance(xb, dict) else (xb, yb))
    return Arch(name, model, batches, x_test, X_train, y, last, names)


# ---------------------------------------------------------------------------------------------
# Dense references
# ---------------------------------------------------------------------------------------------


def _param_names(model: nn.Module, names) -> list[str]:
    params = dict(model.named_parameters())
    if names is None:
        return [n for n, p in params.items() if p.requires_grad]
    wanted = set(names)
    return [n for n in params if n in wanted]


def per_sample_jacobians(model: nn.Module, x: object, names=None, output_fn=None) -> Tensor:
    """``(B, C, P)``: for each sample, a forward pass of it alone and C backward passes."""
    names = _param_names(model, names)
    base = dict(model.named_parameters())
    B = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    rows = []
    for i in range(B):
        leaves = {n: base[n].detach().clone().requires_grad_(True) for n in names}
        xi = slice_input(x, i, i + 1)
        with torch.enable_grad():
            kwargs = xi if isinstance(xi, dict) else {}
            args = () if isinstance(xi, dict) else (xi,)
            f = output_tensor(functional_call(model, leaves, args, kwargs), output_fn)[0]
            Ji = []
            for c in range(f.shape[0]):
                gs = torch.autograd.grad(f[c], list(leaves.values()), retain_graph=True)
                Ji.append(torch.cat([g.reshape(-1) for g in gs]))
        rows.append(torch.stack(Ji))
    return torch.stack(rows).detach()


def outputs(model: nn.Module, x: object, output_fn=None) -> Tensor:
    with torch.no_grad():
        return output_tensor(call(model, x), output_fn)


def dense_ggn_of(arch: Arch, names=None) -> Tensor:
    J = per_sample_jacobians(arch.model, arch.X, names)
    Lam = dense_output_hessians("classification", outputs(arch.model, arch.X), arch.y)
    return torch.einsum("bcp,bcd,bdq->pq", J, Lam, J)


def _layer_io(model: nn.Module, module: nn.Module, x: object):
    """Inputs of ``module`` and d f / d (its output) per sample (jacrev of a zero offset)."""
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.update(a=i[0].detach(), z=o.detach()))
    with torch.enable_grad():  # parameters requiring grad: no fused fast paths
        call(model, x)
    h.remove()
    if "z" not in store:
        return None

    def run(delta):
        h2 = module.register_forward_hook(lambda m, i, o: o + delta)
        try:
            return output_tensor(call(model, x))
        finally:
            h2.remove()

    with torch.enable_grad():
        Jz = torch.func.jacrev(run)(torch.zeros_like(store["z"]))
    N = Jz.shape[0]
    return store["a"], torch.stack([Jz[n, :, n] for n in range(N)]).detach()


def _runs(model: nn.Module, module: nn.Module, x: object) -> int:
    count = [0]
    h = module.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    with torch.enable_grad():
        call(model, x)
    h.remove()
    return count[0]


def _patches(a: Tensor, conv: nn.Conv2d) -> Tensor:
    """Patches ``(N, T, Cin·kh·kw)`` by explicit loops."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    ap = torch.nn.functional.pad(a, (pw, pw, ph, ph))
    N, _, H, W = ap.shape
    rows = [
        ap[:, :, i : i + kh, j : j + kw].reshape(N, -1)
        for i in range(0, H - kh + 1)
        for j in range(0, W - kw + 1)
    ]
    return torch.stack(rows, dim=1)


def dense_kfac_of(arch: Arch, names=None) -> Tensor:
    """KFAC in flat order: ``kron(B, A)`` per Linear / Conv2d layer run once per forward pass,
    the exact GGN diagonal for every other parameter."""
    model, x = arch.model, arch.X
    params = dict(model.named_parameters())
    names = _param_names(model, names)
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += params[n].numel()
    Lam = dense_output_hessians("classification", outputs(model, x), arch.y)
    G = torch.diag(dense_ggn_of(arch, names).diagonal())
    for mname, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        pre = f"{mname}." if mname else ""
        wn, bn = pre + "weight", pre + "bias"
        has_w, has_b = wn in names, m.bias is not None and bn in names
        if not (has_w or has_b) or _runs(model, m, x) != 1:
            continue
        a, Jz = _layer_io(model, m, x)
        N = Jz.shape[0]
        if isinstance(m, nn.Conv2d):
            a, Jz = _patches(a, m), Jz.flatten(3).transpose(2, 3)
        elif a.ndim == 2:
            a, Jz = a.unsqueeze(1), Jz.unsqueeze(2)
        T = a.shape[1]
        ones = torch.ones(N, T, 1, dtype=a.dtype)
        at = torch.cat(([a] if has_w else []) + ([ones] if has_b else []), -1)
        A = torch.einsum("ntd,nte->de", at, at)
        Bf = torch.einsum("ncto,ncd,ndtp->op", Jz, Lam, Jz) / (N * T)
        O, D = Bf.shape[0], A.shape[0]
        In = D - has_b
        idx = torch.empty(O, D, dtype=torch.long)
        for o in range(O):
            if has_w:
                idx[o, :In] = offsets[wn] + o * In + torch.arange(In)
            if has_b:
                idx[o, In] = offsets[bn] + o
        idx = idx.reshape(-1)
        G[idx[:, None], idx[None, :]] = torch.kron(Bf, A)
    return G


def top_k(G: Tensor, k: int) -> Tensor:
    """The best rank-k approximation of a PSD matrix (its top-k eigenpairs)."""
    lam, U = torch.linalg.eigh(G)
    return (U[:, -k:] * lam[-k:]) @ U[:, -k:].T
