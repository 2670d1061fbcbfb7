"""The WD taggers' convention: our preprocessing and backends against their reference client, and loading WD taggers
(a timm v3 snapshot, an ONNX directory, a Hugging Face repo id) built here from tiny timm models."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.infer.preprocess import read_image
from illust2vec.infer.tagger import Tagger
from illust2vec.infer.thresholds import Selection, mcut_threshold
from illust2vec.util.images import DRAFT_INFO
from onnxfile import export_nhwc

REAL = Path("/work/shared/fixtures/real/images")
WD_TAGS = Path("/work/shared/fixtures/real/tagger-meta/wd-v3_selected_tags.reconstructed.csv")
LARGE_JPEG = REAL / "imgutils/tagger_expected/6125785.jpg"  # 1606x1870: decoded in draft mode at small sizes
TRANSPARENT_PNG = REAL / "imgutils/tagger_expected/nian.png"  # 2048x2048 RGBA, three quarters not opaque
MIKU = REAL / "illustration2vec/miku.jpg"  # 256x256
WD_SIZE = 64  # the tiny WD models' input side


def real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test images not here ({path})")
    return path


# ---- the reference: SmilingWolf's wd-tagger Space (app.py), as WD users' scripts copy it


def wd_load_labels(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    categories = np.array([int(r["category"]) for r in rows])
    return (
        names,
        list(np.where(categories == 9)[0]),
        list(np.where(categories == 0)[0]),
        list(np.where(categories == 4)[0]),
    )


def wd_mcut_threshold(probs):
    sorted_probs = probs[probs.argsort()[::-1]]
    difs = sorted_probs[:-1] - sorted_probs[1:]
    t = difs.argmax()
    return (sorted_probs[t] + sorted_probs[t + 1]) / 2


def wd_prepare_image(image, target_size):
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    pad_left = (max_dim - image.size[0]) // 2
    pad_top = (max_dim - image.size[1]) // 2
    padded_image = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded_image.paste(image, (pad_left, pad_top))
    if max_dim != target_size:
        padded_image = padded_image.resize((target_size, target_size), Image.BICUBIC)
    image_array = np.asarray(padded_image, dtype=np.float32)
    image_array = image_array[:, :, ::-1]  # RGB -> BGR
    return np.expand_dims(image_array, axis=0)


def wd_predict(model_dir, image_path, general_thresh=0.35, character_thresh=0.85):
    """One image, the Space's way: (probabilities, rating, general tags, character tags)."""
    model = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    _, height, width, _ = model.get_inputs()[0].shape
    names, rating_indexes, general_indexes, character_indexes = wd_load_labels(Path(model_dir) / "selected_tags.csv")
    image = wd_prepare_image(Image.open(image_path).convert("RGBA"), height)  # gradio hands the Space RGBA
    input_name = model.get_inputs()[0].name
    label_name = model.get_outputs()[0].name
    preds = model.run([label_name], {input_name: image})[0]
    labels = list(zip(names, preds[0].astype(float), strict=True))
    rating = dict(labels[i] for i in rating_indexes)
    general = dict(x for x in (labels[i] for i in general_indexes) if x[1] > general_thresh)
    character = dict(x for x in (labels[i] for i in character_indexes) if x[1] > character_thresh)
    return preds[0], rating, general, character


# ---- images


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Real pictures: a large JPEG (draft-mode decoding), a PNG with transparency, a transparent PNG made from a
    JPEG, a picture smaller than the models' input (upscaled), and an ordinary JPEG."""
    out = tmp_path_factory.mktemp("wd-images")
    miku = Image.open(real(MIKU)).convert("RGB")
    rgba = miku.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, miku.width, dtype=np.uint8), (miku.height, 1))  # a transparent left edge
    rgba.putalpha(Image.fromarray(alpha))
    rgba.crop((0, 0, 256, 180)).save(out / "faded.png")
    miku.resize((50, 38), Image.Resampling.LANCZOS).save(out / "small.png")
    return [real(LARGE_JPEG), real(TRANSPARENT_PNG), out / "faded.png", out / "small.png", MIKU]


def test_the_large_jpeg_takes_the_draft_path_and_the_small_one_is_upscaled(images):
    assert DRAFT_INFO in read_image(LARGE_JPEG, 96).info  # decoded at 1/4 scale for a 96 px model
    assert DRAFT_INFO not in read_image(LARGE_JPEG, 448).info  # 1870 < 6 x 448: decoded in full
    assert max(Image.open(images[3]).size) < min(96, WD_SIZE)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_our_bundle_agrees_with_the_wd_reference_client(synth_bundle, images, backend):
    tagger = Tagger.load(synth_bundle, backend=backend)
    assert tagger.backend.name == backend
    ours = tagger.predict(images)
    for path, probs in zip(images, ours, strict=True):
        ref, rating, _, _ = wd_predict(synth_bundle, path)
        assert len(ref) < len(probs)  # the client reads selected_tags.csv and output 0: WD's three heads only
        assert np.abs(probs[: len(ref)] - ref).max() < 1e-2, path.name
        assert list(tagger.select(probs)["rating"]) == sorted(rating, key=rating.get, reverse=True)
    # Everything but the two big pictures (see UNDRAFTED) goes through exactly the reference's pixels.
    ref = np.stack([wd_predict(synth_bundle, p)[0] for p in images[2:]])
    assert np.abs(ours[2:, : ref.shape[1]] - ref).max() < 1e-4


