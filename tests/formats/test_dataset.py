"""A built dataset's files: dataset.json and a shard sample round trip; the Dataset handle reads them back."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from illust2vec.errors import UserError
from illust2vec.formats.dataset import (
    FORMAT_VERSION,
    INFO,
    SPLITS,
    VOCAB,
    DatasetInfo,
    Sample,
    SplitInfo,
    built_files,
    open_dataset,
    read_info,
    shard_pattern,
    write_info,
)
from illust2vec.formats.loader import decode_image
from illust2vec.formats.shards import ShardWriter, iter_samples
from illust2vec.formats.vocab import Vocab, write_vocab

VOCAB_ROWS = Vocab(
    (9999999, 9999998, 9999997, 9999996, 1, 2, 3),
    ("general", "sensitive", "questionable", "explicit", "1girl", "smile", "miku"),
    (9, 9, 9, 9, 0, 0, 4),
    (3, 0, 0, 0, 3, 1, 2),
)


def an_info(shards: dict[str, list[str]] | None = None) -> DatasetInfo:
    shards = shards or {"train": ["train-000000.tar", "train-000001.tar"], "val": ["val-000000.tar"], "test": []}
    counts = {"train": [2, 1], "val": [1, 0], "test": [0, 0]}
    return DatasetInfo(
        image_size=32,
        image_format="png",
        vocab_hash=VOCAB_ROWS.hash,
        heads={h: len(ix) for h, ix in VOCAB_ROWS.heads.items()},
        splits={
            s: SplitInfo(len(shards[s]), shards[s], {"rating": [len(shards[s]), 0, 0, 0], "general": counts[s]})
            for s in SPLITS
        },
        skipped={"corrupt": 1, "no_selected_tag": 4},
        skipped_examples={"corrupt": ["post 7 (000000.tar)"]},
        sources=["/crawls/a", "/crawls/b"],
        config={"size": 32, "workers": None, "dirs": ["/crawls/a", "/crawls/b"]},
        seconds=1.25,
    )


def test_dataset_json_round_trip(tmp_path):
    info = an_info()
    path = write_info(tmp_path, info)
    assert path == tmp_path / INFO and not list(tmp_path.glob("*.tmp"))
    assert read_info(tmp_path) == info
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == [
        "format_version",
        "image_size",
        "image_format",
        "vocab",
        "vocab_hash",
        "heads",
        "splits",
        "skipped",
        "skipped_examples",
        "sources",
        "config",
        "seconds",
    ]
    assert on_disk["format_version"] == FORMAT_VERSION and on_disk["vocab"] == VOCAB
    assert on_disk["splits"]["train"] == {
        "samples": 2,
        "shards": ["train-000000.tar", "train-000001.tar"],
        "tag_counts": {"rating": [2, 0, 0, 0], "general": [2, 1]},
        "files": {},  # sizes and checksums: none in this hand-made info
    }
    assert DatasetInfo.from_dict(on_disk) == info and info.as_dict() == on_disk


def test_shard_sample_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    sample = Sample(
        id=42, md5="ab" * 16, rating="s", labels={"rating": [1], "general": [0, 1], "character": []}, split="train"
    )
    writer = ShardWriter(tmp_path, shard_pattern("train"))
    writer.add(sample.md5, sample.members(buf.getvalue(), "png"))
    assert writer.close().name == "train-000000.tar"
    [(key, files)] = list(iter_samples([tmp_path / "train-000000.tar"]))
    assert key == sample.md5 and set(files) == {"png", "json"}
    assert Sample.from_json(files["json"]) == sample
    assert json.loads(files["json"]) == {
        "id": 42,
        "md5": "ab" * 16,
        "rating": "s",
        "labels": sample.labels,
        "split": "train",
    }
    assert np.array_equal(decode_image(files["png"]).permute(1, 2, 0).numpy(), pixels)


def test_open_dataset_reads_what_was_written(tmp_path):
    samples = [
        Sample(i, f"{i:032x}", "g", {"rating": [0], "general": [i % 2], "character": []}, "train") for i in range(3)
    ]
    writer = ShardWriter(tmp_path, shard_pattern("train"))
    for s in samples:
        writer.add(s.md5, s.members(b"not read here", "png"))
    writer.close()
    write_vocab(VOCAB_ROWS, tmp_path / VOCAB)
    write_info(tmp_path, an_info({"train": ["train-000000.tar"], "val": [], "test": []}))
    ds = open_dataset(tmp_path)
    assert ds.vocab == VOCAB_ROWS and ds.image_size == 32
    assert ds.shards("train") == [str(tmp_path / "train-000000.tar")] and ds.samples("train") == 1
    assert ds.tag_counts("train") == {"rating": [1, 0, 0, 0], "general": [2, 1]}
    assert list(ds.labels("train")) == samples
    (tmp_path / "stray.tmp").write_text("")
    assert sorted(p.name for p in built_files(tmp_path)) == [INFO, "stray.tmp", "train-000000.tar"]


@pytest.mark.parametrize(
    "text, needle",
    [
        (None, "no dataset.json; is it a directory that `i2v build` wrote?"),
        ("{", "not valid JSON"),
        ('{"format_version": 99}', "format version 99, this illust2vec reads 1"),
        ("[1]", "format version None"),
        ('{"format_version": 1, "image_size": 32}', "not a dataset.json this illust2vec reads"),
    ],
)
def test_a_bad_dataset_json_is_one_clear_line(tmp_path, text, needle):
    if text is not None:
        (tmp_path / INFO).write_text(text)
    with pytest.raises(UserError) as e:
        read_info(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_vocabulary_that_is_not_the_builds_is_refused(tmp_path):
    write_info(tmp_path, an_info())
    other = Vocab(VOCAB_ROWS.tag_ids, VOCAB_ROWS.names[:-1] + ("rin",), VOCAB_ROWS.categories, VOCAB_ROWS.counts)
    write_vocab(other, tmp_path / VOCAB)
    with pytest.raises(UserError, match="does not match"):
        open_dataset(tmp_path)


@pytest.fixture()
def built_copy(synth_build, tmp_path):
    """A copy of the synthetic build, to cut and corrupt."""
    import shutil

    return Path(shutil.copytree(synth_build, tmp_path / "ds"))


def _cut_to_half(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size // 2, size


def test_the_build_records_every_shards_size_and_sha256(synth_build):
    info = read_info(synth_build)
    for split in SPLITS:
        assert sorted(info.splits[split].files) == sorted(info.splits[split].shards)
        for name, rec in info.splits[split].files.items():
            assert rec["bytes"] == (synth_build / name).stat().st_size
            assert rec["sha256"] == hashlib.sha256((synth_build / name).read_bytes()).hexdigest()
    open_dataset(synth_build).check_shards(SPLITS, "checksums")  # a whole build passes


def test_a_shard_cut_to_half_is_named_in_one_line(built_copy):
    ds = open_dataset(built_copy)
    name = ds.info.splits["train"].shards[1]
    now, was = _cut_to_half(built_copy / name)
    with pytest.raises(UserError) as e:
        ds.check_shards(["train"], "sizes")
    assert str(e.value) == f"{built_copy / name}: {now} bytes, dataset.json says {was} (a half-copied file?)"
    ds.check_shards(["val", "test"])  # only the splits asked for
    (built_copy / name).unlink()
    with pytest.raises(UserError, match=rf"{name}: missing, though dataset.json lists it"):
        ds.check_shards(["train"])


def test_a_changed_shard_of_the_same_size_fails_its_checksum_when_asked_or_cheap(built_copy, monkeypatch):
    from illust2vec.formats import dataset

    ds = open_dataset(built_copy)
    path = built_copy / ds.info.splits["val"].shards[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ds.check_shards(["val"], "sizes")  # sizes alone cannot see it
    with pytest.raises(UserError, match=r"val-000000\.tar: sha256 [0-9a-f]{16}\.\.\., dataset.json says .*corrupted"):
        ds.check_shards(["val"], "auto")  # a small data set: its checksums are cheap
    monkeypatch.setattr(dataset, "CHEAP_CHECKSUM", 1000)
    ds.check_shards(["val"], "auto")  # too big to hash by default
    with pytest.raises(UserError, match="sha256"):
        ds.check_shards(["val"], "checksums")
    with pytest.raises(UserError, match="verify must be one of auto, sizes, checksums"):
        ds.check_shards(["val"], "md5")


def test_an_older_dataset_json_without_sizes_still_loads_unchecked(built_copy):
    d = json.loads((built_copy / INFO).read_text())
    for split in d["splits"].values():
        del split["files"]
    (built_copy / INFO).write_text(json.dumps(d))
    ds = open_dataset(built_copy)
    _cut_to_half(built_copy / ds.info.splits["train"].shards[0])
    assert ds.info.splits["train"].files == {}
    ds.check_shards(SPLITS, "checksums")  # nothing recorded, nothing checked


def test_dataset_json_round_trip_through_object_storage(bucket):
    from illust2vec.util import storage

    info = an_info()
    assert write_info(f"{bucket}/ds", info) == f"{bucket}/ds/{INFO}"
    assert read_info(f"{bucket}/ds") == info
    write_vocab(VOCAB_ROWS, f"{bucket}/ds/{VOCAB}")
    ds = open_dataset(f"{bucket}/ds/")  # a trailing slash is the same place
    assert (ds.root, ds.name, ds.vocab) == (f"{bucket}/ds", "ds", VOCAB_ROWS)
    assert ds.shards("train") == [f"{bucket}/ds/train-000000.tar", f"{bucket}/ds/train-000001.tar"]
    storage.write_text(f"{bucket}/ds/train-000003.tar", "an earlier build's")
    assert built_files(f"{bucket}/ds") == [f"{bucket}/ds/{INFO}", f"{bucket}/ds/train-000003.tar"]
    with pytest.raises(UserError, match=rf"^{bucket}/other: no dataset.json; is it a directory that `i2v build` wrote"):
        open_dataset(f"{bucket}/other")
