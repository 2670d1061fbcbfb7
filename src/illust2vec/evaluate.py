"""Stage 5, evaluate: per-category metrics of one epoch of a run on held-out shards, and calibrated thresholds.

Writes `RUN/eval/epoch-NNN/`: `metrics.json` (per head: micro and macro precision, recall and F1 at the calibrated
threshold, mAP, the threshold where precision equals recall, top-1/top-5 for single-label heads), `per_tag.csv`
(every tag with its support, AP, precision, recall and F1), and `thresholds.json`, which `i2v export` puts in the
bundle.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from .formats.dataset import Dataset, open_dataset
from .formats.loader import LoaderConfig, make_loader
from .errors import UserError
from .formats.bundle import DEFAULT_THRESHOLDS, Thresholds, write_thresholds
from .train.checkpoints import load_run_model, resolve_epoch
from .train.metrics import (
    calibrate_thresholds,
    per_tag_ap,
    precision_recall_f1,
    threshold_at_precision_equals_recall,
    topk_accuracy,
)
from .util.device import resolve_device

log = logging.getLogger(__name__)
MODES = ("f1", "pr_equal")


@dataclass(frozen=True)
class EvalConfig:
    """What `i2v evaluate` measures; saved beside its results."""

    run: str
    epoch: str = "best"  # a number, best or last
    data: str | None = None  # the built dataset to read; None: the one the run was trained on
    split: str = "val"
    per_tag: bool = False  # also calibrate one threshold per tag (the original Illustration2Vec shipped those)
    mode: str = "f1"  # thresholds that maximise F1, or where precision equals recall ("pr_equal")
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    max_samples: int | None = None  # stop after this many images (export's quick calibration)


def eval_dir(run: Path, epoch: int) -> Path:
    return Path(run) / "eval" / f"epoch-{epoch:03d}"


def run_dataset(run: Path, data: str | None, split: str = "val") -> Dataset:
    """The dataset to evaluate on (by default the run's own), checked to carry the run's vocabulary and `split`."""
    try:
        config = json.loads((Path(run) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: cannot read the run's config.json ({e})") from None
    ds = open_dataset(Path(data or config["dataset"]))
    if ds.vocab.hash != config["vocab_hash"]:
        raise UserError(f"{ds.root} has another vocabulary than the run {run} was trained on")
    splits = ds.info.splits
    if split not in splits:
        raise UserError(f"{ds.root} has no {split!r} split (it has {', '.join(splits) or 'none'})")
    return ds


@torch.no_grad()
def predict_split(
    model: torch.nn.Module, ds: Dataset, cfg: EvalConfig, features: bool = False, console: Console | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """Probabilities and targets per head over one split (and the feature vectors, when asked), in shard order."""
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loader = make_loader(ds, cfg.split, LoaderConfig(batch_size=cfg.batch_size, workers=cfg.workers), train=False)
    probs: dict[str, list] = {}
    targets: dict[str, list] = {}
    feats: list[np.ndarray] = []
    total = ds.samples(cfg.split) if cfg.max_samples is None else min(cfg.max_samples, ds.samples(cfg.split))
    seen = 0
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{cfg.split} images", total=total)
        for images, batch_targets in loader:
            images = images.to(device, non_blocking=True)
            with amp:
                maps = model.forward_features(images)
                logits = model.forward_head(maps)
                if features:
                    feats.append(model.forward_head(maps, pre_logits=True).float().cpu().numpy())
            for head, p in model.activate({k: v.float() for k, v in logits.items()}).items():
                probs.setdefault(head, []).append(p.cpu().numpy())
                targets.setdefault(head, []).append(batch_targets[head].numpy())
            seen += len(images)
            progress.update(task, completed=min(seen, total))
            if cfg.max_samples is not None and seen >= cfg.max_samples:
                break
    if not seen:
        raise UserError(f"{ds.root}: the {cfg.split} split has no images")
    cat = {k: np.concatenate(v) for k, v in probs.items()}
    tcat = {k: np.concatenate(v) for k, v in targets.items()}
    return cat, tcat, (np.concatenate(feats) if features else None)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def head_report(head: str, p: np.ndarray, t: np.ndarray, activation: str, threshold: float) -> dict:
    """One head's figures: micro/macro P, R, F1 at `threshold`, mAP, the P = R threshold and its P and R, top-k."""
    if t.ndim == 1:  # rating: one class per image, -1 unknown
        known = t >= 0
        hits = (p[known].argmax(axis=1) == t[known]).mean() if known.any() else float("nan")
        return {"accuracy": _finite(hits), "images": int(known.sum())}
    out = {k: _finite(v) for k, v in precision_recall_f1(p, t, threshold).items()}
    out["threshold"] = _finite(threshold)
    ap = per_tag_ap(p, t)
    out["mAP"] = _finite(float(np.nanmean(ap)) if (~np.isnan(ap)).any() else float("nan"))
    pr = threshold_at_precision_equals_recall(p, t)
    out["threshold_p_eq_r"] = _finite(pr)
    if math.isfinite(pr):
        at = precision_recall_f1(p, t, pr)
        out["precision_at_p_eq_r"] = _finite(at["micro_precision"])
        out["recall_at_p_eq_r"] = _finite(at["micro_recall"])
    if activation == "softmax" or head in ("character", "copyright", "artist"):  # the figure people quote for these
        out["top1"] = _finite(topk_accuracy(p, t, 1))
        out["top5"] = _finite(topk_accuracy(p, t, 5))
    out["images"] = int(len(t))
    out["positives"] = int(t.sum())
    return out


def calibrate(
    probs: dict[str, np.ndarray], targets: dict[str, np.ndarray], names: dict[str, list[str]], mode: str, per_tag: bool
) -> Thresholds:
    """Thresholds per head (and per tag) from one split's scores; a head or tag without positives keeps the default."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    heads, tags = {}, {}
    for head, p in probs.items():
        t = targets[head]
        if t.ndim == 1:
            continue  # rating is read as its arg-max
        got = calibrate_thresholds(p, t, mode=mode, per_tag=per_tag)
        head_thr = got if not per_tag else calibrate_thresholds(p, t, mode=mode)
        heads[head] = float(head_thr) if math.isfinite(head_thr) else DEFAULT_THRESHOLDS.get(head, 0.5)
        if per_tag:
            labelled = t.sum(axis=0) > 0
            for name, thr, has in zip(names[head], np.asarray(got), labelled, strict=True):
                if has and math.isfinite(thr):
                    tags[name] = float(thr)
    return Thresholds(heads={**DEFAULT_THRESHOLDS, **heads}, tags=tags, method=mode)


def evaluate_run(cfg: EvalConfig, console: Console | None = None) -> dict:
    """Measure one epoch of a run; write metrics.json, per_tag.csv and thresholds.json; return the report."""
    run = Path(cfg.run)
    epoch = resolve_epoch(run, cfg.epoch)
    ds = run_dataset(run, cfg.data, cfg.split)
    model = load_run_model(run, epoch)
    probs, targets, _ = predict_split(model, ds, cfg, console=console)
    names = {h: list(ds.vocab.head_names(h)) for h in probs}
    activations = {h.name: h.activation for h in model.cfg.heads}
    thresholds = calibrate(probs, targets, names, cfg.mode, cfg.per_tag)
    thresholds = Thresholds(
        thresholds.heads, thresholds.tags, f"{cfg.mode} on {cfg.split} of {run.name} epoch {epoch}, {ds.root}"
    )
    heads = {h: head_report(h, probs[h], targets[h], activations[h], thresholds.heads.get(h, 0.5)) for h in probs}
    report = {"run": str(run), "epoch": epoch, "split": cfg.split, "data": str(ds.root), "heads": heads}
    out = eval_dir(run, epoch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**report, "config": asdict(cfg)}, indent=1))
    write_per_tag(out / "per_tag.csv", probs, targets, names, thresholds)
    write_thresholds(thresholds, out / "thresholds.json")
    report["out"] = str(out)
    return report


def write_per_tag(
    path: Path,
    probs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    names: dict[str, list[str]],
    thresholds: Thresholds,
) -> None:
    """One row per tag: head, tag, support (positives in the split), AP, and P, R, F1 at the tag's threshold."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["head", "tag", "support", "ap", "threshold", "precision", "recall", "f1"])
        for head, p in probs.items():
            t = targets[head]
            if t.ndim == 1:  # rating: per-class one-vs-rest figures at the arg-max
                t = np.eye(p.shape[1], dtype=np.float32)[np.where(t >= 0, t, 0)] * (t >= 0)[:, None]
                pred = np.eye(p.shape[1], dtype=bool)[p.argmax(axis=1)]
                thr = [None] * p.shape[1]
            else:
                thr = [thresholds.tags.get(n, thresholds.heads.get(head, 0.5)) for n in names[head]]
                pred = p >= np.asarray(thr)[None]
            pos = t > 0.5
            ap = per_tag_ap(p, t)
            tp, n_pred, n_pos = (pred & pos).sum(0), pred.sum(0), pos.sum(0)
            for j, name in enumerate(names[head]):
                prec = tp[j] / n_pred[j] if n_pred[j] else 0.0
                rec = tp[j] / n_pos[j] if n_pos[j] else float("nan")
                f1 = 2 * tp[j] / (n_pred[j] + n_pos[j]) if n_pred[j] + n_pos[j] else float("nan")
                w.writerow([head, name, int(n_pos[j]), _fmt(ap[j]), _fmt(thr[j]), _fmt(prec), _fmt(rec), _fmt(f1)])


def _fmt(x) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.4f}"
