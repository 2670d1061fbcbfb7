"""The whole flow with every data path on an S3-compatible server (moto on loopback), through the command line:
crawl -> vocab -> build -> train -> evaluate -> export -> tag / embed -> index build. Only the run directory
(local by design: it holds checkpoints being written) is on disk. Nothing is downloaded whole but what a stage
needs locally (a crawl's image shard while build reads it; a bundle before it is opened)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from illust2vec.synth.cast import SynthConfig
from illust2vec.synth.server import start_board
from illust2vec.util import storage

I2V = [sys.executable, "-m", "illust2vec.cli"]


def i2v(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"i2v {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_every_stage_reads_and_writes_object_storage(bucket, tmp_path):
    crawl, vocab, data = f"{bucket}/crawl", f"{bucket}/vocab/selected_tags.csv", f"{bucket}/data"
    with start_board(SynthConfig(posts=120, seed=7)) as board:
        i2v("crawl", "--url", board.url, "--out", crawl, "--state-dir", str(tmp_path / "state"),
            "--api-rate", "200", "--file-rate", "200", "--shard-size", "50")  # fmt: skip
    assert storage.listing(f"{crawl}/images", "*.tar") and storage.listing(f"{crawl}/posts", "*.parquet")
    assert not list((tmp_path / "state").rglob("*.tar")), "uploaded shards are removed locally"

    i2v("vocab", crawl, "--out", vocab, "--top-general", "30", "--top-character", "10", "--top-copyright", "5")
    assert storage.read_text(vocab).startswith("tag_id,name,category,count")
    i2v("build", crawl, "--vocab", vocab, "--out", data, "--size", "64", "--shard-size", "40", "--workers", "1")
    info = json.loads(storage.read_text(f"{data}/dataset.json"))
    train = info["splits"]["train"]
    assert train["samples"] > 0 and info["sources"] == [crawl]
    assert [storage.name(s) for s in storage.listing(data, "train-*.tar")] == train["shards"]

    run = tmp_path / "run"
    i2v("train", data, "--out", str(run), "--arch", "test_resnet", "--epochs", "1", "--batch-size", "16",
        "--workers", "0", "--select-by", "loss", "--verify", "sizes")  # fmt: skip
    assert (run / "best.json").is_file()
    report = json.loads(i2v("evaluate", str(run), "--data", data, "--json", "--workers", "0").stdout)
    assert report["data"] == data and report["loss"] is not None and "general" in report["heads"]

    model = f"{bucket}/models/synth"
    i2v("export", str(run), "--out", model, "--onnx", "--workers", "0")
    assert storage.exists(f"{model}/config.json") and storage.exists(f"{model}/model.onnx")

    # images to tag: the crawl's own image shards on S3, read member by member
    shards = [str(s) for s in storage.listing(f"{crawl}/images", "*.tar")]
    tags_out = f"{bucket}/out/tags.jsonl"
    i2v("tag", *shards, "--model", model, "--format", "jsonl", "--out", tags_out)
    records = [json.loads(line) for line in storage.read_text(tags_out).splitlines()]
    assert records and all(r["path"].startswith(f"{crawl}/images/") for r in records)
    members = sum(1 for r in records if "/" in r["path"][len(crawl) :])
    assert members == len(records)

    vectors = f"{bucket}/out/vectors.parquet"
    i2v("embed", *shards, "--model", model, "--out", vectors)
    with storage.local_copy(vectors) as p:
        table = pq.read_table(p)
    assert table.num_rows == len(records)
    assert sorted(table.column("path").to_pylist()) == sorted(r["path"] for r in records)

    index = f"{bucket}/out/index"
    i2v("index", "build", vectors, "--out", index)
    assert storage.exists(f"{index}/index.json") and storage.exists(f"{index}/index.faiss")
