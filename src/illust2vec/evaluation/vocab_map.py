"""A model's vocabulary against another one (a data set's, or the model it was extended from, `i2v train --init`):
which output is which tag, matched by name and category; batches moved into the model's columns; predictions and
metrics over the tags both have; thresholds kept for the tags a split never shows.

On a data set whose vocabulary differs from the model's, every figure counts the tags both have, with one exception
that keeps top-1 honest: the top-1 and top-5 of a single-label head (character, copyright, artist) rank all the
model's outputs, so a post of a new character that the model calls one of its old characters is a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..errors import UserError
from ..formats import run as run_dir
from ..formats.bundle import Thresholds, is_bundle, open_bundle
from ..formats.dataset import Dataset
from ..formats.vocab import Vocab
from ..models.tagger import TaggerNet
from .evaluator import Predictions, PredictOptions, compute_metrics, predict_split
from .metrics import has_top_k, topk_accuracy


@dataclass(frozen=True)
class VocabMap:
    """Where each of the model's outputs is in the other vocabulary: per head, for every model column, its position
    within the other's head, or -1 where the other lacks the tag."""

    model: Vocab
    other: Vocab
    positions: dict[str, np.ndarray]

    @classmethod
    def between(cls, model: Vocab, other: Vocab) -> VocabMap:
        positions = {}
        for head in model.heads:
            theirs = {n: i for i, n in enumerate(other.head_names(head))} if head in other.heads else {}
            positions[head] = np.array([theirs.get(n, -1) for n in model.head_names(head)], dtype=np.int64)
        return cls(model, other, positions)

    @property
    def identical(self) -> bool:
        return self.model.hash == self.other.hash

    @cached_property
    def known(self) -> dict[str, np.ndarray]:
        """Head -> which of the model's columns the other vocabulary has."""
        return {h: p >= 0 for h, p in self.positions.items()}

    @property
    def shared(self) -> int:
        """Tags both vocabularies have."""
        return int(sum(k.sum() for k in self.known.values()))

    @property
    def other_only(self) -> int:
        """Tags of the other vocabulary that the model lacks."""
        return len(self.other) - self.shared

    def columns(self, head: str) -> tuple[np.ndarray, np.ndarray]:
        """(the model's columns, the other's positions) of the head's shared tags, in step."""
        cols = np.flatnonzero(self.known[head])
        return cols, self.positions[head][cols]

    def targets(self, targets: Mapping[str, torch.Tensor], fill: float = 0.0) -> dict[str, torch.Tensor]:
        """A batch's targets in the other vocabulary -> the model's: multi-hot rows with `fill` where the other lacks
        the tag (NaN: no label), the rating as the model's class index (-1 unknown)."""
        batch = len(next(iter(targets.values())))
        device = next(iter(targets.values())).device
        out = {}
        for head, pos in self.positions.items():
            src = targets.get(head)
            cols, theirs = self.columns(head)
            if head == "rating":
                table = torch.full((len(self.other.heads.get(head, ())) + 1,), -1, dtype=torch.long)
                table[torch.as_tensor(theirs)] = torch.as_tensor(cols)
                index = src.long().cpu() if src is not None else torch.full((batch,), -1, dtype=torch.long)
                out[head] = table[torch.where(index >= 0, index, torch.full_like(index, len(table) - 1))].to(device)
                continue
            row = torch.full((batch, len(pos)), fill, dtype=torch.float32, device=device)
            if src is not None and len(cols):
                row[:, torch.as_tensor(cols, device=device)] = src.float()[:, torch.as_tensor(theirs, device=device)]
            out[head] = row
        return out


def restrict(preds: Predictions, masks: Mapping[str, np.ndarray]) -> Predictions:
    """The predictions of the masked columns only; a head without any is left out (rating: whole, or left out)."""
    probs, targets = {}, {}
    for head, p in preds.probs.items():
        mask = masks.get(head)
        if mask is None or not mask.any():
            continue
        t = preds.targets[head]
        probs[head], targets[head] = (p, t) if t.ndim == 1 else (p[:, mask], t[:, mask])
    return Predictions(probs, targets, preds.features, preds.bad_samples)


