"""Stage 6, `i2v export`: the bundle round trip, its format checks, where its thresholds come from, and the ONNX file
in the WD taggers' convention (parity with torch, dynamic batch, what WD tools read)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from illust2vec import Tagger
from illust2vec.errors import UserError
from illust2vec.evaluate import EvalConfig, evaluate_run
from illust2vec.export import ExportConfig, export
from illust2vec.formats.bundle import DEFAULT_THRESHOLDS, open_bundle
from illust2vec.formats.run import read_config, resolve_epoch, weights_path
from illust2vec.models import load_tagger
from illust2vec.models.interface import WDInterface

I2V = [sys.executable, "-m", "illust2vec.cli"]
SIZE = 96  # synth_build's image size


@pytest.fixture
def run_copy(synth_run, tmp_path) -> Path:
    """synth_run copied, so that evaluate's files and an edited config stay out of the shared fixture."""
    out = tmp_path / "run"
    shutil.copytree(synth_run, out, ignore=shutil.ignore_patterns("tb", "curves.png"))
    return out


def run_model(run: Path, epoch: int):
    """The run's tagger at one epoch, as export reads it."""
    return load_tagger(read_config(run)["model"], weights_path(run, epoch))


def batch(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, SIZE, SIZE, 3)) * 255).astype(np.float32)


# ---- the bundle


def test_save_load_gives_identical_outputs(synth_run, synth_bundle, run_copy, tmp_path):
    out = tmp_path / "bundle"
    summary = export(ExportConfig(str(run_copy), str(out), workers=0))
    assert summary.epoch == resolve_epoch(synth_run, "best") == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "extra_tags.csv",
        "model.safetensors",
        "selected_tags.csv",
        "thresholds.json",
    ]
    x = batch(3)
    model = WDInterface(run_model(synth_run, 2)).eval()
    with torch.no_grad():
        probs, feats = (t.numpy() for t in model(torch.from_numpy(x)))
    for bundle in (out, synth_bundle):  # exported twice (once with ONNX), loaded by the torch backend
        got_probs, got_feats = Tagger.load(bundle, backend="torch").run(x)
        assert np.array_equal(got_probs, probs) and np.array_equal(got_feats, feats)
    info, again = open_bundle(out), open_bundle(synth_bundle)
    assert info.vocab == again.vocab and info.labels == again.labels and info.thresholds == again.thresholds
    assert info.config["model"] == again.config["model"] and info.config["source"]["epoch"] == 2
    assert info.config["feature_dim"] == len(info.config["feature_center"]) == feats.shape[1]
    assert info.config["source"]["val"]["val/general/mAP"] > 0  # the epoch's validation figures travel along


