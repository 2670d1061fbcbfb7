"""The data stages on object storage (moto's S3 server): vocab and build from a crawl under s3:// to outputs under
s3:// give what the local stages give; train streams its shards from S3 without copying them; --verify names a
remote shard that differs; evaluate --data s3://; index build from s3:// vectors to an s3:// index; and bad URLs
are one line with exit status 2."""

import gc
import json
import shutil

import numpy as np
import pytest

from illust2vec.errors import UserError
from illust2vec.formats import loader as loader_module
from illust2vec.formats.dataset import INFO, open_dataset
from illust2vec.formats.loader import BadSamples, LoaderConfig, make_loader
from illust2vec.formats.shards import iter_samples
from illust2vec.util import storage

BUILD_ARGS = [
    "--size",
    "96",
    "--shard-size",
    "40",
    "--val-fraction",
    "0.15",
    "--test-fraction",
    "0.1",
    "--workers",
    "2",
    "--format",
    "png",
]  # synth_build's settings
VOCAB_ARGS = ["--top-general", "60", "--top-character", "20", "--top-copyright", "8"]  # synth_vocab's


@pytest.fixture(scope="module")
def remote(s3_server, synth_crawl, synth_build):
    """A bucket holding synth_crawl under crawl/ and synth_build under built/, as `s3://NAME`."""
    name = "data-" + synth_crawl.name.lower().replace("_", "-")[:20]
    s3_server.client().create_bucket(Bucket=name)
    storage.upload_tree(synth_crawl, f"s3://{name}/crawl")
    storage.upload_tree(synth_build, f"s3://{name}/built", last=(INFO,))
    return f"s3://{name}"


def samples_of(shard) -> list[tuple[str, dict[str, bytes]]]:
    return list(iter_samples([shard]))


def test_objects_are_what_the_crawl_holds(remote, synth_crawl):
    assert (
        storage.read_bytes(f"{remote}/crawl/posts/000000.parquet")
        == (synth_crawl / "posts/000000.parquet").read_bytes()
    )


@pytest.mark.slow
def test_vocab_and_build_from_s3_to_s3_match_the_local_stages(i2v, remote, synth_vocab, synth_build):
    code, _, err = i2v("vocab", f"{remote}/crawl", "--out", f"{remote}/out/selected_tags.csv", *VOCAB_ARGS)
    assert code == 0, err
    assert storage.read_bytes(f"{remote}/out/selected_tags.csv") == synth_vocab.read_bytes()
    assert f"{remote}/out/selected_tags.csv: " in err

    built = f"{remote}/out/built"
    code, _, err = i2v(
        "build", f"{remote}/crawl", "--vocab", f"{remote}/out/selected_tags.csv", "--out", built, *BUILD_ARGS
    )
    assert code == 0, err
    assert f"wrote {built}/dataset.json" in err
    local, there = open_dataset(synth_build), open_dataset(built)
    assert there.root == built and there.vocab == local.vocab
    for split in ("train", "val", "test"):
        assert there.info.splits[split].shards == local.info.splits[split].shards
        assert there.info.splits[split].tag_counts == local.info.splits[split].tag_counts
        for a, b in zip(local.shards(split), there.shards(split), strict=True):
            assert samples_of(a) == samples_of(b)  # the same samples, bytes for bytes (tar times differ)
    assert there.info.skipped == local.info.skipped
    assert there.info.sources == [f"{remote}/crawl"]
    # Every shard was uploaded whole: their sizes and checksums are those dataset.json records.
    there.check_shards(["train", "val", "test"], "checksums")
    names = {storage.name(p) for p in storage.listing(built)}
    assert names == {INFO, "selected_tags.csv", *[n for s in there.info.splits.values() for n in s.shards]}


