"""Our exports, read by each WD front end's rules (rules.py): kohya's tagger, ComfyUI-WD14-Tagger, the webui tagger
and taggui find the files where `i2v export --for` puts them, read them without a crash, take no copyright tag for
a character, and print the same general and character tags as `i2v tag` at the same thresholds. The old layout
(every head in selected_tags.csv and in output 0) is read by the same rules to show what they catch, and genuine
WD v3 labels still open.

The exact comparisons use a model with a 448 px input (kohya's fixed size) and pictures already 448 px square,
which no front end resizes, so every front end builds the same input as `i2v tag`.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from formats.test_bundle import write_old_onnx
from frontends.rules import (
    COMFYUI_CHARACTER_THRESHOLD,
    COMFYUI_THRESHOLD,
    KOHYA_THRESHOLD,
    TAGGUI_MAX_TAGS,
    TAGGUI_MIN_PROBABILITY,
    WEBUI_THRESHOLD,
    comfyui_installed,
    comfyui_tag,
    kohya_tag,
    taggui_is_wd_tagger,
    taggui_models,
    taggui_tag,
    webui_scan,
    webui_tag,
)
from illust2vec import Tagger
from illust2vec.export import frontend_files, place
from illust2vec.formats.bundle import Thresholds, open_bundle, save_bundle
from illust2vec.formats.categories import CATEGORY_CODES, RATING_IDS
from illust2vec.formats.vocab import Vocab, read_vocab, tag_id, write_vocab
from illust2vec.infer.thresholds import Selection
from illust2vec.models import create_tagger, default_heads
from illust2vec.models.onnx import export_onnx
from illust2vec.util.images import pad_resize

SIZE = 448
WD_V3 = Path("/work/shared/fixtures/real/tagger-meta/wd-v3_selected_tags.reconstructed.csv")
NAMES = {
    "general": ["1girl", "solo", "long_hair", "smile", "^_^", "open_mouth", "blue_eyes", "skirt", "hat", "sky"],
    "character": ["hatsune_miku", "kagamine_rin", "hakurei_reimu", "kirisame_marisa_(cosplay)", "saber_(fate)"],
    "copyright": ["vocaloid", "touhou", "fate_(series)"],
    "artist": ["someone"],
}
THRESHOLDS = Thresholds({"rating": 0.0, "general": 0.45, "character": 0.7, "copyright": 0.7, "artist": 0.7})


def vocab() -> Vocab:
    rows = [(RATING_IDS[n], n, CATEGORY_CODES["rating"], 10) for n in RATING_IDS]
    for head, names in NAMES.items():
        rows += [(tag_id(n), n, CATEGORY_CODES[head], 100 - i) for i, n in enumerate(names)]
    return Vocab(*(tuple(column) for column in zip(*rows, strict=True)))


@pytest.fixture(scope="module")
def squares(synth_images, tmp_path_factory) -> list[Path]:
    """The synthetic board's pictures as 448 px squares (the pad and resize `i2v tag` does), saved as PNG."""
    out = tmp_path_factory.mktemp("squares")
    paths = []
    for src in sorted(p for p in synth_images.iterdir() if p.suffix != ".json")[:6]:
        path = out / f"{src.stem}.png"
        pad_resize(Image.open(src).convert("RGB"), SIZE).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bundle448(squares, tmp_path_factory) -> Path:
    """A 448 px model whose heads are set on these pictures so that each tag's logit spreads around a different
    level (some tags either side of the thresholds), with a copyright tag far above any threshold on every picture
    (what broke kohya's tagger)."""
    torch.manual_seed(3)
    sizes = {h: len(ix) for h, ix in vocab().heads.items()}
    net = create_tagger("test_resnet", heads=default_heads(sizes), image_size=SIZE).eval()
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in squares])).permute(0, 3, 1, 2)
    with torch.no_grad():
        pooled = net.extract_feature(x)
        for head, module in net.heads.items():
            fc = module.fc
            logits = pooled @ fc.weight.T
            fc.weight.div_(logits.std(dim=0, keepdim=True).T.clamp_min(1e-6) / 2.0)  # a spread of 2 per tag
            fc.bias.copy_(torch.linspace(-2.5, 2.5, fc.bias.numel()) - (pooled @ fc.weight.T).mean(dim=0))
            if head == "copyright":
                fc.bias[0] += 20.0  # "vocaloid" on every picture
    out = tmp_path_factory.mktemp("b448") / "bundle"
    save_bundle(out, net, vocab(), THRESHOLDS, onnx=functools.partial(export_onnx, net))
    return out


