"""The model bundle on disk: written whole by `save_bundle`, opened by `open_bundle`, without torch for reading.

A bundle is a directory: `config.json` (format version, the tagger config, the vocabulary's hash, how inputs are
prepared, the model's outputs and their label files), `model.safetensors`, `selected_tags.csv`, `extra_tags.csv`,
`thresholds.json` and optionally `model.onnx`. `i2v export` and `i2v convert keras` both write through `save_bundle`,
which decides every file name and swaps the new bundle in atomically.

The labels follow the WD taggers' layout (format 2): `selected_tags.csv` holds exactly the rating, general and
character rows, in that order, as WD v3's does, and they are the ONNX file's first output; every other head
(copyright, artist) is a further output named after the head, with its rows in `extra_tags.csv` (same columns).
Format 1 kept every head in `selected_tags.csv` and in the first output; `open_bundle` reads both.

`open_bundle` reads the JSON and CSV parts only, so that the ONNX path (`i2v tag` with onnxruntime) never imports
torch; the torch backend loads `BundleInfo.weights_path` itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import UserError
from ..util import storage
from .categories import CATEGORY_NAMES, HEAD_ORDER
from .vocab import Vocab, read_vocab, write_vocab

FORMAT = "illust2vec-bundle"
FORMAT_VERSION = 2  # 2: WD's three heads in selected_tags.csv and output 0, the others in extra_tags.csv and outputs
# What users of the WD taggers expect when nothing was calibrated: 0.35 general, 0.85 character (the WD Space).
DEFAULT_THRESHOLDS = {"rating": 0.0, "general": 0.35, "character": 0.85, "copyright": 0.85, "artist": 0.85}
# The ONNX file follows the WD taggers: NHWC float32, 0..255, BGR, white-padded square, bicubic resize.
ONNX_INPUT = {"layout": "NHWC", "channel_order": "BGR", "dtype": "float32", "range": [0, 255]}
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
WD_LABELS = "selected_tags.csv"  # the heads WD's front ends read, and the ONNX file's first output
EXTRA_LABELS = "extra_tags.csv"  # every other head, each a further output of the ONNX file named after it
WD_HEADS = ("rating", "general", "character")  # the categories of WD v3's selected_tags.csv (9, 0, 4), in its order
WD_OUTPUT = "output"  # the first output's name
FEATURES_OUTPUT = "features"  # the pooled feature vector, ours (WD files have none)
INT8_FILE = "model.int8.onnx"  # `i2v quantize`'s int8 copy of model.onnx, beside it (a bundle or a WD ONNX directory)
INT8_REPORT = "int8.json"  # where a WD ONNX directory keeps quantize's report (a bundle keeps it in config.json)


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


def split_vocab(vocab: Vocab) -> tuple[Vocab, Vocab]:
    """The vocabulary's WD rows (rating, general, character: selected_tags.csv) and the rest (extra_tags.csv).

    The vocabulary's rows go by head in HEAD_ORDER, which starts with WD's three heads, so the WD rows are a prefix
    and the two parts, one after the other, are the whole vocabulary again (`join_vocab`)."""
    n = sum(1 for c in vocab.categories if CATEGORY_NAMES[c] in WD_HEADS)
    columns = (vocab.tag_ids, vocab.names, vocab.categories, vocab.counts)
    return Vocab(*(c[:n] for c in columns)), Vocab(*(c[n:] for c in columns))


def join_vocab(wd: Vocab, extra: Vocab) -> Vocab:
    """selected_tags.csv's rows, then extra_tags.csv's: the model's whole vocabulary, in the order of its heads."""
    return Vocab(
        wd.tag_ids + extra.tag_ids, wd.names + extra.names, wd.categories + extra.categories, wd.counts + extra.counts
    )


