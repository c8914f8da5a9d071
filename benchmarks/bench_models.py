"""The model families users fit: CNN with BatchNorm, ResNet, LSTM, GRU, a TransformerEncoder with
a padding mask, Hugging Face BERT and GPT-2 (collator batches), a LoRA-adapted BERT.

For each family: fits (diag, kfac, full where P allows, last layer) and the GLM-probit
predictive (diag, last layer), ours against laplace-torch (its fit / predict with the same structure; where it
fails, the row says why). Ours is called exactly as a user would: the model and the loader
(Hugging Face: the collator's batches, no wrapper). laplace-torch calls ``model(batch)`` on
mapping batches, so its Hugging Face rows use the wrapper its documentation asks for
(``forward(batch) -> logits``). Its GLM predictive is called on chunks of 50 inputs (all 500
at once needed over 19 GB); ours takes all inputs in one call (chunked to its memory budget).

Data: digits (8×8 images; rows as an 8-step sequence for the RNNs), N = 1,297, batch 100,
500 test inputs; token tasks: 512 synthetic sequences of up to 16 tokens with padding,
batch 32, 200 test sequences. Weights are trained for a few seconds (cached on disk).

    python benchmarks/bench_models.py [--quick] [--family NAME]
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
import _ours
import torch
from _harness import OURS, Case, main
from torch import nn
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: laplace-torch's GLM predictive is called on chunks of this many inputs: on all 500 LSTM
#: inputs at once it took over 19 GB and was killed by the OOM killer (its Jacobians back-
#: propagate B·C cotangents through the whole batch).
LT_PREDICT_CHUNK = 50
FULL_MAX_P = 4000  # full GGN (P×P) only up to this (laplace-torch's full on the ResNet took > 8 GB)


# --------------------------------------------------------------------------- models


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.blocks = nn.Sequential(Block(12), Block(12))
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class RNN(nn.Module):
    def __init__(self, cell, hidden=24):
        super().__init__()
        self.rnn = cell(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self, vocab=20, d=32, T=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(T, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, laid out as PEFT lays it out."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class HFLogits(nn.Module):
    """What laplace-torch needs around a Hugging Face model: ``forward(batch) -> logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


# --------------------------------------------------------------------------- data


def token_task(n: int, seed: int):
    """Sequences of 4..16 tokens; label: more 1s than 2s. Mapping rows (a collator pads)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        T = int(torch.randint(4, 17, (1,), generator=g))
        ids = torch.randint(3, 20, (T,), generator=g)
        ids[torch.rand(T, generator=g) < 0.3] = 1
        ids[torch.rand(T, generator=g) < 0.3] = 2
        rows.append({"input_ids": ids, "labels": int((ids == 1).sum() > (ids == 2).sum())})
    return rows


def collate(rows):
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([r["labels"] for r in rows]),
    }


def hf_collator():
    """Hugging Face's own ``DataCollatorWithPadding`` with a word-level tokenizer built here."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, 20)}}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    pad = transformers.DataCollatorWithPadding(tok, return_tensors="pt")
    return lambda rows: pad(
        [{"input_ids": r["input_ids"].tolist(), "labels": r["labels"]} for r in rows]
    )


