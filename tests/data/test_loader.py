"""The loader: every sample once, labels as written, deterministic evaluation, augmentation for training only."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.formats.dataset import open_dataset
from illust2vec.formats.loader import LoaderConfig, make_loader, make_pipeline, make_targets
from illust2vec.formats.shards import iter_samples


def _written(root, split):
    info = json.loads((root / "dataset.json").read_text())
    out = {}
    for _, files in iter_samples(root / n for n in info["splits"][split]["shards"]):
        meta = json.loads(files["json"])
        out[meta["id"]] = (np.asarray(Image.open(io.BytesIO(files["png"]))), meta)
    return out


def _key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def test_evaluation_reads_what_was_written_in_a_fixed_order(synth_build):
    ds = open_dataset(synth_build)
    heads = {h: len(ix) for h, ix in ds.vocab.heads.items()}
    written = _written(synth_build, "val")
    by_pixels = {img.transpose(2, 0, 1).tobytes(): meta for img, meta in written.values()}
    cfg = LoaderConfig(batch_size=4, workers=2)
    passes = []
    for _ in range(2):
        seen = []
        for images, targets in make_loader(ds, "val", cfg, train=False):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 96, 96)
            for i in range(images.shape[0]):
                meta = by_pixels[_key(images[i])]  # the exact pixels that were written
                expected = make_targets(meta["labels"], heads)
                for head, value in expected.items():
                    assert torch.equal(targets[head][i], value)
                seen.append(meta["id"])
        passes.append(seen)
    assert passes[0] == passes[1]
    assert sorted(passes[0]) == sorted(written)


def test_training_reads_every_sample_once_across_workers_and_augments(synth_build):
    ds = open_dataset(synth_build)
    written = _written(synth_build, "train")
    pixels = {img.transpose(2, 0, 1).tobytes() for img, _ in written.values()}
    n, unchanged, ratings = 0, 0, []
    for images, targets in make_loader(ds, "train", LoaderConfig(batch_size=8, workers=2), train=True):
        n += images.shape[0]
        unchanged += sum(_key(images[i]) in pixels for i in range(images.shape[0]))
        ratings += targets["rating"].tolist()
        assert targets["general"].dtype == torch.float32 and set(targets["general"].unique().tolist()) <= {0.0, 1.0}
    assert n == len(written) == ds.samples("train")
    assert unchanged < n / 2  # crop, flip and jitter change most pictures
    assert set(ratings) <= {0, 1, 2, 3}


def test_each_rank_reads_other_shards(synth_build, monkeypatch):
    ds = open_dataset(synth_build)
    assert len(ds.shards("train")) >= 2
    cfg = LoaderConfig(workers=0)
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got.append([meta for _, meta in _metas(make_pipeline(ds, "train", cfg, train=False))])
    assert got[0] and got[1] and not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == ds.samples("train")


@pytest.fixture(scope="module")
def one_shard(synth_crawl, synth_vocab, tmp_path_factory):
    """synth_crawl built into a single training shard: fewer shards than readers."""
    from illust2vec.data.build import BuildConfig, build

    out = tmp_path_factory.mktemp("one-shard")
    build(BuildConfig(dirs=(synth_crawl,), vocab=synth_vocab, out=out, size=32, shard_size=10_000, format="png"))
    return open_dataset(out)


def test_one_shard_feeds_every_worker_and_every_rank(one_shard, monkeypatch):
    ds = one_shard
    assert len(ds.shards("train")) == 1
    written = _written(ds.root, "train")
    pixels = {img.transpose(2, 0, 1).tobytes() for img, _ in written.values()}
    # Two workers: both produce, and together they read each sample once (the loader interleaves their batches).
    loader = make_loader(ds, "train", LoaderConfig(batch_size=5, workers=2), train=False)
    keys = [_key(images[i]) for images, _ in loader for i in range(images.shape[0])]
    assert sorted(keys) == sorted(pixels)
    sizes = [
        images.shape[0] for images, _ in make_loader(ds, "train", LoaderConfig(batch_size=10**6, workers=2), False)
    ]
    assert len(sizes) == 2 and min(sizes) >= len(written) // 2 - 1  # one batch from each worker, half the samples each
    # Two DDP ranks of one process each: disjoint halves.
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got.append({key for key, _ in _metas(make_pipeline(ds, "train", LoaderConfig(workers=0), train=True))})
    assert got[0] and got[1] and not got[0] & got[1]
    assert len(got[0]) + len(got[1]) == ds.samples("train")


def _metas(pipeline):
    for image, targets in pipeline:
        yield image, (_key(image), tuple(targets["general"].tolist()))


def test_epochs_shuffle_differently_and_reproducibly(synth_build):
    ds = open_dataset(synth_build)
    cfg = LoaderConfig(workers=0, shuffle_buffer=50)

    def order(epoch):
        torch.manual_seed(0)
        return [tuple(t["general"].tolist()) for _, t in make_pipeline(ds, "train", cfg, train=True, epoch=epoch)]

    assert order(1) == order(1) and order(1) != order(2)


def test_a_dataset_that_is_not_one_is_refused(tmp_path, synth_build):
    with pytest.raises(UserError, match="no dataset.json"):
        open_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(
        json.dumps({**json.loads((synth_build / "dataset.json").read_text()), "vocab_hash": "0" * 64})
    )
    (tmp_path / "selected_tags.csv").write_text((synth_build / "selected_tags.csv").read_text())
    with pytest.raises(UserError, match="does not match"):
        open_dataset(tmp_path)


def test_a_shard_cut_to_half_is_skipped_and_counted_not_a_traceback(synth_build, tmp_path):
    import shutil

    from illust2vec.formats.loader import BadSamples

    root = Path(shutil.copytree(synth_build, tmp_path / "ds"))
    ds = open_dataset(root)
    name = ds.info.splits["train"].shards[0]
    with open(root / name, "r+b") as f:
        f.truncate((root / name).stat().st_size // 2)
    bad = BadSamples()
    cfg = LoaderConfig(batch_size=8, workers=2)
    images = sum(len(x) for x, _ in make_loader(ds, "train", cfg, train=False, bad=bad))
    assert 0 < images < ds.samples("train")
    # Where the cut falls decides what is seen: a member cut short, or a sample without its labels.
    assert bad.count >= 1 and name in bad.first and ("unexpected end of data" in bad.first or "cut short" in bad.first)
