"""i2v convert keras: the seed's Keras weights in every HDF5 layout -> a bundle whose outputs are Keras's own;
the tag lists from JSON, CSV and a pickle that cannot run code; which Dense layer is which head."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from illust2vec.convert import (
    BN_VARS,
    CONV_VARS,
    ConvertConfig,
    ConvertSummary,
    convert_keras,
    read_tag_lists,
    resolve_dense,
    tags_vocab,
)
from illust2vec.errors import UserError
from illust2vec.formats.bundle import open_bundle
from illust2vec.infer.preprocess import load_batch
from illust2vec.infer.tagger import Tagger
from illust2vec.models.seed import VGG16_BLOCKS

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: the test-only Keras runs on torch, not TensorFlow
keras = pytest.importorskip("keras")

SIZE = 128  # the smallest input the seed allows is 96; 128 leaves a 2x2 map for the high features
# Unequal sizes in general but not between character and copyright, so that the graph (or, without one, the output
# sizes and the convention) must tell the heads apart. The Dense layers are numbered general, character, copyright:
# not the convention's order, so that the conversion has to find it.
TAGS = {
    "general": ["1girl", "solo", "long_hair", "smile", "blue_eyes", "skirt"],
    "character": ["hatsune_miku", "kagamine_rin", "megurine_luka", "kaito"],
    "copyright": ["vocaloid", "touhou", "original", "kantai_collection"],
}
NUMBERING = ("general", "character", "copyright")
REAL = Path("/work/shared/fixtures/real/images")
IMAGES = [REAL / "illustration2vec/miku.jpg", *sorted((REAL / "imgutils/aicheck/ai").glob("*.jpg"))[:3]]
I2V = [sys.executable, "-m", "illust2vec.cli"]


def keras_seed(size: int, sizes: dict[str, int], numbering=NUMBERING):
    """The seed in Keras, with the layer names of its summary, as DESIGN.md describes it."""
    from keras import layers

    keras.utils.set_random_seed(0)  # Keras's initializers: the same seed, the same test
    rng = np.random.default_rng(0)
    inp = keras.Input((size, size, 3))
    x = inp
    for b, widths in enumerate(VGG16_BLOCKS, start=1):
        for c, width in enumerate(widths, start=1):
            x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"block{b}_conv{c}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    low = layers.Dropout(0.5)(layers.BatchNormalization(name="batch_normalization_1")(x))
    high = layers.Conv2D(512, 3, padding="valid", name="high_features")(low)
    high = layers.Dropout(0.5)(layers.BatchNormalization(name="batch_normalization_2")(high))
    pooled = {"low": layers.GlobalAveragePooling2D(name="low_pool")(low)}
    pooled["high"] = layers.GlobalAveragePooling2D(name="high_pool")(high)
    outputs = {}
    for i, head in enumerate(numbering):
        hidden, out = f"dense_{2 * i + 1}", f"dense_{2 * i + 2}"
        if head == "general":  # Dense 512 -> Dense N -> Dropout -> sigmoid
            h = layers.Dense(512, activation="relu", name=hidden)(pooled["low"])
            y = layers.Activation("sigmoid")(layers.Dropout(0.5)(layers.Dense(sizes[head], name=out)(h)))
        else:  # Dense 512 -> Dropout -> Dense N -> softmax
            h = layers.Dropout(0.5)(layers.Dense(512, activation="relu", name=hidden)(pooled["high"]))
            y = layers.Dense(sizes[head], activation="softmax", name=out)(h)
        outputs[head] = y
    model = keras.Model(inp, [outputs[h] for h in ("general", "character", "copyright")])
    outputs_dense = {f"dense_{2 * i + 2}" for i in range(3)}
    for layer in model.layers:  # biases random too: Keras starts them at zero, which would hide a misplaced one
        if isinstance(layer, layers.Conv2D | layers.Dense):
            kernel, bias = layer.get_weights()
            # Larger output kernels spread the logits, so that the images' scores differ by far more than 1e-4.
            kernel = kernel * (3.0 if layer.name in outputs_dense else 1.0)
            layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape).astype(np.float32)])
    return model


def calibrate_bn(model, x: np.ndarray, seed: int) -> None:
    """Random BatchNorm parameters and moving statistics near those of the inputs `x`, so that they matter and the
    outputs stay far from saturation (the low one first: the high one's input depends on it)."""
    rng = np.random.default_rng(seed)
    low, high = model.get_layer("batch_normalization_1"), model.get_layer("batch_normalization_2")
    a = keras.ops.convert_to_numpy(keras.Model(model.input, low.input).predict(x, verbose=0))
    for layer in (low, high):
        if layer is high:  # the high features from the low ones, calibrated: two layers, not the whole VGG again
            a = keras.ops.convert_to_numpy(model.get_layer("high_features")(low(a, training=False)))
        mean, std = a.mean((0, 1, 2)), a.std((0, 1, 2)) + 1e-3
        n = mean.shape[0]
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, n).astype(np.float32),
                rng.normal(0, 0.2, n).astype(np.float32),
                (mean + 0.3 * std * rng.normal(size=n)).astype(np.float32),
                (std**2 * rng.uniform(0.5, 2.0, n)).astype(np.float32),
            ]
        )


