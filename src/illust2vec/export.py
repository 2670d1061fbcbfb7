"""Stage 6, export: one epoch of a run -> a model bundle (config.json, model.safetensors, selected_tags.csv,
thresholds.json) and optionally model.onnx in the WD taggers' convention.

Thresholds come from `i2v evaluate` when it ran on that epoch; otherwise export calibrates them on the run's
validation split itself (or, with no validation images, keeps the usual defaults), so export never depends on a
prior evaluate. The same pass measures each feature's median, which `extract_binary_feature` thresholds at.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .errors import UserError
from .evaluation.calibration import calibrate
from .evaluation.evaluator import PredictOptions, predict_split, run_dataset
from .formats.bundle import Thresholds, check_out, read_thresholds, save_bundle
from .formats.run import check_epoch, eval_dir, read_config, read_history, resolve_epoch, vocab_path, weights_path
from .formats.vocab import Vocab, read_vocab
from .models import load_tagger
from .models.onnx import export_onnx
from .util.device import resolve_device

log = logging.getLogger(__name__)
CALIBRATION_SAMPLES = 5000  # enough validation images for stable thresholds and medians; a bounded pass


@dataclass(frozen=True)
class ExportConfig:
    """What `i2v export` writes: which epoch of which run, into which bundle directory."""

    run: str
    out: str
    epoch: str = "best"  # a number, best or last
    onnx: bool = False  # also write model.onnx
    overwrite: bool = False  # replace a bundle already in `out`
    workers: int = 2  # loader processes for the calibration pass
    device: str = "auto"  # for the calibration pass

    def __post_init__(self) -> None:
        for name in ("run", "out", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"ExportConfig.{name} must be a non-empty string, not {getattr(self, name)!r}")
        check_epoch(self.epoch)
        if not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"--workers must be 0 or more, not {self.workers!r}")


@dataclass(frozen=True)
class ExportSummary:
    """What export wrote: the bundle, from which epoch, where its thresholds came from, and the ONNX parity."""

    bundle: str
    run: str
    epoch: int
    thresholds: str  # where the thresholds came from
    onnx_max_abs_diff: float | None = None  # with --onnx: the largest difference in probability from torch
    onnx_seconds: float | None = None


@dataclass(frozen=True)
class _Calibration:
    thresholds: Thresholds
    source: str  # where the thresholds came from, for the summary
    center: np.ndarray | None  # each feature's median on the validation split


def export(cfg: ExportConfig, console: Console | None = None) -> ExportSummary:
    """Write the bundle; returns a summary (epoch, where the thresholds came from, ONNX parity)."""
    console = console or Console(stderr=True)
    run, out = Path(cfg.run), Path(cfg.out)
    check_out(out, cfg.overwrite)
    epoch = resolve_epoch(run, cfg.epoch)
    run_config = read_config(run)
    model = load_tagger(run_config["model"], weights_path(run, epoch))
    vocab = read_vocab(vocab_path(run))
    if vocab.hash != run_config.get("vocab_hash"):
        raise UserError(f"{run}: selected_tags.csv is not the vocabulary the run was trained on")
    cal = _calibration(run, epoch, model, vocab, cfg, console)
    model = model.cpu().eval()

    onnx_seconds: list[float] = []

    def write_onnx(path: Path) -> dict:
        t0 = time.perf_counter()
        described = export_onnx(model, path)
        onnx_seconds.append(round(time.perf_counter() - t0, 1))
        return described

    metrics = next((row for row in read_history(run) if row.get("epoch") == epoch), {})
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    info = save_bundle(
        out,
        model,
        vocab,
        cal.thresholds,
        source={"run": str(run), "epoch": epoch, "val": val},
        feature_center=cal.center,
        onnx=write_onnx if cfg.onnx else None,
        overwrite=cfg.overwrite,
    )
    diff = info.config["onnx"]["max_abs_diff"] if cfg.onnx else None
    return ExportSummary(str(out), str(run), epoch, cal.source, diff, onnx_seconds[0] if cfg.onnx else None)


def _calibration(
    run: Path, epoch: int, model: torch.nn.Module, vocab: Vocab, cfg: ExportConfig, console: Console
) -> _Calibration:
    """Thresholds (from `i2v evaluate` when it ran on the epoch, else F1 on the validation split, else the
    defaults) and the feature medians, from one bounded pass over the validation split."""
    evaluated = eval_dir(run, epoch) / "thresholds.json"
    thresholds = read_thresholds(evaluated) if evaluated.exists() else None
    source = f"i2v evaluate ({evaluated})" if thresholds is not None else "calibrated on the validation split"
    center = None
    try:
        ds = run_dataset(run, None)
        device = resolve_device(cfg.device)
        autocast = "bfloat16" if device.type == "cuda" else None
        opts = PredictOptions(workers=cfg.workers, autocast=autocast, features=True, max_samples=CALIBRATION_SAMPLES)
        preds = predict_split(model, ds, "val", device, opts, console=console)
        if not preds.images:
            raise UserError(f"{ds.root}: the val split has no images")
        center = np.median(preds.features, axis=0).astype(np.float32)
        if thresholds is None:
            names = {h: list(vocab.head_names(h)) for h in preds.probs}
            got = calibrate(preds, names, "f1", per_tag=False)
            thresholds = Thresholds(got.heads, got.tags, f"f1 on val of {run.name} epoch {epoch} (export)")
    except UserError as e:  # the dataset moved or has no validation split: the usual defaults
        log.warning("no calibration (%s); using the default thresholds", e)
        if thresholds is None:
            source = f"defaults: no validation images ({e})"
            thresholds = Thresholds(method="defaults (no validation images at export)")
    return _Calibration(thresholds, source, center)
