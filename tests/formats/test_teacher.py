"""formats/teacher.py: the soft-target cache of i2v distill, written and read back."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from illust2vec.errors import UserError
from illust2vec.formats import teacher as cache
from illust2vec.formats.bundle import Thresholds
from illust2vec.formats.dataset import Sample, open_dataset
from illust2vec.formats.loader import LoaderConfig, make_loader
from illust2vec.formats.vocab import Vocab

VOCAB = Vocab(
    (1, 2, 3, 4, 5, 6, 7),
    ("general", "sensitive", "questionable", "explicit", "red", "blue", "alice"),
    (9, 9, 9, 9, 0, 0, 4),
    (0,) * 7,
)
HEADS = {"rating": 4, "general": 2, "character": 1}


def info(**changes) -> cache.TeacherInfo:
    base = dict(
        source="/models/wd",
        kind="wd-onnx",
        weights="ab" * 32,
        image_size=448,
        size=32,
        vocab_hash=VOCAB.hash,
        activations={"rating": "sigmoid", "general": "sigmoid", "character": "sigmoid"},
        thresholds=Thresholds().to_json(),
        val_fraction=0.5,
        part_size=2,
        items=3,
        items_hash=cache.items_hash(["a", "b", "c"]),
    )
    return cache.TeacherInfo(**{**base, **changes})


def jpeg(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_a_cache_round_trips_and_the_loader_gives_the_teachers_probabilities(tmp_path):
    root = tmp_path / "teacher"
    cache.write_identity(root, info(), VOCAB)
    assert cache.read_identity(root) == info() and cache.read_vocab_of(root) == VOCAB
    probs = {
        "a": np.array([0.7, 0.1, 0.1, 0.1, 0.9, 0.2, 0.95], np.float32),
        "b": np.array([0.1, 0.6, 0.2, 0.1, 0.1, 0.8, 0.05], np.float32),
        "c": np.array([0.2, 0.2, 0.5, 0.1, 0.6, 0.6, 0.5], np.float32),
    }
    labels = {"a": {"rating": [0], "general": [0], "character": [0]}, "b": {"rating": [1], "general": [1]}}
    labels["c"] = {"rating": [2], "general": [0, 1], "character": []}
    records = []
    for index, names in enumerate((("a", "b"), ("c",))):
        part = cache.PartWriter(root, index, len(names), HEADS)
        for n in names:
            split = "val" if n == "b" else "train"
            record = {"id": index, "md5": n, "rating": "", "labels": labels[n], "split": split, "path": n}
            part.add(n, split, cache.sample_members(jpeg((200, 0, 0)), record, probs[n]), labels[n])
        records.append(part.close())
    assert [r.index for r in cache.finished_parts(root)] == [0, 1]
    assert records[0].samples == {"train": 1, "val": 1} and records[1].shards.keys() == {"train"}
    cache.finish(root, info(), VOCAB, records, ["pictures"])
    ds = open_dataset(root)
    assert ds.samples("train") == 2 and ds.samples("val") == 1 and ds.image_size == 32
    assert ds.tag_counts("train")["general"] == [2, 1] and ds.tag_counts("train")["character"] == [1]
    ds.check_shards(["train", "val"], "checksums")
    assert [s.md5 for s in ds.labels("train")] == ["a", "c"] and isinstance(next(ds.labels("val")), Sample)
    loader = make_loader(ds, "train", LoaderConfig(batch_size=4, workers=0), train=False)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 32, 32)
    for head, ix in VOCAB.heads.items():
        got = targets[cache.TARGET + head].numpy()
        want = np.stack([probs[n][list(ix)] for n in ("a", "c")])
        assert np.abs(got - want).max() < 1e-3  # float16 on disk
    assert targets["rating"].tolist() == [0, 2] and targets["general"].tolist() == [[1, 0], [1, 1]]


def test_probabilities_are_never_unpickled():
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        cache.decode_probs(buf.getvalue())
    assert cache.decode_probs(cache.encode_probs(np.array([0.25, 0.5]))).tolist() == [0.25, 0.5]


def test_keys_and_splits_depend_on_the_path_alone():
    keys = [cache.sample_key(f"/pictures/{i}.jpg") for i in range(2000)]
    assert len(set(keys)) == 2000 and all("." not in k for k in keys)
    val = sum(cache.split_of(k, 0.1) == "val" for k in keys)
    assert 150 < val < 250 and cache.split_of(keys[0], 0.1) == cache.split_of(cache.sample_key("/pictures/0.jpg"), 0.1)


def test_unfinished_parts_are_cleared_and_other_teachers_named(tmp_path):
    root = tmp_path / "t"
    cache.write_identity(root, info(), VOCAB)
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar.tmp", "dataset.json"):
        (root / name).write_bytes(b"x")
    cache.clear_unfinished(root, 1)
    assert sorted(p.name for p in root.glob("*.tar*")) == ["train-000000.tar"] and not (root / "dataset.json").exists()
    assert info().differences(info(size=64, weights="cd" * 32)) == ["teacher weights", "size"]
    assert info().differences(info(items=4, items_hash="x")) == ["image list"]
    (root / cache.IDENTITY).write_text("{")
    with pytest.raises(UserError, match="teacher.json"):
        cache.read_identity(root)


def test_a_distilled_runs_agreement_round_trips(tmp_path):
    matched = Thresholds(heads={"general": 0.41, "character": 0.7}, method="matched")
    cache.write_agreement(tmp_path, 3, matched, {"agreement/general/f1": 0.9, "agreement/copyright/top1": math.nan})
    got = cache.read_agreement(tmp_path, 3)
    assert got.heads["general"] == 0.41 and got.heads["character"] == 0.7
    assert cache.read_agreement(tmp_path, 4) is None