def mapped_metrics(
    preds: Predictions,
    masks: Mapping[str, np.ndarray],
    activations: Mapping[str, str],
    thresholds: Mapping[str, float],
    exclusive_pairs: np.ndarray | None = None,
) -> dict[str, float]:
    """`compute_metrics` over the masked columns (the tags a data set labels, or a part of them: old or new), with
    top-1 and top-5 of single-label heads ranking every output of the head, counted over the posts that carry one
    of the masked tags. `exclusive_pairs` are over the model's general columns."""
    part = restrict(preds, masks)
    pairs = None
    if exclusive_pairs is not None and "general" in part.probs:
        keep = masks["general"]
        pairs = exclusive_pairs[np.ix_(keep, keep)]
    out = compute_metrics(part, activations, thresholds, pairs)
    for head in part.probs:
        t = preds.targets[head]
        if t.ndim == 2 and has_top_k(head, activations[head]):
            t = t * masks[head][None, :]
            out[f"{head}/top1"] = topk_accuracy(preds.probs[head], t, 1)
            out[f"{head}/top5"] = topk_accuracy(preds.probs[head], t, 5)
    return out


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (or float) images [B, 3, S, S] in 0..255 -> float [B, 3, size, size] in 0..255 (antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(0, 255)


def batch_mapper(vmap: VocabMap, size: int | None, fill: float = 0.0):
    """A function over (images, targets) batches: images at the model's input size, targets in its vocabulary;
    None when nothing needs changing."""
    if vmap.identical and size is None:
        return None

    def mapped(batch: tuple) -> tuple:
        images, targets = batch
        images = images if size is None else resize(images, size)
        return images, (targets if vmap.identical else vmap.targets(targets, fill))

    return mapped


def check_shared(vmap: VocabMap, where: str) -> None:
    if vmap.shared == 0:
        raise UserError(f"{where}: its vocabulary shares no tag with the model's (matched by name and category)")


def size_note(ds: Dataset, model: TaggerNet) -> str | None:
    """The note for a data set whose images are not the model's input size (they are resized), or None."""
    if ds.image_size == model.cfg.image_size:
        return None
    return f"note: {ds.root} holds {ds.image_size} px images; resized to the model's {model.cfg.image_size} px"


def predict_mapped(
    model: TaggerNet,
    vocab: Vocab,
    ds: Dataset,
    split: str,
    device: torch.device,
    opts: PredictOptions,
    console: Console | None = None,
) -> tuple[Predictions, VocabMap]:
    """Predict a split of a data set whose vocabulary (or image size) may differ from the model's `vocab`: the
    predictions are in the model's columns, with targets 0 where the data set lacks a tag (see `VocabMap.known`)."""
    vmap = VocabMap.between(vocab, ds.vocab)
    check_shared(vmap, str(ds.root))
    note = size_note(ds, model)
    if note and console is not None:
        console.print(note, highlight=False)
    mapper = batch_mapper(vmap, model.cfg.image_size if note else None)
    return predict_split(model, ds, split, device, opts, console=console, transform=mapper), vmap


def head_names(vocab: Vocab, masks: Mapping[str, np.ndarray], heads) -> dict[str, list[str]]:
    """Head -> the names of its masked columns, for the heads given (those of restricted predictions)."""
    return {h: [n for n, keep in zip(vocab.head_names(h), masks[h], strict=True) if keep] for h in heads}


def keep_thresholds(
    calibrated: Thresholds, original: Thresholds, vocab: Vocab, original_vocab: Vocab, shown: Mapping[str, np.ndarray]
) -> Thresholds:
    """Calibrated thresholds, plus one per tag for the original model's tags that the calibration split never showed
    (`shown`: head -> the model's columns with a positive there): those keep the original model's threshold."""
    theirs = VocabMap.between(vocab, original_vocab)
    tags = dict(calibrated.tags)
    kept = 0
    for head, known in theirs.known.items():
        seen = shown.get(head, np.zeros(len(known), dtype=bool))
        for name, has_original, was_shown in zip(vocab.head_names(head), known, seen, strict=True):
            if head != "rating" and has_original and not was_shown and name not in tags:
                tags[name] = original.tags.get(name, original.heads.get(head, calibrated.heads.get(head, 0.5)))
                kept += 1
    method = f"{calibrated.method}; {kept} tags the split never shows keep the original model's thresholds"
    return Thresholds(dict(calibrated.heads), tags, method)


def original_thresholds(run: Path, calibrated: Thresholds, vocab: Vocab, full: Predictions) -> Thresholds:
    """For an extended run (its original model in RUN/init/): `calibrated`, where the original model's tags that the
    predictions' split never shows keep the original's thresholds. Any other run: `calibrated`.

    Args:
        full: the split's predictions in the run's columns (`predict_mapped`).
    """
    init = run_dir.init_path(run)
    if not is_bundle(init):
        return calibrated
    info = open_bundle(init)
    shown = {h: t.sum(axis=0) > 0 for h, t in full.targets.items() if t.ndim == 2}
    return keep_thresholds(calibrated, info.thresholds, vocab, info.vocab, shown)