def test_a_newer_format_or_another_vocabulary_is_refused(synth_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(synth_bundle, bundle)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="bundle format 99 is newer than this illust2vec reads \\(2\\); upgrade"):
        Tagger.load(bundle)
    (bundle / "config.json").write_text(json.dumps(config))
    tags = (bundle / "selected_tags.csv").read_text()
    (bundle / "selected_tags.csv").write_text(tags.replace(",1girl,", ",1boy_,", 1))
    with pytest.raises(UserError, match="selected_tags.csv and extra_tags.csv are not the vocabulary the model was"):
        Tagger.load(bundle, backend="onnx")
    (bundle / "selected_tags.csv").write_text(tags)
    (bundle / "thresholds.json").write_text(json.dumps({"heads": {"general": 3}}))
    with pytest.raises(UserError, match="not a thresholds file"):
        Tagger.load(bundle)
    (bundle / "config.json").write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(UserError, match="not an illust2vec bundle"):
        open_bundle(bundle)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"epoch": "first"}, "--epoch takes a number, best or last, not 'first'"),
        ({"workers": -1}, "--workers must be 0 or more, not -1"),
        ({"run": ""}, "ExportConfig.run must be a non-empty string"),
    ],
)
def test_a_bad_config_is_one_user_error(change, needle):
    with pytest.raises(UserError) as e:
        ExportConfig(**{"run": "run", "out": "bundle", **change})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_a_folder_that_holds_something(run_copy, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; choose another --out or add --overwrite"):
        export(ExportConfig(str(run_copy), str(taken), workers=0))
    with pytest.raises(UserError, match="is not a bundle; --overwrite replaces a bundle"):
        export(ExportConfig(str(run_copy), str(taken), overwrite=True, workers=0))
    assert (taken / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export(ExportConfig(str(run_copy), str(tmp_path / "file"), workers=0))

    bundle = tmp_path / "bundle"
    export(ExportConfig(str(run_copy), str(bundle), epoch="1", workers=0))
    with pytest.raises(UserError, match="not empty"):
        export(ExportConfig(str(run_copy), str(bundle), workers=0))
    export(ExportConfig(str(run_copy), str(bundle), overwrite=True, workers=0))  # a bundle: replaced
    assert open_bundle(bundle).config["source"]["epoch"] == 2
    assert not list(tmp_path.glob("bundle.*"))  # no temporary or old copy left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    export(ExportConfig(str(run_copy), str(empty), workers=0))  # an empty folder is fine without --overwrite


def test_thresholds_come_from_evaluate_else_the_validation_split_else_the_defaults(run_copy, tmp_path):
    # No evaluate yet: export calibrates on the run's validation split itself.
    calibrated = export(ExportConfig(str(run_copy), str(tmp_path / "calibrated"), workers=0))
    assert calibrated.thresholds == "calibrated on the validation split"
    mine = json.loads((tmp_path / "calibrated" / "thresholds.json").read_text())
    assert mine["method"].endswith("(export)")

    # After `i2v evaluate` on that epoch, export takes its file as it is.
    report = evaluate_run(EvalConfig(str(run_copy), workers=0))
    evaluated = json.loads((Path(report.out) / "thresholds.json").read_text())
    assert mine["heads"] == evaluated["heads"]  # the same F1 calibration on the same images
    evaluate_run(EvalConfig(str(run_copy), per_tag=True, mode="pr_equal", workers=0))  # rewrites that file
    evaluated = json.loads((Path(report.out) / "thresholds.json").read_text())
    assert evaluated["tags"] and evaluated["heads"] != mine["heads"]
    summary = export(ExportConfig(str(run_copy), str(tmp_path / "evaluated"), workers=0))
    assert summary.thresholds.startswith("i2v evaluate")
    assert json.loads((tmp_path / "evaluated" / "thresholds.json").read_text()) == evaluated
    tagger = Tagger.load(tmp_path / "evaluated")
    assert (
        tagger.thresholds.tags == evaluated["tags"]
        and tagger.thresholds.heads["general"] == evaluated["heads"]["general"]
    )

    # The dataset moved away and no evaluate ran on epoch 1: the usual defaults, and no feature medians.
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "dataset": str(tmp_path / "moved")}))
    summary = export(ExportConfig(str(run_copy), str(tmp_path / "defaults"), epoch="1", workers=0))
    assert summary.thresholds.startswith("defaults: no validation images") and "moved" in summary.thresholds
    info = open_bundle(tmp_path / "defaults")
    assert info.thresholds.heads == DEFAULT_THRESHOLDS and info.thresholds.heads["general"] == 0.35
    assert info.thresholds.heads["character"] == 0.85 and "feature_center" not in info.config
    # ... but epoch 2's evaluate file is still found without the dataset.
    summary = export(ExportConfig(str(run_copy), str(tmp_path / "still"), workers=0))
    assert summary.thresholds.startswith("i2v evaluate")


# ---- ONNX


