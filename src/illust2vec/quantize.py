"""Stage `i2v quantize`: an ONNX tagger (our bundle, or a WD ONNX directory) -> `model.int8.onnx` beside its
`model.onnx`, with int8 weights (about a quarter of the size), and a report of how far its decisions move.

Static mode (the default) is onnxruntime's QDQ quantization, per channel: int8 weights, uint8 activations whose
ranges come from calibration images, prepared exactly as `i2v tag` prepares them (`util.images.load_for_input` and
`pad_resize`, BGR, 0..255, NHWC). Dynamic mode quantizes the weights of MatMul and Gemm only and measures the
activations' ranges on the fly, which keeps transformers that static mode hurts; convolutions stay in fp32.

Calibration images come from `--calibration` (folders, image files, tar shards) or, for a bundle whose run is still
where the bundle says, from that run's validation split. A third of them (every third image) is held out: on
those, the int8 model's decisions are compared with model.onnx's (per category, F1 of int8's decisions against
fp32's at the model's thresholds; rating: agreement of the arg-max) with the largest probability difference. The
report is printed and recorded (`formats.bundle.record_int8`: a bundle's config.json, a WD directory's int8.json).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from .errors import UserError
from .evaluation.metrics import precision_recall_f1
from .formats.bundle import (
    INT8_FILE,
    INT8_REPORT,
    ONNX_FILE,
    WD_LABELS,
    Labels,
    Thresholds,
    is_bundle,
    open_bundle,
    read_thresholds,
    record_int8,
)
from .formats.inputs import discover, read_item, suffix, why
from .formats.vocab import read_vocab
from .util import storage
from .util.images import BadImage, load_for_input, pad_resize
from .util.progress import progress_bar

log = logging.getLogger(__name__)
MODES = ("static", "dynamic")
MIN_CALIBRATION = 8  # images to calibrate on, at the least
MIN_CHECK = 4  # held-out images to measure agreement on, at the least
# Input pixels per calibration batch: 8 images at 128 px, one at 448. The calibrating session keeps every
# intermediate tensor alive: a 448 px base model took over 20 GB at batch 8, about 6 GB at batch 1.
CALIBRATION_PIXELS = 8 * 128 * 128


@dataclass(frozen=True)
class QuantizeConfig:
    """What `i2v quantize` does: which model, calibrated on which images, written where, how."""

    model: str  # a bundle with model.onnx, or a WD ONNX directory (model.onnx, selected_tags.csv)
    calibration: tuple[str, ...] = ()  # folders, image files or tar shards; () = the bundle's validation split
    out: str | None = None  # None: model.int8.onnx is written in the model's directory; else a copy of it here
    mode: str = "static"  # static (QDQ, per channel, calibrated) or dynamic (MatMul/Gemm weights only)
    images: int = 96  # images read at most: two thirds calibrate, a third (every third one) checks agreement
    check: tuple[str, ...] = ()  # held-out images to check agreement on instead (up to `images`; all calibrate)
    min_f1: float = 0.97  # per-category F1 against fp32's decisions below which the result comes with a warning
    batch_size: int = 8
    overwrite: bool = False  # --out may hold a copy already

    def __post_init__(self) -> None:
        object.__setattr__(self, "check", tuple(str(c) for c in self.check))
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.images < MIN_CALIBRATION + MIN_CHECK:
            raise UserError(f"--images must be at least {MIN_CALIBRATION + MIN_CHECK}, not {self.images}")
        if not 0.0 <= self.min_f1 <= 1.0:
            raise UserError(f"--min-f1 must be within 0..1, not {self.min_f1}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class QuantizeSummary:
    """What was written and how well it agrees with model.onnx."""

    model: str  # the directory holding model.int8.onnx
    kind: str  # bundle or wd-onnx
    mode: str
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    check_images: int
    skipped: int  # calibration files that did not decode
    f1: dict[str, float]  # per category: F1 of int8's decisions against fp32's
    max_prob_diff: float  # the largest |p_int8 - p_fp32| over the held-out images and every tag
    agrees: bool  # every category's F1 at or above min_f1
    min_f1: float
    recorded_in: str  # config.json (a bundle) or int8.json (a WD directory)
    calibration_source: str
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def report(self) -> dict:
        """What goes into the directory's config: everything but where it was written."""
        out = asdict(self)
        for key in ("model", "recorded_in", "warnings"):
            out.pop(key)
        return {"file": INT8_FILE, **out}


