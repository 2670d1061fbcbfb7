"""The vectors Parquet: what the part writer writes (and merges) is what the reader reads back; files of two models
do not mix; a file that is not one is a one-line error."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from illust2vec.errors import UserError
from illust2vec.formats.vectors import (
    FORMAT,
    FORMAT_VERSION,
    META_KEY,
    PartWriter,
    check_same_model,
    done_ids,
    file_meta,
    file_metadata,
    model_meta,
    parts_dir,
    read_vectors,
    tags_json,
    vectors_table,
)


def _meta(dim: int = 4, vocab: str = "v1") -> dict:
    return file_metadata({"source": "m", "kind": "bundle", "feature_dim": dim, "vocab_hash": vocab, "weights": None})


def _rows(n: int, dim: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"img/{i:03d}.png" for i in range(n)]
    tags = [tags_json({"general": {"tag_a": 0.123456789}, "rating": {"general": 0.9}}) for _ in range(n)]
    return ids, [f"/data/{i}" for i in ids], v, tags


def test_part_writer_then_read_back_identical(tmp_path):
    out = tmp_path / "vectors.parquet"
    meta = _meta()
    ids, paths, v, tags = _rows(10)
    writer = PartWriter(out, meta, size=3)
    for row in zip(ids, paths, v, tags, strict=True):
        writer.add(*row)
    assert len(list(parts_dir(out).glob("part-*.parquet"))) == 3  # 3 whole parts written while running
    assert writer.close() == 10
    assert not parts_dir(out).exists()
    back = read_vectors([out])
    assert back.ids == ids and back.paths == paths and back.tags == tags
    np.testing.assert_array_equal(back.vectors, v)
    assert back.meta == meta and back.meta["format"] == FORMAT and back.meta["format_version"] == FORMAT_VERSION
    assert json.loads(back.tags[0])["general"]["tag_a"] == 0.1235  # rounded to SCORE_DIGITS
    assert done_ids(out) == set(ids)


def test_a_rerun_adds_parts_to_the_merged_file(tmp_path):
    out = tmp_path / "vectors.parquet"
    ids, paths, v, tags = _rows(6)
    w = PartWriter(out, _meta(), size=100)
    for row in list(zip(ids, paths, v, tags, strict=True))[:4]:
        w.add(*row)
    w.close()
    w = PartWriter(out, _meta(), size=100)
    for row in list(zip(ids, paths, v, tags, strict=True))[4:]:
        w.add(*row)
    w.flush()
    assert done_ids(out) == set(ids)  # the file and the unmerged part together
    assert w.close() == 6
    np.testing.assert_array_equal(read_vectors([out]).vectors, v)


def test_reader_keeps_first_of_each_id_and_reads_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ids, paths, v, tags = _rows(5)
    pq.write_table(vectors_table(ids[:3], paths[:3], v[:3], tags[:3], _meta()), a / "x.parquet")
    pq.write_table(vectors_table(ids[2:], paths[2:], v[2:] + 1, tags[2:], _meta()), b / "y.parquet")
    back = read_vectors([a, b / "y.parquet"])
    assert back.ids == ids and back.duplicates == 1
    np.testing.assert_array_equal(back.vectors[2], v[2])  # the first file's row


def test_two_models_do_not_mix(tmp_path):
    ids, paths, v, tags = _rows(2)
    pq.write_table(vectors_table(ids, paths, v, tags, _meta(vocab="v1")), tmp_path / "a.parquet")
    pq.write_table(vectors_table(ids, paths, v, tags, _meta(vocab="v2")), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="another model"):
        read_vectors([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    with pytest.raises(UserError, match="another model"):
        check_same_model(tmp_path / "a.parquet", _meta(vocab="v2"))
    check_same_model(tmp_path / "a.parquet", _meta(vocab="v1"))


def test_not_a_vectors_file(tmp_path):
    (tmp_path / "x.parquet").write_text("no")
    with pytest.raises(UserError, match="not a Parquet file"):
        file_meta(tmp_path / "x.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1]}), tmp_path / "y.parquet")
    with pytest.raises(UserError, match="not a vectors file"):
        read_vectors([tmp_path / "y.parquet"])
    schema_meta = pq.read_schema(tmp_path / "y.parquet").metadata or {}
    assert META_KEY not in schema_meta


def test_model_meta_hashes_the_weights_and_the_vocabulary(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"weights")
    model = SimpleNamespace(source=str(tmp_path), kind="wd-onnx", feature_dim=None, labels=SimpleNamespace(names=["a"]))
    meta = model_meta(model)
    (tmp_path / "model.onnx").write_bytes(b"retrained")
    again = model_meta(model)
    assert meta["vocab_hash"] == again["vocab_hash"] and meta["weights"] != again["weights"]
    model.labels.names = ["a", "b"]
    assert model_meta(model)["vocab_hash"] != meta["vocab_hash"]


def test_parts_and_the_merged_file_round_trip_on_s3(bucket):
    """Parts and the merge written as objects; read back from the file's URL, and from a prefix of parts (--ray)."""
    from illust2vec.util import storage

    meta, (ids, paths, v, tags) = _meta(), _rows(7)
    out = f"{bucket}/v/vectors.parquet"
    writer = PartWriter(out, meta, size=3)
    for row in zip(ids, paths, v, tags, strict=True):
        writer.add(*row)
    assert len(storage.listing(parts_dir(out), "part-*.parquet")) == 2
    assert done_ids(out) == set(ids[:6])  # what a rerun would skip: the whole parts
    assert writer.close() == 7 and storage.listing(parts_dir(out)) == []
    back = read_vectors([out])
    assert back.ids == ids and back.paths == paths and back.meta == meta
    np.testing.assert_array_equal(back.vectors, v)
    prefix = f"{bucket}/ray"
    parts = PartWriter(prefix, meta, size=4, folder=prefix, digits=5)
    for row in zip(ids, paths, v, tags, strict=True):
        parts.add(*row)
    parts.finish()
    assert [storage.name(p) for p in storage.listing(prefix)] == ["part-00000.parquet", "part-00001.parquet"]
    assert read_vectors([prefix]).ids == ids
