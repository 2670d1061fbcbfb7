"""The run directory of `i2v train`: its config.json, checkpoints, metrics.csv, best.json and eval/epoch-NNN/.

```
RUN/config.json            {"train": TrainConfig, "model": TaggerConfig, "dataset", "vocab_hash", "image_size",
                            "runtime": what "auto" resolved to}
RUN/selected_tags.csv      the vocabulary the run was trained on (a copy of the dataset's)
RUN/checkpoints/epoch-NNN/ model.safetensors, optimizer.safetensors (optimizer and RNG tensors), state.json
RUN/metrics.csv            one row per epoch, one column per metric ("train/loss", "val/general/mAP", ...)
RUN/best.json              the best epoch by --select-by, its value, and the last epoch's row
RUN/curves.png, RUN/tb/    the same metrics as a picture and as TensorBoard events
RUN/eval/epoch-NNN/        metrics.json, per_tag.csv, thresholds.json (written by `i2v evaluate`)
RUN/init/                  an extended run's original model, as a bundle (`i2v train --init`)
```

Checkpoints hold no pickle: tensors in safetensors, everything else in JSON. A checkpoint is written under a
temporary name and renamed when complete, so a kill during the write leaves the previous one as the latest whole one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

CONFIG = "config.json"
VOCAB = "selected_tags.csv"
METRICS = "metrics.csv"
BEST = "best.json"
CURVES = "curves.png"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
PREFIX = "epoch-"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
INIT = "init"
EVAL_METRICS = "metrics.json"
PER_TAG = "per_tag.csv"
PER_TAG_HEADER = ("head", "tag", "support", "ap", "threshold", "precision", "recall", "f1")


# config.json


def read_config(run: Path) -> dict:
    """The run's config.json as written by `write_config`."""
    try:
        return json.loads((Path(run) / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: cannot read the run's config.json ({e})") from None


def write_config(run: Path, config: dict) -> None:
    _write_text(Path(run) / CONFIG, json.dumps(config, indent=1))


def vocab_path(run: Path) -> Path:
    return Path(run) / VOCAB


def init_path(run: Path) -> Path:
    """An extended run's original model (`i2v train --init`), kept as a bundle."""
    return Path(run) / INIT


# Checkpoints


def checkpoint_dir(run: Path, epoch: int) -> Path:
    return Path(run) / CHECKPOINTS / f"{PREFIX}{epoch:03d}"


def weights_path(run: Path, epoch: int) -> Path:
    return checkpoint_dir(run, epoch) / WEIGHTS


def list_checkpoints(run: Path) -> list[int]:
    """Epochs with a complete checkpoint, in order."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name[len(PREFIX) :]) for p in root.glob(f"{PREFIX}[0-9][0-9][0-9]") if (p / STATE).exists())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def save_checkpoint(
    run: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write model weights, optimizer state, RNG state and `state` (JSON-able: step, history, best, ...)."""
    final = checkpoint_dir(run, epoch)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / WEIGHTS)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = _rng_state()
    save_file({**{f"optim.{k}": v for k, v in opt_tensors.items()}, **rng_tensors}, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({**state, "epoch": epoch, "optimizer": opt_meta, "rng": rng_meta}))
    for name in (WEIGHTS, OPTIMIZER, STATE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a safetensors file into the model, strictly: a missing or unexpected tensor is an error."""
    try:
        weights = load_file(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from e
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # torch's message for tensors of the wrong shape, one line per tensor
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: weights do not fit the model ({first})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def read_state(run: Path, epoch: int) -> dict:
    """A checkpoint's state.json: step, best, best_epoch, history, and the optimizer's and RNGs' scalars."""
    return json.loads((checkpoint_dir(run, epoch) / STATE).read_text())


def load_checkpoint(run: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore a checkpoint into model (and optimizer, and the RNGs); returns its state dict."""
    folder = checkpoint_dir(run, epoch)
    load_weights(folder / WEIGHTS, model)
    state = read_state(run, epoch)
    tensors = load_file(folder / OPTIMIZER)
    if optimizer is not None:
        meta = state["optimizer"]
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                index, name = key[len("optim.") :].split(".", 1)
                per_param.setdefault(int(index), {})[name] = value
        for key, value in meta["scalars"].items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    py = state["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["rng"]["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    return state


EPOCH_WORDS = ("best", "last", "latest")  # what --epoch takes besides a number


def check_epoch(epoch: str | int) -> None:
    """A UserError unless `epoch` is a number or one of EPOCH_WORDS (a config checks it before any run is read)."""
    if str(epoch) not in EPOCH_WORDS and not str(epoch).isdigit():
        raise UserError(f"--epoch takes a number, best or last, not {epoch!r}")


def resolve_epoch(run: Path, epoch: str | int = "best") -> int:
    """ "best" (the epoch `--select-by` chose), "last", or a number -> an epoch with a complete checkpoint."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    done = list_checkpoints(run)
    if not done:
        raise UserError(f"{run}: no checkpoints (is it a run directory of i2v train?)")
    if epoch in EPOCH_WORDS[1:]:
        return done[-1]
    if epoch == "best":
        # A run still going, or killed, has no best.json: the state of its latest checkpoint knows the best so far.
        best = (read_best(run) or read_state(run, done[-1])).get("best_epoch")
        return int(best) if best in done else done[-1]
    try:
        n = int(epoch)
    except (TypeError, ValueError):
        raise UserError(f"--epoch takes a number, best or last, not {epoch!r}") from None
    if n not in done:
        raise UserError(f"{run}: no checkpoint for epoch {n}; there are {', '.join(map(str, done))}")
    return n


# metrics.csv, best.json and the per-epoch history


def write_metrics(run: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch, one column per metric (rewritten whole, atomically)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = Path(run) / (METRICS + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(Path(run) / METRICS)


def read_metrics(run: Path) -> list[dict]:
    """metrics.csv's rows, numbers as numbers (the epoch an int, the rest floats; an empty cell is left out)."""
    with open(Path(run) / METRICS, newline="") as f:
        return [
            {k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)
        ]


def write_best(run: Path, summary: dict) -> None:
    _write_text(Path(run) / BEST, json.dumps(summary, indent=1))


def read_best(run: Path) -> dict | None:
    """best.json, or None while the run has not finished."""
    path = Path(run) / BEST
    return json.loads(path.read_text()) if path.exists() else None


def read_history(run: Path) -> list[dict]:
    """Every finished epoch's row of metrics (as in metrics.csv, numbers unrounded): the latest checkpoint keeps
    them; [] without a checkpoint."""
    done = list_checkpoints(run)
    return read_state(run, done[-1]).get("history", []) if done else []


# eval/epoch-NNN/


def eval_dir(run: Path, epoch: int) -> Path:
    return Path(run) / "eval" / f"{PREFIX}{epoch:03d}"


def write_eval_metrics(out: Path, report: dict) -> None:
    """metrics.json: the report of `i2v evaluate` (non-finite figures as null)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_text(Path(out) / EVAL_METRICS, json.dumps(json_finite(report), indent=1))


def read_eval_metrics(out: Path) -> dict:
    return json.loads((Path(out) / EVAL_METRICS).read_text())


def write_per_tag(out: Path, rows: Iterable[tuple]) -> None:
    """per_tag.csv: one row per tag (head, tag, support, ap, threshold, precision, recall, f1); numbers to four
    decimals, a missing or non-finite figure as an empty cell."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / PER_TAG, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PER_TAG_HEADER)
        for head, tag, support, *figures in rows:
            w.writerow([head, tag, int(support), *(_cell(x) for x in figures)])


def read_per_tag(out: Path) -> list[dict]:
    """per_tag.csv's rows as dicts of strings, as csv reads them."""
    with open(Path(out) / PER_TAG, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cell(x) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.4f}"


def json_finite(value):
    """JSON has no NaN: non-finite floats become None, in nested dicts and lists too."""
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
