"""Batch tagging (`i2v tag`): the engine (`engine.py`) finds and decodes the images (files, and the members of tar
shards); this writes their records, on stdout or, with `out`, into a file renamed into place when the run ends.

A file that cannot be tagged is named on stderr with its reason, counted and skipped; the summary says how many.
With an ONNX bundle on the CPU, the whole command runs on onnxruntime, numpy and Pillow: nothing here imports torch.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np
from rich.console import Console

from ..errors import UserError, is_disk_full
from ..util import storage
from ..util.shard import in_shard
from . import incremental
from .backends import describe
from .captions import CaptionRules, with_added
from .engine import (
    Batch,
    BatchSummary,
    Engine,
    Item,
    RayOptions,
    check_job,
    discover,
    resolve_batch_size,
    shown,
)
from .sidecars import CollectionOptions, SidecarError, open_collection_writer, target_of
from .tagger import Tagger
from .thresholds import Selection
from .writers import (
    BESIDE_FORMATS,
    FORMATS,
    RECORD_FORMATS,
    CaptionOptions,
    Writer,
    caption_path,
    check_output,
    make_record,
    open_writer,
    output,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagConfig:
    """What `i2v tag` was asked to do."""

    paths: tuple[str, ...]
    model: str
    recursive: bool = False
    threshold: float | None = None  # general; None: the bundle's calibrated thresholds, else 0.35
    character_threshold: float | None = None  # None: the bundle's, else 0.85
    mcut: bool = False  # MCut per image, as the WD Space: general at the MCut, character at max(0.15, MCut)
    format: str = "table"
    batch_size: int | str = "auto"  # a number, or auto (engine.resolve_batch_size: by device and input size)
    exclude: tuple[str, ...] = ()
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    overwrite: bool = False  # tag every file again, however the catalogue has it; txt: replace others' captions
    rules: CaptionRules = field(default_factory=CaptionRules)  # --replace, --max-tags, --add, --append (and exclude)
    collection: CollectionOptions = field(default_factory=CollectionOptions)  # xmp: --xmp-name, --embed, --keep-mtime
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"  # auto (int8 on a CPU where model.int8.onnx exists), fp32 or int8
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays ("I/N" is taken too)
    workers: int | None = None  # decoding threads; None: one per core
    out: str | None = None  # json/jsonl/csv records into this file or URL (written whole at the end); None: stdout
    ray: RayOptions | None = None  # --ray: a Ray Data pipeline writing jsonl parts under `out`, a folder or prefix

    def __post_init__(self) -> None:
        check_job(self)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.ray is not None and (self.out is None or self.format != "jsonl"):
            raise UserError("--ray writes jsonl parts into a folder or prefix: give --format jsonl and --out DIR|URL")
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
            storage.location(self.out, "--out", write=True)
            if self.format not in RECORD_FORMATS:
                raise UserError(f"--out writes records: give --format {', '.join(RECORD_FORMATS)}, not {self.format}")
        for name, t in (("--threshold", self.threshold), ("--character-threshold", self.character_threshold)):
            if t is not None and not 0.0 <= t <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, not {t}")
        if self.mcut and (self.threshold is not None or self.character_threshold is not None):
            raise UserError("--mcut chooses the thresholds per image; give it or --threshold/--character-threshold")
        self.collection.check(self.format)
        if self.rules.append and self.format not in ("txt", "hydrus"):
            raise UserError(f"--append merges into caption files: give --format txt or hydrus, not {self.format}")
        if self.exclude:  # the rules apply every pattern (either spelling, wildcards); the selection the exact ones
            object.__setattr__(self, "rules", replace(self.rules, exclude=(*self.rules.exclude, *self.exclude)))

    @property
    def selection(self) -> Selection:
        return Selection(
            general=self.threshold,
            character=self.character_threshold,
            mcut_general=self.mcut,
            mcut_character=self.mcut,
            exclude=self.rules.exact_excludes,
        )


def parse_exclude(text: str | None) -> tuple[str, ...]:
    """`--exclude "long hair, 1girl"` -> ("long_hair", "1girl"): tags as written in captions or as the model names
    them (spaces or underscores, brackets escaped or not)."""
    if not text:
        return ()
    tags = (t.strip().replace("\\(", "(").replace("\\)", ")") for t in text.split(","))
    return tuple(t.replace(" ", "_") for t in tags if t)


def _own_caption(engine: Engine, item: Item, captions: dict[Path, Path], target_of=caption_path) -> bool:
    """txt: whether the image's caption file is its alone in this run (a.png and a.jpg would share a.txt); the
    same for Lightroom's sidecar names (a.xmp)."""
    target = target_of(item.path)
    first = captions.setdefault(target, item.path)
    if first != item.path or target == item.path:
        engine.fail(item, f"its caption {target.name} would be {first.name}'s too; not tagged", "caption_clash")
        return False
    return True


def _items(cfg: TagConfig, summary: BatchSummary) -> list[Item]:
    """This part's items; txt captions go beside local image files only, so a tar shard or a URL among the inputs
    is refused."""
    found = discover(cfg.paths, cfg.recursive, summary)
    if cfg.format in BESIDE_FORMATS:
        shard = next((it.shard for it in found if it.shard is not None), None)
        if shard is not None:
            raise UserError(
                f"{shown(shard)}: a tar shard; --format {cfg.format} writes beside image files only "
                "(give --format jsonl --out FILE for its members)"
            )
        remote = next((it.path for it in found if storage.is_remote(it.path)), None)
        if remote is not None:
            raise UserError(
                f"{shown(remote)}: a remote file; --format {cfg.format} writes beside local image files only "
                "(give --format jsonl --out URL|FILE for its records)"
            )
    return [it for it in found if in_shard(it.key, cfg.shard)]


