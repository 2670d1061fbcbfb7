"""i2v quantize: int8 copies of our bundles' and WD ONNX directories' model.onnx, calibrated on images prepared as
i2v tag prepares them, with the int8-vs-fp32 agreement report recorded beside."""

import json
from pathlib import Path

import numpy as np
import pytest

from illust2vec.formats.bundle import INT8_FILE, INT8_REPORT, open_bundle, read_int8
from illust2vec.quantize import QuantizeConfig, agreement, quantize, run_probs
from illust2vec.util.images import load_for_input, pad_resize
from onnxfile import export_nhwc

WD_SIZE = 64


@pytest.fixture(scope="module")
def int8_bundle(synth_bundle, tmp_path_factory):
    """synth_bundle copied and quantized (calibrated on its run's validation split): (directory, summary)."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    return out, quantize(QuantizeConfig(model=str(synth_bundle), out=str(out)))


def test_a_bundle_quantized_into_a_copy_agrees_with_fp32(synth_bundle, int8_bundle):
    out, s = int8_bundle
    assert not (synth_bundle / INT8_FILE).exists()  # the original is left as it was
    assert (out / INT8_FILE).is_file() and s.model == str(out) and s.kind == "bundle"
    assert s.int8_bytes < 0.5 * s.fp32_bytes == 0.5 * (synth_bundle / "model.onnx").stat().st_size
    assert "validation split" in s.calibration_source and s.calibration_images >= 8 and s.check_images >= 4
    assert set(s.f1) == set(open_bundle(out).labels.heads)
    assert min(s.f1.values()) >= 0.85 and s.max_prob_diff < 0.05 and s.agrees == (min(s.f1.values()) >= s.min_f1)
    recorded = read_int8(out)
    assert recorded["f1"] == s.f1 and recorded["file"] == INT8_FILE and recorded["mode"] == "static"
    assert open_bundle(out).config["int8"] == recorded  # in config.json, and the bundle still opens

    # The int8 file takes the same input as model.onnx and gives the same outputs, within the figures above.
    import onnxruntime as ort

    info = open_bundle(out)
    images = _pictures(info.image_size)
    outputs = info.onnx_outputs[0]
    p32 = run_probs(ort.InferenceSession(str(out / "model.onnx")), outputs, images, 4)
    p8 = run_probs(ort.InferenceSession(str(out / INT8_FILE)), outputs, images, 4)
    assert p8.shape == p32.shape and np.abs(p8 - p32).max() < 0.2


def _pictures(size: int) -> np.ndarray:
    """A few pictures from the synthetic board, as the model's input."""
    from illust2vec.synth.board import Board
    from illust2vec.synth.cast import SynthConfig

    board = Board(SynthConfig(posts=30, seed=7))
    posts = [p for p in board.posts if p.is_image and not p.is_deleted and not p.is_banned][:6]
    rgb = [np.asarray(pad_resize(load_for_input(board.file(p), size), size), np.float32) for p in posts]
    return np.stack([a[:, :, ::-1] for a in rgb])


def test_agreement_is_f1_against_fp32s_decisions_per_category():
    from illust2vec.formats.bundle import Labels, Thresholds

    labels = Labels(
        ("s", "q", "a", "b", "c"), (9, 9, 0, 0, 4), {"rating": (0, 1), "general": (2, 3), "character": (4,)}, {}
    )
    fp32 = np.array([[0.9, 0.1, 0.5, 0.2, 0.1], [0.2, 0.8, 0.5, 0.5, 0.0]], np.float32)
    int8 = np.array([[0.6, 0.4, 0.3, 0.2, 0.0], [0.6, 0.4, 0.5, 0.5, 0.0]], np.float32)
    f1 = agreement(fp32, int8, labels, Thresholds(heads={"general": 0.35, "character": 0.85}))
    # rating: one arg-max of two moves (TP 1, one false, one missed: 2/4); general: 3 positives in fp32, 2 kept.
    assert f1 == {"rating": 0.5, "general": 0.8, "character": 1.0}


# ---- a WD ONNX directory (NHWC BGR 0..255 in, sigmoid probabilities out), built here with random weights


