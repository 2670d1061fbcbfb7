"""Stage 5, evaluate: per-category metrics of one epoch of a run on held-out shards, and calibrated thresholds.

Writes `RUN/eval/epoch-NNN/`: `metrics.json` (per head, the figures training's metrics.csv names the same way:
loss, precision, recall and F1 at the calibrated threshold, macro ones, mAP, the threshold where precision equals
recall, top1/top5 for single-label heads), `per_tag.csv` (every tag with its support, AP, precision, recall and F1),
and `thresholds.json`, which `i2v export` puts in the bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from .errors import UserError
from .evaluation.calibration import calibrate, check_mode, per_tag_rows
from .evaluation.evaluator import PredictOptions, by_head, run_dataset
from .evaluation.vocab_map import head_names, mapped_metrics, predict_mapped, restrict
from .formats import run as run_dir
from .formats.bundle import Thresholds, write_thresholds
from .formats.dataset import VERIFY
from .formats.vocab import read_vocab
from .models import load_tagger
from .util.device import resolve_device


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
    verify: str = "auto"  # the split's shards against dataset.json: auto, sizes or checksums (formats.dataset)
    out: str | None = None  # where to write; None: RUN/eval/epoch-NNN/

    def __post_init__(self) -> None:
        for name in ("run", "split", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"EvalConfig.{name} must be a non-empty string, not {getattr(self, name)!r}")
        run_dir.check_epoch(self.epoch)
        check_mode(self.mode)
        if self.verify not in VERIFY:
            raise UserError(f"--verify must be one of {', '.join(VERIFY)}, not {self.verify!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"--workers must be 0 or more, not {self.workers!r}")


@dataclass(frozen=True)
class EvalReport:
    """What `i2v evaluate` measured: the run, epoch, split and dataset, the summed loss of the heads, and per head
    its named figures (None where a figure is undefined, e.g. mAP without positives); `out` is where it wrote."""

    run: str
    epoch: int
    split: str
    data: str
    loss: float | None
    heads: dict[str, dict[str, float | int | None]]
    out: str

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_run(cfg: EvalConfig, console: Console | None = None) -> EvalReport:
    """Measure one epoch of a run; write metrics.json, per_tag.csv and thresholds.json; return the report."""
    run = Path(cfg.run)
    epoch = run_dir.resolve_epoch(run, cfg.epoch)
    ds = run_dataset(run, cfg.data, cfg.split, cfg.verify)
    model = load_tagger(run_dir.read_config(run)["model"], run_dir.weights_path(run, epoch))
    device = resolve_device(cfg.device)
    opts = PredictOptions(cfg.batch_size, cfg.workers, autocast="bfloat16" if device.type == "cuda" else None)
    console = console or Console(stderr=True)
    # An extended run (i2v train --init) is also measured on data sets of another vocabulary: over the tags both have.
    full, vmap = predict_mapped(model, read_vocab(run_dir.vocab_path(run)), ds, cfg.split, device, opts, console)
    if not full.images:
        raise UserError(f"{ds.root}: the {cfg.split} split has no images")
    if not vmap.identical:
        console.print(f"counting the {vmap.shared} tags of {ds.root} that the model has", highlight=False)
    preds = restrict(full, vmap.known)
    names = head_names(vmap.model, vmap.known, preds.probs)
    got = calibrate(preds, names, cfg.mode, cfg.per_tag)
    thresholds = Thresholds(got.heads, got.tags, f"{cfg.mode} on {cfg.split} of {run.name} epoch {epoch}, {ds.root}")
    activations = {h.name: h.activation for h in model.cfg.heads}
    metrics = run_dir.json_finite(mapped_metrics(full, vmap.known, activations, thresholds.heads))
    out = Path(cfg.out) if cfg.out else run_dir.eval_dir(run, epoch)
    report = EvalReport(str(run), epoch, cfg.split, str(ds.root), metrics["loss"], by_head(metrics), str(out))
    written = {k: v for k, v in report.as_dict().items() if k != "out"}
    run_dir.write_eval_metrics(out, {**written, "config": asdict(cfg)})
    run_dir.write_per_tag(out, per_tag_rows(preds, names, thresholds))
    write_thresholds(thresholds, out / "thresholds.json")
    return report


def several_outs(run: str, epoch: str, data: list[str]) -> list[str]:
    """Where `i2v evaluate RUN --data A --data B` writes each report: RUN/eval/epoch-NNN/NAME/, NAME the data set's
    folder name (numbered when two share one)."""
    n = run_dir.resolve_epoch(Path(run), epoch)
    names = [str(d).rstrip("/").rsplit("/", 1)[-1] or "data" for d in data]
    unique = [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names)]
    return [str(run_dir.eval_dir(Path(run), n) / name) for name in unique]