def train_tokens(model, rows, *, epochs, seed, tag, call):
    import hashlib
    import tempfile

    sig = f"{tag}|{model}|{C.n_params(model)}|{epochs}|{seed}|{len(rows)}"
    path = os.path.join(
        tempfile.gettempdir(), f"laplace_ggn_bench_{hashlib.sha1(sig.encode()).hexdigest()[:16]}.pt"
    )
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    dl = DataLoader(
        rows,
        batch_size=32,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    for _ in range(epochs):
        for b in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(call(model, b), b["labels"]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    return model.eval()


def _split_input(x, size):
    if isinstance(x, dict):
        n = len(x["input_ids"])
        return [{k: v[i : i + size] for k, v in x.items()} for i in range(0, n, size)]
    return list(x.split(size))


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# --------------------------------------------------------------------------- families


def families(args) -> dict:
    """``name -> builder``; a builder returns (model, our loader, our test input,
    laplace-torch model (``None``: not run), its loader, its test input)."""
    quick = args.quick
    n = 300 if quick else C.N_TRAIN
    n_test = 100 if quick else C.N_TEST
    n_tok, n_tok_test = (128, 50) if quick else (512, 200)

    def digits_family(make, name, images=True, epochs=5):
        def build():
            Xtr, ytr, Xte, _ = C.digits(args.seed, images=True)
            if not images:  # rows of the image as an 8-step sequence
                Xtr, Xte = Xtr.reshape(-1, 8, 8), Xte.reshape(-1, 8, 8)
            torch.manual_seed(args.seed)
            model = C.train(make(), Xtr, ytr, epochs=epochs, seed=args.seed, tag=f"models-{name}")
            dl = C.loader(Xtr[:n], ytr[:n], 100)
            return model, dl, Xte[:n_test], model, dl, Xte[:n_test]

        return build

    def encoder():
        rows = token_task(n_tok, args.seed)
        test = collate(token_task(n_tok_test, args.seed + 1))
        torch.manual_seed(args.seed)
        enc = train_tokens(
            Encoder(),
            rows,
            epochs=4,
            seed=args.seed,
            tag="models-encoder",
            call=lambda m, b: m(**_inputs(b)),
        )
        return (
            enc,
            DataLoader(rows, batch_size=32, collate_fn=collate),
            _inputs(test),
            None,
            None,
            None,
        )

    def hf(name):
        def build():
            import transformers

            rows = token_task(n_tok, args.seed)
            dl = DataLoader(rows, batch_size=32, collate_fn=hf_collator())
            test = _inputs(hf_collator()(token_task(n_tok_test, args.seed + 1)))
            torch.manual_seed(args.seed)
            if name == "gpt2":
                model = transformers.GPT2ForSequenceClassification(
                    transformers.GPT2Config(
                        vocab_size=20,
                        n_embd=32,
                        n_layer=2,
                        n_head=4,
                        n_positions=32,
                        num_labels=2,
                        pad_token_id=0,
                        bos_token_id=None,
                        eos_token_id=None,
                    )
                )
            else:
                model = transformers.BertForSequenceClassification(
                    transformers.BertConfig(
                        vocab_size=20,
                        hidden_size=32,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        intermediate_size=64,
                        max_position_embeddings=32,
                        num_labels=2,
                    )
                )
            if name == "bert_lora":
                model.requires_grad_(False)
                for layer in model.bert.encoder.layer:
                    layer.attention.self.query = LoRALinear(layer.attention.self.query)
                    layer.attention.self.value = LoRALinear(layer.attention.self.value)
                model.classifier.requires_grad_(True)
            model = train_tokens(
                model,
                rows,
                epochs=4,
                seed=args.seed,
                tag=f"models-{name}",
                call=lambda m, b: m(**_inputs(b)).logits,
            )
            return model, dl, test, HFLogits(model), dl, test

        return build

    out = {
        "cnn_bn": digits_family(ConvBN, "cnn_bn"),
        "resnet": digits_family(ResNet, "resnet"),
        "lstm": digits_family(lambda: RNN(nn.LSTM), "lstm", images=False, epochs=10),
        "gru": digits_family(lambda: RNN(nn.GRU), "gru", images=False, epochs=10),
        "transformer": encoder,
    }
    try:
        import transformers  # noqa: F401
    except ImportError:
        return out
    out.update({name: hf(name) for name in ("bert", "gpt2", "bert_lora")})
    return out


def extra(p) -> None:
    p.add_argument(
        "--family", default=None, help="only these families, comma-separated (e.g. gru,bert)"
    )


CONV = ("cnn_bn", "resnet")  # laplace-torch's diag fit on convolutions takes minutes


def build(args) -> list[Case]:
    from laplace import Laplace

    fitted: dict = {}

    def lt_fit(m, d, s, sub):
        la = Laplace(m, "classification", subset_of_weights=sub, hessian_structure=s)
        la.fit(d, progress_bar=False)
        return la

    def lt_fitted(key, m, d, s, sub):  # one untimed fit per process for the predict rows
        if key not in fitted:
            fitted[key] = lt_fit(m, d, s, sub)
        return fitted[key]

    cases: list[Case] = []
    for fam, make in families(args).items():
        if args.family and fam not in args.family.split(","):
            continue
        model, dl, x_test, lt_model, lt_dl, lt_test = make()
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_in = len(x_test["input_ids"]) if isinstance(x_test, dict) else len(x_test)
        specs = [("diag", "diag", "all"), ("kfac", "kron", "all")]
        if P <= FULL_MAX_P:
            specs.append(("full", "full", "all"))
        specs.append(("full", "full", "last_layer"))
        for ours_s, lt_s, subset in specs:
            what = ours_s + (", last layer" if subset == "last_layer" else "")
            task = f"{fam} (P={P}) fit {what}"
            slow = fam in CONV and lt_s == "diag"
            if lt_model is not None:
                cases.append(
                    Case(
                        task,
                        f"laplace-torch ({lt_s})",
                        lambda _, s=lt_s, sub=subset, m=lt_model, d=lt_dl: lt_fit(m, d, s, sub),
                        reps=1 if slow else 3,
                        warmup=not slow,
                    )
                )
            # SLOT ours: LaplaceWrapper(model, structure=ours_s, subset=subset).fit(dl)
            cases.append(
                Case(
                    task,
                    "laplace_ggn",
                    lambda _, s=ours_s, sub=subset, m=model, d=dl: _ours.fit(m, d, s, subset=sub),
                    role=OURS,
                    reps=3,
                )
            )
            if (ours_s, subset) not in (("diag", "all"), ("full", "last_layer")):
                continue
            ptask = f"{fam} predict {what} ({n_in} inputs)"
            if lt_model is not None and not slow:
                key = (fam, lt_s, subset)
                cases.append(
                    Case(
                        ptask,
                        f"laplace-torch ({lt_s})",
                        lambda la, xt=lt_test: [
                            la(xc, pred_type="glm", link_approx="probit")
                            for xc in _split_input(xt, LT_PREDICT_CHUNK)
                        ],
                        setup=lambda k=key, s=lt_s, sub=subset, m=lt_model, d=lt_dl: lt_fitted(
                            k, m, d, s, sub
                        ),
                        reps=3,
                        memory=False,
                    )
                )
            # SLOT ours: la.predict(x_test, method="glm", link="probit").mean
            cases.append(
                Case(
                    ptask,
                    "laplace_ggn",
                    lambda la, xt=x_test: _ours.predict_glm_probit(la, xt),
                    setup=lambda s=ours_s, sub=subset, m=model, d=dl: _ours.fit(
                        m, d, s, subset=sub
                    ),
                    role=OURS,
                    reps=3,
                    memory=False,
                )
            )
    return cases


if __name__ == "__main__":
    main(
        "Model families: CNN+BatchNorm, ResNet, LSTM, GRU, TransformerEncoder, Hugging Face "
        "BERT / GPT-2 / LoRA",
        build,
        extra_args=extra,
        script=os.path.abspath(__file__),
    )
