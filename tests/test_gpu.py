"""The CUDA paths: training with bf16 and channels-last, resume, DDP over NCCL, and every command that takes --device.

Marked `gpu`: conftest skips them where torch sees no CUDA device (this project's CI); `bench/gpu.sh` runs them on a
lent GPU machine. Tolerances are for TF32 convolutions and bf16 autocast against fp32 on the CPU.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from illust2vec.formats.run import read_config, resolve_epoch, weights_path
from illust2vec.models import load_tagger

pytestmark = pytest.mark.gpu


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cuda_run(synth_build, tmp_path_factory):
    """i2v_small trained on the GPU for three epochs through the CLI."""
    run = tmp_path_factory.mktemp("cuda") / "run"
    cmd = [sys.executable, "-m", "illust2vec.cli", "train", str(synth_build), "--arch", "i2v_small"]
    cmd += ["--out", str(run), "--epochs", "3", "--batch-size", "16", "--device", "cuda", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_training_on_cuda_uses_bf16_and_channels_last_and_learns(cuda_run):
    rows = _rows(cuda_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train/loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert all(math.isfinite(float(r["val/general/mAP"])) for r in rows)
    runtime = json.loads((cuda_run / "config.json").read_text())["runtime"]
    assert runtime["device"].startswith("cuda")
    assert runtime["autocast"] == "bfloat16" and runtime["channels_last"] is True


def test_a_cuda_run_loads_on_the_cpu_and_agrees_with_the_gpu(cuda_run, synth_build):
    model = load_tagger(read_config(cuda_run)["model"], weights_path(cuda_run, resolve_epoch(cuda_run, "last")))
    x = torch.randint(0, 256, (4, 3, model.cfg.image_size, model.cfg.image_size), dtype=torch.uint8)
    with torch.no_grad():
        cpu = {k: v.float() for k, v in model(x).items()}
        model = model.cuda().to(memory_format=torch.channels_last)
        gpu = {k: v.float().cpu() for k, v in model(x.cuda().contiguous(memory_format=torch.channels_last)).items()}
    for head in cpu:
        torch.testing.assert_close(gpu[head], cpu[head], atol=2e-2, rtol=2e-2)


def test_resume_on_cuda_continues_the_run(cuda_run, synth_build, tmp_path):
    # Kernels on a GPU are not bitwise deterministic (atomics in the backward pass), so resume is checked for
    # continuing at the right epoch and step with losses close to the uninterrupted run's, not for equal weights.
    killed = tmp_path / "killed"
    shutil.copytree(cuda_run, killed)
    shutil.rmtree(killed / "checkpoints" / "epoch-003")
    cmd = [sys.executable, "-m", "illust2vec.cli", "train", str(synth_build), "--arch", "i2v_small"]
    cmd += ["--out", str(killed), "--epochs", "3", "--batch-size", "16", "--device", "cuda", "--workers", "2"]
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _rows(cuda_run), _rows(killed)
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    assert abs(float(a[2]["train/loss"]) - float(b[2]["train/loss"])) / float(a[2]["train/loss"]) < 0.05
    w = load_file(killed / "checkpoints" / "epoch-003" / "model.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in w.values())


def test_ddp_with_syncbatchnorm_on_the_gpu(synth_build, tmp_path):
    # Two processes: over NCCL with a GPU each where there are two, else sharing the one GPU over gloo.
    env = dict(os.environ)
    if torch.cuda.device_count() < 2:
        env["I2V_DIST_BACKEND"] = "gloo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    cmd = [*launcher, "illust2vec.cli", "train", str(synth_build), "--arch", "i2v_small", "--epochs", "2"]
    cmd += ["--out", str(tmp_path / "ddp"), "--batch-size", "8", "--device", "cuda", "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(r["train/loss"]) for r in _rows(tmp_path / "ddp")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    runtime = json.loads((tmp_path / "ddp" / "config.json").read_text())["runtime"]
    assert runtime["world_size"] == 2 and runtime["sync_bn"] is True


def test_evaluate_export_tag_and_show_on_cuda(cuda_run, synth_images, i2v, tmp_path):
    code, out, err = i2v("evaluate", str(cuda_run), "--device", "cuda", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["heads"]["general"]["mAP"] <= 1.0
    bundle = tmp_path / "bundle"
    code, out, err = i2v("export", str(cuda_run), "--out", str(bundle), "--onnx", "--device", "cuda")
    assert code == 0, err
    code, out, err = i2v("tag", str(synth_images), "--model", str(bundle), "--format", "json", "--device", "cuda")
    assert code == 0, err
    on_gpu = {r["path"]: r for r in json.loads(out)}
    code, out, err = i2v("tag", str(synth_images), "--model", str(bundle), "--format", "json", "--device", "cpu")
    assert code == 0, err
    on_cpu = {r["path"]: r for r in json.loads(out)}
    assert on_gpu.keys() == on_cpu.keys() and len(on_gpu) == 12
    code, out, err = i2v("show", str(next(synth_images.glob("*.png"))), "--model", str(bundle))
    assert code != 0  # --out is required: a one-line error
    png = tmp_path / "show.png"
    first = sorted(synth_images.glob("*.png"))[0]
    code, out, err = i2v("show", str(first), "--model", str(bundle), "--out", str(png), "--device", "cuda")
    assert code == 0, err
    assert png.stat().st_size > 10_000


def test_tagger_on_cuda_matches_the_cpu(synth_bundle, synth_images):
    from illust2vec.infer.tagger import Tagger

    paths = sorted(p for p in synth_images.iterdir() if p.suffix != ".json")
    cpu = Tagger.load(synth_bundle, backend="torch", device="cpu").predict(paths)
    gpu = Tagger.load(synth_bundle, backend="torch", device="cuda").predict(paths)
    assert cpu.shape == gpu.shape == (len(paths), cpu.shape[1])
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)
