"""Stage 6, export: one epoch of a run -> a model bundle (config.json, model.safetensors, selected_tags.csv,
thresholds.json) and optionally model.onnx in the WD taggers' convention.

Thresholds come from `i2v evaluate` when it ran on that epoch; otherwise export calibrates them on the run's
validation split itself (or, with no validation images, keeps the usual defaults), so export never depends on a
prior evaluate. The same pass measures each feature's median, which `extract_binary_feature` thresholds at.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file

from .bundle import ONNX_INPUT, Thresholds, bundle_config, is_bundle, read_thresholds, write_bundle_files
from .formats.vocab import read_vocab
from .errors import UserError
from .evaluate import EvalConfig, calibrate, eval_dir, predict_split, run_dataset
from .models.interface import WDInterface
from .train.checkpoints import load_run_model, resolve_epoch

log = logging.getLogger(__name__)
ONNX_OPSET = 18
CALIBRATION_SAMPLES = 5000  # enough validation images for stable thresholds and medians; a bounded pass


@dataclass(frozen=True)
class ExportConfig:
    run: str
    out: str
    epoch: str = "best"
    onnx: bool = False
    overwrite: bool = False
    workers: int = 2
    device: str = "auto"


def export(cfg: ExportConfig, console: Console | None = None) -> dict:
    """Write the bundle; returns a summary (epoch, where the thresholds came from, ONNX parity)."""
    console = console or Console(stderr=True)
    run, out = Path(cfg.run), Path(cfg.out)
    check_out(out, cfg.overwrite)
    epoch = resolve_epoch(run, cfg.epoch)
    model = load_run_model(run, epoch)
    vocab = read_vocab(run / "selected_tags.csv")
    run_config = json.loads((run / "config.json").read_text())
    if vocab.hash != run_config["vocab_hash"]:
        raise UserError(f"{run}: selected_tags.csv is not the vocabulary the run was trained on")

    # Thresholds and feature medians from the validation split (thresholds from `i2v evaluate` when it ran).
    evaluated = eval_dir(run, epoch) / "thresholds.json"
    thresholds = read_thresholds(evaluated) if evaluated.exists() else None
    source = f"i2v evaluate ({evaluated})" if thresholds is not None else "calibrated on the validation split"
    center = None
    try:
        ds = run_dataset(run, None)
        ecfg = EvalConfig(str(run), str(epoch), workers=cfg.workers, device=cfg.device, max_samples=CALIBRATION_SAMPLES)
        probs, targets, feats = predict_split(model, ds, ecfg, features=True, console=console)
        center = np.median(feats, axis=0).astype(np.float32)
        if thresholds is None:
            names = {h: list(vocab.head_names(h)) for h in probs}
            got = calibrate(probs, targets, names, "f1", per_tag=False)
            thresholds = Thresholds(got.heads, got.tags, f"f1 on val of {run.name} epoch {epoch} (export)")
    except UserError as e:  # the dataset moved or has no validation split: the usual defaults
        log.warning("no calibration (%s); using the default thresholds", e)
        if thresholds is None:
            source = f"defaults: no validation images ({e})"
            thresholds = Thresholds(method="defaults (no validation images at export)")
    model = model.cpu().eval()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metrics = next((row for row in _history(run) if row.get("epoch") == epoch), {})
    config = bundle_config(
        model.cfg.to_dict(),
        vocab,
        model.num_features,
        source={"run": str(run), "epoch": epoch, "val": {k: v for k, v in metrics.items() if k.startswith("val/")}},
    )
    if center is not None:
        config["feature_center"] = [round(float(v), 6) for v in center]
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    summary = {"bundle": str(out), "run": str(run), "epoch": epoch, "thresholds": source}
    if cfg.onnx:
        t0 = time.perf_counter()
        config["onnx"] = export_onnx(model, tmp / "model.onnx")
        summary["onnx_max_abs_diff"] = config["onnx"]["max_abs_diff"]
        summary["onnx_seconds"] = round(time.perf_counter() - t0, 1)
    write_bundle_files(tmp, config, vocab, thresholds)
    # safetensors writes its file readable by its owner only; a bundle is for sharing, so it gets the mode (umask
    # included) of the files written beside it.
    os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
    # Swap the new bundle in: a crash leaves the old one, or the new one beside it, never half of either.
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return summary


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds something: a non-empty directory without --overwrite, and, even with it,
    anything but a bundle (--overwrite replaces a bundle; it never deletes a folder of other files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a bundle is a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} exists and is not empty; choose another --out or add --overwrite")
    if not is_bundle(out):
        raise UserError(f"--out {out} is not a bundle; --overwrite replaces a bundle, not a folder of other files")


def _history(run: Path) -> list[dict]:
    best = run / "best.json"
    if not best.exists():
        return []
    last = json.loads(best.read_text()).get("last", {})
    # best.json keeps the last epoch; the per-epoch rows are in the latest checkpoint's state.
    states = sorted((run / "checkpoints").glob("epoch-*/state.json"))
    return json.loads(states[-1].read_text()).get("history", [last]) if states else [last]


def export_onnx(model: torch.nn.Module, path: Path, opset: int = ONNX_OPSET) -> dict:
    """Write the WD-convention ONNX file and check it against torch with onnxruntime; returns its description.

    Input "input": [batch, size, size, 3] float32, BGR, 0..255 (dynamic batch). Outputs: "output", the probabilities
    in selected_tags.csv order (what WD tools read, as the first output), and "features", the feature vector.
    """
    size = model.cfg.image_size
    wrapped = WDInterface(model).eval()
    example = torch.rand(2, size, size, 3) * 255
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines are of no use to a user
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["output", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=opset,
            verbose=False,
        )
        program.save(str(path))
    except ImportError as e:
        raise UserError(f"--onnx needs onnx and onnxscript: pip install 'illust2vec[train]' ({e})") from None
    diff = onnx_parity(wrapped, path, size)
    if diff > 1e-3:
        raise UserError(f"{path}: the ONNX model differs from torch by {diff:.2g} in probability; not exported")
    outputs = ["output", "features"]
    return {"file": path.name, "input": "input", "outputs": outputs, "opset": opset, **ONNX_INPUT, "max_abs_diff": diff}


def onnx_parity(wrapped: torch.nn.Module, path: Path, size: int, batch: int = 3) -> float:
    """The largest difference in probability between torch and onnxruntime on a random batch (of another size than
    the export's, which checks the dynamic batch dimension)."""
    import onnxruntime as ort

    x = (torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(0)) * 255).numpy()
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(x))[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["output"], {"input": x})[0]
    return float(np.abs(got - expected).max())