def ours(bundle: Path, images: list[Path], general: float, character: float) -> list[dict]:
    """What `i2v tag` selects (the Tagger's select: strictly above), per image: general and character names,
    sorted; the rating it ranks first; and the selected tags' scores."""
    tagger = Tagger.load(bundle, backend="onnx")
    sel = Selection(general=general, character=character)
    out = []
    for probs in tagger.predict(images):
        got = tagger.select(probs, sel)
        scores = {**got["general"], **got["character"]}
        out.append({**{h: sorted(v) for h, v in got.items()}, "rating": next(iter(got["rating"])), "scores": scores})
    return out


def names(pairs) -> list[str]:
    return sorted(t for t, _ in pairs)


def test_the_model_arms_the_trap(bundle448, squares):
    """The comparisons below mean something: general and character tags either side of the thresholds, and a
    copyright tag far above every threshold on every image."""
    got = ours(bundle448, squares, 0.45, 0.7)
    assert all("vocaloid" in r["copyright"] for r in got)
    assert 0 < sum(len(r["character"]) for r in got) < len(got) * len(NAMES["character"])
    assert 0 < sum(len(r["general"]) for r in got) < len(got) * len(NAMES["general"])


@pytest.mark.parametrize(("general", "character"), [(KOHYA_THRESHOLD, KOHYA_THRESHOLD), (0.45, 0.7)])
def test_kohya_reads_the_export_as_i2v_tag(bundle448, squares, tmp_path, general, character):
    files = frontend_files("kohya", tmp_path / "wd14_tagger_model", "m448")
    place(bundle448, files)
    read = kohya_tag(tmp_path / "wd14_tagger_model", "illust2vec/m448", squares, general, character, batch_size=4)
    for got, want in zip(read, ours(bundle448, squares, general, character), strict=True):
        assert names(got.general) == want["general"] and names(got.character) == want["character"]
        assert not {t for t, _ in got.character} & set(NAMES["copyright"])
        assert got.rating == want["rating"]


def test_comfyui_reads_the_export_as_i2v_tag(bundle448, squares, tmp_path):
    models = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-WD14-Tagger" / "models"
    place(bundle448, frontend_files("comfyui", models, "m448"))
    assert comfyui_installed(models) == ["m448.onnx"]
    want = ours(bundle448, squares, COMFYUI_THRESHOLD, COMFYUI_CHARACTER_THRESHOLD)
    for path, w in zip(squares, want, strict=True):
        got = comfyui_tag(models, "m448", Image.open(path))
        assert names(got.general) == w["general"] and names(got.character) == w["character"]
        assert "vocaloid" not in got.caption


def test_the_webui_tagger_reads_the_export_as_i2v_tag(bundle448, squares, tmp_path):
    onnx_dir = tmp_path / "models" / "TaggerOnnx"
    place(bundle448, frontend_files("webui", onnx_dir, "m448"))
    ((name, (model, tags)),) = webui_scan(onnx_dir).items()
    want = ours(bundle448, squares, WEBUI_THRESHOLD, WEBUI_THRESHOLD)
    for path, w in zip(squares, want, strict=True):
        got = webui_tag(model, tags, Image.open(path))
        assert names(got.general) == sorted(w["general"] + w["character"])  # one list, one threshold