def model_outputs(vocab: Vocab, feature_dim: int) -> list[dict]:
    """config.json's "outputs": each output of the model (the ONNX file's, in order), its heads and label file.

    The first, "output", holds WD's heads (the rows of selected_tags.csv); each other head is an output of its own,
    named after the head, whose rows are that head's in extra_tags.csv; last comes "features", the feature vector."""
    wd, extra = split_vocab(vocab)
    outputs = [{"name": WD_OUTPUT, "labels": WD_LABELS, "heads": list(wd.heads), "size": len(wd)}]
    for head, rows in extra.heads.items():
        outputs.append({"name": head, "labels": EXTRA_LABELS, "heads": [head], "size": len(rows)})
    return [*outputs, {"name": FEATURES_OUTPUT, "size": int(feature_dim)}]


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
        return self.root / WEIGHTS_FILE

    @property
    def onnx_outputs(self) -> tuple[list[str], str | None]:
        """The ONNX file's outputs that hold probabilities, in the vocabulary's order (their concatenation is one
        probability per tag), and the feature vector's output (None when the file has none)."""
        names = list(self.config.get("onnx", {}).get("outputs", [WD_OUTPUT]))
        features = FEATURES_OUTPUT if FEATURES_OUTPUT in names else None
        return [n for n in names if n != FEATURES_OUTPUT], features


def is_bundle(path: Path) -> bool:
    """Whether a directory is an illust2vec bundle (not a WD snapshot, whose config.json is timm's)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


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


class TaggerModule(Protocol):
    """What `save_bundle` needs of a model (`models.TaggerNet`), named here so that this module never imports it."""

    cfg: Any  # has to_dict(): the TaggerConfig as JSON

    @property
    def num_features(self) -> int: ...

    def state_dict(self) -> Mapping[str, Any]: ...


def save_bundle(
    out: str | os.PathLike,
    model: TaggerModule,
    vocab: Vocab,
    thresholds: Thresholds,
    *,
    source: Mapping[str, Any] | None = None,
    feature_center: Sequence[float] | None = None,
    onnx: Callable[[Path], dict] | None = None,
    overwrite: bool = False,
) -> BundleInfo:
    """Write a bundle at `out`, replacing the one there (only a bundle, and only with `overwrite`) in one step.

    The bundle is written whole in `OUT.tmp` beside `out`, then exchanged with `out`: a reader or a crash sees the
    old bundle or the new one, never half of either and never none. A `OUT.tmp` left by a crash is removed first.

    Args:
        model: the tagger, whose config, feature width and weights are saved.
        source: where the model came from (a run and epoch, a converted file), kept in config.json.
        feature_center: each feature's median, which `extract_binary_feature` thresholds at.
        onnx: writes model.onnx at the path it is given and returns config.json's "onnx" entry (`models.onnx`),
            whose outputs are config.json's "outputs" (`model_outputs`).
    """
    from safetensors.torch import save_file  # the writer needs torch anyway; the reader stays free of it

    out = Path(out)
    check_out(out, overwrite)
    config = _bundle_config(model.cfg.to_dict(), vocab, model.num_features, source)
    if feature_center is not None:
        config["feature_center"] = [round(float(v), 6) for v in feature_center]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if onnx is not None:
            config["onnx"] = onnx(tmp / ONNX_FILE)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        wd, extra = split_vocab(vocab)
        write_vocab(wd, tmp / WD_LABELS)
        if len(extra):
            write_vocab(extra, tmp / EXTRA_LABELS)
        write_thresholds(thresholds, tmp / "thresholds.json")
        # safetensors writes its file readable by its owner only; a bundle is for sharing, so every file gets the
        # mode (umask included) of the files written beside it.
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(mode)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished bundle, or after the swap the old one
    return open_bundle(out)


def _bundle_config(
    model_cfg: Mapping[str, Any], vocab: Vocab, feature_dim: int, source: Mapping[str, Any] | None
) -> dict:
    """The content of a bundle's config.json (the "onnx" and "feature_center" entries are added by save_bundle)."""
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
        # What each output of the model holds, and where its labels are: WD's heads first (selected_tags.csv).
        "outputs": model_outputs(vocab, feature_dim),
    }


