"""Broken training data: a shard cut short is named before training starts; unreadable samples are skipped and
counted, up to a limit past which the run stops in one line. Never a traceback."""

import csv
import re
import shutil
from pathlib import Path

import pytest

from illust2vec.errors import UserError
from illust2vec.formats.dataset import open_dataset, read_info, write_info
from illust2vec.formats.run import list_checkpoints
from illust2vec.formats.shards import ShardWriter, iter_samples
from illust2vec.train.config import TrainConfig
from illust2vec.train.loop import fit

TINY = ["--arch", "test_resnet", "--epochs", "1", "--batch-size", "16", "--workers", "0"]


@pytest.fixture()
def built_copy(synth_build, tmp_path) -> Path:
    return Path(shutil.copytree(synth_build, tmp_path / "ds"))


def corrupt_images(root: Path, n: int) -> None:
    """Rewrite the first training shard with the images of its first `n` samples replaced by garbage, as a build
    that wrote bad bytes would have, and record the new shard in dataset.json (so its size and checksum agree)."""
    info = read_info(root)
    name = info.splits["train"].shards[0]
    samples = list(iter_samples([root / name]))
    writer = ShardWriter(root, name)
    for i, (key, files) in enumerate(samples):
        writer.add(key, {ext: b"not an image" if i < n and ext != "json" else data for ext, data in files.items()})
    written = writer.close()
    info.splits["train"].files[name] = {"bytes": written.size, "sha256": written.sha256}
    write_info(root, info)


def test_a_training_shard_cut_to_half_is_one_line_before_training_starts(built_copy, tmp_path, i2v):
    name = open_dataset(built_copy).info.splits["train"].shards[1]
    size = (built_copy / name).stat().st_size
    with open(built_copy / name, "r+b") as f:
        f.truncate(size // 2)
    code, out, err = i2v("train", str(built_copy), "--out", str(tmp_path / "run"), *TINY)
    assert code == 2 and out == ""
    assert err == f"error: {built_copy / name}: {size // 2} bytes, dataset.json says {size} (a half-copied file?)\n"
    assert not list_checkpoints(tmp_path / "run")
    # i2v evaluate checks its split the same way before it reads it.
    val = open_dataset(built_copy).info.splits["val"].shards[0]
    with open(built_copy / val, "r+b") as f:
        f.truncate(100)
    code, _, err = i2v("evaluate", "nowhere", "--data", str(built_copy))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_evaluate_names_a_cut_validation_shard(synth_run, built_copy, i2v):
    val = open_dataset(built_copy).info.splits["val"].shards[0]
    with open(built_copy / val, "r+b") as f:
        f.truncate(1000)
    code, out, err = i2v("evaluate", str(synth_run), "--data", str(built_copy))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: {built_copy / val}: 1000 bytes, dataset.json says ") and err.count("\n") == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted_in_the_epochs_summary(built_copy, tmp_path, workers):
    corrupt_images(built_copy, 2)
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(built_copy), out=str(run), epochs=1, arch="test_resnet", batch_size=16, workers=workers)
    summary = fit(cfg)
    assert summary.last["train/bad_samples"] == 2 and summary.last["val/bad_samples"] == 0
    with open(run / "metrics.csv") as f:
        assert [float(r["train/bad_samples"]) for r in csv.DictReader(f)] == [2]


def test_past_the_limit_the_run_stops_with_one_clear_line(built_copy, tmp_path, i2v):
    corrupt_images(built_copy, 3)
    with pytest.raises(
        UserError, match="3 training samples could not be read this epoch, more than --max-bad-samples 2"
    ):
        fit(
            TrainConfig(
                data=str(built_copy),
                out=str(tmp_path / "r"),
                arch="test_resnet",
                epochs=1,
                workers=0,
                max_bad_samples=2,
            )
        )
    code, out, err = i2v("train", str(built_copy), "--out", str(tmp_path / "run"), *TINY, "--max-bad-samples", "0")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert re.match(
        r"error: [123] training samples could not be read this epoch, more than --max-bad-samples 0; ", line
    )
    assert "train-000000.tar: sample " in line and line.endswith("UnidentifiedImageError: cannot identify image file")
