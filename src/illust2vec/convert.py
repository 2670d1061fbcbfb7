"""Seed compatibility: the seed's Keras HDF5 weights and its tag lists -> an illust2vec bundle (`i2v convert keras`).

The weights are read with h5py, found by layer name (no TensorFlow, no Keras, no model code from the file), from
either layout Keras writes: Keras 2 and Keras 3's legacy `.h5` (`model_weights/<layer>/<layer>/kernel[:0]`, or the
layers at the root for `save_weights`), and Keras 3's `.weights.h5` (`layers/<path>/vars/<i>`, the layer's name in
an attribute). Kernels change layout (conv HWIO -> OIHW, Dense (in, out) -> (out, in)); BatchNorm keeps its
statistics and Keras's epsilon.

The seed's summary numbers its six Dense layers but names no head. Each head is a pair (hidden, output) of
consecutive numbers, hidden first. Which pair is which head comes, in this order of authority, from the file's graph
(`model_config`: the general head's hidden layer reads the low features), from the output sizes against the tag
lists' lengths, and from the convention that the pairs go as DESIGN.md describes the heads: character, copyright,
general (of the orders the graph and sizes allow, the one nearest it). `head_order` overrides all of it. Layers that
fit no order are an error that names their shapes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .formats.bundle import Thresholds, check_out, save_bundle
from .formats.categories import CATEGORY_CODES, CATEGORY_NAMES
from .formats.vocab import HEADER, Vocab, read_vocab, tag_id

log = logging.getLogger(__name__)

SEED_HEADS = ("general", "character", "copyright")  # the seed's heads, in the bundle's (HEAD_ORDER's) order
SEED_ACTIVATIONS = {"general": "sigmoid", "character": "softmax", "copyright": "softmax"}
CONVENTION = ("character", "copyright", "general")  # the order of the dense pairs when nothing else decides it
DEFAULT_SIZE = 256  # the seed's input, when the file does not say
WIDTH = 512  # the seed's feature width and hidden Dense width

# Keras's preprocess_input modes -> (mean, std) on a 0..1 RGB scale, as the Tagger normalises: (x/255 - mean) / std.
# caffe: BGR minus ImageNet's mean pixel, unscaled: the mean in RGB order over 255 and std 1/255, with the first
# convolution's input channels reversed so that it reads RGB where Keras fed it BGR.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "caffe": (tuple(v / 255.0 for v in reversed(CAFFE_MEAN_BGR)), (1 / 255.0,) * 3),
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x / 127.5 - 1
    "torch": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # x / 255, ImageNet mean and std
}

CONV_VARS = ("kernel", "bias")
BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
# Keras 3's .weights.h5 stores a layer's variables by position, in the order the layer created them.
POSITIONAL = {len(CONV_VARS): CONV_VARS, len(BN_VARS): BN_VARS}
_NUMBERED = re.compile(r"(dense|batch_normalization)(?:_(\d+))?")


@dataclass(frozen=True)
class ConvertConfig:
    """What `i2v convert keras` reads and where it writes the bundle."""

    weights: str  # the Keras .h5 file
    tags: str  # the tag lists: .json, .csv or the seed's pickle
    out: str  # the bundle directory to write
    preprocess: str = "caffe"  # the Keras preprocess_input mode the seed was trained with
    size: int | None = None  # input size; None: the file's, else 256
    head_order: tuple[str, ...] | None = None  # the heads of the dense pairs in numbering order (overrides the rest)
    onnx: bool = False  # also write model.onnx
    overwrite: bool = False  # replace a bundle already in `out`

    def __post_init__(self) -> None:
        for name in ("weights", "tags", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"ConvertConfig.{name} must be a non-empty string, not {getattr(self, name)!r}")
        if self.preprocess not in PREPROCESS:
            raise UserError(f"--preprocess must be one of {', '.join(PREPROCESS)}, not {self.preprocess!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise UserError(f"--size must be a number of pixels, not {self.size!r}")
        if self.head_order is not None:
            _check_head_order(self.head_order)


@dataclass(frozen=True)
class ConvertSummary:
    """What was converted: the file's layout, which Dense layers became which head and how that was decided."""

    bundle: str
    layout: str  # KerasFile.layout
    image_size: int
    preprocess: str
    tags: dict[str, int]  # head -> tags in its list
    dense: dict[str, str]  # "general head" -> "dense_1 -> dense_2"
    dense_resolved_by: str  # "graph", "numbering and output sizes", "--head-order", ...
    onnx_max_abs_diff: float | None = None  # with onnx: the largest difference in probability from torch


