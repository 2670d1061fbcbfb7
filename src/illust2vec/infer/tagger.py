"""The Tagger: the Python API for tagging images and extracting feature vectors, with the original
Illustration2Vec's method names and return shapes, over our bundles and the WD taggers (timm or ONNX).

    from illust2vec import Tagger
    tagger = Tagger.load("bundle/")             # or a WD tagger v3 snapshot directory, or a WD ONNX directory
    tagger.estimate_plausible_tags(["a.jpg"])   # [{"general": [("1girl", 0.98), ...], "character": [...], ...}]
    tagger.extract_feature(["a.jpg"])           # [1, D] float32
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..formats.bundle import (
    INT8_FILE,
    BundleInfo,
    Labels,
    Thresholds,
    cached_bundle,
    int8_path,
    is_bundle,
    open_bundle,
)
from ..formats.vocab import read_vocab
from ..util import storage
from .backends import OnnxBackend, TorchBackend, onnx_backend, onnx_input_size, torch_backend
from .preprocess import load_batch
from .thresholds import Selection, resolve

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "int8")  # auto: model.int8.onnx (i2v quantize) on a CPU where it exists, else fp32


@dataclass
class Tagger:
    """A loaded model: its backend, what its outputs mean, and its thresholds.

    `backend` maps a prepared batch ([N, size, size, 3] float32 BGR 0..255, see `preprocess.prepare`) to
    probabilities [N, tags] in `labels.names` order and feature vectors [N, D] (None for a WD ONNX file).
    """

    backend: OnnxBackend | TorchBackend
    labels: Labels
    thresholds: Thresholds
    image_size: int
    source: str = ""
    kind: str = "bundle"  # bundle, wd-timm or wd-onnx
    feature_dim: int | None = None  # the length of extract_feature's vectors; None: the model gives none
    feature_center: np.ndarray | None = None  # per-dimension medians for binary codes, when the bundle has them
    batch_size: int = 32

    # ---- loading

    @classmethod
    def load(
        cls, path: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "auto"
    ) -> Tagger:
        """Open a model: our bundle, a WD tagger v3 timm snapshot directory (config.json, model.safetensors,
        selected_tags.csv), a WD ONNX directory (model.onnx, selected_tags.csv), or a Hugging Face repo id of either
        (downloaded once into the Hugging Face cache).

        Args:
            path: a directory, a repo id such as "SmilingWolf/wd-vit-tagger-v3", or the URL of a bundle in object
                storage ("s3://bucket/model"), downloaded into ~/.cache/illust2vec/models and fetched again when its
                config.json there changes.
            backend: "auto" (ONNX when the model has an ONNX file and onnxruntime is installed, unless a GPU is
                asked for; else torch), "torch" or "onnx".
            device: "auto", "cpu" or "cuda[:N]".
            precision: "auto" (model.int8.onnx, made by `i2v quantize`, when the model runs ONNX on the CPU and
                has one; else fp32), "fp32", or "int8" (model.int8.onnx with onnxruntime, or an error).
        """
        if backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "int8" and backend == "torch":
            raise UserError(f"--precision int8 runs {INT8_FILE} with onnxruntime; --backend torch runs fp32")
        if storage.is_remote(str(path)):  # a bundle in object storage: opened from a local copy in the cache
            return _load_bundle(cached_bundle(str(path), backend), backend, device, precision)
        root = Path(path)
        if not root.exists():
            if not _looks_like_repo_id(str(path)):
                raise UserError(f"{path}: no such model directory")
            root = download(str(path), backend)
        if not root.is_dir():
            raise UserError(f"{root}: a model is a directory (a bundle, or a WD tagger's snapshot)")
        if is_bundle(root):
            return _load_bundle(root, backend, device, precision)
        has_timm = (root / "config.json").is_file() and (root / "model.safetensors").is_file()
        has_onnx = (root / "model.onnx").is_file()
        # WD's repositories hold both files; like a bundle, "auto" takes the ONNX one on the CPU (no torch import).
        onnx_first = backend == "onnx" or (backend == "auto" and (_prefer_onnx(device) or precision == "int8"))
        if has_onnx and onnx_first:
            return _load_wd_onnx(root, device, precision)
        if precision == "int8":
            raise UserError(f"{root}: --precision int8 needs model.onnx and {INT8_FILE} (i2v quantize)")
        if has_timm and backend != "onnx":
            return _load_wd_timm(root, device)
        if has_onnx and backend == "auto":
            return _load_wd_onnx(root, device, precision)
        if backend != "auto" and (has_timm or has_onnx):
            needs = "model.onnx" if backend == "onnx" else "config.json and model.safetensors"
            raise UserError(f"{root}: backend {backend!r} needs {needs}")
        raise UserError(
            f"{root}: not a model: expected an illust2vec bundle (i2v export), a WD tagger v3 snapshot "
            "(config.json, model.safetensors, selected_tags.csv) or a WD ONNX directory (model.onnx, selected_tags.csv)"
        )

    @property
    def precision(self) -> str:
        """The weights' precision: int8 when the backend runs `i2v quantize`'s model.int8.onnx, else fp32."""
        return self.backend.precision

    # ---- the forward pass

    def prepare(self, images: Any) -> np.ndarray:
        """Images (paths, bytes, PIL images or arrays) -> the model's input batch."""
        return load_batch(images, self.image_size)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A prepared batch -> (probabilities [N, tags], features [N, D] or None)."""
        return self.backend(batch)

    def _forward(self, images: Any, features: bool = False) -> np.ndarray:
        items = _as_list(images)
        outs = []
        for start in range(0, len(items), self.batch_size):
            probs, feats = self.run(self.prepare(items[start : start + self.batch_size]))
            if features and feats is None:
                hint = " (load it with backend='torch' for those)" if self.kind == "wd-onnx" else ""
                raise UserError(
                    f"{self.source}: this model gives no feature vector: a WD ONNX file gives tags only{hint}"
                )
            outs.append(feats if features else probs)
        if not outs:
            n = self.feature_dim if features else len(self.labels)
            return np.zeros((0, n or 0), np.float32)
        return np.concatenate(outs)

    def predict(self, images: Any) -> np.ndarray:
        """Probabilities [N, tags] of images, in `labels.names` order."""
        return self._forward(images)

    # ---- scores to tags

    def scores(self, probs: np.ndarray) -> dict[str, dict[str, float]]:
        """One image's probabilities -> head -> {tag: score}, every tag, highest first."""
        out = {}
        for head, ix in self.labels.heads.items():
            p = probs[list(ix)]
            order = np.argsort(-p, kind="stable")
            out[head] = {self.labels.names[ix[i]]: float(p[i]) for i in order}
        return out

    def select(self, probs: np.ndarray, selection: Selection | None = None) -> dict[str, dict[str, float]]:
        """One image's probabilities -> head -> {tag: score} strictly above its threshold, highest first.

        Rating keeps all its classes (scores sum to one), as the WD taggers report it. A threshold given in
        `selection` replaces the model's for its head, per-tag ones included; MCut replaces both.
        """
        selection = selection or Selection()
        thresholds = resolve(self.labels.heads, self.labels.names, probs, self.thresholds, selection)
        out: dict[str, dict[str, float]] = {}
        for head, ix in self.labels.heads.items():
            p = probs[list(ix)]
            names = [self.labels.names[i] for i in ix]
            order = np.argsort(-p, kind="stable")
            if head == "rating":
                out[head] = {names[i]: float(p[i]) for i in order}
                continue
            thr = thresholds[head].tags
            # Strictly above, as the WD Space and the original Illustration2Vec select.
            out[head] = {names[i]: float(p[i]) for i in order if p[i] > thr[i] and names[i] not in selection.exclude}
        return out

    # ---- the original Illustration2Vec's API

    def estimate_top_tags(self, images: Any, n_tag: int = 10) -> list[dict[str, list[tuple[str, float]]]]:
        """The `n_tag` highest-scoring tags of each head, per image (rating: all its classes)."""
        out = []
        for probs in self.predict(images):
            s = self.scores(probs)
            out.append({h: list(v.items())[: None if h == "rating" else n_tag] for h, v in s.items()})
        return out

    def estimate_plausible_tags(
        self, images: Any, threshold: float | None = None, selection: Selection | None = None
    ) -> list[dict[str, list[tuple[str, float]]]]:
        """Per image, head -> [(tag, score), ...] above the threshold, highest first; rating lists all its classes.

        Args:
            images: a path, bytes, PIL image or array, or a list of them.
            threshold: one threshold for every head; None uses the model's calibrated thresholds (per head, and
                per tag where `i2v evaluate --per-tag` wrote them), or the usual 0.35 general / 0.85 character.
            selection: finer control (per-head thresholds, MCut, excluded tags); `threshold` overrides it.
        """
        sel = selection or Selection()
        if threshold is not None:
            sel = Selection(threshold, threshold, threshold, threshold, exclude=sel.exclude)
        return [{h: list(v.items()) for h, v in self.select(p, sel).items()} for p in self.predict(images)]

    def estimate_specific_tags(self, images: Any, tags: Sequence[str]) -> list[dict[str, float]]:
        """Per image, {tag: score} for the given tags. Tags may be written with spaces, as Illustration2Vec's
        ("blue eyes"), or underscores ("blue_eyes"); unknown tags are an error naming them."""
        if isinstance(tags, str):
            tags = [tags]
        index = {n: i for i, n in enumerate(self.labels.names)}
        columns, unknown = [], []
        for tag in tags:
            i = index.get(tag, index.get(tag.replace(" ", "_")))
            (unknown if i is None else columns).append(tag if i is None else i)
        if unknown:
            raise UserError(f"not in the model's vocabulary: {', '.join(unknown)}")
        return [{t: float(p[i]) for t, i in zip(tags, columns, strict=True)} for p in self.predict(images)]

    def extract_feature(self, images: Any, normalize: bool = False) -> np.ndarray:
        """Feature vectors [N, D] float32: the pooled embedding every head reads. `normalize`: unit L2 norm."""
        f = self._forward(images, features=True)
        if normalize:
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return f.astype(np.float32)

    def extract_binary_feature(self, images: Any) -> np.ndarray:
        """Binary codes [N, ceil(D / 8)] uint8 (np.packbits), as the original Illustration2Vec's: bit d is set when
        feature d is above its median over the bundle's validation images (or, without those, the vector's mean)."""
        return binarize(self.extract_feature(images), self.feature_center)