def tag_files(
    cfg: TagConfig, out: TextIO | None = None, console: Console | None = None, tagger: Tagger | None = None
) -> BatchSummary:
    """Tag every image under `cfg.paths`; records go to `cfg.out` if set, else to `out` (stdout); reports and
    progress to `console` (stderr).

    Returns the summary; `summary.n_failed` > 0 means some image could not be tagged.
    """
    out = out or sys.stdout
    console = console or Console(stderr=True)
    if cfg.ray is not None:
        from .distributed import tag_on_ray

        return tag_on_ray(cfg, console)
    logging.getLogger("PIL").setLevel(logging.INFO)  # its DEBUG lines (PNG chunks) would bury -v's list of non-images
    summary = BatchSummary("tagged")
    if cfg.out is not None:
        check_output(cfg.out)
    items = _items(cfg, summary)
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision)
    unknown = sorted(cfg.rules.exact_excludes - set(tagger.labels.names))
    if unknown:
        log.warning("--exclude: not in the model's vocabulary: %s", ", ".join(unknown))
    summary.files = len(items)
    summary.device = describe(tagger.backend)
    plan = _plan(cfg, items, tagger, summary)
    try:
        with output(cfg.out, out) as stream:
            writer = _writer(cfg, stream, tagger, plan)  # a rerun to --out FILE carries unchanged records over
            summary.unchanged = plan.unchanged
            _tag(cfg, plan.todo, tagger, writer, summary, console)
    finally:
        plan.close()
    return summary


def _plan(cfg: TagConfig, items: list[Item], tagger: Tagger, summary: BatchSummary) -> incremental.Plan:
    """Which items to tag: those the catalogue of this destination does not have as they are now (all of them for
    records on stdout); txt without --overwrite or --append also passes over captions this tool did not write."""
    from ..formats.vectors import weights_hash

    dest = incremental.destination(cfg.format, cfg.collection.xmp_name, cfg.collection.embed, cfg.out)
    model = (weights_hash(Path(tagger.source)) or tagger.source) if dest else ""
    settings = incremental.settings_hash(cfg.selection, cfg.rules, cfg.caption, cfg.collection, tagger.thresholds)
    plan = incremental.plan(items, dest, model, settings, cfg.overwrite, cfg.shard == (0, 1), cfg.workers)
    summary.unchanged = plan.unchanged
    if cfg.format == "txt" and not (cfg.overwrite or cfg.rules.append):
        summary.captions_kept += incremental.drop_foreign(plan, caption_path)
    return plan


def _writer(cfg: TagConfig, stream: TextIO, tagger: Tagger, plan: incremental.Plan) -> Writer:
    """The format's writer; its writes recorded in the catalogue when the run keeps one."""
    c = cfg.collection
    writer = open_collection_writer(cfg.format, c, cfg.rules.append, cfg.caption.rating_first, plan.added_before)
    if writer is None:
        heads = {**tagger.labels.heads, **({"added": ()} if cfg.rules.add else {})}
        writer = open_writer(cfg.format, stream, heads, cfg.caption)
        if cfg.out is not None and plan.kept:
            incremental.carry_over(plan, writer, cfg.out, cfg.format, shown)
    return incremental.RecordingWriter(writer, plan, rehash=c.embed) if plan.books else writer


def _tag(
    cfg: TagConfig, items: list[Item], tagger: Tagger, writer: Writer, summary: BatchSummary, console: Console
) -> None:
    """Run the engine over the items, one record per image through `writer`, which is closed at the end."""
    selection = cfg.selection
    captions: dict[Path, Path] = {}  # txt: caption file -> the image it is written for, so two never share one
    batch_size = resolve_batch_size(cfg.batch_size, tagger)
    engine = Engine(summary, tagger.image_size, console, batch_size, cfg.workers)
    target = target_of(cfg.format, cfg.collection)
    if target is not None:
        engine.accept = lambda item: _own_caption(engine, item, captions, target)

    def consume(batch: Batch) -> None:
        probs, _ = tagger.run(np.stack([x for _, x in batch]))
        for (item, _), p in zip(batch, probs, strict=True):
            tags = cfg.rules.apply(tagger.select(p, selection))
            record = with_added(make_record(shown(item.path), tags, cfg.caption), cfg.rules.add)
            if _write(writer, record, item, engine, cfg.format):
                summary.done += 1

    engine.run(items, consume, "tagging")
    writer.close()


def _write(writer: Writer, record: dict, item: Item, engine: Engine, format: str) -> bool:
    """One record out; a caption that cannot be written beside its image (a read-only folder) fails that image only.
    A closed stdout (`| head`) or a full disk stops the run."""
    try:
        writer.write(record, item.path)
    except SidecarError as e:  # xmp, hydrus: read-only, a GIF for --embed, a broken sidecar
        engine.fail(item, str(e), e.reason)
        return False
    except OSError as e:
        if format not in BESIDE_FORMATS or is_disk_full(e):
            raise
        engine.fail(item, f"cannot write its caption ({e.strerror or e})", "unwritable")
        return False
    return True