def test_mcut_is_the_spaces():
    rng = np.random.default_rng(0)
    for n in (2, 5, 40, 1000):
        p = rng.random(n).astype(np.float32) ** 3
        assert mcut_threshold(p) == pytest.approx(float(wd_mcut_threshold(p)), abs=1e-7)


# ---- WD taggers in their own layouts, from a tiny timm model

# UNDRAFTED: these tests leave out the two big pictures, the draft-decoded JPEG and the 2048 px PNG, whose square
# is averaged over whole blocks before its bicubic resize (util.images.REDUCING_GAP). An untrained ViT whose head is
# scaled 50 times reacts to the last grey level: a JPEG decoded at 1/8 scale moves its probabilities by up to 0.03
# (0.007 with the head scaled 5 times), where trained models move by 0.002 to 0.009
# (test_our_bundle_agrees_with_the_wd_reference_client above; bench figures in preprocess.DRAFT_MARGIN). Every
# other picture is compared to 1e-4: the same pixels.


def wd_timm_model(num_classes: int):
    """test_vit with the WD v3 ViT's arguments (avg pool, no class token, no fc norm, tanh GELU)."""
    import timm
    import torch

    torch.manual_seed(0)
    args = dict(img_size=WD_SIZE, class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")
    model = timm.create_model("test_vit", num_classes=num_classes, **args).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)  # spread the untrained probabilities over 0..1
    return model, args


