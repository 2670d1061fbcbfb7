"""TrainConfig checks itself (one-line UserError naming the field), carries TaggerConfig overrides in `model`, and
reads the config.json of runs written before that field existed."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from illust2vec.errors import UserError
from illust2vec.evaluate import EvalConfig, evaluate_run
from illust2vec.export import ExportConfig, export
from illust2vec.formats.run import read_config, resolve_epoch, write_config
from illust2vec.train.config import TrainConfig
from illust2vec.train.loop import fit
from illust2vec.train.losses import LossConfig

BASE = dict(data="ds", out="run")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amp": "x"}, "amp must be one of auto, bf16, fp16, off, not 'x'"),
        ({"channels_last": "yes"}, "channels_last must be one of auto, on, off, not 'yes'"),
        ({"device": "tpu"}, "device must be one of auto, cuda, cpu, not 'tpu'"),
        ({"epochs": 0}, "epochs must be an integer of at least 1, not 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer of at least 1, not 2.5"),
        ({"workers": -1}, "workers must be an integer of at least 0, not -1"),
        ({"lr": -1.0}, "lr must be a number of at least 0, not -1.0"),
        ({"threshold": 1.5}, "threshold must be in \\[0, 1\\], not 1.5"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch must be at least 1"),
        ({"select_by": ""}, "select_by must be a non-empty string"),
        ({"model": {"heads": ()}}, "model overrides heads are not among"),
        ({"model": {"pool": "max"}}, "model overrides pool are not among .*global_pool"),
        ({"softmax": ("hair",)}, "softmax: unknown heads hair"),
        ({"loss": {"kind": "hinge"}}, "loss must be one of bce, asl, not 'hinge'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(change, message):
    with pytest.raises(UserError, match=message) as e:
        TrainConfig(**BASE, **change)
    assert "\n" not in str(e.value)


def test_fit_with_a_bad_config_raises_user_error_not_key_error():
    with pytest.raises(UserError, match="amp must be"):
        fit(TrainConfig(**BASE, amp="x"))


def test_json_round_trip_and_the_old_shape():
    cfg = TrainConfig(
        **BASE,
        model={"global_pool": "max", "drop_rate": 0.1},
        softmax=("character",),
        loss=LossConfig(kind="asl", head_weights=(("general", 2.0),)),
    )
    assert TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    # config.json's "train" as runs wrote it before `model`: freeze and global_pool among the other fields.
    old = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k != "model"}
    old |= {"freeze": None, "global_pool": "max"}
    back = TrainConfig.from_json(old)
    assert back.model == {"global_pool": "max"} and back.softmax == ("character",) and back.loss == cfg.loss
    assert TrainConfig.from_json({**old, "global_pool": None}).model == {}
    with pytest.raises(UserError, match="unknown training settings colour"):
        TrainConfig.from_json({**old, "colour": 1})


def test_a_run_written_before_model_overrides_resumes(synth_build, tmp_path):
    tiny = dict(arch="test_resnet", batch_size=16, workers=0, max_steps_per_epoch=2, epochs=2)
    straight = tmp_path / "straight"
    fit(TrainConfig(data=str(synth_build), out=str(straight), model={"global_pool": "max"}, **tiny))
    # The same run as an older illust2vec left it, killed during epoch 2.
    old = tmp_path / "old"
    shutil.copytree(straight, old)
    shutil.rmtree(old / "checkpoints" / "epoch-002")
    config = read_config(old)
    train = {k: v for k, v in config["train"].items() if k != "model"} | {"freeze": None, "global_pool": "max"}
    write_config(old, {**config, "train": train})
    fit(TrainConfig(data=str(synth_build), out=str(old), model={"global_pool": "max"}, **tiny), resume=True)
    a = load_file(straight / "checkpoints" / "epoch-002" / "model.safetensors")
    b = load_file(old / "checkpoints" / "epoch-002" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_config(old)["train"]["model"] == {"global_pool": "max"}  # rewritten in today's shape
    # An old run evaluates and exports (they read the run's "model", whose shape has not changed).
    write_config(old, {**config, "train": train})
    assert evaluate_run(EvalConfig(str(old), workers=0)).heads["general"]["mAP"] is not None
    assert export(ExportConfig(str(old), str(tmp_path / "bundle"), workers=0)).epoch == resolve_epoch(old, "best")
    # Another pooling than the run's is another setting.
    shutil.rmtree(old / "checkpoints" / "epoch-002")
    with pytest.raises(UserError, match="other settings than the run's \\(model\\)"):
        fit(TrainConfig(data=str(synth_build), out=str(old), model={"global_pool": "avg"}, **tiny), resume=True)