# ---- tag lists


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of lists, dicts, tuples, strings and numbers only: those need no class lookup.

    Every other object (a class, a function such as os.system, a numpy array) reaches the unpickler through
    find_class, which refuses it before anything is called: that is how a pickle runs code (the "Restricting
    Globals" recipe of Python's pickle documentation).
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_tag_lists(path: str | Path) -> dict[str, list[str]]:
    """The seed's tag lists, {"general": [...], "character": [...], "copyright": [...]}, each in its head's output
    order, from JSON, CSV or the seed's pickle (read without running code).

    JSON and pickle: a dict with those keys ("attribute" also names general), or a list of three lists in the order
    general, character, copyright. CSV: our selected_tags.csv (tag_id,name,category,count; rating rows skipped, as
    the seed has no rating head), or `category,name` rows with the category as a name or Danbooru code (0, 4, 3).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the tag lists ({e.strerror or e})") from None
    kind = {".json": "json", ".csv": "csv", ".pkl": "pickle", ".pickle": "pickle", ".p": "pickle"}.get(
        path.suffix.lower()
    )
    if kind is None:  # by content: every pickle of protocol 2 or later starts with PROTO (0x80)
        kind = "pickle" if data[:1] == b"\x80" else "json" if data.lstrip()[:1] in (b"{", b"[") else "csv"
    if kind == "csv":
        return _tags_from_csv(path, data)
    if kind == "json":
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
    else:
        try:
            obj = _DataOnlyUnpickler(io.BytesIO(data), encoding="utf-8").load()
        except pickle.UnpicklingError as e:
            if re.fullmatch(r"[\w.]+\.[\w.]+", str(e)):  # find_class refused a global
                raise UserError(
                    f"{path}: refused: the pickle needs {e}, and only lists, dicts, tuples, strings and numbers are "
                    "read (a pickle can run code); save the tag lists as JSON instead"
                ) from None
            raise UserError(f"{path}: not a readable pickle ({e})") from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    return _tag_lists(obj, path)


def _tag_lists(obj: Any, path: Path) -> dict[str, list[str]]:
    aliases = {"attribute": "general", "attributes": "general", "characters": "character", "copyrights": "copyright"}
    if isinstance(obj, list | tuple) and len(obj) == 3 and all(isinstance(v, list | tuple) for v in obj):
        obj = dict(zip(SEED_HEADS, obj, strict=True))
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of tag lists ({', '.join(SEED_HEADS)}) or a list of three lists")
    lists: dict[str, list[str]] = {}
    for key, values in obj.items():
        head = aliases.get(str(key), str(key))
        if head not in SEED_HEADS or head in lists:
            raise UserError(f"{path}: unexpected key {key!r}; the seed's heads are {', '.join(SEED_HEADS)}")
        if not isinstance(values, list | tuple) or not values:
            raise UserError(f"{path}: {key!r} must be a non-empty list of tag names")
        names = [v.decode() if isinstance(v, bytes) else v for v in values]
        bad = next((v for v in names if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise UserError(f"{path}: {key!r} holds {bad!r}, not a tag name")
        lists[head] = names
    missing = [h for h in SEED_HEADS if h not in lists]
    if missing:
        raise UserError(f"{path}: no tag list for {', '.join(missing)} (the seed has heads {', '.join(SEED_HEADS)})")
    return {h: lists[h] for h in SEED_HEADS}


def _tags_from_csv(path: Path, data: bytes) -> dict[str, list[str]]:
    rows = [r for r in csv.reader(io.StringIO(data.decode("utf-8-sig"))) if r]
    header = tuple(c.strip().lower() for c in rows[0]) if rows else ()
    lists: dict[str, list[str]] = {h: [] for h in SEED_HEADS}
    if header == HEADER:
        vocab = read_vocab(path)
        pairs = [(CATEGORY_NAMES[c], n) for n, c in zip(vocab.names, vocab.categories, strict=True) if c != 9]
    elif header == ("category", "name"):
        pairs = []
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != 2:
                raise UserError(f"{path}:{line}: {len(row)} fields where category,name are 2")
            cat = row[0].strip()
            pairs.append((CATEGORY_NAMES.get(int(cat), cat) if cat.isdigit() else cat, row[1]))
    else:
        raise UserError(f"{path}: a tag CSV's header is {','.join(HEADER)} (selected_tags.csv) or category,name")
    for head, name in pairs:
        if head not in lists:
            raise UserError(f"{path}: tag {name!r} is in category {head!r}; the seed's heads are {', '.join(lists)}")
        lists[head].append(name)
    return _tag_lists(lists, path)


def tags_vocab(lists: Mapping[str, Sequence[str]]) -> Vocab:
    """The bundle's selected_tags.csv from the tag lists: general (0), character (4), copyright (3), in that order."""
    rows = [(tag_id(n), n, CATEGORY_CODES[h], 0) for h in SEED_HEADS for n in lists[h]]
    try:
        return Vocab(*(tuple(c) for c in zip(*rows, strict=True)))
    except ValueError as e:
        raise UserError(f"the tag lists: {e}") from None


# ---- the HDF5 file


@dataclass(frozen=True)
class KerasFile:
    """What a Keras HDF5 file holds for conversion: weights by layer, and its graph when it has one."""

    layers: dict[str, dict[str, np.ndarray]]  # layer name -> variable name (kernel, bias, gamma, ...) -> array
    layout: str  # "keras2" (weights named kernel:0), "keras3-legacy" (.h5) or "keras3" (.weights.h5)
    config: dict[str, dict]  # layer name -> {"class_name", "config", "inbound": [layer names]}; empty: no graph
    attrs: dict[str, str]  # the file's keras_version and backend


def read_keras_h5(path: str | Path) -> KerasFile:
    """Every layer's weights in a Keras HDF5 file, by layer name, and its model_config graph when present."""
    try:
        import h5py
    except ImportError:
        raise UserError("i2v convert keras reads HDF5 with h5py: pip install 'illust2vec[convert]'") from None

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        # A full-model save keeps the weights under model_weights (the optimizer's elsewhere); save_weights at the root.
        root = f.get("model_weights", f)
        datasets: list[tuple[str, Any]] = []
        root.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        # A top-level group whose arrays all sit in one subgroup is one layer, named by the group: Keras 2 under
        # TensorFlow 1 could store dense_1's kernel as dense_1/dense_1_2/kernel:0 after a rebuild in one session.
        # A group with several subgroups is a nested model, whose layers the subgroups name.
        subgroups: dict[str, set[str]] = {}
        for name, _ in datasets:
            subgroups.setdefault(name.split("/")[0], set()).add(name.rsplit("/", 1)[0])
        layers: dict[str, dict[str, np.ndarray]] = {}
        layout = "keras3-legacy"
        for name, obj in datasets:
            parts = name.split("/")
            if len(parts) < 2 or parts[0] == "optimizer_weights":
                continue
            parent = obj.parent
            if parts[-2] == "vars" and parts[-1].isdigit() and "name" in parent.attrs:
                layout = "keras3"  # layers/<path>/vars/<i>, the layer's own name in vars' attribute
                layer, var = _text(parent.attrs["name"]), int(parts[-1])
                order = POSITIONAL.get(len(parent))
                key = order[var] if order and var < len(order) else str(var)
            else:
                layer = parts[0] if len(subgroups[parts[0]]) == 1 else parts[-2]
                key = parts[-1]
                if key.endswith(":0"):
                    layout, key = "keras2", key[:-2]
            if key in layers.setdefault(layer, {}):
                raise UserError(f"{path}: layer {layer} has two {key} arrays ({name} and another)")
            layers[layer][key] = np.asarray(obj[()], dtype=np.float32)
        attrs = {k: _text(f.attrs[k]) for k in ("keras_version", "backend") if k in f.attrs}
        config = _graph(_text(f.attrs["model_config"]), path) if "model_config" in f.attrs else {}
    if not layers:
        raise UserError(f"{path}: no weights found (not a Keras model or weights file)")
    return KerasFile(layers, layout, config, attrs)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _graph(text: str, path: Path) -> dict[str, dict]:
    """model_config's layers: class, config and the names of the layers each reads (Keras 2 and 3 node formats)."""
    try:
        cfg = json.loads(text)["config"]
        layers = cfg["layers"] if isinstance(cfg, dict) else cfg
        return {
            lay["config"].get("name", lay.get("name")): {
                "class_name": lay["class_name"],
                "config": lay["config"],
                "inbound": sorted(set(_inbound(lay.get("inbound_nodes", [])))),
            }
            for lay in layers
        }
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: model_config unreadable (%s); converting from the weights alone", path, e)
        return {}


def _inbound(nodes: Any):
    """Layer names in inbound_nodes: Keras 2's [[name, node, tensor, kwargs], ...], Keras 3's keras_history."""
    if isinstance(nodes, dict):
        if "keras_history" in nodes:
            yield nodes["keras_history"][0]
        else:
            for v in nodes.values():
                yield from _inbound(v)
    elif isinstance(nodes, list):
        if len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
            yield nodes[0]
        else:
            for v in nodes:
                yield from _inbound(v)


def _input_size(config: Mapping[str, dict]) -> int | None:
    for layer in config.values():
        if layer["class_name"] == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape") or []
            dims = [d for d in shape[1:] if d not in (None, 3)]  # channels first or last
            return int(dims[0]) if dims else None
    return None


# ---- which Dense is which head


def numbered(layers: Sequence[str], prefix: str) -> list[str]:
    """The layers named `prefix` or `prefix_N`, by N (Keras numbers layers in the order it created them)."""
    found = [(m, name) for name in layers if (m := _NUMBERED.fullmatch(name)) and m.group(1) == prefix]
    return [name for m, name in sorted(found, key=lambda t: int(t[0].group(2) or 0))]


def resolve_dense(
    kernels: Mapping[str, tuple[int, ...]],
    sizes: Mapping[str, int],
    config: Mapping[str, dict] | None = None,
    head_order: Sequence[str] | None = None,
) -> tuple[dict[str, tuple[str, str]], str]:
    """Which Dense layers are which head: head -> (hidden, output) layer names, and how that was decided.

    Args:
        kernels: Dense layer name -> kernel shape (in, out), for the file's six Dense layers.
        sizes: head -> the number of tags in its list.
        config: the file's graph (`KerasFile.config`), or None.
        head_order: the heads of the pairs in numbering order, when the user says so.
    """
    dense = numbered(list(kernels), "dense")
    if len(dense) != 6:
        raise UserError(
            f"expected six Dense layers (dense_1 ... dense_6: a hidden and an output layer per head), found "
            f"{len(dense)}: {', '.join(dense) or 'none'}"
        )
    pairs, general, how = [tuple(dense[i : i + 2]) for i in (0, 2, 4)], None, "numbering"
    graph = _dense_graph(dense, config or {})
    if graph is not None:
        pairs, general, how = graph[0], graph[1], "graph"

    def fits(order: Sequence[str]) -> str | None:
        """Why the pairs cannot be these heads, or None when they can."""
        for head, (hidden, output) in zip(order, pairs, strict=True):
            if general is not None and (head == "general") != (hidden == general[0]):
                return f"the graph shows {general[0]} -> {general[1]} reading the low features (the general head)"
            want = {hidden: (WIDTH, WIDTH), output: (WIDTH, sizes[head])}
            for layer, shape in want.items():
                if tuple(kernels[layer]) != shape:
                    return f"{layer} has kernel {tuple(kernels[layer])}, {head}'s would be {shape}"
        return None

    if head_order is not None:
        order = _check_head_order(head_order)
        if why := fits(order):
            raise UserError(f"--head-order {','.join(order)} does not fit the file: {why}")
        return dict(zip(order, pairs, strict=True)), "--head-order"
    allowed = [o for o in itertools.permutations(CONVENTION) if fits(o) is None]
    if not allowed:
        shapes = ", ".join(f"{d} {tuple(kernels[d])}" for d in dense)
        counts = ", ".join(f"{h} {n}" for h, n in sizes.items())
        raise UserError(f"the Dense layers fit no assignment to the heads: kernels {shapes}; tags {counts}")
    # The allowed order nearest the convention: the fewest pairs of heads swapped. It is unique: two allowed orders
    # equally near would need all three sizes equal, which allows the convention itself, or the graph to pin the
    # general head, which leaves orders one swap apart.
    rank = CONVENTION.index
    order = min(allowed, key=lambda o: sum(rank(a) > rank(b) for a, b in itertools.combinations(o, 2)))
    if len(allowed) == 1:
        how += " and output sizes"
    else:
        how += " and convention" if order == CONVENTION else " and nearest convention"
    return dict(zip(order, pairs, strict=True)), how


def _check_head_order(head_order: Sequence[str]) -> tuple[str, ...]:
    order = tuple(head_order)
    if sorted(order) != sorted(SEED_HEADS):
        raise UserError(f"--head-order must name {', '.join(SEED_HEADS)} once each, not {','.join(map(str, order))}")
    return order


def _dense_graph(dense: Sequence[str], config: Mapping[str, dict]) -> tuple[list[tuple[str, str]], tuple] | None:
    """From the graph: the (hidden, output) pairs in numbering order and the general head's pair; None when the
    graph is absent or does not show three clean pairs with one on the low features."""
    if not all(d in config for d in dense) or "high_features" not in config:
        return None

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), list(config[name]["inbound"])
        while todo:
            n = todo.pop()
            if n not in seen and n in config:
                seen.add(n)
                todo.extend(config[n]["inbound"])
        return seen

    up = {d: ancestors(d) for d in dense}
    outputs = [d for d in dense if any(e in up[d] for e in dense)]
    hidden = [d for d in dense if d not in outputs]
    pairs = []
    for h in hidden:
        reading = [o for o in outputs if h in up[o]]
        if len(reading) != 1:
            return None
        pairs.append((h, reading[0]))
    low = [p for p in pairs if "high_features" not in up[p[0]]]
    if len(pairs) != 3 or len(low) != 1:
        return None
    return pairs, low[0]


