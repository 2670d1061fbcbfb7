"""Stage 6, export: one epoch of a run -> a model bundle (config.json, model.safetensors, selected_tags.csv,
extra_tags.csv, thresholds.json) and optionally model.onnx in the WD taggers' convention; or, with `--for`, the
ONNX file and its labels named and placed as one of the WD front ends (kohya's tagger, ComfyUI-WD14-Tagger, the
webui tagger, taggui) expects them.

Thresholds come from `i2v evaluate` when it ran on that epoch, or for a distilled run (`i2v distill`) from those
matched to its teacher at that epoch; otherwise export calibrates them on the run's
validation split itself (or, with no validation images, keeps the usual defaults), so export never depends on a
prior evaluate. The same pass measures each feature's median, which `extract_binary_feature` thresholds at.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .errors import UserError
from .evaluation.calibration import calibrate
from .evaluation.evaluator import PredictOptions, run_dataset
from .evaluation.vocab_map import head_names, original_thresholds, predict_mapped, restrict
from .formats.bundle import (
    ONNX_FILE,
    WD_LABELS,
    BundleInfo,
    Thresholds,
    check_out,
    check_remote_out,
    read_thresholds,
    save_bundle,
    upload_bundle,
)
from .formats.run import check_epoch, eval_dir, read_config, read_history, resolve_epoch, vocab_path, weights_path
from .formats.teacher import agreement_path, read_agreement
from .formats.vocab import Vocab, read_vocab
from .models import load_tagger
from .models.onnx import export_onnx
from .util import storage
from .util.device import resolve_device

log = logging.getLogger(__name__)
CALIBRATION_SAMPLES = 5000  # enough validation images for stable thresholds and medians; a bounded pass
FRONT_ENDS = ("wd", "kohya", "comfyui", "webui", "taggui")  # --for; wd: the bundle itself, a WD tagger directory
KOHYA_SIZE = 448  # kohya's tag_images_by_wd14_tagger.py resizes every image to IMAGE_SIZE = 448, not an option
# The webui tagger (picobyte's fork) loads a local model only from a folder of models/TaggerOnnx that it knows by
# name, and of the names it knows only this one does not go to the Hugging Face Hub instead.
WEBUI_FOLDER = "wd-v1-4-convnextv2-tagger-v2"
# taggui picks the class of a model by words in its path: "wd" and "tagger" make a WD tagger, unless a word of the
# models it checks first is in the path too.
TAGGUI_TAKEN = ("cogvlm", "florence", "joycaption", "kosmos", "llava", "moondream", "phi-3")


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
    target: str | None = None  # --for: one of FRONT_ENDS (implies ONNX); None: the bundle, ONNX with `onnx`
    name: str | None = None  # the model's name in the front end; None: the run directory's name

    def __post_init__(self) -> None:
        for name in ("run", "out", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"ExportConfig.{name} must be a non-empty string, not {getattr(self, name)!r}")
        check_epoch(self.epoch)
        if not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"--workers must be 0 or more, not {self.workers!r}")
        if self.target is not None and self.target not in FRONT_ENDS:
            raise UserError(f"--for must be one of {', '.join(FRONT_ENDS)}, not {self.target!r}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UserError(f"--name must be letters, digits, '.', '_' or '-' (a file name), not {self.name!r}")

    @property
    def front_end(self) -> str | None:
        """The front end whose layout is written, or None for a bundle (--for wd is the bundle, with ONNX)."""
        return None if self.target in (None, "wd") else self.target

    @property
    def model_name(self) -> str:
        return self.name or re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.run).resolve().name).lstrip("._-") or "model"


@dataclass(frozen=True)
class ExportSummary:
    """What export wrote: the bundle, from which epoch, where its thresholds came from, and the ONNX parity."""

    bundle: str
    run: str
    epoch: int
    thresholds: str  # where the thresholds came from
    onnx_max_abs_diff: float | None = None  # with --onnx: the largest difference in probability from torch
    onnx_seconds: float | None = None
    target: str | None = None  # --for
    files: tuple[str, ...] = ()  # with --for a front end: the files written there
    instructions: str = ""  # the command or setting the front end needs
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Calibration:
    thresholds: Thresholds
    source: str  # where the thresholds came from, for the summary
    center: np.ndarray | None  # each feature's median on the validation split


def export(cfg: ExportConfig, console: Console | None = None) -> ExportSummary:
    """Write the bundle, or with a front end as `cfg.target` its files; returns a summary (epoch, where the
    thresholds came from, ONNX parity, and for a front end the files and the setting it needs)."""
    console = console or Console(stderr=True)
    if storage.is_remote(cfg.out):
        return _export_remote(cfg, console)
    if cfg.front_end is None:
        check_out(Path(cfg.out), cfg.overwrite)
        summary, info = _write_bundle(cfg, Path(cfg.out), console)
        if cfg.target != "wd":
            return summary
        said = frontend_instructions("wd", Path(cfg.out), cfg.model_name, (), info.thresholds)
        return dataclasses.replace(summary, target="wd", instructions=said)
    run, out, front = Path(cfg.run), Path(cfg.out), cfg.front_end
    resolve_epoch(run, cfg.epoch)  # a missing run or epoch is reported before the front end's checks
    check_layout(front, read_vocab(vocab_path(run)))
    files = frontend_files(front, out, cfg.model_name)
    _check_free(files, cfg.overwrite)
    size = int(read_config(run)["model"]["image_size"])
    warnings = []
    if front == "kohya" and size != KOHYA_SIZE:
        warnings.append(
            f"kohya's tagger resizes every image to {KOHYA_SIZE} px (IMAGE_SIZE in tag_images_by_wd14_tagger.py, "
            f"not an option); this model takes {size} px, so its file for kohya takes {KOHYA_SIZE} px and resizes "
            f"to {size} inside (bicubic): kohya's tags can differ slightly from i2v tag's"
        )
    if front == "taggui" and any(word in str(files[0].resolve()).lower() for word in TAGGUI_TAKEN):
        warnings.append(
            f"{files[0].parent}: taggui takes a path with any of {', '.join(TAGGUI_TAKEN)} for another model"
        )
    with tempfile.TemporaryDirectory(prefix="i2v-export-") as tmp:
        input_size = KOHYA_SIZE if front == "kohya" else None
        summary, info = _write_bundle(cfg, Path(tmp) / "bundle", console, input_size)
        place(info.root, files)
    said = frontend_instructions(front, out, cfg.model_name, files, info.thresholds)
    return ExportSummary(
        str(out),
        summary.run,
        summary.epoch,
        summary.thresholds,
        summary.onnx_max_abs_diff,
        summary.onnx_seconds,
        front,
        tuple(map(str, files)),
        said,
        tuple(warnings),
    )


def _export_remote(cfg: ExportConfig, console: Console) -> ExportSummary:
    """A bundle for object storage: written whole in a local temporary directory, then uploaded, config.json last."""
    url = str(storage.location(cfg.out, "--out", write=True))
    if cfg.front_end is not None:
        raise UserError(f"--for {cfg.front_end} writes into the front end's folder on this machine; --out is a URL")
    resolve_epoch(Path(cfg.run), cfg.epoch)  # a missing run or epoch is reported before the store is touched
    check_remote_out(url, cfg.overwrite)
    with tempfile.TemporaryDirectory(prefix="i2v-export-") as tmp:
        summary, _ = _write_bundle(dataclasses.replace(cfg, overwrite=False), Path(tmp) / "bundle", console)
        upload_bundle(Path(tmp) / "bundle", url)
    return dataclasses.replace(summary, bundle=storage.display(url))


def _write_bundle(
    cfg: ExportConfig, out: Path, console: Console, input_size: int | None = None
) -> tuple[ExportSummary, BundleInfo]:
    """One epoch of the run as a bundle at `out` (ONNX with --onnx or --for); `input_size`: the ONNX file's."""
    run = Path(cfg.run)
    epoch = resolve_epoch(run, cfg.epoch)
    run_config = read_config(run)
    model = load_tagger(run_config["model"], weights_path(run, epoch))
    vocab = read_vocab(vocab_path(run))
    if vocab.hash != run_config.get("vocab_hash"):
        raise UserError(f"{run}: selected_tags.csv is not the vocabulary the run was trained on")
    cal = _calibration(run, epoch, model, vocab, cfg, console)
    model = model.cpu().eval()
    with_onnx = cfg.onnx or cfg.target is not None
    onnx_seconds: list[float] = []

    def write_onnx(path: Path) -> dict:
        t0 = time.perf_counter()
        described = export_onnx(model, path, input_size=input_size)
        onnx_seconds.append(round(time.perf_counter() - t0, 1))
        return described

    metrics = next((row for row in read_history(run) if row.get("epoch") == epoch), {})
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    info = save_bundle(
        out,
        model,
        vocab,
        cal.thresholds,
        source={
            "run": str(run),
            "epoch": epoch,
            "val": val,
            **({"init": run_config["init"]} if "init" in run_config else {}),
        },
        feature_center=cal.center,
        onnx=write_onnx if with_onnx else None,
        overwrite=cfg.overwrite,
    )
    diff = info.config["onnx"]["max_abs_diff"] if with_onnx else None
    seconds = onnx_seconds[0] if with_onnx else None
    return ExportSummary(str(out), str(run), epoch, cal.source, diff, seconds), info