@pytest.mark.slow
def test_a_rebuild_into_s3_removes_dataset_json_first_and_stale_shards(i2v, remote, synth_vocab, monkeypatch):
    built = f"{remote}/rebuild"
    storage.write_text(f"{built}/train-000099.tar", "a shard of an earlier build")
    storage.write_text(f"{built}/{INFO}", "{}")
    from illust2vec.data import build as build_module

    def fail(*args, **kwargs):
        raise UserError("upload failed (test)")

    monkeypatch.setattr(build_module.Output, "publish", fail)
    code, _, err = i2v("build", f"{remote}/crawl", "--vocab", str(synth_vocab), "--out", built, *BUILD_ARGS)
    assert (code, err.strip().splitlines()[-1]) == (2, "error: upload failed (test)")
    names = {storage.name(p) for p in storage.listing(built)}
    assert INFO not in names and "train-000099.tar" not in names  # nothing left that looks like a finished build


def _fit(data: str, out, workers: int = 0):
    from illust2vec.train.config import TrainConfig
    from illust2vec.train.loop import fit

    cfg = TrainConfig(
        data=data,
        out=str(out),
        epochs=1,
        arch="test_resnet",
        batch_size=16,
        workers=workers,
        select_by="loss",
        max_steps_per_epoch=3,  # a short epoch: it reads every shard to fill the shuffle buffer all the same
    )
    return fit(cfg)


@pytest.mark.slow
def test_train_streams_shards_from_s3_and_matches_the_local_run(remote, synth_build, tmp_path, monkeypatch):
    opened, downloaded = [], []
    real_open, real_download = storage.open_read, storage.download
    monkeypatch.setattr(storage, "open_read", lambda loc: opened.append(str(loc)) or real_open(loc))
    monkeypatch.setattr(storage, "download", lambda loc, dest: downloaded.append(str(loc)) or real_download(loc, dest))
    there = _fit(f"{remote}/built", tmp_path / "s3-run")
    here = _fit(str(synth_build), tmp_path / "local-run")
    # Streamed: every training shard opened as a stream from the bucket, none downloaded to a file.
    train = open_dataset(f"{remote}/built").shards("train")
    assert set(train) <= set(opened)
    assert not [u for u in downloaded if u.endswith(".tar")]
    a, b = there.last, here.last
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
    config = json.loads((tmp_path / "s3-run" / "config.json").read_text())
    assert config["dataset"] == f"{remote}/built"
    assert (tmp_path / "s3-run" / "selected_tags.csv").read_bytes() == (synth_build / "selected_tags.csv").read_bytes()


def test_the_loader_reads_the_same_samples_from_s3_as_from_disk(remote, synth_build):
    cfg = LoaderConfig(batch_size=8, workers=0)
    keys = {}
    for name, root in (("local", str(synth_build)), ("s3", f"{remote}/built")):
        pipeline = loader_module.make_pipeline(open_dataset(root), "val", cfg, train=False)
        keys[name] = [(img.sum().item(), sorted(t)) for img, t in pipeline]
    assert keys["s3"] == keys["local"] and len(keys["s3"]) == open_dataset(synth_build).samples("val")


