"""Checkpoints without pickle: weights and optimizer tensors in safetensors, everything else in JSON.

A checkpoint is a directory `checkpoints/epoch-NNN/` written under a temporary name and renamed when complete,
so a kill during the write leaves the previous checkpoint as the latest whole one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

PREFIX = "epoch-"


def checkpoint_dir(run: Path, epoch: int) -> Path:
    return run / "checkpoints" / f"{PREFIX}{epoch:03d}"


def list_checkpoints(run: Path) -> list[int]:
    """Epochs with a complete checkpoint, in order."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[len(PREFIX) :]) for p in root.glob(f"{PREFIX}[0-9][0-9][0-9]") if (p / "state.json").exists()
    )


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
    save_file(weights, tmp / "model.safetensors")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = _rng_state()
    save_file({**{f"optim.{k}": v for k, v in opt_tensors.items()}, **rng_tensors}, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "optimizer": opt_meta, "rng": rng_meta}))
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
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
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(run: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore a checkpoint into model (and optimizer, and the RNGs); returns its state dict."""
    folder = checkpoint_dir(run, epoch)
    load_weights(folder / "model.safetensors", model)
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")
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


def resolve_epoch(run: Path, epoch: str | int = "best") -> int:
    """ "best" (the epoch `--select-by` chose), "last", or a number -> an epoch with a complete checkpoint."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    done = list_checkpoints(run)
    if not done:
        raise UserError(f"{run}: no checkpoints (is it a run directory of i2v train?)")
    if epoch in ("last", "latest"):
        return done[-1]
    if epoch == "best":
        best = None
        if (run / "best.json").exists():
            best = json.loads((run / "best.json").read_text()).get("best_epoch")
        else:  # a run still going, or killed: the state of its latest checkpoint knows the best so far
            best = json.loads((checkpoint_dir(run, done[-1]) / "state.json").read_text()).get("best_epoch")
        return int(best) if best in done else done[-1]
    try:
        n = int(epoch)
    except (TypeError, ValueError):
        raise UserError(f"--epoch takes a number, best or last, not {epoch!r}") from None
    if n not in done:
        raise UserError(f"{run}: no checkpoint for epoch {n}; there are {', '.join(map(str, done))}")
    return n


def load_run_model(run: Path, epoch: int) -> torch.nn.Module:
    """The run's tagger with the weights of one epoch, in eval mode (CPU)."""
    from ..models.tagger import TaggerConfig, create_tagger

    try:
        config = json.loads((Path(run) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: cannot read config.json ({e})") from None
    model = create_tagger(TaggerConfig.from_dict(config["model"]))
    load_weights(checkpoint_dir(Path(run), epoch) / "model.safetensors", model)
    return model.eval()
