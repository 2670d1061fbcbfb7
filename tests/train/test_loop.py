"""The training loop: schedule, checkpoints without pickle, run outputs, exact resume."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from illust2vec.errors import UserError
from illust2vec.train.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from illust2vec.train.loop import TrainConfig, contradiction_rate, fit, get_lr, init_head_priors

TINY = dict(arch="test_resnet", batch_size=16, workers=0, lr=3e-3, warmup=0.2)


def test_schedule_warms_up_then_decays_by_cosine():
    lrs = [get_lr(s, total=100, warmup=10, base=1.0, floor=0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 0.5)))
    assert get_lr(5, total=10, warmup=0, base=2.0, floor=0.0) == pytest.approx(1.0)


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "history": [{"epoch": 3}]})
    expected_next = torch.rand(3)
    torch.manual_seed(123)  # disturb the RNG; loading must put it back
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.01)
    state = load_checkpoint(tmp_path, 3, other, other_opt)
    assert state["step"] == 3 and state["history"] == [{"epoch": 3}] and list_checkpoints(tmp_path) == [3]
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for (_, sa), (_, sb) in zip(
        opt.state_dict()["state"].items(), other_opt.state_dict()["state"].items(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(
            torch.as_tensor(sa["step"]), torch.as_tensor(sb["step"])
        )
    assert torch.equal(torch.rand(3), expected_next)
    files = {p.name for p in (tmp_path / "checkpoints" / "epoch-003").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "state.json"}  # nothing pickled


def test_a_run_writes_its_outputs(synth_build, tmp_path):
    run = tmp_path / "run"
    summary = fit(TrainConfig(data=str(synth_build), out=str(run), epochs=2, select_by="character/top1", **TINY))
    assert summary["best_epoch"] in (1, 2) and summary["select_by"] == "val/character/top1"
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
    ):
        assert key in rows[0], key
        value = float(rows[0][key])
        assert value >= 0 and (key.endswith("loss") or value <= 1), (key, value)
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
    fit(TrainConfig(data=str(synth_build), out=str(chosen), epochs=2, max_steps_per_epoch=2, global_pool="max", **TINY))
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
        (["--loss", "hinge"], "--loss must be"),
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


def test_contradiction_rate_counts_single_character_images_with_an_exclusive_pair_predicted():
    # Tags 0 and 1 exclude each other (two hair colours); tag 2 goes with anything.
    pairs = np.zeros((3, 3), bool)
    pairs[0, 1] = pairs[1, 0] = True
    probs = np.array(
        [
            [0.9, 0.8, 0.1],  # both hair colours: a contradiction
            [0.9, 0.2, 0.9],  # one hair colour and an unrelated tag: fine
            [0.9, 0.6, 0.0],  # both, on a two-character image: not counted
            [0.4, 0.6, 0.9],  # one (the other under the threshold): fine
        ]
    )
    single = np.array([True, True, False, True])
    assert contradiction_rate(probs, single, pairs, 0.5) == pytest.approx(1 / 3)
    assert contradiction_rate(probs, single, pairs, 0.85) == 0.0
    assert math.isnan(contradiction_rate(probs, np.zeros(4, bool), pairs, 0.5))


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