def test_a_remote_shard_cut_short_is_counted_as_bad_samples(s3_server, bucket, synth_build):
    storage.upload_tree(synth_build, bucket, last=(INFO,))
    ds = open_dataset(bucket)
    first = ds.shards("val")[0]
    whole = storage.read_bytes(first)
    storage.write_bytes(first, whole[: len(whole) // 2])
    bad = BadSamples()
    seen = sum(len(x) for x, _ in make_loader(ds, "val", LoaderConfig(batch_size=8, workers=0), train=False, bad=bad))
    assert 0 < seen < ds.samples("val")
    assert bad.count >= 1 and first in bad.first
    with pytest.raises(UserError, match=rf"^{first}: \d+ bytes, dataset.json says {len(whole)}"):
        ds.check_shards(["val"], "sizes")


def test_a_connection_lost_mid_shard_is_resumed(s3_server, bucket, synth_build, monkeypatch):
    from s3server import CuttingProxy, forget_filesystems

    storage.upload_tree(synth_build, bucket, last=(INFO,))
    ds = open_dataset(bucket)
    cfg = LoaderConfig(batch_size=8, workers=0)
    direct = [x.sum().item() for x, _ in make_loader(ds, "train", cfg, train=False)]
    proxy = CuttingProxy(s3_server.endpoint, after=20_000, cut_responses=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    forget_filesystems()
    try:
        bad = BadSamples()
        cut = [x.sum().item() for x, _ in make_loader(open_dataset(bucket), "train", cfg, train=False, bad=bad)]
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        forget_filesystems()
    assert proxy.cuts >= 1
    assert (cut, bad.count) == (direct, 0)


def test_verify_sizes_names_the_remote_shard_that_differs(i2v, s3_server, bucket, synth_build, tmp_path):
    storage.upload_tree(synth_build, bucket, last=(INFO,))
    shard = open_dataset(bucket).shards("train")[1]
    data = storage.read_bytes(shard)
    storage.write_bytes(shard, data + b"\0" * 512)
    code, _, err = i2v("train", bucket, "--out", str(tmp_path / "run"), "--verify", "sizes", "--arch", "test_resnet")
    assert code == 2
    assert (
        err.strip() == f"error: {shard}: {len(data) + 512} bytes, dataset.json says {len(data)} (a half-copied file?)"
    )
    assert not (tmp_path / "run").exists()
    storage.write_bytes(shard, data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    storage.write_bytes(shard, bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(UserError, match=rf"^{shard}: sha256 .* \(a corrupted copy\?\)$"):
        open_dataset(bucket).check_shards(["train"], "checksums")
    open_dataset(bucket).check_shards(["train"], "auto")  # remote: sizes only, unless checksums are asked for
    storage.remove(shard)
    with pytest.raises(UserError, match=rf"^{shard}: missing, though dataset.json lists it$"):
        open_dataset(bucket).check_shards(["train"], "sizes")


@pytest.mark.slow
def test_evaluate_data_on_s3_gives_the_local_figures(i2v, remote, synth_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synth_run, run, ignore=shutil.ignore_patterns("eval"))
    code, out, err = i2v("evaluate", str(run), "--data", f"{remote}/built", "--json", "--workers", "0")
    assert code == 0, err
    there = json.loads(out)
    code, out, err = i2v("evaluate", str(run), "--json", "--workers", "0")
    here = json.loads(out)
    assert there["data"] == f"{remote}/built" and here["data"] != there["data"]
    assert there["heads"] == here["heads"] and there["loss"] == pytest.approx(here["loss"])


def _vectors_file(path, n: int, seed: int):
    import pyarrow.parquet as pq

    from illust2vec.formats.vectors import file_metadata, tags_json, vectors_table

    meta = file_metadata({"source": "m", "kind": "bundle", "feature_dim": 8, "vocab_hash": "v", "weights": None})
    v = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"img{seed}/{i:03d}.png" for i in range(n)]
    tags = [tags_json({"general": {"tag_a": 0.9}}) for _ in range(n)]
    pq.write_table(vectors_table(ids, ids, v, tags, meta), path)
    return ids, v


def test_index_build_from_s3_vectors_to_an_s3_index(i2v, bucket, tmp_path):
    from illust2vec.search import VectorIndex

    ids_a, va = _vectors_file(tmp_path / "a.parquet", 30, 1)
    ids_b, vb = _vectors_file(tmp_path / "b.parquet", 20, 2)
    storage.upload(tmp_path / "a.parquet", f"{bucket}/vectors/a.parquet")
    storage.upload(tmp_path / "b.parquet", f"{bucket}/more/b.parquet")
    code, _, err = i2v("index", "build", f"{bucket}/vectors/a.parquet", f"{bucket}/more", "--out", f"{bucket}/index")
    assert code == 0, err
    assert err.startswith(f"{bucket}/index: flat index of 50 vectors")
    assert [storage.name(p) for p in storage.listing(f"{bucket}/index")] == [
        "index.faiss",
        "index.json",
        "meta.parquet",
    ]
    local = tmp_path / "index"
    local.mkdir()
    for name in ("index.faiss", "index.json", "meta.parquet"):
        storage.download(f"{bucket}/index/{name}", local / name)
    index = VectorIndex.load(local)
    assert index.ids == ids_a + ids_b
    assert index.search(vb[3:4], k=1)[0][0][0] == ids_b[3]
    # A prefix that holds something else is not overwritten.
    storage.write_text(f"{bucket}/other/notes.txt", "mine")
    code, _, err = i2v("index", "build", f"{bucket}/vectors/a.parquet", "--out", f"{bucket}/other")
    assert code == 2 and "a non-empty prefix that is not an index" in err
    assert [storage.name(p) for p in storage.listing(f"{bucket}/other")] == ["notes.txt"]


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["vocab", "s3://no-such-bucket-i2v/crawl"],
            "s3://no-such-bucket-i2v/crawl: cannot read: no such bucket",
        ),
        (
            ["vocab", "CRAWL", "--out", "s3://no-such-bucket-i2v/tags.csv"],
            "s3://no-such-bucket-i2v/tags.csv: cannot write",
        ),
        (["vocab", "CRAWL", "--out", "https://example.com/tags.csv"], "can be read but not written"),
        (["vocab", "nosuch://bucket/crawl"], "nosuch://bucket/crawl"),
        (["build", "CRAWL", "--vocab", "VOCAB", "--out", "nosuch://b/built"], "no filesystem knows nosuch:// URLs"),
        (["build", "CRAWL", "--vocab", "VOCAB", "--out", "s3://no-such-bucket-i2v/b"], "no such bucket"),
        (["train", "s3://no-such-bucket-i2v/built", "--out", "RUN"], "no such bucket"),
        (
            ["train", "DATA", "--out", "s3://bucket/run", "--epochs", "1", "--arch", "test_resnet"],
            "out: the run directory must be a local folder",
        ),
        (["index", "build", "V", "--out", "nosuch://b/index"], "no filesystem knows nosuch:// URLs"),
    ],
)
def test_bad_urls_are_one_line_and_exit_2(i2v, s3_server, synth_crawl, synth_vocab, synth_build, tmp_path, args, words):
    fill = {"CRAWL": str(synth_crawl), "VOCAB": str(synth_vocab), "DATA": str(synth_build), "RUN": str(tmp_path / "r")}
    fill["V"] = str(tmp_path / "v.parquet")
    code, out, err = i2v(*[fill.get(a, a) for a in args])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "testing-secret-key" not in err


def test_read_ahead_gives_the_objects_bytes_in_any_pieces_and_stops_when_closed(s3_server, bucket):
    from illust2vec.formats.loader import ReadAhead

    data = np.random.default_rng(0).bytes(700_000)
    storage.write_bytes(f"{bucket}/blob.tar", data)
    stream = ReadAhead(f"{bucket}/blob.tar", chunk=65536, depth=2)
    got = [stream.read(n) for n in (1, 10, 100_000, 65536, 7)] + [stream.read()]
    assert b"".join(got) == data and stream.read(10) == b""
    stream.close()
    early = ReadAhead(f"{bucket}/blob.tar", chunk=1024, depth=1)  # its thread blocks on a full queue
    assert early.read(5) == data[:5]
    early.close()
    assert not early._thread.is_alive()
    missing = ReadAhead(f"{bucket}/nothing.tar")
    with pytest.raises(UserError, match=rf"^{bucket}/nothing.tar: cannot open: not found$"):
        missing.read(10)
    missing.close()


def test_a_reader_that_stops_early_leaves_no_read_ahead_behind(remote, monkeypatch):
    made = []

    class Tracked(loader_module.ReadAhead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            made.append(self)

        def close(self):
            super().close()
            self.closed = True

    monkeypatch.setattr(loader_module, "ReadAhead", Tracked)
    pipeline = loader_module.make_pipeline(open_dataset(f"{remote}/built"), "train", LoaderConfig(), train=False)
    samples = iter(pipeline)
    next(samples)
    assert len(made) == 2 and not any(r.closed for r in made)  # this shard, and the next one opened ahead
    samples.close()  # as a DataLoader does with an epoch cut short
    gc.collect()  # the inner generators close when collected, as a cut epoch's pipeline is
    assert all(r.closed and not r._thread.is_alive() for r in made)
