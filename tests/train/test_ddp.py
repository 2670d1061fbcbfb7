"""DDP on the CPU: two gloo processes under torchrun train like one process with twice the batch."""

import csv
import subprocess
import sys

import pytest

# Each process sees other samples in another order and, on the CPU, keeps its own BatchNorm statistics
# (SyncBatchNorm runs on GPUs only), so losses agree only approximately: the stated tolerance, relative, per epoch.
TOLERANCE = 0.15


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_train_like_one(synth_build, tmp_path):
    common = [str(synth_build), "--arch", "test_resnet", "--epochs", "3", "--workers", "0", "--lr", "3e-3"]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "illust2vec.cli",
            "train",
            *common,
            "--out",
            str(tmp_path / "one"),
            "--batch-size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    ddp = subprocess.run(
        [*launcher, "illust2vec.cli", "train", *common, "--out", str(tmp_path / "two"), "--batch-size", "16"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two[-1] < two[0]  # it trains
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) / a < TOLERANCE, (one, two)
