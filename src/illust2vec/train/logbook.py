"""The one writer of a run's record: config.json and the vocabulary at the start, then per epoch metrics.csv,
curves.png, TensorBoard and a line on the console, and best.json at the end. Only the main process writes."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from ..formats import run as run_dir
from ..formats.vocab import Vocab, write_vocab
from ..util import storage
from .plots import plot_curves

log = logging.getLogger(__name__)
CONSOLE_KEYS = ("train/loss", "val/loss", "val/general/mAP", "val/character/top1", "val/character/mAP")
# An extended run's (i2v train --init) figures for the original model's tags and the new ones.
EXTENDED_KEYS = ("val/old/character/top1", "val/new/character/top1", "val/old/general/mAP")
# A distilled run's (i2v distill) agreement with its teacher.
DISTILLED_KEYS = ("val/agreement/general/f1", "val/agreement/character/top1", "val/agreement/rating/accuracy")


class Logbook:
    """Writes the run directory's record; on any process but the main one, writes nothing."""

    def __init__(self, run: Path, console: Console, enabled: bool = True, title: str = ""):
        self.run, self.console, self.enabled, self.title = Path(run), console, enabled, title
        self._tb = None

    def start(self, config: dict, vocab: storage.Location | Vocab) -> None:
        """config.json, the vocabulary beside it (a copy of the dataset's file, or an extended run's merged one), and
        the TensorBoard writer."""
        if not self.enabled:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        if isinstance(vocab, Vocab):
            write_vocab(vocab, run_dir.vocab_path(self.run))
        else:
            storage.download(vocab, run_dir.vocab_path(self.run))  # a copy, also from a dataset given as a URL
        run_dir.write_config(self.run, config)
        self._tb = _tensorboard(self.run)

    def epoch(self, history: list[dict], best_epoch: int | None, select_key: str) -> None:
        """The latest row of `history` into metrics.csv, curves.png and TensorBoard, and a line on the console."""
        if not self.enabled:
            return
        row = history[-1]
        run_dir.write_metrics(self.run, history)
        plot_curves(history, self.run / run_dir.CURVES, best_epoch, title=self.title)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()
        self.console.print(epoch_line(row, select_key), highlight=False)

    def finish(self, summary: dict) -> None:
        """best.json; closes TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled:
            run_dir.write_best(self.run, summary)


def epoch_line(row: dict, select_key: str) -> str:
    keys = dict.fromkeys((*CONSOLE_KEYS, *EXTENDED_KEYS, *DISTILLED_KEYS, select_key))
    shown = ", ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
    bad = int(row.get("train/bad_samples", 0) + row.get("val/bad_samples", 0))
    skipped = f", {bad} unreadable samples skipped" if bad else ""
    return (
        f"epoch {row['epoch']}: {shown} ({row['seconds']:.0f} s, {row.get('train/images_per_s', 0):.0f} img/s{skipped})"
    )


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the train extra; without it the CSV and the picture remain
        log.warning("tensorboard is not installed; writing metrics.csv and curves.png only")
        return None
    return SummaryWriter(str(run / run_dir.TENSORBOARD))
