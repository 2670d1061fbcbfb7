"""The training loop: schedule, checkpoints without pickle, run outputs, exact resume."""

import csv
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from illust2vec.errors import UserError
from illust2vec.formats.run import list_checkpoints, read_best, read_metrics
from illust2vec.train.config import TrainConfig
from illust2vec.train.loop import fit, get_lr
from illust2vec.train.setup import init_head_priors

TINY = dict(arch="test_resnet", batch_size=16, workers=0, lr=3e-3, warmup=0.2)


def test_schedule_warms_up_then_decays_by_cosine():
    lrs = [get_lr(s, total=100, warmup=10, base=1.0, floor=0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))
    assert get_lr(5, total=10, warmup=0, base=2.0, floor=0.0) == pytest.approx(1.0)


def test_a_run_writes_its_outputs(synth_build, tmp_path):
    run = tmp_path / "run"
    summary = fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, select_by="character/top1", **TINY))
    assert summary.best_epoch in (1, 2) and summary.select_by == "val/character/top1"
    best = read_best(run)
    assert (best["best_epoch"], best["select_by"], best["epochs"]) == (summary.best_epoch, summary.select_by, 2)
    assert summary.last["epoch"] == 2 and summary.last["val/general/mAP"] == pytest.approx(
        best["last"]["val/general/mAP"]
    )
    assert list_checkpoints(run) == [1, 2]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in (
        "train/loss",
        "val/loss",
        "val/general/mAP",
        "val/general/f1",
        "val/general/precision",
        "val/general/recall",
        "val/general/accuracy",
        "val/character/top1",
        "val/rating/accuracy",
        "val/general/contradictions",
        "val/general/macro_f1",
        "val/general/threshold_p_eq_r",
        "val/character/top5",
        "val/copyright/top1",  # the one top-1 rule: character, copyright and artist heads, whatever the activation
    ):
        assert key in rows[0], key
        value = float(rows[0][key])
        assert value >= 0 and (key.endswith("loss") or value <= 1), (key, value)
    # The names `i2v evaluate` writes into metrics.json, prefixed with the split.
    assert float(rows[0]["val/general/threshold"]) == 0.5
    assert int(rows[0]["val/general/images"]) > 0
    assert "val/general/top1" not in rows[0]
    assert read_metrics(run)[1]["val/general/mAP"] == pytest.approx(float(rows[1]["val/general/mAP"]))
    assert (run / "curves.png").stat().st_size > 10_000 and list((run / "tb").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["backbone"] == "test_resnet" and config["vocab_hash"]
    assert (run / "selected_tags.csv").read_text() == (synth_build / "selected_tags.csv").read_text()
    weights = load_file(run / "checkpoints" / "epoch-002" / "model.safetensors")
    assert any(k.startswith("heads.") for k in weights)
    with pytest.raises(UserError, match="already holds a run"):
        fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, **TINY))
    with pytest.raises(UserError, match="no such metric"):
        fit(TrainConfig(data=str(synth_build), out=str(tmp_path / "r2"), epochs=1, select_by="nope/f1", **TINY))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_build, tmp_path):
    straight = tmp_path / "straight"
    fit(TrainConfig(data=str(synth_build), out=str(straight), epochs=2, **TINY))
    # A run killed during epoch 2: everything of epoch 1, nothing of epoch 2.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "epoch-002")
    fit(TrainConfig(data=str(synth_build), out=str(killed), epochs=2, **TINY), resume=True)
    a = load_file(straight / "checkpoints" / "epoch-002" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "epoch-002" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(UserError, match="other settings"):
        fit(TrainConfig(data=str(synth_build), out=str(killed), epochs=3, **{**TINY, "lr": 1.0}), resume=True)


def test_global_pool_is_a_setting_and_a_run_resumes_with_its_own_architecture(synth_build, tmp_path, monkeypatch):
    from illust2vec.models.tagger import PRESETS, WD_HEADS, create_tagger

    def head_widths(run):
        weights = load_file(run / "checkpoints" / "epoch-002" / "model.safetensors")
        return {k: v.shape[1] for k, v in weights.items() if k.startswith("heads.") and v.ndim == 2}

    heads = ("rating", "general", "character", "copyright")
    # --global-pool overrides the preset's pooling, and the run's config records it.
    chosen = tmp_path / "chosen"
    fit(
        TrainConfig(
            data=str(synth_build),
            out=str(chosen),
            epochs=2,
            max_steps_per_epoch=2,
            model={"global_pool": "max"},
            **TINY,
        )
    )
    assert json.loads((chosen / "config.json").read_text())["model"]["global_pool"] == "max"
    max_width = create_tagger("test_resnet", global_pool="max").num_features
    assert head_widths(chosen) == {f"heads.{h}.fc.weight": max_width for h in heads}
    # A preset changes its pooling after a run of it started (as i2v_small's did): the run resumes as it began.
    run = tmp_path / "run"
    monkeypatch.setitem(PRESETS, "tiny_preset", {"backbone": "test_resnet", "image_size": 96, "heads": WD_HEADS})
    tiny = {**TINY, "arch": "tiny_preset"}
    fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, max_steps_per_epoch=2, **tiny))
    shutil.rmtree(run / "checkpoints" / "epoch-002")
    monkeypatch.setitem(PRESETS, "tiny_preset", {**PRESETS["tiny_preset"], "global_pool": "catavgmax"})
    fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, max_steps_per_epoch=2, **tiny), resume=True)
    assert json.loads((run / "config.json").read_text())["model"]["global_pool"] == ""
    width = create_tagger("test_resnet").num_features
    assert width != create_tagger("test_resnet", global_pool="catavgmax").num_features
    assert head_widths(run) == {f"heads.{h}.fc.weight": width for h in heads}


def test_train_command_mistakes_are_one_line(synth_build, tmp_path):
    import subprocess
    import sys

    for args, needle in (
        (["--arch", "no_such_model"], "unknown model"),
        (["--loss", "hinge"], "loss must be one of bce, asl, not 'hinge'"),
        (["--amp", "fp8"], "amp must be one of auto, bf16, fp16, off, not 'fp8'"),
        (["--global-pool", "median", "--arch", "test_resnet"], "does not take global_pool='median'"),
        (["--select-by", "general/nope", "--arch", "test_resnet", "--epochs", "1", "--workers", "0"], "no such metric"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "illust2vec.cli",
                "train",
                str(synth_build),
                "--out",
                str(tmp_path / args[1]),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and needle in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_prior_initialisation_predicts_each_tag_at_its_training_frequency():
    from illust2vec.models import create_tagger, default_heads

    heads = default_heads({"rating": 4, "general": 3, "character": 2}, softmax=("character",))
    model = create_tagger("test_resnet", heads=heads, image_size=32)
    counts = {"rating": [50, 30, 15, 5], "general": [90, 10, 0], "character": [7, 1]}
    init_head_priors(model, counts, samples=100)
    general = torch.sigmoid(model.heads["general"].fc.bias)
    assert general.tolist() == pytest.approx([90.5 / 101, 10.5 / 101, 0.5 / 101], rel=1e-5)
    character = torch.softmax(model.heads["character"].fc.bias, 0)
    assert character.tolist() == pytest.approx([8 / 10, 2 / 10], rel=1e-5)
    rating = torch.softmax(model.heads["rating"].fc.bias, 0)
    assert rating.tolist() == pytest.approx([51 / 104, 31 / 104, 16 / 104, 6 / 104], rel=1e-5)