@dataclass(frozen=True)
class _Model:
    """An ONNX tagger's directory, as far as quantizing and checking it needs."""

    root: Path
    kind: str
    labels: Labels
    thresholds: Thresholds
    prob_outputs: list[str]
    source_run: str | None  # the run a bundle was exported from, when it names one


def quantize(cfg: QuantizeConfig, console: Console | None = None) -> QuantizeSummary:
    """Write `model.int8.onnx` beside `model.onnx` (in `cfg.model`, or in a copy of it at `cfg.out`), measure its
    agreement with model.onnx on held-out calibration images, record the report and return it."""
    t0 = time.perf_counter()
    console = console or Console(stderr=True)
    model = _open_model(Path(cfg.model))
    _check_out(model.root, cfg.out, cfg.overwrite)  # before the images are read, not after
    fp32 = _session(model.root / ONNX_FILE)
    size, batch = _input_shape(fp32, model.root)
    calib, check, skipped, source_note = _images(cfg, model, size, console)
    root = _target(model.root, cfg.out, cfg.overwrite)
    int8 = root / INT8_FILE
    with console.status(f"quantizing ({cfg.mode}) on {len(calib)} images"):
        calib_batch = batch or min(cfg.batch_size, max(1, CALIBRATION_PIXELS // (size * size)))
        _quantize_file(model.root / ONNX_FILE, int8, cfg.mode, calib, fp32.get_inputs()[0].name, calib_batch)
    want = batch or cfg.batch_size
    p32 = run_probs(fp32, model.prob_outputs, check, want)
    p8 = run_probs(_session(int8), model.prob_outputs, check, want)
    f1 = agreement(p32, p8, model.labels, model.thresholds)
    low = {h: v for h, v in f1.items() if v < cfg.min_f1}
    warnings = []
    if low:
        figures = ", ".join(f"{h} {v:.3f}" for h, v in low.items())
        hint = " (try --mode dynamic)" if cfg.mode == "static" else ""
        warnings.append(
            f"{INT8_FILE} disagrees with {ONNX_FILE} beyond --min-f1 {cfg.min_f1}: F1 {figures}{hint}; written anyway"
        )
    summary = QuantizeSummary(
        model=str(root),
        kind=model.kind,
        mode=cfg.mode,
        fp32_bytes=(model.root / ONNX_FILE).stat().st_size,
        int8_bytes=int8.stat().st_size,
        calibration_images=len(calib),
        check_images=len(check),
        skipped=skipped,
        f1=f1,
        max_prob_diff=round(float(np.abs(p32 - p8).max()), 6),
        agrees=not low,
        min_f1=cfg.min_f1,
        recorded_in="config.json" if model.kind == "bundle" else INT8_REPORT,
        calibration_source=source_note,
        seconds=round(time.perf_counter() - t0, 1),
        warnings=tuple(warnings),
    )
    record_int8(root, summary.report())
    return summary


def _images(cfg: QuantizeConfig, model: _Model, size: int, console: Console) -> tuple[np.ndarray, np.ndarray, int, str]:
    """The calibration images and the held-out ones (every third calibration image, or `cfg.check`'s), how many
    files did not decode, and how to name where they came from."""
    sources, source_note = _calibration_sources(cfg, model)
    images, skipped = read_images(sources, size, cfg.images, console)
    if cfg.check:
        calib = images
        check, bad = read_images(cfg.check, size, cfg.images, console)
        skipped += bad
        source_note += f"; checked on {', '.join(cfg.check)}"
    else:
        calib, check = images[[i % 3 != 2 for i in range(len(images))]], images[2::3]
    if len(calib) < MIN_CALIBRATION or len(check) < MIN_CHECK:
        need = MIN_CALIBRATION + MIN_CHECK  # every third image is held out: 12 give 8 and 4
        raise UserError(
            f"{source_note}: {len(calib) + len(check)} decodable images ({skipped} did not decode); quantizing "
            f"needs at least {need} ({MIN_CALIBRATION} to calibrate, {MIN_CHECK} held out to check)"
        )
    return calib, check, skipped, source_note


# ---- the model


def _open_model(root: Path) -> _Model:
    """Our bundle with model.onnx, or a WD ONNX directory (model.onnx and selected_tags.csv)."""
    if not root.is_dir():
        raise UserError(f"{root}: no such model directory (a bundle with model.onnx, or a WD ONNX directory)")
    if is_bundle(root):
        info = open_bundle(root)
        if info.onnx_path is None or info.onnx_path.name != ONNX_FILE:
            raise UserError(f"{root}: the bundle has no {ONNX_FILE}; write one with i2v export --onnx")
        run = info.config.get("source", {}).get("run")
        return _Model(root, "bundle", info.labels, info.thresholds, info.onnx_outputs[0], run)
    if not (root / ONNX_FILE).is_file() or not (root / WD_LABELS).is_file():
        raise UserError(
            f"{root}: not an ONNX tagger: expected an illust2vec bundle with {ONNX_FILE} (i2v export --onnx) or a WD "
            f"ONNX directory ({ONNX_FILE}, {WD_LABELS})"
        )
    labels = Labels.from_vocab(read_vocab(root / WD_LABELS))
    first = _session(root / ONNX_FILE).get_outputs()[0].name
    return _Model(root, "wd-onnx", labels, read_thresholds(root / "thresholds.json"), [first], None)


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("i2v quantize needs onnxruntime: pip install 'illust2vec[infer]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a broken or foreign file
        raise UserError(f"{path}: cannot open the ONNX model ({e})") from None


def _input_shape(session: Any, root: Path) -> tuple[int, int | None]:
    """The model's input side (NHWC, fixed) and its fixed batch size (None when dynamic)."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
        raise UserError(f"{root}/{ONNX_FILE}: expected an NHWC input of a fixed size with 3 channels, found {shape}")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return shape[1], batch


def _check_out(root: Path, out: str | None, overwrite: bool) -> None:
    """Refuse an --out that holds something, unless --overwrite and it is a model directory (an earlier copy)."""
    dest = Path(out) if out is not None else root
    if dest.resolve() == root.resolve() or not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    if not overwrite or not dest.is_dir() or not (dest / ONNX_FILE).is_file():
        raise UserError(f"--out {dest} exists and is not empty; choose another --out (or --overwrite a copy)")


def _target(root: Path, out: str | None, overwrite: bool) -> Path:
    """Where model.int8.onnx goes: the model's own directory, or a copy of it at `out`."""
    if out is None or Path(out).resolve() == root.resolve():
        return root
    dest = Path(out)
    _check_out(root, out, overwrite)
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(root, tmp, ignore=shutil.ignore_patterns(INT8_FILE, INT8_REPORT, "*.tmp"))
    tmp.rename(dest)
    return dest


# ---- calibration images


def _calibration_sources(cfg: QuantizeConfig, model: _Model) -> tuple[list[str], str]:
    """The places to read calibration images from, and how to name them in messages."""
    if cfg.calibration:
        return list(cfg.calibration), ", ".join(cfg.calibration)
    if model.source_run is None or not Path(model.source_run).is_dir():
        where = f" (its run {model.source_run} is not here)" if model.source_run else ""
        raise UserError(f"{model.root}: give --calibration images (folders or tar shards){where}")
    from .formats.dataset import open_dataset
    from .formats.run import read_config

    config = read_config(Path(model.source_run))
    try:
        shards = open_dataset(config["dataset"]).shards("val")
    except (KeyError, UserError) as e:
        raise UserError(f"{model.root}: the run's validation images cannot be read ({e}); give --calibration") from None
    return shards, f"the validation split of {model.source_run}"


def _encoded(sources: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(name, file content) of every image file in these folders (and their subfolders), files, URL prefixes and
    tar shards, in `formats.inputs.discover`'s order; a file that cannot be read gives no bytes (counted with the
    undecodable ones). Files met in folders without an image's suffix are passed over."""
    from PIL import Image

    exts = set(Image.registered_extensions())
    try:
        items = discover(sources, recursive=True)
    except UserError as e:
        raise UserError(f"--calibration {e}") from None
    for item in items:
        if not item.named and suffix(item.path) not in exts and item.error is None:
            continue
        try:
            data = read_item(item)
        except (OSError, UserError) as e:  # counted with the undecodable ones
            log.warning("%s: cannot be read (%s)", storage.display(item.path), why(e, item.path))
            data = b""
        yield storage.display(item.path), data


def read_images(sources: Sequence[str], size: int, limit: int, console: Console) -> tuple[np.ndarray, int]:
    """Up to `limit` images from `sources` as the model's input ([N, size, size, 3] float32 BGR 0..255, as `i2v tag`
    prepares them), and how many files did not decode (each logged)."""
    out, bad = [], 0
    with progress_bar(console, "calibration images", "") as bar:
        task = bar.add_task("", total=limit, info="")
        for name, data in _encoded(sources):
            if len(out) >= limit:
                break
            try:
                image = pad_resize(load_for_input(data, size), size)
            except BadImage as e:
                log.warning("%s: skipped (%s)", name, e)
                bad += 1
                continue
            out.append(np.asarray(image, dtype=np.float32)[:, :, ::-1])
            bar.advance(task)
    return (np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)), bad


# ---- quantizing


class _Reader:
    """onnxruntime's CalibrationDataReader over prepared images, a batch at a time."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int):
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        if len(self.batches[-1]) < batch and len(self.batches) > 1:
            self.batches.pop()  # a fixed-batch model takes only whole batches
        self.input_name = input_name
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: np.ascontiguousarray(self.batches[self.i - 1])}

    def rewind(self) -> None:
        self.i = 0


def _quantize_file(src: Path, dst: Path, mode: str, images: np.ndarray, input_name: str, batch: int) -> None:
    """model.onnx -> model.int8.onnx (written under a temporary name, then renamed)."""
    tmp = dst.with_name(dst.name + ".tmp")
    # onnxruntime's quantizer logs advice through the root logger (which sets up a handler of its own): quiet here.
    logging.disable(logging.WARNING)
    try:
        _run_quantizer(src, tmp, mode, images, input_name, batch)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(tmp, dst)


def _run_quantizer(src: Path, tmp: Path, mode: str, images: np.ndarray, input_name: str, batch: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory(prefix="i2v-quantize-") as work:
        prepared = _preprocess(src, Path(work) / "prepared.onnx")
        if mode == "dynamic":
            quantize_dynamic(prepared, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        else:
            quantize_static(
                prepared,
                tmp,
                _Reader(images, input_name, batch),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended preparation (shape inference, graph optimisation); the model as it is where that
    fails (a model it cannot infer the shapes of quantizes anyway)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as e:  # noqa: BLE001 - any failure of an optional step leaves the model as it was
        log.info("%s: quant_pre_process failed (%s); quantizing the model as it is", src, e)
        return src
    return dst


# ---- agreement


def run_probs(session: Any, outputs: list[str], images: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities [N, tags] (the outputs concatenated) of prepared images; a fixed batch is padded."""
    name = session.get_inputs()[0].name
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        n = len(chunk)
        if n < batch and session.get_inputs()[0].shape[0] == batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        got = session.run(outputs, {name: np.ascontiguousarray(chunk)})
        parts.append(np.concatenate([np.asarray(o, np.float32) for o in got], axis=1)[:n])
    return np.concatenate(parts)


def agreement(fp32: np.ndarray, int8: np.ndarray, labels: Labels, thresholds: Thresholds) -> dict[str, float]:
    """Per category, F1 of int8's decisions against fp32's (fp32's as the truth, micro-averaged over the category's
    tags: `evaluation.metrics.precision_recall_f1`): each tag above its threshold (per tag where the model has one,
    else its head's); rating, the arg-max. 1.0 where neither decides anything."""
    out = {}
    for head, ix in labels.heads.items():
        cols = list(ix)
        a, b = fp32[:, cols], int8[:, cols]
        if head == "rating" or labels.activations.get(head) == "softmax":
            truth = a == a.max(axis=1, keepdims=True)
            pred = b == b.max(axis=1, keepdims=True)
        else:
            base = thresholds.heads.get(head, 0.5)
            thr = np.array([thresholds.tags.get(labels.names[i], base) for i in cols], np.float32)
            truth, pred = a > thr, b > thr
        if not truth.any() and not pred.any():
            out[head] = 1.0
            continue
        f1 = precision_recall_f1(pred.astype(np.float32), truth.astype(np.float32), threshold=0.5)["micro_f1"]
        out[head] = round(f1, 4)
    return out