# ---- the front ends' layouts


def check_layout(front: str, vocab: Vocab) -> None:
    """Refuse a vocabulary that a front end would misread: kohya and the webui tagger take the first 4 values as
    the ratings; ComfyUI takes every row from the first character on as a character, so it needs both heads."""
    heads = {h: len(rows) for h, rows in vocab.heads.items()}
    if front in ("kohya", "webui") and heads.get("rating") != 4:
        raise UserError(
            f"--for {front}: it reads the first 4 outputs as the ratings; this model has "
            f"{heads.get('rating', 0)} rating tags"
        )
    missing = [h for h in ("general", "character") if h not in heads]
    if missing:
        raise UserError(f"--for {front}: it needs general and character tags; this model has no {' or '.join(missing)}")


def frontend_files(front: str, out: Path, name: str) -> tuple[Path, Path]:
    """Where a front end looks for the model and its labels, given the folder the user points it at.

    kohya: MODEL_DIR/REPO_ID with "/" as "_"/ (we name the repo illust2vec/NAME); ComfyUI: NAME.onnx beside NAME.csv
    in its models folder; the webui tagger: a folder of models/TaggerOnnx with one .onnx and one .csv; taggui: a folder
    in its models directory whose path says "wd" and "tagger", with model.onnx and selected_tags.csv."""
    if front == "comfyui":
        return out / f"{name}.onnx", out / f"{name}.csv"
    folder = {
        "kohya": f"illust2vec_{name}",
        "webui": WEBUI_FOLDER,
        "taggui": name if ("wd" in name.lower() and "tagger" in name.lower()) else f"{name}-wd-tagger",
    }[front]
    return out / folder / ONNX_FILE, out / folder / WD_LABELS


