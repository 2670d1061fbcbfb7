"""`i2v show`: the bars it chooses, the picture it writes, Grad-CAM, and its one-line errors."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from illust2vec.cli import main
from illust2vec.errors import UserError
from illust2vec.infer.preprocess import read_image
from illust2vec.infer.show import ShowConfig, choose_bars, find_tag, gradcam, load_model, show
from illust2vec.infer.tagger import Tagger
from illust2vec.infer.thresholds import Selection


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != "truth.json")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `i2v ARGS` in this process (as the console script does) -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["i2v", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


# ---- the bars


def test_bars_show_the_scores_of_predict_highest_first(synth_bundle, synth_images):
    tagger = Tagger.load(synth_bundle)
    image = images_of(synth_images)[0]
    probs = tagger.predict([image])[0]
    bars = choose_bars(tagger, probs, top=5)
    assert list(bars) == list(tagger.labels.heads)
    names = list(tagger.labels.names)
    for head, ix in tagger.labels.heads.items():
        expect = sorted((float(probs[i]) for i in ix), reverse=True)[: len(ix) if head == "rating" else 5]
        assert [b.score for b in bars[head]] == pytest.approx(expect, abs=0)
        for b in bars[head]:
            assert b.score == float(probs[names.index(b.tag)])
    # Rating: all four classes, the highest highlighted, no threshold.
    assert len(bars["rating"]) == 4 and [b.above for b in bars["rating"]] == [True, False, False, False]
    assert all(b.threshold is None for b in bars["rating"])
    # The other heads: highlighted exactly where `i2v tag` would report the tag, at the bundle's thresholds.
    selected = tagger.select(probs)
    for head in ("general", "character", "copyright"):
        assert all(b.threshold == tagger.thresholds.heads[head] for b in bars[head])
        assert [b.tag for b in bars[head] if b.above] == list(selected[head])[: sum(b.above for b in bars[head])]
        assert all(b.above == (b.score >= b.threshold) for b in bars[head])


def test_bars_follow_the_thresholds_given(synth_bundle, synth_images):
    tagger = Tagger.load(synth_bundle)
    probs = tagger.predict([images_of(synth_images)[1]])[0]
    low = choose_bars(tagger, probs, top=3, selection=Selection(general=0.0, character=1.0))
    assert all(b.above and b.threshold == 0.0 for b in low["general"])
    assert not any(b.above for b in low["character"]) and all(b.threshold == 1.0 for b in low["character"])
    assert len(low["general"]) == 3
    mcut = choose_bars(tagger, probs, selection=Selection(mcut_general=True))
    (t,) = {b.threshold for b in mcut["general"]}
    assert 0.0 < t < 1.0 and all(b.above == (b.score >= t) for b in mcut["general"])


def test_find_tag_accepts_spaces_and_names_close_matches(synth_bundle):
    labels = Tagger.load(synth_bundle).labels
    general = [labels.names[i] for i in labels.heads["general"]]
    tag = next(t for t in general if "_" in t)
    ref = find_tag(labels, tag.replace("_", " "))
    assert (ref.tag, ref.head, labels.names[ref.index]) == (tag, "general", tag)
    assert labels.heads["general"][ref.position] == ref.index
    with pytest.raises(UserError, match=f"close matches: .*{tag}"):
        find_tag(labels, tag[:-1] + "q")


# ---- the picture


def test_show_writes_a_picture_with_the_scores_of_predict(synth_bundle, synth_images, tmp_path):
    image = images_of(synth_images)[2]
    out = tmp_path / "deep" / "show.png"
    result = show(ShowConfig(image, synth_bundle, out, top=4))
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert 500 <= png.width <= 2000 and 400 <= png.height <= 2000
        assert np.asarray(png.convert("L")).std() > 10  # not a blank canvas
    probs = Tagger.load(synth_bundle).predict([image])[0]
    names = list(Tagger.load(synth_bundle).labels.names)
    for bars in result.bars.values():
        assert all(b.score == pytest.approx(float(probs[names.index(b.tag)]), abs=1e-6) for b in bars)


def test_cli_show_with_explain(synth_bundle, synth_images, tmp_path, monkeypatch, capsys):
    tagger = Tagger.load(synth_bundle)
    image = images_of(synth_images)[3]
    tag = next(iter(tagger.scores(tagger.predict([image])[0])["general"]))
    plain, explained = tmp_path / "plain.png", tmp_path / "explained.png"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "show", image, "--model", synth_bundle, "--out", plain)
    assert code == 0 and stdout == "" and f"wrote {plain}" in stderr
    args = ("show", image, "--model", synth_bundle, "--out", explained, "--explain", tag.replace("_", " "))
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and f"Grad-CAM of {tag}" in stderr
    with Image.open(plain) as a, Image.open(explained) as b:
        assert a.size[0] > 0 and b.size[0] > 0
        # The heat map changes the picture's half: the same bars, another image.
        left = (0, 0, min(a.width, b.width) // 3, min(a.height, b.height))
        assert (
            np.abs(np.asarray(a.convert("RGB").crop(left), float) - np.asarray(b.convert("RGB").crop(left))).mean() > 5
        )


def test_cli_unknown_tag_lists_close_matches(synth_bundle, synth_images, tmp_path, monkeypatch, capsys):
    labels = Tagger.load(synth_bundle).labels
    tag = next(t for t in labels.names if len(t) > 6)
    typo = tag[:3] + tag[4:]  # one letter dropped
    args = ("show", images_of(synth_images)[0], "--model", synth_bundle, "--out", tmp_path / "x.png", "--explain", typo)
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith("error: ")
    assert f"--explain '{typo}'" in stderr and tag in stderr.split("close matches:")[1]
    assert not (tmp_path / "x.png").exists()


def test_cli_non_image_input_is_one_line_exit_2(synth_bundle, tmp_path, monkeypatch, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture at all\n")
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "show", text, "--model", synth_bundle, "--out", tmp_path / "x.png"
    )
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1 and lines[0].startswith(f"error: {text}")
    assert not (tmp_path / "x.png").exists()


# ---- Grad-CAM


def test_gradcam_of_a_bundle_has_the_images_shape_and_range(synth_bundle, synth_images):
    tagger = Tagger.load(synth_bundle)
    model = load_model(synth_bundle, "cpu")
    path = next(p for p in images_of(synth_images) if (lambda s: s[0] != s[1])(Image.open(p).size))
    picture = read_image(path)
    scores = tagger.scores(tagger.predict([path])[0])
    maps = {}
    for tag in [*list(scores["general"])[:3], next(iter(scores["character"]))]:
        ref = find_tag(tagger.labels, tag)
        cam = gradcam(model, picture, ref.head, ref.position, tagger.image_size)
        assert cam.shape == (picture.height, picture.width) and cam.dtype == np.float32
        # Scaled to 0..1; or all zero where the map is flat (the fixture's two-epoch model
        # has not learnt where its characters are).
        assert cam.min() >= 0.0 and cam.max() in (pytest.approx(1.0), 0.0)
        maps[tag] = cam
    # The top general tags: not constant (a tag whose weighted map is negative everywhere is all zero after Grad-CAM's
    # ReLU, which a two-epoch model allows for one of them), and another tag gives another map.
    general = [cam for cam in list(maps.values())[:3] if cam.std() > 0.01]
    assert len(general) >= 2
    assert max(np.abs(general[0] - cam).mean() for cam in general[1:]) > 0.01


class TwoColours(nn.Module):
    """A hand-made tagger: tag 0's logit is the amount of red in the image, tag 1's the amount of blue."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():  # red minus the other two, blue minus the other two: zero on white and grey
            self.conv.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]]).view(2, 3, 1, 1))

    def forward_features(self, x):
        return nn.functional.avg_pool2d(torch.relu(self.conv(x.float())), 8)

    def forward_head(self, features, pre_logits=False):
        return {"general": features.mean((2, 3))}