def _swap_in(new: Path, out: Path) -> None:
    """Put directory `new` at `out`; the old `out`, if any, ends up at `new` (for the caller to remove)."""
    if not out.exists():
        new.rename(out)
    elif not _exchange(new, out):
        # No atomic exchange here: two renames, with a moment between them when `out` is missing.
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        new.rename(out)
        old.rename(new)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing was changed).

    Python has no atomic exchange of two directories (os.replace cannot replace a non-empty directory), so this
    calls Linux's renameat2(RENAME_EXCHANGE) through ctypes (glibc 2.28 or later; ext4, xfs, btrfs, tmpfs, ...).
    """
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # an older or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def open_bundle(path: str | os.PathLike) -> BundleInfo:
    """Open a bundle's JSON and CSV, checking the format version and that the vocabulary is the one trained on.

    Format 2 keeps WD's heads in selected_tags.csv and the others in extra_tags.csv; format 1 kept every head in
    selected_tags.csv. Either way the vocabulary comes back whole, in the order of the model's heads."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: not a model bundle (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise UserError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path}: config.json is not an illust2vec bundle's")
    version = int(config.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format {config.get('format_version')} is newer than this illust2vec reads "
            f"({FORMAT_VERSION}); upgrade illust2vec"
        )
    vocab = _read_labels(path, version)
    if vocab.hash != config.get("vocab_hash"):
        files = f"{WD_LABELS} is" if version < 2 else f"{WD_LABELS} and {EXTRA_LABELS} are"
        raise UserError(f"{path}: {files} not the vocabulary the model was trained on (hash differs)")
    try:
        heads = config["model"]["heads"]
        activations = {h["name"]: h["activation"] for h in heads}
        sizes = {h["name"]: int(h["classes"]) for h in heads}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: the model's heads are not readable ({type(e).__name__}: {e})") from None
    labels = Labels.from_vocab(vocab, activations)
    if {h: len(ix) for h, ix in labels.heads.items()} != sizes:
        raise UserError(f"{path}: the heads in config.json do not match {WD_LABELS}")
    return BundleInfo(path, config, vocab, labels, read_thresholds(path / "thresholds.json"))


def _read_labels(path: Path, version: int) -> Vocab:
    """The whole vocabulary of a bundle: selected_tags.csv (format 1: every head; format 2: WD's three), then
    extra_tags.csv (format 2, when the model has other heads)."""
    wd = read_vocab(path / WD_LABELS)
    if version < 2:
        return wd
    stray = [h for h in HEAD_ORDER if h in {CATEGORY_NAMES[c] for c in wd.categories} and h not in WD_HEADS]
    if stray:
        raise UserError(f"{path}/{WD_LABELS}: holds {', '.join(stray)} rows; those belong in {EXTRA_LABELS}")
    extra_path = path / EXTRA_LABELS
    extra = read_vocab(extra_path) if extra_path.exists() else Vocab((), (), (), ())
    if set(CATEGORY_NAMES[c] for c in extra.categories) & set(WD_HEADS):
        raise UserError(f"{extra_path}: holds rating, general or character rows; those belong in {WD_LABELS}")
    try:
        return join_vocab(wd, extra)
    except ValueError as e:
        raise UserError(f"{path}: {WD_LABELS} and {EXTRA_LABELS} together are not a vocabulary ({e})") from None


def int8_path(root: str | os.PathLike) -> Path | None:
    """A directory's int8 model (`i2v quantize`), or None when it has none."""
    path = Path(root) / INT8_FILE
    return path if path.is_file() else None