def keras_input(batch: np.ndarray, mode: str) -> np.ndarray:
    """Our prepared batch (BGR, 0..255) as a Keras user feeds the seed: RGB through preprocess_input."""
    from keras.applications import imagenet_utils

    return imagenet_utils.preprocess_input(batch[..., ::-1].copy(), mode=mode)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return load_batch([*IMAGES, noise], SIZE)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory, batch):
    """Per preprocess mode: the Keras seed (BatchNorm calibrated to that mode's inputs) saved with model.save as
    HDF5, its weights by layer, and what Keras predicts: probabilities per head and the feature vector."""
    model = keras_seed(SIZE, {h: len(v) for h, v in TAGS.items()})
    # The seed's outputs and, as one more output, its feature vector (the pooled high features): one pass per mode.
    outputs = keras.Model(model.input, [*model.outputs, model.get_layer("high_pool").output])
    out = tmp_path_factory.mktemp("keras")
    files = {}
    for i, mode in enumerate(("caffe", "tf", "torch")):
        x = keras_input(batch, mode)
        calibrate_bn(model, x, seed=i)
        path = out / f"seed-{mode}.h5"
        model.save(path)
        predicted = [keras.ops.convert_to_numpy(p) for p in outputs.predict(x, verbose=0)]
        expected = dict(zip(("general", "character", "copyright", "features"), predicted, strict=True))
        weights = {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in model.layers}
        if mode == "caffe":
            model.save_weights(out / "seed-caffe.weights.h5")
        files[mode] = (path, expected, {k: v for k, v in weights.items() if v})
    return files


@pytest.fixture(scope="module")
def tags_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tags") / "tags.json"
    path.write_text(json.dumps(TAGS))
    return path


def convert(tmp_path: Path, weights: Path, tags: Path, **kw) -> tuple[Tagger, ConvertSummary]:
    out = tmp_path / f"bundle-{weights.stem}"
    summary = convert_keras(ConvertConfig(str(weights), str(tags), str(out), **kw))
    return Tagger.load(out, backend="torch", device="cpu"), summary


def assert_matches_keras(tagger: Tagger, batch: np.ndarray, expected: dict) -> None:
    probs, features = tagger.run(batch)
    for head, ix in tagger.labels.heads.items():
        np.testing.assert_allclose(probs[:, list(ix)], expected[head], atol=1e-4, rtol=0)
    scale = np.abs(expected["features"]).max()
    np.testing.assert_allclose(features, expected["features"], atol=1e-4 * scale, rtol=1e-4)


