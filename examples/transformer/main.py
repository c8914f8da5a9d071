r"""A small transformer trained on a synthetic sentiment task, then its Laplace predictive.

The task: sequences of 6 to 24 tokens, padded, with an attention mask, from a vocabulary of
"positive" words, "negative" words and neutral filler. The label is 1 when the positive words
outnumber the negative ones (ties excluded), flipped for 10 % of the sequences (label
noise, in training and test data alike). Out-of-distribution inputs are sequences of filler only, where the right
answer is "don't know".

The model is a random-init ``nn.TransformerEncoder`` (2 layers, d = 32, 4 heads) with a
learned positional parameter at the root and a mean-pooled linear head, trained with Adam on
mapping batches ``{"input_ids", "attention_mask", "labels"}`` as a collator makes them. The
Laplace posterior takes the model and the same loader and nothing else:

    la = LaplaceWrapper(model, "classification", structure="kfac").fit(train_loader)
    la.optimize_prior_precision()
    la.predict({"input_ids": ..., "attention_mask": ...})

and the same with ``subset="last_layer"`` (the head; ``structure="full"``). The script prints
accuracy, NLL and ECE of the MAP network and both Laplace predictives on held-out data, the
mean confidence on the out-of-distribution sequences, and draws a reliability diagram and the
confidence histograms (``transformer_calibration.png``).

Run:  python examples/transformer/main.py --out OUT_DIR [--small] [--seed N]
(about a minute on a CPU; ``--small`` a few seconds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import DataLoader

from laplace_ggn import LaplaceWrapper
from laplace_ggn import calibration as cal
from laplace_ggn.plots import ConfidenceHistogramDisplay, ReliabilityDisplay

VOCAB, MAX_LEN = 32, 24
POSITIVE, NEGATIVE = range(2, 8), range(8, 14)  # 0: padding; 1: unused; 14..31: filler


class SentimentEncoder(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d, padding_idx=0)
        self.pos = nn.Parameter(0.02 * torch.randn(MAX_LEN, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def sequences(n: int, g: torch.Generator, *, noise: float = 0.0, ood: bool = False) -> list:
    """``n`` rows ``{"input_ids": (T,), "labels": int}``."""
    rows = []
    while len(rows) < n:
        T = int(torch.randint(6, MAX_LEN + 1, (1,), generator=g))
        ids = torch.randint(14, VOCAB, (T,), generator=g)
        if not ood:
            k = int(torch.randint(1, T // 2 + 1, (1,), generator=g))
            where = torch.randperm(T, generator=g)[:k]
            sentiment = torch.randint(2, 14, (k,), generator=g)
            ids[where] = sentiment
            pos = int(sum(int(t) in POSITIVE for t in sentiment))
            if 2 * pos == k:
                continue  # ties have no label
            label = int(2 * pos > k)
            if torch.rand((), generator=g) < noise:
                label = 1 - label
        else:
            label = int(torch.randint(0, 2, (), generator=g))
        rows.append({"input_ids": ids, "labels": label})
    return rows


def collate(rows: list) -> dict:
    """Pad to the longest sequence: the batch a tokenizer's collator gives."""
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


def train(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            logits = model(batch["input_ids"], batch["attention_mask"])
            nn.functional.cross_entropy(logits, batch["labels"]).backward()
            opt.step()
    model.eval()


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    return {
        "accuracy": float(cal.accuracy(probs, labels)),
        "nll": float(cal.negative_log_likelihood(probs, labels)),
        "ece": float(cal.expected_calibration_error(probs, labels, n_bins=10)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="transformer-example", help="directory for the figure")
    p.add_argument("--small", action="store_true", help="a few seconds: less data, fewer epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n_train, n_test, epochs = (300, 200, 3) if args.small else (3000, 1000, 12)
    train_rows = sequences(n_train, g, noise=0.1)
    test = collate(sequences(n_test, g, noise=0.1))  # the same label noise as in training
    ood = collate(sequences(n_test, g, ood=True))
    loader = DataLoader(train_rows, batch_size=50, shuffle=True, collate_fn=collate, generator=g)
    fit_loader = DataLoader(train_rows, batch_size=100, collate_fn=collate)

    t0 = time.perf_counter()
    model = SentimentEncoder()
    train(model, loader, epochs)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    la = LaplaceWrapper(model, "classification", structure="kfac").fit(fit_loader)
    la.optimize_prior_precision()
    head = LaplaceWrapper(model, "classification", structure="full", subset="last_layer")
    head.fit(fit_loader).optimize_prior_precision()
    t_fit = time.perf_counter() - t0

    with torch.no_grad():
        probs = {"MAP": model(**inputs_of(test)).softmax(-1)}
        probs_ood = {"MAP": model(**inputs_of(ood)).softmax(-1)}
    for name, wrapper in (("Laplace (kfac)", la), ("Laplace (last layer)", head)):
        probs[name] = wrapper.predict(inputs_of(test)).mean
        probs_ood[name] = wrapper.predict(inputs_of(ood)).mean
    labels = test["labels"]
    rows = {k: metrics(v, labels) for k, v in probs.items()}
    for k in rows:
        rows[k]["ood_confidence"] = float(probs_ood[k].max(-1).values.mean())

    print(
        f"transformer P={sum(p.numel() for p in model.parameters())}, trained in {t_train:.1f} s;"
        f" both Laplace fits and evidence tuning in {t_fit:.1f} s (kfac α = "
        f"{float(la.prior_precision):.3g}, last layer α = {float(head.prior_precision):.3g})"
    )
    print(f"{'':22s} {'accuracy':>9s} {'NLL':>7s} {'ECE':>7s} {'OOD confidence':>15s}")
    for k, r in rows.items():
        print(
            f"{k:22s} {r['accuracy']:9.3f} {r['nll']:7.3f} {r['ece']:7.3f} "
            f"{r['ood_confidence']:15.3f}"
        )

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ReliabilityDisplay.from_predictions(
        probs, labels, n_bins=10, ax=axes[0], show_histogram=False, title="held-out sequences"
    )
    ConfidenceHistogramDisplay.from_predictions(
        {f"{k}, OOD": v for k, v in probs_ood.items()},
        n_bins=10,
        ax=axes[1],
        title="filler-only sequences (no right answer)",
    )
    axes[1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out / "transformer_calibration.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"metrics": rows, "figure": str(path), "train_seconds": t_train, "fit_seconds": t_fit}


if __name__ == "__main__":
    main()
