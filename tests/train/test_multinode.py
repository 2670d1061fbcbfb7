"""Two torchrun "nodes" on this machine: two launchers joined by a c10d rendezvous on a loopback port, gloo, one
process each, streaming the training shards from the S3-compatible test server. They train like one process with
twice the batch (the tolerance of test_ddp.py), rank 0 alone writes the run directory (each node runs in its own
folder, so a file written by the other rank would show), and a resumed run carries on from rank 0's checkpoint
although the other node never saw it."""

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import typer

from illust2vec.cli import app
from illust2vec.errors import UserError
from illust2vec.train import distributed
from illust2vec.util import storage
from s3server import free_port
from train.test_ddp import TOLERANCE

COMMON = ["--arch", "test_resnet", "--workers", "0", "--lr", "3e-3"]


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f)]


def _two_nodes(data: str, tmp_path, run_id: str, *args: str) -> None:
    """`i2v train DATA ARGS --out run` on two torchrun nodes, in tmp_path/node0 and tmp_path/node1."""
    port = free_port()
    procs = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir(exist_ok=True)
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
            *("--rdzv-id", run_id, "--rdzv-conf", f"is_host={node == 0},join_timeout=60"),
            # c10d ranks the nodes by address (torchrun ignores --node-rank): 127.0.0.1 sorts first, so node 0 is
            # rank 0 here, as the node whose host name sorts first is on a cluster.
            *("--local-addr", f"127.0.0.{node + 1}"),
        ]
        command = [*launcher, "-m", "illust2vec.cli", "train", data, *COMMON, *args, "--out", "run"]
        procs.append(subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for node, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node}: {err[-3000:]}"


@pytest.mark.slow
def test_two_nodes_streaming_from_s3_train_like_one_and_resume(synth_build, bucket, tmp_path):
    data = f"{bucket}/build"
    storage.upload_tree(synth_build, data)  # the nodes inherit AWS_ENDPOINT_URL and the keys from s3_server
    single = subprocess.run(
        [sys.executable, "-m", "illust2vec.cli", "train", str(synth_build), *COMMON]
        + ["--epochs", "3", "--batch-size", "32", "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    # Two epochs on two nodes, then a second launch resumes to the third.
    _two_nodes(data, tmp_path, "first", "--epochs", "2", "--batch-size", "16")
    run = tmp_path / "node0" / "run"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch-001", "epoch-002"]
    assert list((tmp_path / "node1").iterdir()) == []  # rank 1 wrote nothing on its node
    _two_nodes(data, tmp_path, "second", "--epochs", "3", "--batch-size", "16", "--resume")
    assert list((tmp_path / "node1").iterdir()) == []

    config = json.loads((run / "config.json").read_text())
    assert config["runtime"]["world_size"] == 2
    assert config["dataset"] == data  # read from the bucket, not from a local copy
    one, two = _losses(tmp_path / "one"), _losses(run)
    assert len(one) == len(two) == 3
    assert two[-1] < two[0]  # it trains, across the resume too
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) / a < TOLERANCE, (one, two)


SBATCH = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train-2node.sbatch"


def _command(script: str, program: str) -> list[str]:
    """The words of the script's command that runs `program` (continuation lines joined)."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if any(w.endswith(program) for w in words):
            return words
    raise AssertionError(f"no {program} line in {SBATCH}")


def test_slurm_script_is_bash_and_its_flags_exist():
    """examples/slurm/train-2node.sbatch parses as bash, and its torchrun and `i2v train` lines use only flags the
    installed torchrun and i2v take."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    words = _command(SBATCH.read_text(), "torchrun")
    start = next(i for i, w in enumerate(words) if w.endswith("torchrun"))  # after srun's own options
    launcher, train = words[start : words.index("-m")], words[words.index("train") + 1 :]
    assert "--nnodes" in launcher and "c10d" in launcher and "--rdzv-endpoint" in launcher
    helps = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    known = set(re.findall(r"--[a-z][a-z0-9-]*", helps))
    assert {w for w in launcher if w.startswith("--")} - known == set()
    command = typer.main.get_command(app).commands["train"]
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    # $RESUME expands to --resume or to nothing.
    assert "--resume" in options and "$RESUME" in train
    assert {w for w in train if w.startswith("--")} - options == set()


def _rank(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: what on_main and sync_state give this rank, written to OUT/RANK.json."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d = distributed.Dist(rank=rank, world=2)
    got = {"plan": distributed.on_main(d, lambda: {"done": [1, 2], "read_by": rank})}

    def refuse():
        raise UserError("run already holds a run; add --resume to continue it or choose another --out")

    try:
        distributed.on_main(d, refuse)
    except UserError as e:
        got["error"] = str(e)
    torch.manual_seed(rank)  # other weights on each rank, as after rank 0 alone restored a checkpoint
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    if rank == 0:  # only rank 0's optimizer has state
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
    distributed.sync_state(d, model, optimizer)
    got["weight"] = model.weight.tolist()
    got["exp_avg"] = optimizer.state_dict()["state"][0]["exp_avg"].tolist()
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    distributed.teardown(d, finished=True)


@pytest.mark.slow
def test_rank_zero_reads_and_every_rank_gets_what_it_read(tmp_path):
    """distributed.on_main runs on rank 0 alone and hands its result, or its one-line error, to every rank;
    sync_state gives every rank rank 0's weights and optimizer state."""
    torch.multiprocessing.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["plan"] == one["plan"] == {"done": [1, 2], "read_by": 0}
    assert zero["error"] == one["error"] and one["error"].startswith("run already holds a run")
    assert zero["weight"] == one["weight"]
    assert zero["exp_avg"] == one["exp_avg"] and any(v != 0 for row in one["exp_avg"] for v in row)
