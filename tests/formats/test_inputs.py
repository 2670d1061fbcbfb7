"""formats/inputs.py: files, folders and tar shards walked into items, and each item's bytes read back as written."""

from pathlib import Path

import pytest

from illust2vec.errors import UserError
from illust2vec.formats.inputs import discover, read_item
from illust2vec.formats.shards import ShardWriter


def test_items_read_back_as_written_from_folders_files_and_shards(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    written = {"b.png": b"png bytes", "a.jpg": b"jpeg bytes", ".hidden.jpg": b"x", "sub/c.webp": b"webp bytes"}
    for name, data in written.items():
        (folder / name).write_bytes(data)
    writer = ShardWriter(tmp_path / "shards")
    writer.add("k1", {"jpg": b"member one", "json": b"{}"})
    writer.add("k2", {"png": b"member two"})
    writer.close()
    shard = next((tmp_path / "shards").glob("*.tar"))
    alone = tmp_path / "alone.gif"
    alone.write_bytes(b"gif bytes")

    class Counts:
        subfolders_skipped = 0

    counts = Counts()
    items = discover([str(folder), str(shard), str(alone), str(folder / "a.jpg")], recursive=False, summary=counts)
    got = {item.key: read_item(item) for item in items}
    # folder sorted, hidden passed over, subfolder counted; members in the shard's order; a file named twice once
    assert [item.key for item in items] == [
        "a.jpg",
        "b.png",
        f"{shard.name}/k1.jpg",
        f"{shard.name}/k1.json",
        f"{shard.name}/k2.png",
        "alone.gif",
    ]
    assert got["a.jpg"] == b"jpeg bytes" and got[f"{shard.name}/k2.png"] == b"member two"
    assert got["alone.gif"] == b"gif bytes" and counts.subfolders_skipped == 1
    assert [it.named for it in items] == [False] * 5 + [True]
    recursive = discover([str(folder)], recursive=True)
    assert {it.key: read_item(it) for it in recursive}["sub/c.webp"] == b"webp bytes"


def test_a_shard_cut_short_and_a_missing_path(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("k1", {"jpg": b"a" * 3000})
    writer.add("k2", {"jpg": b"b" * 3000})
    writer.close()
    shard = next(tmp_path.glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:2500])  # inside k2's data... or k1's: either way not whole
    items = discover([str(shard)], recursive=False)
    assert items and items[-1].error is not None
    with pytest.raises(OSError):
        read_item(items[-1])
    with pytest.raises(UserError, match="no such file or folder"):
        discover([str(Path(tmp_path / "nope"))], recursive=False)