def test_taggui_reads_the_export_as_i2v_tag(bundle448, squares, tmp_path):
    models = tmp_path / "taggui-models"
    files = frontend_files("taggui", models, "m448")
    place(bundle448, files)
    (model_id,) = taggui_models(models)
    assert model_id == str(files[0].parent) and taggui_is_wd_tagger(model_id)
    want = ours(bundle448, squares, TAGGUI_MIN_PROBABILITY, TAGGUI_MIN_PROBABILITY)
    for path, w in zip(squares, want, strict=True):
        got = taggui_tag(model_id, path)
        expected = sorted(w["scores"], key=lambda t: -w["scores"][t])[:TAGGUI_MAX_TAGS]  # highest first
        spelled = [t if t == "^_^" else t.replace("_", " ") for t in expected]  # taggui's spelling, kaomoji kept
        assert [t for t, _ in got.general] == spelled


# ---- the old layout, read by the same rules: what they catch


def old_layout(bundle: Path, out: Path) -> Path:
    """The files as export wrote them before bundle format 2: every head's rows in selected_tags.csv, and every
    head's probabilities in output 0 (here our file's outputs joined by one Concat node, first)."""
    out.mkdir(parents=True)
    write_vocab(open_bundle(bundle).vocab, out / "selected_tags.csv")
    write_old_onnx(bundle / "model.onnx", out / "model.onnx")
    return out


def test_the_rules_catch_the_old_layout(bundle448, squares, tmp_path):
    old = old_layout(bundle448, tmp_path / "wd14_tagger_model" / "illust2vec_old")
    with pytest.raises(IndexError):  # kohya: a confident copyright value past the last character
        kohya_tag(tmp_path / "wd14_tagger_model", "illust2vec/old", squares[:1])
    models = tmp_path / "comfy"
    models.mkdir()
    shutil.copy(old / "model.onnx", models / "old.onnx")
    shutil.copy(old / "selected_tags.csv", models / "old.csv")
    got = comfyui_tag(models, "old", Image.open(squares[0]))
    assert "vocaloid" in {t for t, _ in got.character}  # ComfyUI: a copyright tag among the characters
    (old / "extra_tags.csv").write_text("tag_id,name,category,count\n")
    with pytest.raises(TypeError):  # the webui tagger: two .csv files in a model folder
        webui_scan(old.parent.parent / "wd14_tagger_model")


# ---- i2v export --for, end to end on the synthetic run (a 96 px model)


@pytest.mark.slow
def test_export_for_each_front_end(synth_run, synth_images, tmp_path):
    from illust2vec.export import ExportConfig, export

    pictures = []
    for src in sorted(p for p in synth_images.iterdir() if p.suffix == ".png")[:3]:
        for size in (96, SIZE):
            pictures.append(tmp_path / f"{src.stem}-{size}.png")
            pad_resize(Image.open(src).convert("RGB"), size).save(pictures[-1])
    at96, at448 = pictures[0::2], pictures[1::2]
    bundle = tmp_path / "bundle"
    export(ExportConfig(str(synth_run), str(bundle), target="wd", workers=0))
    copyright = set(read_vocab(bundle / "extra_tags.csv").names)

    s = export(ExportConfig(str(synth_run), str(tmp_path / "kohya"), target="kohya", name="synth", workers=0))
    assert s.files == (
        str(tmp_path / "kohya/illust2vec_synth/model.onnx"),
        str(tmp_path / "kohya/illust2vec_synth/selected_tags.csv"),
    )
    assert "resizes every image to 448 px" in s.warnings[0] and "takes 96 px" in s.warnings[0]
    assert "--onnx --repo_id illust2vec/synth --model_dir" in s.instructions
    read = kohya_tag(tmp_path / "kohya", "illust2vec/synth", at448, 0.35, 0.35)
    for got, want in zip(read, ours(bundle, at96, 0.35, 0.35), strict=True):
        assert not {t for t, _ in got.character} & copyright
        assert len(set(names(got.general)) ^ set(want["general"])) <= 2  # 448 -> 96 inside: close, not exact

    s = export(ExportConfig(str(synth_run), str(tmp_path / "comfy"), target="comfyui", name="synth", workers=0))
    assert comfyui_installed(tmp_path / "comfy") == ["synth.onnx"] and "model synth" in s.instructions
    for path, want in zip(at96, ours(bundle, at96, 0.35, 0.85), strict=True):
        got = comfyui_tag(tmp_path / "comfy", "synth", Image.open(path))
        assert names(got.general) == want["general"] and names(got.character) == want["character"]


