"""Tar shards: what is written is what is read back, and a shard is either whole or absent."""

import hashlib
import json
import tarfile

import pytest

from illust2vec.errors import UserError
from illust2vec.formats.shards import (
    IMAGE_SHARDS,
    ShardWriter,
    file_sha256,
    image_members,
    image_sample,
    image_shards,
    index_shard,
    iter_samples,
    read_member,
    scan_shard,
)


def test_write_then_read_back_identical(tmp_path):
    samples = {f"k{i:03d}": {"jpg": bytes([i]) * (100 + i), "json": b'{"i": %d}' % i} for i in range(25)}
    writer = ShardWriter(tmp_path, "part-{index:06d}.tar")
    names = []
    for key, files in samples.items():
        writer.add(key, files)
        if writer.count == 10:
            names.append(writer.close().name)
    names.append(writer.close().name)
    assert names == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert writer.close() is None
    back = dict(iter_samples(tmp_path / n for n in names))
    assert back == samples
    members = [m for n in names for m in index_shard(tmp_path / n)]
    assert {(m.key, m.ext) for m in members} == {(k, e) for k, f in samples.items() for e in f}
    for m in members:
        assert read_member(m) == samples[m.key][m.ext]


def test_a_shard_being_written_is_not_a_tar_yet_and_abort_removes_it(tmp_path):
    writer = ShardWriter(tmp_path, "s-{index:06d}.tar")
    writer.add("a", {"txt": b"hello"})
    assert not (tmp_path / "s-000000.tar").exists() and (tmp_path / "s-000000.tar.tmp").exists()
    writer.abort()
    assert not list(tmp_path.iterdir())
    writer.add("b", {"txt": b"x"})
    info = writer.close()
    with tarfile.open(tmp_path / info.name) as tar:
        assert tar.getnames() == ["b.txt"]


def test_raw_image_shards_hold_the_file_and_its_record_by_md5(tmp_path):
    posts = {
        "a" * 32: ("jpg", b"\xff\xd8jpeg", {"id": 1, "tags_general": ["smile"]}),
        "b" * 32: ("zip", b"PK", {"id": 2}),
    }
    writer = ShardWriter(tmp_path, IMAGE_SHARDS)
    for md5, (ext, data, meta) in posts.items():
        writer.add(*image_sample(md5, ext, data, meta))
    assert writer.close().name == "images/000000.tar"
    assert image_shards(tmp_path) == [tmp_path / "images/000000.tar"]
    with tarfile.open(image_shards(tmp_path)[0]) as tar:
        assert tar.getnames() == [f"{'a' * 32}.jpg", f"{'a' * 32}.json", f"{'b' * 32}.zip", f"{'b' * 32}.json"]
    members = image_members(image_shards(tmp_path)[0])
    assert {md5: (m.ext, read_member(m)) for md5, m in members.items()} == {
        md5: (ext, data) for md5, (ext, data, _) in posts.items()
    }
    records = {key: json.loads(files["json"]) for key, files in iter_samples(image_shards(tmp_path), ["json"])}
    assert records == {md5: meta for md5, (_, _, meta) in posts.items()}
    assert image_members(tmp_path / "images/000001.tar") == {}  # a shard that is not there holds nothing


def _shard_of(tmp_path, n: int = 10):
    writer = ShardWriter(tmp_path, "s-{index:06d}.tar")
    for i in range(n):
        writer.add(f"k{i:03d}", {"jpg": bytes([i]) * 3000, "json": b'{"i": %d}' % i})
    return writer.close()


def test_the_writer_records_each_shards_size_and_sha256(tmp_path):
    info = _shard_of(tmp_path)
    path = tmp_path / info.name
    assert info.size == path.stat().st_size > 0
    assert info.sha256 == file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_whole_shard_scans_whole(tmp_path):
    info = _shard_of(tmp_path)
    scan = scan_shard(tmp_path / info.name)
    assert scan.problem == "" and len(scan.members) == 20


def _cut(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_a_shard_cut_to_half_gives_its_readable_members_and_says_so(tmp_path):
    info = _shard_of(tmp_path)
    path = tmp_path / info.name
    _cut(path, info.size // 2)
    scan = scan_shard(path)
    assert "cut short" in scan.problem and 0 < len(scan.members) < 20
    for m in scan.members:  # every member listed can be read whole
        assert len(read_member(m)) == m.size
    assert image_members(path) and len(image_members(path)) < 10
    # Cut exactly between two members (no end-of-archive block): still told from a whole shard.
    whole = _shard_of(tmp_path / "b")
    members = index_shard(tmp_path / "b" / whole.name)
    _cut(tmp_path / "b" / whole.name, members[4].offset + members[4].size + 511 & ~511)
    assert "cut short" in scan_shard(tmp_path / "b" / whole.name).problem
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    junk = scan_shard(tmp_path / "junk.tar")
    assert junk.members == [] and "not a readable tar" in junk.problem


def test_reading_a_shard_cut_to_half_is_one_line_naming_it(tmp_path):
    info = _shard_of(tmp_path)
    _cut(tmp_path / info.name, info.size // 2)
    read = []
    with pytest.raises(UserError, match=r"s-000000\.tar: cannot be read past sample \d+ .*half-copied") as e:
        read.extend(iter_samples([tmp_path / info.name]))
    assert "\n" not in str(e.value) and 0 < len(read) < 10


def test_shards_at_a_url_read_as_local_ones(tmp_path, bucket):
    """Streamed samples, scanned members at the same offsets, one ranged read per member; a cut object said so."""
    from illust2vec.util import storage

    samples = {f"k{i:03d}": {"jpg": bytes([i]) * (300 + i), "json": b'{"i": %d}' % i} for i in range(12)}
    writer = ShardWriter(tmp_path)
    for key, files in samples.items():
        writer.add(key, files)
    info = writer.close()
    url = f"{bucket}/s/{info.name}"
    storage.upload(tmp_path / info.name, url)
    assert dict(iter_samples([url])) == samples
    local, remote = scan_shard(tmp_path / info.name), scan_shard(url)
    assert remote.problem == "" and [(m.key, m.ext, m.offset) for m in remote.members] == [
        (m.key, m.ext, m.offset) for m in local.members
    ]
    assert [read_member(m) for m in remote.members] == [read_member(m) for m in local.members]
    assert file_sha256(url) == info.sha256
    data = (tmp_path / info.name).read_bytes()
    storage.write_bytes(f"{bucket}/cut.tar", data[: len(data) // 2])
    cut = scan_shard(f"{bucket}/cut.tar")
    assert cut.problem.startswith(f"cut short at {len(data) // 2} bytes") and 0 < len(cut.members) < len(local.members)