def wd_layout(out: Path, arch: str, **model_args) -> Path:
    """A WD ONNX directory of a random timm model: selected_tags.csv (4 ratings, 40 general, 8 characters) and
    model.onnx (NHWC BGR 0..255 in, sigmoid probabilities out, a dynamic batch)."""
    import timm
    import torch

    out.mkdir()
    rows = [("rating", 9, n) for n in ("general", "sensitive", "questionable", "explicit")]
    rows += [("general", 0, f"tag_{i}") for i in range(40)] + [("character", 4, f"chara_{i}") for i in range(8)]
    lines = ["tag_id,name,category,count"] + [f"{9999 - i},{n},{c},{100 + i}" for i, (_, c, n) in enumerate(rows)]
    (out / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=len(rows), **model_args).eval()

    class WDOnnx(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.sigmoid(self.model((x.permute(0, 3, 1, 2) - 127.5) / 127.5))

    export_nhwc(WDOnnx(), WD_SIZE, out / "model.onnx")
    return out


@pytest.fixture(scope="module")
def wd_dir(tmp_path_factory) -> Path:
    return wd_layout(tmp_path_factory.mktemp("wd") / "wd-test-tagger-v3", "resnet10t")


def test_dynamic_mode_on_a_vit_keeps_its_decisions(synth_images, tmp_path, i2v):
    folder = wd_layout(tmp_path / "wd-vit", "test_vit", img_size=WD_SIZE)
    code, _, err = i2v("quantize", str(folder), "--calibration", str(synth_images), "--mode", "dynamic")
    assert code == 0, err
    report = read_int8(folder)
    assert report["mode"] == "dynamic" and report["int8_bytes"] < 0.5 * report["fp32_bytes"]
    assert min(report["f1"].values()) >= 0.97 and report["max_prob_diff"] < 0.01 and report["agrees"] is True


def test_a_wd_onnx_directory_is_quantized_in_place_from_the_command_line(wd_dir, synth_images, tmp_path, i2v):
    import shutil

    folder = tmp_path / "wd"
    shutil.copytree(wd_dir, folder)
    code, _, err = i2v("quantize", str(folder), "--calibration", str(synth_images))
    assert code == 0, err
    assert (folder / INT8_FILE).is_file() and (folder / INT8_FILE).stat().st_size < 0.5 * (
        folder / "model.onnx"
    ).stat().st_size
    report = json.loads((folder / INT8_REPORT).read_text())  # WD's own files are left as they were
    assert report == read_int8(folder) and set(report["f1"]) == {"rating", "general", "character"}
    assert report["calibration_images"] + report["check_images"] == 12 and report["skipped"] == 0
    err = " ".join(err.split())
    assert "F1 against fp32's decisions rating" in err and f"(recorded in {INT8_REPORT})" in err
    from illust2vec.infer.tagger import Tagger

    assert (Tagger.load(folder).precision, Tagger.load(folder, precision="fp32").precision) == ("int8", "fp32")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.onnx", "selected_tags.csv", INT8_FILE, INT8_REPORT]
    )


def test_check_images_apart_from_calibration(wd_dir, synth_images, tmp_path, i2v):
    held = tmp_path / "held"
    held.mkdir()
    for p in sorted(p for p in synth_images.iterdir() if p.suffix != ".json")[:5]:
        (held / p.name).write_bytes(p.read_bytes())
    code, _, err = i2v(
        "quantize", str(wd_dir), "--calibration", str(synth_images), "--check", str(held), "--out", str(tmp_path / "q")
    )
    assert code == 0, err
    report = read_int8(tmp_path / "q")
    assert (report["calibration_images"], report["check_images"]) == (12, 5)
    assert report["calibration_source"].endswith(f"; checked on {held}")


def test_too_few_decodable_images_is_one_line_naming_how_many_are_needed(wd_dir, synth_images, tmp_path, i2v):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(synth_images.glob("*.png"))[:3] + sorted(synth_images.glob("*.jpg"))[:2]:
        (few / p.name).write_bytes(p.read_bytes())
    (few / "broken.jpg").write_bytes(b"not a picture")
    code, _, err = i2v("quantize", str(wd_dir), "--calibration", str(few), "--out", str(tmp_path / "q"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    assert "5 decodable images (1 did not decode)" in err and "needs at least 12" in err
    assert not (tmp_path / "q").exists()


def test_a_disagreeing_int8_model_is_written_with_a_warning_and_its_figures(
    wd_dir, synth_images, tmp_path, i2v, monkeypatch
):
    import illust2vec.quantize as q

    monkeypatch.setattr(q, "agreement", lambda *a: {"rating": 1.0, "general": 0.61, "character": 0.9})
    code, _, err = i2v("quantize", str(wd_dir), "--calibration", str(synth_images), "--out", str(tmp_path / "q"))
    assert code == 0 and (tmp_path / "q" / INT8_FILE).is_file()
    err = " ".join(err.split())
    assert (
        "warning: model.int8.onnx disagrees with model.onnx beyond --min-f1 0.97: F1 general 0.610, character 0.900"
        in err
    )
    assert read_int8(tmp_path / "q")["agrees"] is False


def test_a_bundle_without_onnx_or_a_run_asks_for_what_is_missing(synth_bundle, tmp_path, i2v):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(synth_bundle, bundle)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "source": {"run": str(tmp_path / "gone")}}))
    code, _, err = i2v("quantize", str(bundle))
    assert code == 2 and "give --calibration" in err and "gone is not here" in err
    code, _, err = i2v("quantize", str(bundle), "--calibration", "/nonexistent", "--out", str(tmp_path))
    assert code == 2 and "exists and is not empty" in err  # said before any image is read
    (bundle / "model.onnx").unlink()
    code, _, err = i2v("quantize", str(bundle), "--calibration", str(tmp_path))
    assert code == 2 and "i2v export --onnx" in err
    code, _, err = i2v("quantize", str(bundle), "--mode", "fast")
    assert code == 2 and "--mode must be one of static, dynamic" in err