def _check_free(files: tuple[Path, Path], overwrite: bool) -> None:
    """Refuse to replace a front end's files without --overwrite; the folder itself may hold other models."""
    taken = [f for f in files if f.exists()]
    if taken and not overwrite:
        raise UserError(f"{taken[0]} exists; add --overwrite to replace it")
    if files[0].parent.exists() and not files[0].parent.is_dir():
        raise UserError(f"--out {files[0].parent} is a file; the front end's models folder is a directory")


def place(bundle: Path, files: tuple[Path, Path]) -> None:
    """Copy the bundle's model.onnx and selected_tags.csv to a front end's names: each written beside its place
    and renamed, the labels first, so the front end never sees a model without its labels."""
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((bundle / WD_LABELS, files[1]), (bundle / ONNX_FILE, files[0])):
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def frontend_instructions(front: str, out: Path, name: str, files: tuple[Path, ...], thresholds: Thresholds) -> str:
    """The one command or setting the front end needs, with the model's calibrated thresholds."""
    g, c = (round(thresholds.heads.get(h, 0.5), 2) for h in ("general", "character"))
    if front == "kohya":
        return (
            f"python finetune/tag_images_by_wd14_tagger.py --onnx --repo_id illust2vec/{name} --model_dir {out} "
            f"--general_threshold {g} --character_threshold {c} --batch_size 8 IMAGE_DIR  "
            f"(kohya feeds {KOHYA_SIZE} px images, always)"
        )
    if front == "comfyui":
        return f"WD14 Tagger node: model {name}, threshold {g}, character_threshold {c} (restart ComfyUI to list it)"
    if front == "webui":
        return (
            f"Tagger tab: Interrogator {WEBUI_FOLDER} (the local folder {files[0].parent}), Weight threshold {g} "
            f"(one threshold for general and character tags); press 'Unload all models' or restart to load it"
        )
    if front == "taggui":
        return (
            f"Settings > Models directory: {out}; Auto-Captioner: model {files[0].parent}, Minimum probability {g} "
            "(one threshold for general and character tags), Maximum tags as you like"
        )
    return f"i2v tag IMAGES --model {out} (or any WD tagger script: model.onnx beside selected_tags.csv)"