def write_keras2(path: Path, weights: dict, nested: bool = True, drop: tuple[str, ...] = (), suffix: str = "") -> None:
    """An HDF5 file in the Keras 2 layout, as Keras 2 wrote it: model_weights/<layer>/<layer>/kernel:0 (or the
    layers at the root, as save_weights did), with the layer_names and weight_names attributes; no model_config.
    `suffix` renames the arrays' scope as TensorFlow 1 did when a session rebuilt a model (dense_1/dense_1_1/...)."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.2.4"
        f.attrs["backend"] = b"tensorflow"
        root = f.create_group("model_weights") if nested else f
        names = [n for n in weights if n not in drop]
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            group = root.create_group(name)
            var_names = BN_VARS if len(weights[name]) == len(BN_VARS) else CONV_VARS
            group.attrs["weight_names"] = np.array([f"{name}{suffix}/{v}:0".encode() for v in var_names])
            for v, array in zip(var_names, weights[name], strict=True):
                group.create_dataset(f"{name}{suffix}/{v}:0", data=array)


# ---- parity with Keras


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_keras3_h5_converts_to_the_same_outputs(mode, seed_files, batch, tags_json, tmp_path):
    path, expected, _ = seed_files[mode]
    tagger, summary = convert(tmp_path, path, tags_json, preprocess=mode)
    assert_matches_keras(tagger, batch, expected)
    # Not a comparison of constants: each head scores the images differently (by 10x the tolerance and more), and
    # the softmax heads are mostly not saturated.
    assert min(expected[h].std(0).max() for h in TAGS) > 1e-3
    assert max(np.median(expected[h].max(1)) for h in ("character", "copyright")) < 0.99
    assert summary.image_size == SIZE  # from the file's input layer
    assert summary.dense == {
        "general head": "dense_1 -> dense_2",
        "character head": "dense_3 -> dense_4",
        "copyright head": "dense_5 -> dense_6",
    }
    # The graph says which pair reads the low features; character before copyright is the convention.
    assert summary.dense_resolved_by == "graph and nearest convention"
    info = open_bundle(tmp_path / f"bundle-{path.stem}")
    assert info.config["source"]["keras_preprocess"] == mode
    assert info.config["source"]["layout"] == "keras3-legacy"
    assert [(h["name"], h["classes"], h["activation"]) for h in info.config["model"]["heads"]] == [
        ("general", 6, "sigmoid"),
        ("character", 4, "softmax"),
        ("copyright", 4, "softmax"),
    ]
    assert info.vocab.names == tuple(TAGS["general"] + TAGS["character"] + TAGS["copyright"])
    assert info.thresholds.heads["general"] == 0.35


def test_a_wrong_preprocess_mode_does_not_match(seed_files, batch, tags_json, tmp_path):
    """The parity test can fail: the caffe-trained seed read as tf (and caffe without the channel flip, which is
    what torch mode's RGB order amounts to with caffe's scale) gives other outputs."""
    path, expected, _ = seed_files["caffe"]
    tagger, _ = convert(tmp_path, path, tags_json, preprocess="tf")
    with pytest.raises(AssertionError):
        assert_matches_keras(tagger, batch, expected)


def test_keras3_weights_h5_converts(seed_files, batch, tags_json, tmp_path):
    """model.save_weights("x.weights.h5"): layers/<name>/vars/<i>, no graph; the output sizes and the convention
    decide the heads (general has 6 tags, the other two 4)."""
    _, expected, _ = seed_files["caffe"]
    path = seed_files["caffe"][0].with_name("seed-caffe.weights.h5")
    tagger, summary = convert(tmp_path, path, tags_json, size=SIZE)
    assert summary.layout == "keras3"
    assert summary.dense_resolved_by == "numbering and nearest convention"
    assert summary.dense["general head"] == "dense_1 -> dense_2"
    assert_matches_keras(tagger, batch, expected)


@pytest.mark.parametrize(
    "nested, suffix", [(True, ""), (False, ""), (True, "_1")], ids=["model-save", "save-weights", "tf1-rebuilt"]
)
def test_keras2_layout_converts(nested, suffix, seed_files, batch, tags_json, tmp_path):
    _, expected, weights = seed_files["caffe"]
    path = tmp_path / "seed-keras2.h5"
    write_keras2(path, weights, nested=nested, suffix=suffix)
    tagger, summary = convert(tmp_path, path, tags_json, size=SIZE)
    assert summary.layout == "keras2"
    assert_matches_keras(tagger, batch, expected)
    info = open_bundle(tmp_path / "bundle-seed-keras2")
    assert info.config["source"]["keras_keras_version"] == "2.2.4"
    assert info.config["model"]["mean"] == pytest.approx([123.68 / 255, 116.779 / 255, 103.939 / 255])


@pytest.mark.parametrize(
    "drop, change, needle",
    [
        (("high_features",), None, "no weights for layer high_features (the seed's high features' convolution)"),
        (("dense_6",), None, "expected six Dense layers (dense_1 ... dense_6"),
        (("batch_normalization_2",), None, "expected two BatchNormalization layers"),
        ((), ("block3_conv2", 0, (3, 3, 256, 128)), "layer block3_conv2: weight has shape (3, 3, 256, 128), the seed"),
        ((), ("batch_normalization_1", 2, (256,)), "layer batch_normalization_1: running_mean has shape (256,)"),
    ],
)
def test_a_missing_or_misshapen_layer_is_named(drop, change, needle, seed_files, tags_json, tmp_path):
    weights = dict(seed_files["caffe"][2])
    if change:
        name, index, shape = change
        weights[name] = list(weights[name])
        weights[name][index] = np.zeros(shape, np.float32)
    path = tmp_path / "broken.h5"
    write_keras2(path, weights, drop=drop)
    with pytest.raises(UserError) as e:
        convert(tmp_path, path, tags_json, size=SIZE)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "bundle-broken").exists()


@pytest.mark.slow
def test_cli_convert_then_load(seed_files, tags_json, tmp_path):
    path = seed_files["caffe"][0]
    out = tmp_path / "bundle"
    r = subprocess.run(
        [*I2V, "convert", "keras", str(path), "--tags", str(tags_json), "--out", str(out), "--preprocess", "caffe"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "general head: dense_1 -> dense_2" in r.stderr and "caffe" in r.stderr
    assert open_bundle(out).config["source"]["file"] == path.name
    # Again into the same place: refused without --overwrite, as one line.
    r = subprocess.run(
        [*I2V, "convert", "keras", str(path), "--tags", str(tags_json), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_onnx_matches_keras(seed_files, batch, tags_json, tmp_path):
    path, expected, _ = seed_files["tf"]
    out = tmp_path / "bundle"
    summary = convert_keras(ConvertConfig(str(path), str(tags_json), str(out), preprocess="tf", onnx=True))
    assert summary.onnx_max_abs_diff < 1e-4
    assert_matches_keras(Tagger.load(out, backend="onnx", device="cpu"), batch, expected)


# ---- which Dense layer is which head (no Keras needed)


def kernels(sizes_in_numbering: list[int]) -> dict[str, tuple[int, int]]:
    """Six Dense kernels: (hidden, output) per head, in numbering order, with the given output sizes."""
    out = {}
    for i, n in enumerate(sizes_in_numbering):
        out[f"dense_{2 * i + 1}"] = (512, 512)
        out[f"dense_{2 * i + 2}"] = (512, n)
    return out


def keras2_graph(general_pair: int) -> dict:
    """A Keras 2 model_config's graph (as `read_keras_h5` parses it): pair `general_pair` reads the low features."""
    import illust2vec.convert as c

    edges = [("batch_normalization_1", "block5_pool"), ("high_features", "batch_normalization_1")]
    for i in range(3):
        source = "batch_normalization_1" if i == general_pair else "high_features"
        edges += [(f"pool_{i}", source), (f"dense_{2 * i + 1}", f"pool_{i}")]
        edges += [(f"dropout_{i}", f"dense_{2 * i + 1}"), (f"dense_{2 * i + 2}", f"dropout_{i}")]
    layers = [
        {"name": name, "class_name": "Layer", "config": {"name": name}, "inbound_nodes": [[[reads, 0, 0, {}]]]}
        for name, reads in edges
    ]
    return c._graph(json.dumps({"class_name": "Model", "config": {"layers": layers}}), Path("x.h5"))


