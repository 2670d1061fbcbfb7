"""An extended run (`i2v train --init`) as it trains: the original model kept beside the one learning, DATA's batches
moved into the extended vocabulary, learning without forgetting, and validation figures for old and new tags.

On every training image the original model's outputs for its own tags are soft targets (`--keep-old W`, the weight
of that term; `losses.keep_old_loss`). A tag of the model that DATA's vocabulary lacks is not pushed to zero by a
label DATA never gives: its target is the original model's output (with `--keep-old 0`, it is left out of the loss).
The original's weights learn gently (`--backbone-lr-scale`, 0.1 by default): the backbone through its optimizer groups,
the heads' rows of the original's tags through `scale_old_rows`; new rows and new heads learn at the full rate.
Validation counts the tags DATA labels (`general/mAP` and the rest, as in every run), and again the old tags and the
new ones apart (`old/general/mAP`, `new/character/top1`, ...).

The original model is saved in the run as a bundle (`RUN/init/`): a resumed run keeps it whatever became of MODEL,
and `i2v export` takes the thresholds of the tags the validation split never shows from it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..evaluation.evaluator import Predictions
from ..evaluation.vocab_map import VocabMap, batch_mapper, mapped_metrics, resize, size_note
from ..formats import run as run_dir
from ..formats.bundle import is_bundle, open_bundle, save_bundle
from ..formats.dataset import Dataset
from ..formats.vocab import Vocab
from ..models.tagger import TaggerNet, load_tagger
from .config import TrainConfig
from .init import InitModel, check_arch, count_rows, extend_model, last_linear, load_init, merge_vocab
from .losses import keep_old_loss

# Heads whose tags compete for a post (who is drawn, from what): a new one of them makes the original's guesses moot.
RIVAL_HEADS = ("character", "copyright")


@dataclass
class Extension:
    """What an extended run adds to the training loop (see the module's doc)."""

    vocab: Vocab  # the extended model's
    data: VocabMap  # the model's columns in DATA's vocabulary
    old: VocabMap  # the model's columns in the original model's
    activations: dict[str, str]
    keep_old: float
    original: TaggerNet | None  # on the device, frozen; None with --keep-old 0
    size: int | None  # DATA's images are resized to this (None: they are the model's size already)
    autocast: str | None  # the run's (setup sets it with the rest of the precision)
    init: InitModel
    record: dict  # config.json's "init"

    def batch(self, images: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict, dict | None]:
        """A training batch at the model's input size, its targets in the model's vocabulary (NaN: no label), and
        the original model's logits (None without --keep-old). Tags DATA lacks take the original's outputs."""
        if self.size is not None:
            images = resize(images, self.size)
        targets = self.data.targets(targets, fill=float("nan"))
        if self.original is None:
            return images, targets, None
        amp = (
            torch.autocast(images.device.type, dtype=getattr(torch, self.autocast)) if self.autocast else nullcontext()
        )
        with torch.no_grad(), amp:
            original = {k: v.float() for k, v in self.original(images).items()}
        for head, t in targets.items():
            if t.dim() != 2 or head not in original or self.activations[head] != "sigmoid":
                continue
            # Not zero on a post DATA labels with a character of its own, though the original's old characters compete
            # there (0.4 on average on the bench's new posts): every post of such DATA carries one, so zero there
            # pulls the old characters down on every image, the original's included (tried: old top-1 0.68 -> 0.21
            # on the old posts for new top-1 0.42 -> 0.63; docs/train.md, "Why the new characters trail").
            cols = np.flatnonzero(~self.data.known[head] & self.old.known[head])
            if len(cols):
                theirs = torch.as_tensor(self.old.positions[head][cols], device=t.device)
                t[:, torch.as_tensor(cols, device=t.device)] = torch.sigmoid(original[head].index_select(1, theirs))
        return images, targets, original

    def keep(
        self, logits: dict, original: dict | None, targets: dict, loss: torch.Tensor, parts: dict
    ) -> tuple[torch.Tensor, dict]:
        """The training loss plus W times the learning-without-forgetting term (logged as keep_old)."""
        if original is None or self.keep_old == 0:
            return loss, parts
        device = next(iter(logits.values())).device
        columns = {
            h: tuple(torch.as_tensor(c, device=device) for c in self.old.columns(h))
            for h in self.old.positions
            if h in original
        }
        masks = self.rival_masks(columns, targets)
        term = keep_old_loss(logits, original, columns, self.activations, masks)
        return loss + self.keep_old * term, {**parts, "keep_old": float(term.detach())}

    def rival_masks(self, columns: dict, targets: dict) -> dict[str, torch.Tensor]:
        """Where the original's outputs are no evidence: on a post that DATA labels with a character (or series) the
        original cannot know, its scores for the old characters are guesses at a cast it never saw (0.4 at best on
        the bench's new posts), so the old characters that DATA labels itself take DATA's label there alone. Only
        DATA that labels old characters too (the new crawl built with a sample of the old board) is affected; with
        new characters alone there is no such label, and the original's outputs stay their targets.
        Head -> a bool (images, old columns) mask of the keep-old entries that count."""
        masks = {}
        for head in RIVAL_HEADS:
            if head not in columns or head not in targets or self.activations.get(head) != "sigmoid":
                continue
            known = self.data.known[head]
            new = np.flatnonzero(known & ~self.old.known[head])
            ours = columns[head][0]
            labelled = torch.as_tensor(known, device=ours.device)[ours]
            if len(new) == 0 or not labelled.any():
                continue
            t = targets[head]
            carries_new = (t.index_select(1, torch.as_tensor(new, device=t.device)) > 0.5).any(1)  # NaN: no
            masks[head] = ~(carries_new[:, None] & labelled[None, :])
        return masks

    def transform(self):
        """For validation's `predict_split`: batches at the model's size, targets in its vocabulary."""
        return batch_mapper(self.data, self.size)

    def metrics(
        self, preds: Predictions, activations: dict[str, str], threshold: float, pairs: np.ndarray | None
    ) -> dict[str, float]:
        """The figures over the tags DATA labels, and again over the old tags and the new ones apart."""
        thresholds = {h: threshold for h in activations}
        known = self.data.known
        out = mapped_metrics(preds, known, activations, thresholds, pairs)
        for part, mine in (("old", True), ("new", False)):
            masks = {h: known[h] & (self.old.known[h] == mine) for h in known if h != "rating"}
            if any(m.any() for m in masks.values()):
                figures = mapped_metrics(preds, masks, activations, thresholds)
                out.update({f"{part}/{k}": v for k, v in figures.items() if k != "loss"})
        return out

    def model_space(self, weights: dict, pairs: dict) -> tuple[dict, dict]:
        """Per-tag loss weights and exclusive pairs found on DATA, moved into the model's columns (a tag DATA
        lacks: weight 1, in no pair)."""
        out_w, out_p = {}, {}
        for head, w in weights.items():
            cols, theirs = self.data.columns(head)
            row = torch.ones(len(self.data.positions[head]), dtype=w.dtype)
            row[torch.as_tensor(cols)] = w.cpu()[torch.as_tensor(theirs)]
            out_w[head] = row.to(w.device)
        for head, p in pairs.items():
            cols, theirs = self.data.columns(head)
            n = len(self.data.positions[head])
            square = torch.zeros(n, n, dtype=p.dtype)
            ours, at = torch.as_tensor(cols), torch.as_tensor(theirs)
            square[ours[:, None], ours[None, :]] = p.cpu()[at[:, None], at[None, :]]
            out_p[head] = square.to(p.device)
        return out_w, out_p

    def scale_old_rows(self, model: TaggerNet, optimizer: torch.optim.Optimizer, scale: float) -> None:
        """--backbone-lr-scale for the rest of what the original model learnt: after every optimizer step, the rows of
        the heads' output layers for the original's tags (and an old head's other layers) keep only `scale` of the
        step's change, as if their learning rate were the backbone's; new rows and new heads take the whole step.
        (Rows sit in one tensor per head, so a per-row rate cannot be an optimizer group; AdamW's step, weight decay
        included, is proportional to the learning rate, so keeping `scale` of it is that rate.)"""
        if scale == 1:
            return
        moving = []  # (parameter, the rows to scale, or None: all of it)
        for name, head in model.heads.items():
            old = torch.as_tensor(self.old.known[name])
            if not old.any():
                continue  # a new head: learnt from scratch
            last = last_linear(head)
            for pname, p in head.named_parameters():
                if p.requires_grad:
                    moving.append((p, old.to(p.device) if pname.startswith(f"{last}.") else None))
        before: list[torch.Tensor] = []

        def keep(_opt, _args, _kwargs) -> None:
            before[:] = [p.detach().clone() for p, _ in moving]

        def scaled(_opt, _args, _kwargs) -> None:
            with torch.no_grad():
                for (p, rows), was in zip(moving, before, strict=True):
                    moved = torch.lerp(was, p, scale)
                    if rows is None:
                        p.copy_(moved)
                    else:
                        p[rows] = moved[rows]

        if moving:
            optimizer.register_step_pre_hook(keep)
            optimizer.register_step_post_hook(scaled)

    def save(self, run: Path) -> None:
        """The original model as a bundle in RUN/init/ (replacing what a failed start left there)."""
        init = self.init
        save_bundle(run_dir.init_path(run), init.model, init.vocab, init.thresholds, source=init.source, overwrite=True)


def prepare(
    cfg: TrainConfig, ds: Dataset, run: Path, resuming: bool, device: torch.device, console: Console | None
) -> tuple[TaggerNet, Extension]:
    """The extended model (weights from the original, heads for the merged vocabulary) and its Extension; resuming,
    the original comes from RUN/init/. `console`: where to say what was merged (None: say nothing)."""
    init = _original(cfg, run, resuming)
    check_arch(cfg.arch, init.model)
    vocab = merge_vocab(init.vocab, ds.vocab, cfg.vocab)
    model = extend_model(init, vocab, ds.vocab, ds.tag_counts("train"), ds.samples("train"), dict(cfg.model))
    rows = count_rows(init.vocab, vocab)
    data = VocabMap.between(vocab, ds.vocab)
    note = size_note(ds, model)
    if console is not None:
        console.print(
            f"extending {init.source.get('model')}: {rows.kept} tags kept, {rows.new} new, {rows.dropped} dropped "
            f"(--vocab {cfg.vocab}); --keep-old {cfg.keep_old:g}, backbone lr x{cfg.backbone_lr_scale:g}",
            highlight=False,
        )
        if note:
            console.print(note, highlight=False)
    original = None
    if cfg.keep_old > 0:
        original = init.model.to(device).eval()
        original.requires_grad_(False)
    record = {**init.source, "vocab": cfg.vocab, "vocab_hash": init.vocab.hash, "rows": rows.as_dict()}
    acts = {h.name: h.activation for h in model.cfg.heads}
    old = VocabMap.between(vocab, init.vocab)
    size = model.cfg.image_size if note else None
    return model, Extension(vocab, data, old, acts, cfg.keep_old, original, size, None, init, record)


def _original(cfg: TrainConfig, run: Path, resuming: bool) -> InitModel:
    """The model being extended: resuming, the copy in RUN/init/ (where this process can see it); else --init."""
    saved = run_dir.init_path(run)
    if resuming and is_bundle(saved):
        info = open_bundle(saved)
        model = load_tagger(info.config["model"], info.weights_path)
        return InitModel(model, info.vocab, info.thresholds, dict(info.config.get("source") or {}))
    return load_init(str(cfg.init))


def freeze_backbone(model: TaggerNet) -> None:
    """--freeze-backbone: no gradient for any backbone parameter (its BatchNorm layers keep their statistics)."""
    model.backbone.requires_grad_(False)
    model.train(model.training)


def run_entries(ext: Extension | None, data_vocab_hash: str) -> dict:
    """What an extended run's config.json says besides a run's: the model's vocabulary (not DATA's), DATA's, and
    where the model came from."""
    if ext is None:
        return {}
    return {
        "vocab_hash": ext.vocab.hash,
        "data_vocab_hash": data_vocab_hash,
        "image_size": ext.size or ext.init.model.cfg.image_size,
        "init": ext.record,
    }
