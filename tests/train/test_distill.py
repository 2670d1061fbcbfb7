"""i2v distill: a student learns a teacher's outputs from its cache, and the run exports as a bundle that tags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from illust2vec.distill import DistillConfig, distill
from illust2vec.formats import teacher as cache
from illust2vec.formats.run import read_history

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from test_teach import board_images, wd_teacher  # noqa: E402


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    return board_images(tmp_path_factory.mktemp("unlabelled"), 120)


@pytest.fixture(scope="module")
def distilled(unlabelled, tmp_path_factory) -> tuple[Path, object]:
    """A student at 32 px distilled for 5 epochs from a WD ONNX teacher whose tags follow the pictures' colours."""
    root = tmp_path_factory.mktemp("distill")
    cfg = DistillConfig(
        teacher=str(wd_teacher(root / "wd-colour-tagger-v3")),
        images=(str(unlabelled),),
        student="resnet10t",
        size=32,
        out=str(root / "run"),
        epochs=5,
        batch_size=16,
        val_fraction=0.25,
        workers=0,
    )
    return root / "run", distill(cfg)


@pytest.mark.slow
def test_the_student_learns_to_agree_with_its_teacher(distilled):
    run, s = distilled
    rows = read_history(run)
    assert len(rows) == 5 and s.train.select_by == "val/agreement/general/f1"
    first, best = rows[0], max(rows, key=lambda r: r["val/agreement/general/f1"])
    # agreement rises over the epochs (0.65 to 0.73 in a run of this test), and the loss against the teacher falls
    assert best["val/agreement/general/f1"] > first["val/agreement/general/f1"] + 0.03
    assert max(r["val/general/mAP"] for r in rows) > first["val/general/mAP"] + 0.05
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert s.agreement["val/agreement/general/f1"] == pytest.approx(best["val/agreement/general/f1"])
    assert {"val/agreement/character/top1", "val/agreement/rating/accuracy", "val/general/mAP"} <= set(s.agreement)
    config = json.loads((run / "config.json").read_text())
    assert config["distill"]["kind"] == "wd-onnx" and config["image_size"] == 32
    assert cache.read_agreement(run, s.train.best_epoch) is not None


@pytest.mark.slow
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
    assert len(records) == 12 and all(len(r["rating"]) == 4 for r in records)
    assert len({tuple(r["general"]) for r in records}) > 1
    code, _, err = i2v("quantize", str(tmp_path / "b"))  # calibrated on the run's held-out images, the cache's
    assert code == 0, err
    assert (tmp_path / "b" / "model.int8.onnx").exists() and "validation split" in err


def test_a_student_that_cannot_take_the_size_is_one_line(tmp_path, i2v):
    teacher = str(tmp_path / "teacher")  # never opened, nor the images: the student is refused first
    args = ["distill", "--teacher", teacher, "--images", str(tmp_path), "--out", str(tmp_path / "r")]
    code, _, err = i2v(*args, "--student", "test_vit", "--size", "40")
    assert code == 2 and "--student test_vit cannot take --size 40" in err and "Traceback" not in err
    code, _, err = i2v(*args, "--student", "no_such_net", "--size", "32")
    assert code == 2 and "no_such_net" in err
    assert not (tmp_path / "r").exists()  # refused before the teacher pass
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    code, _, err = i2v(*args, "--student", "resnet10t", "--size", "32")
    assert code == 2 and "already holds a run; add --resume" in err


def test_the_loss_is_least_at_the_teachers_outputs_and_agreement_is_one_for_its_copy():
    import numpy as np
    import torch

    from illust2vec.evaluation.evaluator import Predictions
    from illust2vec.formats.bundle import Thresholds
    from illust2vec.train.distill import Distillation

    info = cache.TeacherInfo(
        "t", "wd-onnx", None, 64, 32, "h", {}, Thresholds(heads={"general": 0.5}).to_json(), 0.1, 8, 1, "x"
    )
    acts = {"rating": "softmax", "general": "sigmoid"}
    d = Distillation(info, {"rating": ("a", "b", "c", "d"), "general": ("x", "y", "z")}, acts)
    teacher = {"rating": torch.tensor([[0.7, 0.1, 0.1, 0.1]]), "general": torch.tensor([[0.9, 0.2, 0.6]])}
    targets = {cache.TARGET + h: v for h, v in teacher.items()}
    exact = {"rating": teacher["rating"].log(), "general": torch.logit(teacher["general"])}
    loss, parts = d.loss(exact, targets)
    for head in exact:  # nudging the logits away from the teacher's only raises the loss
        moved = {**exact, head: exact[head] + torch.tensor([[0.5, -0.5, 0.3, 0.0][: exact[head].shape[1]]])}
        assert d.loss(moved, targets)[0] > loss
    assert set(parts) == {"rating", "general"}
    p = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.7, 0.6, 0.1]], np.float32)
    preds = Predictions({"general": p, "rating": np.eye(4, dtype=np.float32)[:3]}, {"general": (p > 0.5) * 1.0})
    preds.targets["rating"] = np.array([0, 1, 2])
    figures = d.metrics(preds)
    assert figures["agreement/general/f1"] == 1.0 and figures["agreement/general/f1_at_teacher"] == 1.0
    assert figures["agreement/rating/accuracy"] == 1.0 and d.thresholds is not None