SIZES4 = {"general": 4, "character": 4, "copyright": 4}


@pytest.mark.parametrize(
    "numbered, sizes, graph, expect, how",
    [
        # Nothing tells them apart: the convention, the order in which DESIGN.md describes the heads.
        ([4, 4, 4], SIZES4, None, ("character", "copyright", "general"), "numbering and convention"),
        # The output sizes decide.
        ([3, 5, 7], {"general": 3, "character": 5, "copyright": 7}, None, NUMBERING, "numbering and output sizes"),
        # The graph puts general first; character before copyright stays the convention.
        ([4, 4, 4], SIZES4, 0, NUMBERING, "graph and nearest convention"),
        ([4, 4, 4], SIZES4, 2, ("character", "copyright", "general"), "graph and convention"),
        # The graph puts general second, the sizes copyright last.
        (
            [4, 4, 9],
            {"general": 4, "character": 4, "copyright": 9},
            1,
            ("character", "general", "copyright"),
            "graph and output sizes",
        ),
        # Without the graph, the sizes put copyright last and the convention puts character before general.
        (
            [4, 4, 9],
            {"general": 4, "character": 4, "copyright": 9},
            None,
            ("character", "general", "copyright"),
            "numbering and nearest convention",
        ),
    ],
)
def test_resolve_dense(numbered, sizes, graph, expect, how):
    config = keras2_graph(graph) if graph is not None else None
    heads, got_how = resolve_dense(kernels(numbered), sizes, config)
    assert [heads[h] for h in expect] == [("dense_1", "dense_2"), ("dense_3", "dense_4"), ("dense_5", "dense_6")]
    assert got_how == how


