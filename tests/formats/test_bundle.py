"""The model bundle: what `save_bundle` writes is what `open_bundle` reads (config, labels, thresholds, the same
outputs through torch); the new bundle is swapped in whole, so a failure or a crash leaves the old one; a WD
snapshot directory, whose config.json is timm's, is not taken for a bundle and still opens as a WD tagger."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import illust2vec.formats.bundle as bundle_format
from illust2vec import Tagger
from illust2vec.errors import UserError
from illust2vec.formats.bundle import (
    FORMAT_VERSION,
    Labels,
    Thresholds,
    is_bundle,
    open_bundle,
    save_bundle,
)
from illust2vec.formats.categories import CATEGORY_CODES, RATING_IDS
from illust2vec.formats.vocab import Vocab, tag_id, write_vocab
from illust2vec.models import TaggerConfig, create_tagger, default_heads
from illust2vec.models.interface import WDInterface

SIZE = 64
FILES = ["config.json", "model.safetensors", "selected_tags.csv", "thresholds.json"]


def vocab() -> Vocab:
    rows = [(RATING_IDS[n], n, CATEGORY_CODES["rating"], 10) for n in RATING_IDS]
    rows += [(tag_id(f"tag_{i}"), f"tag_{i}", CATEGORY_CODES["general"], 100 - i) for i in range(6)]
    rows += [(tag_id(f"char_{i}"), f"char_{i}", CATEGORY_CODES["character"], 50 - i) for i in range(3)]
    return Vocab(*(tuple(column) for column in zip(*rows, strict=True)))


def model(seed: int = 0):
    torch.manual_seed(seed)
    sizes = {h: len(ix) for h, ix in vocab().heads.items()}
    return create_tagger("test_resnet", heads=default_heads(sizes, softmax=("rating",)), image_size=SIZE).eval()


def thresholds(general: float = 0.4) -> Thresholds:
    heads = {"rating": 0.0, "general": general, "character": 0.7, "copyright": 0.8, "artist": 0.9}
    return Thresholds(heads, {"tag_2": 0.25}, f"test ({general})")


def save(out: Path, seed: int = 0, **kw):
    net = model(seed)
    kw.setdefault("overwrite", True)
    return net, save_bundle(out, net, vocab(), thresholds(0.4 + seed / 100), source={"seed": seed}, **kw)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_then_open_gives_the_same_bundle_and_the_same_outputs(tmp_path):
    out = tmp_path / "bundle"
    net = model()
    center = np.linspace(-1, 1, net.num_features, dtype=np.float32)
    saved = save_bundle(out, net, vocab(), thresholds(), source={"run": "r", "epoch": 3}, feature_center=center)
    assert sorted(p.name for p in out.iterdir()) == FILES
    info = open_bundle(out)
    assert info == saved
    assert info.config["format_version"] == FORMAT_VERSION and info.config["source"] == {"run": "r", "epoch": 3}
    assert TaggerConfig.from_dict(info.config["model"]) == net.cfg and info.image_size == SIZE
    assert info.config["feature_dim"] == net.num_features
    assert info.config["feature_center"] == pytest.approx(center.tolist(), abs=1e-6)
    assert info.vocab == vocab() and info.thresholds == thresholds()
    assert info.labels == Labels.from_vocab(vocab(), {"rating": "softmax"})
    assert info.onnx_path is None
    # safetensors writes its file for its owner only; a bundle's files all get the same mode
    assert len({(out / name).stat().st_mode for name in FILES}) == 1

    x = (np.random.default_rng(0).random((3, SIZE, SIZE, 3)) * 255).astype(np.float32)
    with torch.no_grad():
        probs, feats = (t.numpy() for t in WDInterface(net)(torch.from_numpy(x)))
    got_probs, got_feats = Tagger.load(out, backend="torch").run(x)
    assert np.array_equal(got_probs, probs) and np.array_equal(got_feats, feats)


def test_the_onnx_file_is_named_by_the_writer(tmp_path):
    def fake_onnx(path: Path) -> dict:
        path.write_bytes(b"onnx")
        return {"file": path.name, "max_abs_diff": 0.0}

    _, info = save(tmp_path / "bundle", onnx=fake_onnx)
    assert info.onnx_path == tmp_path / "bundle" / "model.onnx" and info.config["onnx"]["file"] == "model.onnx"


def test_a_new_bundle_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "bundle"
    save(out, seed=0)
    before = snapshot(out)
    save(out, seed=1)
    assert open_bundle(out).config["source"] == {"seed": 1} and snapshot(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary or old copy beside it


def test_the_swap_never_leaves_out_without_a_bundle(tmp_path, monkeypatch):
    """Every rename and removal save_bundle makes is checked: before and after each one, `out` is a bundle."""
    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if not bundle_format._exchange(probe / "a", probe / "b"):
        pytest.skip("no atomic directory exchange on this system")
    out = tmp_path / "bundle"
    save(out, seed=0)
    checked = []

    def watching(fn):
        def call(*args, **kw):
            assert is_bundle(out), f"no bundle before {fn.__name__}{args}"
            result = fn(*args, **kw)
            assert is_bundle(out), f"no bundle after {fn.__name__}{args}"
            checked.append(fn.__name__)
            return result

        return call

    monkeypatch.setattr(os, "rename", watching(os.rename))
    monkeypatch.setattr(shutil, "rmtree", watching(shutil.rmtree))
    monkeypatch.setattr(bundle_format, "_exchange", watching(bundle_format._exchange))
    save(out, seed=1)
    assert "_exchange" in checked and "rmtree" in checked
    assert open_bundle(out).config["source"] == {"seed": 1}


def test_the_exchange_swaps_two_directories(tmp_path):
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in_a").write_text("a")
    (b / "in_b").write_text("b")
    assert bundle_format._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["in_b"] and [p.name for p in b.iterdir()] == ["in_a"]
    with pytest.raises(FileNotFoundError):
        bundle_format._exchange(a, tmp_path / "missing")


def test_without_an_exchange_the_fallback_still_replaces_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_format, "_exchange", lambda a, b: False)
    out = tmp_path / "bundle"
    save(out, seed=0)
    save(out, seed=1)
    assert open_bundle(out).config["source"] == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_failure_mid_write_leaves_the_old_bundle_intact(tmp_path):
    out = tmp_path / "bundle"
    save(out, seed=0)
    before = snapshot(out)

    def failing_onnx(path: Path) -> dict:
        path.write_bytes(b"half a file")
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="the disk is full"):
        save(out, seed=1, onnx=failing_onnx)
    assert snapshot(out) == before and open_bundle(out).config["source"] == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_temporary_left_by_a_crash_is_cleared(tmp_path):
    out = tmp_path / "bundle"
    for leftover in (out.with_name("bundle.tmp"), out.with_name("bundle.tmp") / "sub"):
        leftover.mkdir(parents=True, exist_ok=True)
        (leftover / "model.safetensors").write_bytes(b"half")
    save(out, seed=0)  # out absent, a leftover beside it
    save(out, seed=1)  # out present
    assert open_bundle(out).config["source"] == {"seed": 1}
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_only_a_bundle_is_replaced(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; choose another --out or add --overwrite"):
        save(out, overwrite=False)
    with pytest.raises(UserError, match="is not a bundle; --overwrite replaces a bundle"):
        save(out, overwrite=True)
    assert snapshot(out) == {"mine.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save(empty, overwrite=False)  # an empty folder is taken
    assert is_bundle(empty)


def test_a_wd_snapshot_is_not_a_bundle_and_still_opens(tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    snap = tmp_path / "wd-snapshot"
    torch.manual_seed(0)
    args = dict(img_size=SIZE, class_token=False, global_pool="avg", fc_norm=False)
    net = timm.create_model("test_vit", num_classes=len(vocab()), **args).eval()
    save_for_hf(net, str(snap), model_args=args, safe_serialization=True)
    config = json.loads((snap / "config.json").read_text())
    config["pretrained_cfg"].update(input_size=[3, SIZE, SIZE], crop_pct=1.0)
    (snap / "config.json").write_text(json.dumps(config))
    write_vocab(vocab(), snap / "selected_tags.csv")

    assert not is_bundle(snap)
    with pytest.raises(UserError, match="not an illust2vec bundle"):
        open_bundle(snap)
    tagger = Tagger.load(snap)
    assert (tagger.kind, tagger.image_size, len(tagger.labels)) == ("wd-timm", SIZE, len(vocab()))


# ---- format 2: WD's heads in selected_tags.csv and output 0, the others in extra_tags.csv and outputs of their own


def full_vocab() -> Vocab:
    """vocab() with copyright and artist heads."""
    v = vocab()
    rows = list(zip(v.tag_ids, v.names, v.categories, v.counts, strict=True))
    rows += [(tag_id(f"series_{i}"), f"series_{i}", CATEGORY_CODES["copyright"], 30 - i) for i in range(2)]
    rows += [(tag_id("someone"), "someone", CATEGORY_CODES["artist"], 5)]
    return Vocab(*(tuple(column) for column in zip(*rows, strict=True)))


def full_model(size: int = SIZE):
    torch.manual_seed(0)
    sizes = {h: len(ix) for h, ix in full_vocab().heads.items()}
    return create_tagger("test_resnet", heads=default_heads(sizes), image_size=size).eval()


def test_format_2_splits_the_labels_as_wd_v3_does_and_keeps_every_head(tmp_path):
    from illust2vec.formats.vocab import read_vocab

    net = full_model()
    info = save_bundle(tmp_path / "b", net, full_vocab(), thresholds())
    assert sorted(p.name for p in info.root.iterdir()) == sorted([*FILES, "extra_tags.csv"])
    wd, extra = read_vocab(info.root / "selected_tags.csv"), read_vocab(info.root / "extra_tags.csv")
    assert set(wd.categories) == {9, 0, 4} and list(wd.heads) == ["rating", "general", "character"]
    assert list(extra.heads) == ["copyright", "artist"] and extra.names == ("series_0", "series_1", "someone")
    assert info.config["format_version"] == FORMAT_VERSION == 2
    assert info.config["outputs"] == [
        {"name": "output", "labels": "selected_tags.csv", "heads": ["rating", "general", "character"], "size": 13},
        {"name": "copyright", "labels": "extra_tags.csv", "heads": ["copyright"], "size": 2},
        {"name": "artist", "labels": "extra_tags.csv", "heads": ["artist"], "size": 1},
        {"name": "features", "size": net.num_features},
    ]
    assert info.vocab == full_vocab() and list(info.labels.heads) == [
        "rating",
        "general",
        "character",
        "copyright",
        "artist",
    ]
    x = (np.random.default_rng(1).random((2, SIZE, SIZE, 3)) * 255).astype(np.float32)
    with torch.no_grad():
        probs, _ = (t.numpy() for t in WDInterface(net)(torch.from_numpy(x)))
    assert np.array_equal(Tagger.load(info.root, backend="torch").run(x)[0], probs)


def test_format_2_rejects_rows_in_the_wrong_file(tmp_path):
    from illust2vec.formats.bundle import split_vocab

    out = tmp_path / "b"
    save_bundle(out, full_model(), full_vocab(), thresholds())
    wd, extra = split_vocab(full_vocab())
    write_vocab(full_vocab(), out / "selected_tags.csv")  # every head in selected_tags.csv, as format 1 had it
    with pytest.raises(UserError, match="selected_tags.csv: holds copyright, artist rows; those belong in extra_tags"):
        open_bundle(out)
    write_vocab(wd, out / "selected_tags.csv")
    (out / "extra_tags.csv").unlink()
    with pytest.raises(UserError, match="selected_tags.csv and extra_tags.csv are not the vocabulary the model was"):
        open_bundle(out)


OLD_OUTPUT = "output_all"  # format 1's one probability output


def write_old_onnx(new: Path, old: Path) -> None:
    """Format 1's ONNX file from format 2's: output 0 the concatenation of every probability output, then the rest."""
    import onnx

    model = onnx.load(str(new))
    graph = model.graph
    probs = [o.name for o in graph.output if o.name != "features"]
    graph.node.append(onnx.helper.make_node("Concat", probs, [OLD_OUTPUT], axis=1))
    first = onnx.helper.make_tensor_value_info(OLD_OUTPUT, onnx.TensorProto.FLOAT, ["batch", None])
    rest = [o for o in graph.output if o.name == "features"]
    del graph.output[:]
    graph.output.extend([first, *rest])
    onnx.save(model, str(old))


def write_format_1(bundle: Path, out: Path) -> None:
    """A bundle as format 1 wrote it, by hand: every head in selected_tags.csv, no "outputs" in config.json, and
    (with model.onnx) one output holding every probability, then "features"."""
    info = open_bundle(bundle)
    out.mkdir()
    config = {k: v for k, v in info.config.items() if k != "outputs"}
    config["format_version"] = 1
    shutil.copy(bundle / "model.safetensors", out / "model.safetensors")
    shutil.copy(bundle / "thresholds.json", out / "thresholds.json")
    write_vocab(info.vocab, out / "selected_tags.csv")
    if info.onnx_path is not None:
        write_old_onnx(info.onnx_path, out / "model.onnx")
        config["onnx"] = {**config["onnx"], "outputs": [OLD_OUTPUT, "features"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))


def test_a_format_1_bundle_still_loads_with_every_head(tmp_path):
    import functools

    from illust2vec.models.onnx import export_onnx

    net = full_model()
    new = save_bundle(tmp_path / "new", net, full_vocab(), thresholds(), onnx=functools.partial(export_onnx, net))
    assert [o.name for o in __import__("onnxruntime").InferenceSession(str(new.onnx_path)).get_outputs()] == [
        "output",
        "copyright",
        "artist",
        "features",
    ]
    write_format_1(new.root, tmp_path / "old")
    old = open_bundle(tmp_path / "old")
    assert old.config["format_version"] == 1 and not (tmp_path / "old" / "extra_tags.csv").exists()
    assert old.vocab == new.vocab and old.labels == new.labels and old.thresholds == new.thresholds
    x = (np.random.default_rng(2).random((3, SIZE, SIZE, 3)) * 255).astype(np.float32)
    want = Tagger.load(new.root, backend="torch").run(x)
    for backend in ("torch", "onnx"):
        for root in (new.root, old.root):
            probs, feats = Tagger.load(root, backend=backend).run(x)
            assert np.abs(probs - want[0]).max() < 1e-4 and np.abs(feats - want[1]).max() < 1e-3, (backend, root)
    tagger = Tagger.load(old.root, backend="onnx")
    assert set(tagger.estimate_plausible_tags(x[:1], threshold=0.0)[0]) == set(full_vocab().heads)
