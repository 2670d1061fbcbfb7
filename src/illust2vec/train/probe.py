"""A linear probe for the new rows of an extended model (`i2v train --init`, `--probe-new`, on by default).

A new tag's row of a head starts at zero weights and its prior bias, so the first epochs spend themselves finding
what the original's features already say about it: on the bench, four epochs left the new characters at 0.69 top-1
among themselves, while a logistic regression on the original's frozen features of the same training posts ranked
0.82 right. So before training, the new rows are fitted that way: the features at the input of each head's output
layer over DATA's training split (one pass, the original's weights), then a logistic regression per new tag, its
L2 strength chosen on DATA's validation split; training then starts from those rows (a linear probe, then
fine-tuning: Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features", who found it also keeps the
features that fine-tuning alone distorts). Rows of tags the original has are never touched.

Only sigmoid heads are probed (every tag a yes/no of its own); a softmax head's new classes keep the prior.

By default (`probe_new=None`) it runs when DATA holds posts of the old board besides the new ones (train.md: "A
sample of the old board in DATA"), told by a tenth of its training posts or more showing one of the original's
characters. With the new characters' posts alone, the probe's rows never see an old character as a negative: on the
bench they lifted the new characters' top-1 from 0.57 to 0.73 (0.76 with another seed) but fired on the old board's
posts (0.56 on average at best, against 0.33), and the old characters' top-1 fell from 0.83 to 0.69 (0.71); with
600 old posts in DATA, from 0.64 to 0.80 for 0.87 to 0.84.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from ..evaluation.evaluator import PredictOptions, predict_split
from ..evaluation.vocab_map import batch_mapper
from ..formats.dataset import Dataset
from ..models.tagger import TaggerNet
from .init import last_linear

STRENGTHS = (1e-4, 1e-3, 1e-2)  # L2 on standardized features, per tag and image; the best on validation is kept
MIN_OLD_SHARE = 0.1  # by default the probe runs when at least this share of DATA's posts show old characters
MAX_IMAGES = 50_000  # the probe's sample of a larger training split (features of 1,024 floats: 200 MB)


def old_share(ext, counts: dict[str, list[int]], samples: int) -> float:
    """About the share of DATA's training posts that carry one of the original's characters: their labels counted
    in DATA's tag counts, over its posts (a post with two counts twice). 0 without a character head."""
    head = "character"
    if head not in ext.data.known or head not in ext.old.known or head not in counts or samples <= 0:
        return 0.0
    theirs = ext.data.positions[head][ext.data.known[head] & ext.old.known[head]]
    return float(sum(counts[head][i] for i in theirs)) / samples


def wanted(setting: bool | None, ext, counts: dict[str, list[int]], samples: int) -> bool:
    """Whether to probe: the setting, or (None) whether DATA holds posts of the original's cast, at least
    `MIN_OLD_SHARE` of its training posts carrying one of the original's characters. Characters, not series: a board's
    generic series tags ("original") are on the old posts and the new alike."""
    if setting is not None:
        return setting
    return old_share(ext, counts, samples) >= MIN_OLD_SHARE


def new_columns(ext, activations: dict[str, str]) -> dict[str, np.ndarray]:
    """Head -> the model's columns to probe: new rows (tags the original lacks) that DATA labels, sigmoid heads."""
    out = {}
    for head, known in ext.data.known.items():
        if activations.get(head) != "sigmoid":
            continue
        cols = np.flatnonzero(known & ~ext.old.known[head])
        if len(cols):
            out[head] = cols
    return out


def features(
    model: TaggerNet,
    ds: Dataset,
    split: str,
    transform,
    heads: list[str],
    device: torch.device,
    workers: int,
    console: Console | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inputs of the heads' output layers (caught with hooks while `predict_split` runs the model) and the
    targets in the model's vocabulary, over at most MAX_IMAGES of a split."""
    layers = {h: dict(model.heads[h].named_modules())[last_linear(model.heads[h])] for h in heads}
    seen: dict[str, list] = {h: [] for h in heads}
    hooks = [
        layer.register_forward_hook(lambda _m, args, _out, h=h: seen[h].append(args[0].detach().float().cpu()))
        for h, layer in layers.items()
    ]
    was = model.training
    try:
        opts = PredictOptions(batch_size=64, workers=workers, max_samples=MAX_IMAGES)
        preds = predict_split(model, ds, split, device, opts, console, transform)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was)
    return (
        {h: torch.cat(seen[h])[:MAX_IMAGES] for h in heads},
        {h: torch.from_numpy(preds.targets[h][:MAX_IMAGES]).float() for h in heads},
    )


def fit_rows(x: torch.Tensor, y: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression, one output per column of y, on standardized x (L-BFGS); returned as weights and biases
    for the raw features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(y.shape[1], x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(y.shape[1], device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w.T + b, y) + strength * w.pow(2).sum() / y.shape[1]
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return w / sd, b - (w / sd) @ mu


def probe_new_rows(
    model: TaggerNet, ext, ds: Dataset, device: torch.device, workers: int, console: Console | None
) -> dict[str, int]:
    """Fit the new rows of the model's sigmoid heads (in place); returns head -> rows fitted."""
    activations = {h.name: h.activation for h in model.cfg.heads}
    cols = new_columns(ext, activations)
    if not cols:
        return {}
    transform = batch_mapper(ext.data, ext.size)
    heads = list(cols)
    x, y = features(model, ds, "train", transform, heads, device, workers, console)
    has_val = "val" in ds.info.splits and ds.samples("val") > 0
    vx, vy = features(model, ds, "val", transform, heads, device, workers, None) if has_val else ({}, {})
    fitted = {}
    for head, c in cols.items():
        index = torch.as_tensor(c)
        features_, target = x[head].to(device), y[head].index_select(1, index).to(device)
        best = None
        for strength in STRENGTHS if has_val else (1e-3,):
            w, b = fit_rows(features_, target, strength)
            loss = 0.0
            if has_val:
                logits = vx[head].to(device) @ w.T + b
                loss = float(F.binary_cross_entropy_with_logits(logits, vy[head].index_select(1, index).to(device)))
            if best is None or loss < best[0]:
                best = (loss, w, b)
        _, w, b = best
        layer = dict(model.heads[head].named_modules())[last_linear(model.heads[head])]
        with torch.no_grad():
            layer.weight[index.to(layer.weight.device)] = w.to(layer.weight)
            layer.bias[index.to(layer.bias.device)] = b.to(layer.bias)
        fitted[head] = len(c)
    return fitted