def record_int8(root: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Record how `model.int8.onnx` was made and how well it agrees with model.onnx: in a bundle's config.json under
    "int8"; in a WD ONNX directory (whose files are WD's own) in int8.json beside. Written whole (a temporary file,
    then a rename). Returns the file written."""
    root = Path(root)
    if is_bundle(root):
        path = root / "config.json"
        content = {**json.loads(path.read_text()), "int8": dict(report)}
    else:
        path = root / INT8_REPORT
        content = dict(report)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    if path.exists():
        tmp.chmod(path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return path


def read_int8(root: str | os.PathLike) -> dict | None:
    """The report `record_int8` wrote, or None."""
    root = Path(root)
    if is_bundle(root):
        return json.loads((root / "config.json").read_text()).get("int8")
    path = root / INT8_REPORT
    return json.loads(path.read_text()) if path.is_file() else None


# ---- bundles in object storage: uploaded whole, config.json last; opened through a local cache


def check_remote_out(url: str, overwrite: bool) -> None:
    """For an --out URL: its bucket is writable, and what is there is nothing, or (with --overwrite) a bundle."""
    storage.check_writable_root(url)
    there = storage.walk_files(url)
    if not there:
        return
    shown = storage.display(url)
    if not overwrite:
        raise UserError(f"--out {shown} exists and is not empty; choose another --out or add --overwrite")
    config = storage.join(url, "config.json")
    try:
        is_ours = storage.exists(config) and json.loads(storage.read_text(config)).get("format") == FORMAT
    except ValueError:
        is_ours = False
    if not is_ours:
        raise UserError(f"--out {shown} is not a bundle; --overwrite replaces a bundle, not a folder of other files")


def upload_bundle(root: Path, url: str) -> None:
    """Upload the local bundle `root` to `url`: every file, config.json last, so that a reader finds a config.json
    only once the files it names are there; then the files of a bundle replaced there that this one lacks are
    removed (a reader between the two steps sees the new config.json, which never names them)."""
    storage.upload_tree(root, url, last=("config.json",))
    keep = {storage.join(url, *p.relative_to(root).parts) for p in root.rglob("*") if p.is_file()}
    for stale in storage.walk_files(url):
        if stale not in keep:
            storage.remove(stale)


def model_cache() -> Path:
    """Where bundles from object storage are kept: $XDG_CACHE_HOME/illust2vec/models (or under ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "illust2vec" / "models"


def cached_bundle(url: str, backend: str = "auto", cache: Path | None = None) -> Path:
    """A local copy of the bundle at `url`, in the cache: downloaded once, and again whenever the bundle's
    config.json there differs from the copy's (a new export to the same URL). Only the weights the backend needs
    are fetched ("torch": model.safetensors; "onnx": model.onnx; "auto": both, where the bundle has them)."""
    shown = storage.display(url)
    config_url = storage.join(url, "config.json")
    if not storage.exists(config_url):
        storage.check_readable_root(url)
        raise UserError(f"{shown}: not a model bundle (no config.json)")
    remote_config = storage.read_bytes(config_url)
    try:
        config = json.loads(remote_config)
    except ValueError as e:
        raise UserError(f"{shown}/config.json: not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{shown}: config.json is not an illust2vec bundle's")
    files = [WD_LABELS, "thresholds.json"]
    files += sorted({o["labels"] for o in config.get("outputs", []) if "labels" in o} - {WD_LABELS})
    if backend != "onnx":
        files.append(WEIGHTS_FILE)
    if backend != "torch" and config.get("onnx", {}).get("file"):
        files.append(config["onnx"]["file"])
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", shown.split("://", 1)[-1]).strip("_")[:100]
    local = (cache or model_cache()) / f"{key}-{hashlib.sha256(shown.encode()).hexdigest()[:8]}"
    fresh = (local / "config.json").is_file() and (local / "config.json").read_bytes() == remote_config
    if fresh and all((local / f).is_file() for f in files):
        return local
    _download_bundle(url, files, remote_config, local)
    return local


def _download_bundle(url: str, files: list[str], config: bytes, local: Path) -> None:
    """Fetch `files` of the bundle at `url` into a fresh directory beside `local`, config.json last, and put it in
    place of `local` (a missing optional file, thresholds.json, is left out as a bundle allows)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in files:
            src = storage.join(url, name)
            if name == "thresholds.json" and not storage.exists(src):
                continue
            storage.download(src, tmp / name)
        (tmp / "config.json").write_bytes(config)
        shutil.rmtree(local, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process put its copy there first: the same bundle
            tmp.rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
