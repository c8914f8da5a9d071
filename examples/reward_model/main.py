"""A Laplace posterior for a Hugging Face reward model trained on preference pairs.

A tiny GPT-2 sequence classifier with one output (``num_labels=1``, random weights, no
download) scores token sequences; the preference data are pairs of sequences of which the
one holding more "good" tokens is preferred.  A pair collator stacks the two candidates of
each pair, ``{"input_ids": (B, 2, L), "attention_mask": (B, 2, L), "labels": (B,)}`` with the
label the index of the preferred one, and the model is trained with the Bradley–Terry loss
on the two rewards.  ``LaplaceWrapper(model, "reward_modeling")`` fits on the same batches
(the model scores the B·2 candidates one at a time); the predictive gives each sequence's
reward with its variance, and ``predict_preference`` the probability that a candidate of a
held-out pair is preferred, from the joint Gaussian of the two rewards.

Run: ``python examples/reward_model/main.py [--small]``
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from laplace_ggn import LaplaceWrapper, predict_preference

VOCAB, GOOD = 12, (3, 4)  # token ids 3 and 4 make a sequence better


def _reward_model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, num_labels=1,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(cfg).double()


def _pairs(n: int, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    rows = []
    for _ in range(n):
        a, b = (
            torch.randint(1, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)
            for _ in range(2)
        )
        score = [int(sum((t == k).sum() for k in GOOD)) for t in (a, b)]
        if score[0] == score[1]:
            continue
        rows.append((a, b, int(score[1] > score[0])))
    return rows


def pair_collator(rows):
    """Pad both candidates of every pair to one length: inputs ``(B, 2, L)``, labels ``(B,)``."""
    L = max(max(len(a), len(b)) for a, b, _ in rows)
    ids = torch.zeros(len(rows), 2, L, dtype=torch.long)
    mask = torch.zeros(len(rows), 2, L, dtype=torch.long)
    for i, (a, b, _) in enumerate(rows):
        for j, t in enumerate((a, b)):
            ids[i, j, : len(t)], mask[i, j, : len(t)] = t, 1
    labels = torch.tensor([r[2] for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rewards(model, batch):
    B, _, L = batch["input_ids"].shape
    flat = {k: batch[k].reshape(B * 2, L) for k in ("input_ids", "attention_mask")}
    return model(**flat).logits.reshape(B, 2)


def main(argv: list[str] | None = None) -> dict:
    """Train the reward model, fit the Laplace posterior, print and return held-out figures.

    Returns:
        Pair accuracy and mean preference NLL of the MAP and of the Laplace predictive on
        held-out pairs, the reward variances of preferred and other candidates, the tuned
        prior precision.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="fewer pairs and steps (tests)")
    args = parser.parse_args(argv)
    n_train, steps = (48, 30) if args.small else (400, 300)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(_pairs(n_train, g), batch_size=16, shuffle=False, collate_fn=pair_collator)
    test = pair_collator(_pairs(200, g))
    model = _reward_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps // len(train) + 1):
        for batch in train:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(_rewards(model, batch), batch["labels"])
            loss.backward()
            opt.step()
    model.eval()

    la = LaplaceWrapper(model, "reward_modeling", structure="kfac", subset="last_layer")
    la.fit(train).optimize_prior_precision()
    pairs = {k: v for k, v in test.items() if k != "labels"}
    y = test["labels"]
    with torch.no_grad():
        p_map = torch.softmax(_rewards(model, test), -1)
    p_la = predict_preference(la, pairs).mean
    preferred = {k: v[torch.arange(len(y)), y] for k, v in pairs.items()}
    items = la.predict(preferred)

    def nll(p):
        return float(-torch.log(p[torch.arange(len(y)), y]).mean())

    report = {
        "map_accuracy": float((p_map.argmax(-1) == y).double().mean()),
        "map_nll": nll(p_map),
        "laplace_nll": nll(p_la),
        "laplace_accuracy": float((p_la.argmax(-1) == y).double().mean()),
        "reward_variance_mean": float(items.variance.mean()),
        "prior_precision": float(la.prior_precision),
    }
    print("| predictive | pair accuracy | preference NLL |")
    print("|---|---|---|")
    print(f"| MAP | {report['map_accuracy']:.3f} | {report['map_nll']:.3f} |")
    print(f"| Laplace (probit) | {report['laplace_accuracy']:.3f} | {report['laplace_nll']:.3f} |")
    print(
        f"\nreward of a preferred candidate: mean {float(items.mean.mean()):.3f}, variance "
        f"{report['reward_variance_mean']:.3g}; prior precision {report['prior_precision']:.3g}"
    )
    return report


if __name__ == "__main__":
    main()