def binarize(features: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Feature vectors -> packed bits, each set where the feature exceeds its centre."""
    f = np.asarray(features, dtype=np.float32)
    c = f.mean(axis=1, keepdims=True) if center is None else np.asarray(center, np.float32)[None]
    return np.packbits(f > c, axis=1)


def _as_list(images: Any) -> list:
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview):
        return [images]
    if isinstance(images, np.ndarray) and images.dtype != object and images.ndim <= 3:
        return [images]
    if not isinstance(images, Iterable) or hasattr(images, "getpixel"):  # one PIL image
        return [images]
    return list(images)


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


SMALL_FILES = ["config.json", "selected_tags.csv", "extra_tags.csv", "thresholds.json"]


def download(repo_id: str, backend: str = "auto") -> Path:
    """Fetch a WD tagger (or a bundle) from the Hugging Face Hub into its cache; returns the local directory.

    Only the files the backend needs are fetched (WD's repositories hold the model twice, as ONNX and as
    safetensors): "onnx" and "auto" take model.onnx, "torch" model.safetensors, and "auto" falls back to
    model.safetensors when the repository has no ONNX file. Nothing fetched is ever unpickled. Tests run it with
    `snapshot_download` replaced; the real one needs the network (or HF_HUB_OFFLINE=1 and a filled cache).
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{repo_id}: downloading a model needs huggingface_hub: pip install 'illust2vec[hub]'"
        ) from None
    weights = "model.safetensors" if backend == "torch" else "model.onnx"
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[*SMALL_FILES, weights]))
        if backend == "auto" and not (root / weights).exists():
            root = Path(snapshot_download(repo_id, allow_patterns=[*SMALL_FILES, "model.safetensors"]))
    except Exception as e:  # network errors, a missing repo, a gated one: one line
        raise UserError(
            f"{repo_id}: no such directory here, and downloading it from the Hugging Face Hub failed ({e})"
        ) from None
    return root