# ---- genuine WD v3 labels: the reference for the layout, and still opened by our loaders


def wd_v3() -> Path:
    if not WD_V3.exists():
        pytest.skip(f"the WD v3 labels are not here ({WD_V3})")
    return WD_V3


def runs(categories) -> list[tuple[int, int]]:
    """(category, how many rows in a row): a file's layout."""
    out: list[tuple[int, int]] = []
    for c in categories:
        out[-1:] = [(c, out[-1][1] + 1)] if out and out[-1][0] == c else [*out[-1:], (c, 1)]
    return out


def test_our_selected_tags_has_wd_v3s_layout(bundle448):
    ref, ours_ = read_vocab(wd_v3()), read_vocab(bundle448 / "selected_tags.csv")
    assert runs(ref.categories) == [(9, 4), (0, 8106), (4, 2751)]  # the reference: WD v3's three categories only
    assert [c for c, _ in runs(ours_.categories)] == [9, 0, 4]
    assert (ours_.names[:4], ours_.tag_ids[:4]) == (ref.names[:4], ref.tag_ids[:4])  # WD's ratings and their ids
    header = wd_v3().read_text().splitlines()[0]
    assert (bundle448 / "selected_tags.csv").read_text().splitlines()[0] == header


@pytest.fixture(scope="module")
def wd_v3_dir(tmp_path_factory) -> Path:
    """A WD v3 directory: the genuine selected_tags.csv beside a tiny model.onnx of WD's interface (448 px NHWC BGR
    in; one sigmoid output, a probability per row)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(read_vocab(wd_v3()))
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((rng.normal(size=(3, n)) / 40).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(-1.5, 1.5, size=n).astype(np.float32), "b")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    starts = numpy_helper.from_array(np.array([0, 0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([SIZE, SIZE], np.int64), "ends")
    steps = numpy_helper.from_array(np.array([32, 32], np.int64), "steps")
    nodes = [  # the mean of a 14 x 14 grid of pixels: few enough that float32 sums them alike in any batch
        helper.make_node("Slice", ["input", "starts", "ends", "axes", "steps"], ["grid"]),
        helper.make_node("ReduceMean", ["grid", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wd-v3-like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", n])],
        [weights, bias, axes, starts, ends, steps],
    )
    out = tmp_path_factory.mktemp("wd") / "SmilingWolf_wd-vit-tagger-v3"
    out.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(out / "model.onnx"))
    shutil.copy(wd_v3(), out / "selected_tags.csv")
    return out


def test_a_genuine_wd_v3_directory_still_opens_and_reads_alike(wd_v3_dir, squares):
    tagger = Tagger.load(wd_v3_dir)
    assert tagger.kind == "wd-onnx" and tagger.image_size == SIZE
    assert {h: len(ix) for h, ix in tagger.labels.heads.items()} == {"rating": 4, "general": 8106, "character": 2751}
    want = ours(wd_v3_dir, squares[:2], 0.35, 0.35)
    read = kohya_tag(wd_v3_dir.parent, "SmilingWolf/wd-vit-tagger-v3", squares[:2])
    assert any(w["general"] for w in want) and any(w["character"] for w in want)
    for got, w in zip(read, want, strict=True):
        assert names(got.general) == w["general"] and names(got.character) == w["character"]