# ImageNet's mean and std, not WD's 0.5: unequal channels show whether each is normalised as RGB and then
# reordered to BGR, as the reference script does.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def wd_repo(tmp_path_factory):
    """A WD tagger v3 repository as SmilingWolf publishes them: timm's config.json, model.safetensors, model.onnx
    (NHWC BGR 0..255 in, probabilities out) and selected_tags.csv (here the WD v3 file's first rating, general and
    character rows)."""
    import torch
    from timm.models._hub import save_for_hf

    out = tmp_path_factory.mktemp("wd") / "wd-test-tagger-v3"
    with open(real(WD_TAGS), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    keep = (
        [r for r in body if r[2] == "9"] + [r for r in body if r[2] == "0"][:20] + [r for r in body if r[2] == "4"][:8]
    )
    model, args = wd_timm_model(len(keep))
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, WD_SIZE, WD_SIZE], crop_pct=1.0, mean=MEAN, std=STD)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with open(out / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *keep])

    class WDOnnx(torch.nn.Module):
        """What the WD ONNX files compute: BGR NHWC 0..255 -> normalised NCHW BGR -> sigmoid."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(MEAN[::-1]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(STD[::-1]).view(1, 3, 1, 1) * 255)

        def forward(self, x):
            return torch.sigmoid(self.model((x.permute(0, 3, 1, 2) - self.mean) / self.std))

    # the TorchScript exporter is deprecated; WD's own files came from tf2onnx
    export_nhwc(WDOnnx(), WD_SIZE, out / "model.onnx", names=("input", "output"))
    return out, model


def subset(repo: Path, dest: Path, names: list[str]) -> Path:
    dest.mkdir()
    for name in names:
        shutil.copy(repo / name, dest / name)
    return dest


def wdv3_timm_reference(model, config: dict, image_path, bgr: bool = True) -> np.ndarray:
    """The reference script for WD's timm snapshots (wdv3_timm.py): ensure RGB on white, pad square, timm's eval
    transform, RGB -> BGR, sigmoid. `bgr=False` skips the reordering (the mistake to tell apart)."""
    import torch
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(config["pretrained_cfg"], model=model))
    image = Image.open(image_path)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    px = max(image.size)
    square = Image.new("RGB", (px, px), (255, 255, 255))
    square.paste(image, ((px - image.size[0]) // 2, (px - image.size[1]) // 2))
    inputs = transform(square).unsqueeze(0)
    if bgr:
        inputs = inputs[:, [2, 1, 0]]  # NCHW image RGB to BGR
    with torch.inference_mode():
        return torch.sigmoid(model(inputs))[0].numpy()


def test_a_wd_timm_snapshot_loads_and_matches_the_reference_script(wd_repo, images, tmp_path):
    repo, model = wd_repo
    snapshot = subset(repo, tmp_path / "timm", ["config.json", "model.safetensors", "selected_tags.csv"])
    tagger = Tagger.load(snapshot)
    assert (tagger.kind, tagger.backend.name, tagger.image_size) == ("wd-timm", "torch", WD_SIZE)
    assert tagger.feature_dim == model.num_features == tagger.extract_feature(images[:1]).shape[1]
    ours = tagger.predict(images[2:])  # see UNDRAFTED
    config = json.loads((snapshot / "config.json").read_text())
    ref = np.stack([wdv3_timm_reference(model, config, p) for p in images[2:]])
    assert ref.std() > 0.1  # the probabilities spread, so a wrong channel or normalisation would show
    assert np.abs(ours - ref).max() < 1e-4

    # Fed RGB instead of BGR, the model answers measurably otherwise: the comparison above can tell.
    assert np.abs(wdv3_timm_reference(model, config, images[2], bgr=False) - ours[0]).max() > 1e-2

    heads = tagger.select(ours[0], Selection(general=0.35, character=0.85))
    assert set(heads) == {"rating", "general", "character"} and len(heads["rating"]) == 4


def test_a_wd_onnx_directory_loads_and_matches_the_reference_client(wd_repo, images, tmp_path):
    repo, _ = wd_repo
    folder = subset(repo, tmp_path / "onnx", ["model.onnx", "selected_tags.csv"])
    tagger = Tagger.load(folder)
    assert (tagger.kind, tagger.backend.name, tagger.image_size, tagger.feature_dim) == (
        "wd-onnx",
        "onnx",
        WD_SIZE,
        None,
    )
    ours = tagger.predict(images[2:])  # see UNDRAFTED
    for path, probs in zip(images[2:], ours, strict=True):
        ref, rating, general, character = wd_predict(folder, path)
        assert np.abs(probs - ref).max() < 1e-4, path.name
        got = tagger.select(probs, Selection(general=0.35, character=0.85))  # the Space's thresholds
        assert got["general"].keys() == general.keys() and got["character"].keys() == character.keys()
        assert got["rating"] == pytest.approx(rating, abs=1e-5)
    with pytest.raises(UserError, match="no feature vector"):
        tagger.extract_feature(images[:1])


def test_a_wd_onnx_file_with_a_fixed_batch_of_one_takes_several_images(wd_repo, images, tmp_path):
    import onnx

    repo, _ = wd_repo
    folder = subset(repo, tmp_path / "fixed", ["selected_tags.csv"])
    graph = onnx.load(str(repo / "model.onnx"))
    for value in (graph.graph.input[0], graph.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(graph, str(folder / "model.onnx"))
    tagger = Tagger.load(folder)
    assert tagger.backend.fixed_batch == 1
    assert np.allclose(tagger.predict(images[1:4]), Tagger.load(repo, backend="onnx").predict(images[1:4]), atol=1e-6)


def test_a_wd_repository_with_both_files_takes_onnx_on_auto_and_timm_on_torch(wd_repo, images):
    repo, _ = wd_repo
    auto, timm_ = Tagger.load(repo), Tagger.load(repo, backend="torch")
    assert (auto.kind, timm_.kind) == ("wd-onnx", "wd-timm")
    assert np.abs(auto.predict(images[1:]) - timm_.predict(images[1:])).max() < 1e-4


def test_a_repo_id_goes_through_snapshot_download(wd_repo, images, tmp_path, monkeypatch):
    import huggingface_hub

    repo, _ = wd_repo
    timm_only = subset(repo, tmp_path / "timm", ["config.json", "model.safetensors", "selected_tags.csv"])
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(repo if repo_id == "SmilingWolf/wd-test-tagger-v3" else timm_only)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tagger = Tagger.load("SmilingWolf/wd-test-tagger-v3")
    assert tagger.kind == "wd-onnx" and calls[-1][0] == "SmilingWolf/wd-test-tagger-v3"
    assert "model.onnx" in calls[-1][1] and "model.safetensors" not in calls[-1][1]  # one copy of the weights
    assert Tagger.load("SmilingWolf/wd-test-tagger-v3", backend="torch").kind == "wd-timm"
    assert "model.safetensors" in calls[-1][1] and "model.onnx" not in calls[-1][1]
    calls.clear()
    assert Tagger.load("someone/timm-only-tagger").kind == "wd-timm"  # no ONNX file: fetch the safetensors
    assert [("model.onnx" in c[1], "model.safetensors" in c[1]) for c in calls] == [(True, False), (False, True)]
    assert tagger.predict(images[2:3]).shape == (1, 32)

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="no-such/tagger: no such directory here, and downloading it") as e:
        Tagger.load("no-such/tagger")
    assert "\n" not in str(e.value)


def test_not_a_model_is_one_clear_error(tmp_path, wd_repo):
    repo, _ = wd_repo
    with pytest.raises(UserError, match="no such model directory"):
        Tagger.load(tmp_path / "nothing" / "here" / "at-all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model"):
        Tagger.load(tmp_path / "empty")
    onnx_only = subset(repo, tmp_path / "o", ["model.onnx", "selected_tags.csv"])
    with pytest.raises(UserError, match="backend 'torch' needs config.json and model.safetensors"):
        Tagger.load(onnx_only, backend="torch")
    bad = subset(repo, tmp_path / "bad", ["config.json", "model.safetensors", "selected_tags.csv"])
    lines = (bad / "selected_tags.csv").read_text().splitlines()
    (bad / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match="32 classes, selected_tags.csv 31 tags"):
        Tagger.load(bad)