# ---- --precision: which file tag, embed and serve run


def test_precision_auto_takes_int8_on_the_cpu_and_fp32_or_int8_when_asked(synth_bundle, int8_bundle):
    from illust2vec.errors import UserError
    from illust2vec.infer.backends import describe
    from illust2vec.infer.tagger import Tagger, _onnx_file

    out, _ = int8_bundle
    auto, fp32 = Tagger.load(out), Tagger.load(out, precision="fp32")
    assert (auto.precision, fp32.precision) == ("int8", "fp32")
    assert auto.backend.session._model_path.endswith(INT8_FILE)  # noqa: SLF001 - which file onnxruntime opened
    assert describe(auto.backend).endswith(", int8") and describe(fp32.backend).endswith(", fp32")
    assert Tagger.load(out, precision="int8").precision == "int8"
    assert Tagger.load(synth_bundle).precision == "fp32"  # no int8 file: fp32, nothing said
    # On a GPU, auto keeps fp32; int8 is there only when asked for.
    assert _onnx_file(out, out / "model.onnx", "auto", "cuda:0") == (out / "model.onnx", "fp32")
    assert _onnx_file(out, out / "model.onnx", "int8", "cuda:0") == (out / INT8_FILE, "int8")
    with pytest.raises(UserError, match="no model.int8.onnx; make one with: i2v quantize"):
        Tagger.load(synth_bundle, precision="int8")
    with pytest.raises(UserError, match="--backend torch runs fp32"):
        Tagger.load(out, backend="torch", precision="int8")
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, int8"):
        Tagger.load(out, precision="fp16")
    assert Tagger.load(out, backend="torch").precision == "fp32"


def test_tag_embed_and_serve_name_the_precision_they_ran(int8_bundle, synth_images, tmp_path, i2v):
    from illust2vec.serve.app import ServeConfig, load_state

    out, _ = int8_bundle
    pictures = [str(p) for p in sorted(synth_images.glob("*.png"))[:3]]
    code, stdout, err = i2v("tag", *pictures, "--model", str(out), "--format", "json")
    assert code == 0 and "CPUExecutionProvider), int8" in " ".join(err.split())
    code, fp32_out, err = i2v("tag", *pictures, "--model", str(out), "--format", "json", "--precision", "fp32")
    assert code == 0 and "CPUExecutionProvider), fp32" in " ".join(err.split())
    int8_rows, fp32_rows = json.loads(stdout), json.loads(fp32_out)
    assert [r["path"] for r in int8_rows] == [r["path"] for r in fp32_rows] and int8_rows != fp32_rows
    code, _, err = i2v("embed", *pictures, "--model", str(out), "--out", str(tmp_path / "v.parquet"))
    assert code == 0 and "CPUExecutionProvider), int8" in " ".join(err.split())
    code, _, err = i2v("tag", *pictures, "--model", str(out), "--precision", "half")
    assert code == 2 and "--precision must be one of auto, fp32, int8" in err
    assert load_state(ServeConfig(model=str(out))).tagger.precision == "int8"
    assert load_state(ServeConfig(model=str(out), precision="fp32")).tagger.precision == "fp32"


def test_a_wd_file_with_a_fixed_batch_of_one_and_a_missing_calibration_path_named(wd_dir, synth_images, tmp_path):
    import shutil

    import onnx

    from illust2vec.errors import UserError
    from illust2vec.infer.tagger import Tagger

    folder = tmp_path / "fixed"
    shutil.copytree(wd_dir, folder)
    graph = onnx.load(str(folder / "model.onnx"))
    for value in (graph.graph.input[0], graph.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(graph, str(folder / "model.onnx"))
    s = quantize(QuantizeConfig(model=str(folder), calibration=(str(synth_images),)))
    assert s.check_images == 4 and s.int8_bytes < 0.5 * s.fp32_bytes
    tagger = Tagger.load(folder)
    assert tagger.precision == "int8" and tagger.backend.fixed_batch == 1
    assert tagger.predict(sorted(synth_images.glob("*.png"))[:3]).shape == (3, 52)
    with pytest.raises(UserError, match=f"--calibration {tmp_path}/nope: no such file or folder"):
        quantize(QuantizeConfig(model=str(folder), calibration=(str(tmp_path / "nope"),)))
