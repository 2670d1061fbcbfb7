"""The run directory's files, written and read back: config.json, checkpoints, metrics.csv, best.json and
eval/epoch-NNN/."""

import json
import math

import pytest
import torch

from illust2vec.errors import UserError
from illust2vec.formats import run as run_dir


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return model, opt


def _fresh():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def test_config_round_trip(tmp_path):
    config = {"train": {"epochs": 3, "softmax": ["character"]}, "model": {"name": "x"}, "vocab_hash": "abc"}
    run_dir.write_config(tmp_path, config)
    assert run_dir.read_config(tmp_path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
    with pytest.raises(UserError, match="cannot read the run's config.json"):
        run_dir.read_config(tmp_path / "nope")


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _trained()
    run_dir.save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "history": [{"epoch": 3}], "best_epoch": 3})
    expected_next = torch.rand(3)
    torch.manual_seed(123)  # disturb the RNG; loading must put it back
    other, other_opt = _fresh()
    state = run_dir.load_checkpoint(tmp_path, 3, other, other_opt)
    assert state["step"] == 3 and state["history"] == [{"epoch": 3}] and run_dir.list_checkpoints(tmp_path) == [3]
    assert run_dir.read_history(tmp_path) == [{"epoch": 3}]
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for (_, sa), (_, sb) in zip(
        opt.state_dict()["state"].items(), other_opt.state_dict()["state"].items(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(torch.as_tensor(sa["step"]), torch.as_tensor(sb["step"]))
    assert torch.equal(torch.rand(3), expected_next)
    files = {p.name for p in run_dir.checkpoint_dir(tmp_path, 3).iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "state.json"}  # nothing pickled
    # The weights alone, strictly.
    weights_only, _ = _fresh()
    run_dir.load_weights(run_dir.weights_path(tmp_path, 3), weights_only)
    assert torch.equal(weights_only[0].weight, model[0].weight)
    with pytest.raises(UserError, match="weights do not fit the model"):
        run_dir.load_weights(run_dir.weights_path(tmp_path, 3), torch.nn.Linear(4, 8))


def test_a_half_written_checkpoint_is_not_listed_and_epochs_resolve(tmp_path):
    model, opt = _trained()
    for epoch in (1, 2):
        run_dir.save_checkpoint(tmp_path, epoch, model, opt, {"step": epoch, "best_epoch": 1, "history": []})
    (run_dir.checkpoint_dir(tmp_path, 3)).mkdir()  # killed before its state.json
    assert run_dir.list_checkpoints(tmp_path) == [1, 2]
    # No best.json yet (a run still going): the latest checkpoint knows the best so far.
    assert run_dir.resolve_epoch(tmp_path, "best") == 1 and run_dir.resolve_epoch(tmp_path, "last") == 2
    run_dir.write_best(tmp_path, {"best_epoch": 2, "best": 0.5})
    assert run_dir.read_best(tmp_path) == {"best_epoch": 2, "best": 0.5}
    assert run_dir.resolve_epoch(tmp_path, "best") == 2 and run_dir.resolve_epoch(tmp_path, "1") == 1
    with pytest.raises(UserError, match="no checkpoint for epoch 3; there are 1, 2"):
        run_dir.resolve_epoch(tmp_path, 3)
    with pytest.raises(UserError, match="no such run directory"):
        run_dir.resolve_epoch(tmp_path / "nope")


def test_metrics_csv_round_trip(tmp_path):
    history = [
        {"epoch": 1, "train/loss": 0.5, "val/general/mAP": 0.25, "val/general/images": 40},
        {"epoch": 2, "train/loss": 0.25, "val/general/mAP": float("nan"), "val/general/images": 40, "lr": 1e-3},
    ]
    run_dir.write_metrics(tmp_path, history)
    back = run_dir.read_metrics(tmp_path)
    assert [r["epoch"] for r in back] == [1, 2]
    assert back[0] == {"epoch": 1, "train/loss": 0.5, "val/general/mAP": 0.25, "val/general/images": 40.0}
    assert math.isnan(back[1]["val/general/mAP"]) and back[1]["lr"] == 1e-3
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,train/loss,val/general/mAP,val/general/images,lr"


def test_eval_files_round_trip(tmp_path):
    out = run_dir.eval_dir(tmp_path, 7)
    assert out == tmp_path / "eval" / "epoch-007"
    report = {"epoch": 7, "loss": float("nan"), "heads": {"general": {"mAP": 0.5, "threshold_p_eq_r": float("inf")}}}
    run_dir.write_eval_metrics(out, report)
    assert run_dir.read_eval_metrics(out) == {
        "epoch": 7,
        "loss": None,
        "heads": {"general": {"mAP": 0.5, "threshold_p_eq_r": None}},
    }
    assert "NaN" not in (out / "metrics.json").read_text()  # strict JSON
    rows = [
        ("general", "1girl", 3, 0.75, 0.35, 0.5, 1.0, 2 / 3),
        ("rating", "general", 0, float("nan"), None, 0.0, float("nan"), float("nan")),
    ]
    run_dir.write_per_tag(out, rows)
    back = run_dir.read_per_tag(out)
    assert list(back[0]) == list(run_dir.PER_TAG_HEADER)
    assert back[0] == {
        "head": "general",
        "tag": "1girl",
        "support": "3",
        "ap": "0.7500",
        "threshold": "0.3500",
        "precision": "0.5000",
        "recall": "1.0000",
        "f1": "0.6667",
    }
    assert back[1] == {
        "head": "rating",
        "tag": "general",
        "support": "0",
        "ap": "",
        "threshold": "",
        "precision": "0.0000",
        "recall": "",
        "f1": "",
    }
    assert json.loads((out / "metrics.json").read_text())["epoch"] == 7


def test_weights_of_the_wrong_shape_are_one_line_not_a_traceback(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors: weights do not fit the model \(.*size mismatch"):
        run_dir.load_weights(tmp_path / "model.safetensors", torch.nn.Linear(5, 3))
