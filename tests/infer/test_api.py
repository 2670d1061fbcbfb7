"""The Python API (`from illust2vec import Tagger`): the original Illustration2Vec's names and return shapes, every
kind of image input, backend choice, and an ONNX path that never imports torch."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illust2vec import Tagger
from illust2vec.errors import UserError
from illust2vec.infer.tagger import binarize
from illust2vec.infer.thresholds import Selection
from illust2vec.util.images import BadImage

EXPECTED_I2V = Path("/work/shared/fixtures/real/images/illustration2vec/expected_i2v_tags.json")
MIKU = Path("/work/shared/fixtures/real/images/illustration2vec/miku.jpg")


@pytest.fixture(scope="module")
def tagger(synth_bundle) -> Tagger:
    return Tagger.load(synth_bundle)  # auto: the bundle has model.onnx, so onnxruntime on the CPU


@pytest.fixture(scope="module")
def pngs(synth_images) -> list[Path]:
    return sorted(synth_images.glob("*.png"))


def test_auto_takes_onnx_when_the_bundle_has_it_and_torch_when_not(synth_bundle, tmp_path, tagger):
    assert tagger.backend.name == "onnx" and tagger.kind == "bundle"
    plain = tmp_path / "plain"
    shutil.copytree(synth_bundle, plain)
    (plain / "model.onnx").unlink()
    assert Tagger.load(plain).backend.name == "torch"
    with pytest.raises(UserError, match="no model.onnx"):
        Tagger.load(plain, backend="onnx")
    with pytest.raises(UserError, match="--backend must be one of"):
        Tagger.load(plain, backend="tensorflow")


def test_the_original_readme_snippet_ports_unchanged(tagger):
    """rezoo/illustration2vec's README, with `Tagger.load` for `i2v.make_i2v_with_chainer` and WD's rating names."""
    illust2vec = tagger
    img = Image.open(MIKU)
    plausible = illust2vec.estimate_plausible_tags([img], threshold=0.5)
    specific = illust2vec.estimate_specific_tags([img], ["1girl", "aqua eyes", "general"])
    result_real = illust2vec.extract_feature([img])
    result_binary = illust2vec.extract_binary_feature([img])

    expected = json.loads(EXPECTED_I2V.read_text())["estimate_plausible_tags_threshold_0.5"]
    assert len(plausible) == 1 and set(plausible[0]) == set(expected)
    for head, pairs in plausible[0].items():
        assert isinstance(pairs, list) and all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
        assert all(isinstance(t, str) and isinstance(s, float) for t, s in pairs)
        assert [s for _, s in pairs] == sorted((s for _, s in pairs), reverse=True)
        if head == "rating":  # every class, as the original listed safe, questionable, explicit
            assert [t for t, _ in pairs][0] in ("general", "sensitive", "questionable", "explicit") and len(pairs) == 4
            assert math.isclose(sum(s for _, s in pairs), 1.0, abs_tol=1e-5)  # our rating head is a softmax
        else:
            assert all(s > 0.5 for _, s in pairs)
    # JSON as the original printed it: lists of [tag, score].
    assert all(isinstance(v, list) for v in json.loads(json.dumps(plausible[0])).values())

    assert len(specific) == 1 and list(specific[0]) == ["1girl", "aqua eyes", "general"]
    probs = illust2vec.predict([img])[0]
    names = list(illust2vec.labels.names)
    assert specific[0]["aqua eyes"] == pytest.approx(float(probs[names.index("aqua_eyes")]))
    assert specific[0]["general"] == pytest.approx(float(probs[names.index("general")]))

    d = illust2vec.feature_dim
    assert result_real.shape == (1, d) and result_real.dtype == np.float32
    assert result_binary.shape == (1, math.ceil(d / 8)) and result_binary.dtype == np.uint8


def test_thresholds_select_strictly_above(tagger, pngs):
    probs = tagger.predict(pngs[:1])[0]
    general = [tagger.labels.names[i] for i in tagger.labels.heads["general"]]
    scores = {n: float(probs[tagger.labels.names.index(n)]) for n in general}
    cut = sorted(scores.values())[-3]  # the third highest general score, as a threshold
    got = tagger.estimate_plausible_tags(pngs[:1], threshold=cut)[0]["general"]
    assert [t for t, _ in got] == sorted((n for n in general if scores[n] > cut), key=scores.get, reverse=True)
    assert len(got) == 2
    # Without a threshold, the bundle's calibrated ones (general and character from its validation split).
    calibrated = tagger.thresholds.heads["general"]
    got = tagger.estimate_plausible_tags(pngs[:1])[0]["general"]
    assert [t for t, _ in got] == [n for n in sorted(scores, key=scores.get, reverse=True) if scores[n] > calibrated]
    top = tagger.estimate_top_tags(pngs[:1], n_tag=3)[0]
    assert [t for t, _ in top["general"]] == sorted(scores, key=scores.get, reverse=True)[:3]
    assert tagger.select(probs, Selection(general=0.0, exclude=frozenset({top["general"][0][0]})))[
        "general"
    ].keys() == (set(general) - {top["general"][0][0]})


def test_estimate_specific_tags_names_unknown_tags(tagger, pngs):
    with pytest.raises(UserError, match="not in the model's vocabulary: no such tag, neither"):
        tagger.estimate_specific_tags(pngs[:1], ["1girl", "no such tag", "neither"])
    one = tagger.estimate_specific_tags(pngs[0], "1girl")  # one image, one tag: still lists
    assert len(one) == 1 and list(one[0]) == ["1girl"]


def test_every_kind_of_image_gives_the_same_answer(tagger, pngs, synth_images):
    path = pngs[0]
    reference = tagger.predict([path])
    pil = Image.open(path).convert("RGB")
    rgb = np.asarray(pil)
    same = {
        "str": str(path),
        "Path": path,
        "bytes": path.read_bytes(),
        "bytearray": bytearray(path.read_bytes()),
        "PIL": pil,
        "uint8 HxWx3": rgb,
        "float 0..1": rgb.astype(np.float32) / 255,
        "float64 0..1": rgb / 255.0,
        "RGBA opaque": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
        "PIL RGBA opaque": pil.convert("RGBA"),
    }
    for name, image in same.items():
        assert np.allclose(tagger.predict(image), reference, atol=1e-6), name
        assert np.allclose(tagger.predict([image]), reference, atol=1e-6), name
    palette = pil.convert("P", palette=Image.Palette.WEB)
    assert np.allclose(tagger.predict(palette), tagger.predict(palette.convert("RGB")), atol=1e-6)

    # Grayscale (HxW, HxWx1, mode L) is read as grey RGB; RGBA is composited onto white.
    grey = np.asarray(pil.convert("L"))
    grey_rgb = tagger.predict([np.dstack([grey] * 3)])
    for image in (grey, grey[:, :, None], Image.fromarray(grey, "L")):
        assert np.allclose(tagger.predict(image), grey_rgb, atol=1e-6)
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    rgba = np.dstack([rgb, alpha])
    on_white = (rgb * (alpha[:, :, None] / 255.0) + 255 * (1 - alpha[:, :, None] / 255.0)).round().astype(np.uint8)
    assert np.abs(tagger.predict(rgba) - tagger.predict(on_white)).max() < 1e-3  # rounding of the composite
    assert np.abs(tagger.predict(rgba) - tagger.predict(rgb)).max() > 1e-3  # and the alpha did matter

    # Lists, tuples, generators and a [N, H, W, 3] array are batches; results keep their order.
    files = sorted(p for p in synth_images.iterdir() if p.suffix != ".json")
    batch = tagger.predict(files)
    assert batch.shape == (len(files), len(tagger.labels))
    lossless = [i for i, p in enumerate(files) if p.suffix != ".jpg"][:4]
    mixed = [files[lossless[0]], Image.open(files[lossless[1]]), files[lossless[2]].read_bytes()]
    mixed.append(np.asarray(Image.open(files[lossless[3]]).convert("RGB")))
    assert np.allclose(tagger.predict(mixed), batch[lossless], atol=1e-6)
    assert np.allclose(tagger.predict(p for p in files[:3]), batch[:3], atol=1e-6)
    # A big JPEG given by path is decoded in draft mode; given as pixels it was decoded in full: within 1e-2.
    jpeg = next(i for i, p in enumerate(files) if p.suffix == ".jpg" and max(Image.open(p).size) >= 6 * 96)
    assert np.abs(tagger.predict(Image.open(files[jpeg])) - batch[jpeg]).max() < 1e-2
    stacked = np.stack([rgb, rgb])
    assert np.allclose(tagger.predict(stacked), np.concatenate([reference, reference]), atol=1e-6)
    assert tagger.predict([]).shape == (0, len(tagger.labels))
    assert tagger.extract_feature([]).shape == (0, tagger.feature_dim)


def test_bad_images_are_named(tagger, tmp_path, pngs):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(BadImage, match="notes.png"):
        tagger.predict([pngs[0], text])
    with pytest.raises(BadImage, match="image 1"):
        tagger.predict([pngs[0], b"\x89PNG broken"])
    with pytest.raises(TypeError, match="an image array is"):
        tagger.predict(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="an image is a path"):
        tagger.predict([3.5])


def test_features_and_binary_codes(synth_bundle, tagger, pngs):
    feats = tagger.extract_feature(pngs)
    assert feats.shape == (len(pngs), tagger.feature_dim) and feats.dtype == np.float32
    _, direct = tagger.run(tagger.prepare(pngs))
    assert np.allclose(feats, direct)
    unit = tagger.extract_feature(pngs, normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)

    codes = tagger.extract_binary_feature(pngs)
    center = np.asarray(json.loads((synth_bundle / "config.json").read_text())["feature_center"], np.float32)
    assert codes.dtype == np.uint8 and codes.shape == (len(pngs), math.ceil(tagger.feature_dim / 8))
    assert np.array_equal(codes, np.packbits(feats > center, axis=1))
    assert np.array_equal(np.unpackbits(codes, axis=1)[:, : tagger.feature_dim], (feats > center).astype(np.uint8))
    # Without medians (a WD model), each vector is cut at its own mean.
    assert np.array_equal(binarize(feats), np.packbits(feats > feats.mean(axis=1, keepdims=True), axis=1))
    # The torch backend computes the same vectors.
    torch_feats = Tagger.load(synth_bundle, backend="torch").extract_feature(pngs)
    assert np.abs(torch_feats - feats).max() < 1e-4


def test_the_onnx_path_never_imports_torch(synth_bundle, pngs):
    code = f"""
import sys
from illust2vec import Tagger
for backend in ("onnx", "auto"):
    tagger = Tagger.load({str(synth_bundle)!r}, backend=backend)
    assert tagger.backend.name == "onnx"
    result = tagger.estimate_plausible_tags([{str(pngs[0])!r}])
    assert set(result[0]) >= {{"general", "rating"}}
    assert tagger.extract_binary_feature([{str(pngs[0])!r}]).shape[0] == 1
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_bytes_of_any_format(tagger, synth_images):
    """Images straight from a web upload or an archive: bytes of any format Pillow reads, whatever their name."""
    for p in sorted(synth_images.glob("*.webp"))[:1] + sorted(synth_images.glob("*.jpg"))[:1]:
        buf = io.BytesIO(p.read_bytes())
        assert np.allclose(tagger.predict(buf.getvalue()), tagger.predict(p), atol=1e-6)
