"""The one evaluator: predict a split with a tagger, then compute its named metrics.

Training's validation (every epoch, into metrics.csv) and `i2v evaluate` (into metrics.json) both call
`predict_split` and `compute_metrics`, so the two files name the same figures the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from ..errors import UserError
from ..formats import run as run_dir
from ..formats.dataset import Dataset, open_dataset
from ..formats.loader import BadSamples, LoaderConfig, make_loader
from ..models.tagger import TaggerNet
from .metrics import contradiction_rate, head_metrics


@dataclass(frozen=True)
class PredictOptions:
    """How a split is read and run through the model."""

    batch_size: int = 64
    workers: int = 2
    autocast: str | None = None  # a torch dtype name ("bfloat16", "float16") to run under autocast, or None
    channels_last: bool = False
    features: bool = False  # also keep the feature vectors (forward_head(pre_logits=True))
    max_samples: int | None = None  # stop after this many images

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bfloat16", "float16"):
            raise UserError(f"autocast must be bfloat16, float16 or None, not {self.autocast!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be at least 1 (or None), not {self.max_samples}")


@dataclass
class Predictions:
    """Per head: probabilities [images, classes] and targets ([images, classes] 0/1, or [images] class indices for
    rating); with `features`, the feature vectors [images, width]."""

    probs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    features: np.ndarray | None = None
    bad_samples: int = 0  # samples that could not be read and were skipped (see formats.loader.BadSamples)

    @property
    def images(self) -> int:
        return len(next(iter(self.targets.values()))) if self.targets else 0


def predict(model: TaggerNet, batches: Iterable, device: torch.device, opts: PredictOptions, progress=None):
    """Run the model over (images, targets) batches, in order; `progress(images so far)` after each batch."""
    probs: dict[str, list] = {h.name: [] for h in model.cfg.heads}
    targets: dict[str, list] = {h.name: [] for h in model.cfg.heads}
    feats: list[np.ndarray] = []
    amp = torch.autocast(device.type, dtype=getattr(torch, opts.autocast)) if opts.autocast else nullcontext()
    seen = 0
    model.eval()
    with torch.no_grad():
        for images, batch_targets in batches:
            images = images.to(device, non_blocking=True)
            if opts.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp:
                maps = model.forward_features(images)
                logits = model.forward_head(maps)
                if opts.features:
                    feats.append(model.forward_head(maps, pre_logits=True).float().cpu().numpy())
            for head, p in model.activate({k: v.float() for k, v in logits.items()}).items():
                probs[head].append(p.cpu().numpy())
                targets[head].append(batch_targets[head].cpu().numpy())
            seen += len(images)
            if progress is not None:
                progress(seen)
            if opts.max_samples is not None and seen >= opts.max_samples:
                break
    # A split (or a DDP rank's share of it) without images still gives every head its arrays, of zero rows.
    return Predictions(
        {h.name: _cat(probs[h.name], (0, h.classes), np.float32) for h in model.cfg.heads},
        {
            h.name: _cat(targets[h.name], (0,) if h.name == "rating" else (0, h.classes), _target_dtype(h.name))
            for h in model.cfg.heads
        },
        _cat(feats, (0, model.num_features), np.float32) if opts.features else None,
    )


def _cat(parts: list[np.ndarray], empty: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty, dtype)


def _target_dtype(head: str):
    return np.int64 if head == "rating" else np.float32


def predict_split(
    model: TaggerNet,
    ds: Dataset,
    split: str,
    device: torch.device,
    opts: PredictOptions,
    console: Console | None = None,
    transform: Callable[[tuple], tuple] | None = None,
) -> Predictions:
    """Probabilities and targets per head over one split, in shard order (under DDP: this rank's share of the
    shards); with a console, a transient progress bar on it. Samples that cannot be read are skipped and counted in
    `bad_samples`. `transform` maps each (images, targets) batch first (`vocab_map`: into a model's vocabulary)."""
    model = model.to(device)
    bad = BadSamples()
    loader = make_loader(ds, split, LoaderConfig(batch_size=opts.batch_size, workers=opts.workers), False, bad=bad)
    batches: Iterable = loader if transform is None else map(transform, loader)
    if console is None:
        preds = predict(model, batches, device, opts)
    else:
        total = ds.samples(split) if opts.max_samples is None else min(opts.max_samples, ds.samples(split))
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{split} images", total=total)
            preds = predict(model, batches, device, opts, lambda seen: bar.update(task, completed=min(seen, total)))
    preds.bad_samples = bad.count
    if bad.count and console is not None:
        console.print(
            f"warning: {bad.count} {split} samples could not be read and were skipped; the first: {bad.first}"
        )
    return preds


def compute_metrics(
    preds: Predictions,
    activations: Mapping[str, str],
    thresholds: Mapping[str, float],
    exclusive_pairs: np.ndarray | None = None,
) -> dict[str, float]:
    """Every head's named metrics (see `metrics.head_metrics`), the sum of the heads' losses as "loss", and, given
    the exclusive pairs of general tags, "general/contradictions" at the general head's threshold.

    Args:
        preds: the predictions of a split.
        activations: head -> "sigmoid" or "softmax".
        thresholds: head -> the threshold for its thresholded metrics (0.5 where missing).
        exclusive_pairs: [general, general] booleans, the pairs of general tags that never occur together.
    """
    out: dict[str, float] = {}
    for head, p in preds.probs.items():
        out.update(head_metrics(head, p, preds.targets[head], activations[head], thresholds.get(head, 0.5)))
    out["loss"] = float(sum(v for k, v in out.items() if k.endswith("/loss")))
    if (
        exclusive_pairs is not None
        and activations.get("general") == "sigmoid"
        and {"general", "character"} <= set(preds.targets)
    ):
        single = preds.targets["character"].sum(axis=1) == 1
        threshold = thresholds.get("general", 0.5)
        out["general/contradictions"] = contradiction_rate(preds.probs["general"], single, exclusive_pairs, threshold)
    return out


def by_head(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{"general/mAP": 0.6, ...} -> {"general": {"mAP": 0.6, ...}, ...}; names without a head are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        head, sep, metric = name.partition("/")
        if sep:
            out.setdefault(head, {})[metric] = value
    return out


def run_dataset(run: Path, data: str | None, split: str = "val", verify: str = "auto") -> Dataset:
    """The dataset to evaluate on (by default the run's own), checked to carry the run's vocabulary and `split`, and
    its shards of `split` checked against dataset.json (`Dataset.check_shards`) before any is read."""
    config = run_dir.read_config(run)
    ds = open_dataset(data or config["dataset"])  # a directory or a URL
    # An extended run (i2v train --init) is measured on other vocabularies too, over the tags they share.
    if ds.vocab.hash != config["vocab_hash"] and "init" not in config:
        raise UserError(f"{ds.root} has another vocabulary than the run {run} was trained on")
    splits = ds.info.splits
    if split not in splits:
        raise UserError(f"{ds.root} has no {split!r} split (it has {', '.join(splits) or 'none'})")
    ds.check_shards([split], verify)
    return ds