# ---- the weights


def seed_state_dict(
    keras: KerasFile, heads: Mapping[str, tuple[str, str]], model: Any, flip_first: bool, path: Path
) -> dict[str, Any]:
    """The tagger's state dict from the Keras layers: the layout of each kernel converted, every shape checked."""
    import torch

    from .models.seed import BN_EPS

    bns = numbered(list(keras.layers), "batch_normalization")
    if len(bns) != 2:
        raise UserError(
            f"{path}: expected two BatchNormalization layers (batch_normalization_1 and _2), found "
            f"{', '.join(bns) or 'none'}"
        )
    # module prefix in our model -> (Keras layer, kind, what it is in the seed)
    table = {f"backbone.{c}": (c, "conv", "VGG16 convolution") for c in model.backbone.conv_names}
    table |= {
        "backbone.low_features.bn": (bns[0], "bn", "low features' BatchNorm"),
        "backbone.high_features.conv": ("high_features", "conv", "high features' convolution"),
        "backbone.high_features.bn": (bns[1], "bn", "high features' BatchNorm"),
    }
    for head, (hidden, output) in heads.items():
        table[f"heads.{head}.fc1"] = (hidden, "dense", f"{head} head's hidden Dense")
        table[f"heads.{head}.fc2"] = (output, "dense", f"{head} head's output Dense")
    ours = model.state_dict()
    state = dict(ours)
    for prefix, (layer, kind, role) in table.items():
        v = keras.layers.get(layer)
        if v is None:
            raise UserError(f"{path}: no weights for layer {layer} (the seed's {role})")
        need = BN_VARS if kind == "bn" else CONV_VARS
        missing = [k for k in need if k not in v]
        if missing:
            raise UserError(f"{path}: layer {layer} has no {', '.join(missing)} (it has {', '.join(v) or 'nothing'})")
        if kind == "bn":
            eps = float(keras.config.get(layer, {}).get("config", {}).get("epsilon", BN_EPS))
            # Our BatchNorm's epsilon is Keras's default; another one folds into the variance, exactly.
            values = {"weight": v["gamma"], "bias": v["beta"], "running_mean": v["moving_mean"]}
            values["running_var"] = v["moving_variance"] + (eps - BN_EPS)
        else:
            kernel = v["kernel"]
            # conv HWIO -> OIHW; Dense (in, out) -> (out, in)
            kernel = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
            values = {"weight": kernel, "bias": v["bias"]}
        for name, value in values.items():
            key = f"{prefix}.{name}"
            if tuple(value.shape) != tuple(ours[key].shape):
                keras_shape = _keras_shape(tuple(ours[key].shape)) if name == "weight" and kind != "bn" else None
                want = keras_shape or tuple(ours[key].shape)
                theirs = tuple(v["kernel"].shape) if keras_shape else tuple(value.shape)
                raise UserError(f"{path}: layer {layer}: {name} has shape {theirs}, the seed's is {want}")
            state[key] = torch.from_numpy(np.ascontiguousarray(value))
    if flip_first:  # caffe mode: Keras fed the first convolution BGR; ours receives RGB
        first = f"backbone.{model.backbone.conv_names[0]}.weight"
        state[first] = state[first].flip(1).contiguous()
    return state


