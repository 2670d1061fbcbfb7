"""The model bundle on disk: config.json, selected_tags.csv and thresholds.json, read and written without torch.

A bundle is a directory: `config.json` (format version, the tagger config, the vocabulary's hash, how inputs are
prepared), `model.safetensors`, `selected_tags.csv`, `thresholds.json` and optionally `model.onnx`. This module
reads and writes the JSON and CSV parts only, so that the ONNX path (`i2v tag` with onnxruntime) never imports
torch; the weights are written by `export.py` and loaded by the torch backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formats.vocab import Vocab, read_vocab, write_vocab
from .errors import UserError

FORMAT = "illust2vec-bundle"
FORMAT_VERSION = 1
# What users of the WD taggers expect when nothing was calibrated: 0.35 general, 0.85 character (the WD Space).
DEFAULT_THRESHOLDS = {"rating": 0.0, "general": 0.35, "character": 0.85, "copyright": 0.85, "artist": 0.85}
# The ONNX file follows the WD taggers: NHWC float32, 0..255, BGR, white-padded square, bicubic resize.
ONNX_INPUT = {"layout": "NHWC", "channel_order": "BGR", "dtype": "float32", "range": [0, 255]}


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds: one per head, optionally one per tag (the original Illustration2Vec's per-tag ones)."""

    heads: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    tags: dict[str, float] = field(default_factory=dict)  # tag name -> threshold, overriding its head's
    method: str = "defaults"  # how they were chosen, e.g. "f1 on val of run/epoch-005"

    def to_json(self) -> dict:
        return {"method": self.method, "heads": self.heads, "tags": self.tags}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Thresholds:
        heads = {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in d.get("heads", {}).items()}}
        bad = [k for k, v in heads.items() if not (0.0 <= v <= 1.0)]
        if bad:
            raise ValueError(f"thresholds outside 0..1 for {bad}")
        tags = {str(k): float(v) for k, v in d.get("tags", {}).items() if v is not None and math.isfinite(v)}
        return cls(heads=heads, tags=tags, method=str(d.get("method", "")))


def read_thresholds(path: Path) -> Thresholds:
    """thresholds.json as `i2v evaluate` or `i2v export` wrote it; defaults when the file is absent."""
    if not path.exists():
        return Thresholds()
    try:
        return Thresholds.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a thresholds file ({e})") from None


def write_thresholds(thresholds: Thresholds, path: Path) -> None:
    path.write_text(json.dumps(thresholds.to_json(), indent=1, sort_keys=False))


@dataclass(frozen=True)
class Labels:
    """What the model's outputs mean: the tag names in output order, and which outputs form each head."""

    names: tuple[str, ...]
    categories: tuple[int, ...]
    heads: dict[str, tuple[int, ...]]  # head name -> output indices, in HEAD_ORDER
    activations: dict[str, str]  # head name -> "sigmoid" or "softmax"

    @classmethod
    def from_vocab(cls, vocab: Vocab, activations: Mapping[str, str] | None = None) -> Labels:
        heads = {h: tuple(ix) for h, ix in vocab.heads.items() if ix}
        # WD taggers: every head sigmoid except rating, which is read as the arg-max of its four outputs.
        acts = {h: (activations or {}).get(h, "sigmoid") for h in heads}
        return cls(tuple(vocab.names), tuple(vocab.categories), heads, acts)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's description, without its weights."""

    root: Path
    config: dict  # config.json as written
    vocab: Vocab
    labels: Labels
    thresholds: Thresholds

    @property
    def image_size(self) -> int:
        return int(self.config["model"]["image_size"])

    @property
    def onnx_path(self) -> Path | None:
        name = self.config.get("onnx", {}).get("file")
        path = self.root / name if name else None
        return path if path is not None and path.exists() else None

    @property
    def weights_path(self) -> Path:
        return self.root / "model.safetensors"


def is_bundle(path: Path) -> bool:
    """Whether a directory is an illust2vec bundle (not a WD snapshot, whose config.json is timm's)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def bundle_config(
    model_cfg: Mapping[str, Any], vocab: Vocab, feature_dim: int, source: Mapping[str, Any] | None = None
) -> dict:
    """The content of a bundle's config.json."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(model_cfg),
        "vocab_hash": vocab.hash,
        "feature_dim": int(feature_dim),
        # How images become the model's input: the WD recipe (white background and padding, bicubic resize).
        "preprocess": {
            "size": int(model_cfg["image_size"]),
            "background": "white",
            "pad": "square",
            "resize": "bicubic",
        },
        "source": dict(source or {}),
    }


def write_bundle_files(out: Path, config: Mapping[str, Any], vocab: Vocab, thresholds: Thresholds) -> None:
    """Write config.json, selected_tags.csv and thresholds.json into `out` (the weights are written by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_vocab(vocab, out / "selected_tags.csv")
    write_thresholds(thresholds, out / "thresholds.json")


def read_bundle(path: Path) -> BundleInfo:
    """Open a bundle's JSON and CSV, checking the format version and that the vocabulary is the one trained on."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: not a model bundle (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path}: not JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{path}: config.json is not an illust2vec bundle's")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format {config.get('format_version')} is newer than this illust2vec reads "
            f"({FORMAT_VERSION}); upgrade illust2vec"
        )
    vocab = read_vocab(path / "selected_tags.csv")
    if vocab.hash != config.get("vocab_hash"):
        raise UserError(f"{path}: selected_tags.csv is not the vocabulary the model was trained on (hash differs)")
    heads = config["model"]["heads"]
    activations = {h["name"]: h["activation"] for h in heads}
    labels = Labels.from_vocab(vocab, activations)
    sizes = {h["name"]: int(h["classes"]) for h in heads}
    if {h: len(ix) for h, ix in labels.heads.items()} != sizes:
        raise UserError(f"{path}: the heads in config.json do not match selected_tags.csv")
    return BundleInfo(path, config, vocab, labels, read_thresholds(path / "thresholds.json"))