def test_onnx_matches_torch_with_a_dynamic_batch_in_selected_tags_order(synth_run, synth_bundle):
    info = open_bundle(synth_bundle)
    assert info.onnx_path == synth_bundle / "model.onnx"
    assert {k: info.config["onnx"][k] for k in ("input", "outputs", "layout", "channel_order", "dtype", "range")} == {
        "input": "input",
        "outputs": ["output", "copyright", "features"],  # WD's heads first; the copyright head its own output
        "layout": "NHWC",
        "channel_order": "BGR",
        "dtype": "float32",
        "range": [0, 255],
    }
    assert info.config["onnx"]["max_abs_diff"] < 1e-4  # export's own parity check, recorded
    session = ort.InferenceSession(str(info.onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [SIZE, SIZE, 3]  # dynamic batch, fixed H and W
    assert [o.name for o in session.get_outputs()] == ["output", "copyright", "features"]
    wd_rows = (synth_bundle / "selected_tags.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in wd_rows} == {"9", "0", "4"}  # WD v3's categories, and only those
    extra_rows = (synth_bundle / "extra_tags.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in extra_rows} == {"3"} and len(wd_rows) + len(extra_rows) == len(info.vocab)

    model = run_model(synth_run, 2)
    for n in (1, 5):
        x = batch(n, seed=n)
        wd, copyright, feats = session.run(None, {"input": x})
        assert wd.shape == (n, len(wd_rows)) and copyright.shape == (n, len(extra_rows))
        assert feats.shape == (n, info.config["feature_dim"])
        probs = np.concatenate([wd, copyright], axis=1)  # the vocabulary's order: selected_tags, then extra_tags
        # Directly: our model takes RGB NCHW; its heads' probabilities go where selected_tags.csv lists them.
        with torch.no_grad():
            rgb = torch.from_numpy(x[:, :, :, ::-1].copy()).permute(0, 3, 1, 2)
            heads = model.activate(model(rgb))
            pooled = model.extract_feature(rgb).numpy()
        for head, rows in info.vocab.heads.items():
            assert np.abs(probs[:, list(rows)] - heads[head].numpy()).max() < 1e-4, head
        assert np.abs(feats - pooled).max() < 1e-3 * max(1.0, np.abs(pooled).max())
        assert np.allclose(probs[:, list(info.vocab.heads["rating"])].sum(axis=1), 1, atol=1e-5)  # softmax head


def test_a_wd_tool_reads_our_onnx_file_as_it_reads_wds(synth_bundle, synth_images):
    """What WD scripts do: the input size from the first input's shape, the first output's name, one image."""
    from illust2vec.infer.preprocess import prepare, read_image

    model = ort.InferenceSession(str(synth_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    _, height, width, _ = model.get_inputs()[0].shape
    assert height == width == SIZE
    input_name = model.get_inputs()[0].name
    label_name = model.get_outputs()[0].name
    image = next(p for p in sorted(synth_images.iterdir()) if p.suffix == ".png")
    x = np.expand_dims(prepare(read_image(image), height), 0)
    preds = model.run([label_name], {input_name: x})[0]
    tags = (synth_bundle / "selected_tags.csv").read_text().splitlines()[1:]
    assert preds.shape == (1, len(tags)) and preds.min() >= 0 and preds.max() <= 1
    assert np.allclose(preds[0], Tagger.load(synth_bundle, backend="torch").predict(image)[0][: len(tags)], atol=1e-4)


# ---- the command


def test_the_export_command(run_copy, tmp_path):
    out = tmp_path / "b"
    args = ["export", str(run_copy), "--out", str(out), "--epoch", "1", "--workers", "0"]
    r = subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())  # rich wraps lines at the terminal's width
    assert r.stdout == "" and f"wrote {out} from epoch 1 (thresholds: calibrated on the validation split)" in said
    assert open_bundle(out).config["source"]["epoch"] == 1
    r = subprocess.run([*I2V, "export", str(run_copy), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --out {out} exists and is not empty; choose another --out or add --overwrite"
    ]
    r = subprocess.run(
        [*I2V, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "c")], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run directory"


def test_export_for_a_front_end_prints_its_setting_and_guards_its_files(run_copy, tmp_path, i2v):
    models = tmp_path / "taggui models"
    (models / "other-wd-tagger").mkdir(parents=True)
    (models / "other-wd-tagger" / "selected_tags.csv").write_text("someone else's")
    code, out, err = i2v("export", str(run_copy), "--out", str(models), "--for", "taggui", "--name", "synth")
    said = " ".join(err.split())
    folder = models / "synth-wd-tagger"
    assert code == 0 and out == "", err
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "selected_tags.csv"]  # no other file there
    assert f"wrote {folder / 'model.onnx'}, {folder / 'selected_tags.csv'} from epoch 2" in said
    assert f"in taggui: Settings > Models directory: {models}; Auto-Captioner: model {folder}" in said
    assert "Minimum probability 0." in said
    assert (models / "other-wd-tagger" / "selected_tags.csv").read_text() == "someone else's"  # left alone
    wd_rows = (folder / "selected_tags.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in wd_rows} == {"9", "0", "4"}

    code, _, err = i2v("export", str(run_copy), "--out", str(models), "--for", "taggui", "--name", "synth")
    assert code == 2 and err.strip() == f"error: {folder / 'model.onnx'} exists; add --overwrite to replace it"
    code, _, err = i2v("export", str(run_copy), "--out", str(models), "--for", "kohya2")
    assert code == 2 and "--for must be one of wd, kohya, comfyui, webui, taggui, not 'kohya2'" in err
    code, _, err = i2v("export", str(run_copy), "--out", str(models), "--for", "comfyui", "--name", "../x")
    assert code == 2 and "--name must be letters, digits" in err and "\n" not in err.strip()


# ---- object storage (issue #16): export to a URL, Tagger.load from one through the cache


def test_a_bundle_in_object_storage(run_copy, bucket, tmp_path, monkeypatch, i2v, synth_images):
    from illust2vec.formats.bundle import cached_bundle
    from illust2vec.util import storage

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"{bucket}/models/synth"
    uploaded = []
    real_upload = storage.upload
    monkeypatch.setattr(storage, "upload", lambda src, loc: (uploaded.append(storage.name(loc)), real_upload(src, loc)))
    summary = export(ExportConfig(str(run_copy), url, epoch="1", workers=0))
    assert summary.bundle == url and uploaded[-1] == "config.json"  # the file that says the rest is there, last
    assert sorted(uploaded) == [
        "config.json",
        "extra_tags.csv",
        "model.safetensors",
        "selected_tags.csv",
        "thresholds.json",
    ]
    local = tmp_path / "local"
    export(ExportConfig(str(run_copy), str(local), epoch="1", workers=0))

    x = batch(2)
    downloads = []
    real_download = storage.download
    monkeypatch.setattr(
        storage, "download", lambda loc, dest: (downloads.append(storage.name(loc)), real_download(loc, dest))
    )
    tagger = Tagger.load(url, backend="torch")
    assert Path(tagger.source).parent == tmp_path / "cache" / "illust2vec" / "models"
    assert np.array_equal(tagger.run(x)[0], Tagger.load(local, backend="torch").run(x)[0])
    assert sorted(downloads) == ["extra_tags.csv", "model.safetensors", "selected_tags.csv", "thresholds.json"]
    Tagger.load(url, backend="torch")  # the cached copy: config.json unchanged there
    assert len(downloads) == 4

    with pytest.raises(UserError, match=f"--out {url} exists and is not empty"):
        export(ExportConfig(str(run_copy), url, workers=0))
    export(ExportConfig(str(run_copy), url, epoch="2", overwrite=True, workers=0))  # a new bundle at the URL
    assert open_bundle(cached_bundle(url, "torch")).config["source"]["epoch"] == 2 and len(downloads) == 8

    image = next(p for p in sorted(synth_images.iterdir()) if p.suffix == ".png")
    code, out, err = i2v("tag", str(image), "--model", url, "--format", "json")
    assert code == 0 and json.loads(out)[0]["general"], err
    with pytest.raises(UserError, match=f"{bucket}/nothing: not a model bundle"):
        Tagger.load(f"{bucket}/nothing")
    with pytest.raises(UserError, match="--for comfyui writes into the front end's folder on this machine"):
        export(ExportConfig(str(run_copy), url, target="comfyui", workers=0))
