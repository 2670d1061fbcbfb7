"""`i2v distill`: a small student trained to imitate a big teacher on unlabelled images.

Two stages, meeting through files: the teacher pass (`infer/teach.py`) caches the teacher's outputs and the
student-size images (`formats/teacher.py`, by default in `RUN/teacher/`), then `i2v train`'s `fit` trains the student
on that cache (`train/distill.py`: the soft-target loss and the agreement figures). The result is a normal run:
`i2v export RUN` makes a bundle of it, with the thresholds matched to the teacher's decisions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .errors import UserError
from .formats import teacher as cache
from .formats.run import read_history
from .infer.teach import TeachConfig, TeachSummary, teach
from .train import distill as student
from .train import distributed
from .train.config import TrainConfig, default_workers
from .train.loop import TrainSummary, fit
from .train.setup import prepare_run

TEACHER_DIR = "teacher"  # the cache's default place, inside the run


@dataclass(frozen=True)
class DistillConfig:
    """`i2v distill`'s options, by the flags' names."""

    teacher: str  # anything Tagger.load opens: a bundle, a WD v3 snapshot, a WD ONNX directory, a hub id
    images: tuple[str, ...]  # folders, files, tar shards, URLs
    student: str  # a preset or any timm model name
    size: int  # the student's input side
    out: str  # the run directory
    epochs: int = 10
    batch_size: int = 32
    pretrained: bool = False  # the backbone's pretrained weights (timm's, from the network); else random
    lr: float = 3e-3
    val_fraction: float = 0.1  # images held out to measure agreement, chosen by a hash of their paths
    teacher_cache: str | None = None  # None: RUN/teacher
    teacher_batch_size: int | str = "auto"
    part_size: int = 256
    backend: str = "auto"  # the teacher's
    device: str = "auto"
    workers: int = field(default_factory=default_workers)  # the student's loader processes
    decode_workers: int | None = None  # the teacher pass's decoding threads
    seed: int = 0
    select_by: str = student.SELECT_BY
    amp: str = "auto"
    max_steps_per_epoch: int | None = None
    resume: bool = False  # continue the student's training (the teacher pass always continues)
    teacher_only: bool = False  # the teacher pass alone (the cache), no training

    def __post_init__(self) -> None:
        if isinstance(self.images, str):
            raise UserError("DistillConfig.images: a sequence of paths, not one path")
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        for name in ("teacher", "student", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"--{name} must be a non-empty string, not {getattr(self, name)!r}")
        self.teach_config()  # the teacher pass's options, checked now
        self.train_config(())  # and the student's

    @property
    def cache(self) -> str:
        return self.teacher_cache or str(Path(self.out) / TEACHER_DIR)

    def teach_config(self) -> TeachConfig:
        return TeachConfig(
            teacher=self.teacher,
            paths=self.images,
            size=self.size,
            cache=self.cache,
            val_fraction=self.val_fraction,
            part_size=self.part_size,
            batch_size=self.teacher_batch_size,
            workers=self.decode_workers,
            backend=self.backend,
            device=self.device,
        )

    def train_config(self, softmax: tuple[str, ...]) -> TrainConfig:
        return TrainConfig(
            data=self.cache,
            out=self.out,
            arch=self.student,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            workers=self.workers,
            seed=self.seed,
            select_by=self.select_by,
            amp=self.amp,
            pretrained=self.pretrained,
            softmax=softmax,
            rating_head=True,
            device=self.device,
            max_steps_per_epoch=self.max_steps_per_epoch,
            distill=True,
        )


@dataclass(frozen=True)
class DistillSummary:
    """What `i2v distill` did: the teacher pass, the student's training, and the best epoch's agreement."""

    run: str
    cache: str
    teacher: TeachSummary
    train: TrainSummary | None  # None with teacher_only
    agreement: dict[str, float]  # the best epoch's val/agreement/... figures (and val/general/mAP against the teacher)

    def as_dict(self) -> dict:
        return {
            "run": self.run,
            "cache": self.cache,
            "teacher": dataclasses.asdict(self.teacher),
            "train": self.train.as_dict() if self.train else None,
            "agreement": self.agreement,
        }


def distill(cfg: DistillConfig, console: Console | None = None) -> DistillSummary:
    """The teacher pass (resumed where a cache exists), then the student's training on its cache.

    Under torchrun, rank 0 alone runs the teacher pass while the other ranks wait for it (as long as the process
    group's timeout allows, 30 minutes by default: run a longer pass first with `teacher_only`), then every rank
    trains (DDP)."""
    console = console or Console(stderr=True)
    student.check_student(cfg.student, cfg.size)
    d = distributed.setup(cfg.device)
    finished = False
    try:
        if not cfg.resume and not cfg.teacher_only:  # a run already there is refused now, not after the teacher pass
            distributed.on_main(d, lambda: prepare_run(cfg.train_config(()), resume=False))
        taught = distributed.on_main(d, lambda: _teach(cfg, console))
        if cfg.teacher_only:
            finished = True
            return DistillSummary(cfg.out, cfg.cache, taught, None, {})
        info = cache.read_identity(Path(cfg.cache))
        trained = fit(cfg.train_config(student.student_softmax(info)), resume=cfg.resume, console=console)
        finished = True
    finally:
        distributed.teardown(d, finished)
    return DistillSummary(cfg.out, cfg.cache, taught, trained, agreement_of(trained))


def _teach(cfg: DistillConfig, console: Console) -> TeachSummary:
    taught = teach(cfg.teach_config(), console)
    console.print(taught.line(), highlight=False, soft_wrap=True)
    return taught


def agreement_of(summary: TrainSummary) -> dict[str, float]:
    """The best epoch's agreement figures, read back from the run's metrics (the last epoch's when none is best)."""
    rows = {r.get("epoch"): r for r in read_history(Path(summary.run))}
    row = rows.get(summary.best_epoch) or summary.last
    keys = [k for k in row if k.startswith("val/agreement/")] + ["val/general/mAP", "val/character/top1"]
    return {k: float(row[k]) for k in keys if k in row}