def _load_bundle(root: Path, backend: str, device: str, precision: str = "auto") -> Tagger:
    info = open_bundle(root)
    center = info.config.get("feature_center")
    center = np.asarray(center, np.float32) if center else None
    onnx_first = info.onnx_path is not None and _prefer_onnx(device)
    use_onnx = backend == "onnx" or (backend == "auto" and (onnx_first or precision == "int8"))
    if use_onnx:
        if info.onnx_path is None:
            raise UserError(f"{root}: --backend onnx, but the bundle has no model.onnx (i2v export --onnx)")
        where = "cpu" if device == "auto" else device
        path, chosen = _onnx_file(root, info.onnx_path, precision, where)
        runner: OnnxBackend | TorchBackend = onnx_backend(path, where, outputs=info.onnx_outputs)
        runner.precision = chosen
    else:
        runner = torch_backend(_bundle_module(info), device)
    dim = int(info.config["feature_dim"])
    return Tagger(runner, info.labels, info.thresholds, info.image_size, str(root), "bundle", dim, center)


def _onnx_file(root: Path, fp32: Path, precision: str, device: str) -> tuple[Path, str]:
    """The ONNX file to run and its precision: model.int8.onnx when int8 is asked for (an error without one), or on
    "auto" on the CPU when `i2v quantize` wrote one; model.onnx otherwise (a GPU runs fp32 faster than int8)."""
    int8 = int8_path(root)
    if precision == "int8" and int8 is None:
        raise UserError(f"{root}: --precision int8, but there is no {INT8_FILE}; make one with: i2v quantize {root}")
    if int8 is not None and (precision == "int8" or (precision == "auto" and not device.startswith("cuda"))):
        return int8, "int8"
    return fp32, "fp32"