def _calibration(
    run: Path, epoch: int, model: torch.nn.Module, vocab: Vocab, cfg: ExportConfig, console: Console
) -> _Calibration:
    """Thresholds (from `i2v evaluate` when it ran on the epoch, else F1 on the validation split, else the
    defaults) and the feature medians, from one bounded pass over the validation split."""
    evaluated = eval_dir(run, epoch) / "thresholds.json"
    thresholds = read_thresholds(evaluated) if evaluated.exists() else None
    source = f"i2v evaluate ({evaluated})" if thresholds is not None else "calibrated on the validation split"
    if thresholds is None and (matched := read_agreement(run, epoch)) is not None:  # i2v distill's, per epoch
        thresholds, source = matched, f"matched to the teacher's decisions ({agreement_path(run, epoch)})"
    center = None
    try:
        ds = run_dataset(run, None)
        device = resolve_device(cfg.device)
        autocast = "bfloat16" if device.type == "cuda" else None
        opts = PredictOptions(workers=cfg.workers, autocast=autocast, features=True, max_samples=CALIBRATION_SAMPLES)
        # An extended run's data set labels only some of its tags (i2v train --init): calibrated on those.
        full, vmap = predict_mapped(model, vocab, ds, "val", device, opts, console)
        preds = restrict(full, vmap.known)
        if not preds.images:
            raise UserError(f"{ds.root}: the val split has no images")
        center = np.median(preds.features, axis=0).astype(np.float32)
        if thresholds is None:
            names = head_names(vocab, vmap.known, preds.probs)
            got = calibrate(preds, names, "f1", per_tag=False)
            thresholds = Thresholds(got.heads, got.tags, f"f1 on val of {run.name} epoch {epoch} (export)")
            thresholds = original_thresholds(run, thresholds, vocab, full)  # tags val never shows: the original's
    except UserError as e:  # the dataset moved or has no validation split: the usual defaults
        log.warning("no calibration (%s); using the default thresholds", e)
        if thresholds is None:
            source = f"defaults: no validation images ({e})"
            thresholds = Thresholds(method="defaults (no validation images at export)")
    return _Calibration(thresholds, source, center)
