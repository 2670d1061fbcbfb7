"""A built dataset's files: dataset.json and a shard sample round trip; the Dataset handle reads them back."""

import io
import json

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