def _keras_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else (shape[1], shape[0])


def _check_activations(keras: KerasFile, heads: Mapping[str, tuple[str, str]], path: Path) -> dict[str, str]:
    """Check the graph's activations against what the seed module computes; returns each head's activation
    (an output layer's own sigmoid or softmax when it has one, else the seed's)."""
    want = {c: "relu" for c in keras.layers if re.fullmatch(r"block\d_conv\d", c)}
    want |= {"high_features": "linear"} | {hidden: "relu" for hidden, _ in heads.values()}
    for layer, act in want.items():
        got = keras.config.get(layer, {}).get("config", {}).get("activation", act)
        if got != act:
            raise UserError(f"{path}: layer {layer} has activation {got!r}; the seed's {layer} has {act!r}")
    acts = {}
    for head, (_, output) in heads.items():
        got = keras.config.get(output, {}).get("config", {}).get("activation", "linear")
        acts[head] = got if got in ("sigmoid", "softmax") else SEED_ACTIVATIONS[head]
    return acts


# ---- the command


def convert_keras(cfg: ConvertConfig) -> ConvertSummary:
    """Write a bundle from the seed's Keras weights and tag lists; returns a summary of what was mapped."""
    path, out = Path(cfg.weights), Path(cfg.out)
    check_out(out, cfg.overwrite)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    lists = read_tag_lists(cfg.tags)
    vocab = tags_vocab(lists)
    keras = read_keras_h5(path)
    kernels = {n: v["kernel"].shape for n, v in keras.layers.items() if "kernel" in v and v["kernel"].ndim == 2}
    sizes = {h: len(lists[h]) for h in SEED_HEADS}
    try:
        heads, how = resolve_dense(kernels, sizes, keras.config, cfg.head_order)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    size = cfg.size or _input_size(keras.config) or DEFAULT_SIZE
    model = _seed_model(keras, heads, sizes, size, cfg.preprocess, path)

    layer_map = {f"{h} head": f"{hidden} -> {output}" for h, (hidden, output) in heads.items()}
    flip = cfg.preprocess == "caffe"
    source = {
        "converted_from": "keras",
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "layout": keras.layout,
        **{f"keras_{k}": v for k, v in keras.attrs.items()},
        "tags": Path(cfg.tags).name,
        "keras_preprocess": cfg.preprocess,
        "first_conv_input": "BGR channels reversed to read RGB" if flip else "unchanged (RGB)",
        "dense": layer_map,
        "dense_resolved_by": how,
    }
    onnx = None
    if cfg.onnx:
        from .models.onnx import export_onnx

        onnx = functools.partial(export_onnx, model)
    thresholds = Thresholds(method="defaults (converted from Keras; not calibrated)")
    info = save_bundle(out, model, vocab, thresholds, source=source, onnx=onnx, overwrite=cfg.overwrite)
    diff = info.config["onnx"]["max_abs_diff"] if cfg.onnx else None
    return ConvertSummary(str(out), keras.layout, size, cfg.preprocess, sizes, layer_map, how, diff)


def _seed_model(
    keras: KerasFile, heads: Mapping[str, tuple[str, str]], sizes: Mapping[str, int], size: int, mode: str, path: Path
) -> Any:
    """The seed's architecture (`models.I2VVGG16` behind our heads) holding the Keras file's weights, in eval mode."""
    from .models.tagger import HeadConfig, create_tagger

    activations = _check_activations(keras, heads, path)
    mean, std = PREPROCESS[mode]
    head_cfgs = tuple(HeadConfig(h, sizes[h], activations[h]) for h in SEED_HEADS)
    model = create_tagger("i2v_vgg16", heads=head_cfgs, image_size=size, mean=mean, std=std).eval()
    model.load_state_dict(seed_state_dict(keras, heads, model, mode == "caffe", path))
    return model
