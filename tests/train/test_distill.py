"""i2v distill: a student learns a teacher's outputs from its cache, and the run exports as a bundle that tags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from illust2vec.distill import DistillConfig, distill
from illust2vec.errors import UserError
from illust2vec.formats import teacher as cache
from illust2vec.formats.run import read_history

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from test_teach import board_images  # noqa: E402


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    return board_images(tmp_path_factory.mktemp("unlabelled"), 120)


@pytest.fixture(scope="module")
def distilled(synth_bundle, unlabelled, tmp_path_factory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("distill") / "run"
    cfg = DistillConfig(
        teacher=str(synth_bundle),
        images=(str(unlabelled),),
        student="resnet10t",
        size=48,
        out=str(run),
        epochs=4,
        batch_size=16,
        lr=3e-3,
        val_fraction=0.25,
        workers=0,
    )
    return run, distill(cfg)


def test_the_student_learns_to_agree_with_its_teacher(distilled):
    run, s = distilled
    rows = read_history(run)
    assert len(rows) == 4 and s.train.select_by == "val/agreement/general/f1"
    first, best = rows[0], max(rows, key=lambda r: r["val/agreement/general/f1"])
    # agreement rises over the epochs, and the loss against the teacher falls
    assert best["val/agreement/general/f1"] > first["val/agreement/general/f1"] + 0.02
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert s.agreement["val/agreement/general/f1"] == pytest.approx(best["val/agreement/general/f1"])
    assert {"val/agreement/character/top1", "val/agreement/rating/accuracy", "val/general/mAP"} <= set(s.agreement)
    config = json.loads((run / "config.json").read_text())
    assert config["distill"]["kind"] == "bundle" and config["image_size"] == 48
    assert cache.read_agreement(run, s.train.best_epoch) is not None


def test_a_distilled_run_exports_with_the_matched_thresholds_and_tags(distilled, synth_images, tmp_path, i2v):
    run, s = distilled
    code, _, err = i2v("export", str(run), "--out", str(tmp_path / "b"), "--onnx")
    assert code == 0, err
    matched = cache.read_agreement(run, s.train.best_epoch)
    saved = json.loads((tmp_path / "b" / "thresholds.json").read_text())
    assert saved["heads"]["general"] == pytest.approx(matched.heads["general"])
    code, out, err = i2v("tag", str(synth_images), "--model", str(tmp_path / "b"), "--format", "jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 12 and all("rating" in r["tags"] for r in records)


def test_a_student_that_cannot_take_the_size_is_one_line(synth_bundle, unlabelled, tmp_path):
    with pytest.raises(UserError, match="--student test_vit cannot take --size 40"):
        distill(DistillConfig(str(synth_bundle), (str(unlabelled),), "test_vit", 40, str(tmp_path / "r"), workers=0))
    assert not (tmp_path / "r").exists()  # refused before the teacher pass
