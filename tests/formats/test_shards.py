"""Tar shards: what is written is what is read back, and a shard is either whole or absent."""

import tarfile

from illust2vec.formats.shards import ShardWriter, index_shard, iter_samples, read_member


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