def _prefer_onnx(device: str) -> bool:
    """Whether "auto" takes an ONNX file: on the CPU (a GPU is for torch), when onnxruntime is installed."""
    return not device.startswith("cuda") and _has_onnxruntime()


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def bundle_model(info: BundleInfo) -> Any:
    """The bundle's weights in our tagger module (torch, CPU, eval mode)."""
    from ..models import load_tagger

    return load_tagger(info.config["model"], info.weights_path)


def _bundle_module(info: BundleInfo) -> Any:
    """The bundle's weights in our tagger, behind the WD interface (torch)."""
    from ..models.interface import WDInterface

    return WDInterface(bundle_model(info))


def _wd_labels(root: Path) -> Labels:
    vocab = read_vocab(root / "selected_tags.csv")
    return Labels.from_vocab(vocab)


def _load_wd_timm(root: Path, device: str) -> Tagger:
    """A WD tagger v3 snapshot: timm's config.json (architecture, num_classes, model_args, pretrained_cfg)."""
    import timm
    from safetensors.torch import load_file

    from ..models.interface import TimmWD

    try:
        cfg = json.loads((root / "config.json").read_text())
        arch = cfg["architecture"]
        pcfg = cfg.get("pretrained_cfg", {})
        size = int(pcfg.get("input_size", [3, 448, 448])[-1])
        mean, std = tuple(pcfg.get("mean", (0.5, 0.5, 0.5))), tuple(pcfg.get("std", (0.5, 0.5, 0.5)))
        # timm's save_for_hf repeats num_classes among the model's arguments; it is passed once, below.
        model_args = {k: v for k, v in dict(cfg.get("model_args") or {}).items() if k != "num_classes"}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{root}/config.json: not a timm model config ({e})") from None
    labels = _wd_labels(root)
    n = int(cfg.get("num_classes", len(labels)))
    if n != len(labels):
        raise UserError(f"{root}: config.json has {n} classes, selected_tags.csv {len(labels)} tags")
    if not timm.is_model(arch):
        raise UserError(f"{root}: unknown timm architecture {arch!r}")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=n, **model_args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{root}/config.json: timm cannot build {arch} with {model_args} ({e})") from None
    try:
        weights = load_file(root / "model.safetensors")
        model.load_state_dict(weights, strict=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{root}/model.safetensors: does not fit {arch} ({str(e).splitlines()[0]})") from None
    runner = torch_backend(TimmWD(model, mean, std), device)
    thresholds = _wd_thresholds(root)
    dim = getattr(model, "head_hidden_size", model.num_features)
    return Tagger(runner, labels, thresholds, size, str(root), "wd-timm", int(dim))


def _wd_thresholds(root: Path) -> Thresholds:
    from ..formats.bundle import read_thresholds

    return read_thresholds(root / "thresholds.json")


def _load_wd_onnx(root: Path, device: str, precision: str = "auto") -> Tagger:
    """A WD ONNX tagger directory: model.onnx with NHWC BGR input, sigmoid probabilities in selected_tags order."""
    labels = _wd_labels(root)
    where = "cpu" if device == "auto" else device
    path, chosen = _onnx_file(root, root / "model.onnx", precision, where)
    runner = onnx_backend(path, where)
    runner.precision = chosen
    size = onnx_input_size(runner)
    if size is None:
        raise UserError(f"{root}/model.onnx: its input height is not fixed; cannot tell the image size")
    n = runner.session.get_outputs()[0].shape[-1]
    if isinstance(n, int) and n != len(labels):
        raise UserError(f"{root}: model.onnx gives {n} outputs, selected_tags.csv has {len(labels)} tags")
    shapes = {o.name: o.shape for o in runner.session.get_outputs()}
    dim = shapes[runner.feature_output][-1] if runner.feature_output else None
    dim = dim if isinstance(dim, int) else None
    return Tagger(runner, labels, _wd_thresholds(root), size, str(root), "wd-onnx", dim)