def test_gradcam_peaks_where_the_tags_evidence_is():
    # A wide image (the crop of the padding is tested too): red in the top-left, blue in the bottom-right, on white.
    a = np.full((120, 200, 3), 255, np.uint8)
    a[10:50, 10:60] = (255, 0, 0)
    a[70:110, 140:190] = (0, 0, 255)
    picture = Image.fromarray(a)
    model = TwoColours().eval()
    red = gradcam(model, picture, "general", 0, 64)
    blue = gradcam(model, picture, "general", 1, 64)
    assert red.shape == blue.shape == (120, 200)
    for cam, (y, x), (oy, ox) in ((red, (30, 35), (90, 165)), (blue, (90, 165), (30, 35))):
        peak = np.unravel_index(cam.argmax(), cam.shape)
        assert abs(peak[0] - y) < 25 and abs(peak[1] - x) < 30, peak
        assert cam[y, x] > 0.5 and cam[oy, ox] < 0.05


def test_gradcam_of_the_seed_reads_each_heads_own_map():
    from illust2vec.models.tagger import create_tagger, default_heads

    torch.manual_seed(0)
    sizes = {"general": 2, "character": 2}
    # 128 px: low features 4x4, high features 2x2 (at 96 px the high map is 1x1 and any map of it is flat).
    model = create_tagger("i2v_vgg16", image_size=128, heads=default_heads(sizes, softmax=("character",))).eval()
    with torch.no_grad():  # positive weights after the VGG blocks: every logit grows with its map, so each speaks
        for m in [*model.heads.modules(), model.backbone.high_features.conv]:
            if isinstance(m, nn.Linear | nn.Conv2d):
                m.weight.abs_()
                m.bias.zero_()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    general = gradcam(model, picture, "general", 0, 128)  # from the low features, which the general head pools
    character = gradcam(model, picture, "character", 1, 128)  # from the high features
    for cam in (general, character):
        assert cam.shape == (80, 120) and cam.min() >= 0.0 and cam.max() == pytest.approx(1.0) and cam.std() > 0.01
    assert np.abs(general - character).mean() > 0.01


def test_explain_needs_a_bundle(tmp_path):
    with pytest.raises(UserError, match="bundle"):
        load_model(tmp_path, "cpu")


def test_gradcam_refuses_a_backbone_without_a_feature_map():
    from illust2vec.models.tagger import create_tagger, default_heads

    model = create_tagger("test_vit", image_size=64, heads=default_heads({"general": 2})).eval()
    with pytest.raises(UserError, match="convolutional feature map"):
        gradcam(model, Image.new("RGB", (50, 40), "red"), "general", 0, 64)