def test_resolve_dense_errors_and_override():
    sizes = {"general": 4, "character": 4, "copyright": 9}
    heads, how = resolve_dense(kernels([4, 4, 9]), sizes, head_order=("general", "character", "copyright"))
    assert heads["general"] == ("dense_1", "dense_2") and how == "--head-order"
    with pytest.raises(UserError, match="--head-order copyright,character,general does not fit.*dense_2 has kernel"):
        resolve_dense(kernels([4, 4, 9]), sizes, head_order=("copyright", "character", "general"))
    with pytest.raises(UserError, match="fit no assignment"):
        resolve_dense(kernels([4, 4, 5]), {"general": 1, "character": 2, "copyright": 3})
    with pytest.raises(UserError, match="found 4: dense_1, dense_2, dense_3, dense_4"):
        resolve_dense({k: v for k, v in kernels([4, 4, 4]).items() if k < "dense_5"}, SIZES4)
    # Keras renumbers layers each time a notebook rebuilds a model: dense_7 ... dense_12 are the same six.
    renumbered = {f"dense_{int(k.split('_')[1]) + 6}": v for k, v in kernels([4, 4, 4]).items()}
    assert resolve_dense(renumbered, SIZES4)[0]["general"] == ("dense_11", "dense_12")


def test_input_size_from_either_keras_config():
    import illust2vec.convert as c

    keras2 = {"input_1": {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 256, 256, 3]}}}
    keras3 = {"input_layer": {"class_name": "InputLayer", "config": {"batch_shape": [None, 3, 224, 224]}}}
    dynamic = {"input_layer": {"class_name": "InputLayer", "config": {"batch_shape": [None, None, None, 3]}}}
    assert [c._input_size(g) for g in (keras2, keras3, dynamic, {})] == [256, 224, None, None]


# ---- tag lists


def test_tag_lists_from_json_and_csv(tmp_path):
    as_list = tmp_path / "lists.json"
    as_list.write_text(json.dumps([TAGS["general"], TAGS["character"], TAGS["copyright"]]))
    assert read_tag_lists(as_list) == TAGS
    attribute = tmp_path / "attribute.json"
    attribute.write_text(json.dumps({"attribute": TAGS["general"], **{h: TAGS[h] for h in ("character", "copyright")}}))
    assert read_tag_lists(attribute) == TAGS

    selected = tmp_path / "selected_tags.csv"
    from illust2vec.formats.vocab import write_vocab

    write_vocab(tags_vocab(TAGS), selected)
    assert read_tag_lists(selected) == TAGS
    # A WD selected_tags.csv has rating rows first: the seed has no rating head, so they are skipped.
    wd = tmp_path / "wd.csv"
    wd.write_text("tag_id,name,category,count\n9999999,general,9,1\n" + selected.read_text().split("\n", 1)[1])
    assert read_tag_lists(wd) == TAGS

    simple = tmp_path / "simple.csv"
    rows = [f"{'0' if h == 'general' else h},{n}" for h in TAGS for n in TAGS[h]]
    simple.write_text("category,name\n" + "\n".join(rows) + "\n")
    assert read_tag_lists(simple) == TAGS
    artist = tmp_path / "artist.csv"
    artist.write_text("category,name\n1,someone\n")
    with pytest.raises(UserError, match="category 'artist'"):
        read_tag_lists(artist)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_tag_lists_from_the_seeds_pickle(protocol, tmp_path):
    path = tmp_path / "tags.pkl"
    path.write_bytes(pickle.dumps({h: tuple(v) for h, v in TAGS.items()}, protocol=protocol))
    assert read_tag_lists(path) == TAGS


class Payload:
    """What a hostile pickle does: call os.system while it is being read."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "tags.pkl"
    path.write_bytes(pickle.dumps({"general": ["a"], "character": [Payload(marker)], "copyright": ["c"]}))
    with pytest.raises(UserError, match=r"refused: the pickle needs (posix|os)\.system.*a pickle can run code"):
        read_tag_lists(path)
    assert not marker.exists()
    # Any class at all is refused, numpy's arrays included; the file's suffix does not matter.
    other = tmp_path / "tags.bin"
    other.write_bytes(pickle.dumps({"general": np.array(["a"]), "character": ["b"], "copyright": ["c"]}))
    with pytest.raises(UserError, match="refused: the pickle needs numpy"):
        read_tag_lists(other)


def test_bad_tag_lists_are_one_line(tmp_path):
    cases = {
        "missing.json": ({"general": ["a"], "character": ["b"]}, "no tag list for copyright"),
        "extra.json": ({**TAGS, "artist": ["x"]}, "unexpected key 'artist'"),
        "numbers.json": ({**TAGS, "general": ["a", 3]}, "'general' holds 3, not a tag name"),
        "twice.json": ({**TAGS, "general": ["a", "a"]}, "'a' (category 0) is listed twice"),
    }
    for name, (obj, needle) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            tags_vocab(read_tag_lists(path))


# ---- the config


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"preprocess": "keras"}, "--preprocess must be one of caffe, tf, torch, not 'keras'"),
        ({"size": 0}, "--size must be a number of pixels, not 0"),
        ({"head_order": ("general", "general", "copyright")}, "--head-order must name general, character, copyright"),
        ({"weights": ""}, "ConvertConfig.weights must be a non-empty string"),
    ],
)
def test_a_bad_config_is_one_user_error(change, needle):
    with pytest.raises(UserError) as e:
        ConvertConfig(**{"weights": "seed.h5", "tags": "tags.json", "out": "bundle", **change})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_overwrite_replaces_a_bundle_and_nothing_else(tmp_path):
    """--overwrite into a folder of other files is refused before anything is read (convert once deleted it)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("mine")
    for overwrite, needle in ((False, "exists and is not empty"), (True, "is not a bundle")):
        with pytest.raises(UserError, match=needle):
            convert_keras(ConvertConfig(str(tmp_path / "seed.h5"), "tags.json", str(notes), overwrite=overwrite))
    assert [p.name for p in notes.iterdir()] == ["mine.txt"] and (notes / "mine.txt").read_text() == "mine"
